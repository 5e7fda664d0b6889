"""Tests for llm_math.analysis.spectra: closed forms against numpy, brute force and optimisation."""
import itertools
import json

import numpy as np
import pytest

from llm_math.analysis import spectra


def _softmax_rows(logits, allowed):
  """float64 reference softmax over the last axis, restricted to `allowed` entries."""
  z = np.where(allowed, logits, -np.inf)
  z = z - z.max(axis=-1, keepdims=True)
  e = np.where(allowed, np.exp(z), 0.0)
  return e / e.sum(axis=-1, keepdims=True)


def _random_attention(rng, shape, causal, scale=1.0):
  """Random row-stochastic `shape + [T, T]`-style matrix from softmax of Gaussian logits."""
  t = shape[-1]
  logits = scale * rng.normal(size=shape)
  allowed = np.tril(np.ones((t, t), dtype=bool)) if causal else np.ones((t, t), dtype=bool)
  return _softmax_rows(logits, np.broadcast_to(allowed, shape))


def _entropy(p):
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


# ----------------------------------------------------------------------------------------------
# attention_probs
# ----------------------------------------------------------------------------------------------


def test_worked_example_row0():
  """Q = [[1, .5], [.3, .8], [.1, .9]], K = [[.9, .2], [.4, .7], [.2, .8]], d_k = 2, no mask.

  Row 0 logits are (1.0, 0.75, 0.6) / sqrt 2; exp gives (2.0281, 1.6994, 1.5285), sum 5.2560,
  so row 0 is (0.3859, 0.3233, 0.2908). A widely read write-up of this example prints 0.324 for
  the middle entry; that is a rounding slip (1.699 / 5.255 = 0.3233), and 0.324 fails here.
  """
  q = np.array([[1.0, 0.5], [0.3, 0.8], [0.1, 0.9]])
  k = np.array([[0.9, 0.2], [0.4, 0.7], [0.2, 0.8]])
  a = np.asarray(spectra.attention_probs(q, k))
  np.testing.assert_allclose(a[0], [0.3859, 0.3233, 0.2908], atol=5e-5)
  assert abs(a[0, 1] - 0.324) > 5e-4
  np.testing.assert_allclose(a.sum(axis=-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(a, _softmax_rows(q @ k.T / np.sqrt(2.0), np.ones((3, 3), bool)),
                             atol=1e-6)


@pytest.mark.parametrize("t,s", [(5, 5), (3, 6), (1, 4)])
def test_attention_probs_matches_reference(t, s):
  rng = np.random.default_rng(t * 10 + s)
  q = rng.normal(size=(2, 3, t, 4))
  k = rng.normal(size=(2, 3, s, 4))
  logits = np.einsum("bhtk,bhsk->bhts", q, k) / 2.0
  mask = rng.random(size=(2, 1, t, s)) < 0.7
  mask[..., -1] = True  # keep every row non-empty (the last key is always causally visible)
  causal_ts = np.arange(s)[None, :] <= np.arange(t)[:, None] + (s - t)
  full = np.ones((2, 3, t, s), bool)
  cases = [(False, None, full), (True, None, full & causal_ts),
           (False, mask, full & mask), (True, mask, full & causal_ts & mask)]
  for causal, m, allowed in cases:
    got = np.asarray(spectra.attention_probs(q, k, causal=causal, mask=m))
    np.testing.assert_allclose(got, _softmax_rows(logits, allowed), atol=2e-6)
    assert np.all(got[~allowed] == 0.0)


def test_attention_probs_fully_masked_row_is_nan():
  q = np.ones((2, 3))
  mask = np.array([[True, False], [False, False]])
  a = np.asarray(spectra.attention_probs(q, q, mask=mask))
  np.testing.assert_allclose(a[0], [1.0, 0.0])
  assert np.all(np.isnan(a[1]))


def test_attention_probs_rejects_bad_arguments():
  with pytest.raises(ValueError, match="q/k"):
    spectra.attention_probs(np.ones((3, 2)), np.ones((3, 4)))
  with pytest.raises(ValueError, match="q/k"):
    spectra.attention_probs(np.ones((3, 2)), np.ones((1, 3, 2)))
  with pytest.raises(ValueError, match="mask"):
    spectra.attention_probs(np.ones((3, 2)), np.ones((3, 2)), mask=np.ones((2, 3), bool))


# ----------------------------------------------------------------------------------------------
# Eigenvalues, spectral gap, stationary distribution.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [2, 3, 5, 16])
@pytest.mark.parametrize("causal", [False, True])
def test_row_stochastic_spectrum(t, causal):
  rng = np.random.default_rng(t)
  a = _random_attention(rng, (2, 3, t, t), causal, scale=2.0)
  np.testing.assert_allclose(a @ np.ones(t), 1.0, atol=1e-12)  # right eigenvector 1
  lam = spectra.eigenvalues(a)
  assert lam.shape == (2, 3, t)
  assert np.all(np.min(np.abs(lam - 1.0), axis=-1) < 1e-9)  # eigenvalue 1 ...
  assert np.all(np.abs(lam) <= 1.0 + 1e-9)  # ... and nothing larger
  np.testing.assert_allclose(spectra.spectral_radius(a), 1.0, atol=1e-9)
  # Sorted by decreasing modulus; lambda_2 is the second entry.
  assert np.all(np.diff(np.abs(lam), axis=-1) <= 1e-12)
  brute = np.sort(np.abs(np.linalg.eigvals(a)), axis=-1)[..., ::-1]
  if not causal:
    np.testing.assert_allclose(np.abs(lam), brute, atol=1e-9)
  np.testing.assert_allclose(spectra.spectral_gap(a), 1.0 - np.abs(lam[..., 1]), atol=1e-15)
  if causal:
    np.testing.assert_array_equal(spectra.is_lower_triangular(a), True)
    # Exact diagonal: lambda_2 is the largest self-attention weight beyond row 0.
    diag = np.diagonal(a, axis1=-2, axis2=-1)
    np.testing.assert_allclose(spectra.second_eigenvalue_modulus(a), diag[..., 1:].max(-1),
                               atol=0.0)


@pytest.mark.parametrize("t", [3, 4, 6])
def test_causal_eigenvalues_are_the_diagonal_and_match_numpy(t):
  rng = np.random.default_rng(100 + t)
  # Well-conditioned: diagonal entries spread apart, so numpy's eigensolver is accurate too.
  for _ in range(50):
    a = _random_attention(rng, (t, t), causal=True, scale=3.0)
    if np.min(np.diff(np.sort(np.diag(a)))) > 0.05:
      break
  else:
    pytest.fail("no well-separated causal matrix drawn")
  lam = spectra.eigenvalues(a)
  np.testing.assert_array_equal(np.sort(lam.real), np.sort(np.diag(a)))
  assert np.all(lam.imag == 0.0)
  np.testing.assert_allclose(np.sort(np.linalg.eigvals(a).real), np.sort(lam.real), atol=1e-9)
  # The general path (causal=False) agrees on this well-conditioned case.
  np.testing.assert_allclose(np.sort(spectra.eigenvalues(a, causal=False).real),
                             np.sort(lam.real), atol=1e-9)


def test_spectral_gap_closed_forms():
  t = 6
  for alpha in [0.1, 0.5, 0.9]:
    lazy = (1 - alpha) * np.eye(t) + alpha * np.full((t, t), 1.0 / t)  # eigenvalues 1, 1 - alpha
    np.testing.assert_allclose(spectra.spectral_gap(lazy, causal=False), alpha, atol=1e-12)
  cycle = np.roll(np.eye(t), 1, axis=1)  # periodic: all eigenvalues on the unit circle
  np.testing.assert_allclose(spectra.spectral_gap(cycle), 0.0, atol=1e-12)
  two_blocks = np.zeros((4, 4))
  two_blocks[:2, :2] = 0.5
  two_blocks[2:, 2:] = 0.5  # reducible, eigenvalue 1 twice
  np.testing.assert_allclose(spectra.spectral_gap(two_blocks, causal=False), 0.0, atol=1e-12)
  prefix_uniform = np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]
  np.testing.assert_allclose(spectra.spectral_gap(prefix_uniform), 0.5, atol=0.0)


@pytest.mark.parametrize("t", [2, 5, 12])
def test_stationary_distribution_bidirectional(t):
  rng = np.random.default_rng(200 + t)
  a = _random_attention(rng, (3, t, t), causal=False, scale=1.5)
  pi = spectra.stationary_distribution(a)
  assert pi.shape == (3, t)
  np.testing.assert_allclose(pi.sum(-1), 1.0, atol=1e-12)
  assert np.all(pi >= 0)
  np.testing.assert_allclose(np.einsum("bt,bts->bs", pi, a), pi, atol=1e-12)
  # Brute force: every row of A^n converges to pi for a positive (primitive) A.
  power = np.linalg.matrix_power(a, 300)
  np.testing.assert_allclose(power, np.broadcast_to(pi[:, None, :], power.shape), atol=1e-10)


def test_stationary_distribution_causal_periodic_reducible():
  rng = np.random.default_rng(7)
  a = _random_attention(rng, (2, 5, 5), causal=True)
  pi = spectra.stationary_distribution(a)
  np.testing.assert_array_equal(pi, np.broadcast_to(np.eye(5)[0], (2, 5)))
  np.testing.assert_allclose(np.einsum("bt,bts->bs", pi, a), pi, atol=0.0)

  cycle = np.roll(np.eye(3), 1, axis=1)  # period 3, unique stationary law: uniform
  np.testing.assert_allclose(spectra.stationary_distribution(cycle), np.full(3, 1 / 3),
                             atol=1e-12)

  # Reducible: closed classes {0, 1} and {2, 3, 4}, transient 5. Minimum-norm mixture has
  # weights proportional to 1 / ||pi_c||^2.
  p1 = np.array([[0.3, 0.7], [0.6, 0.4]])
  p2 = _random_attention(rng, (3, 3), causal=False)
  a = np.zeros((6, 6))
  a[:2, :2] = p1
  a[2:5, 2:5] = p2
  a[5] = [0.1, 0.2, 0.1, 0.2, 0.2, 0.2]
  pi = spectra.stationary_distribution(a, causal=False)
  assert np.all(pi >= 0)
  np.testing.assert_allclose(pi.sum(), 1.0, atol=1e-12)
  np.testing.assert_allclose(pi @ a, pi, atol=1e-12)
  pi1 = np.linalg.matrix_power(p1, 400)[0]
  pi2 = np.linalg.matrix_power(p2, 400)[0]
  w = np.array([1 / np.sum(pi1**2), 1 / np.sum(pi2**2)])
  w = w / w.sum()
  np.testing.assert_allclose(pi, np.concatenate([w[0] * pi1, w[1] * pi2, [0.0]]), atol=1e-10)


def test_causal_flag_validation():
  a = _random_attention(np.random.default_rng(0), (4, 4), causal=False)
  with pytest.raises(ValueError, match="causal"):
    spectra.eigenvalues(a, causal=True)
  with pytest.raises(ValueError, match="row-stochastic"):
    spectra.stationary_distribution(2.0 * a)
  with pytest.raises(ValueError, match="square"):
    spectra.eigenvalues(np.ones((2, 3)))
  with pytest.raises(ValueError, match="finite"):
    spectra.spectral_gap(np.full((2, 2), np.nan))


# ----------------------------------------------------------------------------------------------
# Singular values, effective rank, entropy, sinks.
# ----------------------------------------------------------------------------------------------


def test_effective_rank():
  for n in [1, 3, 7]:
    np.testing.assert_allclose(spectra.effective_rank(np.eye(n)), n, rtol=1e-12)
  rng = np.random.default_rng(1)
  u = rng.normal(size=(4, 9, 1))
  v = rng.normal(size=(4, 1, 5))
  np.testing.assert_allclose(spectra.effective_rank(u @ v), 1.0, atol=1e-6)
  np.testing.assert_allclose(spectra.effective_rank(np.full((6, 6), 1 / 6)), 1.0, atol=1e-6)
  # Singular values (3, 1): p = (3/4, 1/4).
  p = np.array([0.75, 0.25])
  np.testing.assert_allclose(spectra.effective_rank(np.diag([3.0, -1.0])), np.exp(_entropy(p)),
                             rtol=1e-12)
  m = rng.normal(size=(2, 5, 8))
  np.testing.assert_allclose(spectra.singular_values(m),
                             np.linalg.svd(m, compute_uv=False), rtol=1e-12)
  erank = spectra.effective_rank(m)
  assert np.all((erank >= 1.0) & (erank <= 5.0))
  assert spectra.effective_rank(np.zeros((3, 3))) == 0.0


def test_row_entropy_and_normalization():
  t = 6
  rng = np.random.default_rng(3)
  a = _random_attention(rng, (2, t, t), causal=False, scale=2.0)
  np.testing.assert_allclose(spectra.row_entropy(a),
                             [[-np.sum(r * np.log(r)) for r in m] for m in a], rtol=1e-12)
  np.testing.assert_allclose(spectra.normalized_row_entropy(a), spectra.row_entropy(a) / np.log(t),
                             rtol=1e-12)
  uniform = np.full((t, t), 1 / t)
  np.testing.assert_allclose(spectra.normalized_row_entropy(uniform), 1.0, rtol=1e-12)
  np.testing.assert_allclose(spectra.row_entropy(np.eye(t)), 0.0, atol=0.0)
  prefix_uniform = np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]
  h = spectra.row_entropy(prefix_uniform)
  np.testing.assert_allclose(h, np.log(np.arange(1, t + 1)), rtol=1e-12)
  h_norm = spectra.normalized_row_entropy(prefix_uniform)  # detected causal: log(t + 1)
  assert np.isnan(h_norm[0])
  np.testing.assert_allclose(h_norm[1:], 1.0, rtol=1e-12)
  np.testing.assert_allclose(spectra.normalized_row_entropy(prefix_uniform, causal=False)[1:],
                             np.log(np.arange(2, t + 1)) / np.log(t), rtol=1e-12)


