"""Shared pieces of every figure (matplotlib and numpy only, never JAX, so figures can be redrawn from
the files an experiment wrote). Each experiment's own figures live in experiments/plot_<name>.py."""

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import ticker  # pylint: disable=g-import-not-at-top,wrong-import-position

from llm_math import files  # pylint: disable=g-import-not-at-top,wrong-import-position


def measurement_caption(evaluation: dict) -> str:
  """How a number was measured: split, tokens scored, context each token had."""
  return (f"{evaluation['split']} split, {evaluation['tokens_scored']:,} tokens scored, context "
          f"{evaluation['context_min']}-{evaluation['context_max']} tokens "
          f"(mean {evaluation['context_mean']:.1f})")


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
