"""Sharpness of the loss landscape: Hessian-vector products, extreme eigenvalues, epsilon-sharpness.

The solvers take a scalar `loss_fn(params)` (data closed over) and work on arbitrary parameter
pytrees; eigen-solvers flatten internally to one vector of P parameters. `sharpness_record` takes
`loss_fn(params, batch)` and the batch, so one compiled measurement serves many solutions. Memory is O(P) per
Hessian-vector product (power iteration) or O(k P) for k Lanczos steps; the Hessian is never formed.
"""
import functools
from typing import Any, Callable, NamedTuple

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp

PyTree = Any


def hvp(loss_fn: Callable[[PyTree], jax.Array], params: PyTree, v: PyTree) -> PyTree:
  """Hessian-vector product H(w) v by forward-over-reverse: the JVP of grad L along v.

  Costs a small constant multiple of one gradient; `v` and the result are shaped like `params`.
  """
  return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def _flat_matvec(matvec: Callable[[PyTree], PyTree], like: PyTree):
  """A pytree matvec as a flat-vector one, plus the flat `like` and its unravel function."""
  flat, unravel = ravel_pytree(like)
  return (lambda x: ravel_pytree(matvec(unravel(x)))[0]), flat, unravel


def _random_like(key: jax.Array, params: PyTree) -> PyTree:
  flat, unravel = ravel_pytree(params)
  return unravel(jax.random.normal(key, flat.shape, flat.dtype))


def power_iteration(matvec: Callable[[PyTree], PyTree], v0: PyTree, num_iters: int = 100,
                    tol: float = 1e-6) -> tuple[jax.Array, PyTree, jax.Array]:
  """Dominant eigenpair of a symmetric linear map by power iteration.

  v <- A v / |A v|, with Rayleigh quotient lambda = v^T A v; stops when
  |lambda_t - lambda_{t-1}| <= tol |lambda_t| or after `num_iters` products. Converges at rate
  |lambda_2 / lambda_1| to the eigenvalue of largest *magnitude* (for a Hessian with a dominant
  negative direction that is the negative one; it stalls if +-lambda tie in magnitude).

  Args:
    matvec: v -> A v on pytrees shaped like `v0`.
    v0: nonzero starting pytree.
    num_iters: maximum number of matrix-vector products (>= 1).
    tol: relative tolerance on successive Rayleigh quotients.

  Returns:
    (eigenvalue, unit eigenvector shaped like v0, number of products used).
  """
  if num_iters < 1:
    raise ValueError(f"num_iters: expected >= 1, got {num_iters}")
  if tol < 0:
    raise ValueError(f"tol: expected >= 0, got {tol}")
  mv, flat0, unravel = _flat_matvec(matvec, v0)
  v = flat0 / jnp.linalg.norm(flat0)

  def cond(carry):
    i, _, lam, lam_prev = carry
    return (i < num_iters) & ~(jnp.abs(lam - lam_prev) <= tol * jnp.abs(lam))

  def body(carry):
    i, v, lam, _ = carry
    w = mv(v)
    w_norm = jnp.linalg.norm(w)
    new_v = jnp.where(w_norm > 0, w / jnp.where(w_norm > 0, w_norm, 1.0), v)
    return i + 1, new_v, jnp.vdot(v, w), lam

  @jax.jit  # One compilation for the whole loop instead of op-by-op dispatch.
  def run(v):
    nan = jnp.array(jnp.nan, v.dtype)  # NaN compares False: no convergence before two quotients.
    i, v, lam, _ = jax.lax.while_loop(cond, body, (jnp.array(0), v, nan, nan))
    return lam, v, i

  lam, v, i = run(v)
  return lam, unravel(v), i


def hessian_top_eigenvalue(loss_fn: Callable[[PyTree], jax.Array], params: PyTree, key: jax.Array,
                           num_iters: int = 100,
                           tol: float = 1e-6) -> tuple[jax.Array, PyTree, jax.Array]:
  """Largest-magnitude Hessian eigenpair at `params` by power iteration on HVPs, random start."""
  return power_iteration(lambda v: hvp(loss_fn, params, v), _random_like(key, params), num_iters,
                         tol)


class LanczosResult(NamedTuple):
  """k-step Lanczos output.

  ritz_values: [k] ascending eigenvalues of the tridiagonal T; ritz_values[-1] / [0] approximate the
    largest / smallest eigenvalue (the extremes converge first; interior Ritz values do not).
  alphas: [k] diagonal of T.
  betas: [k - 1] off-diagonal of T (0 where the Krylov space was exhausted and a fresh direction
    began).
  """
  ritz_values: jax.Array
  alphas: jax.Array
  betas: jax.Array


