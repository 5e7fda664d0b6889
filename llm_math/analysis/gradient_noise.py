"""Gradient noise and the critical batch size of SGD.

Setting. A loss is an average of per-example losses, L(w) = E_x[l(w; x)]. Write g_i = grad l(w; x_i)
for a per-example gradient, G = E[g_i] for the full gradient and Sigma = Cov[g_i] for the
per-example gradient covariance (P x P, P = number of parameters). The mini-batch gradient
g_B = (1/B) sum_{i in batch} g_i then has E[g_B] = G and

  E|g_B - G|^2 = tr(Sigma) / B                          (i.i.d. draws / with replacement),
  E|g_B - G|^2 = tr(Sigma) / B * (N - B) / (N - 1)      (B of a population of N, no replacement),

where, in the second line, Sigma is the population covariance (normalised by N). The first law is a
straight line of slope -1 on log-log axes; the finite-population correction bends it down to
exactly 0 at B = N.

Noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"). Since
E|g_B|^2 = |G|^2 + tr(Sigma)/B, the squared norms at two batch sizes B_small < B_big give the
unbiased estimators

  |G|^2     ~= (B_big |g_Bbig|^2 - B_small |g_Bsmall|^2) / (B_big - B_small),
  tr(Sigma) ~= (|g_Bsmall|^2 - |g_Bbig|^2) / (1/B_small - 1/B_big),

and the simple noise scale is B_simple = tr(Sigma) / |G|^2. Both one-step estimators are very noisy
(the |G|^2 one is often negative), and a ratio of noisy unbiased estimators is biased:
E[X/Y] != E[X]/E[Y] (for independent X and positive Y, Jensen gives E[1/Y] > 1/E[Y]), and the ratio
blows up whenever the denominator comes near zero. So numerator and denominator are averaged over
steps separately and divided only at read-out. In data-parallel training B_small is the per-device
batch and B_big the global batch: the per-device gradient norms come for free before the all-reduce.

Steps/examples trade-off (same paper). Training to a fixed loss with batch size B takes S steps and
E = B S examples, with (S/S_min - 1)(E/E_min - 1) = 1, equivalently S = S_min (1 + B_crit/B) and
E = E_min (1 + B/B_crit), with the critical batch size B_crit = E_min / S_min.
"""
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np

PyTree = Any


# ----------------------------------------------------------------------------------------------
# Per-example and micro-batch gradients.
# ----------------------------------------------------------------------------------------------


def per_example_grads(loss_fn: Callable[[PyTree, PyTree], jax.Array], params: PyTree,
                      batch: PyTree) -> PyTree:
  """Per-example gradients g_i = grad_w l(w; x_i) via vmap(grad).

  Args:
    loss_fn: `loss_fn(params, example) -> scalar` for a single example (no batch axis).
    params: parameter pytree.
    batch: pytree whose leaves all share a leading axis of size N.

  Returns:
    A pytree shaped like `params` with an extra leading axis of size N.
  """
  return jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, batch)


def microbatch_grads(loss_fn: Callable[[PyTree, PyTree], jax.Array], params: PyTree, batch: PyTree,
                     num_microbatches: int) -> PyTree:
  """Gradients of the mean loss over each of M contiguous micro-batches of size N / M.

  The m-th result is (M/N) sum_{i in micro-batch m} g_i, i.e. a mini-batch gradient of size N / M.

  Args:
    loss_fn: `loss_fn(params, example) -> scalar` for a single example.
    params: parameter pytree.
    batch: pytree whose leaves share a leading axis of size N, divisible by `num_microbatches`.
    num_microbatches: M.

  Returns:
    A pytree shaped like `params` with an extra leading axis of size M.
  """
  leaves = jax.tree_util.tree_leaves(batch)
  if not leaves:
    raise ValueError("batch: expected at least one array leaf")
  n = leaves[0].shape[0]
  if num_microbatches < 1 or n % num_microbatches:
    raise ValueError(f"num_microbatches: expected a positive divisor of the batch size {n}, "
                     f"got {num_microbatches}")
  size = n // num_microbatches
  batch_MxS = jax.tree_util.tree_map(
      lambda x: x.reshape((num_microbatches, size) + x.shape[1:]), batch)

  def mean_loss(p, micro):
    return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(p, micro))

  return jax.vmap(jax.grad(mean_loss), in_axes=(None, 0))(params, batch_MxS)


