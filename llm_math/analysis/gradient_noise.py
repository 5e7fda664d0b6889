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
With gradient accumulation B_small is the micro-batch: `llm_math.train` logs the window means of both
squared norms, and `noise_windows` turns its log records into the estimates.

Steps/examples trade-off (same paper). Training to a fixed loss with batch size B takes S steps and
E = B S examples, with (S/S_min - 1)(E/E_min - 1) = 1, equivalently S = S_min (1 + B_crit/B) and
E = E_min (1 + B/B_crit), with the critical batch size B_crit = E_min / S_min.
"""
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
from scipy import optimize

from llm_math.analysis import intervals

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


@functools.partial(jax.jit, static_argnums=0)
def _flat_per_example_grads(loss_fn, params, batch):
  one = lambda p, example: loss_fn(p, jax.tree_util.tree_map(lambda x: x[None], example))
  return flatten_stacked(per_example_grads(one, params, batch))


def per_example_grad_chunks(loss_fn: Callable[[PyTree, PyTree], jax.Array], params: PyTree,
                            batch: PyTree, chunk: int = 128):
  """Yields (first example, n x P numpy) per-example gradients, `chunk` examples at a time.

  g_i = grad_w loss_fn(w, example i as a batch of 1): `loss_fn(params, batch)` takes a batch (leaves
  with a leading axis N), e.g. the mean NLL of a batch of windows. The last chunk is padded to the
  full size, so one compilation serves every call with the same `loss_fn` object and shapes.
  """
  n = jax.tree_util.tree_leaves(batch)[0].shape[0]
  for start in range(0, n, chunk):
    rows = np.minimum(np.arange(start, start + chunk), n - 1)  # Padding repeats the last example.
    part = jax.tree_util.tree_map(lambda x: np.asarray(x)[rows], batch)
    yield start, np.asarray(_flat_per_example_grads(loss_fn, params, part))[:n - start]


def per_example_grad_matrix(loss_fn: Callable[[PyTree, PyTree], jax.Array], params: PyTree,
                            batch: PyTree, chunk: int = 128) -> np.ndarray:
  """N x P matrix (numpy) of the per-example gradients of `per_example_grad_chunks`."""
  return np.concatenate([g for _, g in per_example_grad_chunks(loss_fn, params, batch, chunk)])


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

  For y = E|g_B - G|^2 against x = B with replacement the slope is -1. `loglog_fit` adds bootstrap
  intervals and gives a note instead of an exception.
  """
  x_arr, y_arr = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x_arr.shape != y_arr.shape or x_arr.ndim != 1 or x_arr.size < 2:
    raise ValueError(f"x, y: expected equal 1-D shapes with >= 2 points, got {x_arr.shape}, "
                     f"{y_arr.shape}")
  if np.any(x_arr <= 0) or np.any(y_arr <= 0):
    raise ValueError("x, y: expected strictly positive values for a log-log fit")
  slope, intercept = np.polyfit(np.log(x_arr), np.log(y_arr), 1)
  return float(slope), float(intercept)