def test_sink_mass():
  rng = np.random.default_rng(4)
  a = _random_attention(rng, (2, 3, 7, 7), causal=True)
  np.testing.assert_allclose(spectra.sink_mass(a), a[..., 1:, 0].mean(-1), rtol=1e-12)
  b = _random_attention(rng, (2, 3, 7, 7), causal=False)
  np.testing.assert_allclose(spectra.sink_mass(b), b[..., :, 0].mean(-1), rtol=1e-12)
  # Forcing causal=False on a causal matrix counts row 0 as well.
  np.testing.assert_allclose(spectra.sink_mass(a, causal=False), a[..., :, 0].mean(-1),
                             rtol=1e-12)
  sink = np.zeros((5, 5))
  sink[:, 0] = 1.0
  np.testing.assert_allclose(spectra.sink_mass(sink), 1.0)


# ----------------------------------------------------------------------------------------------
# Entropy lower bounds.
# ----------------------------------------------------------------------------------------------


def _one_top_logits(s, n):
  """Centred logits with one entry above n - 1 equal ones, l2 norm s."""
  z = np.full(n, -1.0 / n)
  z[0] += 1.0
  return s * z / np.linalg.norm(z)


@pytest.mark.parametrize("n", [2, 3, 8, 64])
def test_zhai_bound_holds_on_random_logits_and_is_attained(n):
  rng = np.random.default_rng(n)
  for s in [0.1, 1.0, 3.0, 10.0]:
    z = rng.normal(size=(500, n)) * rng.gamma(0.5, size=(500, 1))  # varied shapes and scales
    z *= s / np.linalg.norm(z, axis=-1, keepdims=True)  # uncentred norm s: centred <= s
    p = _softmax_rows(z, np.ones(z.shape, bool))
    bound = spectra.zhai_entropy_lower_bound(s, n)
    assert np.all(_entropy(p) >= bound - 1e-12)
    p_top = _softmax_rows(_one_top_logits(s, n), np.ones(n, bool))
    np.testing.assert_allclose(_entropy(p_top), bound, rtol=1e-10)
  np.testing.assert_allclose(spectra.zhai_entropy_lower_bound(0.0, n), np.log(n), rtol=1e-12)
  assert spectra.zhai_entropy_lower_bound(5.0, 1) == 0.0
  assert spectra.zhai_entropy_lower_bound(1e4, n) == 0.0


