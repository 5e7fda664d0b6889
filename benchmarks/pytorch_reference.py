r"""nanoGPT's model and training step in PyTorch, timed at benchmarks/throughput.py's shapes.

  python -m benchmarks.pytorch_reference --shape=nanogpt_cpu
  python -m benchmarks.throughput --shape=nanogpt_cpu   # the JAX step it is the yardstick for

The model follows nanoGPT's model.py: token + learned position embeddings, pre-LayerNorm blocks
(LayerNorm without bias when bias=False), causal self-attention with one fused q/k/v projection
(`c_attn`) and `c_proj` around `F.scaled_dot_product_attention(is_causal=True)`, an MLP of width
4d with exact GELU, a final LayerNorm and an output head tied to the token embedding. GPT-2 init:
every Linear and Embedding weight normal(0, 0.02), biases zero, the residual projections (`c_proj`)
normal(0, 0.02 / sqrt(2 L)). Dropout is 0.

The step follows nanoGPT's train.py (no gradient accumulation, no torch.compile, as its CPU recipe
runs): forward, mean next-token cross-entropy, backward, `clip_grad_norm_(1.0)`, AdamW (betas
0.9/0.99, weight decay 0.1 on tensors with dim >= 2 and none on the rest) at a learning rate set on
every parameter group before the step, then `zero_grad(set_to_none=True)`. The learning rate follows
the JAX benchmark's schedule (linear warmup from 0, cosine decay; the numbers of
experiments/configs/perplexity.py), stepped the same way.

Like benchmarks/throughput.py, every step trains on one fixed random batch of the shape's batch x
context tokens (the same tokens for the same seed), float32, and the step-time line has the same
format; FLOPs per token are 6N + 12LTd with N every parameter but the position embedding (the tied
embedding counted once, as the output head), as `llm_math.flops` counts them. torch is an optional
extra and is imported only here.
"""

import math
import os
import resource
import sys
import time

from absl import app
from absl import flags
import numpy as np

try:
  import torch
  from torch import nn
  from torch.nn import functional as F
except ImportError:
  if __name__ != "__main__":
    raise
  print('error: pytorch_reference needs torch: pip install -e ".[torch]"', file=sys.stderr)
  sys.exit(2)

from benchmarks import cpu_info
from benchmarks.shapes import SHAPES

FLAGS = flags.FLAGS


def define_flags():
  """The command line. Defined only when this file runs as a script: importing its model (tests)
  then leaves the flags of our other scripts, which share these names, alone."""
  flags.DEFINE_enum("shape", "nanogpt_cpu", list(SHAPES), "Named model/batch shape.")
  flags.DEFINE_integer("steps", 20, "Timed steps (after the warm-up steps).")
  flags.DEFINE_integer("warmup", 3, "Untimed steps first (the JAX benchmark runs 3).")
  flags.DEFINE_integer("seed", 0, "Seed of the parameters and of the random token batch.")
  flags.DEFINE_integer("threads", 0, "torch.set_num_threads (0 = os.cpu_count()).")

# The JAX benchmark's optimizer settings (the values of experiments/configs/perplexity.py).
LEARNING_RATE = 3e-3
MIN_LEARNING_RATE = 3e-4
WARMUP_STEPS = 100
DECAY_STEPS = 1500
BETAS = (0.9, 0.99)
EPS = 1e-8
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0


class CausalSelfAttention(nn.Module):
  """Multi-head causal attention: one Linear to q, k, v, the fused SDPA kernel, one Linear out."""

  def __init__(self, d_model: int, heads: int, bias: bool):
    super().__init__()
    if d_model % heads:
      raise ValueError(f"d_model={d_model} is not a multiple of heads={heads}")
    self.heads = heads
    self.c_attn = nn.Linear(d_model, 3 * d_model, bias=bias)
    self.c_proj = nn.Linear(d_model, d_model, bias=bias)

  def forward(self, x_BxTxD):
    b, t, d = x_BxTxD.shape
    to_heads = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # B x H x T x K
    q, k, v = (to_heads(y) for y in self.c_attn(x_BxTxD).split(d, dim=2))
    y_BxHxTxK = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=True)
    return self.c_proj(y_BxHxTxK.transpose(1, 2).contiguous().view(b, t, d))


