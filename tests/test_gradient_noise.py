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


def test_per_example_grad_matrix_pads_the_last_chunk():
  """A batch loss (the mean over its examples) differentiated one example at a time, 5 per call."""
  chol, w_star, w, s, _, _ = _problem(4, 10)
  batch = _sample(jax.random.PRNGKey(10), 12, chol, w_star, s)
  batch_loss = lambda params, b: jnp.mean(jax.vmap(_loss, in_axes=(None, 0))(params, b))
  x, y = np.asarray(batch["x"]), np.asarray(batch["y"])
  expected_NxD = x * (x @ w - y)[:, None]
  for chunk in (5, 12, 64):
    np.testing.assert_allclose(gn.per_example_grad_matrix(batch_loss, _params(w), batch, chunk),
                               expected_NxD, rtol=1e-5, atol=1e-5)


# The first token of each window decides its loss, w[x_0]: the gradient of one window is the one-hot
# vector e_{x_0}, so for i.i.d. first tokens with probabilities p, G = p and tr(Sigma) = 1 - sum p^2.
_P = np.array([0.4, 0.3, 0.15, 0.1, 0.05])


def _first_token_loss(params, batch):
  inputs_BxT, _ = batch
  return jnp.mean(params["w"][inputs_BxT[:, 0]])


def _windows(rng, *shape):
  tokens = rng.choice(_P.size, size=shape + (4,), p=_P).astype(np.int32)
  return tokens, tokens


def test_batch_gradient_variance_on_a_closed_form():
  """Each batch gradient is the histogram of its first tokens / B: the estimate equals their sample
  variance computed here directly, and E|g_B - G|^2 = (1 - sum p^2) / B within 4 standard errors."""
  rng = np.random.default_rng(0)
  trace_sigma = 1.0 - np.sum(_P**2)
  for b, k in ((1, 2000), (4, 2000), (32, 600)):
    batches = _windows(rng, k, b)
    var, se = gn.batch_gradient_variance(_first_token_loss, {"w": jnp.zeros(_P.size)}, batches,
                                         chunk=100)
    hist_KxV = np.stack([np.bincount(row, minlength=_P.size) / b for row in batches[0][:, :, 0]])
    direct = np.sum((hist_KxV - hist_KxV.mean(axis=0)) ** 2) / (k - 1)
    assert var == pytest.approx(direct, rel=1e-6)
    assert se < 0.06 * trace_sigma / b
    assert abs(var - trace_sigma / b) <= 4 * se, b
  with pytest.raises(ValueError, match="batches"):
    gn.batch_gradient_variance(_first_token_loss, {"w": jnp.zeros(_P.size)}, _windows(rng, 1, 4))


def test_variance_law_record_on_a_known_one_over_b_law():
  """The whole measurement on the closed form: slope -1, intercept log c with c = 1 - sum p^2,
  tr(Sigma) ~ c and |G|^2 ~ sum p^2 from the per-example side, the prediction c / B."""
  rng = np.random.default_rng(4)
  c = 1.0 - np.sum(_P**2)
  sizes = [1, 2, 4, 8, 16, 32]
  fresh = [_windows(rng, 1000, b) for b in sizes]
  gv = gn.variance_law_record(_first_token_loss, {"w": jnp.zeros(_P.size)}, _windows(rng, 256),
                              fresh, 200, jax.random.PRNGKey(0), bootstrap=200, seed=0)
  assert gv["fresh"]["batch_sizes"] == sizes and gv["fresh"]["num_batches"] == 1000
  assert (gv["num_examples"], gv["num_params"]) == (256, _P.size)
  for b, var, se in zip(sizes, gv["fresh"]["variance"], gv["fresh"]["stderr"]):
    assert abs(var - c / b) <= 4 * se, b
  assert abs(gv["slope"] + 1.0) < 0.04
  assert gv["intercept"] == pytest.approx(np.log(c), abs=0.06)
  # The bootstrap over the 6 (B, variance) points: intervals around the estimates, holding -1.
  assert gv["ci95"]["slope"][0] < -1.0 < gv["ci95"]["slope"][1]
  assert gv["ci95"]["slope"][1] - gv["ci95"]["slope"][0] < 0.1
  assert gv["ci95"]["intercept"][0] < gv["intercept"] < gv["ci95"]["intercept"][1]
  assert gv["bootstrap_failures"] == 0 and gv["note"] is None  # 6 distinct B: >= 2 in every draw
  # 256 windows give tr(Sigma) and |G|^2 to about 5% (1 s.e.; bands ~4 s.e.).
  assert gv["trace_sigma_unbiased"] == pytest.approx(c, rel=0.15)
  assert gv["trace_sigma_population"] == pytest.approx(gv["trace_sigma_unbiased"] * 255 / 256)
  assert gv["g_sq_unbiased"] == pytest.approx(np.sum(_P**2), rel=0.2)
  assert gv["b_simple"] == pytest.approx(c / np.sum(_P**2), rel=0.3)
  np.testing.assert_allclose(gv["fresh"]["predicted"],
                             gv["trace_sigma_unbiased"] / np.array(sizes), rtol=1e-6)
  rs = gv["resampled"]
  assert rs["batch_sizes"] == [1, 2, 4, 8, 16, 32, 64, 128]
  assert abs(rs["slope_with_replacement"] + 1.0) < 0.1
  np.testing.assert_allclose(rs["expected_without_replacement"],
                             np.array(rs["expected_with_replacement"])
                             * (256 - np.array(rs["batch_sizes"])) / 255)


