r"""The batch-size law of SGD: steps and examples to a target loss, the critical batch size, gradient noise.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training"): training to a fixed loss with
batch size B takes S steps and E = B S examples, with

    S = S_min (1 + B_crit / B),   E = E_min (1 + B / B_crit),   B_crit = E_min / S_min,

perfect scaling (S ~ 1/B, E constant) for B << B_crit and diminishing returns (S -> S_min) for
B >> B_crit; B_crit is predicted by the simple noise scale B_simple = tr(Sigma) / |G|^2, which rests
on the mini-batch gradient variance law E|g_B - G|^2 = tr(Sigma) / B.

  python -m experiments.batch_size --workdir=/tmp/batch_size                # embedded synthetic source
  python -m experiments.batch_size --workdir=/tmp/batch_size_shakespeare \
      --data=text:../shared/data/tinyshakespeare.txt
  python -m experiments.batch_size --workdir=/tmp/batch_size_sqrt --config.lr_rule=sqrt

Protocol. A pilot run (the smallest B, at its rule learning rate) sets the target validation loss
(config.target_loss overrides). For every B of the sweep, runs start from the same initialization,
train with Adam at a constant learning rate (tuned over powers of two, or a named rule) and stop at
the first evaluation at or below the target; steps-to-target interpolate between evaluations. Each
step splits its batch into micro-batches and feeds |g_small|^2 and |g_big|^2 to McCandlish's
two-batch estimator. At each B's best run the script measures the training loss (generalization
gap) and the sharpness; at one fixed checkpoint, the gradient variance vs B from independent
mini-batches of fresh training windows, against tr(Sigma)/B from separate per-example gradients.

Writes to --workdir: results.json (every run, the fit, how each number was measured, the config),
results.md, and the figures of experiments/plot_batch_size.py.
"""

import json
import math
import time
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from experiments import plot_batch_size
from llm_math import data as data_lib
from llm_math import flops as flops_lib
from llm_math.analysis import gradient_noise as gn
from llm_math import model as model_lib
from llm_math.analysis import sharpness as sharpness_lib
from llm_math import train as train_lib
from llm_math.errors import UsageError


LR_RULES = {"linear": 1.0, "sqrt": 0.5, "constant": 0.0, "tune": 0.5}  # rule -> exponent a
# A step index no run reaches: `data.train_batch` there gives a fixed draw of training windows.
_PER_EXAMPLE_STEP = 10**9
_FRESH_BATCH_STEP = 10**9 + 1  # ... and + 1, + 2, ...: one fixed draw per B of the variance law.
_DIVERGED_NATS = 1.0  # A run whose validation loss rises this far above its start has diverged.


# ----------------------------------------------------------------------------------------------
# Pure helpers (tested directly).
# ----------------------------------------------------------------------------------------------


def rule_learning_rate(config, batch_size: int) -> float:
  """lr(B) = learning_rate * (B / lr_reference_batch)^a; a = 1 linear, 1/2 sqrt (and tune), 0 constant."""
  exponent = LR_RULES[config.lr_rule]
  return config.learning_rate * (batch_size / config.lr_reference_batch) ** exponent


def next_eval_step(done: int, growth: float) -> int:
  """The step of the evaluation after the one at `done`: every step at first, then `growth`x apart."""
  return max(done + 1, math.ceil(done * growth))


def crossing_step(steps, values, target: float) -> float | None:
  """First step where a curve reaches `target`, linear between the evaluations around the crossing.

  Returns None when no value is <= target, and steps[0] when the first one already is.
  """
  for i, value in enumerate(values):
    if value <= target:
      if i == 0:
        return float(steps[0])
      s0, s1, v0 = steps[i - 1], steps[i], values[i - 1]
      return float(s0 + (s1 - s0) * (v0 - target) / (v0 - value))
  return None


def target_from_curve(values, margin: float, window: int = 3) -> float:
  """The lowest `window`-point running mean of a loss curve plus `margin` (robust to one lucky point)."""
  v = np.asarray(values, np.float64)
  if v.size < window:
    raise ValueError(f"values: expected at least {window} points, got {v.size}")
  running = np.convolve(v, np.ones(window) / window, mode="valid")
  return float(running.min() + margin)


def noise_scale_between(noise: dict, start: float, stop: float) -> dict:
  """|G|^2, tr(Sigma) and B_simple averaged over the steps of the windows ending in (start, stop].

  `noise` holds per-window sums of the one-step estimates (`g_sq_sum`, `trace_sum`) and the number
  of steps (`weight`); numerator and denominator are averaged separately, the ratio taken last.
  """
  steps = np.asarray(noise["step"], np.float64)
  keep = (steps > start) & (steps <= stop)
  weight = float(np.sum(np.asarray(noise["weight"])[keep]))
  if weight == 0:
    return {"g_sq": None, "trace_sigma": None, "b_simple": None, "steps_averaged": 0}
  g_sq = float(np.sum(np.asarray(noise["g_sq_sum"])[keep])) / weight
  trace = float(np.sum(np.asarray(noise["trace_sum"])[keep])) / weight
  return {"g_sq": g_sq, "trace_sigma": trace, "b_simple": trace / g_sq if g_sq > 0 else None,
          "steps_averaged": int(weight)}


