"""Optimizers and learning-rate schedules written out step by step, plus their statistical reading.

Update rules are pure functions over pytrees with optax's conventions, so each step can be set
beside `optax` (the tests do): `*_init(params) -> state`, `*_update(grads, state, params, ...) ->
(updates, new_state)` and `apply_updates(params, updates) = params + updates`. A learning rate is a
float or a schedule `step -> lr`; the schedule is evaluated at the step count *before* the update
(0 on the first step), as in `optax.scale_by_learning_rate`.

The second half makes two statistical facts checkable: an L2 penalty is a Gaussian prior (MAP for
linear-Gaussian regression is ridge regression with lambda = sigma^2 / tau^2), and maximum
likelihood is minimum cross-entropy (for a categorical model the empirical frequencies minimize
the average NLL, and the minimum is the entropy of the empirical distribution).
"""
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any
Schedule = Callable[[jax.Array], jax.Array]
LearningRate = float | Schedule


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
  """params + updates, leaf by leaf."""
  return jax.tree.map(lambda p, u: p + u, params, updates)


def _learning_rate(lr: LearningRate, count: jax.Array) -> jax.Array:
  return lr(count) if callable(lr) else jnp.asarray(lr)


# ----------------------------------------------------------------------------------------------
# AdamW.
# ----------------------------------------------------------------------------------------------


class AdamWState(NamedTuple):
  """count: steps taken so far (int32 scalar); m, v: first / second moment pytrees like params."""
  count: jax.Array
  m: PyTree
  v: PyTree


def adamw_init(params: PyTree) -> AdamWState:
  """m_0 = v_0 = 0, count = 0."""
  return AdamWState(count=jnp.zeros([], jnp.int32), m=jax.tree.map(jnp.zeros_like, params),
                    v=jax.tree.map(jnp.zeros_like, params))


def _decay_mask(mask: PyTree | Callable[[PyTree], PyTree] | None, params: PyTree) -> PyTree:
  """A pytree of bools like params: True where weight decay applies."""
  if mask is None:
    return jax.tree.map(lambda _: True, params)
  resolved = mask(params) if callable(mask) else mask
  if jax.tree.structure(resolved) != jax.tree.structure(params):
    raise ValueError("mask must be a pytree of bools with the structure of params (or a callable "
                     f"returning one), got {jax.tree.structure(resolved)}")
  return resolved


def adamw_update(grads: PyTree, state: AdamWState, params: PyTree, learning_rate: LearningRate,
                 b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                 weight_decay: float = 1e-4,
                 mask: PyTree | Callable[[PyTree], PyTree] | None = None
                 ) -> tuple[PyTree, AdamWState]:
  """One AdamW step (Loshchilov & Hutter), leaf by leaf, with t = count + 1:

    m_t = b1 m_{t-1} + (1 - b1) g_t            v_t = b2 v_{t-1} + (1 - b2) g_t^2
    m_hat = m_t / (1 - b1^t)                    v_hat = v_t / (1 - b2^t)
    update = -lr_{t-1} * (m_hat / (sqrt(v_hat) + eps) + wd * mask * theta_{t-1})

  The decay is decoupled (it never enters m or v) and scaled by the learning rate, as in
  `optax.adamw` and `torch.optim.AdamW`. `mask` (pytree of bools or a callable params -> pytree)
  selects the leaves that are decayed, e.g. not biases or norm scales.

  Returns:
    (updates, new_state); new params are `apply_updates(params, updates)`.
  """
  if not 0.0 <= b1 < 1.0 or not 0.0 <= b2 < 1.0:
    raise ValueError(f"b1 and b2 must lie in [0, 1), got b1={b1}, b2={b2}")
  t = state.count + 1
  m = jax.tree.map(lambda m_, g: b1 * m_ + (1.0 - b1) * g, state.m, grads)
  v = jax.tree.map(lambda v_, g: b2 * v_ + (1.0 - b2) * g * g, state.v, grads)
  correction1 = 1.0 - b1 ** t
  correction2 = 1.0 - b2 ** t
  lr = _learning_rate(learning_rate, state.count)
  decayed = _decay_mask(mask, params)

  def leaf_update(m_, v_, p, decay):
    m_hat = m_ / correction1.astype(m_.dtype)
    v_hat = v_ / correction2.astype(v_.dtype)
    direction = m_hat / (jnp.sqrt(v_hat) + eps)
    if isinstance(decay, bool):  # static mask: no decay term at all where False
      if decay:
        direction = direction + weight_decay * p
    else:  # traced mask
      direction = direction + weight_decay * jnp.asarray(decay, p.dtype) * p
    return -lr.astype(direction.dtype) * direction

  updates = jax.tree.map(leaf_update, m, v, params, decayed)
  return updates, AdamWState(count=t, m=m, v=v)


