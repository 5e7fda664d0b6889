"""Training and evaluation of the Transformer LM: one jitted, sharded train step and a resumable loop.

    config (ml_collections) -> TrainConfig + ModelConfig (`train_config`) -> optimizer
    (`optimizer`) -> sharded TrainState -> train_step, repeated; metrics to `metrics`

The loop resumes from the newest intact checkpoint in `workdir` (a damaged one is moved aside, see
`llm_math.checkpoint`), writes metrics as JSON lines (`metrics.jsonl`: step, loss, ppl, lr, norms,
tokens_per_s, elapsed_s, a loss's extra terms such as z_loss; eval records carry val_nll) and as
TensorBoard scalars next to them, saves on SIGINT/SIGTERM, and stops with a clear message when the
training or validation loss diverges: NaN, infinite, or above `max_loss_factor` x ln|V| (never
saving the diverged state, so the last good checkpoint stays).
"""

import concurrent.futures
import dataclasses
import functools
import math
import signal
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from llm_math import checkpoint
from llm_math import data as data_lib
from llm_math import evaluation
from llm_math import flops as flops_lib
from llm_math import layer_stats as layer_stats_lib
from llm_math import metrics as metrics_lib
from llm_math import model as model_lib
from llm_math import optimizer as optimizer_lib
from llm_math import sharding
from llm_math import train_config as train_config_lib
from llm_math import xla_cpu
from llm_math.analysis import information

_norm = optax.tree.norm if hasattr(optax, "tree") and hasattr(optax.tree, "norm") else optax.global_norm


class DivergenceError(RuntimeError):
  """The training or validation loss became NaN, infinite, or larger than the divergence bound."""


@dataclasses.dataclass(frozen=True)
class Task:
  """What one run trains; the loop (`fit`) supplies everything else.

  init(rng) -> params: flax params, boxed with logical axis names (`nn.Partitioned`, what
      `model.init` returns) where they should be sharded; unboxed leaves are replicated.
  loss(params, batch, rng) -> (total, count): the objective summed over the batch's terms and the
      number of terms (scored tokens, masked positions). The loop minimizes total / count, and
      gradient accumulation sums both over micro-batches, so the update equals the full batch's.
      A loss may return (total, count, extra) instead, `extra` a dict {name: sum} of further terms
      of the objective over the same count (a regularizer such as z-loss): the loop then minimizes
      (total + sum(extra)) / count but still reports total / count as the loss, and each extra
      term's sum / count as the step metric `name` (see `train_step`).
  batch(step, rows) -> tuple of numpy arrays [rows, T, ...]: rows `rows` of the global batch of
      `step`, a pure function of (seed, step), so a resumed, re-sharded or multi-process run reads
      the same data.
  tx: the optax transformation; frozen parameters (a LoRA base, a distillation teacher) get
      `optax.set_to_zero()` through `optax.multi_transform` and a `stop_gradient` in `loss`. Label
      whole top-level subtrees (`analysis.compression.train_only`): per-leaf labels would land
      inside the logical-axis boxes of `init`'s params.
  learning_rate(step) -> float, for the log (None: not logged); JAX-traceable, like optax's
      schedules, since the loop compiles it once.
  stats(params, batch) -> {name: scalar}: statistics of a forward pass, logged at log steps with the
      parameter groups' (`llm_math.layer_stats`) when config.layer_stats is on (None: none).
  """
  init: Callable
  loss: Callable
  batch: Callable
  tx: optax.GradientTransformation
  learning_rate: Callable | None = None
  stats: Callable | None = None


class LoopState(train_state.TrainState):
  """TrainState plus `sums`: per-step metrics summed since the last log record (checkpointed with the
  parameters, so a run resumed mid-window logs exactly what an uninterrupted one does)."""
  sums: dict


_SUMMED = ("loss", "grad_sq", "micro_grad_sq", "steps")


def _zero_sums() -> dict:
  return {k: jnp.zeros((), jnp.float32) for k in _SUMMED}


def lm_init(model: nn.Module, seq_len: int) -> Callable:
  """rng -> the model's params (boxed with logical axis names), from a [1, seq_len] dummy input."""
  return lambda rng: model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]


def run_rngs(seed: int) -> tuple[jax.Array, jax.Array]:
  """(init_rng, step_rng) of a run with `seed`: `fit` initializes the task's params from the first
  and draws each step's dropout key from the second."""
  init_rng, step_rng = jax.random.split(jax.random.PRNGKey(seed))
  return init_rng, step_rng


