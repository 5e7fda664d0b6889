"""Training and evaluation of the Transformer LM: one jitted, sharded train step and a resumable loop.

    config (ml_collections) -> ModelConfig + optimizer -> sharded TrainState -> train_step, repeated

The loop resumes from the latest checkpoint in `workdir`, writes metrics as JSON lines
(`metrics.jsonl`: step, loss, ppl, lr, grad_norm, tokens_per_s; eval records carry val_nll), saves on
SIGINT/SIGTERM and stops with a clear message when the loss becomes NaN or infinite (never saving the
bad state, so the last good checkpoint stays).
"""

import dataclasses
import functools
import json
import math
import os
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from llm_math import checkpoint
from llm_math import data as data_lib
from llm_math import flops as flops_lib
from llm_math import model as model_lib
from llm_math import sharding
from llm_math import tokenizers
from llm_math import xla_cpu
from llm_math.errors import UsageError

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


_norm = optax.tree.norm if hasattr(optax, "tree") and hasattr(optax.tree, "norm") else optax.global_norm


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or infinite."""


def model_config(config, vocab_size: int) -> model_lib.ModelConfig:
  """The frozen model config from the experiment config's `model` block."""
  m = dict(config.model)
  for key in ("dtype", "param_dtype"):
    if m.get(key, "float32") not in _DTYPES:
      raise UsageError(f"--config.model.{key}={m[key]!r}: expected one of {', '.join(_DTYPES)}")
    m[key] = _DTYPES[m.get(key, "float32")]
  try:
    return model_lib.ModelConfig(vocab_size=vocab_size, max_len=config.seq_len, **m)
  except (TypeError, ValueError) as e:
    raise UsageError(f"--config.model: {e}") from None


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine decay to `min_learning_rate` at `num_steps`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=max(config.num_steps, config.warmup_steps + 1), end_value=config.min_learning_rate)


