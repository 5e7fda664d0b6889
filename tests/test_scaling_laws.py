"""Tests for llm_math.analysis.scaling_laws: recovery of known power laws, optimality, argument checks."""
import numpy as np
import pytest

from llm_math.analysis import scaling_laws


def _log_sse(n, loss, a, alpha, c):
  return float(np.sum((np.log(scaling_laws.power_law(n, a, alpha, c)) - np.log(loss)) ** 2))


@pytest.mark.parametrize("a,alpha,c", [(400.0, 0.34, 1.7), (10.0, 0.076, 0.0), (2e3, 0.5, 3.0),
                                       (5.0, 0.05, 1.0), (1e4, 0.9, 0.2)])
@pytest.mark.parametrize("num_points", [3, 6, 12])
def test_recovers_exact_power_law(a, alpha, c, num_points):
  n = np.geomspace(1e5, 1e9, num_points)
  fit = scaling_laws.fit_power_law(n, scaling_laws.power_law(n, a, alpha, c))
  np.testing.assert_allclose([fit.a, fit.alpha], [a, alpha], rtol=1e-6)
  np.testing.assert_allclose(fit.c, c, rtol=1e-6, atol=1e-9)
  assert fit.rms_log_residual < 1e-9
  n_new = np.array([3e4, 7e9, 1e12])
  np.testing.assert_allclose(fit.predict(n_new), scaling_laws.power_law(n_new, a, alpha, c), rtol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_recovers_exponent_with_small_noise(seed):
  rng = np.random.default_rng(seed)
  n = np.geomspace(1e6, 1e10, 15)
  a, alpha, c = 400.0, 0.34, 1.7
  loss = scaling_laws.power_law(n, a, alpha, c) * np.exp(rng.normal(0.0, 0.003, n.size))
  fit = scaling_laws.fit_power_law(n, loss)
  assert abs(fit.alpha - alpha) < 0.03
  assert abs(fit.c - c) < 0.05
  # The fit is at least as good as the generating parameters, and is a stationary point of S.
  sse = _log_sse(n, loss, fit.a, fit.alpha, fit.c)
  assert sse <= _log_sse(n, loss, a, alpha, c) + 1e-15
  np.testing.assert_allclose(fit.rms_log_residual, np.sqrt(sse / n.size), rtol=1e-10)
  theta = np.array([np.log(fit.a), fit.alpha, fit.c])
  for i in range(3):
    step = np.zeros(3)
    step[i] = 1e-6 * max(1.0, abs(theta[i]))
    up = _log_sse(n, loss, np.exp((theta + step)[0]), *(theta + step)[1:])
    down = _log_sse(n, loss, np.exp((theta - step)[0]), *(theta - step)[1:])
    assert abs(up - down) / (2 * step[i]) < 1e-5


def test_noisy_pure_power_law_keeps_c_nonnegative():
  rng = np.random.default_rng(7)
  n = np.geomspace(1e3, 1e8, 20)
  loss = scaling_laws.power_law(n, 10.0, 0.2, 0.0) * np.exp(rng.normal(0.0, 0.002, n.size))
  fit = scaling_laws.fit_power_law(n, loss)
  assert fit.c >= 0.0
  assert abs(fit.alpha - 0.2) < 0.02


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="at least 3 points"):
    scaling_laws.fit_power_law([1e6, 1e7], [3.0, 2.5])
  with pytest.raises(ValueError, match="n must be finite and > 0"):
    scaling_laws.fit_power_law([0.0, 1e6, 1e7], [4.0, 3.0, 2.5])
  with pytest.raises(ValueError, match="n must be finite and > 0"):
    scaling_laws.fit_power_law([-1.0, 1e6, 1e7], [4.0, 3.0, 2.5])
  with pytest.raises(ValueError, match="loss"):
    scaling_laws.fit_power_law([1e5, 1e6, 1e7], [4.0, 0.0, 2.5])
  with pytest.raises(ValueError, match="same length"):
    scaling_laws.fit_power_law([1e5, 1e6, 1e7], [4.0, 3.0])
  with pytest.raises(ValueError, match="distinct"):
    scaling_laws.fit_power_law([1e5, 1e5, 1e7], [4.0, 3.9, 2.5])