def initial_params(init: Callable, seed: int):
  """The params (unboxed) a run with `seed` starts from, `init` being its Task.init (e.g.
  `lm_init(model, seq_len)`): what `fit` initializes at step 0."""
  return nn.meta.unbox(init(run_rngs(seed)[0]))


def boxed_like(boxed, values):
  """`values` (a plain params tree) boxed with the logical axis names of `boxed` (e.g. the abstract
  params of `jax.eval_shape(lm_init(model, T), rng)`), so loaded parameters shard like fresh ones."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree_util.tree_map(lambda b, v: b.replace_boxed(v) if is_box(b) else v, boxed, values,
                                is_leaf=is_box)


def to_host(tree):
  """A pytree of (possibly sharded, possibly multi-process) arrays as numpy, whole, on every process:
  what analyses of a trained model run on, identically in every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)


def _make_state(init: Callable, tx) -> Callable:
  return lambda rng: LoopState.create(apply_fn=None, params=init(rng), tx=tx, sums=_zero_sums())


def abstract_state(init: Callable, tx, mesh, rules, rng):
  """The LoopState of `init(rng)` as jax.ShapeDtypeStructs carrying their NamedShardings (nothing is
  computed): jax.eval_shape gives the state with logical axis names, the rules turn them into mesh
  shardings. What a checkpoint restores into and what the train step compiles for."""
  boxed = jax.eval_shape(_make_state(init, tx), rng)
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                nn.meta.unbox(boxed), shardings)


def shardings_of(tree):
  return jax.tree_util.tree_map(lambda x: x.sharding, tree)


def create_state(init: Callable, tx, mesh, rules, rng, abstract=None):
  """The LoopState of `init(rng)`, created directly in its sharded layout: (state, state_sharding).

  jit(init, out_shardings=...) materializes every array where `abstract_state` puts it.
  """
  shardings = shardings_of(abstract or abstract_state(init, tx, mesh, rules, rng))
  make = _make_state(init, tx)
  state = jax.jit(lambda r: nn.meta.unbox(make(r)), out_shardings=shardings)(rng)
  return state, shardings


def lm_loss(model: nn.Module, loss_chunk: int = 0) -> Callable:
  """The next-token objective of a Task: loss(params, (inputs_BxT, targets_BxT[, weights_BxT]), rng)
  -> (weighted NLL sum, weight sum), with dropout drawn from `rng`.

  With loss_chunk = C > 0 the output projection and loss run C positions at a time
  (`model.chunked_cross_entropy`, at the model's logit_softcap), never holding the [B, T, V] logits:
  the same loss and gradients.

  With the model's z_loss = z > 0 (PaLM's auxiliary loss) it returns (NLL sum, weight sum,
  {"z_loss": z sum_t w_t log^2 Z_t}), Z_t = sum_v exp(logit_tv): the objective train_step minimizes
  is then mean NLL + z mean log^2 Z, whose gradient with respect to logit_t is
  w_t (softmax(logit_t) - onehot(y_t) + 2 z log Z_t softmax(logit_t)) / sum_t w_t, while the loss it
  reports stays the mean NLL and the z term is reported beside it as `z_loss`. It pulls log Z
  towards 0, keeping the logits near self-normalized, so that they do not drift together to large
  magnitudes where bfloat16 (or float32) rounding of the softmax loses precision (Wortsman et al.
  2023's output-logit divergence).
  """
  cfg = model.config

  def loss(params, batch, rng):
    inputs_BxT, targets_BxT = batch[:2]
    weights_BxT = batch[2] if len(batch) > 2 else None
    out = model.apply({"params": params}, inputs_BxT, deterministic=False, rngs={"dropout": rng},
                      return_hidden=bool(loss_chunk))
    sums = model_lib.output_nll(out, params, targets_BxT, weights_BxT, loss_chunk,
                                cfg.logit_softcap, with_log_z_sq=bool(cfg.z_loss),
                                rules=cfg.logical_axis_rules)
    if not cfg.z_loss:
      return sums
    nll, count, log_z_sq = sums
    return nll, count, {"z_loss": cfg.z_loss * log_z_sq}

  return loss


# The metrics train_step computes itself; a loss's extra terms take other names.
_STEP_METRICS = ("loss", "grad_norm", "param_norm", "update_norm")


def _loss_parts(out) -> tuple:
  """(total, count, extra terms) of a Task loss's (total, count) or (total, count, extra)."""
  total, count, *rest = out
  extra = dict(rest[0]) if rest else {}
  clash = set(extra) & set(_STEP_METRICS)
  if clash:
    raise ValueError(f"a loss's extra terms {sorted(clash)} clash with the step's own metrics")
  return total, count, extra


