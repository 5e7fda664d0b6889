"""The figures of every study, drawn from its saved results.json alone (matplotlib and numpy, never
JAX): one module per study, `draw(results, workdir) -> [file names]`, and the pieces they share.
`draw` here picks the study's module from results["experiment"]."""

import os

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import ticker  # pylint: disable=g-import-not-at-top,wrong-import-position

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from llm_math import files  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math import reports  # pylint: disable=g-import-not-at-top,wrong-import-position


def draw(results: dict, workdir) -> list[str]:
  """Draws every figure of the study that wrote `results` into `workdir`; their file names."""
  return reports.study_module(__name__, results["experiment"]).draw(results, workdir)


def draw_each(figures: dict, results: dict, workdir) -> list[str]:
  """Calls each `figures[name](results, path)` with path = workdir/name; the names."""
  for name, plot in figures.items():
    plot(results, os.path.join(str(workdir), name))
  return list(figures)


def error_bars(records: list[dict], key: str, transform=None):
  """[2, n] matplotlib yerr of `records`' key from their `<key>_ci95` over seeds (`studies.seeds`),
  through `transform` (e.g. np.exp) when given; None when no record has an interval."""
  if not any(r.get(f"{key}_ci95") for r in records):
    return None
  f = transform or (lambda v: v)
  err = [(f(r[key]) - f(r[f"{key}_ci95"][0]), f(r[f"{key}_ci95"][1]) - f(r[key]))
         if r.get(f"{key}_ci95") else (0.0, 0.0) for r in records]
  return np.asarray(err, float).T


def band(ax, x, intervals_Xx2, transform=None, **kwargs) -> bool:
  """Shades the 95% band of a curve (`<field>_ci95` of a multi-seed aggregate: [lo, hi] or None per
  point) through `transform`; False when there is none to draw."""
  if not intervals_Xx2 or not any(intervals_Xx2):
    return False
  lo_hi = np.array([iv if iv else (np.nan, np.nan) for iv in intervals_Xx2], float)
  if transform:
    lo_hi = transform(lo_hi)
  ax.fill_between(np.asarray(x, float), lo_hi[:, 0], lo_hi[:, 1], alpha=kwargs.pop("alpha", 0.2),
                  lw=0, **kwargs)
  return True


def seeds_note(results: dict) -> str:
  """' (mean of n seeds, 95% bands/bars)' for a multi-seed aggregate, else ''."""
  return f" (mean of {results['n_seeds']} seeds, 95% t-intervals)" if results.get("n_seeds") else ""


def plain_log_ticks(axis):
  """Label a log axis with plain numbers (3, 10, 30) instead of 3x10^0."""
  fmt = ticker.FuncFormatter(lambda y, _: f"{y:g}")
  axis.set_major_formatter(fmt)
  axis.set_minor_formatter(fmt)


def save_figure(fig, path, dpi: int = 130, tight: bool = True):
  """Lays out (when `tight`), writes (to a local path or a URL such as gs://...) and closes `fig`."""
  if tight:
    fig.tight_layout()
  files.save_figure_to(fig, path, dpi=dpi)
  plt.close(fig)
