"""The frozen, validated configs a run is built from: `TrainConfig` (the loop, optimizer, schedule,
evaluation and checkpoints) and `model.ModelConfig`, each built once from the experiment's
ml_collections config (`train_config`, `model_config`).

Defaults live here and nowhere else: a field an experiment's config does not set takes the value
below. Every check is a one-line UsageError naming the `--config.` field and what was expected.
"""

import dataclasses
import math

import jax.numpy as jnp

from llm_math import model as model_lib
from llm_math import sharding
from llm_math.errors import UsageError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# 'cosine': linear warmup, cosine decay to min_learning_rate at num_steps. 'wsd': warmup, stable at
# learning_rate, then a linear decay to min_learning_rate over the last decay_fraction of num_steps.
SCHEDULES = ("cosine", "wsd")
# 'rolling': the newest keep_checkpoints states; 'log' also keeps log-spaced snapshots (`train.fit`).
CHECKPOINT_SCHEDULES = ("rolling", "log")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How a run trains. Steps count optimizer updates; batch_size is global (summed over devices and
  processes), split into grad_accum_steps micro-batches of the same update."""
  seed: int = 0
  seq_len: int = 128
  batch_size: int = 32
  num_steps: int = 1000
  grad_accum_steps: int = 1
  loss_chunk: int = 0  # Output projection + loss C positions at a time (0: all at once).
  # AdamW and its schedule (`llm_math.optimizer`).
  learning_rate: float = 1e-3
  min_learning_rate: float = 0.0
  warmup_steps: int = 0
  schedule: str = "cosine"
  decay_fraction: float = 0.2  # 'wsd': the share of num_steps spent decaying.
  b1: float = 0.9
  b2: float = 0.99
  eps: float = 1e-8
  weight_decay: float = 0.0
  grad_clip: float = 0.0  # Global-norm clipping (0: off).
  max_loss_factor: float = 0.0  # Diverged above this x ln|V| (0: only NaN/inf).
  # Evaluation: every eval_every steps, on windows of the validation split (`evaluation`).
  eval_every: int = 250
  eval_batch_size: int = 64
  eval_stride: int = 0  # 0: seq_len (independent windows).
  eval_max_tokens: int = 0  # 0: all.
  eval_sample_every: int = 1
  # Logging and checkpoints (`llm_math.checkpoint`).
  log_every: int = 100
  checkpoint_every: int = 0  # 0: only at the end.
  keep_checkpoints: int = 2
  checkpoint_schedule: str = "rolling"
  layer_stats: bool = False  # Per-layer statistics at log steps (`llm_math.layer_stats`).
  stop_check_every: int = 10  # Several processes agree on a stop signal every this many steps.
  # Devices.
  mesh: str = "data:-1"
  logical_axis_rules: tuple = sharding.DEFAULT_RULES

  @property
  def save_every(self) -> int:
    """Steps between checkpoints."""
    return self.checkpoint_every or max(self.num_steps, 1)

  def loss_bound(self, vocab_size: int) -> float:
    """The loss above which a run counts as diverged: max_loss_factor x ln|V| (inf when the factor
    is 0). ln|V| is the uniform distribution's loss, where every run starts; a loss several times
    that is confidently wrong, and no optimizer brings it back within a useful time."""
    return self.max_loss_factor * math.log(vocab_size) if self.max_loss_factor else math.inf


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def frozen(value):
  """Lists (as read back from config.json) to tuples, all the way down: a hashable value."""
  return tuple(frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def train_config(config) -> TrainConfig:
  """The validated TrainConfig of an experiment config (its fields of TrainConfig's names; the
  rest, such as data or model, are other configs' business). A TrainConfig is returned as is."""
  if isinstance(config, TrainConfig):
    return config
  values = {name: frozen(config[name]) for name in _FIELDS if name in config}
  tc = TrainConfig(**values)
  _check(tc, given=set(values))
  return tc


def _check(tc: TrainConfig, given: set):
  def need(ok: bool, field: str, expected: str):
    if not ok:
      raise UsageError(f"--config.{field}={getattr(tc, field)!r}: expected {expected}")

  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
  is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
  need(is_int(tc.num_steps) and tc.num_steps >= 0, "num_steps",
       "a non-negative integer (0: the initialization only)")
  for field in ("seq_len", "batch_size", "grad_accum_steps", "eval_every", "log_every",
                "keep_checkpoints", "eval_batch_size", "stop_check_every"):
    need(is_int(getattr(tc, field)) and getattr(tc, field) > 0, field, "a positive integer")
  need(is_int(tc.seed), "seed", "an integer")
  need(is_int(tc.checkpoint_every) and tc.checkpoint_every >= 0 and (
      tc.checkpoint_every > 0 or "checkpoint_every" not in given), "checkpoint_every",
       "a positive integer")
  need(is_num(tc.learning_rate) and tc.learning_rate > 0, "learning_rate", "a positive number")
  need(is_num(tc.min_learning_rate) and 0 <= tc.min_learning_rate <= tc.learning_rate,
       "min_learning_rate", f"a number in [0, learning_rate={tc.learning_rate}]")
  need(is_int(tc.warmup_steps) and 0 <= tc.warmup_steps <= tc.num_steps, "warmup_steps",
       f"an integer in [0, num_steps={tc.num_steps}]")
  need(tc.schedule in SCHEDULES, "schedule", f"one of {', '.join(SCHEDULES)}")
  need(is_num(tc.decay_fraction) and 0 < tc.decay_fraction <= 1, "decay_fraction",
       "a number in (0, 1]")
  if tc.schedule == "wsd":
    need(tc.warmup_steps + round(tc.decay_fraction * tc.num_steps) <= tc.num_steps,
         "decay_fraction", f"warmup_steps + decay_fraction x num_steps <= num_steps={tc.num_steps}")
  for field in ("b1", "b2"):
    need(is_num(getattr(tc, field)) and 0 <= getattr(tc, field) < 1, field, "a number in [0, 1)")
  for field, lowest, note in (("eps", "positive", ""), ("weight_decay", "non-negative", ""),
                              ("grad_clip", "non-negative", " (0 = off)"),
                              ("max_loss_factor", "non-negative", " (0 = only NaN/inf stop a run)")):
    value = getattr(tc, field)
    ok = is_num(value) and (value > 0 if lowest == "positive" else value >= 0)
    need(ok, field, f"a {lowest} number{note}")
  need(is_int(tc.eval_stride) and 0 <= tc.eval_stride <= tc.seq_len, "eval_stride",
       f"an integer in [0, seq_len={tc.seq_len}] (0 = seq_len)")
  need(is_int(tc.eval_max_tokens) and tc.eval_max_tokens >= 0, "eval_max_tokens",
       "a non-negative integer (0 = all)")
  need(is_int(tc.eval_sample_every) and tc.eval_sample_every >= 1
       and (tc.eval_sample_every == 1 or tc.eval_stride in (0, tc.seq_len)),
       "eval_sample_every", "an integer >= 1, and 1 unless eval_stride is 0 (independent windows)")
  need(tc.checkpoint_schedule in CHECKPOINT_SCHEDULES, "checkpoint_schedule",
       f"one of {', '.join(CHECKPOINT_SCHEDULES)}")
  need(isinstance(tc.layer_stats, bool), "layer_stats", "true or false")
  check_loss_chunk(tc.loss_chunk, tc.seq_len)


def check_loss_chunk(loss_chunk: int, seq_len: int, flag: str = "--config.loss_chunk"):
  """A one-line UsageError unless loss_chunk is 0 (off) or a positive divisor of seq_len."""
  if loss_chunk < 0 or (loss_chunk and seq_len % loss_chunk):
    raise UsageError(f"{flag}={loss_chunk}: expected 0 (off) or a divisor of seq_len={seq_len}")


def model_config(config, vocab_size: int) -> model_lib.ModelConfig:
  """The frozen model config from the experiment config's `model` block (max_len = seq_len, the
  logical axis rules of its TrainConfig)."""
  m = dict(config.model)
  for key in ("dtype", "param_dtype"):
    if m.get(key, "float32") not in DTYPES:
      raise UsageError(f"--config.model.{key}={m[key]!r}: expected one of {', '.join(DTYPES)}")
    m[key] = DTYPES[m.get(key, "float32")]
  tc = train_config(config)
  try:
    return model_lib.ModelConfig(vocab_size=vocab_size, max_len=tc.seq_len,
                                 logical_axis_rules=tc.logical_axis_rules, **m)
  except (TypeError, ValueError) as e:
    raise UsageError(f"--config.model: {e}") from None


def check_config(config, devices=None) -> TrainConfig:
  """Checks an experiment config before any work starts, for `devices` (default: this job's;
  `llm_math.aot` passes a topology's): its TrainConfig, its model block, and that the global batch
  splits over the mesh's data-parallel devices and the micro-batches. Returns the TrainConfig."""
  tc = train_config(config)
  if "model" in config:
    model_config(config, vocab_size=2)  # The model block's own checks (sizes, names, dtypes).
  if "batch_size" in config:
    mesh = sharding.make_mesh(tc.mesh, devices=devices)
    dp = sharding.data_parallel_size(mesh, tc.logical_axis_rules)
    if tc.batch_size % (dp * tc.grad_accum_steps):
      raise UsageError(f"--config.batch_size={tc.batch_size} is not divisible by the {dp} "
                       f"data-parallel devices of mesh {dict(mesh.shape)} times "
                       f"grad_accum_steps={tc.grad_accum_steps}")
  return tc
