"""A study over several seeds: each seed a run of the whole study in its own workdir, and one
aggregate whose measured numbers are the means over seeds with their 95% intervals.

A run is a pure function of (config, seed): initialization, data order and synthetic data all
follow `config.seed`, so seed s's study is the single-seed study with --seed=s, resumable like any
other (workdir/seeds/seed_<s>/). The aggregate keeps the single-seed layout, so reports and figures
read it as they read one seed; at every dict of it, each number that differs between seeds is
replaced by its mean and gains `<field>_ci95` = [lo, hi] (Student t over seeds,
`analysis.intervals.mean_ci95`), and the dict gains `n_seeds` and `per_seed` {field: [value per
seed]}. A list of numbers (a curve: the validation loss at each evaluation) is averaged point by
point, its `<field>_ci95` a list of intervals. Numbers equal in every seed (a parameter count, a
step) stay as they are.
"""

import math
import os

from llm_math import studies
from llm_math.analysis import intervals

SEEDS_DIR = "seeds"


def seed_workdir(workdir, seed: int) -> str:
  """Where seed `seed`'s study lives under a multi-seed study's `workdir`."""
  return os.path.join(str(workdir), SEEDS_DIR, f"seed_{seed}")


def run_seeds(run, config, workdir, seeds, log=print, summarize=None) -> dict:
  """`run(config, workdir, log) -> results` for each seed (config.seed = seed) in its own workdir,
  whose results, report and figures are written there; the aggregate over seeds (`aggregate`),
  passed through the study's `summarize(aggregate, per_seed_results) -> aggregate` when it has one
  (paired comparisons of its models over the same seeds, fits refitted on every seed's points)."""
  per_seed = []
  for seed in seeds:
    c = config.copy_and_resolve_references()
    c.seed = int(seed)
    directory = studies.run_dir(c, workdir, SEEDS_DIR, f"seed_{seed}")
    log(f"seed {seed}: {directory}")
    results = run(c, directory, log)
    studies.write_results(directory, results)
    per_seed.append(results)
  out = aggregate(per_seed, [int(s) for s in seeds])
  return summarize(out, per_seed) if summarize else out


def per_seed_values(record: dict, key: str, n_seeds: int) -> list | None:
  """record[key] on each of the `n_seeds` seeds of an aggregate: its `per_seed` list, or the one
  value repeated when it was the same on every seed; None when the record has no such number."""
  if key in (record.get("per_seed") or {}):
    return record["per_seed"][key]
  return None if record.get(key) is None else [record[key]] * n_seeds


def pooled(records: list[dict], key: str, n_seeds: int) -> list[dict]:
  """One record per (record, seed) of an aggregate's `records`, with `key` at that seed's value
  (`per_seed_values`; records without it are left out): the points a fit over every seed takes."""
  return [{**r, key: v} for r in records for v in per_seed_values(r, key, n_seeds) or []]


def aggregate(per_seed: list[dict], seeds: list[int]) -> dict:
  """One results dict from the results of each seed (same study, same config but the seed)."""
  if len(per_seed) != len(seeds) or not per_seed:
    raise ValueError(f"aggregate: {len(per_seed)} results for seeds {seeds}")
  out = _merge([{k: v for k, v in r.items() if k != "config"} for r in per_seed])
  if "config" in per_seed[0]:
    out["config"] = {**per_seed[0]["config"], "seed": None}
  return {**out, "seeds": list(seeds), "n_seeds": len(seeds)}


def _is_number(v) -> bool:
  return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _is_series(column: list) -> bool:
  """Lists of numbers of one length (a curve per seed): averaged point by point."""
  return (all(isinstance(v, (list, tuple)) and v and all(_is_number(x) for x in v) for v in column)
          and len({len(v) for v in column}) == 1)


def _varies(values: list) -> bool:
  finite = [v for v in values if v is not None and math.isfinite(v)]
  return bool(finite) and any(v != values[0] for v in values)


def _merge(values: list):
  first = values[0]
  if all(isinstance(v, dict) for v in values):
    out, varying = {}, {}
    for key in first:
      column = [v.get(key) for v in values]
      if not all(key in v for v in values):
        out[key] = first[key]
      elif all(_is_number(v) for v in column) and _varies(column):
        stat = intervals.mean_ci95(column)
        out[key], out[f"{key}_ci95"], varying[key] = stat["mean"], stat["ci95"], column
      elif _is_series(column) and any(_varies(list(items)) for items in zip(*column)):
        stats = [intervals.mean_ci95(items) for items in zip(*column)]
        out[key], out[f"{key}_ci95"] = [s["mean"] for s in stats], [s["ci95"] for s in stats]
        varying[key] = column
      else:
        out[key] = _merge(column)
    if varying:
      out.update(n_seeds=len(values), per_seed=varying)
    return out
  if all(isinstance(v, (list, tuple)) for v in values) and len({len(v) for v in values}) == 1:
    return [_merge(list(items)) for items in zip(*values)]
  if all(_is_number(v) for v in values) and _varies(values):
    return intervals.mean_ci95(values)["mean"]  # A number inside a list: its mean.
  return first
