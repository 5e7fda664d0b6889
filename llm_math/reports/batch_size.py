"""results.md of the batch-size study (`llm_math.studies.batch_size`), from its results.json."""

from llm_math.reports import fmt
from llm_math.reports import markdown_table
from llm_math.reports import pm
from llm_math.reports import seeds_caption


def checkpoint_caption(gv) -> str:
  """Which run the gradient variance was measured at (results["gradient_variance"]["checkpoint"])."""
  c = gv["checkpoint"]
  return (f"best run at B={c['batch_size']}, lr {c['best_learning_rate']:.2e}, step "
          f"{c['stopped_at_step']:.0f}, validation loss {c['final_val_nll']:.4f}")


def _protocol(results) -> list[str]:
  """How the runs were made and measured, from the config in results.json."""
  c, t, ev, floors = results["config"], results["target"], results["evaluation"], results["floor"]
  rule = (f"powers of {c['lr_tune_factor']:g} around the sqrt rule {c['learning_rate']:g} "
          f"(B/{c['lr_reference_batch']})^0.5, best = fewest steps to target"
          if c["lr_rule"] == "tune" else
          f"the {c['lr_rule']} rule from {c['learning_rate']:g} at B = {c['lr_reference_batch']}")
  pilot = t["pilot"]
  how = (f"Pilot run at the smallest batch B={pilot['batch_size']} with its rule learning rate "
         f"{pilot['learning_rate']:.3g} for {c['pilot_steps']} steps; target = its lowest "
         f"3-evaluation running mean of the validation loss + {c['target_margin']} nats."
         if pilot else "Set by --config.target_loss.")
  floor = (f" True-model floor on those tokens: validation {floors['val']:.4f}, training "
           f"{floors['train']:.4f}." if floors else "")
  return [f"# Batch size: {results['data']}", "",
          f"Model: {results['model']['description']}, {results['model']['params']:,} parameters. "
          f"Optimizer: Adam, constant learning rate after {c['warmup_steps']} warmup steps; "
          f"learning rate per B: {rule}. Every run stops at the target, at divergence or at "
          f"{c['num_steps']} steps; evaluations at steps 1, 2, ... then x{c['eval_growth']} apart.",
          "", f"Target validation loss: **{t['loss']:.4f} nats/token**. {how} Losses are measured on "
          f"{ev['tokens_scored']:,} tokens of each split in independent windows (context "
          f"{ev['context_min']}-{ev['context_max']}).{floor}", ""]


def _sweep_table(results) -> list[str]:
  """One row per B: its best run, the generalization gap, sharpness and B_simple."""
  sweep, floors = results["sweep"], results["floor"]
  header = ["B", "best lr", "lrs tried", "steps to target", "examples to target",
            "speed-up vs B/2", "final train NLL", "final val NLL", "gap (val - train)",
            "top Hessian eig", "eps-sharpness", "B_simple (all steps)", "B_simple (2nd half)"]
  rows = []
  for prev, r in zip([None] + sweep[:-1], sweep):
    gap = r["generalization_gap"]  # None in a results.json where it was NaN (a diverged run)
    rows.append([r["batch_size"], f"{r['best_learning_rate']:.2e}", len(r["learning_rates_tried"]),
                 pm(r, "steps_to_target", ".1f") if r["reached"] else f"> {r['stopped_at_step']}",
                 pm(r, "examples_to_target", ",.0f"),
                 f"{prev['steps_to_target'] / r['steps_to_target']:.2f}x"
                 if prev and prev["reached"] and r["reached"] and r["steps_to_target"] else "-",
                 pm(r, "final_train_nll", ".4f"), pm(r, "final_val_nll", ".4f"),
                 pm(r, "generalization_gap", "+.4f"),
                 pm(r, "hessian_top_eigenvalue", ".3g"), pm(r, "epsilon_sharpness", ".3g"),
                 pm(r, "b_simple", ".1f"), pm(r, "b_simple_late", ".1f")])
    if floors:  # The gap the true model has on the same tokens, taken off.
      rows[-1].insert(9, fmt(None if gap is None else gap - (floors["val"] - floors["train"]), "+.4f"))
  if floors:
    header.insert(9, "gap net of floors")
  lines = markdown_table(header, rows, "r" * len(header)) + [""]
  unreached = [r["batch_size"] for r in sweep if not r["reached"]]
  if unreached:
    lines += [f"Not reached within the step cap: B = {unreached} (left out of the fit).", ""]
  return lines


def _notes(results) -> list[str]:
  """The study's notes on its fits (results["notes"]: too few points, a bound, a degenerate fit)."""
  notes = results.get("notes") or []
  return ["**Notes.**", "", *(f"- {n}" for n in notes), ""] if notes else []