def optimizer(config) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with weight decay on matrices only (ndim >= 2)."""
  decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(config.grad_clip) if config.grad_clip else optax.identity(),
      optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                  weight_decay=config.weight_decay, mask=decay_mask))


def create_train_state(model: nn.Module, tx, mesh, rules, seq_len: int, rng):
  """Initializes the state directly in its sharded layout; returns (state, state_sharding).

  jax.eval_shape gives the abstract state with logical axis names, the rules turn them into mesh
  shardings, and jit(init, out_shardings=...) materializes every array where it belongs.
  """
  def init(rng):
    variables = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))
    state = train_state.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)
    return state

  abstract = jax.eval_shape(init, rng)
  state_sharding = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
  state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=state_sharding)(rng)
  return state, state_sharding


def check_loss_chunk(loss_chunk: int, seq_len: int, flag: str = "--config.loss_chunk"):
  """A one-line UsageError unless loss_chunk is 0 (off) or a positive divisor of seq_len."""
  if loss_chunk < 0 or (loss_chunk and seq_len % loss_chunk):
    raise UsageError(f"{flag}={loss_chunk}: expected 0 (off) or a divisor of seq_len={seq_len}")


def train_step(state, inputs_BxT, targets_BxT, rng, grad_accum_steps: int = 1, loss_chunk: int = 0):
  """One AdamW step on the mean next-token cross-entropy; returns (new_state, metrics).

  With grad_accum_steps = M > 1 the batch is split into M micro-batches whose gradients are averaged
  (a lax.scan, so memory holds one micro-batch's activations): the same update as one big batch.
  With loss_chunk = C > 0 the output projection and loss run C positions at a time
  (`model.chunked_cross_entropy`), never holding the [B, T, V] logits: the same loss and gradients.
  """
  step_rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params, x_BxT, y_BxT, dropout_rng):
    out = state.apply_fn({"params": params}, x_BxT, deterministic=False,
                         rngs={"dropout": dropout_rng}, return_hidden=bool(loss_chunk))
    if loss_chunk:
      nll_sum, count = model_lib.chunked_cross_entropy(
          out, model_lib.output_kernel(params), y_BxT, loss_chunk)
    else:
      nll_sum, count = model_lib.cross_entropy(out, y_BxT)
    return nll_sum / count

  if grad_accum_steps == 1:
    loss, grads = jax.value_and_grad(loss_fn)(state.params, inputs_BxT, targets_BxT, step_rng)
  else:
    b, t = inputs_BxT.shape
    # Row r of micro-batch m is row r * M + m: each device keeps its own rows (no resharding).
    split = lambda a: jnp.moveaxis(a.reshape(b // grad_accum_steps, grad_accum_steps, t), 1, 0)

    def accumulate(carry, micro):
      x_BxT, y_BxT, m = micro
      loss, grads = jax.value_and_grad(loss_fn)(state.params, x_BxT, y_BxT,
                                                jax.random.fold_in(step_rng, m))
      return jax.tree_util.tree_map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, state.params))
    (loss, grads), _ = jax.lax.scan(
        accumulate, zeros, (split(inputs_BxT), split(targets_BxT), jnp.arange(grad_accum_steps)))
    loss, grads = jax.tree_util.tree_map(lambda x: x / grad_accum_steps, (loss, grads))
  new_state = state.apply_gradients(grads=grads)
  metrics = {
      "loss": loss,
      "grad_norm": _norm(grads),
      "param_norm": _norm(new_state.params),
      "update_norm": _norm(
          jax.tree_util.tree_map(jnp.subtract, new_state.params, state.params)),
  }
  return new_state, metrics


def eval_step(apply_fn, params, inputs_BxT, targets_BxT, weights_BxT):
  """(sum of NLL over scored targets, number of scored targets) for one batch of windows."""
  logits = apply_fn({"params": params}, inputs_BxT, deterministic=True)
  return model_lib.cross_entropy(logits, targets_BxT, weights_BxT)


@dataclasses.dataclass
class Evaluator:
  """Scores fixed validation windows; `__call__(params)` -> mean NLL in nats per scored token."""
  windows: data_lib.EvalWindows
  apply_fn: object
  batch_size: int
  mesh: object
  rules: tuple

  def __post_init__(self):
    dp = sharding.data_parallel_size(self.mesh, self.rules)
    self.batch_size = max(dp, self.batch_size // dp * dp)
    n = len(self.windows.inputs_NxT)
    pad = -n % self.batch_size
    padded = lambda x: np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    self._inputs = padded(self.windows.inputs_NxT)
    self._targets = padded(self.windows.targets_NxT)
    self._weights = padded(self.windows.weights_NxT)
    batch_sh = sharding.batch_sharding(self.mesh, self.rules)
    self._step = jax.jit(functools.partial(eval_step, self.apply_fn),
                         in_shardings=(None, batch_sh, batch_sh, batch_sh))

  def __call__(self, params) -> float:
    total, count = 0.0, 0.0
    batch_sh = sharding.batch_sharding(self.mesh, self.rules)
    for i in range(0, len(self._inputs), self.batch_size):
      rows = sharding.process_rows(self.batch_size, offset=i)
      nll, n = self._step(params, *(sharding.global_batch(x[rows], batch_sh)
                                    for x in (self._inputs, self._targets, self._weights)))
      total += float(nll)
      count += float(n)
    return total / count


@dataclasses.dataclass
class TrainResult:
  state: object
  final_step: int
  val_curve: list  # [(step, val_nll_nats)]
  params: int
  flops_per_token: float
  tokens_per_second: float
  interrupted: bool = False


def use_mesh(mesh):
  """Makes `mesh` the context mesh (for logical sharding constraints), on old and new JAX."""
  return jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else mesh


class _StopSignals:
  """Turns the first SIGINT/SIGTERM into a flag the loop checks between steps; a second one kills."""

  def __init__(self):
    self.received = None
    self._previous = {}

  def _handler(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      try:
        self._previous[sig] = signal.signal(sig, self._handler)
      except ValueError:  # Not the main thread: leave signals alone.
        pass
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class MetricsWriter:
  """Appends JSON lines to `workdir/metrics.jsonl` (process 0 only); drops records past a resume point."""

  def __init__(self, workdir: str, resume_step: int):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = jax.process_index() == 0
    if self.enabled and os.path.exists(self.path):
      with open(self.path, encoding="utf-8") as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
      with open(self.path, "w", encoding="utf-8") as f:
        f.writelines(kept)

  def write(self, record: dict):
    if self.enabled:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _check_finite(loss: float, step: int, last_saved: int | None):
  if not math.isfinite(loss):
    kept = (f"the last good checkpoint (step {last_saved}) is kept" if last_saved is not None
            else "no checkpoint had been saved yet")
    raise NonFiniteLossError(
        f"training loss is {loss} at step {step}; stopped without saving the bad state ({kept}). "
        "Lower --config.learning_rate, raise --config.warmup_steps or check the data.")


def validation_windows(config, dataset: data_lib.Dataset) -> data_lib.EvalWindows:
  """The validation windows every model and baseline of a run is scored on."""
  val_ids = dataset.val_ids[: (config.eval_max_tokens or None)]
  return data_lib.eval_windows(val_ids, config.seq_len, config.eval_stride or None)


def train(config, dataset: data_lib.Dataset, workdir: str, windows=None, log=print) -> TrainResult:
  """Trains (or resumes training of) the model described by `config` on `dataset`.

  `windows` (default: `validation_windows(config, dataset)`) are the validation windows evaluated
  every `config.eval_every` steps and at the end.
  """
  data_lib.check_fits(dataset, config.seq_len)
  mcfg = model_config(config, dataset.vocab_size)
  model = model_lib.Transformer(mcfg)
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.logical_axis_rules)
  dp = sharding.data_parallel_size(mesh, rules)
  accum = config.grad_accum_steps
  if config.batch_size % (dp * accum):
    raise UsageError(f"--config.batch_size={config.batch_size} is not divisible by the {dp} "
                     f"data-parallel devices of mesh {dict(mesh.shape)} times "
                     f"grad_accum_steps={accum}")

  loss_chunk = config.get("loss_chunk", 0)
  check_loss_chunk(loss_chunk, config.seq_len)

  tx = optimizer(config)
  schedule = learning_rate_schedule(config)
  rng = jax.random.PRNGKey(config.seed)
  init_rng, dropout_rng = jax.random.split(rng)
  state, state_sharding = create_train_state(model, tx, mesh, rules, config.seq_len, init_rng)
  n_params = flops_lib.count_params(state.params)
  fpt = flops_lib.flops_per_token(mcfg, n_params, config.seq_len)

  mngr = checkpoint.manager(workdir, config.keep_checkpoints)
  start_step = mngr.latest_step()
  if start_step is not None:
    abstract = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sharding)
    state = checkpoint.restore(mngr, start_step, abstract)
    log(f"resumed from the checkpoint at step {start_step} in {workdir}")
  start_step = start_step or 0
  last_saved = start_step if start_step else None

  batch_sh = sharding.batch_sharding(mesh, rules)
  step_fn = jax.jit(functools.partial(train_step, grad_accum_steps=accum, loss_chunk=loss_chunk),
                    in_shardings=(state_sharding, batch_sh, batch_sh, None),
                    out_shardings=(state_sharding, None), donate_argnums=0)
  rows = sharding.process_rows(config.batch_size)
  batches = data_lib.prefetch(
      lambda step: tuple(sharding.global_batch(x, batch_sh) for x in data_lib.train_batch(
          dataset.train_ids, config.seq_len, config.batch_size, config.seed, step, rows)),
      start_step, config.num_steps)
  evaluator = Evaluator(windows or validation_windows(config, dataset), model.apply,
                        config.eval_batch_size, mesh, rules)
  writer = MetricsWriter(workdir, start_step)
  val_curve = []
  if os.path.exists(writer.path):
    with open(writer.path, encoding="utf-8") as f:
      val_curve = [(r["step"], r["val_nll"]) for r in map(json.loads, f) if "val_nll" in r]

  def run_eval(step):
    nll = evaluator(state.params)
    val_curve.append((step, nll))
    writer.write({"step": step, "val_nll": nll, "val_ppl": math.exp(nll)})
    log(f"step {step:6d} | val nll {nll:.4f} nats | val ppl {math.exp(nll):.3f}")

  if start_step == 0:
    run_eval(0)
  tokens_per_step = config.batch_size * config.seq_len
  await_each_step = xla_cpu.await_each_step()
  window_start, window_steps, tokens_per_second = time.perf_counter(), 0, float("nan")
  interrupted = None
  with _StopSignals() as stop, use_mesh(mesh):
    for step in range(start_step, config.num_steps):
      if stop.received:
        interrupted = stop.received
        break
      inputs, targets = next(batches)
      state, metrics = step_fn(state, inputs, targets, dropout_rng)
      if await_each_step:
        jax.block_until_ready(metrics["loss"])
      window_steps += 1
      done = step + 1
      if done % config.log_every == 0 or done == config.num_steps:
        metrics = jax.device_get(metrics)
        _check_finite(float(metrics["loss"]), done, last_saved)
        elapsed = time.perf_counter() - window_start
        tokens_per_second = window_steps * tokens_per_step / elapsed
        window_start, window_steps = time.perf_counter(), 0
        record = {"step": done, "loss": float(metrics["loss"]),
                  "ppl": math.exp(min(float(metrics["loss"]), 700.0)),
                  "lr": float(schedule(step)), "grad_norm": float(metrics["grad_norm"]),
                  "param_norm": float(metrics["param_norm"]),
                  "update_norm": float(metrics["update_norm"]), "tokens_per_s": tokens_per_second}
        writer.write(record)
        log(f"step {done:6d} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"grad norm {record['grad_norm']:.3f} | {tokens_per_second:,.0f} tokens/s")
      if done % config.eval_every == 0 or done == config.num_steps:
        run_eval(done)
      if done % config.checkpoint_every == 0 or done == config.num_steps:
        _check_finite(float(jax.device_get(metrics["loss"])), done, last_saved)
        checkpoint.save(mngr, done, state)
        last_saved = done
    if interrupted:
      current = int(jax.device_get(state.step))
      if current != last_saved and current > start_step:
        _check_finite(float(jax.device_get(metrics["loss"])), current, last_saved)
        checkpoint.save(mngr, current, state)
        last_saved = current
      log(f"received {interrupted} at step {current}: checkpoint saved; rerun the same command to resume")
  mngr.wait_until_finished()
  mngr.close()
  return TrainResult(state=state, final_step=int(jax.device_get(state.step)), val_curve=val_curve,
                     params=n_params, flops_per_token=fpt, tokens_per_second=tokens_per_second,
                     interrupted=bool(interrupted))


@dataclasses.dataclass
class TrainedModel:
  """A finished (or checkpointed) run: its config, model, parameters and tokenizer."""
  config: object  # ml_collections.ConfigDict
  model_config: model_lib.ModelConfig
  params: dict
  tokenizer: object
  step: int

  @property
  def model(self) -> model_lib.Transformer:
    return model_lib.Transformer(self.model_config)


def load_trained(workdir: str, step: int | None = None) -> TrainedModel:
  """Loads the config, tokenizer and checkpointed parameters that a training run left in `workdir`."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UsageError(f"--workdir={workdir}: no config.json (not a training run's workdir)")
  with open(path, encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  params, step = checkpoint.load_params(workdir, step)
  vocab_size = params["token_embed"]["embedding"].shape[0]
  if config.data == "synthetic":
    tokenizer = data_lib.SyntheticTokenizer(vocab_size)
  else:
    tokenizer = tokenizers.load(workdir)
  return TrainedModel(config, model_config(config, vocab_size), params, tokenizer, step)