def test_noise_windows_and_pooled_noise_scale_from_log_records():
  """Window means of |g_m|^2 (B_small = 2) and |g|^2 (B_big = 8) over n steps, as the loop logs them:
  the window sums are n (8 |g|^2 - 2 |g_m|^2) / 6 and n (|g_m|^2 - |g|^2) / (1/2 - 1/8)."""
  records = [{"step": 0, "val_nll": 3.0},  # The step-0 evaluation: no window.
             {"step": 1, "loss": 2.9, "grad_sq": 1.0, "micro_grad_sq": 2.5, "window_steps": 1,
              "val_nll": 2.8},
             {"step": 3, "loss": 2.5, "grad_sq": 0.5, "micro_grad_sq": 2.0, "window_steps": 2}]
  w = gn.noise_windows(records, 2, 8)
  assert w["step"] == [1, 3] and w["weight"] == [1, 2] and w["train_loss"] == [2.9, 2.5]
  assert w["val_nll"] == [2.8, None]
  np.testing.assert_allclose(w["g_sq_sum"], [(8 * 1.0 - 2 * 2.5) / 6, 2 * (8 * 0.5 - 2 * 2.0) / 6])
  np.testing.assert_allclose(w["trace_sum"], [1.5 / 0.375, 2 * 1.5 / 0.375])
  pooled = gn.pooled_noise_scale(w)
  assert pooled["steps_averaged"] == 3
  assert pooled["g_sq"] == pytest.approx(0.5 / 3) and pooled["trace_sigma"] == pytest.approx(12 / 3)
  assert pooled["b_simple"] == pytest.approx(12 / 0.5)
  # Windows ending in (start, stop] only; none there, or |G|^2 <= 0: no B_simple.
  windows = {"step": [1, 2, 4], "weight": [1, 1, 2], "g_sq_sum": [1.0, 3.0, 4.0],
             "trace_sum": [10.0, 20.0, 60.0]}
  late = gn.pooled_noise_scale(windows, 1)
  assert late["b_simple"] == pytest.approx(80.0 / 7.0) and late["steps_averaged"] == 3
  assert gn.pooled_noise_scale(windows, 4, 10)["b_simple"] is None
  assert gn.pooled_noise_scale(w, 2)["b_simple"] is None  # |G|^2 estimate 0 in the last window.


def test_steps_to_target_and_target_from_curve():
  assert gn.steps_to_target([0, 10, 20], [3.0, 2.0, 1.0], 1.5) == pytest.approx(15.0)
  assert gn.steps_to_target([0, 10], [1.0, 0.5], 2.0) == 0.0
  assert gn.steps_to_target([0, 10], [3.0, 2.5], 1.0) is None
  # Running means of 3: 10/3, 7/3, 8/3, 2: the lowest is 2, plus the margin.
  assert gn.target_from_curve([5.0, 1.0, 4.0, 2.0, 2.0, 2.0], 0.1) == pytest.approx(2.1)
  with pytest.raises(ValueError, match="values"):
    gn.target_from_curve([1.0, 2.0], 0.1)


@pytest.mark.parametrize("noise", [0.0, 0.02])
def test_tradeoff_record_recovers_a_known_hyperbola(noise):
  """Steps-to-target generated from S_min = 40, E_min = 640 (B_crit = 16) on the hyperbola
  (S/S_min - 1)(E/E_min - 1) = 1, exactly or with 2% log-normal noise: the fit recovers them, and
  the doublings follow the closed forms S(B)/S(2B) and B/B_crit."""
  s_min, e_min = 40.0, 640.0
  b = [2**i for i in range(1, 10)]  # 2 ... 512: both regimes, B_crit in the middle.
  s = np.array([s_min * (1 + e_min / (s_min * bi)) for bi in b])
  np.testing.assert_allclose((s / s_min - 1) * (np.array(b) * s / e_min - 1), 1.0, rtol=1e-12)
  measured = s * np.exp(noise * np.random.default_rng(3).standard_normal(len(b)))
  fit = gn.tradeoff_record(b, list(measured))
  assert fit["batch_sizes"] == b
  tol = 1e-8 if noise == 0 else 0.06
  np.testing.assert_allclose([fit["s_min"], fit["e_min"], fit["b_crit"]], [s_min, e_min, 16.0],
                             rtol=tol)
  if noise == 0:
    assert fit["rms_log_residual"] < 1e-9
  else:  # The residual is the noise the points were given (7 dof left of 9 points).
    assert 0.5 * noise < fit["rms_log_residual"] < 1.5 * noise
  regimes = gn.doubling_speedups(b, list(measured), fit["b_crit"])
  assert (regimes["small"]["from"], regimes["large"]["to"]) == (2, 512)
  assert len(regimes["doublings"]) == 8
  if noise == 0:
    closed = lambda bb: (s_min + e_min / bb) / (s_min + e_min / (2 * bb))
    np.testing.assert_allclose([d["speedup"] for d in regimes["doublings"]],
                               closed(np.array(b[:-1], float)), rtol=1e-12)
    np.testing.assert_allclose([d["examples_ratio"] for d in regimes["doublings"]],
                               2 / closed(np.array(b[:-1], float)), rtol=1e-12)
    assert regimes["excess_examples_small"] == pytest.approx(2 / 16)
    assert regimes["excess_examples_large"] == pytest.approx(512 / 16)
  assert gn.tradeoff_record([4, 4], [30.0, 31.0]) is None  # One batch size: no fit.
  assert gn.doubling_speedups([2, 8], [30.0, 10.0]) is None  # No doubling.
  assert "excess_examples_small" not in gn.doubling_speedups([2, 4], [30.0, 16.0])


