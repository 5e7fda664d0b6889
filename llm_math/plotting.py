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


def redraw_main(doc: str, study: str, plot_all, argv=None) -> None:
  """The main of an experiments/plot_<study>.py whose `plot_all(results, workdir)` draws every
  figure: reads --workdir's results.json (a one-line error without it) and redraws them there."""
  import argparse  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--workdir", required=True, help=f"A workdir of experiments/{study}.py.")
  args = parser.parse_args(argv)
  path = files.path(args.workdir) / "results.json"
  if not path.exists():
    print(f"error: --workdir={args.workdir}: no results.json (run experiments/{study}.py first)",
          file=sys.stderr)
    sys.exit(2)
  print("wrote " + ", ".join(plot_all(files.read_json(path), args.workdir)) + f" to {args.workdir}")