def flatten_stacked(grads: PyTree) -> jax.Array:
  """Stacked gradient pytree (leading axis N) as an N x P matrix, P = total parameter count."""
  return jax.vmap(lambda g: ravel_pytree(g)[0])(grads)


def tree_sq_norm(tree: PyTree) -> jax.Array:
  """Squared Euclidean norm of a pytree, sum over all leaves of sum(x^2)."""
  return sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree))


# ----------------------------------------------------------------------------------------------
# Variance of the mini-batch gradient as a function of B.
# ----------------------------------------------------------------------------------------------


def trace_covariance(grads_NxP: jax.Array, ddof: int = 0) -> jax.Array:
  """tr(Sigma) = sum_p Var_i[g_ip] of N gradient samples (rows).

  ddof=0 is the population covariance of a finite population (the Sigma of the finite-population
  law); ddof=1 is the unbiased estimate of the covariance of the distribution the rows came from.
  """
  if grads_NxP.ndim != 2 or grads_NxP.shape[0] <= ddof:
    raise ValueError(f"grads_NxP: expected a 2-D array with more than ddof={ddof} rows, "
                     f"got shape {grads_NxP.shape}")
  centered_NxP = grads_NxP - jnp.mean(grads_NxP, axis=0)[None, :]
  return jnp.sum(jnp.square(centered_NxP)) / (grads_NxP.shape[0] - ddof)


def finite_population_correction(population_size: int, batch_size: int | np.ndarray) -> np.ndarray:
  """(N - B) / (N - 1): variance factor of a size-B mean drawn without replacement from N items."""
  if population_size < 2:
    raise ValueError(f"population_size: expected >= 2, got {population_size}")
  b = np.asarray(batch_size, dtype=np.float64)
  if np.any(b < 1) or np.any(b > population_size):
    raise ValueError(f"batch_size: expected values in [1, {population_size}], got {batch_size}")
  return (population_size - b) / (population_size - 1)


def expected_minibatch_variance(trace_sigma: float, batch_size: int | np.ndarray,
                                population_size: int | None = None) -> np.ndarray:
  """E|g_B - G|^2 = tr(Sigma)/B, times (N - B)/(N - 1) when sampling B of N without replacement."""
  b = np.asarray(batch_size, dtype=np.float64)
  if np.any(b < 1):
    raise ValueError(f"batch_size: expected values >= 1, got {batch_size}")
  var = trace_sigma / b
  if population_size is not None:
    var = var * finite_population_correction(population_size, b)
  return var


def minibatch_sq_deviations(grads_NxP: jax.Array, batch_size: int, num_batches: int,
                            key: jax.Array, replace: bool = True) -> jax.Array:
  """|g_B - G|^2 for K independent mini-batches drawn from N per-example gradients.

  G is the population mean of the rows. Each mini-batch is a draw of `batch_size` rows, with or
  without replacement within the batch; the K batches are independent. The batch means are formed
  as a K x N count matrix times the centred gradients, so memory is O(K N + K P), not O(K B P).

  Args:
    grads_NxP: per-example gradients, one row per example.
    batch_size: B.
    num_batches: K.
    key: PRNG key.
    replace: sample with replacement (the 1/B law) or without (the finite-population law).

  Returns:
    The K squared deviations, shape [K]; their mean estimates E|g_B - G|^2.
  """
  if grads_NxP.ndim != 2:
    raise ValueError(f"grads_NxP: expected a 2-D array, got shape {grads_NxP.shape}")
  n = grads_NxP.shape[0]
  if batch_size < 1 or (not replace and batch_size > n):
    bound = f"[1, {n}]" if not replace else ">= 1"
    raise ValueError(f"batch_size: expected {bound}, got {batch_size}")
  if num_batches < 1:
    raise ValueError(f"num_batches: expected >= 1, got {num_batches}")
  return _minibatch_sq_deviations(grads_NxP, batch_size, num_batches, key, replace)


