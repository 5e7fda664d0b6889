"""Tests for llm_math.analysis.sharpness: HVPs, power iteration, Lanczos and epsilon-sharpness on quadratics.

On L(x) = 0.5 x^T H x the Hessian is H everywhere, so every quantity has a closed form or a numpy
reference (`eigvalsh`). For a diagonal H = diag(h), h >= 0, L is a sum of convex 1-D parabolas, each
maximised over |delta_i| <= r_i at delta_i = sign(w_i) r_i, so the box maximum is
0.5 sum_i h_i (|w_i| + r_i)^2 exactly.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_math.analysis import sharpness


def _x64():
  """Scoped float64 (jax.enable_x64 where present, else the older experimental spelling)."""
  ctx = getattr(jax, "enable_x64", None)
  if ctx is None:
    from jax.experimental import enable_x64 as ctx  # pylint: disable=g-import-not-at-top
  return ctx(True)


def _symmetric(rng: np.random.Generator, eigvals: np.ndarray) -> np.ndarray:
  """H = Q diag(eigvals) Q^T with a random orthogonal Q."""
  q, _ = np.linalg.qr(rng.standard_normal((eigvals.size, eigvals.size)))
  return (q * eigvals[None, :]) @ q.T


def _quadratic(h_PxP):
  return lambda x: 0.5 * jnp.dot(x, jnp.dot(h_PxP, x))


def _tree_quadratic(h_PxP):
  """A quadratic on {'a': [2, 3], 'b': [4]} through an explicit concatenation (a first, then b)."""
  def flat(p):
    return jnp.concatenate([p["a"].reshape(-1), p["b"]])
  return (lambda p: 0.5 * jnp.dot(flat(p), jnp.dot(h_PxP, flat(p)))), flat


def _tree(rng: np.random.Generator):
  return {"a": jnp.asarray(rng.standard_normal((2, 3))), "b": jnp.asarray(rng.standard_normal(4))}


@pytest.mark.parametrize("n", [3, 20])
def test_hvp_matches_hessian_times_vector(n):
  rng = np.random.default_rng(n)
  with _x64():
    h = _symmetric(rng, rng.standard_normal(n))
    x, v = rng.standard_normal(n), rng.standard_normal(n)
    np.testing.assert_allclose(sharpness.hvp(_quadratic(jnp.asarray(h)), jnp.asarray(x),
                                             jnp.asarray(v)), h @ v, rtol=1e-12, atol=1e-12)
    # A non-quadratic term: sum log cosh x has Hessian diag(sech^2 x), so H(x) = H + diag(sech^2 x).
    quad = _quadratic(jnp.asarray(h))
    loss = lambda y: quad(y) + jnp.sum(jnp.log(jnp.cosh(y)))
    expected = h @ v + v / np.cosh(x) ** 2
    np.testing.assert_allclose(sharpness.hvp(loss, jnp.asarray(x), jnp.asarray(v)), expected,
                               rtol=1e-12, atol=1e-12)


def test_hvp_on_pytree_quadratic():
  rng = np.random.default_rng(0)
  with _x64():
    h = _symmetric(rng, rng.standard_normal(10))
    loss, flat = _tree_quadratic(jnp.asarray(h))
    params, v = _tree(rng), _tree(rng)
    out = sharpness.hvp(loss, params, v)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(params)
    np.testing.assert_allclose(flat(out), h @ np.asarray(flat(v)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n,seed", [(5, 0), (40, 2)])
def test_power_iteration_matches_eigvalsh(n, seed):
  rng = np.random.default_rng(seed)
  # Top eigenvalue well separated (ratio lambda_2 / lambda_1 <= 0.7) so 200 iterations suffice.
  eigvals = np.concatenate([rng.uniform(0.1, 7.0, n - 1), [10.0]])
  with _x64():
    h = _symmetric(rng, eigvals)
    lam, vec, iters = sharpness.hessian_top_eigenvalue(
        _quadratic(jnp.asarray(h)), jnp.zeros(n), jax.random.PRNGKey(seed), num_iters=200,
        tol=1e-14)
    w, u = np.linalg.eigh(h)
    np.testing.assert_allclose(lam, w[-1], rtol=1e-10)
    assert int(iters) < 200
    np.testing.assert_allclose(abs(np.dot(vec, u[:, -1])), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(h @ vec - w[-1] * np.asarray(vec)), 0.0, atol=1e-5)


def test_power_iteration_float32_and_tolerance_stop():
  rng = np.random.default_rng(3)
  h = _symmetric(rng, np.array([0.5, 1.0, 2.0, 3.0, 8.0]))
  lam, _, iters = sharpness.hessian_top_eigenvalue(
      _quadratic(jnp.asarray(h, jnp.float32)), jnp.zeros(5, jnp.float32), jax.random.PRNGKey(0),
      num_iters=500, tol=1e-5)
  assert lam.dtype == jnp.float32
  np.testing.assert_allclose(lam, 8.0, rtol=1e-4)
  assert 2 <= int(iters) < 500  # Stopped on the tolerance, not the cap.
  _, _, capped = sharpness.hessian_top_eigenvalue(
      _quadratic(jnp.asarray(h, jnp.float32)), jnp.zeros(5, jnp.float32), jax.random.PRNGKey(0),
      num_iters=3, tol=0.0)
  assert int(capped) == 3


def test_power_iteration_finds_largest_magnitude():
  """A dominant negative direction wins, as documented."""
  rng = np.random.default_rng(4)
  with _x64():
    h = _symmetric(rng, np.array([-10.0, 1.0, 2.0, 3.0]))
    lam, _, _ = sharpness.power_iteration(lambda v: jnp.asarray(h) @ v, jnp.ones(4), 500, 1e-14)
    np.testing.assert_allclose(lam, -10.0, rtol=1e-10)


def test_power_iteration_on_pytree_quadratic():
  rng = np.random.default_rng(5)
  with _x64():
    h = _symmetric(rng, np.concatenate([rng.uniform(-2.0, 3.0, 9), [6.0]]))
    loss, flat = _tree_quadratic(jnp.asarray(h))
    lam, vec, _ = sharpness.hessian_top_eigenvalue(loss, _tree(rng), jax.random.PRNGKey(1),
                                                   num_iters=300, tol=1e-14)
    np.testing.assert_allclose(lam, np.linalg.eigvalsh(h)[-1], rtol=1e-10)
    np.testing.assert_allclose(h @ np.asarray(flat(vec)), 6.0 * np.asarray(flat(vec)), atol=1e-5)


@pytest.mark.parametrize("n,seed", [(4, 0), (25, 2)])
def test_lanczos_full_krylov_space_gives_whole_spectrum(n, seed):
  rng = np.random.default_rng(seed)
  with _x64():
    h = _symmetric(rng, rng.standard_normal(n) * 3.0)
    res = sharpness.hessian_lanczos(_quadratic(jnp.asarray(h)), jnp.zeros(n),
                                    jax.random.PRNGKey(seed), num_steps=n)
    np.testing.assert_allclose(res.ritz_values, np.linalg.eigvalsh(h), rtol=1e-9, atol=1e-9)
    assert res.alphas.shape == (n,) and res.betas.shape == (n - 1,)


def test_lanczos_extremes_converge_first():
  """k = 30 << P = 120: the outlying extremes are exact, the bulk's Ritz values stay inside it."""
  rng = np.random.default_rng(7)
  eigvals = np.concatenate([np.linspace(-1.0, 1.0, 118), [-3.0, 5.0]])
  with _x64():
    h = _symmetric(rng, eigvals)
    res = sharpness.hessian_lanczos(_quadratic(jnp.asarray(h)), jnp.zeros(120),
                                    jax.random.PRNGKey(0), num_steps=30)
    ritz = np.asarray(res.ritz_values)
    np.testing.assert_allclose([ritz[0], ritz[-1]], [-3.0, 5.0], rtol=1e-10)
    assert np.all(np.diff(ritz) >= 0)
    assert np.all((ritz[1:-1] > -1.0 - 1e-9) & (ritz[1:-1] < 1.0 + 1e-9))  # Cauchy interlacing.
  # float32 top value from a pytree start.
  lam32 = sharpness.lanczos(lambda v: jnp.asarray(h, jnp.float32) @ v, jnp.ones(120, jnp.float32),
                            30, jax.random.PRNGKey(1)).ritz_values[-1]
  np.testing.assert_allclose(lam32, 5.0, rtol=1e-5)