def check_config(config):
  """User mistakes in the sweep's fields, as one-line errors."""
  if config.lr_rule not in LR_RULES:
    raise UsageError(f"--config.lr_rule={config.lr_rule!r}: expected one of {', '.join(LR_RULES)}")
  sizes = list(config.batch_sizes)
  if len(sizes) < 2 or any(not isinstance(b, int) or b < 2 for b in sizes) or sorted(set(sizes)) != sizes:
    raise UsageError(f"--config.batch_sizes={tuple(sizes)}: expected at least two increasing "
                     "integers >= 2 (powers of two)")
  m = config.noise_microbatches
  for b in sizes:
    if m < 2 or b % min(m, b):
      raise UsageError(f"--config.noise_microbatches={m}: expected >= 2 and a divisor of every batch "
                       f"size (or larger than it), but B={b}")
  if config.gradient_variance.checkpoint_batch not in sizes:
    raise UsageError(f"--config.gradient_variance.checkpoint_batch="
                     f"{config.gradient_variance.checkpoint_batch}: expected one of {tuple(sizes)}")
  gv = config.gradient_variance
  for name, low in (("fresh_batches", 2), ("num_examples", 4), ("num_batches", 1)):
    if not gv[name] >= low:
      raise UsageError(f"--config.gradient_variance.{name}={gv[name]}: expected >= {low}")
  if config.model.dropout_rate:
    raise UsageError("--config.model.dropout_rate: this experiment trains without dropout (set 0)")
  for name in ("learning_rate", "lr_reference_batch", "max_steps", "pilot_steps", "eval_tokens"):
    if not config[name] > 0:
      raise UsageError(f"--config.{name}={config[name]}: expected > 0")
  if config.lr_tune_factor <= 1 or config.eval_growth <= 1:
    raise UsageError("--config.lr_tune_factor and --config.eval_growth: expected > 1")


# ----------------------------------------------------------------------------------------------
# The model, the train step with the two-batch noise estimate, evaluation.
# ----------------------------------------------------------------------------------------------


def make_loss_fn(model: nn.Module) -> Callable:
  """loss(params, inputs_BxT, targets_BxT) -> mean next-token NLL (nats) over the B x T targets."""

  def loss_fn(params, inputs_BxT, targets_BxT):
    logits_BxTxV = model.apply({"params": params}, inputs_BxT, deterministic=True)
    nll_sum, count = model_lib.cross_entropy(logits_BxTxV, targets_BxT)
    return nll_sum / count

  return loss_fn


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, batch_size: int,
                    num_microbatches: int) -> Callable:
  """A jitted step(params, opt_state, noise, inputs_BxT, targets_BxT, lr) -> (params, opt_state, noise, loss).

  One vmapped value_and_grad over M micro-batches of b = B / M sequences gives the M micro-batch
  gradients g_m; their mean is the gradient of the whole batch (equal sizes, equal token counts).
  |g_m|^2 (B_small = b) and |mean g_m|^2 (B_big = B) go into McCandlish's two-batch estimator,
  accumulated in `noise` with decay 1 (plain sums over steps). `tx` is built with a unit learning
  rate: AdamW's update is linear in the learning rate, so scaling it by `lr` lets one compilation
  serve every learning rate of the sweep.
  """
  m = min(num_microbatches, batch_size)
  b_small = batch_size // m

  def step(params, opt_state, noise, inputs_BxT, targets_BxT, lr):
    split = lambda x: x.reshape((m, b_small) + x.shape[1:])
    losses_M, grads_M = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0, 0))(
        params, split(inputs_BxT), split(targets_BxT))
    grads = jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), grads_M)
    noise = gn.noise_scale_update(noise, jax.vmap(gn.tree_sq_norm)(grads_M), gn.tree_sq_norm(grads),
                                  b_small, batch_size, decay=1.0)
    updates, opt_state = tx.update(grads, opt_state, params)
    updates = jax.tree_util.tree_map(lambda u: lr * u, updates)
    return optax.apply_updates(params, updates), opt_state, noise, jnp.mean(losses_M)

  return jax.jit(step)


def make_nll(model: nn.Module) -> Callable:
  """A jitted (params, inputs_BxT, targets_BxT, weights_BxT) -> (weighted NLL sum, weight sum)."""

  @jax.jit
  def nll(params, inputs_BxT, targets_BxT, weights_BxT):
    logits_BxTxV = model.apply({"params": params}, inputs_BxT, deterministic=True)
    return model_lib.cross_entropy(logits_BxTxV, targets_BxT, weights_BxT)

  return nll


def make_evaluator(nll: Callable, windows: data_lib.EvalWindows,
                   chunk: int = 256) -> Callable[[dict], float]:
  """params -> mean NLL (nats) over the scored targets of fixed windows, `chunk` windows per call."""

  def evaluate(params) -> float:
    total, count = 0.0, 0.0
    for i in range(0, len(windows.inputs_NxT), chunk):
      s = slice(i, i + chunk)
      t, n = nll(params, windows.inputs_NxT[s], windows.targets_NxT[s], windows.weights_NxT[s])
      total, count = total + float(t), count + float(n)
    return total / count

  return evaluate


def floor_nll(source, ids: np.ndarray, windows: data_lib.EvalWindows) -> float:
  """The true model's mean NLL on the scored targets of `windows` over `ids`, same context per token."""
  scored = windows.weights_NxT > 0
  return float(source.conditional_nll(ids, windows.positions_NxT[scored],
                                      windows.context_NxT[scored]).mean())


