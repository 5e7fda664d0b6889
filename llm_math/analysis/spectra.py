"""Spectral analysis of attention matrices: eigenvalues, stationary laws, entropy, rank collapse.

An attention matrix A = softmax(Q K^T / sqrt(d_k)) (softmax over each row) is row-stochastic:
A_ij >= 0 and A 1 = 1. It is the transition matrix of a Markov chain on positions, so

  * 1 is an eigenvalue with right eigenvector 1 (the all-ones vector);
  * every eigenvalue has |lambda| <= ||A||_inf = 1, so the spectral radius is exactly 1;
  * the spectral gap 1 - |lambda_2| (lambda_2 the eigenvalue of second-largest modulus, counted
    with multiplicity) says how fast repeated mixing x <- A x forgets where it started;
  * a stationary distribution pi >= 0, pi A = pi, sum(pi) = 1 (a left Perron vector) exists.

A causal A (row t attends to positions 0..t) is lower-triangular. Then det(A - lambda I) =
prod_t (A_tt - lambda): its eigenvalues are exactly its diagonal, the self-attention weights
A_tt, and A_00 = 1. Row 0 of a causal A is e_0, so e_0 A = e_0: the stationary distribution sits
on position 0, an attention sink built into the mask (a chain started anywhere drains into
position 0, because every row t >= 1 with A_tt < 1 moves mass to earlier positions). For causal
matrices this module reads the eigenvalues off the diagonal instead of calling an eigensolver:
causal attention is far from normal and its diagonal entries cluster, where eigenvalue
condition numbers are huge and a general solver can be off by many orders of magnitude more
than machine epsilon (an m x m near-Jordan block moves eigenvalues by about eps^(1/m)); the
diagonal is exact.

Arrays `a_...xTxT` may carry any leading batch axes (`[layers, heads, T, T]`,
`[batch, heads, T, T]`); results keep those axes. All analysis functions work in numpy float64
(jax arrays are accepted); `attention_probs` is jax. Where a function takes `causal`, None means
"decide per matrix": a matrix counts as causal when every entry above its diagonal is exactly
zero (what a -inf mask produces); True asserts that (ValueError otherwise); False treats every
matrix as a general one. Entropies are in nats.

Everything here is a function of arrays; `llm_math.probes` applies it to a Transformer of
`llm_math.model` (its attention, residual streams and query-key weights on given tokens). Only
`attention_probs` needs JAX, and imports it when called: the rest is numpy, for code that must not
load JAX (the figures).
"""
from __future__ import annotations  # jax.Array below names a type of a module loaded on demand.

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
  import jax

STOCHASTIC_ATOL = 1e-4
_NORMS = ("fro", "composite")


# ----------------------------------------------------------------------------------------------
# Attention probabilities from first principles.
# ----------------------------------------------------------------------------------------------


