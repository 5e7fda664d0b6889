"""Tests for llm_math.analysis.distillation: the soft/hard distillation loss and its gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_math.analysis import distillation as ds


def logits(seed, shape, scale=2.0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape) * scale


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 11), (1, 2)])
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 0.3), (4.0, 1.0), (0.5, 0.0)])
def test_loss_matches_float64_reference(shape, temperature, alpha):
  s, t = logits(0, shape), logits(1, shape)
  labels = jax.random.randint(jax.random.PRNGKey(2), shape[:-1], 0, shape[-1])
  log_p = np_log_softmax(np.asarray(t) / temperature)
  log_q = np_log_softmax(np.asarray(s) / temperature)
  kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
  ce = -np.take_along_axis(np_log_softmax(s), np.asarray(labels)[..., None], axis=-1)[..., 0]
  expected = np.mean(alpha * temperature**2 * kl + (1 - alpha) * ce)
  got = ds.distillation_loss(s, t, labels, temperature, alpha)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ds.soft_kl(s, t, temperature), kl, rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(ds.soft_kl(s, t, temperature)) >= -1e-6)


def test_kl_zero_iff_same_distribution():
  s = logits(3, (4, 9))
  np.testing.assert_allclose(ds.soft_kl(s, s, 3.0), 0.0, atol=1e-6)
  # Softmax is shift invariant per token.
  np.testing.assert_allclose(ds.soft_kl(s + 5.0, s, 3.0), 0.0, atol=1e-5)
  assert float(jnp.min(ds.soft_kl(s, logits(4, (4, 9)), 3.0))) > 1e-3


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0, 10.0])
def test_soft_gradient_is_q_minus_p_over_t(temperature):
  s, t = logits(5, (6, 13)), logits(6, (6, 13))
  # Per token (sum over tokens so that each token's gradient is its own):
  grad = jax.grad(lambda s: jnp.sum(ds.soft_kl(s, t, temperature)))(s)
  q, p = jax.nn.softmax(s / temperature), jax.nn.softmax(t / temperature)
  np.testing.assert_allclose(grad, (q - p) / temperature, rtol=1e-4, atol=1e-6)
  # Through the full loss with alpha = 1: T^2 (q - p) / T / N = T (q - p) / N.
  labels = jnp.zeros((6,), jnp.int32)
  grad_loss = jax.grad(lambda s: ds.distillation_loss(s, t, labels, temperature, 1.0))(s)
  np.testing.assert_allclose(grad_loss, temperature * (q - p) / 6, rtol=1e-4, atol=1e-6)
  # No gradient flows into the teacher.
  grad_t = jax.grad(lambda t: ds.distillation_loss(s, t, labels, temperature, 1.0))(t)
  assert not np.any(np.asarray(grad_t))


def test_hard_gradient_is_softmax_minus_onehot():
  s, t = logits(7, (5, 8)), logits(8, (5, 8))
  labels = jnp.array([0, 3, 7, 2, 2])
  grad = jax.grad(lambda s: ds.distillation_loss(s, t, labels, 2.0, 0.0))(s)
  np.testing.assert_allclose(grad, (jax.nn.softmax(s) - jax.nn.one_hot(labels, 8)) / 5,
                             rtol=1e-5, atol=1e-7)


def test_t_squared_keeps_gradient_scale():
  """The soft gradient (q - p)/T shrinks like 1/T^2; T^2 (q - p)/T = T (q - p) tends to
  ((s - mean s) - (t - mean t)) / V. Numeric example (V = 10, logits ~ N(0, 4), one token):

    T           1       2       4       8       16      32
    |grad KL|   0.988   0.273   0.0634  0.0148  0.00354 0.000866
    |T^2 grad|  0.988   1.091   1.015   0.946   0.907   0.887    (limit 0.867)
  """
  s, t = logits(0, (1, 10)), logits(1, (1, 10))  # same draw as the table
  norms, scaled = [], []
  for temperature in (1.0, 2.0, 4.0, 8.0, 16.0, 32.0):
    g = jax.grad(lambda s: jnp.sum(ds.soft_kl(s, t, temperature)))(s)
    norms.append(float(jnp.linalg.norm(g)))
    scaled.append(float(jnp.linalg.norm(temperature**2 * g)))
  limit = float(jnp.linalg.norm(((s - jnp.mean(s)) - (t - jnp.mean(t))) / 10))
  # Without T^2 the gradient falls ~4x per doubling of T (at large T) ...
  np.testing.assert_allclose(np.array(norms[3:-1]) / np.array(norms[4:]), 4.0, rtol=0.05)
  assert norms[-1] < 2e-3 * norms[0]
  # ... with T^2 it stays within a factor 1.5 of its T = 1 value and converges to the limit.
  assert max(scaled) / min(scaled) < 1.5
  np.testing.assert_allclose(scaled[-1], limit, rtol=0.03)
  np.testing.assert_allclose([norms[0], norms[3], scaled[3]], [0.9883, 0.01478, 0.9458], rtol=1e-3)


def test_weights_mask_averages_over_kept_tokens():
  s, t = logits(9, (3, 4, 6)), logits(10, (3, 4, 6))
  labels = jax.random.randint(jax.random.PRNGKey(11), (3, 4), 0, 6)
  mask = jnp.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], jnp.float32)
  keep = np.asarray(mask, bool)
  got = ds.distillation_loss(s, t, labels, 2.0, 0.7, weights_N=mask)
  ref = ds.distillation_loss(s[keep], t[keep], labels[keep], 2.0, 0.7)
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  ones = ds.distillation_loss(s, t, labels, 2.0, 0.7, weights_N=jnp.ones((3, 4)))
  np.testing.assert_allclose(ones, ds.distillation_loss(s, t, labels, 2.0, 0.7), rtol=1e-6)


def test_bad_arguments():
  s, t = logits(0, (2, 5)), logits(1, (2, 5))
  labels = jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match="temperature"):
    ds.distillation_loss(s, t, labels, 0.0)
  with pytest.raises(ValueError, match="alpha"):
    ds.distillation_loss(s, t, labels, 1.0, 1.5)
  with pytest.raises(ValueError, match="teacher_logits"):
    ds.distillation_loss(s, t[:, :4], labels)
  with pytest.raises(ValueError, match="labels"):
    ds.distillation_loss(s, t, jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="weights"):
    ds.distillation_loss(s, t, labels, weights_N=jnp.ones((3,)))
