"""Training and evaluation of the Transformer LM: one jitted, sharded train step and a resumable loop.

    config (ml_collections) -> ModelConfig + optimizer -> sharded TrainState -> train_step, repeated

The loop resumes from the newest intact checkpoint in `workdir` (a damaged one is moved aside, see
`llm_math.checkpoint`), writes metrics as JSON lines (`metrics.jsonl`: step, loss, ppl, lr, norms,
tokens_per_s, elapsed_s; eval records carry val_nll) and as TensorBoard scalars next to them, saves on
SIGINT/SIGTERM, and stops with a clear message when the training or validation loss diverges: NaN,
infinite, or above `max_loss_factor` x ln|V| (never saving the diverged state, so the last good
checkpoint stays).
"""

import dataclasses
import functools
import math
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from llm_math import checkpoint
from llm_math import data as data_lib
from llm_math import files
from llm_math import flops as flops_lib
from llm_math import information
from llm_math import model as model_lib
from llm_math import sharding
from llm_math import summaries
from llm_math import tokenizers
from llm_math import xla_cpu
from llm_math.errors import UsageError

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


_norm = optax.tree.norm if hasattr(optax, "tree") and hasattr(optax.tree, "norm") else optax.global_norm


class DivergenceError(RuntimeError):
  """The training or validation loss became NaN, infinite, or larger than the divergence bound."""


def _frozen(value):
  """Lists (as read back from config.json) to tuples, all the way down: a hashable value."""
  return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def model_config(config, vocab_size: int) -> model_lib.ModelConfig:
  """The frozen model config from the experiment config's `model` block."""
  m = dict(config.model)
  for key in ("dtype", "param_dtype"):
    if m.get(key, "float32") not in _DTYPES:
      raise UsageError(f"--config.model.{key}={m[key]!r}: expected one of {', '.join(_DTYPES)}")
    m[key] = _DTYPES[m.get(key, "float32")]
  try:
    return model_lib.ModelConfig(
        vocab_size=vocab_size, max_len=config.seq_len,
        logical_axis_rules=_frozen(config.get("logical_axis_rules", ())), **m)
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


def check_config(config):
  """Checks the training fields of `config` before any work starts.

  Each failure is a one-line UsageError naming the `--config.` field and what was expected. Fields a
  config does not have (a study's own config) are skipped.
  """
  def need(ok: bool, field: str, expected: str):
    if not ok:
      raise UsageError(f"--config.{field}={config.get(field)!r}: expected {expected}")

  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
  is_num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
  for field in ("seq_len", "batch_size", "num_steps", "grad_accum_steps", "eval_every", "log_every",
                "checkpoint_every", "keep_checkpoints", "eval_batch_size"):
    if field in config:
      need(is_int(config[field]) and config[field] > 0, field, "a positive integer")
  if "learning_rate" in config:
    need(is_num(config.learning_rate) and config.learning_rate > 0, "learning_rate",
         "a positive number")
  if "min_learning_rate" in config:
    need(is_num(config.min_learning_rate) and 0 <= config.min_learning_rate <= config.learning_rate,
         "min_learning_rate", f"a number in [0, learning_rate={config.learning_rate}]")
  if "warmup_steps" in config:
    need(is_int(config.warmup_steps) and 0 <= config.warmup_steps <= config.num_steps,
         "warmup_steps", f"an integer in [0, num_steps={config.num_steps}]")
  for field in ("b1", "b2"):
    if field in config:
      need(is_num(config[field]) and 0 <= config[field] < 1, field, "a number in [0, 1)")
  for field, lowest, note in (("eps", "positive", ""), ("weight_decay", "non-negative", ""),
                              ("grad_clip", "non-negative", " (0 = off)"),
                              ("max_loss_factor", "non-negative", " (0 = only NaN/inf stop a run)")):
    if field in config:
      ok = config[field] > 0 if lowest == "positive" else config[field] >= 0
      need(is_num(config[field]) and ok, field, f"a {lowest} number{note}")
  if "eval_stride" in config:
    need(is_int(config.eval_stride) and 0 <= config.eval_stride <= config.seq_len, "eval_stride",
         f"an integer in [0, seq_len={config.seq_len}] (0 = seq_len)")
  if "eval_max_tokens" in config:
    need(is_int(config.eval_max_tokens) and config.eval_max_tokens >= 0, "eval_max_tokens",
         "a non-negative integer (0 = all)")
  if "eval_sample_every" in config:
    need(is_int(config.eval_sample_every) and config.eval_sample_every >= 1
         and (config.eval_sample_every == 1 or config.get("eval_stride", 0) in (0, config.seq_len)),
         "eval_sample_every", "an integer >= 1, and 1 unless eval_stride is 0 (independent windows)")
  check_loss_chunk(config.get("loss_chunk", 0), config.seq_len)
  model_config(config, vocab_size=2)  # The model block's own checks (sizes, names, dtypes).
  if "batch_size" in config:
    mesh = sharding.make_mesh(config.mesh)
    dp = sharding.data_parallel_size(mesh, tuple(tuple(r) for r in config.logical_axis_rules))
    accum = config.get("grad_accum_steps", 1)
    if config.batch_size % (dp * accum):
      raise UsageError(f"--config.batch_size={config.batch_size} is not divisible by the {dp} "
                       f"data-parallel devices of mesh {dict(mesh.shape)} times "
                       f"grad_accum_steps={accum}")