def loglog_fit(x: Sequence[float], y: Sequence[float], *, bootstrap: int = 0,
               seed: int = 0) -> dict:
  """`loglog_slope` as JSON values with percentile-bootstrap intervals over resampled (x, y) points.

  Returns {'slope', 'intercept', 'ci95': {'slope', 'intercept': [lo, hi]} (None without a bootstrap
  or when every refit failed), 'bootstrap_failures', 'note'}. Points that admit no line (fewer than
  two distinct x, values <= 0) give None values and the reason as the note, not an exception; a
  resample with fewer than two distinct x counts as a failed refit.
  """
  x_arr, y_arr = np.asarray(x, np.float64), np.asarray(y, np.float64)
  out = {"slope": None, "intercept": None, "ci95": None, "bootstrap_failures": 0, "note": None}
  if x_arr.shape != y_arr.shape or x_arr.ndim != 1:
    raise ValueError(f"x, y: expected equal 1-D shapes, got {x_arr.shape}, {y_arr.shape}")
  if np.unique(x_arr).size < 2:
    return {**out, "note": f"no fit: {np.unique(x_arr).size} distinct x, a line needs 2"}
  if not (np.all(np.isfinite(x_arr)) and np.all(np.isfinite(y_arr)) and np.all(x_arr > 0)
          and np.all(y_arr > 0)):
    return {**out, "note": "no fit: a log-log line needs finite values > 0"}
  slope, intercept = loglog_slope(x_arr, y_arr)
  notes = []
  if np.unique(x_arr).size == 2:
    notes.append("2 distinct x for 2 parameters: the line passes through the points, with no "
                 "residual left to check it")
  ci95, failures = None, 0
  if bootstrap:
    def refit(idx):
      if np.unique(x_arr[idx]).size < 2:
        return None
      s_i, i_i = loglog_slope(x_arr[idx], y_arr[idx])
      return {"slope": s_i, "intercept": i_i}

    boot = intervals.percentile_bootstrap(refit, x_arr.size, bootstrap, seed)
    ci95, failures = boot["ci95"], boot["failures"]
    notes.append(intervals.bootstrap_note(failures, bootstrap))
  return {"slope": slope, "intercept": intercept, "ci95": ci95, "bootstrap_failures": failures,
          "note": intervals.join_notes(*notes)}


def batch_gradient_variance(loss_fn: Callable[[PyTree, PyTree], jax.Array], params: PyTree,
                            batches: PyTree, chunk: int = 128) -> tuple[float, float]:
  """E|g_B - G|^2 from K independent mini-batches, without a reference G: (estimate, standard error).

  `batches` has leaves shaped [K, B, ...]; g_k is the gradient of the mean of loss_fn over the B
  examples of batch k, formed as the mean of their per-example gradients (`per_example_grad_chunks`:
  one compiled function for every B). With m the mean of the K gradients,
  V_B = 1/(K - 1) sum_k |g_k - m|^2 is unbiased for E|g_B - G|^2; its standard error is the standard
  deviation of the K terms K/(K - 1) |g_k - m|^2 over sqrt(K).
  """
  k, b = jax.tree_util.tree_leaves(batches)[0].shape[:2]
  if k < 2:
    raise ValueError(f"batches: expected at least 2 batches on the leading axis, got {k}")
  examples = jax.tree_util.tree_map(lambda x: np.asarray(x).reshape((k * b,) + x.shape[2:]), batches)
  sums_KxP = np.zeros((k, ravel_pytree(params)[0].size))
  for start, g_nxP in per_example_grad_chunks(loss_fn, params, examples, chunk):
    batch_n = (start + np.arange(len(g_nxP))) // b
    firsts = np.flatnonzero(np.diff(batch_n, prepend=-1))  # Each batch's first row in this chunk.
    sums_KxP[batch_n[firsts]] += np.add.reduceat(g_nxP.astype(np.float64), firsts, axis=0)
  grads_KxP = sums_KxP / b
  dev_K = np.sum(np.square(grads_KxP - grads_KxP.mean(axis=0)[None, :]), axis=1) * k / (k - 1)
  return float(dev_K.mean()), float(dev_K.std(ddof=1) / np.sqrt(k))


