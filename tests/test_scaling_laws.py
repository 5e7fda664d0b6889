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


def test_power_law_bootstrap_intervals():
  """15 points with 0.3% noise: the intervals hold the estimate and the truth; the seed fixes them
  (and another seed moves them)."""
  rng = np.random.default_rng(3)
  n = np.geomspace(1e6, 1e10, 15)
  loss = scaling_laws.power_law(n, 400.0, 0.34, 1.7) * np.exp(rng.normal(0.0, 0.003, n.size))
  fit = scaling_laws.fit_power_law(n, loss, bootstrap=50, seed=1)
  plain = scaling_laws.fit_power_law(n, loss)
  assert fit[:4] == plain[:4] and plain.ci95 is None and plain.note is None
  assert fit.bootstrap_failures == 0 and fit.note is None
  for name, truth in (("a", 400.0), ("alpha", 0.34), ("c", 1.7)):
    lo, hi = fit.ci95[name]
    assert lo < getattr(fit, name) < hi and lo < truth < hi, name
  assert fit.ci95["alpha"][1] - fit.ci95["alpha"][0] < 0.1
  assert scaling_laws.fit_power_law(n, loss, bootstrap=50, seed=1).ci95 == fit.ci95
  assert scaling_laws.fit_power_law(n, loss, bootstrap=50, seed=2).ci95 != fit.ci95


def test_power_law_notes():
  """Exactly 3 sizes, c on its bound, an undetermined c and failed refits are said, not raised."""
  n = np.geomspace(1e5, 1e9, 3)
  fit = scaling_laws.fit_power_law(n, scaling_laws.power_law(n, 400.0, 0.34, 1.7), bootstrap=20)
  assert "3 distinct sizes for 3 parameters" in fit.note
  # A resample of 3 points holds all three only with probability 3!/3^3 = 2/9.
  assert 20 * 2 / 9 * 0.3 < 20 - fit.bootstrap_failures < 20 * 2 / 9 * 2.5
  assert f"{fit.bootstrap_failures} of 20 bootstrap refits failed" in fit.note
  n = np.geomspace(1e5, 1e9, 6)
  assert scaling_laws.fit_power_law(n, scaling_laws.power_law(n, 10.0, 0.1, 0.0)).note == (
      "c at its bound 0")
  # Noise as large as the whole power-law term: c (and alpha) cannot be told apart.
  rng = np.random.default_rng(0)
  loss = scaling_laws.power_law(n, 0.05, 0.1, 2.0) * np.exp(rng.normal(0.0, 0.02, n.size))
  fit = scaling_laws.fit_power_law(n, loss, bootstrap=20)
  assert "c undetermined: its 95% interval" in fit.note and "alpha's 95% interval" in fit.note


def test_power_law_record_gives_a_note_instead_of_raising():
  n = np.geomspace(1e5, 1e9, 8)
  loss = scaling_laws.power_law(n, 400.0, 0.34, 1.7)
  rec = scaling_laws.power_law_record(n, loss, bootstrap=10)
  assert set(rec) == {"a", "alpha", "c", "rms_log_residual", "ci95", "bootstrap_failures", "note",
                      "band"}
  assert rec["alpha"] == pytest.approx(0.34) and set(rec["ci95"]) == {"a", "alpha", "c"}
  bad = scaling_laws.power_law_record([1e6, 1e7], [3.0, 2.5])
  assert bad["alpha"] is None and bad["note"].startswith("no fit: n must hold at least 3 points")


# L(N, D) = E + A / N^alpha + B / D^beta, the Chinchilla paper's fit, on a 5 x 5 grid of (N, D).
CHINCHILLA = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}
_N, _D = (v.ravel() for v in np.meshgrid(np.geomspace(1e6, 1e9, 5), np.geomspace(1e7, 1e11, 5),
                                         indexing="ij"))
# A small starting grid (2 * 3^4 = 162 points) around the truth, not on it.
SMALL_GRID = {"e": (0.0, 1.0), "a": (0.0, 5.0, 10.0), "alpha": (0.0, 0.5, 1.0),
              "b": (0.0, 5.0, 10.0), "beta": (0.0, 0.5, 1.0)}


def _chinchilla_loss(n=_N, d=_D, p=CHINCHILLA):
  return scaling_laws.chinchilla_law(n, d, p["E"], p["A"], p["alpha"], p["B"], p["beta"])


def test_chinchilla_recovers_an_exact_law():
  """Exact losses: the fit finds the generating law from the small grid, with either optimizer."""
  loss = _chinchilla_loss()
  for optimizer, num_starts in (("least_squares", 4), ("L-BFGS-B", 1)):
    fit = scaling_laws.fit_chinchilla(_N, _D, loss, grid=SMALL_GRID, num_starts=num_starts,
                                      optimizer=optimizer)
    for name, truth in CHINCHILLA.items():
      assert fit[name] == pytest.approx(truth, rel=1e-3), (optimizer, name)
    assert fit["rms_log_residual"] < 1e-6 and fit["note"] is None and fit["ci95"] is None
    assert fit["num_points"] == 25 and fit["bootstrap_samples"] is None
  assert fit["huber_loss"] == pytest.approx(0.5 * 25 * fit["rms_log_residual"] ** 2, abs=1e-20)


