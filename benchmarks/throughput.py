r"""Training throughput of the Transformer LM: tokens/s, step time, model TFLOP/s, MFU, peak memory.

  python -m benchmarks.throughput --shape=nanogpt_cpu
  python -m benchmarks.throughput --shape=gpt2_small --dtype=bfloat16 --attention_impl=fused
  python -m benchmarks.throughput --shape=nanogpt_cpu --layer_stats   # the step of a log step

MFU = (tokens/s x FLOPs per token) / (devices x peak FLOP/s), with FLOPs per token = 6N + 12 L T d
(`llm_math.flops`: N = parameters in matmuls, the output head counted once; attention's T x T scores
counted in full although a causal mask wastes half of them, as nanoGPT and PaLM count them). Peak
FLOP/s is dense bf16 from the table in llm_math/flops.py, keyed by device kind; none on CPU, so no MFU
there. Peak memory is the accelerator's peak bytes in use, or on CPU the process's peak resident size.
The timed steps run the same jitted, donated, sharded train step as training, on random tokens;
with --layer_stats, the step `fit` runs at log steps when config.layer_stats is on (per-layer
statistics: `llm_math.layer_stats`), whose time less the plain step's is their cost per log step.
"""

import resource
import time

from absl import app
from absl import flags
import jax
import numpy as np

from benchmarks import cpu_info
from benchmarks.shapes import SHAPES
from experiments.configs import perplexity as default_config
from llm_math import flops as flops_lib
from llm_math import layer_stats
from llm_math import model as model_lib
from llm_math import optimizer as optimizer_lib
from llm_math import sharding
from llm_math import train as train_lib
from llm_math import train_config
from llm_math import xla_cpu
from llm_math.errors import UsageError

SHAPE = flags.DEFINE_enum("shape", "nanogpt_cpu", list(SHAPES), "Named model/batch shape.")
BATCH = flags.DEFINE_integer("batch_size", None, "Override the shape's global batch.")
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
ATTENTION = flags.DEFINE_enum("attention_impl", "explicit", ["explicit", "fused"], "Attention.")
REMAT = flags.DEFINE_bool("remat", False, "Rematerialize blocks in the backward pass.")
ACCUM = flags.DEFINE_integer("grad_accum_steps", 1, "Micro-batches per step.")
LOSS_CHUNK = flags.DEFINE_integer("loss_chunk", 0, "Positions per piece of the chunked output "
                                  "projection + loss (0 = whole logits at once).")
STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (after 3 warm-up steps).")
MESH = flags.DEFINE_string("mesh", "data:-1", "Device mesh.")
LAYER_STATS = flags.DEFINE_bool("layer_stats", False, "Time the step that also computes the "
                                  "per-layer statistics (what fit runs at log steps).")
TUNING = flags.DEFINE_bool("xla_cpu_tuning", True, "Apply llm_math.xla_cpu's XLA:CPU settings "
                           "(where verified; see that module).")


def benchmark_config():
  layers, d, heads, t, batch, vocab = SHAPES[SHAPE.value]
  c = default_config.get_config()
  # GPT-2/nanoGPT's architecture: learned positions, tied embeddings, no biases.
  c.model.update(num_layers=layers, d_model=d, num_heads=heads, d_ff=4 * d, dtype=DTYPE.value,
                 attention_impl=ATTENTION.value, remat="full" if REMAT.value else "none",
                 tie_embeddings=True,
                 use_bias=False, pos_encoding="learned")
  c.seq_len, c.batch_size, c.mesh, c.grad_accum_steps = t, BATCH.value or batch, MESH.value, ACCUM.value
  return c, vocab


def peak_memory_bytes() -> tuple[int, str]:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak bytes in use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host peak resident set"