@functools.partial(jax.jit, static_argnums=(1, 2, 4))
def _minibatch_sq_deviations(grads_NxP: jax.Array, batch_size: int, num_batches: int,
                             key: jax.Array, replace: bool) -> jax.Array:
  n = grads_NxP.shape[0]
  if replace:
    idx_KxB = jax.random.randint(key, (num_batches, batch_size), 0, n)
  else:
    # The B largest of N i.i.d. uniforms sit at a uniformly random B-subset of positions.
    _, idx_KxB = jax.lax.top_k(jax.random.uniform(key, (num_batches, n)), batch_size)
  counts_KxN = jnp.zeros((num_batches, n), grads_NxP.dtype).at[
      jnp.arange(num_batches)[:, None], idx_KxB].add(1.0)
  centered_NxP = grads_NxP - jnp.mean(grads_NxP, axis=0)[None, :]
  dev_KxP = jnp.matmul(counts_KxN, centered_NxP, precision=jax.lax.Precision.HIGHEST) / batch_size
  return jnp.sum(jnp.square(dev_KxP), axis=1)


def minibatch_gradient_variance(grads_NxP: jax.Array, batch_sizes: Sequence[int], num_batches: int,
                                key: jax.Array, replace: bool = True) -> np.ndarray:
  """Monte-Carlo E|g_B - G|^2 for each B in `batch_sizes`, from K = `num_batches` batches each."""
  keys = jax.random.split(key, len(batch_sizes))
  return np.array([
      float(jnp.mean(minibatch_sq_deviations(grads_NxP, int(b), num_batches, k, replace)))
      for b, k in zip(batch_sizes, keys)
  ])


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
  """Least-squares fit log y = slope * log x + intercept; returns (slope, intercept).

  For y = E|g_B - G|^2 against x = B with replacement the slope is -1.
  """
  x_arr, y_arr = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x_arr.shape != y_arr.shape or x_arr.ndim != 1 or x_arr.size < 2:
    raise ValueError(f"x, y: expected equal 1-D shapes with >= 2 points, got {x_arr.shape}, "
                     f"{y_arr.shape}")
  if np.any(x_arr <= 0) or np.any(y_arr <= 0):
    raise ValueError("x, y: expected strictly positive values for a log-log fit")
  slope, intercept = np.polyfit(np.log(x_arr), np.log(y_arr), 1)
  return float(slope), float(intercept)


# ----------------------------------------------------------------------------------------------
# McCandlish et al. simple noise scale.
# ----------------------------------------------------------------------------------------------


def _check_batch_sizes(batch_size_small: float, batch_size_big: float) -> None:
  if not 0 < batch_size_small < batch_size_big:
    raise ValueError("batch_size_small, batch_size_big: expected 0 < small < big, got "
                     f"{batch_size_small}, {batch_size_big}")


def two_batch_estimates(sq_norm_small: jax.Array, sq_norm_big: jax.Array, batch_size_small: float,
                        batch_size_big: float) -> tuple[jax.Array, jax.Array]:
  """Unbiased one-step estimates (|G|^2, tr(Sigma)) from |g_Bsmall|^2 and |g_Bbig|^2.

  From E|g_B|^2 = |G|^2 + tr(Sigma)/B at the two batch sizes:
    |G|^2     = (B_big |g_big|^2 - B_small |g_small|^2) / (B_big - B_small),
    tr(Sigma) = (|g_small|^2 - |g_big|^2) / (1/B_small - 1/B_big).
  `sq_norm_small` may be an average of several small-batch squared norms (e.g. over devices).
  """
  _check_batch_sizes(batch_size_small, batch_size_big)
  g_sq = ((batch_size_big * sq_norm_big - batch_size_small * sq_norm_small)
          / (batch_size_big - batch_size_small))
  trace_sigma = (sq_norm_small - sq_norm_big) / (1.0 / batch_size_small - 1.0 / batch_size_big)
  return g_sq, trace_sigma


def simple_noise_scale(trace_sigma: jax.Array, g_sq: jax.Array) -> jax.Array:
  """B_simple = tr(Sigma) / |G|^2."""
  return trace_sigma / g_sq