def variance_law_record(loss_fn: Callable[[PyTree, PyTree], jax.Array], params: PyTree,
                        examples: PyTree, fresh_batches: Sequence[PyTree], num_resampled: int,
                        key: jax.Array, *, bootstrap: int = 0, seed: int = 0) -> dict:
  """The 1/B law of the mini-batch gradient variance at `params`, measured two ways (JSON values).

  Measured: E|g_B - G|^2 from independent mini-batches (`fresh_batches`, one [K, B, ...] batch set
  per B, see `batch_gradient_variance`) and its log-log slope against B ('slope', theory -1).
  Predicted: tr(Sigma)/B with tr(Sigma) from the N per-example gradients of `examples` (independent of
  the mini-batches), so the comparison tests the law on the data, not an identity of resampling.
  For reference, `num_resampled` mini-batches re-drawn from the N per-example gradients follow
  tr(Sigma_pop)/B with replacement (by construction) and the finite-population law
  tr(Sigma_pop)/B (N - B)/(N - 1) without. B_simple = tr(Sigma) / |G|^2 with the unbiased
  |G|^2 ~= |mean g_i|^2 - tr(Sigma_unbiased) / N. With `bootstrap` > 0, 'ci95' holds the
  percentile-bootstrap intervals of the slope and intercept over resampled (B, variance) points
  (`loglog_fit`, resampling seeded by `seed`); 'note' is its note (None when nothing is doubtful).
  """
  grads_NxP = jnp.asarray(per_example_grad_matrix(loss_fn, params, examples))
  n, p = grads_NxP.shape
  trace_pop = float(trace_covariance(grads_NxP, ddof=0))
  trace_unbiased = float(trace_covariance(grads_NxP, ddof=1))
  g_sq = float(jnp.sum(jnp.square(jnp.mean(grads_NxP, axis=0)))) - trace_unbiased / n

  sizes = [int(jax.tree_util.tree_leaves(b)[0].shape[1]) for b in fresh_batches]
  measured = [batch_gradient_variance(loss_fn, params, b) for b in fresh_batches]
  line = loglog_fit(sizes, [v for v, _ in measured], bootstrap=bootstrap, seed=seed)
  slope, intercept = line["slope"], line["intercept"]

  resampled_sizes = [2**i for i in range(int(math.log2(n)))]  # 1, 2, ..., N/2
  k_with, k_without = jax.random.split(key)
  with_repl = minibatch_gradient_variance(grads_NxP, resampled_sizes, num_resampled, k_with)
  without = minibatch_gradient_variance(grads_NxP, resampled_sizes, num_resampled, k_without,
                                        replace=False)
  return {
      "num_examples": n, "num_params": p,
      "fresh": {"batch_sizes": sizes, "variance": [v for v, _ in measured],
                "stderr": [se for _, se in measured],
                "num_batches": int(jax.tree_util.tree_leaves(fresh_batches[0])[0].shape[0]),
                "predicted": expected_minibatch_variance(trace_unbiased, sizes).tolist()},
      "slope": slope, "intercept": intercept, "ci95": line["ci95"],
      "bootstrap_failures": line["bootstrap_failures"], "note": line["note"],
      "resampled": {
          "batch_sizes": resampled_sizes, "num_batches": num_resampled,
          "variance_with_replacement": with_repl.tolist(),
          "variance_without_replacement": without.tolist(),
          "expected_with_replacement": expected_minibatch_variance(trace_pop,
                                                                   resampled_sizes).tolist(),
          "expected_without_replacement": expected_minibatch_variance(trace_pop, resampled_sizes,
                                                                      n).tolist(),
          "slope_with_replacement": loglog_slope(resampled_sizes, with_repl)[0]},
      "trace_sigma_population": trace_pop, "trace_sigma_unbiased": trace_unbiased,
      "g_sq_unbiased": g_sq, "b_simple": trace_unbiased / g_sq if g_sq > 0 else None,
  }


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