def test_lanczos_restarts_after_invariant_subspace():
  """Two distinct eigenvalues: every Krylov space has dimension 2, so Lanczos must restart."""
  rng = np.random.default_rng(8)
  eigvals = np.array([1.0, 1.0, 1.0, 4.0, 4.0, 4.0])
  with _x64():
    h = _symmetric(rng, eigvals)
    res = sharpness.lanczos(lambda v: jnp.asarray(h) @ v, jnp.asarray(rng.standard_normal(6)), 6,
                            jax.random.PRNGKey(2))
    np.testing.assert_allclose(res.ritz_values, eigvals, atol=1e-10)
    assert np.sum(np.asarray(res.betas) == 0.0) >= 2
    assert np.all(np.isfinite(res.ritz_values))


def test_lanczos_on_pytree_quadratic():
  rng = np.random.default_rng(9)
  with _x64():
    h = _symmetric(rng, rng.standard_normal(10))
    loss, _ = _tree_quadratic(jnp.asarray(h))
    res = sharpness.hessian_lanczos(loss, _tree(rng), jax.random.PRNGKey(3), num_steps=10)
    np.testing.assert_allclose(res.ritz_values, np.linalg.eigvalsh(h), rtol=1e-9, atol=1e-9)


def _diag_box_max(h, w, eps):
  r = eps * (np.abs(w) + 1.0)
  return 0.5 * np.sum(h * (np.abs(w) + r) ** 2), np.sign(w) * r