@pytest.mark.parametrize("n", [3, 5])
def test_zhai_bound_is_the_minimum_on_the_sphere(n):
  """Projected gradient descent of entropy over centred logits of norm s cannot beat the bound."""
  rng = np.random.default_rng(n)
  for s in [0.5, 2.0, 6.0]:
    z = rng.normal(size=(64, n))
    for _ in range(1500):
      z -= z.mean(-1, keepdims=True)
      z *= s / np.linalg.norm(z, axis=-1, keepdims=True)
      p = _softmax_rows(z, np.ones(z.shape, bool))
      grad = -p * (z - np.sum(p * z, axis=-1, keepdims=True))  # dH/dz
      grad -= grad.mean(-1, keepdims=True)
      grad -= np.sum(grad * z, axis=-1, keepdims=True) * z / s**2
      z -= 0.5 * max(1.0, s) * grad
    z -= z.mean(-1, keepdims=True)
    z *= s / np.linalg.norm(z, axis=-1, keepdims=True)
    h = _entropy(_softmax_rows(z, np.ones(z.shape, bool)))
    bound = spectra.zhai_entropy_lower_bound(s, n)
    assert h.min() >= bound - 1e-10
    assert h.min() <= bound + 1e-6  # the optimiser finds the extremal configuration


@pytest.mark.parametrize("causal", [False, True])
def test_attention_entropy_lower_bound_on_random_weights(causal):
  rng = np.random.default_rng(11)
  heads, d, d_k, t = 4, 8, 4, 6
  x = rng.normal(size=(t, d))
  w_q = rng.normal(size=(heads, d, d_k))
  w_k = rng.normal(size=(heads, d, d_k))
  sigma = spectra.qk_spectral_norm(w_q, w_k)
  brute = [np.linalg.norm(w_q[h] @ w_k[h].T, 2) / np.sqrt(d_k) for h in range(heads)]
  np.testing.assert_allclose(sigma, brute, rtol=1e-10)
  # Rescale each head so s = sigma ||X||^2 spans collapsed to nearly uniform.
  s_target = np.array([0.05, 0.5, 2.0, 8.0])
  sigma_x = np.linalg.norm(x, 2) ** 2
  scale = np.sqrt(s_target / (sigma * sigma_x))[:, None, None]
  w_q, w_k = w_q * scale, w_k * scale
  bound = spectra.attention_entropy_lower_bound(w_q, w_k, x, causal=causal)
  assert bound.shape == (heads, t)
  a = np.asarray(spectra.attention_probs(np.einsum("td,hdk->htk", x, w_q),
                                         np.einsum("td,hdk->htk", x, w_k), causal=causal))
  h = spectra.row_entropy(a)
  assert np.all(h >= bound - 1e-5)
  assert bound[0, -1] > 0.99 * np.log(t)  # small s: the bound is close to log T, not vacuous
  n_t = np.arange(1, t + 1) if causal else np.full(t, t)
  np.testing.assert_allclose(bound, spectra.zhai_entropy_lower_bound(s_target[:, None], n_t),
                             rtol=1e-8)