def noise_windows(records: Sequence[dict], batch_size_small: float, batch_size_big: float) -> dict:
  """The two-batch estimates of a training run, window by window, from its log records.

  A record with `grad_sq` (|g|^2 at B_big) and `micro_grad_sq` (the mean |g_m|^2 of the step's
  micro-batches, at B_small) holds their means over its `window_steps` steps (what
  `llm_math.train.fit` logs). Both one-step estimators are linear in the squared norms, so a window's
  summed estimates are window_steps x `two_batch_estimates` of those means. Returns lists, one entry
  per window: step (its last), val_nll (None where not evaluated), train_loss (its mean), g_sq_sum,
  trace_sum and weight (its steps): the input of `pooled_noise_scale`.
  """
  out = {k: [] for k in ("step", "val_nll", "train_loss", "g_sq_sum", "trace_sum", "weight")}
  for r in records:
    if "grad_sq" not in r:
      continue
    g_sq, trace = two_batch_estimates(r["micro_grad_sq"], r["grad_sq"], batch_size_small,
                                      batch_size_big)
    for key, value in (("step", r["step"]), ("val_nll", r.get("val_nll")),
                       ("train_loss", r["loss"]), ("g_sq_sum", r["window_steps"] * g_sq),
                       ("trace_sum", r["window_steps"] * trace), ("weight", r["window_steps"])):
      out[key].append(value)
  return out


def pooled_noise_scale(windows: dict, start: float = 0.0, stop: float = math.inf) -> dict:
  """|G|^2, tr(Sigma) and B_simple averaged over the steps of the windows ending in (start, stop].

  `windows` holds per-window sums of the one-step estimates (`g_sq_sum`, `trace_sum`) and the number
  of steps (`weight`), as `noise_windows` gives them; numerator and denominator are averaged
  separately and the ratio taken last (see the module docstring). B_simple is None unless |G|^2 > 0.
  """
  steps = np.asarray(windows["step"], np.float64)
  keep = (steps > start) & (steps <= stop)
  weight = float(np.sum(np.asarray(windows["weight"], np.float64)[keep]))
  if weight == 0:
    return {"g_sq": None, "trace_sigma": None, "b_simple": None, "steps_averaged": 0}
  g_sq = float(np.sum(np.asarray(windows["g_sq_sum"], np.float64)[keep])) / weight
  trace = float(np.sum(np.asarray(windows["trace_sum"], np.float64)[keep])) / weight
  return {"g_sq": g_sq, "trace_sigma": trace, "b_simple": trace / g_sq if g_sq > 0 else None,
          "steps_averaged": int(weight)}


# ----------------------------------------------------------------------------------------------
# Steps / examples trade-off and the critical batch size.
# ----------------------------------------------------------------------------------------------


class TradeoffFit(NamedTuple):
  """Fitted (S/S_min - 1)(E/E_min - 1) = 1 curve; b_crit = e_min / s_min.

  ci95: {'s_min', 'e_min', 'b_crit': [lo, hi]} percentile-bootstrap intervals, None without a
  bootstrap (or when every refit failed); bootstrap_failures: refits skipped; note: one line on what
  makes the fit doubtful, None when nothing does.
  """
  s_min: float
  e_min: float
  b_crit: float
  ci95: dict | None = None
  bootstrap_failures: int = 0
  note: str | None = None


def steps_to_target(steps: Sequence[float], values: Sequence[float], target: float) -> float | None:
  """The first step where a loss curve reaches `target`, linear between the evaluations around it.

  Returns None when no value is <= target, and steps[0] when the first one already is.
  """
  for i, value in enumerate(values):
    if value <= target:
      if i == 0:
        return float(steps[0])
      s0, s1, v0 = steps[i - 1], steps[i], values[i - 1]
      return float(s0 + (s1 - s0) * (v0 - target) / (v0 - value))
  return None


