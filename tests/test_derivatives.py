"""Closed-form derivatives in llm_math.analysis.derivatives against JAX autodiff, in float64."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_math.analysis import derivatives as d


from tests.helpers import x64 as _x64


@pytest.fixture(autouse=True)
def float64():
  with _x64():
    yield


def _normal(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> jax.Array:
  # numpy draws: eager jax.random would compile a sampler per shape, which dominates run time.
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float64)


TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("v", [1, 2, 5, 17])
def test_softmax_jacobian_matches_autodiff(v):
  z = _normal(0, (v,), 3.0)
  jac, ref = jax.jit(lambda x: (d.softmax_jacobian(x), jax.jacobian(jax.nn.softmax)(x)))(z)
  np.testing.assert_allclose(jac, ref, **TOL)
  np.testing.assert_allclose(jac, jac.T, **TOL)
  np.testing.assert_allclose(jac.sum(axis=-1), 0.0, atol=1e-12)
  # PSD with the all-ones vector in the null space: eigenvalues in [0, 1).
  eig = np.linalg.eigvalsh(np.asarray(jac))
  assert eig.min() > -1e-12 and eig.max() < 1.0


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 6)])
def test_softmax_jacobian_batched(shape):
  z = _normal(1, shape, 2.0)
  flat_z = z.reshape(-1, shape[-1])
  jac, ref = jax.jit(lambda x, fx: (d.softmax_jacobian(x),
                                    jax.vmap(jax.jacobian(jax.nn.softmax))(fx)))(z, flat_z)
  ref = ref.reshape(shape + shape[-1:])
  np.testing.assert_allclose(jac, ref, **TOL)


@pytest.mark.parametrize("shape", [(5,), (4, 7), (2, 3, 11)])
def test_softmax_cross_entropy_grad(shape):
  z = _normal(2, shape, 2.0)
  labels = jnp.asarray(np.random.default_rng(3).integers(0, shape[-1], shape[:-1]))
  # Examples are independent, so the grad of the summed loss holds each example's gradient.
  loss, mine, ref = jax.jit(lambda x: (
      d.softmax_cross_entropy(x, labels),
      d.softmax_cross_entropy_grad(x, labels),
      jax.grad(lambda y: d.softmax_cross_entropy(y, labels).sum())(x)))(z)
  np.testing.assert_allclose(mine, ref, **TOL)
  z_np, labels_np = np.asarray(z), np.asarray(labels)
  log_p = z_np - np.log(np.exp(z_np).sum(-1, keepdims=True))
  np.testing.assert_allclose(loss, -np.take_along_axis(log_p, labels_np[..., None], -1)[..., 0],
                             **TOL)
  np.testing.assert_allclose(np.asarray(mine).sum(axis=-1), 0.0, atol=1e-12)


@pytest.mark.parametrize("shape", [(8,), (3, 16), (2, 4, 5)])
@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_layer_norm_forward_matches_flax(shape, eps):
  x = _normal(4, shape, 2.0) + 1.5
  gamma = _normal(5, shape[-1:]) + 1.0
  beta = _normal(6, shape[-1:])
  module = nn.LayerNorm(epsilon=eps, param_dtype=jnp.float64, dtype=jnp.float64)
  params = {"params": {"scale": gamma, "bias": beta}}
  mine, ref = jax.jit(lambda x_: (d.layer_norm(x_, gamma, beta, eps), module.apply(params, x_)))(x)
  np.testing.assert_allclose(mine, ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("shape", [(8,), (3, 16), (2, 4, 5)])
@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_layer_norm_backward_matches_vjp(shape, eps):
  x = _normal(7, shape, 2.0) + 1.5
  gamma = _normal(8, shape[-1:]) + 1.0
  beta = _normal(9, shape[-1:])
  dy = _normal(10, shape)

  @jax.jit
  def both(dy, x, gamma, beta):
    _, vjp = jax.vjp(lambda x_, g_, b_: d.layer_norm(x_, g_, b_, eps), x, gamma, beta)
    return d.layer_norm_backward(dy, x, gamma, eps), vjp(dy)

  (dx, dgamma, dbeta), (ref_dx, ref_dgamma, ref_dbeta) = both(dy, x, gamma, beta)
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-9, atol=1e-11)
  np.testing.assert_allclose(dgamma, ref_dgamma, rtol=1e-9, atol=1e-11)
  np.testing.assert_allclose(dbeta, ref_dbeta, rtol=1e-9, atol=1e-11)


def test_layer_norm_grad_terms_structure():
  """Direct term alone is wrong; with both corrections dx is orthogonal to 1 and to x_hat."""
  x = _normal(11, (4, 32), 3.0) - 2.0
  gamma = _normal(12, (32,)) + 1.0
  dy = _normal(13, (4, 32))
  eps = 0.0  # dx . x_hat = 0 is exact only for eps = 0 (sum x_hat^2 = D var / (var + eps)).
  terms, ref_dx = jax.jit(lambda dy_, x_: (
      d.layer_norm_input_grad_terms(dy_, x_, gamma, eps),
      jax.vjp(lambda u: d.layer_norm(u, gamma, jnp.zeros(32), eps), x_)[1](dy_)[0]))(dy, x)
  direct, mean_corr, var_corr = (np.asarray(t) for t in terms)
  ref_dx = np.asarray(ref_dx)
  np.testing.assert_allclose(direct + mean_corr + var_corr, ref_dx, rtol=1e-9, atol=1e-11)
  assert np.abs(direct - ref_dx).max() > 1e-3
  assert np.abs(direct + mean_corr - ref_dx).max() > 1e-3
  x_np = np.asarray(x)
  x_hat = (x_np - x_np.mean(-1, keepdims=True)) / np.sqrt(x_np.var(-1, keepdims=True) + eps)
  np.testing.assert_allclose(ref_dx.sum(-1), 0.0, atol=1e-10)
  np.testing.assert_allclose((ref_dx * x_hat).sum(-1), 0.0, atol=1e-9)
  # Mean correction is constant across features.
  np.testing.assert_allclose(mean_corr, np.broadcast_to(mean_corr[:, :1], mean_corr.shape), **TOL)


def test_relu_grad():
  x = jnp.asarray(np.append(np.asarray(_normal(14, (50,))), 0.0))
  mine, ref = jax.jit(lambda u: (d.relu_grad(u), jax.vmap(jax.grad(jax.nn.relu))(u)))(x)
  np.testing.assert_allclose(mine, ref, **TOL)


@pytest.mark.parametrize("approximate", [False, True])
@pytest.mark.parametrize("shape", [(101,), (4, 9)])
def test_gelu_and_grad_match_jax(approximate, shape):
  x = _normal(15, shape, 3.0)
  np.testing.assert_allclose(d.gelu(x, approximate), jax.nn.gelu(x, approximate=approximate),
                             rtol=1e-12, atol=1e-14)
  mine, ref, ref_jax = jax.jit(lambda y: (
      d.gelu_grad(y, approximate),
      jax.grad(lambda u: d.gelu(u, approximate).sum())(y),
      jax.grad(lambda u: jax.nn.gelu(u, approximate=approximate).sum())(y)))(x)
  np.testing.assert_allclose(mine, ref, **TOL)
  np.testing.assert_allclose(mine, ref_jax, rtol=1e-10, atol=1e-12)


def test_gelu_tanh_is_close_to_exact():
  x = jnp.asarray(np.linspace(-6.0, 6.0, 1201))
  diffs = jax.jit(lambda u: (d.gelu(u, True) - d.gelu(u, False),
                             d.gelu_grad(u, True) - d.gelu_grad(u, False)))(x)
  assert np.abs(np.asarray(diffs[0])).max() < 5e-4
  assert np.abs(np.asarray(diffs[1])).max() < 5e-3


def _attention_numpy(q, k, v, causal):
  q, k, v = (np.asarray(a) for a in (q, k, v))
  s = q @ k.T / np.sqrt(q.shape[-1])
  if causal:
    s = np.where(np.tril(np.ones(s.shape, bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return p @ v


@functools.partial(jax.jit, static_argnames="causal")
def _attention_and_grads(d_out, q, k, v, causal, bias=None):
  """(output, closed-form grads, autodiff grads), compiled once per shape."""
  out, vjp = jax.vjp(lambda q_, k_, v_: d.attention(q_, k_, v_, causal, bias), q, k, v)
  return out, d.attention_backward(d_out, q, k, v, causal, bias), vjp(d_out)


ATTN_SHAPES = [
    ((1, 4), (1, 4), (1, 3)),
    ((5, 8), (7, 8), (7, 3)),
    ((6, 4), (6, 4), (6, 4)),
    ((2, 6, 4), (2, 6, 4), (2, 6, 5)),
]


@pytest.mark.parametrize("shapes,causal", [
    (shapes, causal) for shapes in ATTN_SHAPES for causal in (False, True)
    if not causal or shapes[0][-2] == shapes[1][-2]])  # causal needs T == S
def test_attention_backward_matches_vjp(shapes, causal):
  q_shape, k_shape, v_shape = shapes
  q, k, v = _normal(16, q_shape, 1.5), _normal(17, k_shape, 1.5), _normal(18, v_shape)
  d_out = _normal(19, q_shape[:-1] + v_shape[-1:])
  out, mine_grads, ref_grads = _attention_and_grads(d_out, q, k, v, causal)
  if len(q_shape) == 2:
    np.testing.assert_allclose(out, _attention_numpy(q, k, v, causal), **TOL)
  for mine, ref in zip(mine_grads, ref_grads):
    np.testing.assert_allclose(mine, ref, rtol=1e-9, atol=1e-11)


def test_attention_with_bias_and_causal_masking():
  t, dk = 5, 4
  q, k, v = _normal(20, (t, dk)), _normal(21, (t, dk)), _normal(22, (t, 3))
  bias = _normal(23, (t, t))
  d_out = _normal(24, (t, 3))
  _, mine_grads, ref_grads = _attention_and_grads(d_out, q, k, v, True, bias)
  for mine, ref in zip(mine_grads, ref_grads):
    np.testing.assert_allclose(mine, ref, rtol=1e-9, atol=1e-11)
  # Causal: the first output row is v[0]; the last value is seen only by the last query.
  causal_bias = jnp.asarray(np.where(np.tril(np.ones((t, t), bool)), 0.0, -np.inf))
  out, (_, _, dv), _ = _attention_and_grads(d_out, q, k, v, True)
  p, p_bias = jax.jit(lambda q_, k_, b_: (d.attention_weights(q_, k_, causal=True),
                                          d.attention_weights(q_, k_, bias_TxS=b_))
                      )(q, k, causal_bias)
  p = np.asarray(p)
  np.testing.assert_allclose(np.triu(p, 1), 0.0)
  np.testing.assert_allclose(out[0], v[0], **TOL)
  # A -inf additive bias is the same mask.
  np.testing.assert_allclose(p_bias, p, **TOL)
  np.testing.assert_allclose(dv[-1], p[-1, -1] * np.asarray(d_out[-1]), **TOL)


def test_bad_arguments():
  x = jnp.ones((2, 4))
  with pytest.raises(ValueError, match="gamma"):
    d.layer_norm(x, jnp.ones(3), jnp.zeros(4))
  with pytest.raises(ValueError, match="labels"):
    d.softmax_cross_entropy_grad(x, jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="causal"):
    d.attention(jnp.ones((2, 4)), jnp.ones((3, 4)), jnp.ones((3, 2)), causal=True)
  with pytest.raises(ValueError, match="k must"):
    d.attention(jnp.ones((2, 4)), jnp.ones((3, 5)), jnp.ones((3, 2)))
  with pytest.raises(ValueError, match="d_out"):
    d.attention_backward(jnp.ones((2, 3)), jnp.ones((2, 4)), jnp.ones((3, 4)), jnp.ones((3, 2)))