class Setup(NamedTuple):
  """What every run of the sweep shares."""
  config: object
  dataset: data_lib.Dataset
  loss_fn: Callable
  tx: optax.GradientTransformation
  params0: dict
  evaluate_val: Callable
  evaluate_train: Callable
  sharpness: Callable  # see make_sharpness_fn
  steps: dict  # batch size -> jitted train step


def make_setup(config, dataset: data_lib.Dataset, val_windows: data_lib.EvalWindows,
               train_windows: data_lib.EvalWindows) -> Setup:
  """The model, its initialization (shared by every run), the optimizer, evaluators, sharpness."""
  model = model_lib.Transformer(train_lib.model_config(config, dataset.vocab_size))
  params0 = nn.meta.unbox(model.init(jax.random.PRNGKey(config.seed),
                                     jnp.zeros((1, config.seq_len), jnp.int32))["params"])
  unit = config.copy_and_resolve_references()
  with unit.unlocked():  # Unit peak and floor: a constant multiplier 1 after the linear warmup.
    unit.learning_rate, unit.min_learning_rate = 1.0, 1.0
    unit.num_steps = max(config.max_steps, config.pilot_steps)
  loss_fn, nll = make_loss_fn(model), make_nll(model)  # One compiled NLL for both splits.
  return Setup(config, dataset, loss_fn, train_lib.optimizer(unit), params0,
               make_evaluator(nll, val_windows), make_evaluator(nll, train_windows),
               make_sharpness_fn(loss_fn, config.sharpness), {})


# ----------------------------------------------------------------------------------------------
# One run, the learning-rate search at one B, the pilot that sets the target.
# ----------------------------------------------------------------------------------------------


def train_to_target(setup: Setup, batch_size: int, lr: float, target: float,
                    max_steps: int) -> tuple[dict, dict]:
  """Trains from the shared initialization until the validation loss reaches `target` or `max_steps`.

  Returns (record, final params). The record holds the validation curve (at the geometric evaluation
  steps), the per-window sums of the two-batch noise estimates, and steps/examples to target.
  """
  c = setup.config
  if batch_size not in setup.steps:
    setup.steps[batch_size] = make_train_step(setup.loss_fn, setup.tx, batch_size,
                                              c.noise_microbatches)
  step_fn = setup.steps[batch_size]
  start = time.perf_counter()
  params, opt_state = setup.params0, setup.tx.init(setup.params0)
  noise = gn.noise_scale_init()
  val0 = setup.evaluate_val(params)
  curve = {"step": [0], "val_nll": [val0]}
  windows = {"step": [], "val_nll": [], "train_loss": [], "g_sq_sum": [], "trace_sum": [],
             "weight": []}
  status, next_eval, loss_sum, done = "step cap", 1, 0.0, 0
  for step in range(max_steps):
    inputs, targets = data_lib.train_batch(setup.dataset.train_ids, c.seq_len, batch_size, c.seed,
                                           step)
    params, opt_state, noise, loss = step_fn(params, opt_state, noise, inputs, targets, lr)
    loss_sum += loss
    done = step + 1
    if done < next_eval and done < max_steps:
      continue
    val = setup.evaluate_val(params)
    noise_host = jax.device_get(noise)
    curve["step"].append(done)
    curve["val_nll"].append(val)
    windows["step"].append(done)
    windows["val_nll"].append(val)
    windows["train_loss"].append(float(loss_sum) / float(noise_host.weight))
    windows["g_sq_sum"].append(float(noise_host.g_sq_sum))
    windows["trace_sum"].append(float(noise_host.trace_sum))
    windows["weight"].append(int(noise_host.weight))
    noise, loss_sum = gn.noise_scale_init(), 0.0
    if not math.isfinite(val) or val > val0 + _DIVERGED_NATS:
      status = "diverged"
      break
    if val <= target:
      status = "reached"
      break
    next_eval = next_eval_step(done, c.eval_growth)
  steps = crossing_step(curve["step"], curve["val_nll"], target) if status == "reached" else None
  record = {
      "batch_size": batch_size, "learning_rate": lr, "status": status, "reached": steps is not None,
      "steps_to_target": steps, "examples_to_target": None if steps is None else steps * batch_size,
      "stopped_at_step": done, "final_val_nll": curve["val_nll"][-1], "curve": curve,
      "noise": windows, "wall_time_s": time.perf_counter() - start,
  }
  return record, params


def _rank(record: dict) -> tuple:
  """Best first: runs that reached the target by steps, then the others by their last validation loss."""
  if record["reached"]:
    return (0, record["steps_to_target"])
  return (1, record["final_val_nll"] if math.isfinite(record["final_val_nll"]) else math.inf)