def test_logit_range_bound_matches_brute_force():
  rng = np.random.default_rng(5)
  for n in range(1, 8):
    for r in [0.0, 0.3, 1.0, 2.5, 7.0]:
      bound = spectra.entropy_lower_bound_from_logit_range(r, n)
      vertices = np.array(list(itertools.product([-r, 0.0], repeat=n)))
      brute = _entropy(_softmax_rows(vertices, np.ones(vertices.shape, bool))).min()
      np.testing.assert_allclose(bound, brute, rtol=1e-12, atol=1e-14)
      z = rng.uniform(-r, 0.0, size=(300, n))
      assert np.all(_entropy(_softmax_rows(z, np.ones(z.shape, bool))) >= bound - 1e-12)
  # n = 2: range r and centred l2 norm r / sqrt 2 describe the same logits.
  for r in [0.2, 1.0, 4.0]:
    np.testing.assert_allclose(spectra.entropy_lower_bound_from_logit_range(r, 2),
                               spectra.zhai_entropy_lower_bound(r / np.sqrt(2), 2), rtol=1e-12)
  # Large n, moderate r: the minimiser splits the mass; one dominant logit is not the minimum.
  n, r = 1000, 1.0
  c = np.exp(-r)
  one_top = np.log(1 + (n - 1) * c) + r * (n - 1) * c / (1 + (n - 1) * c)
  assert spectra.entropy_lower_bound_from_logit_range(r, n) < one_top - 0.05
  with pytest.raises(ValueError, match="n"):
    spectra.entropy_lower_bound_from_logit_range(1.0, 0)
  with pytest.raises(ValueError, match="sigma_logits"):
    spectra.zhai_entropy_lower_bound(-1.0, 3)


