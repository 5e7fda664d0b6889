"""The PyTorch nanoGPT reference: its step trains; its model has our JAX model's parameter count.

Skipped without torch (an optional extra: pip install -e ".[torch]"). benchmarks.pytorch_reference
defines its absl flags only when run as a script, so importing it here is safe next to the
experiments' flags of the same names.
"""
import math

import jax
import pytest

from benchmarks.shapes import Shape
from experiments.configs import perplexity as default_config
from llm_math import flops as flops_lib
from llm_math import model as model_lib
from llm_math import train_config

torch = pytest.importorskip("torch")
from benchmarks import pytorch_reference as ref  # noqa: E402  (needs torch)

TINY = Shape(layers=2, d_model=32, heads=4, context=16, batch=4, vocab=65)


def jax_param_count(shape: Shape, bias: bool) -> int:
  """Our Transformer's parameter count at `shape`, configured as benchmarks/throughput.py does it
  (tied embeddings), with nanoGPT's learned positions."""
  c = default_config.get_config()
  c.model.update(num_layers=shape.layers, d_model=shape.d_model, num_heads=shape.heads,
                 d_ff=4 * shape.d_model, tie_embeddings=True, use_bias=bias, pos_encoding="learned")
  c.seq_len, c.batch_size = shape.context, shape.batch
  model = model_lib.Transformer(train_config.model_config(c, shape.vocab))
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, shape.context), jax.numpy.int32))
  return flops_lib.count_params(abstract["params"])


@pytest.mark.parametrize("bias", [False, True])
def test_param_count_matches_jax_model(bias):
  torch.manual_seed(0)
  model = ref.GPT(TINY.layers, TINY.d_model, TINY.heads, TINY.context, TINY.vocab, bias=bias)
  assert ref.count_params(model) == jax_param_count(TINY, bias)


def test_nanogpt_cpu_param_count():
  shape = ref.SHAPES["nanogpt_cpu"]
  model = ref.GPT(shape.layers, shape.d_model, shape.heads, shape.context, shape.vocab)
  # 12 L d^2 in the blocks, (2L + 1) LayerNorm scales, tied V x d embedding, T x d positions.
  d, n_layers = shape.d_model, shape.layers
  expected = 12 * n_layers * d * d + (2 * n_layers + 1) * d + shape.vocab * d + shape.context * d
  assert ref.count_params(model) == expected == jax_param_count(shape, bias=False)


def test_init_and_weight_decay_groups():
  torch.manual_seed(0)
  model = ref.GPT(4, 64, 4, 16, 65)
  assert model.lm_head.weight is model.wte.weight
  residual = 0.02 / math.sqrt(2 * 4)
  assert abs(model.h[0].mlp.c_proj.weight.std().item() - residual) < 0.15 * residual
  assert abs(model.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.1 * 0.02
  decayed, plain = ref.make_optimizer(model).param_groups
  assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
  assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
  assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_learning_rate_schedule():
  assert ref.learning_rate(0) == 0.0
  assert ref.learning_rate(ref.WARMUP_STEPS) == pytest.approx(ref.LEARNING_RATE)
  assert ref.learning_rate(ref.DECAY_STEPS) == pytest.approx(ref.MIN_LEARNING_RATE)
  assert ref.learning_rate(10 * ref.DECAY_STEPS) == pytest.approx(ref.MIN_LEARNING_RATE)


def test_train_step_lowers_loss_from_uniform():
  torch.manual_seed(0)
  model = ref.GPT(TINY.layers, TINY.d_model, TINY.heads, TINY.context, TINY.vocab)
  optimizer = ref.make_optimizer(model)
  x, y = ref.random_batch(TINY, seed=0)
  losses = [float(ref.train_step(model, optimizer, x, y, lr=1e-2)) for _ in range(3)]
  assert losses[0] == pytest.approx(math.log(TINY.vocab), abs=0.1)
  assert losses[0] > losses[1] > losses[2]
  assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none=True)
