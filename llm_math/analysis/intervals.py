"""Intervals: the mean of numbers measured over seeds with its Student-t 95% interval (`mean_ci95`),
the paired interval of a difference measured on the same seeds (`paired_ci95`), and
percentile-bootstrap 95% intervals of fitted parameters over resampled data points
(`percentile_bootstrap`)."""

import math
from typing import Callable, Mapping

import numpy as np
from scipy import stats


def mean_ci95(values) -> dict:
  """{'mean', 'ci95': [lo, hi], 'n'} of the finite `values` (one per seed): the mean +- t_{0.975,
  n-1} s / sqrt(n), s the sample standard deviation. With fewer than 2 values the interval is None
  (one seed bounds nothing); with none the mean is None too."""
  x = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
  if x.size == 0:
    return {"mean": None, "ci95": None, "n": 0}
  mean = float(x.mean())
  if x.size < 2:
    return {"mean": mean, "ci95": None, "n": 1}
  half = float(stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
  return {"mean": mean, "ci95": [mean - half, mean + half], "n": int(x.size)}


def paired_ci95(a, b) -> dict:
  """The paired comparison of two quantities measured on the same seeds (a[i], b[i] from seed i):
  {'mean', 'ci95', 'n'} of the differences a - b (`mean_ci95`), and 'below': on how many seeds
  a < b. Pairing takes the seed-to-seed variation both share out of the interval."""
  a_arr, b_arr = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a_arr.shape != b_arr.shape or a_arr.ndim != 1:
    raise ValueError(f"a, b: expected equal 1-D shapes (one value per seed), got {a_arr.shape}, "
                     f"{b_arr.shape}")
  return {**mean_ci95((a_arr - b_arr).tolist()), "below": int(np.sum(a_arr < b_arr))}


def percentile_bootstrap(refit: Callable[[np.ndarray], Mapping[str, float] | None], num_points: int,
                         num_samples: int, seed: int = 0) -> dict:
  """Percentile-bootstrap 95% intervals of a fit's parameters over resamples of its data points.

  Each of `num_samples` resamples draws `num_points` point indices with replacement (numpy
  default_rng(seed)) and calls `refit(idx)`, which refits on those points and returns {name: value},
  or None when the fit cannot be made (too few distinct points, say); a refit that raises
  ValueError, ArithmeticError or LinAlgError, or gives a non-finite value, counts as failed too and
  is skipped.
  The interval of each parameter is the 2.5th and 97.5th percentiles of its successful refits.

  Returns:
    {'ci95': {name: [lo, hi]} (None when every refit failed), 'failures': failed refits,
     'samples': {name: [value per successful refit]}}.
  """
  if num_samples < 1 or num_points < 1:
    raise ValueError(f"num_samples and num_points must be >= 1, got {num_samples}, {num_points}")
  rng = np.random.default_rng(seed)
  draws, failures = [], 0
  for _ in range(num_samples):
    idx = rng.integers(0, num_points, num_points)
    try:
      with np.errstate(all="ignore"):
        values = refit(idx)
    except (ValueError, ArithmeticError, np.linalg.LinAlgError):
      values = None
    if values is None or not all(v is not None and math.isfinite(v) for v in values.values()):
      failures += 1
    else:
      draws.append({k: float(v) for k, v in values.items()})
  if not draws:
    return {"ci95": None, "failures": failures, "samples": {}}
  samples = {k: [d[k] for d in draws] for k in draws[0]}
  return {"ci95": {k: percentile_ci95(v) for k, v in samples.items()}, "failures": failures,
          "samples": samples}


def percentile_ci95(values) -> list:
  """[2.5th, 97.5th] percentiles of `values` (linear interpolation between order statistics)."""
  lo, hi = np.percentile(np.asarray(values, np.float64), [2.5, 97.5])
  return [float(lo), float(hi)]


def bootstrap_note(failures: int, num_samples: int) -> str | None:
  """The note on a bootstrap with failed refits: None when none failed."""
  if failures == 0:
    return None
  if failures == num_samples:
    return f"all {num_samples} bootstrap refits failed: no interval"
  return f"{failures} of {num_samples} bootstrap refits failed and were skipped"


def join_notes(*notes: str | None) -> str | None:
  """One line from the notes that are not None ('; '-separated), None when there are none."""
  kept = [n for n in notes if n]
  return "; ".join(kept) if kept else None