class MLP(nn.Module):
  """Linear to 4d, exact GELU, Linear back to d."""

  def __init__(self, d_model: int, bias: bool):
    super().__init__()
    self.c_fc = nn.Linear(d_model, 4 * d_model, bias=bias)
    self.gelu = nn.GELU()
    self.c_proj = nn.Linear(4 * d_model, d_model, bias=bias)

  def forward(self, x):
    return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
  """Pre-LayerNorm residual block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

  def __init__(self, d_model: int, heads: int, bias: bool):
    super().__init__()
    self.ln_1 = nn.LayerNorm(d_model, bias=bias)
    self.attn = CausalSelfAttention(d_model, heads, bias)
    self.ln_2 = nn.LayerNorm(d_model, bias=bias)
    self.mlp = MLP(d_model, bias)

  def forward(self, x):
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
  """nanoGPT's decoder: tokens_BxT -> logits_BxTxV, with the output head tied to `wte`."""

  def __init__(self, layers: int, d_model: int, heads: int, context: int, vocab: int,
               bias: bool = False):
    super().__init__()
    self.context = context
    self.wte = nn.Embedding(vocab, d_model)
    self.wpe = nn.Embedding(context, d_model)
    self.h = nn.ModuleList(Block(d_model, heads, bias) for _ in range(layers))
    self.ln_f = nn.LayerNorm(d_model, bias=bias)
    self.lm_head = nn.Linear(d_model, vocab, bias=False)
    self.lm_head.weight = self.wte.weight  # Tied: one [V, d] parameter.
    self.apply(self._init_weights)
    residual_std = 0.02 / math.sqrt(2 * layers)
    for name, p in self.named_parameters():
      if name.endswith("c_proj.weight"):
        nn.init.normal_(p, mean=0.0, std=residual_std)

  @staticmethod
  def _init_weights(module):
    if isinstance(module, (nn.Linear, nn.Embedding)):
      nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
      nn.init.zeros_(module.bias)

  def forward(self, tokens_BxT):
    t = tokens_BxT.shape[1]
    if t > self.context:
      raise ValueError(f"sequence length {t} exceeds the context {self.context}")
    positions = torch.arange(t, dtype=torch.long, device=tokens_BxT.device)
    x = self.wte(tokens_BxT) + self.wpe(positions)
    for block in self.h:
      x = block(x)
    return self.lm_head(self.ln_f(x))


def loss_fn(model: GPT, inputs_BxT, targets_BxT):
  """Mean next-token cross-entropy over all B x T positions."""
  logits_BxTxV = model(inputs_BxT)
  return F.cross_entropy(logits_BxTxV.view(-1, logits_BxTxV.shape[-1]), targets_BxT.view(-1))


def make_optimizer(model: GPT, learning_rate: float = LEARNING_RATE,
                   weight_decay: float = WEIGHT_DECAY) -> torch.optim.AdamW:
  """AdamW with weight decay on tensors of dim >= 2 (matrices, embeddings) and none on the rest."""
  params = [p for p in model.parameters() if p.requires_grad]  # The tied weight appears once.
  groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
  return torch.optim.AdamW(groups, lr=learning_rate, betas=BETAS, eps=EPS)


def learning_rate(step: int) -> float:
  """Linear warmup from 0 to LEARNING_RATE, cosine decay to MIN_LEARNING_RATE at DECAY_STEPS.

  The same function of the step count as `optax.warmup_cosine_decay_schedule`, which the JAX
  benchmark's optimizer (`llm_math.optimizer.learning_rate_schedule`) uses.
  """
  if step < WARMUP_STEPS:
    return LEARNING_RATE * step / WARMUP_STEPS
  progress = min(step - WARMUP_STEPS, DECAY_STEPS - WARMUP_STEPS) / (DECAY_STEPS - WARMUP_STEPS)
  return MIN_LEARNING_RATE + 0.5 * (LEARNING_RATE - MIN_LEARNING_RATE) * (
      1 + math.cos(math.pi * progress))