def _fit_and_regimes(results) -> list[str]:
  """The trade-off fit, B_simple beside B_crit, and the speed-ups of the first and last doubling
  (a fit value results.json could not hold, such as an infinite B_crit, shows as '-')."""
  fit, ns, reg = results["fit"], results["noise_scale"], results["regimes"]
  lines = []
  if fit:
    b_crit = fit["b_crit"]
    ratio = b_crit / ns["b_simple"] if ns["b_simple"] and b_crit is not None else None
    lines += [
        f"**Fit** (McCandlish et al. 2018, S = S_min (1 + B_crit/B), E = E_min (1 + B/B_crit), "
        "least squares on log S): "
        f"S_min = {pm(fit, 's_min', '.1f')} steps, E_min = {pm(fit, 'e_min', ',.0f')} sequences, "
        f"**B_crit = {pm(fit, 'b_crit', '.1f')}** sequences (rms log residual "
        f"{fmt(fit['rms_log_residual'], '.3f')}; [lo, hi]: 95% bootstrap intervals"
        + (f"; fitted on {fit['points']}" if fit.get("points") else "") + ").",
        "", f"**B_simple** measured during training (two-batch estimator every step, B_small = B / "
        f"{results['config']['noise_microbatches']} micro-batches, B_big = B; |G|^2 and tr(Sigma) "
        f"averaged over the steps of each B's best run, ratio last; median over B): "
        f"**{pm(ns, 'b_simple', '.1f')}**; B_crit / B_simple = "
        f"{fmt(ratio, '.2f')}. Over the second half of the steps only (near the target): "
        f"{pm(ns, 'b_simple_late', '.1f')}.", ""]
  if reg:
    sm, lg = reg["small"], reg["large"]
    words = (f"**Regimes.** Small B: doubling B from {sm['from']} to {sm['to']} cuts the steps to "
             f"target {sm['speedup']:.2f}x (perfect scaling: 2x) while the examples to target change "
             f"{sm['examples_ratio']:.2f}x (perfect scaling: 1x). Large B: doubling from {lg['from']} "
             f"to {lg['to']} cuts the steps {lg['speedup']:.2f}x and multiplies the examples "
             f"{lg['examples_ratio']:.2f}x (diminishing returns: 1x and 2x).")
    if fit and "excess_examples_small" in reg:
      words += (f" By the fit, B = {sm['from']} needs {100 * reg['excess_examples_small']:.0f}% more "
                f"examples than E_min and B = {lg['to']} needs {100 * reg['excess_examples_large']:.0f}% "
                f"more (E / E_min - 1 = B / B_crit); steps approach S_min = {fmt(fit['s_min'], '.0f')}.")
    lines += [words, ""]
  return lines


def _variance(results) -> list[str]:
  gv = results["gradient_variance"]
  if not gv:
    return []
  fresh, rs = gv["fresh"], gv["resampled"]
  rows = [[b, f"{var:.4g} +- {se:.2g}", f"{pred:.4g}", f"{var / pred:.3f}"] for b, var, se, pred
          in zip(fresh["batch_sizes"], fresh["variance"], fresh["stderr"], fresh["predicted"])]
  return [
      f"**Gradient variance vs B** at a fixed checkpoint ({checkpoint_caption(gv)}): fitted log-log slope "
      f"**{pm(gv, 'slope', '.3f')}** (theory -1, |slope + 1| = {abs(gv['slope'] + 1):.3f}). For each B, "
      f"{fresh['num_batches']} independent mini-batches of fresh training windows; E|g_B - G|^2 is "
      "the unbiased sample variance of their gradients (no reference G needed). Prediction "
      f"tr(Sigma)/B from {gv['num_examples']} separate per-example gradients (one window each): "
      f"tr(Sigma) = {gv['trace_sigma_unbiased']:.4g}, |G|^2 = {gv['g_sq_unbiased']:.4g}, "
      f"per-example B_simple = {fmt(gv['b_simple'], '.1f')}.", "",
      *markdown_table(["B", "E\\|g_B - G\\|^2, fresh batches (+- s.e.)",
                       "tr(Sigma) / B (per-example)", "measured / predicted"], rows, "rrrr"),
      "", f"Re-drawing mini-batches from the {gv['num_examples']} per-example gradients "
      f"({rs['num_batches']} per B) follows tr(Sigma_pop)/B by construction with replacement "
      f"(slope {rs['slope_with_replacement']:.3f}); without replacement it follows the "
      "finite-population law tr(Sigma_pop)/B (N - B)/(N - 1), e.g. at B = "
      f"{rs['batch_sizes'][-1]}: {rs['variance_without_replacement'][-1]:.4g} measured, "
      f"{rs['expected_without_replacement'][-1]:.4g} predicted, "
      f"{rs['expected_with_replacement'][-1]:.4g} without the correction.", ""]


def report(results: dict) -> str:
  """results.md: the protocol, the notes on the fits, the sweep table, the fit and regimes, the
  gradient variance law."""
  lines = (_protocol(results) + ([seeds_caption(results), ""] if seeds_caption(results) else [])
           + _notes(results) + _sweep_table(results) + _fit_and_regimes(results) + _variance(results)
           + [f"{pm(results, 'runs_total', '.0f')} training runs, {pm(results, 'examples_total', ',.0f')} training "
              f"sequences in all; {pm(results, 'wall_time_s', '.0f')} s wall."])
  return "\n".join(lines) + "\n"
