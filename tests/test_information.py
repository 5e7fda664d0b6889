"""llm_math.analysis.information: identities of entropy, cross-entropy, KL and mutual information."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_math.analysis import information as info


def _random_simplex(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """Random distributions along the last axis (Dirichlet(1)), float64."""
  x = rng.gamma(1.0, size=shape)
  return x / x.sum(axis=-1, keepdims=True)


def _np_entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
  with np.errstate(divide="ignore", invalid="ignore"):
    return -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=axis)


SHAPES = [(2,), (7,), (3, 5), (2, 4, 11)]


def test_units():
  assert info.nats_to_bits(math.log(2.0)) == pytest.approx(1.0)
  assert info.bits_to_nats(info.nats_to_bits(1.7)) == pytest.approx(1.7)
  assert info.perplexity(math.log(50.0)) == pytest.approx(50.0)
  # 2 bits/token over 3 tokens covering 12 chars = 0.5 bits/char.
  assert info.bits_per_char(2 * info.LN2, tokens=3, chars=12) == pytest.approx(0.5)
  with pytest.raises(ValueError, match="chars"):
    info.bits_per_char(1.0, tokens=3, chars=0)
  # 3 tokens of 2 nats over 12 bytes of UTF-8 text: 6 nats = 6 / ln 2 bits, / 12 bytes.
  assert info.bits_per_byte(2.0, tokens=3, num_bytes=12) == pytest.approx(0.5 / info.LN2)


@pytest.mark.parametrize("n", [1, 2, 10, 50257])
def test_entropy_of_uniform_is_log_n(n):
  p = jnp.full((n,), 1.0 / n)
  np.testing.assert_allclose(info.entropy(p), math.log(n), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(info.entropy_bits(p), math.log2(n), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(info.entropy_from_logits(jnp.zeros((n,))), math.log(n), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_entropy_matches_numpy_and_bounds(shape):
  rng = np.random.default_rng(0)
  p = _random_simplex(rng, shape)
  h = np.asarray(info.entropy(jnp.asarray(p, jnp.float32)))
  np.testing.assert_allclose(h, _np_entropy(p), rtol=1e-5, atol=1e-6)
  assert np.all(h >= -1e-6) and np.all(h <= math.log(shape[-1]) + 1e-5)


def test_entropy_with_zeros_and_axis():
  p = jnp.array([[0.5, 0.0, 0.5], [1.0, 0.0, 0.0]])
  np.testing.assert_allclose(info.entropy(p), [math.log(2.0), 0.0], atol=1e-7)
  # axis=0: columns of the transpose are the same distributions.
  np.testing.assert_allclose(info.entropy(p.T, axis=0), [math.log(2.0), 0.0], atol=1e-7)
  logits = jnp.array([0.0, -jnp.inf, 0.0])
  np.testing.assert_allclose(info.entropy_from_logits(logits), math.log(2.0), rtol=1e-6)
  grad = jax.grad(info.entropy_from_logits)(logits)
  assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("shape", SHAPES)
def test_cross_entropy_decomposes_into_entropy_plus_kl(shape):
  rng = np.random.default_rng(1)
  p = jnp.asarray(_random_simplex(rng, shape), jnp.float32)
  q = jnp.asarray(_random_simplex(rng, shape), jnp.float32)
  ce = info.cross_entropy(p, q)
  np.testing.assert_allclose(ce, info.entropy(p) + info.kl_divergence(p, q), rtol=1e-5, atol=1e-6)
  # numpy reference for the cross-entropy itself.
  np.testing.assert_allclose(ce, -np.sum(np.asarray(p) * np.log(np.asarray(q)), axis=-1),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_logit_forms_match_probability_forms(shape):
  rng = np.random.default_rng(2)
  logits_p = jnp.asarray(3.0 * rng.standard_normal(shape), jnp.float32)
  logits_q = jnp.asarray(3.0 * rng.standard_normal(shape), jnp.float32)
  p, q = jax.nn.softmax(logits_p), jax.nn.softmax(logits_q)
  np.testing.assert_allclose(info.entropy_from_logits(logits_p), info.entropy(p), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(info.cross_entropy_from_logits(p, logits_q), info.cross_entropy(p, q),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(info.kl_divergence_from_logits(logits_p, logits_q),
                             info.kl_divergence(p, q), rtol=1e-4, atol=1e-5)


def test_axis_argument():
  rng = np.random.default_rng(3)
  p = _random_simplex(rng, (4, 6))
  q = _random_simplex(rng, (4, 6))
  np.testing.assert_allclose(info.kl_divergence(p.T, q.T, axis=0), info.kl_divergence(p, q),
                             rtol=1e-6)
  np.testing.assert_allclose(info.cross_entropy(p.T, q.T, axis=0), info.cross_entropy(p, q),
                             rtol=1e-6)


def test_gibbs_inequality():
  rng = np.random.default_rng(4)
  p = jnp.asarray(_random_simplex(rng, (1000, 5)), jnp.float32)
  q = jnp.asarray(_random_simplex(rng, (1000, 5)), jnp.float32)
  kl = np.asarray(info.kl_divergence(p, q))
  assert np.all(kl >= 0.0)
  assert np.all(kl > 1e-6)  # distinct random pairs have strictly positive divergence
  np.testing.assert_allclose(info.kl_divergence(p, p), 0.0, atol=1e-6)
  np.testing.assert_allclose(info.kl_divergence_from_logits(jnp.log(p), jnp.log(p) + 3.0), 0.0,
                             atol=1e-6)
  # Infinite when q misses support of p; finite (zero terms) when p misses support of q.
  assert np.isinf(info.kl_divergence(jnp.array([0.5, 0.5]), jnp.array([1.0, 0.0])))
  assert np.isfinite(info.kl_divergence(jnp.array([1.0, 0.0]), jnp.array([0.5, 0.5])))


def test_kl_is_minimized_at_p_by_gradient():
  """The gradient of q -> KL(p || softmax(logits_q)) is softmax(logits_q) - p, zero at q = p."""
  p = jnp.array([0.1, 0.2, 0.7])
  logits_q = jnp.array([0.3, -1.0, 2.0])
  grad = jax.grad(lambda z: info.kl_divergence_from_logits(jnp.log(p), z))(logits_q)
  np.testing.assert_allclose(grad, jax.nn.softmax(logits_q) - p, atol=1e-6)
  grad_at_p = jax.grad(lambda z: info.kl_divergence_from_logits(jnp.log(p), z))(jnp.log(p))
  np.testing.assert_allclose(grad_at_p, 0.0, atol=1e-6)


@pytest.mark.parametrize("nx,ny", [(2, 2), (3, 5), (8, 4)])
def test_mutual_information_identity(nx, ny):
  rng = np.random.default_rng(5)
  joint = _random_simplex(rng, (nx * ny,)).reshape(nx, ny)
  mi = float(info.mutual_information(jnp.asarray(joint, jnp.float32)))
  h_x = _np_entropy(joint.sum(axis=1))
  h_y = _np_entropy(joint.sum(axis=0))
  h_xy = _np_entropy(joint.ravel())
  assert mi == pytest.approx(h_x + h_y - h_xy, rel=1e-4, abs=1e-6)
  assert mi > 0.0
  assert mi <= min(h_x, h_y) + 1e-6


def test_mutual_information_zero_for_product_and_max_for_copy():
  rng = np.random.default_rng(6)
  px = _random_simplex(rng, (4,))
  py = _random_simplex(rng, (6,))
  np.testing.assert_allclose(info.mutual_information(jnp.asarray(np.outer(px, py))), 0.0,
                             atol=1e-6)
  # Y = X: I(X; Y) = H(X); the zeros off the diagonal are handled as 0 log 0 = 0.
  np.testing.assert_allclose(info.mutual_information(jnp.asarray(np.diag(px))), _np_entropy(px),
                             rtol=1e-6)


def test_token_nll_matches_cross_entropy_with_one_hot():
  rng = np.random.default_rng(7)
  logits = jnp.asarray(rng.standard_normal((3, 4, 9)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 9, (3, 4)))
  one_hot = jax.nn.one_hot(labels, 9)
  np.testing.assert_allclose(info.token_nll(logits, labels),
                             info.cross_entropy_from_logits(one_hot, logits), rtol=1e-6)


def test_bad_arguments():
  with pytest.raises(ValueError, match="same shape"):
    info.kl_divergence(jnp.ones(3) / 3, jnp.ones(4) / 4)
  with pytest.raises(ValueError, match="joint_XxY"):
    info.mutual_information(jnp.ones(4) / 4)
  with pytest.raises(ValueError, match="labels"):
    info.token_nll(jnp.zeros((2, 5)), jnp.zeros((3,), jnp.int32))


# Zeros in p: a 0 log 0 term (index 1, also q = 0) and p = 0 < q terms (indices 3, 4).
P_WITH_ZEROS = np.array([0.5, 0.0, 0.3, 0.0, 0.2])
Q_FOR_ZEROS = np.array([0.1, 0.0, 0.2, 0.4, 0.3])


def _grad(f, *args, argnum=0):
  g = np.asarray(jax.grad(f, argnums=argnum)(*(jnp.asarray(a, jnp.float32) for a in args)))
  assert np.all(np.isfinite(g)), g
  return g


def test_entropy_gradient_at_zero_probabilities():
  """d/dp_i H(p) = -(log p_i + 1) where p_i > 0; the 0 log 0 terms give 0, not NaN."""
  p = P_WITH_ZEROS
  g = _grad(info.entropy, p)
  pos = p > 0
  np.testing.assert_allclose(g[pos], -(np.log(p[pos]) + 1.0), rtol=1e-6)
  np.testing.assert_array_equal(g[~pos], 0.0)
  np.testing.assert_allclose(_grad(info.entropy_bits, p)[pos], -(np.log(p[pos]) + 1.0) / math.log(2),
                             rtol=1e-6)


def test_cross_entropy_gradients_at_zero_probabilities():
  """d/dp_i H(p, q) = -log q_i (exact at p_i = 0 < q_i too); d/dq_i = -p_i / q_i; 0 at 0 log 0."""
  p, q = P_WITH_ZEROS, Q_FOR_ZEROS
  g_p = _grad(info.cross_entropy, p, q, argnum=0)
  g_q = _grad(info.cross_entropy, p, q, argnum=1)
  q_pos = q > 0
  np.testing.assert_allclose(g_p[q_pos], -np.log(q[q_pos]), rtol=1e-6)
  np.testing.assert_allclose(g_q[q_pos], -p[q_pos] / q[q_pos], rtol=1e-6)
  np.testing.assert_array_equal(g_p[~q_pos], 0.0)
  np.testing.assert_array_equal(g_q[~q_pos], 0.0)


def test_kl_gradients_at_zero_probabilities():
  """d/dp_i KL = log(p_i / q_i) + 1 and d/dq_i KL = -p_i / q_i where p_i > 0; finite elsewhere."""
  p, q = P_WITH_ZEROS, Q_FOR_ZEROS
  g_p = _grad(info.kl_divergence, p, q, argnum=0)
  g_q = _grad(info.kl_divergence, p, q, argnum=1)
  pos = p > 0
  np.testing.assert_allclose(g_p[pos], np.log(p[pos] / q[pos]) + 1.0, rtol=1e-6)
  np.testing.assert_allclose(g_q[pos], -p[pos] / q[pos], rtol=1e-6)
  np.testing.assert_array_equal(g_q[~pos], 0.0)
  # p_i = 0 < q_i: the p log p part contributes 0, the cross-entropy part its exact -log q_i.
  np.testing.assert_allclose(g_p[3], -np.log(0.4), rtol=1e-6)
  np.testing.assert_array_equal(g_p[1], 0.0)


def test_values_keep_their_conventions_with_safe_logs():
  """0 log 0 = 0 and q = 0 < p gives +inf, for the values; jit gives the same."""
  p, q = jnp.asarray(P_WITH_ZEROS), jnp.asarray(Q_FOR_ZEROS)
  expected_h = -np.sum(P_WITH_ZEROS[[0, 2, 4]] * np.log(P_WITH_ZEROS[[0, 2, 4]]))
  np.testing.assert_allclose(jax.jit(info.entropy)(p), expected_h, rtol=1e-6)
  expected_ce = -np.sum(P_WITH_ZEROS[[0, 2, 4]] * np.log(Q_FOR_ZEROS[[0, 2, 4]]))
  np.testing.assert_allclose(info.cross_entropy(p, q), expected_ce, rtol=1e-6)
  assert np.isposinf(info.cross_entropy(jnp.array([0.5, 0.5]), jnp.array([1.0, 0.0])))
  assert np.isposinf(info.kl_divergence(jnp.array([0.5, 0.5]), jnp.array([1.0, 0.0])))


def test_mutual_information_gradient_at_zero_joint_entries():
  """For Y = X, dI/dp(x, y) = log(p(x, y) / (p(x) p(y))) - 1 = -log p(x) - 1 on the diagonal."""
  px = np.array([0.2, 0.3, 0.5])
  g = _grad(info.mutual_information, np.diag(px))
  np.testing.assert_allclose(np.diag(g), -np.log(px) - 1.0, rtol=1e-5)


def test_logit_forms_have_finite_gradients_with_zero_probabilities():
  """-inf logits (p = 0 exactly) in p or q's support gaps: gradients stay finite."""
  logits_p = jnp.array([0.0, -jnp.inf, 1.0, -jnp.inf])
  logits_q = jnp.array([0.5, -jnp.inf, -1.0, 2.0])
  p = jax.nn.softmax(logits_p)
  for f, args in ((info.kl_divergence_from_logits, (logits_p, logits_q)),
                  (info.cross_entropy_from_logits, (p, logits_q))):
    for argnum in (0, 1):
      g = jax.grad(f, argnums=argnum)(*args)
      assert np.all(np.isfinite(np.asarray(g))), (f.__name__, argnum, g)
  # d/dz_q H(p, softmax(z_q)) = softmax(z_q) - p, also where p = 0.
  np.testing.assert_allclose(jax.grad(info.cross_entropy_from_logits, argnums=1)(p, logits_q),
                             jax.nn.softmax(logits_q) - p, atol=1e-6)