def lanczos(matvec: Callable[[PyTree], PyTree], v0: PyTree, num_steps: int,
            key: jax.Array) -> LanczosResult:
  """Lanczos tridiagonalisation of a symmetric map with full reorthogonalisation.

  Builds an orthonormal basis q_0..q_{k-1} of the Krylov space of v0 with
  A q_j = beta_{j-1} q_{j-1} + alpha_j q_j + beta_j q_{j+1}; the residual is re-orthogonalised
  against all previous q (twice, classical Gram-Schmidt) so the basis stays orthonormal in floating
  point and no spurious copies of converged eigenvalues appear. If the residual vanishes (an
  invariant subspace was found) the iteration continues from a random vector orthogonal to the
  basis, with beta = 0; then T = Q^T A Q still holds and k = P steps return the whole spectrum.

  Args:
    matvec: v -> A v on pytrees shaped like `v0`.
    v0: nonzero starting pytree.
    num_steps: k, 1 <= k <= P (P = number of entries of v0).
    key: PRNG key, used only for restarts after breakdown.

  Returns:
    LanczosResult with the k Ritz values (ascending) and the tridiagonal T.
  """
  mv, flat0, _ = _flat_matvec(matvec, v0)
  p = flat0.shape[0]
  if not 1 <= num_steps <= p:
    raise ValueError(f"num_steps: expected in [1, {p}] (the number of parameters), got {num_steps}")
  dtype = flat0.dtype
  small = 100 * jnp.finfo(dtype).eps
  hi = jax.lax.Precision.HIGHEST

  def orthogonalize(w, q_all):
    for _ in range(2):
      w = w - jnp.matmul(q_all.T, jnp.matmul(q_all, w, precision=hi), precision=hi)
    return w

  @jax.jit  # One compilation for the whole recurrence instead of op-by-op dispatch.
  def run(flat0, key):
    def body(i, carry):
      q_all, alphas, betas = carry
      q = q_all[i]
      aq = mv(q)
      alpha = jnp.vdot(q, aq)
      beta_prev = jnp.where(i > 0, betas[i - 1], 0.0)
      w = aq - alpha * q - beta_prev * q_all[i - 1]
      w = orthogonalize(w, q_all)
      beta = jnp.linalg.norm(w)
      broke = beta <= small * jnp.linalg.norm(aq)
      r = orthogonalize(jax.random.normal(jax.random.fold_in(key, i), (p,), dtype), q_all)
      w, beta = jnp.where(broke, r, w), jnp.where(broke, 0.0, beta)
      w_norm = jnp.linalg.norm(w)
      q_next = w / jnp.where(w_norm > 0, w_norm, 1.0)
      return q_all.at[i + 1].set(q_next), alphas.at[i].set(alpha), betas.at[i].set(beta)

    q_all = jnp.zeros((num_steps + 1, p), dtype).at[0].set(flat0 / jnp.linalg.norm(flat0))
    init = (q_all, jnp.zeros((num_steps,), dtype), jnp.zeros((num_steps,), dtype))
    _, alphas, betas = jax.lax.fori_loop(0, num_steps, body, init)
    betas = betas[:num_steps - 1]
    t_KxK = jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)
    return LanczosResult(jnp.linalg.eigvalsh(t_KxK), alphas, betas)

  return run(flat0, key)


def hessian_lanczos(loss_fn: Callable[[PyTree], jax.Array], params: PyTree, key: jax.Array,
                    num_steps: int) -> LanczosResult:
  """k-step Lanczos on the Hessian at `params`, random start; extremes are ritz_values[[0, -1]]."""
  start_key, restart_key = jax.random.split(key)
  return lanczos(lambda v: hvp(loss_fn, params, v), _random_like(start_key, params), num_steps,
                 restart_key)


class EpsilonSharpness(NamedTuple):
  """sharpness = 100 (max_loss - loss) / (1 + loss); delta is the maximising perturbation found."""
  sharpness: jax.Array
  max_loss: jax.Array
  loss: jax.Array
  delta: PyTree