def tune_learning_rate(setup: Setup, batch_size: int, target: float, log=print):
  """Runs one B at its rule learning rate, or searches powers of lr_tune_factor around it ('tune').

  The search tries k = 0, +1, -1 (lr = rule * factor^k), then, while the best k is at an edge of
  those tried, one more k beyond it (at most lr_max_extend more). A run stops once it has taken as
  many steps as the best run so far at this B: it cannot be faster. Returns (records, best params).
  """
  c = setup.config
  center = rule_learning_rate(c, batch_size)
  runs = {}  # k -> (record, params)

  def run(k):
    best = min((r for r, _ in runs.values()), key=_rank, default=None)
    cap = c.max_steps
    if best is not None and best["reached"]:
      cap = min(cap, math.ceil(best["steps_to_target"]))
    record, params = train_to_target(setup, batch_size, center * c.lr_tune_factor**k, target, cap)
    record["lr_exponent"] = k
    runs[k] = (record, params)
    steps = (f"reached {target:.4f} at step {record['steps_to_target']:.1f} "
             f"({record['examples_to_target']:,.0f} examples)" if record["reached"]
             else f"{record['status']} at step {record['stopped_at_step']} "
             f"(val {record['final_val_nll']:.4f})")
    log(f"  B={batch_size:5d} lr {record['learning_rate']:.2e}: {steps} [{record['wall_time_s']:.1f} s]")

  if c.lr_rule != "tune":
    run(0)
  else:
    for k in (0, 1, -1):
      run(k)
    for _ in range(c.lr_max_extend):
      best_k = min(runs, key=lambda k: _rank(runs[k][0]))
      if best_k == max(runs):
        run(best_k + 1)
      elif best_k == min(runs):
        run(best_k - 1)
      else:
        break
  best_k = min(runs, key=lambda k: _rank(runs[k][0]))
  for k, (record, _) in runs.items():
    record["best_at_batch_size"] = k == best_k
  return [runs[k][0] for k in sorted(runs)], runs[best_k][1]


def pilot_target(setup: Setup, log=print) -> dict:
  """The target loss from a pilot run at the smallest B and its rule learning rate (see the config)."""
  c = setup.config
  b = min(c.batch_sizes)
  record, _ = train_to_target(setup, b, rule_learning_rate(c, b), -math.inf, c.pilot_steps)
  target = target_from_curve(record["curve"]["val_nll"], c.target_margin)
  log(f"pilot: B={b}, lr {record['learning_rate']:.2e}, {c.pilot_steps} steps: lowest 3-evaluation "
      f"mean validation loss {target - c.target_margin:.4f}; target {target:.4f} nats")
  return {"loss": target,
          "how": (f"Pilot run at the smallest batch B={b} with its rule learning rate "
                  f"{record['learning_rate']:.3g} for {c.pilot_steps} steps; target = its lowest "
                  f"3-evaluation running mean of the validation loss + {c.target_margin} nats. "
                  f"Steps-to-target fall with B, so every larger B can reach it within the "
                  f"{c.max_steps}-step cap."),
          "pilot": {"batch_size": b, "learning_rate": record["learning_rate"],
                    "steps": c.pilot_steps, "curve": record["curve"]}}


# ----------------------------------------------------------------------------------------------
# Measurements at a trained point: sharpness, training loss, per-example gradient variance.
# ----------------------------------------------------------------------------------------------


def make_sharpness_fn(loss_fn: Callable, sharpness_config) -> Callable:
  """A jitted (params, inputs_BxT, targets_BxT, key) -> sharpness measurements on that batch.

  Top Hessian eigenvalue of the mean loss by `lanczos_steps`-step Lanczos (and the bottom Ritz
  value), and Keskar et al.'s epsilon-sharpness by projected ascent in the box. One compilation
  serves every batch size of the sweep (same parameter and batch shapes).
  """
  s = sharpness_config

  @jax.jit
  def measure(params, inputs_BxT, targets_BxT, key):
    loss = lambda p: loss_fn(p, inputs_BxT, targets_BxT)
    ritz = sharpness_lib.hessian_lanczos(loss, params, key, s.lanczos_steps).ritz_values
    eps = sharpness_lib.epsilon_sharpness(loss, params, epsilon=s.epsilon, num_steps=s.ascent_steps)
    return {"hessian_top_eigenvalue": ritz[-1], "hessian_bottom_ritz_value": ritz[0],
            "epsilon_sharpness": eps.sharpness, "sharpness_batch_loss": eps.loss}

  return measure


def sharpness_record(setup: Setup, params: dict, batch: tuple, key: jax.Array) -> dict:
  """Top Hessian eigenvalue (Lanczos) and epsilon-sharpness of the mean loss on a fixed batch."""
  inputs, targets = batch
  return {k: float(v) for k, v in setup.sharpness(params, inputs, targets, key).items()}


def per_example_gradients(loss_fn: Callable, params: dict, inputs_NxT: np.ndarray,
                          targets_NxT: np.ndarray, chunk: int = 64) -> np.ndarray:
  """N x P matrix of per-window gradients g_i = grad of the mean NLL of window i (host memory)."""
  one = lambda p, example: loss_fn(p, example[0][None, :], example[1][None, :])
  flat = jax.jit(lambda p, x, y: gn.flatten_stacked(gn.per_example_grads(one, p, (x, y))))
  return np.concatenate([np.asarray(flat(params, inputs_NxT[i:i + chunk], targets_NxT[i:i + chunk]))
                         for i in range(0, len(inputs_NxT), chunk)])