def train_step(model: GPT, optimizer: torch.optim.AdamW, inputs_BxT, targets_BxT, lr: float,
               grad_clip: float = GRAD_CLIP):
  """One nanoGPT training step; returns the loss as a 0-d tensor (not synchronized to a float)."""
  for group in optimizer.param_groups:
    group["lr"] = lr
  loss = loss_fn(model, inputs_BxT, targets_BxT)
  loss.backward()
  if grad_clip:
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
  optimizer.step()
  optimizer.zero_grad(set_to_none=True)
  return loss.detach()


def count_params(model: GPT) -> int:
  """Scalars in the model's parameters, the tied embedding counted once."""
  return sum(p.numel() for p in model.parameters())


def flops_per_token(model: GPT, n_params: int, seq_len: int) -> float:
  """6N + 12LTd, N without the position embedding (a gather), as `llm_math.flops` counts it."""
  n = n_params - model.wpe.weight.numel()
  return 6.0 * n + 12 * len(model.h) * seq_len * model.wte.weight.shape[1]


def random_batch(shape, seed: int):
  """(inputs, targets) int64 tensors from the same token draw as benchmarks/throughput.py."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, shape.vocab, (shape.batch, shape.context + 1)).astype(np.int32)
  tokens = torch.from_numpy(tokens.astype(np.int64))
  return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def main(argv):
  del argv
  if FLAGS.steps < 1 or FLAGS.warmup < 0 or FLAGS.threads < 0:
    raise app.UsageError("--steps must be positive, --warmup and --threads non-negative")
  torch.set_num_threads(FLAGS.threads or os.cpu_count())
  torch.manual_seed(FLAGS.seed)
  shape = SHAPES[FLAGS.shape]
  model = GPT(shape.layers, shape.d_model, shape.heads, shape.context, shape.vocab, bias=False)
  model.train()
  optimizer = make_optimizer(model)
  x, y = random_batch(shape, FLAGS.seed)

  step = 0
  warmup_start = time.perf_counter()
  for _ in range(FLAGS.warmup):
    train_step(model, optimizer, x, y, learning_rate(step))
    step += 1
  warmup = time.perf_counter() - warmup_start
  start = time.perf_counter()
  for _ in range(FLAGS.steps):
    loss = train_step(model, optimizer, x, y, learning_rate(step))
    step += 1
  final_loss = float(loss)  # CPU ops run eagerly: nothing left in flight.
  seconds = (time.perf_counter() - start) / FLAGS.steps

  n_params = count_params(model)
  fpt = flops_per_token(model, n_params, shape.context)
  tokens_per_s = shape.batch * shape.context / seconds
  memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(f"shape {FLAGS.shape}: {shape.layers} layers, d {shape.d_model}, {shape.heads} heads, "
        f"context {shape.context}, batch {shape.batch}, vocab {shape.vocab}, float32, "
        f"nanoGPT model and step (eager, tied embeddings, no bias, dropout 0)")
  print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
  print(f"cpu: {cpu_info.describe()}")
  print(f"params {n_params:,}; FLOPs/token {fpt:.4g} (6N + 12LTd)")
  print(f"warm-up ({FLAGS.warmup} steps) {warmup:.1f} s")
  print(f"step time {seconds * 1e3:.2f} ms | {tokens_per_s:,.0f} tokens/s | "
        f"{tokens_per_s * fpt / 1e12:.3f} model TFLOP/s | MFU n/a (no peak for CPU) | "
        f"{memory / 2**20:,.0f} MiB host peak resident set | final loss {final_loss:.3f}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
