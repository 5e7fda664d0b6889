"""llm_math.analysis.optimizers step by step against optax; L2 = Gaussian prior; MLE = min cross-entropy."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm_math.analysis import optimizers as opt


from tests.helpers import x64 as _x64


@pytest.fixture(autouse=True)
def float64():
  with _x64():
    yield


def _params(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {
      "dense": {"kernel": jnp.asarray(rng.standard_normal((3, 4))),
                "bias": jnp.asarray(rng.standard_normal(4))},
      "embed": jnp.asarray(rng.standard_normal((5, 2))),
  }


def _loss(params: dict) -> jax.Array:
  """A non-quadratic loss so the gradients change along the trajectory."""
  h = jnp.tanh(params["embed"][:, :1] * jnp.ones((1, 3)) @ params["dense"]["kernel"]
               + params["dense"]["bias"][None, :])
  return jnp.sum(h ** 2) + 0.1 * jnp.sum(params["embed"] ** 4)


def _assert_trees_close(a, b, rtol=1e-12, atol=1e-14):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


NO_BIAS_DECAY = {"dense": {"kernel": True, "bias": False}, "embed": True}


@pytest.mark.parametrize("schedule", ["constant", "warmup_cosine"])
@pytest.mark.parametrize("mask", [None, "tree", "callable"])
def test_adamw_matches_optax_step_by_step(schedule, mask):
  b1, b2, eps, wd = 0.8, 0.95, 1e-6, 0.1
  if schedule == "constant":
    lr_mine = lr_optax = 0.05
  else:
    lr_mine = opt.warmup_cosine_schedule(0.05, warmup_steps=3, total_steps=10, init_value=0.01,
                                         end_value=0.002)
    optax_schedule = optax.warmup_cosine_decay_schedule(0.01, 0.05, 3, 10, 0.002)
    # optax evaluates its schedule at an int32 count, which yields float32 learning rates; a
    # float64 count keeps the comparison at float64 precision (same schedule, same steps).
    lr_optax = lambda count: optax_schedule(jnp.asarray(count, jnp.float64))
  mask_arg = {None: None, "tree": NO_BIAS_DECAY, "callable": lambda p: NO_BIAS_DECAY}[mask]
  tx = optax.adamw(lr_optax, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=mask_arg)

  @jax.jit
  def steps(params_mine, state_mine, params_ref, state_ref):
    grads_mine = jax.grad(_loss)(params_mine)
    updates, state_mine = opt.adamw_update(grads_mine, state_mine, params_mine, lr_mine, b1, b2,
                                           eps, wd, mask_arg)
    grads_ref = jax.grad(_loss)(params_ref)
    updates_ref, state_ref = tx.update(grads_ref, state_ref, params_ref)
    return (opt.apply_updates(params_mine, updates), state_mine,
            optax.apply_updates(params_ref, updates_ref), state_ref)

  params_mine = params_ref = _params()
  state_mine, state_ref = opt.adamw_init(params_mine), tx.init(params_ref)
  for _ in range(12):  # past the end of the schedule
    params_mine, state_mine, params_ref, state_ref = steps(params_mine, state_mine, params_ref,
                                                           state_ref)
    _assert_trees_close(params_mine, params_ref)
    adam_state = state_ref[0]
    _assert_trees_close(state_mine.m, adam_state.mu)
    _assert_trees_close(state_mine.v, adam_state.nu)
  assert int(state_mine.count) == 12
  # The run moved away from the start, so the comparison was not vacuous.
  assert np.abs(np.asarray(params_mine["embed"] - _params()["embed"])).max() > 0.1


def test_adamw_first_step_is_sign_descent_and_mask_skips_decay():
  """At t = 1, m_hat = g and v_hat = g^2, so the Adam step is -lr g / (|g| + eps) ~ -lr sign(g)."""
  params = _params()
  lr, wd = 0.01, 0.5

  @jax.jit
  def first_step(params):
    grads = jax.grad(_loss)(params)
    updates, _ = opt.adamw_update(grads, opt.adamw_init(params), params, lr, eps=0.0,
                                  weight_decay=wd, mask=NO_BIAS_DECAY)
    return grads, updates

  grads, updates = first_step(params)
  g = grads["dense"]["bias"]
  np.testing.assert_allclose(updates["dense"]["bias"], -lr * np.sign(g), rtol=1e-12)
  g = grads["dense"]["kernel"]
  np.testing.assert_allclose(updates["dense"]["kernel"],
                             -lr * (np.sign(g) + wd * params["dense"]["kernel"]), rtol=1e-12)


@pytest.mark.parametrize("momentum,nesterov", [(None, False), (0.9, False), (0.5, True)])
def test_sgd_matches_optax(momentum, nesterov):
  lr_mine = opt.inverse_sqrt_schedule(0.1, time_scale=2.0)
  tx = optax.sgd(lambda t: 0.1 / jnp.sqrt(1.0 + t / 2.0), momentum=momentum, nesterov=nesterov)

  @jax.jit
  def steps(params_mine, state_mine, params_ref, state_ref):
    updates, state_mine = opt.sgd_update(jax.grad(_loss)(params_mine), state_mine, lr_mine,
                                         momentum, nesterov)
    updates_ref, state_ref = tx.update(jax.grad(_loss)(params_ref), state_ref, params_ref)
    return (opt.apply_updates(params_mine, updates), state_mine,
            optax.apply_updates(params_ref, updates_ref), state_ref)

  params_mine = params_ref = _params(1)
  state_mine, state_ref = opt.sgd_init(params_mine), tx.init(params_ref)
  for _ in range(10):
    params_mine, state_mine, params_ref, state_ref = steps(params_mine, state_mine, params_ref,
                                                           state_ref)
    _assert_trees_close(params_mine, params_ref)


def test_heavy_ball_on_a_quadratic_matches_the_recurrence():
  """theta_{t+1} = theta_t - lr grad + mu (theta_t - theta_{t-1}) for f = 0.5 h theta^2."""
  h, lr, mu = 2.0, 0.1, 0.7
  theta, prev = 1.0, 1.0
  params, state = jnp.asarray(1.0), opt.sgd_init(jnp.asarray(1.0))
  for _ in range(20):
    updates, state = opt.sgd_update(h * params, state, lr, momentum=mu)
    params = opt.apply_updates(params, updates)
    theta, prev = theta - lr * h * theta + mu * (theta - prev), theta
    np.testing.assert_allclose(params, theta, rtol=1e-12)


def test_schedules_values():
  steps = np.arange(0, 50)
  np.testing.assert_allclose(jax.vmap(opt.inverse_time_schedule(0.5, 4.0))(steps),
                             0.5 / (1.0 + steps / 4.0), rtol=1e-12)
  np.testing.assert_allclose(jax.vmap(opt.inverse_sqrt_schedule(0.5, 4.0))(steps),
                             0.5 / np.sqrt(1.0 + steps / 4.0), rtol=1e-12)
  # 1/t: sum lr diverges like log T while sum lr^2 converges (Robbins-Monro); 1/sqrt(t) has sum lr^2
  # diverging like log T.
  big = np.arange(0, 10**6, dtype=np.float64)
  lr_t = np.asarray(jax.jit(opt.inverse_time_schedule(1.0))(big))
  assert lr_t.sum() == pytest.approx(np.log(10**6) + np.euler_gamma, rel=1e-3)
  assert (lr_t ** 2).sum() == pytest.approx(np.pi ** 2 / 6, rel=1e-5)


@pytest.mark.parametrize("init,peak,warmup,total,end", [
    (0.0, 1.0, 10, 100, 0.0),
    (0.1, 3e-4, 5, 37, 1e-5),
    (0.0, 2.0, 0, 20, 0.5),
    (0.2, 1.0, 19, 20, 0.1),
])
def test_warmup_cosine_matches_optax(init, peak, warmup, total, end):
  mine = opt.warmup_cosine_schedule(peak, warmup, total, init_value=init, end_value=end)
  ref = optax.warmup_cosine_decay_schedule(init, peak, warmup, total, end)
  steps = jnp.arange(0, total + 10)
  np.testing.assert_allclose(jax.jit(jax.vmap(mine))(steps), jax.vmap(ref)(steps), rtol=1e-12,
                             atol=1e-15)
  assert float(mine(warmup)) == pytest.approx(peak)
  assert float(mine(total + 5)) == pytest.approx(end)


def _regression_problem(n=60, d=5, sigma=0.5, seed=2):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, d)) * np.linspace(0.3, 2.0, d)[None, :]
  w_true = rng.standard_normal(d)
  y = x @ w_true + sigma * rng.standard_normal(n)
  return jnp.asarray(x), jnp.asarray(y)


@pytest.mark.parametrize("sigma,tau", [(0.5, 0.3), (1.0, 2.0), (0.2, 0.05)])
def test_map_is_ridge_with_lambda_sigma2_over_tau2(sigma, tau):
  x, y = _regression_problem(sigma=sigma)
  w_map = opt.map_linear_gaussian(x, y, sigma, tau)
  np.testing.assert_allclose(w_map, opt.ridge_regression(x, y, sigma ** 2 / tau ** 2), rtol=1e-12)
  # Gradient descent on the negative log posterior, step 1/L with L the largest Hessian eigenvalue.
  hessian = np.asarray(x.T @ x) / sigma ** 2 + np.eye(x.shape[1]) / tau ** 2
  lr = 1.0 / np.linalg.eigvalsh(hessian).max()
  grad_fn = jax.grad(opt.neg_log_posterior)

  def body(_, carry):
    w, state = carry
    updates, state = opt.sgd_update(grad_fn(w, x, y, sigma, tau), state, lr)
    return opt.apply_updates(w, updates), state

  w0 = jnp.zeros(x.shape[1])
  w_gd, _ = jax.jit(lambda w: jax.lax.fori_loop(0, 3000, body, (w, opt.sgd_init(w))))(w0)
  np.testing.assert_allclose(w_gd, w_map, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(grad_fn(w_map, x, y, sigma, tau), 0.0, atol=1e-9)
  # The prior shrinks: the MAP norm is below the least-squares norm.
  w_ols = np.linalg.lstsq(np.asarray(x), np.asarray(y), rcond=None)[0]
  assert np.linalg.norm(w_map) < np.linalg.norm(w_ols)


def test_ridge_limits():
  x, y = _regression_problem()
  w_ols = np.linalg.lstsq(np.asarray(x), np.asarray(y), rcond=None)[0]
  np.testing.assert_allclose(opt.ridge_regression(x, y, 0.0), w_ols, rtol=1e-10)
  # A very wide prior (tau -> inf) recovers least squares; a very narrow one pins w at 0.
  np.testing.assert_allclose(opt.map_linear_gaussian(x, y, 0.5, 1e6), w_ols, rtol=1e-8)
  np.testing.assert_allclose(opt.map_linear_gaussian(x, y, 0.5, 1e-6), 0.0, atol=1e-8)


def test_mle_is_minimum_cross_entropy_by_optimization():
  rng = np.random.default_rng(3)
  v = 6
  tokens = jnp.asarray(rng.choice(v, size=2000, p=[0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
  p_hat = opt.categorical_mle(tokens, v)
  np.testing.assert_allclose(p_hat, np.bincount(np.asarray(tokens), minlength=v) / 2000)

  grad_fn = jax.grad(opt.categorical_mean_nll)

  def body(_, carry):
    logits, state = carry
    updates, state = opt.sgd_update(grad_fn(logits, tokens), state, 2.0, momentum=0.5)
    return opt.apply_updates(logits, updates), state

  logits0 = jnp.zeros(v)
  logits, _ = jax.jit(lambda z: jax.lax.fori_loop(0, 1500, body, (z, opt.sgd_init(z))))(logits0)
  np.testing.assert_allclose(jax.nn.softmax(logits), p_hat, rtol=1e-8)
  # The minimum average NLL is the entropy of the empirical distribution.
  p = np.asarray(p_hat)
  entropy = -np.sum(p * np.log(p))
  min_nll = float(opt.categorical_mean_nll(jnp.log(p_hat), tokens))
  assert min_nll == pytest.approx(entropy, rel=1e-12)
  # Any other distribution does worse (Gibbs): H(p_hat, q) = H(p_hat) + KL(p_hat || q).
  for _ in range(20):
    q = rng.dirichlet(np.ones(v))
    assert float(opt.categorical_mean_nll(jnp.log(q), tokens)) > entropy


def test_mle_bernoulli_on_a_grid():
  tokens = jnp.asarray([1] * 37 + [0] * 63)
  thetas = np.linspace(0.001, 0.999, 999)
  nll = jax.vmap(lambda t: opt.categorical_mean_nll(jnp.log(jnp.stack([1 - t, t])), tokens))(
      jnp.asarray(thetas))
  assert thetas[int(np.argmin(np.asarray(nll)))] == pytest.approx(0.37)
  np.testing.assert_allclose(opt.categorical_mle(tokens, 2), [0.63, 0.37])


def test_bad_arguments():
  with pytest.raises(ValueError, match="warmup_steps"):
    opt.warmup_cosine_schedule(1.0, warmup_steps=10, total_steps=10)
  with pytest.raises(ValueError, match="momentum"):
    opt.sgd_update({"a": jnp.ones(2)}, opt.sgd_init({"a": jnp.ones(2)}), 0.1, momentum=1.5)
  with pytest.raises(ValueError, match="mask"):
    params = _params()
    opt.adamw_update(params, opt.adamw_init(params), params, 0.1, mask={"embed": True})
  with pytest.raises(ValueError, match="sigma"):
    opt.map_linear_gaussian(jnp.ones((3, 2)), jnp.ones(3), 0.0, 1.0)
  with pytest.raises(ValueError, match="x must"):
    opt.ridge_regression(jnp.ones((3, 2)), jnp.ones(4), 1.0)
  assert math.isfinite(float(opt.inverse_time_schedule(1.0)(3)))