def target_from_curve(values: Sequence[float], margin: float, window: int = 3) -> float:
  """A target loss from a loss curve: its lowest `window`-point running mean plus `margin` (robust
  to one lucky evaluation)."""
  v = np.asarray(values, np.float64)
  if v.size < window:
    raise ValueError(f"values: expected at least {window} points, got {v.size}")
  return float(np.convolve(v, np.ones(window) / window, mode="valid").min() + margin)


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
                                refine: bool = True, max_iters: int = 100, *, bootstrap: int = 0,
                                seed: int = 0) -> TradeoffFit:
  """Fits S_min, E_min to measured (B, S) pairs (steps S to reach a fixed loss at batch size B).

  Linearisation: (S/S_min - 1)(E/E_min - 1) = 1 with E = B S is 1 = S_min / S + E_min / E, linear in
  (S_min, E_min); solved by least squares (each equation is a relative residual of S). Refinement:
  `scipy.optimize.least_squares` (Levenberg-Marquardt) on
  sum_i (log S_i - log(S_min + E_min / B_i))^2 over (log S_min, log E_min), i.e. multiplicative
  errors in the measured steps and positive parameters.

  Args:
    batch_sizes: B_i > 0, at least two distinct values.
    steps: S_i > 0.
    refine: run the log-space refinement after the linear fit.
    max_iters: evaluations of the residuals at most in the refinement.
    bootstrap: number of bootstrap resamples of the (B, S) pairs (0: no intervals); each resample
      is fitted the same way, and one with fewer than two distinct batch sizes counts as failed.
    seed: seed of the resampling.

  Returns:
    TradeoffFit(s_min, e_min, b_crit, ci95, bootstrap_failures, note).
  """
  b = np.asarray(batch_sizes, np.float64)
  s = np.asarray(steps, np.float64)
  if b.shape != s.shape or b.ndim != 1 or np.unique(b).size < 2:
    raise ValueError("batch_sizes, steps: expected equal 1-D shapes with >= 2 distinct batch "
                     f"sizes, got {b.shape}, {s.shape}")
  if np.any(b <= 0) or np.any(s <= 0):
    raise ValueError("batch_sizes, steps: expected strictly positive values")
  if bootstrap < 0:
    raise ValueError(f"bootstrap: expected >= 0, got {bootstrap}")
  s_min, e_min, restarted = _fit_tradeoff_point(b, s, refine, max_iters)
  notes = []
  if np.unique(b).size == 2:
    notes.append("2 distinct batch sizes for 2 parameters: the curve passes through them, with no "
                 "residual left to check its shape")
  if restarted and not refine:
    notes.append("the linear fit left the positive quadrant: these are its restart values, not a "
                 "fit")
  b_crit = e_min / s_min
  if not b.min() <= b_crit <= b.max():
    notes.append(f"B_crit = {b_crit:.3g} lies outside the measured batch sizes "
                 f"[{b.min():.3g}, {b.max():.3g}]: an extrapolation")
  ci95, failures = None, 0
  if bootstrap:
    def refit(idx):
      if np.unique(b[idx]).size < 2:
        return None
      s_i, e_i, _ = _fit_tradeoff_point(b[idx], s[idx], refine, max_iters)
      return {"s_min": s_i, "e_min": e_i, "b_crit": e_i / s_i}

    boot = intervals.percentile_bootstrap(refit, b.size, bootstrap, seed)
    ci95, failures = boot["ci95"], boot["failures"]
    notes.append(intervals.bootstrap_note(failures, bootstrap))
    if ci95 is not None:
      lo, hi = ci95["b_crit"]
      if not lo > 0 or hi / lo > 100:
        notes.append(f"B_crit undetermined: its 95% interval [{lo:.3g}, {hi:.3g}] spans more "
                     "than a factor 100")
  return TradeoffFit(float(s_min), float(e_min), float(b_crit), ci95, failures,
                     intervals.join_notes(*notes))


def _fit_tradeoff_point(b: np.ndarray, s: np.ndarray, refine: bool,
                        max_iters: int) -> tuple[float, float, bool]:
  """(S_min, E_min, whether the linear fit had to be restarted) for checked points."""
  e = b * s
  design = np.stack([1.0 / s, 1.0 / e], axis=1)
  (s_min, e_min), *_ = np.linalg.lstsq(design, np.ones_like(s), rcond=None)
  # Noise can push the linear solution out of the positive quadrant; restart from a safe point.
  restarted = bool(s_min <= 0 or e_min <= 0)
  if s_min <= 0:
    s_min = 0.5 * s.min()
  if e_min <= 0:
    e_min = 0.5 * e.min()
  if refine:
    s_min, e_min = _refine_log_fit(b, s, s_min, e_min, max_iters)
  return float(s_min), float(e_min), restarted


