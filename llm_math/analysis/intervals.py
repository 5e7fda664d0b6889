"""Intervals on numbers measured over seeds: the mean and its Student-t 95% interval."""

import math

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