# ----------------------------------------------------------------------------------------------
# SGD and heavy-ball momentum.
# ----------------------------------------------------------------------------------------------


class SgdState(NamedTuple):
  """count: steps taken so far; trace: momentum buffer like params (zeros without momentum)."""
  count: jax.Array
  trace: PyTree


def sgd_init(params: PyTree) -> SgdState:
  return SgdState(count=jnp.zeros([], jnp.int32), trace=jax.tree.map(jnp.zeros_like, params))


def sgd_update(grads: PyTree, state: SgdState, learning_rate: LearningRate,
               momentum: float | None = None, nesterov: bool = False
               ) -> tuple[PyTree, SgdState]:
  """Plain SGD, update = -lr g, or heavy-ball momentum (Polyak), as `optax.sgd`:

    b_t = g_t + mu b_{t-1},   update = -lr_{t-1} b_t             (heavy ball, no dampening)
    update = -lr_{t-1} (g_t + mu b_t)                             (nesterov=True)
  """
  if momentum is not None and not 0.0 <= momentum < 1.0:
    raise ValueError(f"momentum must lie in [0, 1) or be None, got {momentum}")
  if nesterov and momentum is None:
    raise ValueError("nesterov=True needs a momentum value, got momentum=None")
  lr = _learning_rate(learning_rate, state.count)
  if momentum is None:
    trace = state.trace
    direction = grads
  else:
    trace = jax.tree.map(lambda g, b: g + momentum * b, grads, state.trace)
    direction = jax.tree.map(lambda g, b: g + momentum * b, grads, trace) if nesterov else trace
  updates = jax.tree.map(lambda x: -lr.astype(x.dtype) * x, direction)
  return updates, SgdState(count=state.count + 1, trace=trace)


# ----------------------------------------------------------------------------------------------
# Learning-rate schedules: functions step -> lr, jit-compatible in the step.
# ----------------------------------------------------------------------------------------------


def inverse_time_schedule(init_value: float, time_scale: float = 1.0) -> Schedule:
  """lr_t = init / (1 + t / time_scale): the Robbins-Monro 1/t decay.

  sum_t lr_t diverges (like log T) while sum_t lr_t^2 converges, the classical conditions for SGD
  to converge on a convex problem with noisy gradients.
  """
  if time_scale <= 0:
    raise ValueError(f"time_scale must be positive, got {time_scale}")
  return lambda step: init_value / (1.0 + jnp.asarray(step, float) / time_scale)


def inverse_sqrt_schedule(init_value: float, time_scale: float = 1.0) -> Schedule:
  """lr_t = init / sqrt(1 + t / time_scale): the 1/sqrt(t) decay (the original Transformer's,
  after its warmup)."""
  if time_scale <= 0:
    raise ValueError(f"time_scale must be positive, got {time_scale}")
  return lambda step: init_value * jax.lax.rsqrt(1.0 + jnp.asarray(step, float) / time_scale)