class NoiseScaleState(NamedTuple):
  """Running (discounted) sums of the one-step estimates; a pytree, so it can live in a train state.

  With decay d, each sum is S_t = d S_{t-1} + x_t and weight W_t = d W_{t-1} + 1; S_t / W_t is the
  bias-corrected exponential moving average (d < 1) or the plain mean (d = 1).
  """
  g_sq_sum: jax.Array
  trace_sum: jax.Array
  weight: jax.Array


def noise_scale_init(dtype: Any = jnp.float32) -> NoiseScaleState:
  """Empty accumulator (all zeros)."""
  zero = jnp.zeros((), dtype)
  return NoiseScaleState(zero, zero, zero)


def noise_scale_update(state: NoiseScaleState, shard_sq_norms_D: jax.Array,
                       global_sq_norm: jax.Array, batch_size_small: float, batch_size_big: float,
                       decay: float = 0.99) -> NoiseScaleState:
  """Folds one step's gradient norms into the accumulator; jit-friendly (batch sizes, decay static).

  Args:
    state: accumulator.
    shard_sq_norms_D: |g_d|^2 of each of the D per-device (per-shard) gradients, each a mean over
      `batch_size_small` examples, taken before the all-reduce. Their mean estimates E|g_Bsmall|^2.
    global_sq_norm: |g|^2 of the all-reduced gradient, a mean over `batch_size_big` examples.
    batch_size_small: per-device batch size B_small.
    batch_size_big: global batch size B_big (= D * B_small for equal shards).
    decay: d in (0, 1]; 1 gives the plain mean over all steps so far.

  Returns:
    The updated accumulator.
  """
  if not 0.0 < decay <= 1.0:
    raise ValueError(f"decay: expected in (0, 1], got {decay}")
  shard_sq_norms_D = jnp.asarray(shard_sq_norms_D)
  if shard_sq_norms_D.ndim != 1:
    raise ValueError("shard_sq_norms_D: expected a 1-D array, got shape "
                     f"{shard_sq_norms_D.shape}")
  g_sq, trace_sigma = two_batch_estimates(jnp.mean(shard_sq_norms_D), global_sq_norm,
                                          batch_size_small, batch_size_big)
  dtype = state.weight.dtype
  return NoiseScaleState(
      g_sq_sum=decay * state.g_sq_sum + jnp.asarray(g_sq, dtype),
      trace_sum=decay * state.trace_sum + jnp.asarray(trace_sigma, dtype),
      weight=decay * state.weight + 1.0,
  )