# ----------------------------------------------------------------------------------------------
# Rank collapse.
# ----------------------------------------------------------------------------------------------


def test_rank_collapse_pure_attention_vs_skip():
  rng = np.random.default_rng(9)
  t, d, layers = 8, 4, 12
  a = _random_attention(rng, (layers, t, t), causal=False)
  x_pure = [rng.normal(size=(t, d))]
  x_skip = [x_pure[0]]
  for layer in range(layers):
    x_pure.append(a[layer] @ x_pure[-1])
    x_skip.append(x_skip[-1] + a[layer] @ x_skip[-1])
  for norm in ["fro", "composite"]:
    pure = spectra.relative_residual(np.stack(x_pure), norm)
    skip = spectra.relative_residual(np.stack(x_skip), norm)
    assert pure.shape == (layers + 1,)
    assert pure[0] > 0.5
    assert pure[-1] < 1e-5  # geometric contraction: about 0.4x per layer here
    assert skip[-1] > 100 * pure[-1]  # X + A X = (I + A) X contracts at (1 + |lam_2|) / 2
    assert np.all(skip[1:] > pure[1:])


def test_residual_centers():
  rng = np.random.default_rng(10)
  x = rng.normal(size=(3, 7, 5))
  res = spectra.rank_collapse_residual(x, "fro")
  np.testing.assert_allclose(res, x - x.mean(axis=-2, keepdims=True), atol=1e-15)
  one_norm = lambda m: np.abs(m).sum(axis=-2).max(axis=-1)  # noqa: E731
  res_c = spectra.rank_collapse_residual(x, "composite")
  for _ in range(200):
    shift = 0.3 * rng.normal(size=(3, 1, 5))
    assert np.all(spectra.matrix_norm(res + shift, "fro") >= spectra.matrix_norm(res, "fro"))
    assert np.all(one_norm(res_c + shift) >= one_norm(res_c) - 1e-12)
    # Median centring is within sqrt(3) of the best composite residual.
    assert np.all(np.sqrt(3.0) * spectra.matrix_norm(res_c + shift, "composite")
                  >= spectra.matrix_norm(res_c, "composite"))
  m = rng.normal(size=(4, 6))
  np.testing.assert_allclose(
      spectra.matrix_norm(m, "composite"),
      np.sqrt(np.linalg.norm(m, 1) * np.linalg.norm(m, np.inf)), rtol=1e-12)
  identical_rows = np.broadcast_to(rng.normal(size=(1, 5)), (6, 5))
  for norm in ["fro", "composite"]:
    assert spectra.relative_residual(identical_rows, norm) < 1e-15
    assert spectra.relative_residual(np.zeros((3, 2)), norm) == 0.0
  with pytest.raises(ValueError, match="norm"):
    spectra.relative_residual(x, "nuclear")