def _refine_log_fit(b: np.ndarray, s: np.ndarray, s_min: float, e_min: float,
                    max_iters: int) -> tuple[float, float]:
  """Least squares on the log residuals of S = S_min + E_min / B in (log S_min, log E_min); the
  start is kept if the refinement does not lower the cost."""
  log_s = np.log(s)

  def residuals(th):
    return np.log(np.exp(th[0]) + np.exp(th[1]) / b) - log_s

  def jacobian(th):
    s_hat, e_hat = np.exp(th)
    pred = s_hat + e_hat / b
    return np.stack([s_hat / pred, e_hat / b / pred], axis=1)

  start = np.log([s_min, e_min])
  with np.errstate(over="ignore"):
    sol = optimize.least_squares(residuals, start, jac=jacobian, method="lm", x_scale="jac",
                                 ftol=1e-15, xtol=1e-15, gtol=1e-15, max_nfev=max(max_iters, 1))
    theta = sol.x if np.sum(residuals(sol.x) ** 2) <= np.sum(residuals(start) ** 2) else start
  return float(np.exp(theta[0])), float(np.exp(theta[1]))


def tradeoff_record(batch_sizes: Sequence[float], steps: Sequence[float], *, bootstrap: int = 0,
                    seed: int = 0) -> dict | None:
  """`fit_steps_examples_tradeoff` of measured (B, S) pairs as JSON values, with the rms of the log
  residuals log(S / S_fit), ci95 (None without a bootstrap), bootstrap_failures and note; None with
  fewer than two distinct batch sizes."""
  if len(set(batch_sizes)) < 2:
    return None
  fit = fit_steps_examples_tradeoff(batch_sizes, steps, bootstrap=bootstrap, seed=seed)
  residual = np.log(np.asarray(steps, np.float64) / tradeoff_steps(batch_sizes, fit.s_min, fit.e_min))
  return {"s_min": fit.s_min, "e_min": fit.e_min, "b_crit": fit.b_crit,
          "batch_sizes": list(batch_sizes),
          "rms_log_residual": float(np.sqrt(np.mean(residual**2))), "ci95": fit.ci95,
          "bootstrap_failures": fit.bootstrap_failures, "note": fit.note}


def doubling_speedups(batch_sizes: Sequence[int], steps: Sequence[float],
                      b_crit: float | None = None) -> dict | None:
  """Speed-up S(B) / S(2B) of each doubling between consecutive measured batch sizes, and the
  examples ratio E(2B) / E(B); 'small' and 'large' are the first and last doubling.

  Perfect scaling is a speed-up of 2 with the examples unchanged; diminishing returns, a speed-up near
  1 with twice the examples. With `b_crit`, the fit's excess examples E(B) / E_min - 1 = B / B_crit
  at the small end ('from' of the first doubling) and the large end ('to' of the last). None when no
  two consecutive batch sizes double.
  """
  pairs = zip(zip(batch_sizes, steps), zip(batch_sizes[1:], steps[1:]))
  doublings = [{"from": b0, "to": b1, "speedup": s0 / s1, "examples_ratio": b1 * s1 / (b0 * s0)}
               for (b0, s0), (b1, s1) in pairs if b1 == 2 * b0]
  if not doublings:
    return None
  out = {"doublings": doublings, "small": doublings[0], "large": doublings[-1]}
  if b_crit:
    out["excess_examples_small"] = doublings[0]["from"] / b_crit
    out["excess_examples_large"] = doublings[-1]["to"] / b_crit
  return out