def epsilon_sharpness(loss_fn: Callable[[PyTree], jax.Array], params: PyTree, epsilon: float = 1e-3,
                      num_steps: int = 10, step_size: float = 0.5,
                      key: jax.Array | None = None) -> EpsilonSharpness:
  """Keskar et al. 2017 ("On Large-Batch Training for Deep Learning") epsilon-sharpness.

    phi_eps(w) = 100 (max_{delta in C_eps} L(w + delta) - L(w)) / (1 + L(w)),
    C_eps = {delta : |delta_i| <= eps (|w_i| + 1)}.

  The paper solves the inner maximisation with a few L-BFGS-B iterations, in the full space or in a
  random p-dimensional subspace w + A y (A random n x p, box constraints on A y). Here it is
  projected steepest ascent in the full space, in the box's own geometry:
  delta <- clip(delta + step_size * r * sign(grad), -r, r) with radii r_i = eps (|w_i| + 1), the
  standard projected-gradient method for a box (a step_size of 0.5 reaches any corner in two steps).
  Like L-BFGS-B it finds a local maximiser, so the result is a lower bound on the true box maximum;
  the best iterate (delta = 0 included) is kept.

  Starting at delta = 0 (key=None) ascends from the gradient at w; at an exact stationary point the
  sign of a zero gradient is 0 and nothing moves, so pass a `key` to start uniformly inside the box.

  Args:
    loss_fn: params -> scalar loss (e.g. training loss on a fixed batch).
    params: parameter pytree w.
    epsilon: box size eps (the paper uses 1e-3 and 5e-4).
    num_steps: ascent steps (>= 1).
    step_size: step as a fraction of each coordinate's box radius.
    key: optional PRNG key for a random start inside the box.

  Returns:
    EpsilonSharpness(sharpness, max_loss, loss, delta).
  """
  if epsilon <= 0:
    raise ValueError(f"epsilon: expected > 0, got {epsilon}")
  if num_steps < 1:
    raise ValueError(f"num_steps: expected >= 1, got {num_steps}")
  if step_size <= 0:
    raise ValueError(f"step_size: expected > 0, got {step_size}")
  flat_w, unravel = ravel_pytree(params)

  @jax.jit  # One compilation for the whole ascent instead of op-by-op dispatch.
  def run(flat_w):
    radius = epsilon * (jnp.abs(flat_w) + 1.0)
    if key is None:
      delta = jnp.zeros_like(flat_w)
    else:
      delta = radius * jax.random.uniform(key, flat_w.shape, flat_w.dtype, -1.0, 1.0)
    value_and_grad = jax.value_and_grad(lambda d: loss_fn(unravel(flat_w + d)))

    def body(_, carry):
      delta, best_val, best_delta = carry
      val, grad = value_and_grad(delta)
      val = val.astype(best_val.dtype)
      better = val > best_val
      best_val, best_delta = jnp.where(better, val, best_val), jnp.where(better, delta, best_delta)
      delta = jnp.clip(delta + step_size * radius * jnp.sign(grad), -radius, radius)
      return delta, best_val, best_delta

    loss = jnp.asarray(loss_fn(unravel(flat_w)))
    # delta = 0 is in the box, so the maximum is at least L(w) and the sharpness is >= 0.
    init = (delta, loss, jnp.zeros_like(flat_w))
    delta, best_val, best_delta = jax.lax.fori_loop(0, num_steps, body, init)
    final_val = loss_fn(unravel(flat_w + delta)).astype(loss.dtype)
    better = final_val > best_val
    best_val = jnp.where(better, final_val, best_val)
    best_delta = jnp.where(better, delta, best_delta)
    return 100.0 * (best_val - loss) / (1.0 + loss), best_val, loss, best_delta

  phi, best_val, loss, best_delta = run(flat_w)
  return EpsilonSharpness(phi, best_val, loss, unravel(best_delta))


@functools.partial(jax.jit, static_argnames=("loss_fn", "lanczos_steps", "epsilon", "ascent_steps"))
def _sharpness_measures(loss_fn, params, batch, key, lanczos_steps, epsilon, ascent_steps):
  loss = lambda p: loss_fn(p, batch)
  ritz = hessian_lanczos(loss, params, key, lanczos_steps).ritz_values
  eps = epsilon_sharpness(loss, params, epsilon=epsilon, num_steps=ascent_steps)
  return {"hessian_top_eigenvalue": ritz[-1], "hessian_bottom_ritz_value": ritz[0],
          "epsilon_sharpness": eps.sharpness, "sharpness_batch_loss": eps.loss}


def sharpness_record(loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, batch: Any,
                     key: jax.Array, lanczos_steps: int = 20, epsilon: float = 1e-3,
                     ascent_steps: int = 10) -> dict:
  """The sharpness of `loss_fn(params, batch)` at `params` on one fixed batch, as JSON numbers.

  hessian_top_eigenvalue / hessian_bottom_ritz_value: the extreme Ritz values of `lanczos_steps`-step
  Lanczos on the Hessian (random start from `key`): the top one converges first, the bottom one is
  an upper bound on the smallest eigenvalue. epsilon_sharpness: Keskar et al.'s measure
  (`epsilon_sharpness`, box radius epsilon (|w| + 1), `ascent_steps` projected-ascent steps).
  sharpness_batch_loss: the loss on the batch. One compilation serves every call with the same
  `loss_fn` object, settings and shapes (e.g. the solutions of a batch-size sweep).
  """
  out = _sharpness_measures(loss_fn, params, batch, key, lanczos_steps, epsilon, ascent_steps)
  return {k: float(v) for k, v in out.items()}
