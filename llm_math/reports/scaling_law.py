"""results.md of the scaling-law study (`llm_math.studies.scaling_law`), from its results.json."""

from llm_math.reports import fmt
from llm_math.reports import markdown_table
from llm_math.reports import measurement_caption
from llm_math.reports import pm
from llm_math.reports import seeds_caption


def bracket(value, ci, spec: str = ".3g") -> str:
  """'value [lo, hi]' (a 95% interval), the value alone without an interval, '-' without a value."""
  if value is None:
    return "-"
  if not ci or ci[0] is None or ci[1] is None:
    return format(value, spec)
  return f"{format(value, spec)} [{format(ci[0], spec)}, {format(ci[1], spec)}]"


def count(value: float) -> str:
  """A count in few digits: 512, 1.28k, 4.1M."""
  for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
    if value >= scale:
      return f"{value / scale:.3g}{suffix}"
  return f"{value:.3g}"


def sizes(records: list[dict]) -> list[str]:
  """The model sizes of the records, smallest first."""
  return sorted({r["size"] for r in records},
                key=lambda s: next(r["params"] for r in records if r["size"] == s))


def loss_grid(results: dict) -> list[str]:
  """A table of the validation NLL: one row per size (N), one column per budget (steps, D)."""
  records = results["records"]
  budgets = sorted({r["steps"] for r in records})
  tokens = {r["steps"]: r["tokens"] for r in records}
  header = ["model", "N"] + [f"{s} steps (D = {count(tokens[s])})" for s in budgets]
  rows = []
  for size in sizes(records):
    by_steps = {r["steps"]: r for r in records if r["size"] == size}
    rows.append([size, f"{next(iter(by_steps.values()))['params']:,}"]
                + [pm(by_steps.get(s), "val_nll_nats", ".4f")
                   for s in budgets])
  return markdown_table(header, rows)


def run_table(results: dict) -> list[str]:
  """Every run: N, steps, D, C, NLL, bits/char, how it was trained (trunk, branch at step p or from
  scratch), the steps trained in its own directory and its wall time."""
  how = lambda r: (f"branch at {r['branched_at']}" if r["run"] == "branch" else r["run"])
  return markdown_table(
      ["run", "N", "steps", "D (tokens)", "C = 6ND (FLOPs)", "val NLL (nats/token)", "bits/char",
       "trained as", "steps trained here", "wall (s)"],
      [[r["name"], f"{r['params']:,}", r["steps"], f"{r['tokens']:,}", f"{r['flops']:.3g}",
        pm(r, "val_nll_nats", ".4f"), pm(r, "bits_per_char", ".4f"), how(r), r["steps_trained"],
        fmt(r.get("wall_time_s"), ".0f")] for r in results["records"]])


def fit_lines(fit: dict) -> list[str]:
  """The fitted E, A, alpha, B, beta with their 95% intervals, and how the fit was made."""
  ci = fit.get("ci95") or {}
  rows = [[name, bracket(fit.get(name), ci.get(name), ".3g" if name in ("A", "B") else ".3f")]
          for name in ("E", "A", "alpha", "B", "beta")]
  boot = fit.get("bootstrap_samples_used", 0) + fit.get("bootstrap_failures", 0)
  how = (f"95% percentile-bootstrap intervals over {boot} resamples of the {fit['num_points']} "
         f"points ({fit.get('bootstrap_failures', 0)} refits failed)" if boot
         else "no bootstrap: no intervals")
  return (markdown_table(["parameter", "value [95% interval]"], rows)
          + ["", f"Huber loss (delta 1e-3) on ln L, refined from the best of Hoffmann et al.'s "
             f"grid of starting points; rms residual of ln L "
             f"{fmt(fit.get('rms_log_residual'), '.4f')}; {how}."])


def optimal_lines(results: dict) -> list[str]:
  """The exponents a, b beside Chinchilla's, and N*(C), D*(C) at a few C of the grid."""
  opt, ref = results["compute_optimal"], results["chinchilla_reference"]
  ci = opt.get("ci95") or {}
  third = ref.get("approach_3", {})
  lines = markdown_table(
      ["exponent", "this fit [95% interval]", "Chinchilla"],
      [["a (N* ~ C^a)", bracket(opt.get("a"), ci.get("a"), ".3f"),
        f"{ref['a']:.2f} (approach 3: {third.get('a', '-')})"],
       ["b (D* ~ C^b)", bracket(opt.get("b"), ci.get("b"), ".3f"),
        f"{ref['b']:.2f} (approach 3: {third.get('b', '-')})"]])
  lines += ["", f"Chinchilla: {ref['source']}; approach 3 is the parametric fit made here."]
  if opt.get("n_opt") is None:
    return lines
  flops = opt["flops"]
  picks = sorted({0, len(flops) // 2, len(flops) - 1})
  rows = []
  for i in picks:
    n_ci = ci["n_opt"][i] if ci.get("n_opt") else None
    d_ci = ci["d_opt"][i] if ci.get("d_opt") else None
    rows.append([f"{flops[i]:.3g}", bracket(opt["n_opt"][i], n_ci, ".3g"),
                 bracket(opt["d_opt"][i], d_ci, ".3g"), f"{opt['d_opt'][i] / opt['n_opt'][i]:.3g}"])
  return lines + [""] + markdown_table(
      ["C (FLOPs)", "N* [95%]", "D* (tokens) [95%]", "D* / N*"], rows)


def report(results: dict) -> str:
  """How the runs were measured, the loss over the (N, D) grid, every run, the fit, the
  compute-optimal exponents beside Chinchilla's, and the notes."""
  ev = results["evaluation"]
  records = results["records"]
  budgets = results.get("budgets") or sorted({r["steps"] for r in records})
  trained = sum(r["steps_trained"] for r in records)
  scratch = sum(r["steps"] for r in records)
  lines = [f"# Scaling law L(N, D): {results['data']}", "",
           *([seeds_caption(results), ""] if seeds_caption(results) else []),
           f"Measured on the {measurement_caption(ev)}; {ev.get('chars_scored', 0):,} characters; "
           "every run is scored on the same windows. N counts every parameter (embeddings "
           f"included), D = steps x {results.get('tokens_per_step', '?'):,} tokens, C = 6ND. Each "
           f"size trains one WSD trunk of {budgets[-1]} steps; each smaller budget branches off it "
           "where its own decay starts and trains only its cool-down (the same run as one from "
           f"scratch): {trained:,} steps trained for a grid of {scratch:,}.", "",
           "## Validation NLL (nats/token)", "", *loss_grid(results), "", "## Runs", "",
           *run_table(results), "",
           "## Fit: L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, approach 3)", "",
           *fit_lines(results["fit"]), "", "## Compute-optimal allocation", "",
           *optimal_lines(results), ""]
  notes = results.get("notes") or []
  if notes:
    lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
  return "\n".join(lines)