def warmup_cosine_schedule(peak_value: float, warmup_steps: int, total_steps: int,
                           init_value: float = 0.0, end_value: float = 0.0) -> Schedule:
  """Linear warmup init -> peak over `warmup_steps`, then cosine decay peak -> end until
  `total_steps` (counted from 0, warmup included), constant `end_value` after:

    lr_t = init + (peak - init) t / W                                   for t < W
    lr_t = end + (peak - end) (1 + cos(pi min(t - W, T - W) / (T - W))) / 2    for t >= W

  Equals `optax.warmup_cosine_decay_schedule(init, peak, W, T, end)` (exponent 1).
  """
  if warmup_steps < 0 or total_steps <= warmup_steps:
    raise ValueError(f"need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, "
                     f"total_steps={total_steps}")
  decay_steps = float(total_steps - warmup_steps)

  def schedule(step):
    step = jnp.asarray(step, float)
    warm = init_value + (peak_value - init_value) * step / max(warmup_steps, 1)
    frac = jnp.minimum(jnp.maximum(step - warmup_steps, 0.0), decay_steps) / decay_steps
    cosine = end_value + (peak_value - end_value) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
    return jnp.where(step < warmup_steps, warm, cosine)

  return schedule


# ----------------------------------------------------------------------------------------------
# L2 penalty = Gaussian prior; MLE = minimum cross-entropy.
# ----------------------------------------------------------------------------------------------


def _check_regression(x_NxD: jax.Array, y_N: jax.Array) -> None:
  if jnp.ndim(x_NxD) != 2 or jnp.shape(y_N) != jnp.shape(x_NxD)[:1]:
    raise ValueError(f"x must be [N, D] and y [N], got shapes {jnp.shape(x_NxD)} and "
                     f"{jnp.shape(y_N)}")


def ridge_regression(x_NxD: jax.Array, y_N: jax.Array, lam: float) -> jax.Array:
  """argmin_w ||y - X w||^2 + lam ||w||^2 = (X^T X + lam I)^{-1} X^T y, shape `[D]`."""
  _check_regression(x_NxD, y_N)
  if lam < 0:
    raise ValueError(f"lam must be non-negative, got {lam}")
  d = x_NxD.shape[1]
  gram_DxD = x_NxD.T @ x_NxD + lam * jnp.eye(d, dtype=x_NxD.dtype)
  return jnp.linalg.solve(gram_DxD, x_NxD.T @ y_N)


def neg_log_posterior(w_D: jax.Array, x_NxD: jax.Array, y_N: jax.Array, sigma: float,
                      tau: float) -> jax.Array:
  """-log p(w | X, y) up to a constant, for y = X w + N(0, sigma^2), prior w ~ N(0, tau^2 I):

    ||y - X w||^2 / (2 sigma^2) + ||w||^2 / (2 tau^2).

  Multiplying by 2 sigma^2 gives the ridge objective with lam = sigma^2 / tau^2, so the MAP
  estimate is `ridge_regression(X, y, sigma**2 / tau**2)` (see `map_linear_gaussian`).
  """
  _check_regression(x_NxD, y_N)
  resid_N = y_N - x_NxD @ w_D
  return 0.5 * jnp.sum(resid_N * resid_N) / sigma ** 2 + 0.5 * jnp.sum(w_D * w_D) / tau ** 2


def map_linear_gaussian(x_NxD: jax.Array, y_N: jax.Array, sigma: float, tau: float) -> jax.Array:
  """Closed-form MAP weights for the linear-Gaussian model: ridge with lam = sigma^2 / tau^2."""
  if sigma <= 0 or tau <= 0:
    raise ValueError(f"sigma and tau must be positive, got sigma={sigma}, tau={tau}")
  return ridge_regression(x_NxD, y_N, sigma ** 2 / tau ** 2)


def categorical_mean_nll(logits_V: jax.Array, tokens_N: jax.Array) -> jax.Array:
  """Average NLL -1/N sum_n log softmax(logits)[x_n] of i.i.d. categorical data, in nats.

  Equals the cross-entropy H(p_hat, q) of the model q = softmax(logits) under the empirical
  distribution p_hat, so it is minimized at q = p_hat with minimum H(p_hat) (MLE = min CE).
  """
  log_q_V = jax.nn.log_softmax(logits_V)
  return -jnp.mean(log_q_V[tokens_N])


def categorical_mle(tokens_N: jax.Array, num_classes: int) -> jax.Array:
  """The maximum-likelihood categorical distribution: empirical frequencies counts / N, `[V]`."""
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  counts_V = jnp.zeros(num_classes).at[tokens_N].add(1.0)
  return counts_V / jnp.sum(counts_V)