# ----------------------------------------------------------------------------------------------
# Summary.
# ----------------------------------------------------------------------------------------------


def test_attention_summary_is_json_ready_and_consistent():
  rng = np.random.default_rng(12)
  t = 6
  a = np.stack([_random_attention(rng, (3, t, t), causal=True),
                _random_attention(rng, (3, t, t), causal=False)])  # [2, 3, T, T]
  summary = spectra.attention_summary(a)
  json.loads(json.dumps(summary, allow_nan=False))
  assert summary["causal"] == [[True] * 3, [False] * 3]
  checks = {
      "spectral_radius": spectra.spectral_radius(a),
      "spectral_gap": spectra.spectral_gap(a),
      "effective_rank": spectra.effective_rank(a),
      "sink_mass": spectra.sink_mass(a),
      "mean_row_entropy": spectra.row_entropy(a).mean(-1),
      "mean_normalized_row_entropy": np.nanmean(spectra.normalized_row_entropy(a), axis=-1),
      "stationary_distribution": spectra.stationary_distribution(a),
      "singular_values": spectra.singular_values(a),
      "eigenvalues_real": spectra.eigenvalues(a).real,
  }
  for key, expected in checks.items():
    got = np.array(summary[key])
    assert got.shape == expected.shape, key
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15, err_msg=key)
  np.testing.assert_array_equal(np.array(summary["stationary_sink_mass"])[0], 1.0)
  with pytest.raises(ValueError, match="T >= 2"):
    spectra.attention_summary(np.ones((1, 1)))