def test_chinchilla_bootstrap_intervals_cover_the_exponents():
  """1% lognormal noise, 10 repetitions, 20 resamples each: the 95% intervals of alpha and beta hold
  the truth in most (a percentile interval from 20 resamples is rough; 7 of 10 is the bar)."""
  rng = np.random.default_rng(0)
  covered = np.zeros(2)
  for rep in range(10):
    loss = _chinchilla_loss() * np.exp(rng.normal(0.0, 0.01, _N.size))
    fit = scaling_laws.fit_chinchilla(_N, _D, loss, grid=SMALL_GRID, num_starts=1, bootstrap=20,
                                      seed=rep)
    assert fit["bootstrap_failures"] == 0 and set(fit["ci95"]) == set(CHINCHILLA)
    assert all(len(v) == 20 for v in fit["bootstrap_samples"].values())
    covered += [fit["ci95"]["alpha"][0] <= 0.34 <= fit["ci95"]["alpha"][1],
                fit["ci95"]["beta"][0] <= 0.28 <= fit["ci95"]["beta"][1]]
    assert abs(fit["alpha"] - 0.34) < 0.05 and abs(fit["beta"] - 0.28) < 0.05
  assert np.all(covered >= 7), covered


def test_compute_optimal_matches_brute_force():
  """N*(C) and D*(C) against minimizing L(N, C / (6N)) over ln N numerically, for several C; the
  exponents and their intervals from (here hand-made) bootstrap fits."""
  from scipy import optimize
  flops = np.array([1e18, 1e21, 1e24])
  opt = scaling_laws.compute_optimal(CHINCHILLA, flops)
  assert opt["a"] == pytest.approx(0.28 / 0.62) and opt["b"] == pytest.approx(0.34 / 0.62)
  for c, n_opt, d_opt in zip(flops, opt["n_opt"], opt["d_opt"]):
    along = lambda log_n: float(_chinchilla_loss(np.exp(log_n), c / (6 * np.exp(log_n))))
    best = optimize.minimize_scalar(along, bounds=(np.log(10.0), np.log(c / 60)), method="bounded",
                                    options={"xatol": 1e-10})
    assert n_opt == pytest.approx(np.exp(best.x), rel=1e-6)
    assert d_opt == pytest.approx(c / (6 * np.exp(best.x)), rel=1e-6)
    assert 6 * n_opt * d_opt == pytest.approx(c, rel=1e-12)
  assert opt["ci95"] is None
  one = scaling_laws.compute_optimal(CHINCHILLA, 1e21)
  assert one["n_opt"] == pytest.approx(opt["n_opt"][1]) and isinstance(one["n_opt"], float)
  # Intervals: the percentiles of the allocation of each bootstrap fit.
  rng = np.random.default_rng(0)
  samples = {k: list(v * np.exp(rng.normal(0.0, 0.05, 50))) for k, v in CHINCHILLA.items()}
  opt = scaling_laws.compute_optimal({**CHINCHILLA, "bootstrap_samples": samples}, flops)
  exps = np.array(samples["beta"]) / (np.array(samples["alpha"]) + np.array(samples["beta"]))
  np.testing.assert_allclose(opt["ci95"]["a"], np.percentile(exps, [2.5, 97.5]))
  np.testing.assert_allclose(opt["ci95"]["b"], 1 - np.percentile(exps, [97.5, 2.5]))
  assert len(opt["ci95"]["n_opt"]) == 3
  for (lo, hi), n_opt in zip(opt["ci95"]["n_opt"], opt["n_opt"]):
    assert lo < n_opt < hi


def test_chinchilla_degenerate_inputs_give_notes():
  """Too few points, no points, bad values and a vanishing exponent: a note each, no exception."""
  loss = _chinchilla_loss()
  few = scaling_laws.fit_chinchilla(_N[[0, 12, 24]], _D[[0, 12, 24]], loss[[0, 12, 24]],
                                    grid=SMALL_GRID, num_starts=1, bootstrap=5)
  assert few["note"].startswith("3 points for 5 parameters: underdetermined")
  assert all(few[k] is not None for k in CHINCHILLA)
  assert few["bootstrap_failures"] == 5 and few["ci95"] is None  # < 3 distinct N in every resample
  assert "all 5 bootstrap refits failed" in few["note"]
  assert scaling_laws.compute_optimal(few, 1e20)["note"].startswith("3 points")
  empty = scaling_laws.fit_chinchilla([], [], [])
  assert empty["note"] == "no fit: no points" and empty["alpha"] is None
  bad = scaling_laws.fit_chinchilla(_N, _D, -loss, grid=SMALL_GRID)
  assert bad["note"].startswith("no fit") and bad["E"] is None
  none = scaling_laws.compute_optimal(bad, [1e20, 1e21])
  assert none["n_opt"] is None and none["note"].startswith("no fit")
  flat = scaling_laws.compute_optimal({**CHINCHILLA, "beta": 0.0}, 1e20)
  assert flat["n_opt"] is None and "no compute optimum" in flat["note"]
  # One N only (the first 5 points): alpha is not determined.
  one_d = scaling_laws.fit_chinchilla(_N[:5], _D[:5], loss[:5] + 0.1, grid=SMALL_GRID, num_starts=1)
  assert "1 distinct N: alpha is not determined" in one_d["note"]
  with pytest.raises(ValueError, match="one length"):
    scaling_laws.fit_chinchilla(_N, _D[:3], loss)
