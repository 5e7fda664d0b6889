"""Tests for llm_math.analysis.gradient_noise on linear regression with Gaussian inputs.

Model: x ~ N(0, C) in R^d, y = x^T w* + e with e ~ N(0, s^2) independent, per-example loss
l(w; x, y) = 0.5 (x^T w - y)^2. With u = w - w*, the per-example gradient is g = x (x^T u - e), so

  G = E[g] = C u.

For the second moment, Isserlis' theorem E[x_i x_j x_k x_l] = C_ij C_kl + C_ik C_jl + C_il C_jk
gives E[(x^T u)^2 x x^T] = 2 C u u^T C + (u^T C u) C; the cross term in e vanishes and
E[e^2 x x^T] = s^2 C, so

  Sigma = E[g g^T] - G G^T = C u u^T C + (u^T C u + s^2) C,
  tr(Sigma) = |C u|^2 + (u^T C u + s^2) tr(C).

Statistical tolerances: Monte-Carlo means are compared with the truth within 4 standard errors,
the standard error being the sample standard deviation of the averaged quantity over
sqrt(#samples) (a two-sided 4-sigma band fails by chance with probability ~6e-5 under a normal
approximation); each test also checks that this standard error is small relative to the target, so
the comparison has teeth. Seeds are fixed, so the outcomes are deterministic.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_math.analysis import gradient_noise as gn


def _problem(d: int, seed: int, noise_std: float = 0.5, u_scale: float = 1.0):
  """(chol C, w*, w, noise std, G, tr Sigma) for a random SPD C and w = w* + u_scale N(0, I)."""
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((d, d))
  c = a @ a.T / d + 0.5 * np.eye(d)
  w_star, u = rng.standard_normal(d), u_scale * rng.standard_normal(d)
  w = w_star + u
  g_full = c @ u
  trace_sigma = g_full @ g_full + (u @ c @ u + noise_std**2) * np.trace(c)
  return np.linalg.cholesky(c), w_star, w, noise_std, g_full, trace_sigma


def _sample(key, n, chol, w_star, noise_std):
  kx, ke = jax.random.split(key)
  x_NxD = jax.random.normal(kx, (n, chol.shape[0])) @ jnp.asarray(chol, jnp.float32).T
  y_N = x_NxD @ jnp.asarray(w_star, jnp.float32) + noise_std * jax.random.normal(ke, (n,))
  return {"x": x_NxD, "y": y_N}


def _loss(params, example):
  return 0.5 * (jnp.dot(example["x"], params["w"]) - example["y"]) ** 2


def _params(w):
  return {"w": jnp.asarray(w, jnp.float32)}


def test_per_example_and_microbatch_grads_match_closed_form():
  chol, w_star, w, s, _, _ = _problem(5, 0)
  batch = _sample(jax.random.PRNGKey(0), 24, chol, w_star, s)
  grads = gn.per_example_grads(_loss, _params(w), batch)
  x, y = np.asarray(batch["x"]), np.asarray(batch["y"])
  expected_NxD = x * (x @ w - y)[:, None]
  np.testing.assert_allclose(grads["w"], expected_NxD, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gn.flatten_stacked(grads), expected_NxD, rtol=1e-5, atol=1e-5)
  for m in (1, 3, 8, 24):
    micro = gn.microbatch_grads(_loss, _params(w), batch, m)
    np.testing.assert_allclose(micro["w"], expected_NxD.reshape(m, 24 // m, 5).mean(axis=1),
                               rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="num_microbatches"):
    gn.microbatch_grads(_loss, _params(w), batch, 5)


def test_closed_form_gradient_moments():
  """Check the derivation itself: G and tr(Sigma) against a large sample (4-sigma bands)."""
  chol, w_star, w, s, g_full, trace_sigma = _problem(6, 1)
  n = 200_000
  g_NxP = gn.flatten_stacked(gn.per_example_grads(
      _loss, _params(w), _sample(jax.random.PRNGKey(1), n, chol, w_star, s)))
  g = np.asarray(g_NxP, np.float64)
  se_mean = g.std(axis=0) / np.sqrt(n)
  assert np.all(np.abs(g.mean(axis=0) - g_full) <= 4 * se_mean)
  sq_dev = np.sum((g - g_full[None, :]) ** 2, axis=1)  # Centred at the true G: unbiased for tr.
  se_tr = sq_dev.std() / np.sqrt(n)
  assert se_tr < 0.02 * trace_sigma
  assert abs(sq_dev.mean() - trace_sigma) <= 4 * se_tr
  np.testing.assert_allclose(gn.trace_covariance(g_NxP), sq_dev.mean(), rtol=1e-2)


def _simulate_norms(key, steps, shards, b_small, chol, w_star, w, s):
  """Per step: |.|^2 of D shard gradients (b_small fresh examples each) and of their mean."""
  b_big = shards * b_small

  def one_step(k):
    g_NxP = gn.flatten_stacked(gn.per_example_grads(_loss, _params(w),
                                                    _sample(k, b_big, chol, w_star, s)))
    shard_DxP = g_NxP.reshape(shards, b_small, -1).mean(axis=1)
    return jnp.sum(shard_DxP**2, axis=1), jnp.sum(shard_DxP.mean(axis=0) ** 2)

  return jax.vmap(one_step)(jax.random.split(key, steps))


def test_two_batch_estimator_recovers_trace_and_gradient_norm():
  # Near the optimum, so that noise dominates: B_simple ~= 27 lies between B_small and B_big.
  chol, w_star, w, s, g_full, trace_sigma = _problem(6, 2, noise_std=1.0, u_scale=0.2)
  steps, shards, b_small = 8000, 8, 4
  b_big = shards * b_small
  shard_TxD, global_T = _simulate_norms(jax.random.PRNGKey(2), steps, shards, b_small, chol,
                                        w_star, w, s)

  # The accumulator, jitted and scanned as inside a train step, with the plain mean (decay = 1).
  @jax.jit
  def accumulate(shard_TxD, global_T):
    def step(state, norms):
      return gn.noise_scale_update(state, norms[0], norms[1], b_small, b_big, decay=1.0), None
    return jax.lax.scan(step, gn.noise_scale_init(), (shard_TxD, global_T))[0]

  g_sq_hat, trace_hat, b_simple_hat = gn.noise_scale_estimates(accumulate(shard_TxD, global_T))

  # Per-step estimates give the standard errors (steps are independent).
  g_sq_t, trace_t = gn.two_batch_estimates(shard_TxD.mean(axis=1), global_T, b_small, b_big)
  g_sq_t, trace_t = np.asarray(g_sq_t, np.float64), np.asarray(trace_t, np.float64)
  np.testing.assert_allclose([g_sq_hat, trace_hat], [g_sq_t.mean(), trace_t.mean()], rtol=1e-4)
  g_sq_true = g_full @ g_full
  for est, per_step, truth in ((g_sq_hat, g_sq_t, g_sq_true), (trace_hat, trace_t, trace_sigma)):
    se = per_step.std() / np.sqrt(steps)
    assert se < 0.05 * truth
    assert abs(float(est) - truth) <= 4 * se
  # The ratio of the averages, not the average of the ratios.
  b_simple_true = trace_sigma / g_sq_true
  rel_tol = 4 * (trace_t.std() / trace_sigma + g_sq_t.std() / g_sq_true) / np.sqrt(steps)
  np.testing.assert_allclose(b_simple_hat, b_simple_true, rtol=rel_tol)
  assert np.mean(g_sq_t < 0) > 0.05  # One-step |G|^2 estimates are often negative: why we average.


def test_accumulator_is_a_bias_corrected_ema():
  rng = np.random.default_rng(3)
  shard_TxD = rng.uniform(1.0, 3.0, (6, 4)).astype(np.float32)
  global_T = rng.uniform(0.2, 1.0, 6).astype(np.float32)
  b_small, b_big, decay = 2, 8, 0.9
  state = gn.noise_scale_init()
  update = jax.jit(gn.noise_scale_update, static_argnums=(3, 4, 5))
  for t in range(6):
    state = update(state, jnp.asarray(shard_TxD[t]), jnp.asarray(global_T[t]), b_small, b_big,
                   decay)
  small = shard_TxD.mean(axis=1).astype(np.float64)
  g_sq_t = (b_big * global_T - b_small * small) / (b_big - b_small)
  trace_t = (small - global_T) / (1 / b_small - 1 / b_big)
  weights = decay ** np.arange(5, -1, -1)
  g_sq, trace, b_simple = gn.noise_scale_estimates(state)
  np.testing.assert_allclose(g_sq, np.sum(weights * g_sq_t) / weights.sum(), rtol=1e-5)
  np.testing.assert_allclose(trace, np.sum(weights * trace_t) / weights.sum(), rtol=1e-5)
  np.testing.assert_allclose(b_simple, trace / g_sq, rtol=1e-6)
  assert np.isnan(gn.noise_scale_estimates(gn.noise_scale_init())[2])
  with pytest.raises(ValueError, match="decay"):
    gn.noise_scale_update(state, jnp.ones(2), jnp.ones(()), 2, 4, decay=0.0)
  with pytest.raises(ValueError, match="batch_size_small"):
    gn.two_batch_estimates(1.0, 1.0, 4, 4)


def test_shard_sq_norms_inside_a_mapped_step():
  """vmap with an axis name stands in for pmap / shard_map: collectives behave the same."""
  rng = np.random.default_rng(4)
  local = {"a": jnp.asarray(rng.standard_normal((4, 3, 2)), jnp.float32),
           "b": jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)}

  def step(g):
    return gn.shard_sq_norms(g, jax.lax.pmean(g, "devices"), "devices")

  shard_DxD, global_D = jax.vmap(step, axis_name="devices")(local)
  flat_DxP = np.concatenate([np.asarray(local["a"]).reshape(4, -1), np.asarray(local["b"])], axis=1)
  expected = np.sum(flat_DxP**2, axis=1)
  for dev in range(4):
    np.testing.assert_allclose(shard_DxD[dev], expected, rtol=1e-5)
    np.testing.assert_allclose(global_D[dev], np.sum(flat_DxP.mean(axis=0) ** 2), rtol=1e-5)


def _population(n, seed):
  chol, w_star, w, s, _, _ = _problem(6, seed)
  return gn.flatten_stacked(gn.per_example_grads(
      _loss, _params(w), _sample(jax.random.PRNGKey(seed), n, chol, w_star, s)))


def test_minibatch_variance_follows_one_over_b():
  g_NxP = _population(2048, 5)
  trace_pop = float(gn.trace_covariance(g_NxP))
  batch_sizes = [1, 3, 9, 27, 81, 243]
  keys = jax.random.split(jax.random.PRNGKey(5), len(batch_sizes))
  means = []
  for b, k in zip(batch_sizes, keys):
    dev_K = np.asarray(gn.minibatch_sq_deviations(g_NxP, b, 2000, k), np.float64)
    se = dev_K.std() / np.sqrt(dev_K.size)
    expected = float(gn.expected_minibatch_variance(trace_pop, b))
    assert se < 0.1 * expected
    assert abs(dev_K.mean() - expected) <= 4 * se, b
    means.append(dev_K.mean())
  slope, intercept = gn.loglog_slope(batch_sizes, means)
  assert abs(slope + 1.0) < 0.05
  np.testing.assert_allclose(np.exp(intercept), trace_pop, rtol=0.1)
  # The convenience wrapper gives the same kind of numbers.
  wrapped = gn.minibatch_gradient_variance(g_NxP, [4, 64], 2000, jax.random.PRNGKey(6))
  np.testing.assert_allclose(wrapped, [trace_pop / 4, trace_pop / 64], rtol=0.15)


def test_minibatch_variance_without_replacement_has_finite_population_correction():
  n = 256
  g_NxP = _population(n, 6)
  trace_pop = float(gn.trace_covariance(g_NxP))
  for b, k in zip([1, 16, 64, 128, 192, 240], jax.random.split(jax.random.PRNGKey(7), 6)):
    dev_K = np.asarray(gn.minibatch_sq_deviations(g_NxP, b, 1000, k, replace=False), np.float64)
    se = dev_K.std() / np.sqrt(dev_K.size)
    expected = float(gn.expected_minibatch_variance(trace_pop, b, population_size=n))
    np.testing.assert_allclose(expected, trace_pop / b * (n - b) / (n - 1), rtol=1e-12)
    assert se < 0.1 * expected
    assert abs(dev_K.mean() - expected) <= 4 * se, b
    if b >= 128:  # Far below the with-replacement value trace/B: the correction is needed.
      assert dev_K.mean() < 0.6 * trace_pop / b
  # The whole population every time: the mini-batch gradient is exactly G.
  full = gn.minibatch_sq_deviations(g_NxP, n, 10, jax.random.PRNGKey(8), replace=False)
  np.testing.assert_allclose(full, 0.0, atol=1e-8 * trace_pop)


def test_finite_population_correction_and_arguments():
  np.testing.assert_allclose(gn.finite_population_correction(10, [1, 5, 10]), [1.0, 5 / 9, 0.0])
  with pytest.raises(ValueError, match="batch_size"):
    gn.finite_population_correction(10, 11)
  with pytest.raises(ValueError, match="population_size"):
    gn.finite_population_correction(1, 1)
  with pytest.raises(ValueError, match="batch_size"):
    gn.minibatch_sq_deviations(jnp.ones((4, 2)), 5, 3, jax.random.PRNGKey(0), replace=False)
  with pytest.raises(ValueError, match="x, y"):
    gn.loglog_slope([1.0, 2.0], [1.0, -1.0])
  with pytest.raises(ValueError, match="grads_NxP"):
    gn.trace_covariance(jnp.ones(3))


S_MIN, E_MIN = 1000.0, 64000.0
BATCHES = 2.0 ** np.arange(2, 13)


def test_tradeoff_fit_exact():
  steps = gn.tradeoff_steps(BATCHES, S_MIN, E_MIN)
  examples = BATCHES * steps
  np.testing.assert_allclose((steps / S_MIN - 1) * (examples / E_MIN - 1), 1.0, rtol=1e-12)
  np.testing.assert_allclose(gn.tradeoff_examples(BATCHES, S_MIN, E_MIN), examples, rtol=1e-12)
  np.testing.assert_allclose(gn.tradeoff_steps_for_examples(examples, S_MIN, E_MIN), steps,
                             rtol=1e-12)
  assert np.isinf(gn.tradeoff_steps_for_examples(E_MIN, S_MIN, E_MIN))
  for refine in (False, True):
    fit = gn.fit_steps_examples_tradeoff(BATCHES, steps, refine=refine)
    np.testing.assert_allclose([fit.s_min, fit.e_min, fit.b_crit], [S_MIN, E_MIN, 64.0], rtol=1e-9)


def test_tradeoff_fit_with_noise():
  """3% multiplicative noise on 11 points: parameters within 6%; refinement lowers the log loss."""
  rng = np.random.default_rng(9)
  clean = gn.tradeoff_steps(BATCHES, S_MIN, E_MIN)

  def log_cost(fit, steps):
    return np.sum((np.log(gn.tradeoff_steps(BATCHES, fit.s_min, fit.e_min)) - np.log(steps)) ** 2)

  errors = []
  for _ in range(20):
    steps = clean * np.exp(0.03 * rng.standard_normal(BATCHES.size))
    linear = gn.fit_steps_examples_tradeoff(BATCHES, steps, refine=False)
    fit = gn.fit_steps_examples_tradeoff(BATCHES, steps)
    assert log_cost(fit, steps) <= log_cost(linear, steps) * (1 + 1e-12)
    np.testing.assert_allclose(fit.b_crit, fit.e_min / fit.s_min, rtol=1e-12)
    errors.append([fit.s_min / S_MIN - 1, fit.e_min / E_MIN - 1, fit.b_crit / 64.0 - 1])
  errors = np.abs(np.array(errors))
  assert errors.max() < 0.06
  assert errors.mean() < 0.03
  with pytest.raises(ValueError, match="batch_sizes"):
    gn.fit_steps_examples_tradeoff([8, 8], [10, 12])
