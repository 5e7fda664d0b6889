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


def pm(record: dict | None, key: str, spec: str, missing: str = "-") -> str:
  """record[key] with its 95% interval: 'mean ± half-width' over seeds when a multi-seed aggregate
  gave it `<key>_ci95` (`studies.seeds`), else 'value [lo, hi]' when it is a fitted parameter with a
  bootstrap interval (record["ci95"][key]), else the value alone; `missing` for None."""
  value = None if record is None else record.get(key)
  if value is None:
    return missing
  seeds = record.get(f"{key}_ci95")
  if seeds:
    return f"{format(value, spec)} ± {format((seeds[1] - seeds[0]) / 2, spec.lstrip('+'))}"
  boot = (record.get("ci95") or {}) if isinstance(record.get("ci95"), dict) else {}
  if boot.get(key):
    lo, hi = boot[key]
    return f"{format(value, spec)} [{format(lo, spec)}, {format(hi, spec)}]"
  return format(value, spec)


def fields(d: dict) -> dict:
  """`d` without what a multi-seed aggregate adds beside its numbers (`<field>_ci95`, per_seed,
  n_seeds): for iterating a dict keyed by names (references, matrices, timings)."""
  return {k: v for k, v in d.items()
          if not (k.endswith("_ci95") or k in ("per_seed", "n_seeds"))}


def seeds_caption(results: dict) -> str | None:
  """How a multi-seed aggregate's intervals read, None for one seed."""
  if not results.get("n_seeds"):
    return None
  return (f"Mean over {results['n_seeds']} seeds ({', '.join(map(str, results['seeds']))}); "
          "'± h' is the half-width of the Student-t 95% interval over seeds, '[lo, hi]' a "
          "percentile-bootstrap 95% interval of a fit; seeds/seed_<s>/results.md has each seed.")


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