def test_tradeoff_bootstrap_intervals_and_notes():
  """5% noise on 9 batch sizes around B_crit = 16: the bootstrap intervals hold the estimates and
  the truth; degenerate batch sizes and an extrapolated B_crit give notes."""
  b = 2.0 ** np.arange(1, 10)
  noise = np.exp(0.05 * np.random.default_rng(5).standard_normal(9))
  steps = gn.tradeoff_steps(b, 40.0, 640.0) * noise
  fit = gn.fit_steps_examples_tradeoff(b, steps, bootstrap=200, seed=0)
  assert fit[:3] == gn.fit_steps_examples_tradeoff(b, steps)[:3]
  assert fit.bootstrap_failures == 0 and fit.note is None
  for name, truth in (("s_min", 40.0), ("e_min", 640.0), ("b_crit", 16.0)):
    lo, hi = fit.ci95[name]
    assert lo < getattr(fit, name) < hi and lo < truth < hi, name
  rec = gn.tradeoff_record(list(b), list(steps), bootstrap=200, seed=0)
  assert rec["ci95"] == fit.ci95 and rec["note"] is None and rec["bootstrap_failures"] == 0
  assert gn.tradeoff_record(list(b), list(steps))["ci95"] is None
  # Two batch sizes, and resamples holding one of them only (probability 2 / 2^4 = 1/8).
  two = gn.fit_steps_examples_tradeoff([8, 8, 64, 64], [120.0, 125.0, 50.0, 52.0], bootstrap=80)
  assert two.note.startswith("2 distinct batch sizes for 2 parameters")
  assert 80 / 8 * 0.3 < two.bootstrap_failures < 80 / 8 * 2.5
  assert f"{two.bootstrap_failures} of 80 bootstrap refits failed" in two.note
  # All batch sizes far above B_crit: S ~ S_min everywhere, B_crit is extrapolated and undetermined.
  big = 2.0 ** np.arange(10, 15)
  noise = np.exp(0.05 * np.random.default_rng(6).standard_normal(5))
  steps = gn.tradeoff_steps(big, 40.0, 640.0) * noise
  fit = gn.fit_steps_examples_tradeoff(big, steps, bootstrap=100)
  assert "lies outside the measured batch sizes" in fit.note
  assert "B_crit undetermined" in fit.note


def test_loglog_fit_intervals_and_notes():
  """y = 3 / x with 5% noise: the slope's interval holds -1; no line through one x, or through a
  value <= 0, is a note, not an exception."""
  x = 2.0 ** np.arange(8)
  y = 3.0 / x * np.exp(0.05 * np.random.default_rng(0).standard_normal(8))
  line = gn.loglog_fit(x, y, bootstrap=300, seed=1)
  assert (line["slope"], line["intercept"]) == gn.loglog_slope(x, y)
  assert line["ci95"]["slope"][0] < -1.0 < line["ci95"]["slope"][1]
  assert line["ci95"]["intercept"][0] < np.log(3.0) < line["ci95"]["intercept"][1]
  assert line["bootstrap_failures"] == 0 and line["note"] is None
  assert gn.loglog_fit(x, y)["ci95"] is None
  two = gn.loglog_fit([1.0, 1.0, 4.0], [1.0, 1.1, 0.25], bootstrap=50)
  assert two["note"].startswith("2 distinct x for 2 parameters") and two["bootstrap_failures"] > 0
  assert gn.loglog_fit([2.0, 2.0], [1.0, 1.1])["note"] == "no fit: 1 distinct x, a line needs 2"
  bad = gn.loglog_fit([1.0, 2.0], [1.0, 0.0], bootstrap=10)
  assert bad["slope"] is None and bad["note"].startswith("no fit")