def divergence_bound(config, vocab_size: int) -> float:
  """The loss above which a run counts as diverged: max_loss_factor x ln|V| (inf when the factor is 0).

  ln|V| is the loss of the uniform distribution, where every run starts; a loss several times that
  means the model is confidently wrong, and no optimizer brings it back within a useful time.
  """
  factor = config.get("max_loss_factor", 0.0)
  return factor * math.log(vocab_size) if factor else math.inf


def train_step(state, inputs_BxT, targets_BxT, rng, grad_accum_steps: int = 1, loss_chunk: int = 0):
  """One AdamW step on the mean next-token cross-entropy; returns (new_state, metrics).

  Run under `use_mesh(mesh)`, the activations the model constrains by logical name (the residual
  stream, ('batch', 'length', 'embed')) are laid out by the model config's logical_axis_rules.

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
    batch_sh = sharding.batch_sharding(self.mesh, self.rules)
    self._step = jax.jit(functools.partial(eval_step, self.apply_fn),
                         in_shardings=(None, batch_sh, batch_sh, batch_sh))

  def __call__(self, params) -> float:
    """Reads each batch's windows (this process's rows only) from the stream as it goes."""
    total, count = 0.0, 0.0
    batch_sh = sharding.batch_sharding(self.mesh, self.rules)
    for i in range(0, len(self.windows), self.batch_size):
      rows = sharding.process_rows(self.batch_size, offset=i)
      with use_mesh(self.mesh):
        nll, n = self._step(params, *(sharding.global_batch(x, batch_sh)
                                      for x in self.windows.batch(rows.start, rows.stop)))
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
  train_time_s: float = float("nan")  # Wall time of the training loop, summed over resumed sessions.
  val_elapsed_s: list = dataclasses.field(default_factory=list)  # training time at each val_curve point


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
  """Writes metrics as JSON lines (`workdir/metrics.jsonl`) and TensorBoard scalars (event files in
  `workdir`), on process 0 only. JSON records past `resume_step` (a run resumed from an older
  checkpoint) are dropped; `records` are the kept ones."""

  def __init__(self, workdir, resume_step: int):
    self.path = files.path(workdir) / "metrics.jsonl"
    self.enabled = sharding.is_primary()
    self.records = [r for r in files.read_jsonl(self.path) if r["step"] <= resume_step]
    self._events = None
    if self.enabled:
      files.write_jsonl(self.path, self.records)
      self._events = summaries.ScalarWriter(files.path(workdir))

  def write(self, record: dict):
    self.records.append(record)
    if self.enabled:
      if files.is_local(self.path):
        files.append_jsonl(self.path, [record])
      else:  # An object store rewrites the object: from the records in memory, no read-back.
        files.write_jsonl(self.path, self.records)
      self._events.write(record["step"], {k: v for k, v in record.items()
                                          if k != "step" and isinstance(v, (int, float))})

  def close(self):
    if self._events:
      self._events.close()


def _check_loss(loss: float, step: int, bound: float, last_saved: int | None, what: str = "training"):
  """Raises DivergenceError when `loss` is NaN, infinite or above `bound`."""
  if math.isfinite(loss) and loss <= bound:
    return
  kept = (f"the last good checkpoint (step {last_saved}) is kept" if last_saved is not None
          else "no checkpoint had been saved yet")
  reason = "" if not math.isfinite(loss) else f", above the divergence bound {bound:.2f}"
  raise DivergenceError(
      f"{what} loss is {loss:.6g} at step {step}{reason}; stopped without saving the diverged state "
      f"({kept}). Lower --config.learning_rate, raise --config.warmup_steps or check the data.")


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def validation_windows(config, dataset: data_lib.Dataset) -> data_lib.EvalWindows:
  """The validation windows every model and baseline of a run is scored on."""
  val_ids = dataset.val_ids[: (config.eval_max_tokens or None)]
  return data_lib.eval_windows(val_ids, config.seq_len, config.eval_stride or None,
                               config.get("eval_sample_every") or 1)


def train(config, dataset: data_lib.Dataset, workdir, windows=None, log=print) -> TrainResult:
  """Trains (or resumes training of) the model described by `config` on `dataset`.

  `windows` (default: `validation_windows(config, dataset)`) are the validation windows evaluated
  every `config.eval_every` steps and at the end. `workdir` is a local path or a URL (gs://...).
  """
  check_config(config)
  data_lib.check_fits(dataset, config.seq_len)
  mcfg = model_config(config, dataset.vocab_size)
  model = model_lib.Transformer(mcfg)
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.logical_axis_rules)
  loss_chunk = config.get("loss_chunk", 0)
  bound = divergence_bound(config, dataset.vocab_size)

  tx = optimizer(config)
  schedule = learning_rate_schedule(config)
  rng = jax.random.PRNGKey(config.seed)
  init_rng, dropout_rng = jax.random.split(rng)
  state, state_sharding = create_train_state(model, tx, mesh, rules, config.seq_len, init_rng)
  n_params = flops_lib.count_params(state.params)
  fpt = flops_lib.flops_per_token(mcfg, n_params, config.seq_len)
  if mcfg.attention_impl == "fused":
    platform, capability = model_lib.default_platform()
    kernel = model_lib.fused_attention_implementation(platform, mcfg.dtype, mcfg.head_dim,
                                                      capability)
    log(f"attention: fused, implementation={kernel} ({platform}, "
        f"{jnp.dtype(mcfg.dtype).name}, head_dim {mcfg.head_dim})")

  mngr = checkpoint.manager(workdir, config.keep_checkpoints)
  abstract = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sharding)
  restored, start_step = checkpoint.restore_latest(mngr, abstract, log=log)
  if restored is not None:
    state = restored
    log(f"resumed from the checkpoint at step {start_step} in {workdir}")
  start_step = start_step or 0
  last_saved = start_step if start_step else None

  batch_sh = sharding.batch_sharding(mesh, rules)
  step_fn = jax.jit(functools.partial(train_step, grad_accum_steps=config.grad_accum_steps,
                                      loss_chunk=loss_chunk),
                    in_shardings=(state_sharding, batch_sh, batch_sh, None),
                    out_shardings=(state_sharding, None), donate_argnums=0)
  rows = sharding.process_rows(config.batch_size)
  if jax.process_count() > 1:  # Every process says which rows it reads (one line each).
    print(f"process {jax.process_index()} of {jax.process_count()} reads rows {rows.start}:"
          f"{rows.stop} of each global batch of {config.batch_size}", flush=True)
  batches = data_lib.prefetch(
      lambda step: tuple(sharding.global_batch(x, batch_sh) for x in data_lib.train_batch(
          dataset.train_ids, config.seq_len, config.batch_size, config.seed, step, rows)),
      start_step, config.num_steps)
  evaluator = Evaluator(windows or validation_windows(config, dataset), model.apply,
                        config.eval_batch_size, mesh, rules)
  writer = MetricsWriter(workdir, start_step)
  val_curve = [(r["step"], r["val_nll"]) for r in writer.records if "val_nll" in r]
  val_elapsed = [r.get("elapsed_s", math.nan) for r in writer.records if "val_nll" in r]
  timed = [r for r in writer.records if "elapsed_s" in r]
  elapsed_before = timed[-1]["elapsed_s"] if timed else 0.0  # Earlier sessions of this run.
  tokens_per_second = next((r["tokens_per_s"] for r in reversed(writer.records)
                            if "tokens_per_s" in r), None)

  def run_eval(step):
    nll = evaluator(state.params)
    _check_loss(nll, step, bound, last_saved, what="validation")
    val_curve.append((step, nll))
    val_elapsed.append(elapsed())
    writer.write({"step": step, "val_nll": nll, "val_ppl": information.perplexity(nll),
                  "elapsed_s": val_elapsed[-1]})
    log(f"step {step:6d} | val nll {nll:.4f} nats | val ppl {information.perplexity(nll):.3f}")

  tokens_per_step = config.batch_size * config.seq_len
  await_each_step = xla_cpu.await_each_step()
  interrupted = None
  session_start = time.perf_counter()
  elapsed = lambda: elapsed_before + time.perf_counter() - session_start
  try:
    if start_step == 0:
      run_eval(0)
    window_start, window_steps = time.perf_counter(), 0
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
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          _check_loss(metrics["loss"], done, bound, last_saved)
          seconds = time.perf_counter() - window_start
          tokens_per_second = window_steps * tokens_per_step / seconds
          eta = (config.num_steps - done) * seconds / window_steps
          window_start, window_steps = time.perf_counter(), 0
          record = {"step": done, "loss": metrics["loss"],
                    "ppl": information.perplexity(metrics["loss"]), "lr": float(schedule(step)),
                    "grad_norm": metrics["grad_norm"], "param_norm": metrics["param_norm"],
                    "update_norm": metrics["update_norm"], "tokens_per_s": tokens_per_second,
                    "elapsed_s": elapsed()}
          writer.write(record)
          log(f"step {done:6d} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
              f"grad norm {record['grad_norm']:.3f} | {tokens_per_second:,.0f} tokens/s | "
              f"{_duration(record['elapsed_s'])} elapsed, ETA {_duration(eta)}")
        if done % config.eval_every == 0 or done == config.num_steps:
          run_eval(done)
        if done % config.checkpoint_every == 0 or done == config.num_steps:
          _check_loss(float(jax.device_get(metrics["loss"])), done, bound, last_saved)
          checkpoint.save(mngr, done, state)
          last_saved = done
      if interrupted:
        current = int(jax.device_get(state.step))
        if current != last_saved and current > start_step:
          _check_loss(float(jax.device_get(metrics["loss"])), current, bound, last_saved)
          checkpoint.save(mngr, current, state)
          last_saved = current
        log(f"received {interrupted} at step {current}: checkpoint saved; "
            "rerun the same command to resume")
  finally:  # Also on a divergence stop: in-flight async saves complete before the error surfaces.
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  timed = [r for r in writer.records if "elapsed_s" in r]
  return TrainResult(state=state, final_step=int(jax.device_get(state.step)), val_curve=val_curve,
                     params=n_params, flops_per_token=fpt,
                     tokens_per_second=tokens_per_second if tokens_per_second else math.nan,
                     interrupted=bool(interrupted),
                     train_time_s=timed[-1]["elapsed_s"] if timed else math.nan,
                     val_elapsed_s=val_elapsed)


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
  path = files.path(workdir) / "config.json"
  if not path.exists():
    raise UsageError(f"--workdir={workdir}: no config.json (not a training run's workdir)")
  config = ml_collections.ConfigDict(files.read_json(path))
  params, step = checkpoint.load_params(workdir, step)
  vocab_size = params["token_embed"]["embedding"].shape[0]
  if config.data == "synthetic":
    tokenizer = data_lib.SyntheticTokenizer(vocab_size)
  else:
    tokenizer = tokenizers.load(workdir)
  return TrainedModel(config, model_config(config, vocab_size), params, tokenizer, step)