def noise_scale_estimates(state: NoiseScaleState) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(|G|^2, tr(Sigma), B_simple) from the accumulator: averages first, ratio last (NaN if none)."""
  g_sq = state.g_sq_sum / state.weight
  trace_sigma = state.trace_sum / state.weight
  return g_sq, trace_sigma, simple_noise_scale(trace_sigma, g_sq)


def shard_sq_norms(local_grads: PyTree, global_grads: PyTree,
                   axis_name: str) -> tuple[jax.Array, jax.Array]:
  """Inside a mapped data-parallel step: (|g_d|^2 for all D shards, |g|^2 of the reduced gradient).

  `local_grads` are this device's gradients before the all-reduce, `global_grads` after it
  (e.g. `jax.lax.pmean(local_grads, axis_name)`). Costs one all-gather of a scalar.
  """
  return jax.lax.all_gather(tree_sq_norm(local_grads), axis_name), tree_sq_norm(global_grads)


# ----------------------------------------------------------------------------------------------
# Steps / examples trade-off and the critical batch size.
# ----------------------------------------------------------------------------------------------


class TradeoffFit(NamedTuple):
  """Fitted (S/S_min - 1)(E/E_min - 1) = 1 curve; b_crit = e_min / s_min."""
  s_min: float
  e_min: float
  b_crit: float


def tradeoff_steps(batch_size: float | np.ndarray, s_min: float, e_min: float) -> np.ndarray:
  """Predicted steps S(B) = S_min + E_min / B = S_min (1 + B_crit / B)."""
  return s_min + e_min / np.asarray(batch_size, np.float64)


def tradeoff_examples(batch_size: float | np.ndarray, s_min: float, e_min: float) -> np.ndarray:
  """Predicted examples E(B) = B S(B) = E_min + S_min B = E_min (1 + B / B_crit)."""
  return e_min + s_min * np.asarray(batch_size, np.float64)


def tradeoff_steps_for_examples(examples: float | np.ndarray, s_min: float,
                                e_min: float) -> np.ndarray:
  """The S-E frontier S(E) = S_min / (1 - E_min / E), defined for E > E_min (inf at E <= E_min)."""
  e = np.asarray(examples, np.float64)
  with np.errstate(divide="ignore"):
    return np.where(e > e_min, s_min / np.maximum(1.0 - e_min / e, 0.0), np.inf)


def fit_steps_examples_tradeoff(batch_sizes: Sequence[float], steps: Sequence[float],
                                refine: bool = True, max_iters: int = 100) -> TradeoffFit:
  """Fits S_min, E_min to measured (B, S) pairs (steps S to reach a fixed loss at batch size B).

  Linearisation: (S/S_min - 1)(E/E_min - 1) = 1 with E = B S is 1 = S_min / S + E_min / E, linear in
  (S_min, E_min); solved by least squares (each equation is a relative residual of S). Refinement:
  Levenberg-Marquardt on sum_i (log S_i - log(S_min + E_min / B_i))^2 over (log S_min, log E_min),
  i.e. multiplicative errors in the measured steps and positive parameters.

  Args:
    batch_sizes: B_i > 0, at least two distinct values.
    steps: S_i > 0.
    refine: run the log-space refinement after the linear fit.
    max_iters: maximum refinement iterations.

  Returns:
    TradeoffFit(s_min, e_min, b_crit).
  """
  b = np.asarray(batch_sizes, np.float64)
  s = np.asarray(steps, np.float64)
  if b.shape != s.shape or b.ndim != 1 or np.unique(b).size < 2:
    raise ValueError("batch_sizes, steps: expected equal 1-D shapes with >= 2 distinct batch "
                     f"sizes, got {b.shape}, {s.shape}")
  if np.any(b <= 0) or np.any(s <= 0):
    raise ValueError("batch_sizes, steps: expected strictly positive values")
  e = b * s
  design = np.stack([1.0 / s, 1.0 / e], axis=1)
  (s_min, e_min), *_ = np.linalg.lstsq(design, np.ones_like(s), rcond=None)
  # Noise can push the linear solution out of the positive quadrant; restart from a safe point.
  if s_min <= 0:
    s_min = 0.5 * s.min()
  if e_min <= 0:
    e_min = 0.5 * e.min()
  if refine:
    s_min, e_min = _refine_log_fit(b, s, s_min, e_min, max_iters)
  return TradeoffFit(float(s_min), float(e_min), float(e_min / s_min))


def _refine_log_fit(b: np.ndarray, s: np.ndarray, s_min: float, e_min: float,
                    max_iters: int) -> tuple[float, float]:
  """Levenberg-Marquardt on the log residuals of S = S_min + E_min / B in (log S_min, log E_min)."""
  theta = np.log([s_min, e_min])

  def residuals(th):
    return np.log(np.exp(th[0]) + np.exp(th[1]) / b) - np.log(s)

  cost = np.sum(residuals(theta) ** 2)
  damping = 1e-3
  for _ in range(max_iters):
    s_hat, e_hat = np.exp(theta)
    pred = s_hat + e_hat / b
    jac = np.stack([s_hat / pred, e_hat / b / pred], axis=1)
    r = np.log(pred) - np.log(s)
    jtj, jtr = jac.T @ jac, jac.T @ r
    improved = False
    while damping < 1e10:
      step = np.linalg.solve(jtj + damping * np.diag(np.diag(jtj) + 1e-12), -jtr)
      new_cost = np.sum(residuals(theta + step) ** 2)
      if new_cost <= cost:
        theta, damping, improved = theta + step, damping / 3.0, True
        break
      damping *= 3.0
    if not improved or np.max(np.abs(step)) < 1e-12 or cost - new_cost <= 1e-15 * max(cost, 1e-300):
      if improved:
        cost = new_cost
      break
    cost = new_cost
  return float(np.exp(theta[0])), float(np.exp(theta[1]))