def attention_probs(q_BxTxK: jax.Array, k_BxSxK: jax.Array, causal: bool = False,
                    mask: jax.Array | None = None) -> jax.Array:
  """A = softmax(Q K^T / sqrt(d_k)) over keys, with optional causal and boolean masks.

  logits_ts = q_t . k_s / sqrt(d_k); A_ts = exp(logits_ts - m_t) / sum_{s' allowed}
  exp(logits_ts' - m_t) over allowed keys s, with m_t the row's largest allowed logit (the shift
  cancels and keeps exp from overflowing); disallowed entries are exactly 0.

  Args:
    q_BxTxK: queries `[..., T, d_k]`.
    k_BxSxK: keys `[..., S, d_k]`, same leading axes as the queries.
    causal: if True, query t may attend to keys s <= t + (S - T) (the last query sees every key;
      with S == T this is s <= t).
    mask: optional boolean array broadcastable to `[..., T, S]`; True = may attend.

  Returns:
    `[..., T, S]`, each row a probability vector. A row with no allowed key is 0/0 = NaN.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  q_BxTxK = jnp.asarray(q_BxTxK)
  k_BxSxK = jnp.asarray(k_BxSxK)
  if q_BxTxK.ndim < 2 or k_BxSxK.ndim != q_BxTxK.ndim:
    raise ValueError(f"q/k: expected [..., T, d_k] and [..., S, d_k] of equal rank, got shapes "
                     f"{q_BxTxK.shape} and {k_BxSxK.shape}")
  if q_BxTxK.shape[:-2] != k_BxSxK.shape[:-2] or q_BxTxK.shape[-1] != k_BxSxK.shape[-1]:
    raise ValueError(f"q/k: expected equal leading axes and d_k, got shapes {q_BxTxK.shape} and "
                     f"{k_BxSxK.shape}")
  t, s, d_k = q_BxTxK.shape[-2], k_BxSxK.shape[-2], q_BxTxK.shape[-1]
  logits_BxTxS = jnp.einsum("...tk,...sk->...ts", q_BxTxK, k_BxSxK) / jnp.sqrt(
      jnp.asarray(d_k, q_BxTxK.dtype))
  allowed_BxTxS = jnp.ones(logits_BxTxS.shape, dtype=bool)
  if causal:
    tri_TxS = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + (s - t)
    allowed_BxTxS = allowed_BxTxS & jnp.broadcast_to(tri_TxS, logits_BxTxS.shape)
  if mask is not None:
    mask = jnp.asarray(mask, dtype=bool)
    try:
      ok = np.broadcast_shapes(mask.shape, logits_BxTxS.shape) == logits_BxTxS.shape
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(f"mask: expected a shape broadcastable to {logits_BxTxS.shape}, got "
                       f"{mask.shape}")
    allowed_BxTxS = allowed_BxTxS & jnp.broadcast_to(mask, logits_BxTxS.shape)
  row_max_BxTx1 = jnp.max(jnp.where(allowed_BxTxS, logits_BxTxS, -jnp.inf), axis=-1,
                          keepdims=True)
  row_max_BxTx1 = jax.lax.stop_gradient(
      jnp.where(jnp.isfinite(row_max_BxTx1), row_max_BxTx1, 0.0))
  # Masked logits are replaced by the row max before exp, so no inf enters the gradient path.
  shifted_BxTxS = jnp.where(allowed_BxTxS, logits_BxTxS, row_max_BxTx1) - row_max_BxTx1
  weights_BxTxS = jnp.where(allowed_BxTxS, jnp.exp(shifted_BxTxS), 0.0)
  return weights_BxTxS / jnp.sum(weights_BxTxS, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# Argument handling.
# ----------------------------------------------------------------------------------------------


def _as_matrices(a: Any, name: str = "a_...xTxT", square: bool = True) -> np.ndarray:
  """float64 copy of `a`, checked to be `[..., M, N]` (square if asked), non-empty."""
  a = np.asarray(a, dtype=np.float64)
  if a.ndim < 2 or a.shape[-1] == 0 or a.shape[-2] == 0:
    raise ValueError(f"{name}: expected a non-empty array [..., T, T], got shape {a.shape}")
  if square and a.shape[-1] != a.shape[-2]:
    raise ValueError(f"{name}: expected square matrices [..., T, T], got shape {a.shape}")
  return a


def _check_row_stochastic(a: np.ndarray, atol: float = STOCHASTIC_ATOL) -> None:
  """Raises unless entries are finite, >= -atol, and every row sums to 1 within atol."""
  if not np.all(np.isfinite(a)):
    raise ValueError("a_...xTxT: expected finite entries (a fully masked row is NaN)")
  if np.any(a < -atol) or np.any(np.abs(a.sum(axis=-1) - 1.0) > atol):
    raise ValueError(f"a_...xTxT: expected row-stochastic matrices (entries >= 0, rows summing "
                     f"to 1 within {atol})")


def is_lower_triangular(a_BxTxT: Any) -> np.ndarray:
  """Per matrix: True when every entry strictly above the diagonal is exactly 0. Shape `[...]`."""
  a = _as_matrices(a_BxTxT)
  upper_TxT = np.triu(np.ones(a.shape[-2:], dtype=bool), k=1)
  return ~np.any(a[..., upper_TxT] != 0.0, axis=-1)


def _causal_flags(a: np.ndarray, causal: bool | None) -> np.ndarray:
  """Per-matrix causal flags `[...]` from the `causal` argument (see module docstring)."""
  if causal is None:
    return is_lower_triangular(a)
  if causal:
    if not np.all(is_lower_triangular(a)):
      raise ValueError("causal: True requires lower-triangular matrices (zeros above the "
                       "diagonal)")
    return np.ones(a.shape[:-2], dtype=bool)
  return np.zeros(a.shape[:-2], dtype=bool)


# ----------------------------------------------------------------------------------------------
# Eigenvalues and the stationary distribution.
# ----------------------------------------------------------------------------------------------


def _eigenvalues(a: np.ndarray, flags: np.ndarray) -> np.ndarray:
  t = a.shape[-1]
  a_NxTxT = a.reshape(-1, t, t)
  flags_N = flags.reshape(-1)
  lam_NxT = np.empty(a_NxTxT.shape[:2], dtype=np.complex128)
  lam_NxT[flags_N] = np.diagonal(a_NxTxT[flags_N], axis1=-2, axis2=-1)
  if np.any(~flags_N):
    lam_NxT[~flags_N] = np.linalg.eigvals(a_NxTxT[~flags_N])
  order_NxT = np.argsort(-np.abs(lam_NxT), axis=-1, kind="stable")
  return np.take_along_axis(lam_NxT, order_NxT, axis=-1).reshape(a.shape[:-1])


def eigenvalues(a_BxTxT: Any, causal: bool | None = None) -> np.ndarray:
  """Eigenvalues `[..., T]` (complex128), sorted by decreasing modulus.

  Causal (lower-triangular) matrices: exactly the diagonal A_tt (see module docstring);
  others: LAPACK's general eigensolver in float64.
  """
  a = _as_matrices(a_BxTxT)
  return _eigenvalues(a, _causal_flags(a, causal))


def spectral_radius(a_BxTxT: Any, causal: bool | None = None) -> np.ndarray:
  """max_i |lambda_i|, shape `[...]`; exactly 1 for a row-stochastic matrix."""
  return np.abs(eigenvalues(a_BxTxT, causal)[..., 0])


def second_eigenvalue_modulus(a_BxTxT: Any, causal: bool | None = None) -> np.ndarray:
  """|lambda_2|: second-largest eigenvalue modulus counted with multiplicity, shape `[...]`.

  For a causal matrix with A_00 = 1 this is the second-largest diagonal entry (the largest
  self-attention weight A_tt, t >= 1, unless another A_tt = 1). 0 when T = 1.
  """
  lam = eigenvalues(a_BxTxT, causal)
  if lam.shape[-1] < 2:
    return np.zeros(lam.shape[:-1])
  return np.abs(lam[..., 1])


def spectral_gap(a_BxTxT: Any, causal: bool | None = None) -> np.ndarray:
  """1 - |lambda_2| for row-stochastic A, shape `[...]`.

  0 when the chain is reducible with several closed classes (eigenvalue 1 repeated) or periodic
  (another eigenvalue on the unit circle); for causal A, 1 - max_{t>=1} A_tt.
  """
  a = _as_matrices(a_BxTxT)
  _check_row_stochastic(a)
  return 1.0 - second_eigenvalue_modulus(a, causal)


def _stationary(a: np.ndarray, flags: np.ndarray) -> np.ndarray:
  t = a.shape[-1]
  a_NxTxT = a.reshape(-1, t, t)
  flags_N = flags.reshape(-1)
  pi_NxT = np.zeros(a_NxTxT.shape[:2])
  pi_NxT[flags_N, 0] = 1.0
  if np.any(~flags_N):
    general_MxTxT = a_NxTxT[~flags_N]
    # pi (I - A) = 0 and pi 1 = 1, stacked as ((I - A)^T; 1^T) pi^T = (0, ..., 0, 1)^T.
    system_MxT1xT = np.concatenate(
        [np.swapaxes(np.eye(t)[None, :, :] - general_MxTxT, -1, -2),
         np.ones((general_MxTxT.shape[0], 1, t))], axis=-2)
    rhs_T1 = np.zeros(t + 1)
    rhs_T1[-1] = 1.0
    pi_MxT = np.linalg.pinv(system_MxT1xT) @ rhs_T1
    pi_MxT = np.clip(pi_MxT, 0.0, None)  # exact solution is >= 0; drop rounding noise
    pi_NxT[~flags_N] = pi_MxT / pi_MxT.sum(axis=-1, keepdims=True)
  return pi_NxT.reshape(a.shape[:-1])


def stationary_distribution(a_BxTxT: Any, causal: bool | None = None) -> np.ndarray:
  """A stationary distribution pi `[..., T]`: pi A = pi, pi >= 0, sum(pi) = 1.

  Causal A: pi = e_0 (row 0 of A is e_0). It is the only one unless some A_tt = 1 for t >= 1,
  in which case e_t is stationary too; e_0 is still returned.

  General A: the minimum-norm solution of ((I - A)^T; 1^T) pi^T = (0; 1), by pseudo-inverse.
  Irreducible A (periodic or not) has exactly one stationary distribution, and this is it
  (periodicity does not matter: pi A = pi is solved directly, no power iteration). Reducible A
  with closed classes c = 1..m has stationary laws pi_c with disjoint supports, every stationary
  vector is sum_c w_c pi_c with sum_c w_c = 1, and the minimum-norm one has
  w_c = (1 / ||pi_c||^2) / sum_c' (1 / ||pi_c'||^2) > 0: a genuine distribution, zero on the
  transient positions. Rounding negatives are clipped to 0 and the result renormalized.
  """
  a = _as_matrices(a_BxTxT)
  _check_row_stochastic(a)
  return _stationary(a, _causal_flags(a, causal))


# ----------------------------------------------------------------------------------------------
# Singular values, effective rank, entropy, attention sinks.
# ----------------------------------------------------------------------------------------------


def singular_values(m_BxMxN: Any) -> np.ndarray:
  """Singular values `[..., min(M, N)]`, decreasing, float64."""
  return np.linalg.svd(_as_matrices(m_BxMxN, "m_...xMxN", square=False), compute_uv=False)


def effective_rank(m_BxMxN: Any) -> np.ndarray:
  """Roy & Vetterli (2007): erank = exp(-sum_i p_i log p_i), p_i = sigma_i / sum_j sigma_j
  (`variance_effective_rank` weights by sigma_i^2 instead).

  Lies in [1, rank]: 1 for a rank-one matrix, n for I_n (or any matrix with n equal nonzero
  singular values). 0 for an all-zero matrix. Shape `[...]`.
  """
  return _effective_rank_from_singular_values(singular_values(m_BxMxN))


def variance_effective_rank(m_BxMxN: Any) -> np.ndarray:
  """exp of the entropy of the variance shares p_i = sigma_i^2 / sum_j sigma_j^2 (the principal
  components' shares of the squared Frobenius norm), the rank that weights directions by variance.

  Not `effective_rank` (p_i proportional to sigma_i): for the same matrix this one is smaller, as
  squaring concentrates the shares. Both are 1 for rank one and n for n equal singular values, 0 for
  an all-zero matrix. Shape `[...]`.
  """
  return _effective_rank_from_singular_values(singular_values(m_BxMxN) ** 2)


def _effective_rank_from_singular_values(s_BxR: np.ndarray) -> np.ndarray:
  total_Bx1 = s_BxR.sum(axis=-1, keepdims=True)
  p_BxR = np.divide(s_BxR, total_Bx1, out=np.zeros_like(s_BxR), where=total_Bx1 > 0)
  return np.where(total_Bx1[..., 0] > 0, np.exp(_entropy(p_BxR)), 0.0)


def _entropy(p: np.ndarray) -> np.ndarray:
  """-sum p log p over the last axis, with 0 log 0 = 0."""
  plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
  return -plogp.sum(axis=-1)


def row_entropy(a_BxTxS: Any) -> np.ndarray:
  """H_t = -sum_s A_ts log A_ts for each row, shape `[..., T]`; rows must be distributions."""
  a = _as_matrices(a_BxTxS, "a_...xTxS", square=False)
  _check_row_stochastic(a)
  return _entropy(a)


def _support_sizes(t: int, flags: np.ndarray) -> np.ndarray:
  """`[..., T]`: t + 1 for row t of a causal matrix, T otherwise."""
  causal_T = np.arange(1, t + 1, dtype=np.float64)
  return np.where(flags[..., None], causal_T, float(t))


def normalized_row_entropy(a_BxTxT: Any, causal: bool | None = None) -> np.ndarray:
  """H_t / log(n_t), n_t = positions row t may attend to: t + 1 if causal, T otherwise.

  In [0, 1]: 1 means uniform over the allowed positions, 0 one-hot. NaN where n_t = 1 (row 0 of
  a causal matrix, whose entropy is forced to 0 and carries no information). Shape `[..., T]`.
  """
  a = _as_matrices(a_BxTxT)
  _check_row_stochastic(a)
  return _normalized_row_entropy(a, _causal_flags(a, causal))


def _normalized_row_entropy(a: np.ndarray, flags: np.ndarray) -> np.ndarray:
  n_BxT = _support_sizes(a.shape[-1], flags)
  log_n_BxT = np.log(n_BxT)
  return np.divide(_entropy(a), log_n_BxT, out=np.full(n_BxT.shape, np.nan),
                   where=n_BxT > 1)


def sink_mass(a_BxTxT: Any, causal: bool | None = None) -> np.ndarray:
  """Mean attention weight on position 0 over query rows, shape `[...]`.

  Causal matrices exclude row 0 (it can only attend to position 0, so A_00 = 1 trivially and
  would inflate the mean by (1 - mean) / T): the mean is over rows 1..T-1. General matrices
  average all T rows. A 1 x 1 matrix gives 1.
  """
  a = _as_matrices(a_BxTxT)
  _check_row_stochastic(a)
  return _sink_mass(a, _causal_flags(a, causal))


def _sink_mass(a: np.ndarray, flags: np.ndarray) -> np.ndarray:
  col0_BxT = a[..., :, 0]
  if a.shape[-1] < 2:
    return col0_BxT[..., 0]
  return np.where(flags, col0_BxT[..., 1:].mean(axis=-1), col0_BxT.mean(axis=-1))


# ----------------------------------------------------------------------------------------------
# Entropy lower bounds (attention entropy collapse).
# ----------------------------------------------------------------------------------------------


def qk_spectral_norm(w_q_BxDxK: Any, w_k_BxDxK: Any) -> np.ndarray:
  """sigma = ||W_Q W_K^T||_2 / sqrt(d_k) for one head per leading index, shape `[...]`.

  Convention: q = x W_Q, k = x W_K (x a row vector of width D), so the logit between tokens i
  and j is x_i (W_Q W_K^T / sqrt(d_k)) x_j^T. Computed without forming the D x D product:
  with thin QR factorizations W_Q = U_Q R_Q, W_K = U_K R_K (U orthonormal columns),
  ||W_Q W_K^T||_2 = ||R_Q R_K^T||_2, a d_k x d_k problem.
  """
  w_q = _as_matrices(w_q_BxDxK, "w_q_...xDxK", square=False)
  w_k = _as_matrices(w_k_BxDxK, "w_k_...xDxK", square=False)
  if w_q.shape[-2:] != w_k.shape[-2:]:
    raise ValueError(f"w_q/w_k: expected equal [D, d_k], got {w_q.shape} and {w_k.shape}")
  r_q = np.linalg.qr(w_q, mode="r")
  r_k = np.linalg.qr(w_k, mode="r")
  core = r_q @ np.swapaxes(r_k, -1, -2)
  return np.linalg.svd(core, compute_uv=False)[..., 0] / np.sqrt(w_q.shape[-1])


def _nonnegative_and_counts(x, n, name: str) -> tuple[np.ndarray, np.ndarray]:
  """x (values >= 0, named `name` in errors) and n (integers >= 1) as broadcast float64 arrays."""
  x = np.asarray(x, dtype=np.float64)
  n = np.asarray(n, dtype=np.float64)
  if np.any(np.isnan(x)) or np.any(x < 0):
    raise ValueError(f"{name}: expected values >= 0")
  if np.any(n < 1) or np.any(n != np.round(n)):
    raise ValueError("n: expected integers >= 1")
  x, n = np.broadcast_arrays(x, n)
  return x, n


def zhai_entropy_lower_bound(sigma_logits: Any, n: Any) -> np.ndarray:
  """Zhai et al. (2023), Theorem 3.1: the attention entropy lower bound.

  Let sigma = ||W_K W_Q^T||_2 (here including the 1/sqrt(d_k) logit scale), sigma_x =
  ||X X^T||_2 = ||X||_2^2 for inputs X `[T, D]`, and s = sigma sigma_x (`sigma_logits`). Every
  row of A = softmax(X W_Q W_K^T X^T / sqrt(d_k)) then has

    Ent(A_i) >= log(1 + (T - 1) beta) + s sqrt(T (T - 1)) beta / (1 + (T - 1) beta),
    beta = exp(-s sqrt(T / (T - 1))).

  Why it holds: the logit vector of row i is z = X M^T x_i with M = W_Q W_K^T / sqrt(d_k), so
  ||z||_2 <= ||X||_2 sigma ||x_i|| <= s, and the centred logits are no longer. Among centred
  logits of l2 norm at most s, entropy is smallest (the paper's lemma) when one logit sits above
  T - 1 equal ones at full norm: gap g = s sqrt(T / (T - 1)), entropy log(1 + (T - 1) e^-g) +
  g (T - 1) e^-g / (1 + (T - 1) e^-g), which is the right-hand side. It is attained, decreases
  in s, and behaves like T s e^-s for large s: entropy can only collapse once s grows. `n` plays
  the role of T, so it can be a row's support size (t + 1 for causal row t); n = 1 gives 0.

  Args:
    sigma_logits: s >= 0, any shape.
    n: number of positions the row attends to (integer >= 1), broadcastable with s.

  Returns:
    The bound in nats, broadcast shape of s and n.
  """
  s, n = _nonnegative_and_counts(sigma_logits, n, "sigma_logits")
  n_minus_1 = n - 1.0
  beta = np.exp(-s * np.sqrt(n / np.maximum(n_minus_1, 1.0)))
  denom = 1.0 + n_minus_1 * beta
  second = np.where(beta > 0, s * np.sqrt(n * n_minus_1) * beta / denom, 0.0)
  return np.where(n > 1, np.log1p(n_minus_1 * beta) + second, 0.0)


def attention_entropy_lower_bound(w_q_BxDxK: Any, w_k_BxDxK: Any, x_BxTxD: Any,
                                  causal: bool = False) -> np.ndarray:
  """Per-row Zhai et al. (2023) entropy bound for a head's attention on inputs X, `[..., T]`.

  s = sigma sigma_x with sigma = `qk_spectral_norm(w_q, w_k)` and sigma_x = ||X||_2^2; row t
  uses n_t = t + 1 positions if causal (its logits over the prefix are still bounded by s), T
  otherwise. Leading axes of the weights `[..., D, d_k]` and inputs `[..., T, D]` broadcast.
  """
  x = _as_matrices(x_BxTxD, "x_...xTxD", square=False)
  sigma = qk_spectral_norm(w_q_BxDxK, w_k_BxDxK)
  if np.asarray(w_q_BxDxK).shape[-2] != x.shape[-1]:
    raise ValueError(f"x_...xTxD: expected width D = {np.asarray(w_q_BxDxK).shape[-2]}, got "
                     f"shape {x.shape}")
  sigma_x = np.linalg.svd(x, compute_uv=False)[..., 0] ** 2
  s = sigma * sigma_x
  t = x.shape[-2]
  n_T = np.arange(1, t + 1) if causal else np.full(t, t)
  return zhai_entropy_lower_bound(s[..., None], n_T)


def entropy_lower_bound_from_logit_range(r: Any, n: Any) -> np.ndarray:
  """Smallest entropy of softmax(z) over n logits with max(z) - min(z) <= r. Exact (attained).

  Derivation. Entropy H(z) = log sum_j e^{z_j} - sum_j p_j z_j is unchanged by shifting z, so
  take z in [-r, 0]^n. dH/dz_j = -p_j (z_j - zbar), zbar = sum_k p_k z_k. Writing t = z_j,
  S = sum_{k != j} e^{z_k}, m = sum_{k != j} z_k e^{z_k} / S (independent of t):
  z_j - zbar = S (t - m) / (e^t + S), so H rises for t < m and falls for t > m and its minimum
  over t in [-r, 0] is at an end. Moving coordinates to ends one at a time, some minimizer has k
  logits at 0 and n - k at -r (1 <= k <= n; k = 0 is the uniform case k = n). With c = e^-r and
  D_k = k + (n - k) c:  H_k = log D_k + r (n - k) c / D_k,  dH_k/dk = ((1 - c) D_k - r c n) /
  D_k^2. The numerator increases with k, so H_k falls then rises and the integer minimum is at
  floor or ceil of k*, where D_{k*} = r c n / (1 - c), clipped to [1, n]. (k* = 1 is not always
  the answer: for large n splitting the mass into two blocks of logits at the two ends lowers
  entropy more than one dominant logit when r is moderate.)

  Args:
    r: logit range >= 0 (any shape).
    n: number of logits, integer >= 1, broadcastable with r.

  Returns:
    The minimum entropy in nats; log n at r = 0, 0 at n = 1, -> 0 as r -> inf.
  """
  r, n = _nonnegative_and_counts(r, n, "r")
  c = np.exp(-r)
  one_minus_c = -np.expm1(-r)
  safe = one_minus_c > 0
  d_star = np.divide(r * c * n, one_minus_c, out=np.array(n, dtype=np.float64), where=safe)
  k_star = np.divide(d_star - n * c, one_minus_c, out=np.ones_like(n), where=safe)
  k_star = np.clip(np.nan_to_num(k_star, nan=1.0), 1.0, n)

  def h(k: np.ndarray) -> np.ndarray:
    d = k + (n - k) * c
    tail = np.where(c > 0, r * (n - k) * c / d, 0.0)
    return np.log(d) + tail

  return np.minimum(h(np.floor(k_star)), h(np.ceil(k_star)))


# ----------------------------------------------------------------------------------------------
# Rank collapse (Dong, Cordonnier & Loukas 2021).
# ----------------------------------------------------------------------------------------------


def matrix_norm(m_BxTxD: Any, norm: str = "fro") -> np.ndarray:
  """'fro': Frobenius. 'composite': sqrt(||M||_1 ||M||_inf), Dong et al.'s l1,inf norm, with
  ||M||_1 the largest absolute column sum and ||M||_inf the largest absolute row sum. `[...]`."""
  m = _as_matrices(m_BxTxD, "m_...xTxD", square=False)
  if norm == "fro":
    return np.sqrt(np.sum(m * m, axis=(-2, -1)))
  if norm == "composite":
    abs_m = np.abs(m)
    return np.sqrt(abs_m.sum(axis=-2).max(axis=-1) * abs_m.sum(axis=-1).max(axis=-1))
  raise ValueError(f"norm: expected one of {_NORMS}, got {norm!r}")


def rank_collapse_residual(x_BxTxD: Any, norm: str = "fro") -> np.ndarray:
  """res(X) = X - 1 x^T, the part of X `[..., T, D]` not explained by one shared token x.

  x minimizes ||X - 1 x^T|| for the chosen norm, or nearly:
    'fro': x = column mean, the exact minimizer (least squares, column by column).
    'composite': x = column median m. The median minimizes sum_t |X_tj - x_j| for each column j,
      so it exactly minimizes the ||.||_1 factor (largest column sum). It need not minimize the
      ||.||_inf factor, but it is within a factor sqrt(3) of the optimal composite norm: for the
      optimal x*, at least half the rows lie on the far side of m_j from x*_j, so
      |m_j - x*_j| <= (2/T) sum_t |X_tj - x*_j|; summing over j, ||1 (m - x*)^T||_inf <=
      2 ||X - 1 x*^T||_inf, hence ||X - 1 m^T||_inf <= 3 ||X - 1 x*^T||_inf. Zero exactly when
      all rows of X are equal, like the minimum.
  """
  x = _as_matrices(x_BxTxD, "x_...xTxD", square=False)
  if norm == "fro":
    center_BxD = x.mean(axis=-2)
  elif norm == "composite":
    center_BxD = np.median(x, axis=-2)
  else:
    raise ValueError(f"norm: expected one of {_NORMS}, got {norm!r}")
  return x - center_BxD[..., None, :]


def relative_residual(x_BxTxD: Any, norm: str = "fro") -> np.ndarray:
  """||res(X)|| / ||X|| in the chosen norm, shape `[...]`; 0 for X = 0.

  Pass hidden states stacked over layers (`[layers, ..., T, D]`) to follow the collapse with
  depth. Pure attention X <- A X drives it to 0: doubly exponentially in depth when A is
  computed from X (Dong et al. 2021), and at least geometrically for any sequence of
  row-stochastic A with all entries positive (each contracts the spread between rows).
  Skip connections X <- X + A X = (I + A) X slow the collapse: the eigenvalues 1 + lambda sit
  much closer to the top one, 2.
  """
  num = matrix_norm(rank_collapse_residual(x_BxTxD, norm), norm)
  den = matrix_norm(x_BxTxD, norm)
  return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


# ----------------------------------------------------------------------------------------------
# Everything at once.
# ----------------------------------------------------------------------------------------------


def attention_summary(a_BxTxT: Any, causal: bool | None = None) -> dict[str, Any]:
  """Spectral and entropy statistics of every matrix in `a_...xTxT` (T >= 2), as JSON-ready lists.

  Keys (shape per entry; `...` are the leading axes of the input):
    causal `[...]` (bool), spectral_radius, second_eigenvalue_modulus, spectral_gap,
    effective_rank, sink_mass, mean_row_entropy, mean_normalized_row_entropy (rows with more
    than one allowed position, i.e. causal row 0 left out), stationary_sink_mass (pi_0) `[...]`;
    eigenvalues_real, eigenvalues_imag (sorted by decreasing modulus), singular_values,
    stationary_distribution, row_entropy, normalized_row_entropy (causal row 0 reported as 0.0,
    as the mean leaves it out) `[..., T]`.
  All values are finite Python floats / bools in nested lists (`json.dumps(..., allow_nan=False)`
  works).
  """
  a = _as_matrices(a_BxTxT)
  if a.shape[-1] < 2:
    raise ValueError(f"a_...xTxT: expected T >= 2, got shape {a.shape}")
  _check_row_stochastic(a)
  flags = _causal_flags(a, causal)
  lam = _eigenvalues(a, flags)
  second = np.abs(lam[..., 1])
  pi = _stationary(a, flags)
  h = _entropy(a)
  h_norm = _normalized_row_entropy(a, flags)
  sv = np.linalg.svd(a, compute_uv=False)
  out = {
      "causal": flags,
      "spectral_radius": np.abs(lam[..., 0]),
      "second_eigenvalue_modulus": second,
      "spectral_gap": 1.0 - second,
      "effective_rank": _effective_rank_from_singular_values(sv),
      "sink_mass": _sink_mass(a, flags),
      "mean_row_entropy": h.mean(axis=-1),
      "mean_normalized_row_entropy": np.nanmean(h_norm, axis=-1),
      "stationary_sink_mass": pi[..., 0],
      "eigenvalues_real": lam.real,
      "eigenvalues_imag": lam.imag,
      "singular_values": sv,
      "stationary_distribution": pi,
      "row_entropy": h,
      "normalized_row_entropy": np.nan_to_num(h_norm, nan=0.0),
  }
  return {key: np.asarray(value).tolist() for key, value in out.items()}


# ----------------------------------------------------------------------------------------------
# Rank collapse with depth (Dong et al. 2021): residual streams layer by layer.
# ----------------------------------------------------------------------------------------------


def relative_residuals_by_layer(x_LxBxTxD: Any) -> dict:
  """Relative residuals of streams `[L, B, T, D]` as `[L]` lists: fro (Frobenius, mean over the B
  sequences), fro_min / fro_max (over sequences), composite (Dong et al.'s norm, mean).

  A stream that is exactly 0 (underflow) has no defined ratio: it is reported as None.
  """
  zero_LxB = matrix_norm(x_LxBxTxD) == 0
  fro_LxB = np.where(zero_LxB, np.nan, relative_residual(x_LxBxTxD, "fro"))
  composite_LxB = np.where(zero_LxB, np.nan, relative_residual(x_LxBxTxD, "composite"))
  as_list = lambda v: [None if math.isnan(x) else float(x) for x in v]
  return {"fro": as_list(fro_LxB.mean(axis=1)), "fro_min": as_list(fro_LxB.min(axis=1)),
          "fro_max": as_list(fro_LxB.max(axis=1)), "composite": as_list(composite_LxB.mean(axis=1))}


def uniform_causal_attention(t: int) -> np.ndarray:
  """U `[T, T]`: causal attention that has learned nothing, row t uniform over positions 0..t
  (U_ts = 1 / (t + 1) for s <= t, else 0). Its eigenvalues are its diagonal 1, 1/2, 1/3, ..."""
  return np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]


def uniform_causal_reference(x_BxTxD: Any, num_layers: int) -> list:
  """Mean Frobenius relative residual of U^l X, l = 0..num_layers, with U the uniform causal
  attention (`uniform_causal_attention`). U's eigenvalues are 1, 1/2, 1/3, ..., so U^l X converges
  to 1 x_0^T like 2^-l; uniform bidirectional attention (1 1^T / T) would make X rank one in a
  single layer."""
  u_TxT = uniform_causal_attention(np.shape(x_BxTxD)[1])
  xs = [np.asarray(x_BxTxD, np.float64)]
  for _ in range(num_layers):
    xs.append(np.einsum("ts,bsd->btd", u_TxT, xs[-1]))
  return relative_residuals_by_layer(np.stack(xs))["fro"]