# ----------------------------------------------------------------------------------------------
# Rank collapse, layer by layer.
# ----------------------------------------------------------------------------------------------


def test_relative_residuals_by_layer_reports_an_underflowed_stream_as_none():
  x = np.random.default_rng(1).normal(size=(3, 2, 5, 4))
  x[2] = 0.0
  out = spectra.relative_residuals_by_layer(x)
  assert out["fro"][2] is None and out["composite"][2] is None
  assert out["fro"][0] == pytest.approx(float(np.mean(spectra.relative_residual(x[0]))))


def test_uniform_causal_reference_decays_at_rate_one_half():
  """U (U_ts = 1/(t+1)) has eigenvalues 1, 1/2, 1/3, ...: the residual shrinks 2x per layer."""
  x_BxTxD = np.random.default_rng(0).normal(size=(3, 10, 5))
  ref = np.asarray(spectra.uniform_causal_reference(x_BxTxD, 40))
  assert ref[0] == pytest.approx(np.mean(spectra.relative_residual(x_BxTxD)))
  np.testing.assert_allclose(ref[31:] / ref[30:-1], 0.5, rtol=1e-3)
  # Brute force: explicit powers of U.
  u = np.tril(np.ones((10, 10))) / np.arange(1, 11)[:, None]
  np.testing.assert_array_equal(spectra.uniform_causal_attention(10), u)
  x5 = np.einsum("ts,bsd->btd", np.linalg.matrix_power(u, 5), x_BxTxD)
  assert ref[5] == pytest.approx(np.mean(spectra.relative_residual(x5)), rel=1e-9)


def test_the_two_effective_ranks_are_named_apart():
  """effective_rank weights singular values by sigma (Roy & Vetterli), variance_effective_rank by
  sigma^2 (PCA variance shares); both are n for n equal singular values, and squaring concentrates."""
  s = np.array([3.0, 2.0, 1.0])
  m = np.diag(s)
  entropy_rank = lambda p: np.exp(-np.sum(p * np.log(p)))
  assert spectra.effective_rank(m) == pytest.approx(entropy_rank(s / s.sum()))
  assert spectra.variance_effective_rank(m) == pytest.approx(entropy_rank(s**2 / np.sum(s**2)))
  assert spectra.variance_effective_rank(m) < spectra.effective_rank(m)
  assert spectra.variance_effective_rank(np.eye(4)) == pytest.approx(4.0)
  assert spectra.variance_effective_rank(np.zeros((3, 3))) == 0.0