def fresh_batch_variance(loss_fn: Callable, params: dict, ids: np.ndarray, seq_len: int,
                         seed: int, batch_sizes: list[int], num_batches: int,
                         max_sequences: int = 512) -> dict:
  """E|g_B - G|^2 from K independent mini-batches of fresh training windows per B (no resampling).

  For each B, K = `num_batches` batches of B windows are drawn from the training stream exactly as
  training draws them (`data.train_batch`, at step indices no run reaches, a different one per B);
  g_k is the gradient of the mean NLL of batch k. With m the mean of the K gradients,

    V_B = 1 / (K - 1) sum_k |g_k - m|^2

  is an unbiased estimate of E|g_B - G|^2 that needs no reference gradient G. Its standard error is
  estimated as the standard deviation of the K terms K/(K-1) |g_k - m|^2 over sqrt(K).
  Up to `max_sequences` sequences go through one vmapped gradient call.
  """
  one_batch = jax.grad(loss_fn)
  flat = jax.jit(jax.vmap(lambda p, x, y: ravel_pytree(one_batch(p, x, y))[0],
                          in_axes=(None, 0, 0)))
  variance, stderr = [], []
  for i, b in enumerate(batch_sizes):
    inputs, targets = data_lib.train_batch(ids, seq_len, num_batches * b, seed,
                                           _FRESH_BATCH_STEP + i)
    inputs_KxBxT = inputs.reshape(num_batches, b, seq_len)
    targets_KxBxT = targets.reshape(num_batches, b, seq_len)
    group = max(1, max_sequences // b)
    grads_KxP = np.concatenate(
        [np.asarray(flat(params, inputs_KxBxT[k:k + group], targets_KxBxT[k:k + group]), np.float64)
         for k in range(0, num_batches, group)])
    dev_K = np.sum(np.square(grads_KxP - grads_KxP.mean(axis=0)[None, :]), axis=1)
    dev_K *= num_batches / (num_batches - 1)
    variance.append(float(dev_K.mean()))
    stderr.append(float(dev_K.std(ddof=1) / np.sqrt(num_batches)))
  return {"batch_sizes": list(batch_sizes), "variance": variance, "stderr": stderr,
          "num_batches": num_batches}


def gradient_variance_record(setup: Setup, params: dict, key: jax.Array) -> dict:
  """The 1/B law of the mini-batch gradient variance at `params`, measured two ways.

  Measured (the headline): E|g_B - G|^2 from K independent mini-batches of fresh training windows
  per B (`fresh_batch_variance`), for B = 1, 2, ..., max(batch_sizes); its log-log slope. Predicted:
  tr(Sigma)/B with tr(Sigma) from N per-example gradients (one window each, independent of the
  mini-batches), so the comparison tests the law on the data, not an identity of resampling.
  For reference, mini-batches re-drawn from the N per-example gradients with replacement follow
  tr(Sigma_pop)/B by construction, and without replacement the finite-population law
  tr(Sigma_pop)/B (N - B)/(N - 1). B_simple = tr(Sigma) / |G|^2 with the unbiased
  |G|^2 ~= |mean g|^2 - tr(Sigma_unbiased) / N.
  """
  c = setup.config
  v = c.gradient_variance
  ids = setup.dataset.train_ids
  inputs, targets = data_lib.train_batch(ids, c.seq_len, v.num_examples, c.seed, _PER_EXAMPLE_STEP)
  grads_NxP = jnp.asarray(per_example_gradients(setup.loss_fn, params, inputs, targets))
  n, p = grads_NxP.shape
  trace_pop = float(gn.trace_covariance(grads_NxP, ddof=0))
  trace_unbiased = float(gn.trace_covariance(grads_NxP, ddof=1))
  g_sq = float(jnp.sum(jnp.square(jnp.mean(grads_NxP, axis=0)))) - trace_unbiased / n

  fresh_sizes = [2**i for i in range(int(math.log2(max(c.batch_sizes))) + 1)]  # 1, ..., max B
  fresh = fresh_batch_variance(setup.loss_fn, params, ids, c.seq_len, c.seed, fresh_sizes,
                               v.fresh_batches)
  slope, intercept = gn.loglog_slope(fresh_sizes, fresh["variance"])

  sizes = [2**i for i in range(int(math.log2(n)))]  # 1, 2, ..., N/2
  k_with, k_without = jax.random.split(key)
  with_repl = gn.minibatch_gradient_variance(grads_NxP, sizes, v.num_batches, k_with, replace=True)
  without = gn.minibatch_gradient_variance(grads_NxP, sizes, v.num_batches, k_without, replace=False)
  resampled_slope, _ = gn.loglog_slope(sizes, with_repl)
  return {
      "num_examples": n, "num_params": p,
      "fresh": {**fresh, "predicted": gn.expected_minibatch_variance(trace_unbiased,
                                                                      fresh_sizes).tolist()},
      "slope": slope, "intercept": intercept,
      "resampled": {
          "batch_sizes": sizes, "num_batches": v.num_batches,
          "variance_with_replacement": with_repl.tolist(),
          "variance_without_replacement": without.tolist(),
          "expected_with_replacement": gn.expected_minibatch_variance(trace_pop, sizes).tolist(),
          "expected_without_replacement": gn.expected_minibatch_variance(trace_pop, sizes,
                                                                         n).tolist(),
          "slope_with_replacement": resampled_slope},
      "trace_sigma_population": trace_pop, "trace_sigma_unbiased": trace_unbiased,
      "g_sq_unbiased": g_sq, "b_simple": trace_unbiased / g_sq if g_sq > 0 else None,
      "how": (f"For each B = 1, 2, ..., {fresh_sizes[-1]}: {v.fresh_batches} independent mini-batches "
              "of fresh random training windows (drawn as training draws them), E|g_B - G|^2 "
              "estimated without a reference G as the unbiased sample variance of their gradients; "
              "slope by least squares on log-log axes. Prediction tr(Sigma)/B from "
              f"{n} separate per-example gradients (one window each)."),
  }


# ----------------------------------------------------------------------------------------------
# The sweep, the fit, the report.
# ----------------------------------------------------------------------------------------------


def summarize_batch(setup: Setup, records: list[dict], params: dict, sharp_batch: tuple,
                    key: jax.Array) -> dict:
  """One row of the sweep: the best run at this B and the measurements at its final parameters.

  B_simple is averaged (numerator and denominator separately) over all steps of the best run, and
  over the second half of them ('late'), where the loss is near the target.
  """
  best = next(r for r in records if r["best_at_batch_size"])
  final_val = best["final_val_nll"]
  final_train = setup.evaluate_train(params)
  row = {"batch_size": best["batch_size"], "best_learning_rate": best["learning_rate"],
         "learning_rates_tried": [r["learning_rate"] for r in records],
         "reached": best["reached"], "steps_to_target": best["steps_to_target"],
         "examples_to_target": best["examples_to_target"], "stopped_at_step": best["stopped_at_step"],
         "final_val_nll": final_val, "final_train_nll": final_train,
         "generalization_gap": final_val - final_train}
  stop = best["steps_to_target"] or best["stopped_at_step"]
  for name, start in (("", 0.0), ("_late", stop / 2)):
    est = noise_scale_between(best["noise"], start, math.inf)
    row.update({f"b_simple{name}": est["b_simple"], f"g_sq{name}": est["g_sq"],
                f"trace_sigma{name}": est["trace_sigma"], f"noise_steps{name}": est["steps_averaged"]})
  row.update(sharpness_record(setup, params, sharp_batch, key))
  return row


def fit_tradeoff(sweep: list[dict]) -> dict | None:
  """McCandlish's S = S_min + E_min / B through the best steps-to-target of each B that reached it."""
  reached = [r for r in sweep if r["reached"]]
  if len({r["batch_size"] for r in reached}) < 2:
    return None
  b = [r["batch_size"] for r in reached]
  s = [r["steps_to_target"] for r in reached]
  fit = gn.fit_steps_examples_tradeoff(b, s)
  predicted = gn.tradeoff_steps(np.asarray(b), fit.s_min, fit.e_min)
  return {"s_min": fit.s_min, "e_min": fit.e_min, "b_crit": fit.b_crit, "batch_sizes": b,
          "rms_log_residual": float(np.sqrt(np.mean(np.log(np.asarray(s) / predicted) ** 2))),
          "how": ("S = S_min + E_min / B fitted to the best steps-to-target of each B that reached "
                  "the target (linear least squares on 1 = S_min/S + E_min/E, then Levenberg-Marquardt "
                  "on log S); B_crit = E_min / S_min")}


def scaling_regimes(sweep: list[dict], fit: dict | None) -> dict | None:
  """Speed-up S(B) / S(2B) of each doubling between reached batch sizes, at the small and large end.

  Perfect scaling is a speed-up of 2 (examples to target unchanged); diminishing returns, a speed-up
  near 1 (S near S_min). The fit gives the same in closed form: E(B) / E_min = 1 + B / B_crit.
  """
  reached = [r for r in sweep if r["reached"]]
  doublings = [{"from": a["batch_size"], "to": b["batch_size"],
                "speedup": a["steps_to_target"] / b["steps_to_target"],
                "examples_ratio": b["examples_to_target"] / a["examples_to_target"]}
               for a, b in zip(reached, reached[1:]) if b["batch_size"] == 2 * a["batch_size"]]
  if not doublings:
    return None
  out = {"doublings": doublings, "small": doublings[0], "large": doublings[-1]}
  if fit:
    out["excess_examples_small"] = doublings[0]["from"] / fit["b_crit"]
    out["excess_examples_large"] = doublings[-1]["to"] / fit["b_crit"]
  return out


def _fmt(x, spec: str, missing: str = "-") -> str:
  return missing if x is None else format(x, spec)


def markdown_report(results: dict) -> str:
  t, fit, ns, gv = results["target"], results["fit"], results["noise_scale"], results["gradient_variance"]
  ev, floors = results["evaluation"], results["floor"]
  lines = [
      f"# Batch size: {results['data']}", "",
      f"Model: {results['model']['description']}, {results['model']['params']:,} parameters. "
      f"Optimizer: Adam, constant learning rate after {results['config']['warmup_steps']} warmup "
      f"steps; learning rate per B: {results['lr_protocol']}.", "",
      f"Target validation loss: **{t['loss']:.4f} nats/token**. {t['how']} Losses are measured on "
      f"the first {ev['tokens_scored']:,} tokens of each split in independent windows (context "
      f"{ev['context_min']}-{ev['context_max']}), training loss on the same windowing of the "
      "training split." + (f" True-model floor on those tokens: validation {floors['val']:.4f}, "
                           f"training {floors['train']:.4f}." if floors else ""), "",
      "| B | best lr | lrs tried | steps to target | examples to target | speed-up vs B/2 | "
      "final train NLL | final val NLL | gap (val - train) |"
      + (" gap net of floors |" if floors else "")
      + " top Hessian eig | eps-sharpness | B_simple (all steps) | B_simple (2nd half) |",
      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if floors else "")
      + "---:|---:|---:|---:|",
  ]
  prev = None
  for r in results["sweep"]:
    steps = f"{r['steps_to_target']:.1f}" if r["reached"] else f"> {r['stopped_at_step']} (not reached)"
    examples = f"{r['examples_to_target']:,.0f}" if r["reached"] else "-"
    speedup = (f"{prev['steps_to_target'] / r['steps_to_target']:.2f}x"
               if prev and prev["reached"] and r["reached"] else "-")
    gap = r["generalization_gap"]  # None in a results.json where it was NaN (a diverged run)
    net = (f" {_fmt(None if gap is None else gap - (floors['val'] - floors['train']), '+.4f')} |"
           if floors else "")
    lines.append(
        f"| {r['batch_size']} | {r['best_learning_rate']:.2e} | {len(r['learning_rates_tried'])} | "
        f"{steps} | {examples} | {speedup} | {_fmt(r['final_train_nll'], '.4f')} | "
        f"{_fmt(r['final_val_nll'], '.4f')} | {_fmt(gap, '+.4f')} |{net} "
        f"{_fmt(r['hessian_top_eigenvalue'], '.3g')} | {_fmt(r['epsilon_sharpness'], '.3g')} | "
        f"{_fmt(r['b_simple'], '.1f')} | {_fmt(r['b_simple_late'], '.1f')} |")
    prev = r
  lines.append("")
  unreached = [r["batch_size"] for r in results["sweep"] if not r["reached"]]
  if unreached:
    lines += [f"Not reached within the step cap: B = {unreached} (left out of the fit).", ""]
  if fit:
    lines += [
        f"**Fit** (McCandlish et al. 2018, S = S_min (1 + B_crit/B), E = E_min (1 + B/B_crit)): "
        f"S_min = {fit['s_min']:.1f} steps, E_min = {fit['e_min']:,.0f} sequences, "
        f"**B_crit = {fit['b_crit']:.1f}** sequences (rms log residual {fit['rms_log_residual']:.3f}).",
        "",
        f"**B_simple** measured during training ({ns['how']}): **{_fmt(ns['b_simple'], '.1f')}**; "
        f"B_crit / B_simple = {_fmt(ns['b_simple'] and fit['b_crit'] / ns['b_simple'], '.2f')}. "
        f"Over the second half of the steps only (near the target): "
        f"{_fmt(ns['b_simple_late'], '.1f')}.", ""]
  reg = results.get("regimes")
  if reg:
    sm, lg = reg["small"], reg["large"]
    words = (f"**Regimes.** Small B: doubling B from {sm['from']} to {sm['to']} cuts the steps to "
             f"target {sm['speedup']:.2f}x (perfect scaling: 2x) while the examples to target change "
             f"{sm['examples_ratio']:.2f}x (perfect scaling: 1x). Large B: doubling from {lg['from']} "
             f"to {lg['to']} cuts the steps {lg['speedup']:.2f}x and multiplies the examples "
             f"{lg['examples_ratio']:.2f}x (diminishing returns: 1x and 2x).")
    if fit:
      words += (f" By the fit, B = {sm['from']} needs {100 * reg['excess_examples_small']:.0f}% more "
                f"examples than E_min and B = {lg['to']} needs {100 * reg['excess_examples_large']:.0f}% "
                f"more (E / E_min - 1 = B / B_crit); steps approach S_min = {fit['s_min']:.0f}.")
    lines += [words, ""]
  if gv:
    fresh, rs = gv["fresh"], gv["resampled"]
    lines += [
        f"**Gradient variance vs B** at a fixed checkpoint ({gv['checkpoint']}): fitted log-log slope "
        f"**{gv['slope']:.3f}** (theory -1, |slope + 1| = {abs(gv['slope'] + 1):.3f}). {gv['how']} "
        f"tr(Sigma) = {gv['trace_sigma_unbiased']:.4g}, |G|^2 = {gv['g_sq_unbiased']:.4g}, "
        f"per-example B_simple = {_fmt(gv['b_simple'], '.1f')}.", "",
        "| B | E\\|g_B - G\\|^2, fresh batches (+- s.e.) | tr(Sigma) / B (per-example) | measured / "
        "predicted |", "|---:|---:|---:|---:|"]
    for b, var, se, pred in zip(fresh["batch_sizes"], fresh["variance"], fresh["stderr"],
                                fresh["predicted"]):
      lines.append(f"| {b} | {var:.4g} +- {se:.2g} | {pred:.4g} | {var / pred:.3f} |")
    lines += [
        "", f"Re-drawing mini-batches from the {gv['num_examples']} per-example gradients "
        f"({rs['num_batches']} per B) follows tr(Sigma_pop)/B by construction with replacement "
        f"(slope {rs['slope_with_replacement']:.3f}); without replacement it follows the "
        "finite-population law tr(Sigma_pop)/B (N - B)/(N - 1), e.g. at B = "
        f"{rs['batch_sizes'][-1]}: {rs['variance_without_replacement'][-1]:.4g} measured, "
        f"{rs['expected_without_replacement'][-1]:.4g} predicted, "
        f"{rs['expected_with_replacement'][-1]:.4g} without the correction.", ""]
  lines += [f"{results['runs_total']} training runs, {results['examples_total']:,} training "
            f"sequences in all; {results['wall_time_s']:.0f} s wall."]
  return "\n".join(lines) + "\n"


