"""Tests for llm_math.analysis.intervals: the percentile bootstrap and its notes."""
import numpy as np
import pytest

from llm_math.analysis import intervals


def test_percentile_bootstrap_of_a_mean_matches_the_normal_interval():
  """The bootstrap distribution of a sample mean has sd ~ s / sqrt(n): its 95% interval is close to
  mean +- 1.96 s / sqrt(n); the same seed gives the same interval."""
  x = np.random.default_rng(0).normal(3.0, 2.0, 200)
  refit = lambda idx: {"mean": x[idx].mean()}
  boot = intervals.percentile_bootstrap(refit, x.size, 2000, seed=1)
  assert boot["failures"] == 0 and len(boot["samples"]["mean"]) == 2000
  half = 1.96 * x.std(ddof=1) / np.sqrt(x.size)
  np.testing.assert_allclose(boot["ci95"]["mean"], [x.mean() - half, x.mean() + half],
                             atol=0.1 * half)
  assert intervals.percentile_bootstrap(refit, x.size, 2000, seed=1)["ci95"] == boot["ci95"]
  np.testing.assert_allclose(intervals.percentile_ci95(np.arange(41.0)), [1.0, 39.0])


def test_failed_refits_are_skipped_and_counted():
  def refit(idx):
    if idx[0] == 0:
      return None  # too few points, say
    if idx[0] == 1:
      raise np.linalg.LinAlgError("singular")
    if idx[0] == 2:
      return {"v": float("nan")}
    return {"v": float(idx.mean())}

  boot = intervals.percentile_bootstrap(refit, 5, 400, seed=0)
  assert 400 * 0.6 * 0.7 < boot["failures"] < 400 * 0.6 * 1.3  # P(idx[0] in {0, 1, 2}) = 3/5
  assert boot["failures"] + len(boot["samples"]["v"]) == 400
  assert intervals.bootstrap_note(boot["failures"], 400).startswith(f"{boot['failures']} of 400")
  none = intervals.percentile_bootstrap(lambda idx: None, 5, 10)
  assert none == {"ci95": None, "failures": 10, "samples": {}}
  assert intervals.bootstrap_note(10, 10) == "all 10 bootstrap refits failed: no interval"
  assert intervals.bootstrap_note(0, 10) is None
  assert intervals.join_notes(None, "a", None, "b") == "a; b" and intervals.join_notes(None) is None
  with pytest.raises(ValueError, match="num_samples"):
    intervals.percentile_bootstrap(lambda idx: None, 5, 0)


def test_paired_interval_is_the_t_interval_of_the_differences():
  a, b = [1.0, 1.3, 1.1, 1.6], [0.9, 1.25, 1.0, 1.4]
  out = intervals.paired_ci95(a, b)
  assert out == {**intervals.mean_ci95(np.subtract(a, b).tolist()), "below": 0}
  with pytest.raises(ValueError, match="one value per seed"):
    intervals.paired_ci95([1.0, 2.0], [1.0])
