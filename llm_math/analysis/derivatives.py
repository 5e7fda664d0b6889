"""Closed-form derivatives of the pieces of a transformer, to set beside autodiff.

Every backward function here is written from the calculus, not from `jax.grad`; the tests check
each against `jax.jacobian` / `jax.grad` / `jax.vjp`. Vectors live on the last axis; leading axes
are batch axes and are carried through unchanged.
"""
import math

import jax
import jax.numpy as jnp

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_COEF = 0.044715


# ----------------------------------------------------------------------------------------------
# Softmax and softmax cross-entropy.
# ----------------------------------------------------------------------------------------------


def softmax_jacobian(logits_BxV: jax.Array) -> jax.Array:
  """Jacobian of p = softmax(z): dp_i/dz_j = p_i (delta_ij - p_j), i.e. J = diag(p) - p p^T.

  Args:
    logits_BxV: logits `[..., V]`.

  Returns:
    `[..., V, V]` with J[..., i, j] = dp_i / dz_j; symmetric, rows sum to 0, J 1 = 0.
  """
  p_BxV = jax.nn.softmax(logits_BxV, axis=-1)
  v = p_BxV.shape[-1]
  eye_VxV = jnp.eye(v, dtype=p_BxV.dtype).reshape((1,) * (p_BxV.ndim - 1) + (v, v))
  return p_BxV[..., :, None] * eye_VxV - p_BxV[..., :, None] * p_BxV[..., None, :]


def softmax_cross_entropy(logits_BxV: jax.Array, labels_B: jax.Array) -> jax.Array:
  """Per-example loss L = -log softmax(z)[y] = logsumexp(z) - z_y, shape `[...]`."""
  _check_labels(logits_BxV, labels_B)
  log_p = jax.nn.log_softmax(logits_BxV, axis=-1)
  return -jnp.take_along_axis(log_p, labels_B[..., None], axis=-1)[..., 0]


def softmax_cross_entropy_grad(logits_BxV: jax.Array, labels_B: jax.Array) -> jax.Array:
  """dL/dz = softmax(z) - onehot(y), shape `[..., V]` (per example; average yourself if needed)."""
  _check_labels(logits_BxV, labels_B)
  v = logits_BxV.shape[-1]
  return jax.nn.softmax(logits_BxV, axis=-1) - jax.nn.one_hot(labels_B, v, dtype=logits_BxV.dtype)


def _check_labels(logits_BxV: jax.Array, labels_B: jax.Array) -> None:
  if jnp.shape(labels_B) != jnp.shape(logits_BxV)[:-1]:
    raise ValueError(f"labels must have shape logits.shape[:-1]={jnp.shape(logits_BxV)[:-1]}, "
                     f"got {jnp.shape(labels_B)}")


# ----------------------------------------------------------------------------------------------
# LayerNorm.
# ----------------------------------------------------------------------------------------------