def run_experiment(config, workdir: str, log=print) -> dict:
  """The whole sweep on `config` (checked by `check_config`); writes results and figures to `workdir`."""
  start = time.time()
  dataset = common.load_dataset(config, workdir)
  t = config.seq_len
  val_windows = data_lib.eval_windows(dataset.val_ids[:config.eval_tokens + 1], t)
  train_windows = data_lib.eval_windows(dataset.train_ids[:config.eval_tokens + 1], t)
  setup = make_setup(config, dataset, val_windows, train_windows)
  n_params = flops_lib.count_params(setup.params0)
  log(f"data: {dataset.description}; vocabulary {dataset.vocab_size}; model {n_params:,} parameters")
  floors = None
  if dataset.source is not None:
    floors = {"val": floor_nll(dataset.source, dataset.val_ids, val_windows),
              "train": floor_nll(dataset.source, dataset.train_ids, train_windows)}

  if config.target_loss:
    target = {"loss": float(config.target_loss), "how": "Set by --config.target_loss.", "pilot": None}
  else:
    target = pilot_target(setup, log)
  sharp_batch = (train_windows.inputs_NxT[:config.sharpness.batch],
                 train_windows.targets_NxT[:config.sharpness.batch])
  key = jax.random.PRNGKey(config.seed)
  runs, sweep, variance = [], [], None
  for b in config.batch_sizes:
    records, params = tune_learning_rate(setup, b, target["loss"], log)
    runs += records
    sweep.append(summarize_batch(setup, records, params, sharp_batch, jax.random.fold_in(key, b)))
    if b == config.gradient_variance.checkpoint_batch:
      variance = gradient_variance_record(setup, params, jax.random.fold_in(key, 0))
      best = sweep[-1]
      variance["checkpoint"] = (f"best run at B={b}, lr {best['best_learning_rate']:.2e}, step "
                                f"{best['stopped_at_step']}, validation loss {best['final_val_nll']:.4f}")
      log(f"gradient variance at the {variance['checkpoint']}: log-log slope {variance['slope']:.3f}")

  fit = fit_tradeoff(sweep)
  regimes = scaling_regimes(sweep, fit)
  median = lambda key: (float(np.median([r[key] for r in sweep if r[key]]))
                        if any(r[key] for r in sweep) else None)
  mcfg = train_lib.model_config(config, dataset.vocab_size)
  results = {
      "experiment": "batch_size",
      "data": dataset.description,
      "model": {"params": n_params, "description": (
          f"{mcfg.num_layers}-layer Transformer, d_model {mcfg.d_model}, {mcfg.num_heads} heads, "
          f"d_ff {mcfg.d_ff}, context {t}")},
      "evaluation": {"split": "validation", **val_windows.describe(), "seq_len": t,
                     "schedule": f"steps 1, 2, ... then x{config.eval_growth} apart"},
      "floor": floors,
      "lr_protocol": (f"powers of {config.lr_tune_factor:g} around the sqrt rule "
                      f"{config.learning_rate:g} (B/{config.lr_reference_batch})^0.5, best = fewest "
                      "steps to target" if config.lr_rule == "tune" else
                      f"the {config.lr_rule} rule {config.learning_rate:g} "
                      f"(B/{config.lr_reference_batch})^{LR_RULES[config.lr_rule]:g}"),
      "target": target,
      "sweep": sweep,
      "fit": fit,
      "regimes": regimes,
      "noise_scale": {"b_simple": median("b_simple"), "b_simple_late": median("b_simple_late"),
                      "how": ("two-batch estimator every step with B_small = B / M (micro-batches "
                              "of the step's batch) and B_big = B; |G|^2 and tr(Sigma) averaged "
                              "separately over all steps of each B's best run, ratio last; median "
                              "over B")},
      "gradient_variance": variance,
      "runs": runs,
      "runs_total": len(runs) + (1 if target["pilot"] else 0),
      "examples_total": int(sum(r["stopped_at_step"] * r["batch_size"] for r in runs)
                            + (config.pilot_steps * min(config.batch_sizes) if target["pilot"] else 0)),
      "wall_time_s": time.time() - start,
      "config": json.loads(config.to_json_best_effort()),
  }
  if common.is_primary():
    results["figures"] = plot_batch_size.plot_all(results, workdir)
    report = markdown_report(results)
    common.write_results(workdir, results, report)
    log(report)
    if fit:
      log(f"B_crit (fit) = {fit['b_crit']:.1f}   B_simple (measured) = "
          f"{_fmt(results['noise_scale']['b_simple'], '.1f')}")
    if variance:
      log(f"gradient variance log-log slope = {variance['slope']:.3f} (theory -1)")
    log(f"wrote results.json, results.md, {', '.join(results['figures'])} to {workdir} "
        f"({time.time() - start:.0f} s)")
  return results


def main(argv):
  del argv
  config = common.config_from_flags()
  check_config(config)
  run_experiment(config, common.prepare_workdir(config))


if __name__ == "__main__":
  common.run(main, "batch_size.py")
