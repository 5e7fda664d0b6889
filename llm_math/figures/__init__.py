"""The figures of every study, drawn from its saved results.json alone (matplotlib and numpy, never
JAX): one module per study, `draw(results, workdir) -> [file names]`, and the pieces they share.
`draw` here picks the study's module from results["experiment"]."""

import os

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import ticker  # pylint: disable=g-import-not-at-top,wrong-import-position

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