@pytest.mark.parametrize("eps", [1e-3, 5e-4, 0.1])
def test_epsilon_sharpness_exact_on_diagonal_quadratic(eps):
  rng = np.random.default_rng(10)
  h = rng.uniform(0.1, 5.0, 8)
  w = rng.standard_normal(8)
  with _x64():
    loss = lambda x: 0.5 * jnp.sum(jnp.asarray(h) * x * x)
    out = sharpness.epsilon_sharpness(loss, jnp.asarray(w), epsilon=eps, num_steps=5)
    box_max, corner = _diag_box_max(h, w, eps)
    l0 = 0.5 * np.sum(h * w * w)
    np.testing.assert_allclose(out.loss, l0, rtol=1e-12)
    np.testing.assert_allclose(out.max_loss, box_max, rtol=1e-12)
    np.testing.assert_allclose(out.sharpness, 100.0 * (box_max - l0) / (1.0 + l0), rtol=1e-9)
    np.testing.assert_allclose(out.delta, corner, rtol=1e-12)


def test_epsilon_sharpness_random_start_at_stationary_point():
  """At w = 0 the gradient vanishes; a random start still reaches a corner, all corners tie."""
  h = np.array([1.0, 2.0, 3.0, 4.0])
  with _x64():
    loss = lambda x: 0.5 * jnp.sum(jnp.asarray(h) * x * x)
    stuck = sharpness.epsilon_sharpness(loss, jnp.zeros(4), epsilon=0.01)
    assert float(stuck.sharpness) == 0.0
    out = sharpness.epsilon_sharpness(loss, jnp.zeros(4), epsilon=0.01, key=jax.random.PRNGKey(0))
    np.testing.assert_allclose(out.sharpness, 100.0 * 0.5 * np.sum(h) * 0.01 ** 2, rtol=1e-12)