def _layer_norm_stats(x_BxD: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  """Returns (x_hat, rstd) with x_hat = (x - mean) * rstd, rstd = 1/sqrt(var + eps), biased var."""
  mean_Bx1 = jnp.mean(x_BxD, axis=-1, keepdims=True)
  centered_BxD = x_BxD - mean_Bx1
  var_Bx1 = jnp.mean(centered_BxD * centered_BxD, axis=-1, keepdims=True)
  rstd_Bx1 = jax.lax.rsqrt(var_Bx1 + eps)
  return centered_BxD * rstd_Bx1, rstd_Bx1


def _expand_param(param_D: jax.Array, ndim: int) -> jax.Array:
  return param_D.reshape((1,) * (ndim - 1) + param_D.shape)


def _check_layer_norm_params(x_BxD: jax.Array, gamma_D: jax.Array,
                             beta_D: jax.Array | None = None) -> None:
  d = jnp.shape(x_BxD)[-1]
  if jnp.shape(gamma_D) != (d,):
    raise ValueError(f"gamma must have shape ({d},), got {jnp.shape(gamma_D)}")
  if beta_D is not None and jnp.shape(beta_D) != (d,):
    raise ValueError(f"beta must have shape ({d},), got {jnp.shape(beta_D)}")


def layer_norm(x_BxD: jax.Array, gamma_D: jax.Array, beta_D: jax.Array,
               eps: float = 1e-6) -> jax.Array:
  """y = gamma * (x - mu) / sqrt(var + eps) + beta over the last axis (biased variance).

  Same convention as `flax.linen.LayerNorm(epsilon=eps)`.
  """
  _check_layer_norm_params(x_BxD, gamma_D, beta_D)
  x_hat_BxD, _ = _layer_norm_stats(x_BxD, eps)
  return (x_hat_BxD * _expand_param(gamma_D, x_BxD.ndim) + _expand_param(beta_D, x_BxD.ndim))


def layer_norm_input_grad_terms(
    dy_BxD: jax.Array, x_BxD: jax.Array, gamma_D: jax.Array,
    eps: float = 1e-6) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The three terms of dL/dx for LayerNorm, given the upstream gradient dy = dL/dy.

  With g = dy * gamma, r = 1/sqrt(var + eps), x_hat = (x - mu) r and means over the D features:

    dx = r g                       (direct: x moves x_hat with mu, var held fixed)
       - r mean(g)                 (mean correction: x also moves mu)
       - r x_hat mean(g * x_hat)   (variance correction: x also moves var)

  Returns:
    (direct, mean_correction, variance_correction), each `[..., D]`, signed so that they sum to dx.
    The two corrections project g onto the complement of span{1, x_hat}: dx . 1 = dx . x_hat = 0.
  """
  _check_layer_norm_params(x_BxD, gamma_D)
  if jnp.shape(dy_BxD) != jnp.shape(x_BxD):
    raise ValueError(f"dy must have the shape of x {jnp.shape(x_BxD)}, got {jnp.shape(dy_BxD)}")
  x_hat_BxD, rstd_Bx1 = _layer_norm_stats(x_BxD, eps)
  g_BxD = dy_BxD * _expand_param(gamma_D, x_BxD.ndim)
  direct_BxD = rstd_Bx1 * g_BxD
  mean_corr_BxD = -rstd_Bx1 * jnp.mean(g_BxD, axis=-1, keepdims=True) * jnp.ones_like(g_BxD)
  var_corr_BxD = -rstd_Bx1 * x_hat_BxD * jnp.mean(g_BxD * x_hat_BxD, axis=-1, keepdims=True)
  return direct_BxD, mean_corr_BxD, var_corr_BxD


def layer_norm_backward(dy_BxD: jax.Array, x_BxD: jax.Array, gamma_D: jax.Array,
                        eps: float = 1e-6) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Backward pass of `layer_norm`: (dx `[..., D]`, dgamma `[D]`, dbeta `[D]`).

  dx is the sum of `layer_norm_input_grad_terms`; dgamma = sum over batch of dy * x_hat;
  dbeta = sum over batch of dy.
  """
  direct, mean_corr, var_corr = layer_norm_input_grad_terms(dy_BxD, x_BxD, gamma_D, eps)
  x_hat_BxD, _ = _layer_norm_stats(x_BxD, eps)
  batch_axes = tuple(range(x_BxD.ndim - 1))
  dgamma_D = jnp.sum(dy_BxD * x_hat_BxD, axis=batch_axes)
  dbeta_D = jnp.sum(dy_BxD, axis=batch_axes)
  return direct + mean_corr + var_corr, dgamma_D, dbeta_D


# ----------------------------------------------------------------------------------------------
# Activations.
# ----------------------------------------------------------------------------------------------


def relu_grad(x: jax.Array) -> jax.Array:
  """d relu(x)/dx = 1[x > 0] (the subgradient 0 is taken at x = 0, as `jax.nn.relu` does)."""
  return (x > 0).astype(jnp.result_type(x, jnp.float32))


def gelu(x: jax.Array, approximate: bool = False) -> jax.Array:
  """GELU(x) = x Phi(x) (exact, erf form) or 0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3)))."""
  if approximate:
    u = _SQRT_2_OVER_PI * (x + _GELU_TANH_COEF * x ** 3)
    return 0.5 * x * (1.0 + jnp.tanh(u))
  return 0.5 * x * (1.0 + jax.lax.erf(x / math.sqrt(2.0)))


def gelu_grad(x: jax.Array, approximate: bool = False) -> jax.Array:
  """Derivative of `gelu`, elementwise.

  Exact:  Phi(x) + x phi(x), phi(x) = exp(-x^2/2) / sqrt(2 pi).
  Tanh:   0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2),
          u = sqrt(2/pi) (x + 0.044715 x^3).
  """
  if approximate:
    u = _SQRT_2_OVER_PI * (x + _GELU_TANH_COEF * x ** 3)
    t = jnp.tanh(u)
    du_dx = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_COEF * x ** 2)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du_dx
  cdf = 0.5 * (1.0 + jax.lax.erf(x / math.sqrt(2.0)))
  pdf = jnp.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
  return cdf + x * pdf


# ----------------------------------------------------------------------------------------------
# Single-head attention.
# ----------------------------------------------------------------------------------------------


