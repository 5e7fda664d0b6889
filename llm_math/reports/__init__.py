"""results.md of every study, built from its saved results.json alone (no JAX, no plotting): one
module per study, `report(results) -> str`, and the table helpers they share."""

import importlib


def markdown_table(header: list[str], rows: list[list], align: str | None = None) -> list[str]:
  """The lines of a markdown table; `align` has one character per column, 'l' or 'r' (default:
  the first column left, the rest right). Cells are written with str()."""
  align = align or "l" + "r" * (len(header) - 1)
  line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"
  return [line(header), "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"] + [
      line(r) for r in rows]


def fmt(value, spec: str, missing: str = "-") -> str:
  """format(value, spec), or `missing` for None (a number results.json could not hold)."""
  return missing if value is None else format(value, spec)


def measurement_caption(evaluation: dict) -> str:
  """How a number was measured: split, tokens scored, context each token had."""
  return (f"{evaluation['split']} split, {evaluation['tokens_scored']:,} tokens scored, context "
          f"{evaluation['context_min']}-{evaluation['context_max']} tokens "
          f"(mean {evaluation['context_mean']:.1f})")


def interval(stat: dict, spec: str = ".3f") -> str:
  """'mean ± half-width (n seeds)' of an `analysis.intervals.mean_ci95` record, the mean alone with
  one seed, '-' without a mean."""
  if stat.get("mean") is None:
    return "-"
  if not stat.get("ci95"):
    return f"{format(stat['mean'], spec)} (1 seed)"
  half = (stat["ci95"][1] - stat["ci95"][0]) / 2
  return f"{format(stat['mean'], spec)} ± {format(half, spec)} ({stat['n']} seeds)"


def report(results: dict) -> str:
  """results.md of the study that wrote `results` (its module is picked by results["experiment"],
  see `study_module`)."""
  return study_module(__name__, results["experiment"]).report(results)


def study_module(package: str, experiment: str):
  """`package`.<experiment> (a study of this repo), else the module named `experiment` (a study
  kept in one file of its own, which defines `report` and `draw` itself)."""
  try:
    return importlib.import_module(f"{package}.{experiment}")
  except ModuleNotFoundError as e:
    if e.name != f"{package}.{experiment}":
      raise
    return importlib.import_module(experiment)