def train_step(state: LoopState, batch: tuple, rng, *, loss_fn: Callable, grad_accum_steps: int = 1,
               stats_fn: Callable | None = None, layer_stats: bool = False):
  """One optimizer step on total / count of `loss_fn` over `batch`; returns (new_state, metrics).

  Run under `use_mesh(mesh)`, the activations the model constrains by logical name (the residual
  stream, ('batch', 'length', 'embed')) are laid out by the model config's logical_axis_rules.

  What is differentiated is each (micro-)batch's mean, total / count with the count held constant:
  the backward pass then carries per-term cotangents of size 1 / count, never a sum over every term
  of the batch (which overflows float16's 65504 at large batches). With grad_accum_steps = M > 1 the
  batch is split into M micro-batches (a lax.scan, so memory holds one micro-batch's activations);
  their mean gradients g_m, weighted by their counts c_m, give the same update as one big batch.
  They also give McCandlish's gradient noise estimator its two batch sizes: `grad_sq` = |g|^2 (the
  whole batch) and `micro_grad_sq` = sum_m c_m |g_m|^2 / sum_m c_m (micro-batches of count / M terms
  on average; weighting by c_m keeps E[micro_grad_sq] = |G|^2 + tr(Sigma) M / count when masked
  tasks give micro-batches different counts, and a micro-batch with no terms adds nothing), summed
  in `state.sums` with the loss.

  A loss_fn that returns (total, count, extra) (see `Task`) has (total + sum(extra)) / count
  differentiated, total / count reported as `loss`, and each extra[name] / count (summed over the
  micro-batches like total) reported as the metric `name` of this step.

  With layer_stats the metrics also hold each parameter group's rms of parameters, gradients and
  updates and `stats_fn(params, batch)` of the parameters the step started from, on the batch (its
  first micro-batch under accumulation): see `llm_math.layer_stats`. The update is the same.
  """
  step_rng = jax.random.fold_in(rng, state.step)

  def mean_loss(params, batch, rng):
    total, count, extra = _loss_parts(loss_fn(params, batch, rng))
    objective = total
    for name in sorted(extra):
      objective = objective + extra[name]
    return objective / jax.lax.stop_gradient(jnp.maximum(count, 1)), (total, count, extra)

  grad_fn = jax.value_and_grad(mean_loss, has_aux=True)
  if grad_accum_steps == 1:
    (_, (total, count, extra)), grads = grad_fn(state.params, batch, step_rng)
    micro_sq = jnp.square(_norm(grads))
  else:
    m = grad_accum_steps
    # Row r of micro-batch i is row r * M + i: each device keeps its own rows (no resharding).
    split = lambda a: jnp.moveaxis(a.reshape((a.shape[0] // m, m) + a.shape[1:]), 1, 0)

    def accumulate(carry, micro):
      part, i = micro
      (_, (total, count, extra)), grads = grad_fn(state.params, part,
                                                  jax.random.fold_in(step_rng, i))
      weighted = jax.tree_util.tree_map(lambda g: g * count, grads)
      sq = count * jnp.square(_norm(grads))
      return jax.tree_util.tree_map(jnp.add, carry, (total, count, extra, weighted, sq)), None

    zero = jnp.zeros((), jnp.float32)
    # The extra terms' names and shapes (none for most losses), to start their sums at zero.
    micro_shapes = tuple(jax.ShapeDtypeStruct((a.shape[0] // m,) + a.shape[1:], a.dtype)
                         for a in batch)
    extra_shapes = jax.eval_shape(lambda p, b, r: _loss_parts(loss_fn(p, b, r))[2], state.params,
                                  micro_shapes, step_rng)
    zero_extra = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), extra_shapes)
    init = (zero, zero, zero_extra, jax.tree_util.tree_map(jnp.zeros_like, state.params), zero)
    (total, count, extra, weighted, micro_sq), _ = jax.lax.scan(
        accumulate, init, (tuple(split(a) for a in batch), jnp.arange(m)))
    grads = jax.tree_util.tree_map(lambda g: g / jnp.maximum(count, 1), weighted)
    micro_sq = micro_sq / jnp.maximum(count, 1)
  loss = total / count
  new_state = state.apply_gradients(grads=grads)
  step_sums = {"loss": loss, "grad_sq": jnp.square(_norm(grads)), "micro_grad_sq": micro_sq,
               "steps": jnp.ones((), jnp.float32)}
  new_state = new_state.replace(sums=jax.tree_util.tree_map(
      lambda a, b: a + b.astype(jnp.float32), state.sums, step_sums))
  metrics = {
      "loss": loss,
      "grad_norm": _norm(grads),
      "param_norm": _norm(new_state.params),
      "update_norm": _norm(
          jax.tree_util.tree_map(jnp.subtract, new_state.params, state.params)),
      **{name: term / count for name, term in extra.items()},
  }
  if layer_stats:
    metrics.update(layer_stats_lib.step_stats(state.params, grads, new_state.params))
    if stats_fn is not None:
      first = tuple(a[::grad_accum_steps] for a in batch)  # Micro-batch 0 (see `split`).
      metrics.update(stats_fn(state.params, first))
  return new_state, metrics


def jit_train_step(task: Task, state_sharding, batch_sharding, grad_accum_steps: int = 1,
                   layer_stats: bool = False):
  """The jitted `train_step` of `task` that `fit` runs: the state in `state_sharding` (donated: the
  update reuses its buffers), every batch array in `batch_sharding`, the rng replicated. What
  `llm_math.aot` compiles for devices that need not exist. With layer_stats, the variant that also
  returns the per-layer statistics (`fit` runs it at log steps only)."""
  return jax.jit(functools.partial(train_step, loss_fn=task.loss, grad_accum_steps=grad_accum_steps,
                                   stats_fn=task.stats, layer_stats=layer_stats),
                 in_shardings=(state_sharding, batch_sharding, None),
                 out_shardings=(state_sharding, None), donate_argnums=0)


@dataclasses.dataclass
class TrainResult:
  state: object
  final_step: int
  val_curve: list  # [(step, val_nll_nats)]
  params: int
  tokens_per_second: float
  records: list = dataclasses.field(default_factory=list)  # metrics.jsonl, this run's steps
  stopped: str | None = None  # why a hook (or a divergence, on_divergence="stop") ended the run
  interrupted: bool = False
  train_time_s: float = float("nan")  # Wall time of the training loop, summed over resumed sessions.
  val_elapsed_s: list = dataclasses.field(default_factory=list)  # training time at each val_curve point
  flops_per_token: float = float("nan")


class _StopSignals:
  """Turns the first SIGINT/SIGTERM into a flag the loop checks between steps; a second one kills.

  With several processes each one receives its signal at its own moment (a pod's hosts are told
  one by one), so the flag only counts once the processes agree (`agreed`): at the steps where every
  process asks, all of them learn whether any was signalled, stop after the same step and save it.
  """

  def __init__(self):
    self.received = None
    self.stopping = None  # The agreed signal, once `agreed` has returned one.
    self._previous = {}

  def _handler(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def agreed(self) -> str | None:
    """The signal any process received (its name), identically on every process; a collective
    with several processes, so every process must call it at the same steps."""
    if jax.process_count() == 1:
      return self.received
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    names = ("", "SIGINT", "SIGTERM")
    codes = multihost_utils.process_allgather(np.array(names.index(self.received or "")))
    self.stopping = names[int(np.max(codes))] or None
    return self.stopping

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      try:
        self._previous[sig] = signal.signal(sig, self._handler)
      except ValueError:  # Not the main thread: leave signals alone.
        pass
    return self

  def __exit__(self, *exc):
    # A process that stopped for another's signal may still receive its own while it exits: that
    # one was meant for the stop that already happened, so SIGTERM is ignored from here on (a Python
    # handler would not do: the interpreter drops it while shutting down). SIGINT acts as before.
    late = self.stopping and not self.received
    for sig, handler in self._previous.items():
      signal.signal(sig, signal.SIG_IGN if late and sig == signal.SIGTERM else handler)


def _loss_problem(loss: float, bound: float, what: str = "training") -> str | None:
  """Why `loss` counts as diverged (NaN, infinite or above `bound`), or None."""
  if math.isfinite(loss) and loss <= bound:
    return None
  reason = "" if not math.isfinite(loss) else f", above the divergence bound {bound:.2f}"
  return f"{what} loss is {loss:.6g}{reason}"


def _divergence(problem: str, step: int, last_saved: int | None) -> DivergenceError:
  kept = (f"the last good checkpoint (step {last_saved}) is kept" if last_saved is not None
          else "no checkpoint had been saved yet")
  return DivergenceError(
      f"{problem} at step {step}; stopped without saving the diverged state ({kept}). "
      "Lower --config.learning_rate, raise --config.warmup_steps or check the data.")


def _all_finite(tree) -> jax.Array:
  """Whether every floating-point entry of `tree` is finite (a scalar bool)."""
  leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _unsavable(state, metrics: dict, bound: float, all_finite: Callable) -> str | None:
  """Why the state after a step must not be saved (its loss diverged, or any number of the state,
  parameters or optimizer moments, is not finite), or None: only finite states become checkpoints."""
  problem = _loss_problem(float(jax.device_get(metrics["loss"])), bound)
  if problem is None and not bool(all_finite(state)):
    problem = "the state after the update is not finite"
  return problem


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclasses.dataclass(frozen=True)
class Hook:
  """Runs `fn(step, params, record)` after the steps where `when(step)` is true (step 0: before the
  first update), once per step over all sessions of a run.

  `record` holds what the loop logged at this step (loss, val_nll, ...); `fn` returns a dict of JSON
  values added to it (written to metrics.jsonl, so a resumed run keeps them) or None. A returned
  "stop": reason ends the run after this step, which is then saved as the run's last checkpoint.
  """
  when: Callable[[int], bool]
  fn: Callable[[int, Any, dict], dict | None]


def every(k: int) -> Callable[[int], bool]:
  """A schedule: the steps k, 2k, 3k, ..."""
  return lambda step: step > 0 and step % k == 0


def stop_below(target: float, key: str = "val_nll") -> Hook:
  """Ends the run at the first record whose `key` is at or below `target` (steps-to-target)."""
  return Hook(lambda step: True,
              lambda step, params, record: ({"stop": "target reached"}
                                            if record.get(key, math.inf) <= target else None))


def _compile_ahead(mesh, jitted, args, *more: Callable) -> Callable[[], Callable]:
  """Starts compiling `jitted` for `args` (arrays or ShapeDtypeStructs), then running `more`
  (e.g. further compilations, which fill JAX's cache), on a thread; returns a function that waits
  for the executable. XLA compiles with the GIL released, so what the caller does meanwhile
  (creating the state, the first evaluation) overlaps the compilation."""
  def in_mesh(fn):
    def run():
      with sharding.use_mesh(mesh):
        return fn()
    return run

  pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  future = pool.submit(in_mesh(lambda: jitted.lower(*args).compile()))
  for fn in more:  # Only warm caches: should one fail, the real call compiles and raises there.
    pool.submit(in_mesh(fn))
  pool.shutdown(wait=False)
  return future.result


def _read_sums(state) -> dict:
  """The window means of the summed metrics, and the number of steps they average."""
  sums = {k: float(v) for k, v in jax.device_get(state.sums).items()}
  n = max(sums.pop("steps"), 1.0)
  return {**{k: v / n for k, v in sums.items()}, "window_steps": int(n)}


def fit(config, task: Task, workdir, *, evaluate: Callable | None = None,
        eval_at: Callable[[int], bool] | None = None, log_at: Callable[[int], bool] | None = None,
        hooks=(), loss_bound: float = math.inf, max_val_rise: float = math.inf,
        on_divergence: str = "raise", log=print) -> TrainResult:
  """Trains `task` for config.num_steps steps (or until a hook stops it), resuming from `workdir`.

  `config` (an experiment config or its `train_config.TrainConfig`) supplies the loop's fields:
  seed, num_steps, batch_size (global), grad_accum_steps, mesh, logical_axis_rules, log_every,
  eval_every, checkpoint_every, keep_checkpoints, checkpoint_schedule, layer_stats and
  stop_check_every (several processes). `evaluate(params)` -> mean validation
  NLL runs at step 0, at `eval_at` steps (default every eval_every) and at the end; log records (the
  window means of the loss and of the gradient-noise terms, see `train_step`) are written at
  `log_at` steps (default every log_every) and at the end. A loss that is NaN, infinite or above
  `loss_bound`, or a validation NLL more than `max_val_rise` above the run's own step-0 validation
  NLL, raises DivergenceError without saving (on_divergence="raise"), or ends the run with stop
  "diverged" (on_divergence="stop", for sweeps where divergence is an outcome).

  State is created sharded in place, batches are this process's rows of each global batch (made
  ahead on a thread), checkpoints are orbax's (atomic; see `llm_math.checkpoint`), and the first
  SIGINT/SIGTERM saves the state and returns with `interrupted`: rerunning the same call continues
  exactly; with several processes the signal counts once they agree (see `_StopSignals`). Only
  finite states are saved. A run that has finished (num_steps, or a hook's stop) returns its saved
  state at once.
  """
  tc = train_config_lib.train_config(config)
  mesh, rules = sharding.make_mesh(tc.mesh), tc.logical_axis_rules
  num_steps = tc.num_steps
  eval_at = eval_at or every(tc.eval_every)
  log_at = log_at or every(tc.log_every)
  save_at = every(tc.save_every)
  accum = tc.grad_accum_steps
  init_rng, step_rng = run_rngs(tc.seed)
  abstract = abstract_state(task.init, task.tx, mesh, rules, init_rng)
  state_sharding = shardings_of(abstract)
  n_params = flops_lib.count_params(abstract.params)

  mngr = checkpoint.manager(workdir, tc.keep_checkpoints)
  # checkpoint_schedule='log': the state at steps 0, 1, 2, 4, ..., then every
  # checkpoint_every, kept (all of them) apart from the rolling checkpoints, for analyses.
  snapshots = (checkpoint.manager(workdir, None, directory=checkpoint.SNAPSHOTS)
               if tc.checkpoint_schedule == "log" else None)
  snapshot_every = tc.save_every
  restored, start_step = checkpoint.restore_latest(mngr, abstract, log=log)
  start_step = start_step or 0
  last_saved = start_step if start_step else None
  if start_step < num_steps:  # Before anything is written: a read-only disk fails here, at once.
    checkpoint.check_writable(mngr)
  writer = metrics_lib.MetricsWriter(workdir, start_step if restored is not None else -1)  # -1: a fresh run
  if writer.kept_as is not None:
    log(f"metrics.jsonl held records past step {start_step}; kept them in {writer.kept_as.name}")
    if restored is None:
      writer.write({"step": 0, "restart": "no intact checkpoint: training starts again from step 0",
                    "earlier_metrics": writer.kept_as.name})
  stopped = next((r["stop"] for r in writer.records if "stop" in r), None)
  if restored is not None and not stopped and start_step < num_steps:
    log(f"resumed from the checkpoint at step {start_step} in {workdir}")
  elif restored is not None:
    log(f"reusing the finished run in {workdir} (step {start_step})")

  batch_sh = sharding.batch_sharding(mesh, rules)
  rows = sharding.process_rows(tc.batch_size)
  step_fn = jit_train_step(task, state_sharding, batch_sh, accum)
  # layer_stats: log steps run the step that also returns per-layer statistics.
  stats_step_fn = (jit_train_step(task, state_sharding, batch_sh, accum, layer_stats=True)
                   if tc.layer_stats else None)
  will_train = start_step < num_steps and not stopped
  if will_train:  # The step compiles on a thread while the state is created and first scored.
    batch = tuple(jax.ShapeDtypeStruct((tc.batch_size,) + x.shape[1:],
                                       jax.dtypes.canonicalize_dtype(x.dtype), sharding=batch_sh)
                  for x in task.batch(start_step, rows))
    compiled_step = _compile_ahead(mesh, step_fn, (abstract, batch, step_rng),
                                   lambda: checkpoint.compile_fingerprint(abstract))
  all_finite = jax.jit(_all_finite, in_shardings=(state_sharding,))
  params_finite = jax.jit(_all_finite, in_shardings=(state_sharding.params,))
  reset_sums = jax.jit(lambda s: s.replace(sums=_zero_sums()), in_shardings=(state_sharding,),
                       out_shardings=state_sharding, donate_argnums=0)
  if restored is not None:
    state = restored
  else:
    state, _ = create_state(task.init, task.tx, mesh, rules, init_rng, abstract)
  learning_rate = jax.jit(task.learning_rate) if task.learning_rate is not None else None
  if jax.process_count() > 1 and will_train:
    print(f"process {jax.process_index()} of {jax.process_count()} reads rows {rows.start}:"
          f"{rows.stop} of each global batch of {tc.batch_size}", flush=True)
  timed = [r for r in writer.records if "elapsed_s" in r]
  elapsed_before = timed[-1]["elapsed_s"] if timed else 0.0  # Earlier sessions of this run.
  tokens_per_second = next((r["tokens_per_s"] for r in reversed(writer.records)
                            if "tokens_per_s" in r), None)
  session_start = time.perf_counter()
  elapsed = lambda: elapsed_before + time.perf_counter() - session_start

  def finish_step(step: int, record: dict) -> str | None:
    """Evaluation and hooks after `step`; writes the record; returns a reason to stop, or None.

    The one divergence policy: a training or validation loss that is NaN, infinite or above
    `loss_bound`, or non-finite parameters where hooks would read them, raise DivergenceError
    (on_divergence="raise") or end the run with stop "diverged"; the step's remaining evaluation
    and hooks are then skipped (they would analyse a diverged model)."""
    def diverged(problem: str | None) -> bool:
      if problem is not None:
        if on_divergence == "raise":
          raise _divergence(problem, step, last_saved)
        record["stop"] = "diverged"
      return problem is not None

    stop = "loss" in record and diverged(_loss_problem(record["loss"], loss_bound))
    if not stop and evaluate is not None and (step == 0 or eval_at(step) or step == num_steps):
      nll = evaluate(state.params)
      record.update(val_nll=nll, val_ppl=information.perplexity(nll))
      log(f"step {step:6d} | val nll {nll:.4f} nats | val ppl {information.perplexity(nll):.3f}")
      first = next((r["val_nll"] for r in writer.records if r["step"] == 0 and "val_nll" in r), nll)
      stop = diverged(_loss_problem(nll, min(loss_bound, first + max_val_rise), "validation"))
    due = [] if stop else [hook for hook in hooks if step == 0 or hook.when(step)]
    if due and diverged(None if bool(params_finite(state.params)) else "parameters are not finite"):
      due = []
    for hook in due:
      record.update(hook.fn(step, state.params, record) or {})
    if record:
      writer.write({"step": step, **record, "elapsed_s": elapsed()})
    return record.get("stop")

  def save_if_finite(step: int) -> str | None:
    """Saves the state as `step` unless it must not be (`_unsavable`): returns why not, after
    raising DivergenceError instead when on_divergence="raise"."""
    nonlocal last_saved
    problem = _unsavable(state, metrics, loss_bound, all_finite)
    if problem is None:
      checkpoint.check_room(mngr, state, last_saved)
      checkpoint.save(mngr, step, state, last_saved=last_saved)
      last_saved = step
    elif on_divergence == "raise":
      raise _divergence(problem, step, last_saved)
    return problem

  def snapshot(step: int, loss) -> None:
    """Keeps the state as a log-spaced snapshot, if `step` is one and it is finite and not kept."""
    if (snapshots is None or not checkpoint.log_spaced(step, snapshot_every)
        or step in snapshots.all_steps()):
      return
    if _unsavable(state, {"loss": loss}, loss_bound, all_finite) is None:
      checkpoint.save(snapshots, step, state)

  interrupted = None
  try:
    with _StopSignals() as stop, sharding.use_mesh(mesh):
      if start_step == 0:
        snapshot(0, 0.0)
        stopped = finish_step(0, {})
      batches = data_lib.prefetch(
          lambda step: tuple(sharding.global_batch(x, batch_sh) for x in task.batch(step, rows)),
          start_step, num_steps) if not stopped else iter(())
      if will_train and not stopped:
        step_fn = compiled_step()
      tokens_per_step = tc.batch_size * tc.seq_len
      # With several processes, a signal counts at the steps where all of them ask (`agreed`).
      check_every = 1 if jax.process_count() == 1 else tc.stop_check_every
      await_each_step = xla_cpu.await_each_step()
      window_start, window_steps = time.perf_counter(), 0
      for step in range(start_step, num_steps if not stopped else start_step):
        if (step - start_step) % check_every == 0:
          interrupted = stop.agreed()
          if interrupted:
            break
        logs_now = log_at(step + 1) or step + 1 == num_steps
        state, metrics = (stats_step_fn if stats_step_fn is not None and logs_now else step_fn)(
            state, next(batches), step_rng)
        if await_each_step:
          jax.block_until_ready(metrics["loss"])
        window_steps += 1
        done = step + 1
        record = {}
        if logs_now:
          last = {k: float(v) for k, v in jax.device_get(metrics).items()}
          record.update(_read_sums(state))
          state = reset_sums(state)
          seconds = time.perf_counter() - window_start
          tokens_per_second = window_steps * tokens_per_step / seconds
          window_start, window_steps = time.perf_counter(), 0
          record.update(ppl=information.perplexity(record["loss"]),
                        grad_norm=last["grad_norm"], param_norm=last["param_norm"],
                        update_norm=last["update_norm"], tokens_per_s=tokens_per_second)
          # The loss's extra objective terms (z_loss), this step's, like the norms.
          record.update({k: v for k, v in last.items() if k not in _STEP_METRICS})
          if learning_rate is not None:
            record["lr"] = float(learning_rate(step))
          eta = (num_steps - done) * seconds / max(record["window_steps"], 1)
          log(f"step {done:6d} | loss {record['loss']:.4f} | "
              + (f"lr {record['lr']:.2e} | " if "lr" in record else "")
              + f"grad norm {record['grad_norm']:.3f} | "
              + "".join(f"{k} {last[k]:.3g} | " for k in last
                        if k not in _STEP_METRICS and not layer_stats_lib.is_layer_stat(k))
              + f"{tokens_per_second:,.0f} tokens/s | "
              f"{_duration(elapsed())} elapsed, ETA {_duration(eta)}")
        paused = time.perf_counter()
        snapshot(done, metrics["loss"])
        stopped = finish_step(done, record)
        window_start += time.perf_counter() - paused  # tokens/s counts training steps only
        if stopped or save_at(done) or done == num_steps:
          problem = save_if_finite(done)
          if problem is not None:
            if stopped != "diverged":
              stopped = "diverged"
              writer.write({"step": done, "stop": stopped, "elapsed_s": elapsed()})
            log(f"step {done:6d} | {problem}: not saved (the last saved step is {last_saved})")
        if stopped:
          log(f"step {done:6d} | stopped: {stopped}")
          break
      interrupted = interrupted or stop.agreed()  # Also a signal during the last step or hooks.
      if interrupted:
        current = int(jax.device_get(state.step))
        if current != last_saved and current > start_step:
          save_if_finite(current)
        saved = "checkpoint saved" if last_saved == current else "nothing to save yet"
        log(f"received {interrupted} at step {current}: {saved}; rerun the same command to resume")
  finally:  # Also on a divergence stop: in-flight async saves complete before the error surfaces.
    try:
      checkpoint.finish(mngr, last_saved)
      if snapshots is not None:
        checkpoint.finish(snapshots)
    finally:
      writer.close()
  vals = [r for r in writer.records if "val_nll" in r]
  timed = [r for r in writer.records if "elapsed_s" in r]
  return TrainResult(state=state, final_step=int(jax.device_get(state.step)),
                     val_curve=[(r["step"], r["val_nll"]) for r in vals], params=n_params,
                     tokens_per_second=tokens_per_second if tokens_per_second else math.nan,
                     records=list(writer.records), stopped=stopped, interrupted=bool(interrupted),
                     train_time_s=timed[-1]["elapsed_s"] if timed else math.nan,
                     val_elapsed_s=[r.get("elapsed_s", math.nan) for r in vals])


def lm_task(config, dataset: data_lib.Dataset, model: nn.Module | None = None) -> Task:
  """Next-token prediction of `config`'s Transformer on (seed, step) windows of the training split."""
  tc = train_config_lib.train_config(config)
  model = model or model_lib.Transformer(train_config_lib.model_config(config, dataset.vocab_size))
  return Task(
      init=lm_init(model, tc.seq_len), loss=lm_loss(model, tc.loss_chunk),
      batch=lambda step, rows: data_lib.train_batch(dataset.train_ids, tc.seq_len,
                                                    tc.batch_size, tc.seed, step, rows),
      tx=optimizer_lib.optimizer(tc), learning_rate=optimizer_lib.learning_rate_schedule(tc),
      stats=layer_stats_lib.forward_stats(model, tc.loss_chunk))


def train(config, dataset: data_lib.Dataset, workdir, windows=None, log=print) -> TrainResult:
  """Trains (or resumes training of) the Transformer LM described by `config` on `dataset`.

  `windows` (default: `evaluation.validation_windows(config, dataset.val_ids)`) are the validation windows evaluated
  every `config.eval_every` steps and at the end. `workdir` is a local path or a URL (gs://...).
  """
  tc = train_config_lib.check_config(config)
  data_lib.check_fits(dataset, tc.seq_len)
  mcfg = train_config_lib.model_config(config, dataset.vocab_size)
  model = model_lib.Transformer(mcfg)
  if mcfg.attention_impl == "fused":
    platform, capability = model_lib.default_platform()
    kernel = model_lib.fused_attention_implementation(platform, mcfg.dtype, mcfg.head_dim,
                                                      capability)
    log(f"attention: fused, implementation={kernel} ({platform}, "
        f"{jnp.dtype(mcfg.dtype).name}, head_dim {mcfg.head_dim})")
  evaluate = evaluation.evaluator(config, windows or evaluation.validation_windows(
      config, dataset.val_ids),
                                  model.apply)
  result = fit(config, lm_task(config, dataset, model), workdir, evaluate=evaluate,
               loss_bound=tc.loss_bound(dataset.vocab_size), log=log)
  result.flops_per_token = flops_lib.flops_per_token(mcfg, result.params, tc.seq_len)
  return result