def _check_attention_args(q_TxD, k_SxD, v_SxE, causal, bias_TxS):
  q_shape, k_shape, v_shape = jnp.shape(q_TxD), jnp.shape(k_SxD), jnp.shape(v_SxE)
  if len(q_shape) < 2 or len(q_shape) != len(k_shape) or len(q_shape) != len(v_shape):
    raise ValueError(f"q, k, v must have the same rank >= 2, got shapes {q_shape}, {k_shape}, "
                     f"{v_shape}")
  if q_shape[-1] != k_shape[-1] or q_shape[:-2] != k_shape[:-2]:
    raise ValueError(f"k must have shape [..., S, {q_shape[-1]}] matching q {q_shape}, got "
                     f"{k_shape}")
  if v_shape[:-1] != k_shape[:-1]:
    raise ValueError(f"v must have shape {k_shape[:-1]} + (E,) matching k, got {v_shape}")
  if causal and q_shape[-2] != k_shape[-2]:
    raise ValueError(f"causal=True needs as many queries as keys, got T={q_shape[-2]}, "
                     f"S={k_shape[-2]}")
  if bias_TxS is not None and jnp.shape(bias_TxS) != (q_shape[-2], k_shape[-2]):
    raise ValueError(f"bias must have shape (T, S)=({q_shape[-2]}, {k_shape[-2]}), got "
                     f"{jnp.shape(bias_TxS)}")


def attention_weights(q_TxD: jax.Array, k_SxD: jax.Array, causal: bool = False,
                      bias_TxS: jax.Array | None = None) -> jax.Array:
  """P = softmax(Q K^T / sqrt(d_k) + M) over keys, shape `[..., T, S]`.

  M is the additive `bias_TxS` (0 / -inf for a boolean mask) plus, if `causal`, -inf above the
  diagonal (query t sees keys s <= t). A row masked everywhere gives NaN.
  """
  _check_attention_args(q_TxD, k_SxD, k_SxD, causal, bias_TxS)
  d_k = q_TxD.shape[-1]
  scores_TxS = jnp.einsum("...td,...sd->...ts", q_TxD, k_SxD) / math.sqrt(d_k)
  lead = (1,) * (scores_TxS.ndim - 2)
  if bias_TxS is not None:
    scores_TxS = scores_TxS + jnp.asarray(bias_TxS, scores_TxS.dtype).reshape(lead + bias_TxS.shape)
  if causal:
    t = scores_TxS.shape[-1]
    allowed_TxS = jnp.tril(jnp.ones((t, t), dtype=bool)).reshape(lead + (t, t))
    scores_TxS = jnp.where(allowed_TxS, scores_TxS, -jnp.inf)
  return jax.nn.softmax(scores_TxS, axis=-1)


def attention(q_TxD: jax.Array, k_SxD: jax.Array, v_SxE: jax.Array, causal: bool = False,
              bias_TxS: jax.Array | None = None) -> jax.Array:
  """O = softmax(Q K^T / sqrt(d_k) + M) V, shape `[..., T, E]` (leading axes are batch axes)."""
  _check_attention_args(q_TxD, k_SxD, v_SxE, causal, bias_TxS)
  p_TxS = attention_weights(q_TxD, k_SxD, causal, bias_TxS)
  return jnp.einsum("...ts,...se->...te", p_TxS, v_SxE)


def attention_backward(d_out_TxE: jax.Array, q_TxD: jax.Array, k_SxD: jax.Array,
                       v_SxE: jax.Array, causal: bool = False,
                       bias_TxS: jax.Array | None = None
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Closed-form gradients of `attention` given dO = dL/dO.

  With S = Q K^T / sqrt(d_k) + M, P = softmax_rows(S), O = P V:
    dV = P^T dO
    dP = dO V^T
    dS = P * (dP - rowsum(P * dP)),  where rowsum(P * dP) = rowsum(dO * O)   (softmax VJP)
    dQ = dS K / sqrt(d_k),   dK = dS^T Q / sqrt(d_k).
  Masked entries have P = 0, hence dS = 0: no gradient flows through them.

  Returns:
    (dq `[..., T, D]`, dk `[..., S, D]`, dv `[..., S, E]`).
  """
  _check_attention_args(q_TxD, k_SxD, v_SxE, causal, bias_TxS)
  out_shape = jnp.shape(q_TxD)[:-1] + jnp.shape(v_SxE)[-1:]
  if jnp.shape(d_out_TxE) != out_shape:
    raise ValueError(f"d_out must have the output shape {out_shape}, got {jnp.shape(d_out_TxE)}")
  scale = 1.0 / math.sqrt(q_TxD.shape[-1])
  p_TxS = attention_weights(q_TxD, k_SxD, causal, bias_TxS)
  out_TxE = jnp.einsum("...ts,...se->...te", p_TxS, v_SxE)
  dv_SxE = jnp.einsum("...ts,...te->...se", p_TxS, d_out_TxE)
  dp_TxS = jnp.einsum("...te,...se->...ts", d_out_TxE, v_SxE)
  row_Tx1 = jnp.sum(d_out_TxE * out_TxE, axis=-1, keepdims=True)
  ds_TxS = p_TxS * (dp_TxS - row_Tx1)
  dq_TxD = scale * jnp.einsum("...ts,...sd->...td", ds_TxS, k_SxD)
  dk_SxD = scale * jnp.einsum("...ts,...td->...sd", ds_TxS, q_TxD)
  return dq_TxD, dk_SxD, dv_SxE