def main(argv):
  del argv
  config, vocab = benchmark_config()
  devices = xla_cpu.host_devices(lambda n: sharding.mesh_fits(
      config.mesh, config.batch_size, config.grad_accum_steps, n))
  started = xla_cpu.tune(devices, fusion_flag=TUNING.value)
  tuned = started and TUNING.value and xla_cpu.should_tune(devices=devices)
  try:
    train_config.check_loss_chunk(LOSS_CHUNK.value, config.seq_len, flag="--loss_chunk")
  except UsageError as e:
    raise app.UsageError(str(e)) from None
  mcfg = train_config.model_config(config, vocab)
  model = model_lib.Transformer(mcfg)
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.logical_axis_rules)
  state, state_sh = train_lib.create_state(
      train_lib.lm_init(model, config.seq_len), optimizer_lib.optimizer(config), mesh, rules,
      jax.random.PRNGKey(0))
  batch_sh = sharding.batch_sharding(mesh, rules)
  loss_fn = train_lib.lm_loss(model, LOSS_CHUNK.value)
  stats_fn = layer_stats.forward_stats(model, LOSS_CHUNK.value) if LAYER_STATS.value else None
  step = jax.jit(lambda s, x, y, r: train_lib.train_step(
                     s, (x, y), r, loss_fn=loss_fn, grad_accum_steps=config.grad_accum_steps,
                     stats_fn=stats_fn, layer_stats=LAYER_STATS.value),
                 in_shardings=(state_sh, batch_sh, batch_sh, None), out_shardings=(state_sh, None),
                 donate_argnums=0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (config.batch_size, config.seq_len + 1)).astype(np.int32)
  x = jax.device_put(tokens[:, :-1], batch_sh)
  y = jax.device_put(tokens[:, 1:], batch_sh)
  key = jax.random.PRNGKey(1)
  compile_start = time.perf_counter()
  for _ in range(3):
    state, metrics = step(state, x, y, key)
  jax.block_until_ready(metrics["loss"])
  warmup = time.perf_counter() - compile_start
  sync_each_step = xla_cpu.await_each_step()
  start = time.perf_counter()
  for _ in range(STEPS.value):
    state, metrics = step(state, x, y, key)
    if sync_each_step:
      jax.block_until_ready(metrics["loss"])
  jax.block_until_ready(metrics["loss"])
  seconds = (time.perf_counter() - start) / STEPS.value

  n_params = flops_lib.count_params(state.params)
  fpt = flops_lib.flops_per_token(mcfg, n_params, config.seq_len)
  tokens_per_s = config.batch_size * config.seq_len / seconds
  peak = flops_lib.peak_flops_per_device()
  mfu = flops_lib.mfu(tokens_per_s, fpt, jax.device_count(), peak)
  memory, memory_kind = peak_memory_bytes()
  print(f"shape {SHAPE.value}: {mcfg.num_layers} layers, d {mcfg.d_model}, {mcfg.num_heads} heads, "
        f"context {config.seq_len}, batch {config.batch_size}, vocab {vocab}, {DTYPE.value}, "
        f"attention {ATTENTION.value}, remat {REMAT.value}, grad_accum {ACCUM.value}, "
        f"loss_chunk {LOSS_CHUNK.value}" + (", with layer statistics" if LAYER_STATS.value else "")
        + (f", XLA:CPU {xla_cpu.FLAG}" if tuned else ""))
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; mesh {dict(mesh.shape)}")
  print(f"cpu: {cpu_info.describe()}")
  print(f"params {n_params:,}; FLOPs/token {fpt:.4g} (6N + 12LTd)")
  print(f"warm-up (compile + 3 steps) {warmup:.1f} s")
  print(f"step time {seconds * 1e3:.2f} ms | {tokens_per_s:,.0f} tokens/s | "
        f"{tokens_per_s * fpt / 1e12:.3f} model TFLOP/s | MFU "
        + (f"{mfu:.1%} of {peak / 1e12:.0f} TFLOP/s per device" if mfu else "n/a (no peak for CPU)")
        + f" | {memory / 2**20:,.0f} MiB {memory_kind} | final loss {float(metrics['loss']):.3f}")


if __name__ == "__main__":
  app.run(main)