def test_epsilon_sharpness_grows_with_curvature_and_is_bounded_by_corners():
  rng = np.random.default_rng(11)
  n, eps = 6, 0.05
  h = _symmetric(rng, rng.uniform(0.2, 3.0, n))
  w = 0.3 * rng.standard_normal(n)
  with _x64():
    results = [sharpness.epsilon_sharpness(_quadratic(jnp.asarray(c * h)), jnp.asarray(w), eps)
               for c in (1.0, 10.0)]
    # Scaling H by c scales L and leaves sign(grad), hence the ascent path, unchanged:
    # phi(cH) = 100 c (M - L) / (1 + c L) > phi(H) whenever c > 1 and M > L.
    m1, l1 = float(results[0].max_loss), float(results[0].loss)
    assert m1 > l1
    np.testing.assert_allclose(results[1].sharpness, 100.0 * 10.0 * (m1 - l1) / (1.0 + 10.0 * l1),
                               rtol=1e-10)
    assert float(results[1].sharpness) > 2.0 * float(results[0].sharpness)
    # A convex function is maximised over a box at a vertex: enumerate all 2^n of them.
    r = eps * (np.abs(w) + 1.0)
    corners = np.array(list(itertools.product([-1.0, 1.0], repeat=n))) * r[None, :]
    for c, res in zip((1.0, 10.0), results):
      vals = 0.5 * np.einsum("ki,ij,kj->k", w[None, :] + corners, c * h, w[None, :] + corners)
      l0 = 0.5 * c * w @ h @ w
      assert float(res.max_loss) <= vals.max() * (1 + 1e-12)
      assert float(res.max_loss) >= l0
      assert np.all(np.abs(np.asarray(res.delta)) <= r * (1 + 1e-12))
      np.testing.assert_allclose(res.max_loss, _quadratic(jnp.asarray(c * h))(w + res.delta),
                                 rtol=1e-12)


def test_epsilon_sharpness_on_pytree():
  rng = np.random.default_rng(12)
  params = _tree(rng)
  h = {"a": jnp.asarray(rng.uniform(0.5, 2.0, (2, 3))), "b": jnp.asarray(rng.uniform(0.5, 2.0, 4))}
  with _x64():
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params)
    h = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), h)
    loss = lambda p: sum(0.5 * jnp.sum(h[k] * p[k] ** 2) for k in ("a", "b"))
    out = sharpness.epsilon_sharpness(loss, params, epsilon=1e-3)
    expected = sum(_diag_box_max(np.asarray(h[k]).ravel(), np.asarray(params[k]).ravel(), 1e-3)[0]
                   for k in ("a", "b"))
    np.testing.assert_allclose(out.max_loss, expected, rtol=1e-12)
    assert out.delta["a"].shape == (2, 3)


def test_bad_arguments_raise():
  loss = _quadratic(jnp.eye(3))
  with pytest.raises(ValueError, match="num_steps"):
    sharpness.hessian_lanczos(loss, jnp.zeros(3), jax.random.PRNGKey(0), num_steps=4)
  with pytest.raises(ValueError, match="num_iters"):
    sharpness.hessian_top_eigenvalue(loss, jnp.zeros(3), jax.random.PRNGKey(0), num_iters=0)
  with pytest.raises(ValueError, match="epsilon"):
    sharpness.epsilon_sharpness(loss, jnp.zeros(3), epsilon=0.0)
  with pytest.raises(ValueError, match="step_size"):
    sharpness.epsilon_sharpness(loss, jnp.zeros(3), step_size=-1.0)


def test_sharpness_record_on_diagonal_quadratics_compiles_once():
  """loss(x, h) = 0.5 sum h_i x_i^2: Lanczos with k = P steps gives max h and min h, and the
  epsilon-sharpness is the corner value of `_diag_box_max`; a second batch h reuses the compilation."""
  rng = np.random.default_rng(13)
  loss = lambda x, h_P: 0.5 * jnp.sum(h_P * x * x)
  with _x64():
    before = sharpness._sharpness_measures._cache_size()  # pylint: disable=protected-access
    for _ in range(2):
      h, w = rng.uniform(0.1, 5.0, 6), rng.standard_normal(6)
      out = sharpness.sharpness_record(loss, jnp.asarray(w), jnp.asarray(h), jax.random.PRNGKey(0),
                                       lanczos_steps=6, epsilon=1e-3, ascent_steps=4)
      l0 = 0.5 * np.sum(h * w * w)
      box_max, _ = _diag_box_max(h, w, 1e-3)
      np.testing.assert_allclose([out["hessian_top_eigenvalue"], out["hessian_bottom_ritz_value"]],
                                 [h.max(), h.min()], rtol=1e-9)
      np.testing.assert_allclose(out["sharpness_batch_loss"], l0, rtol=1e-12)
      np.testing.assert_allclose(out["epsilon_sharpness"], 100 * (box_max - l0) / (1 + l0),
                                 rtol=1e-9)
      assert all(isinstance(v, float) for v in out.values())
    assert sharpness._sharpness_measures._cache_size() == before + 1  # pylint: disable=protected-access
