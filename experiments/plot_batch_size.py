"""Figures and report of experiments/batch_size.py from its results.json (json, numpy and matplotlib
only, no JAX).

  python -m experiments.plot_batch_size --workdir=DIR

Writes to DIR: tradeoff.png (steps and examples to target vs B, the S-E frontier), gradient_variance.png,
noise_scale.png (B_simple over training), sharpness.png (sharpness and generalization gap vs B),
learning_rate.png (best learning rate vs B) and loss_curves.png (validation loss of each B's best run).
`report` renders results.md (the study writes it with results.json).
"""

import os
import textwrap

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments.common import fmt  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.common import markdown_table  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.figures import redraw_main  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.figures import save_figure  # pylint: disable=g-import-not-at-top,wrong-import-position


def _floats(values) -> np.ndarray:
  """`values` as float64; None (how results.json stores a NaN) becomes NaN."""
  return np.asarray(values, np.float64)


def _colors(batch_sizes):
  logs = np.log2(np.asarray(batch_sizes, np.float64))
  span = max(logs.max() - logs.min(), 1.0)
  return {b: plt.cm.viridis(0.9 * (l - logs.min()) / span) for b, l in zip(batch_sizes, logs)}


def _best_runs(results):
  return {r["batch_size"]: r for r in results["runs"] if r.get("best_at_batch_size")}


def _suptitle(fig, results, extra="", width=200):
  head = (f"{results['data']}; {results['model']['description']}; target validation loss "
          f"{results['target']['loss']:.4f} nats")
  fig.suptitle(textwrap.fill(head, width) + extra, fontsize=9)


def _batch_ticks(ax, batch_sizes):
  """Ticks at the batch sizes themselves (powers of two), labelled as plain integers."""
  ax.set_xticks([float(b) for b in batch_sizes])
  ax.set_xticklabels([f"{b:g}" for b in batch_sizes])
  ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def _b_lines(ax, results, label=True):
  """Vertical reference lines at the fitted B_crit and the measured B_simple."""
  fit, b_simple = results["fit"], results["noise_scale"]["b_simple"]
  if fit:
    ax.axvline(fit["b_crit"], color="tab:red", ls="--", lw=1.2,
               label=f"B_crit (fit) = {fit['b_crit']:.1f}" if label else None)
  if b_simple:
    ax.axvline(b_simple, color="tab:purple", ls=":", lw=1.5,
               label=f"B_simple (measured in training) = {b_simple:.1f}" if label else None)


def plot_tradeoff(results, path):
  """Steps vs B (perfect scaling line, fit), examples vs B, and the steps-examples frontier."""
  sweep, fit = results["sweep"], results["fit"]
  reached = [r for r in sweep if r["reached"]]
  b = np.array([r["batch_size"] for r in reached], np.float64)
  s = np.array([r["steps_to_target"] for r in reached])
  e = b * s
  dense = np.geomspace(min(r["batch_size"] for r in sweep) / 2, max(r["batch_size"] for r in sweep) * 2,
                       200)
  fig, (ax_s, ax_e, ax_f) = plt.subplots(1, 3, figsize=(17, 5))
  ax_s.loglog(b, s, "o", color="tab:blue", ms=7, label="measured (best lr per B)", zorder=5)
  ax_e.loglog(b, e, "o", color="tab:blue", ms=7, label="measured (best lr per B)", zorder=5)
  if len(b):
    ax_s.loglog(dense, s[0] * b[0] / dense, color="gray", ls=":", lw=1.3,
                label=f"perfect scaling S ~ 1/B (through B={b[0]:g})")
    ax_e.axhline(e[0], color="gray", ls=":", lw=1.3, label=f"perfect scaling E = const (B={b[0]:g})")
  for r in sweep:
    if not r["reached"]:
      for ax, y in ((ax_s, r["stopped_at_step"]), (ax_e, r["stopped_at_step"] * r["batch_size"])):
        ax.plot([r["batch_size"]], [y], marker="^", color="tab:red", ls="none", ms=8,
                label="not reached (run stopped here)")
  if fit:
    s_fit = fit["s_min"] + fit["e_min"] / dense
    ax_s.loglog(dense, s_fit, color="tab:red", lw=1.5,
                label=f"fit S_min (1 + B_crit/B): S_min={fit['s_min']:.0f}")
    ax_s.axhline(fit["s_min"], color="tab:red", ls="-.", lw=0.8, alpha=0.6, label="S_min")
    ax_e.loglog(dense, fit["e_min"] + fit["s_min"] * dense, color="tab:red", lw=1.5,
                label=f"fit E_min (1 + B/B_crit): E_min={fit['e_min']:,.0f}")
    ax_e.axhline(fit["e_min"], color="tab:red", ls="-.", lw=0.8, alpha=0.6, label="E_min")
    e_dense = np.geomspace(fit["e_min"] * 1.01, max(e.max(), fit["e_min"]) * 3, 300)
    ax_f.loglog(e_dense, fit["s_min"] / (1 - fit["e_min"] / e_dense), color="tab:red", lw=1.5,
                label="fit (S/S_min - 1)(E/E_min - 1) = 1")
    ax_f.axhline(fit["s_min"], color="tab:red", ls="-.", lw=0.8, alpha=0.6, label="S_min")
    ax_f.axvline(fit["e_min"], color="tab:red", ls="--", lw=0.8, alpha=0.6, label="E_min")
  for ax in (ax_s, ax_e):
    _b_lines(ax, results)
    _batch_ticks(ax, [r["batch_size"] for r in sweep])
  colors = _colors([int(x) for x in b]) if len(b) else {}
  for bi, si, ei in zip(b, s, e):
    ax_f.loglog(ei, si, "o", color=colors[int(bi)], ms=8)
    ax_f.annotate(f"B={bi:g}", (ei, si), textcoords="offset points", xytext=(6, 4), fontsize=8)
  ax_s.set(xlabel="batch size B (sequences per step)", ylabel="steps to target S",
           title="Steps to target vs batch size")
  ax_e.set(xlabel="batch size B (sequences per step)", ylabel="examples to target E = B S (sequences)",
           title="Examples to target vs batch size")
  ax_f.set(xlabel="examples to target E (sequences)", ylabel="steps to target S",
           title="Steps-examples trade-off")
  for ax in (ax_s, ax_e, ax_f):
    ax.grid(alpha=0.3, which="both")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7.5)
  _suptitle(fig, results)
  save_figure(fig, path)


def plot_gradient_variance(results, path):
  """E|g_B - G|^2 vs B from fresh mini-batches, its fit and tr(Sigma)/B; measured / theory on the right."""
  gv = results["gradient_variance"]
  fresh, rs = gv["fresh"], gv["resampled"]
  b = np.asarray(fresh["batch_sizes"], np.float64)
  var, se, pred = (_floats(fresh[k]) for k in ("variance", "stderr", "predicted"))
  b_rs = np.asarray(rs["batch_sizes"], np.float64)
  without, exp_without = (_floats(rs[k]) for k in ("variance_without_replacement",
                                                   "expected_without_replacement"))
  fig, (ax, ax_r) = plt.subplots(1, 2, figsize=(13, 5))
  ax.errorbar(b, var, yerr=2 * se, fmt="o", color="tab:blue", ms=7, capsize=3, zorder=5,
              label=f"measured: {fresh['num_batches']} fresh mini-batches per B (+- 2 s.e.)")
  ax.loglog(b, np.exp(gv["intercept"]) * b ** gv["slope"], color="tab:blue", lw=1.2,
            label=f"least-squares fit: slope {gv['slope']:.3f}")
  ax.loglog(b, pred, color="black", ls="--", lw=1.2,
            label=f"tr(Sigma) / B, slope -1 (tr from {gv['num_examples']} per-example gradients)")
  ax.loglog(b_rs, without, "s", color="tab:orange", ms=6, mfc="none",
            label=f"re-drawn without replacement from the N = {gv['num_examples']}")
  ax.loglog(b_rs, exp_without, color="tab:orange", ls=":", lw=1.5,
            label="tr(Sigma_pop)/B (N-B)/(N-1) (finite population)")
  ax.set(xlabel="mini-batch size B (sequences)", ylabel="E|g_B - G|^2 (squared gradient norm)",
         title="Mini-batch gradient variance vs B")
  ax_r.errorbar(b, var / pred, yerr=2 * se / pred, fmt="o-", color="tab:blue", capsize=3,
                label="fresh mini-batches / (tr(Sigma) / B)")
  ax_r.semilogx(b_rs, without / exp_without, "s-", color="tab:orange", mfc="none",
                label="re-drawn without replacement / finite-population law")
  ax_r.set_xscale("log")
  ax_r.axhline(1.0, color="black", ls="--", lw=1)
  ax_r.set(xlabel="mini-batch size B (sequences)", ylabel="measured / theory",
           title="Ratio to theory (error bars +- 2 s.e.)")
  for a in (ax, ax_r):
    _batch_ticks(a, sorted(set(b.tolist()) | set(b_rs.tolist())))
    a.grid(alpha=0.3, which="both")
    a.legend(fontsize=7.5)
  _suptitle(fig, results, f"\n{gv['num_params']:,} parameters, at the checkpoint: {_checkpoint(gv)}")
  save_figure(fig, path)


def _binned_noise(noise, by="step", num_bins=12):
  """B_simple in bins of training step (geometric) or validation loss (uniform): sums of the
  per-window estimates in each bin, ratio last. Returns (bin position, B_simple), positive bins only."""
  steps = np.asarray(noise["step"], np.float64)
  if steps.size == 0:
    return np.array([]), np.array([])
  weight = _floats(noise["weight"])
  if by == "step":
    x = steps
    edges = np.geomspace(0.5, steps.max() + 0.5, num_bins + 1)
  else:
    x = _floats(noise["val_nll"])
    edges = np.linspace(x.min(), x.max() + 1e-9, num_bins + 1)
  idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, num_bins - 1)
  g_sq_sum, trace_sum = _floats(noise["g_sq_sum"]), _floats(noise["trace_sum"])
  out_x, out_b = [], []
  for i in range(num_bins):
    keep = idx == i
    g_sq, trace = g_sq_sum[keep].sum(), trace_sum[keep].sum()
    if keep.any() and g_sq > 0 and trace > 0:
      out_x.append(np.sum(x[keep] * weight[keep]) / weight[keep].sum())
      out_b.append(trace / g_sq)
  return np.array(out_x), np.array(out_b)


def plot_noise_scale(results, path):
  """B_simple over training (vs step and vs validation loss) for each B's best run."""
  best = _best_runs(results)
  colors = _colors(sorted(best))
  fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(14, 5.3))
  for b in sorted(best):
    steps, b_step = _binned_noise(best[b]["noise"], "step")
    ax_t.loglog(steps, b_step, "o-", color=colors[b], ms=4, lw=1.2, label=f"B={b}")
    loss, b_loss = _binned_noise(best[b]["noise"], "val_nll", num_bins=15)
    ax_l.semilogy(loss, b_loss, "o-", color=colors[b], ms=4, lw=1.2, label=f"B={b}")
  fit, gv, ns = results["fit"], results["gradient_variance"], results["noise_scale"]
  for ax in (ax_t, ax_l):
    if fit:
      ax.axhline(fit["b_crit"], color="tab:red", ls="--", lw=1.2,
                 label=f"B_crit (fit) = {fit['b_crit']:.1f}")
    if ns["b_simple"]:
      ax.axhline(ns["b_simple"], color="tab:purple", ls=":", lw=1.8,
                 label=f"B_simple, all steps (median over B) = {ns['b_simple']:.1f}")
    if gv and gv.get("b_simple"):
      ax.axhline(gv["b_simple"], color="black", ls="-.", lw=1,
                 label=f"per-example B_simple at the checkpoint = {gv['b_simple']:.1f}")
    ax.grid(alpha=0.3, which="both")
  ax_l.axvline(results["target"]["loss"], color="gray", ls="--", lw=1, label="target loss")
  ax_l.invert_xaxis()
  ax_t.set(xlabel="training step", ylabel="B_simple = tr(Sigma) / |G|^2 (sequences)",
           title="Simple noise scale over training (geometric step bins)")
  ax_l.set(xlabel="validation loss (nats / token, decreasing to the right)",
           ylabel="B_simple = tr(Sigma) / |G|^2 (sequences)",
           title="Simple noise scale vs validation loss (loss bins)")
  for ax in (ax_t, ax_l):  # Head room above the data for the legend.
    low, high = ax.get_ylim()
    ax.set_ylim(low, high * (high / low) ** 0.6)
    ax.legend(fontsize=7.5, ncol=2, loc="upper left")
  _suptitle(fig, results, "\ntwo-batch estimator every step (B_small = B/M, B_big = B) of each B's "
            "best run; numerator and denominator summed per bin, ratio last; bins with a "
            "non-positive sum are not drawn")
  save_figure(fig, path)


def plot_sharpness(results, path):
  """Top Hessian eigenvalue, epsilon-sharpness and generalization gap of each B's solution."""
  sweep = results["sweep"]
  b = [r["batch_size"] for r in sweep]
  cfg = results["config"]["sharpness"]
  fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
  axes[0].semilogx(b, _floats([r["hessian_top_eigenvalue"] for r in sweep]), "o-",
                   color="tab:blue")
  axes[0].set(ylabel="top Hessian eigenvalue (nats / unit parameter^2)",
              title=f"Sharpness: lambda_max ({cfg['lanczos_steps']}-step Lanczos)")
  axes[1].semilogx(b, _floats([r["epsilon_sharpness"] for r in sweep]), "o-", color="tab:green")
  axes[1].set(ylabel="epsilon-sharpness 100 (max L(w+d) - L) / (1 + L) (%)",
              title=f"Keskar epsilon-sharpness, eps = {cfg['epsilon']:g}")
  gap = _floats([r["generalization_gap"] for r in sweep])
  axes[2].semilogx(b, gap, "o-", color="tab:purple", label="val - train NLL")
  floors = results.get("floor")
  if floors:
    offset = floors["val"] - floors["train"]
    axes[2].semilogx(b, gap - offset, "s--", color="tab:gray",
                     mfc="none", label=f"net of the true model's val - train ({offset:+.4f})")
  axes[2].axhline(0, color="black", lw=0.8)
  axes[2].set(ylabel="generalization gap (nats / token)", title="Generalization gap")
  axes[2].legend(fontsize=8)
  for ax in axes:
    ax.set_xlabel("batch size B (sequences per step)")
    ax.set_xticks(b)
    ax.set_xticklabels([str(x) for x in b])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
  _suptitle(fig, results, f"\nmeasured at each B's best run when it stopped (at the target loss), "
            f"on a fixed batch of {cfg['batch']} training windows (sharpness) and "
            f"{results['evaluation']['tokens_scored']:,} training / validation tokens (gap)")
  save_figure(fig, path)


def plot_learning_rate(results, path):
  """Best learning rate vs B, every learning rate tried, and the linear and sqrt rules."""
  cfg = results["config"]
  runs = results["runs"]
  fig, ax = plt.subplots(figsize=(7.5, 5.2))
  styles = {"reached": ("o", "tab:gray"), "step cap": ("x", "tab:orange"),
            "diverged": ("v", "tab:red")}
  for status, (marker, color) in styles.items():
    pts = [(r["batch_size"], r["learning_rate"]) for r in runs if r["status"] == status]
    if pts:
      label = {"reached": "tried: reached target", "step cap": "tried: stopped (slower or capped)",
               "diverged": "tried: diverged"}[status]
      ax.loglog(*zip(*pts), marker, color=color, ms=6, mfc="none", ls="none", label=label)
  sweep = results["sweep"]
  ax.loglog([r["batch_size"] for r in sweep], [r["best_learning_rate"] for r in sweep], "o-",
            color="tab:blue", ms=8, label="best (fewest steps to target)")
  b = np.geomspace(min(r["batch_size"] for r in sweep), max(r["batch_size"] for r in sweep), 50)
  ref_b, ref_lr = cfg["lr_reference_batch"], cfg["learning_rate"]
  ax.loglog(b, ref_lr * b / ref_b, color="black", ls="--", lw=1, label="linear rule lr ~ B")
  ax.loglog(b, ref_lr * np.sqrt(b / ref_b), color="black", ls=":", lw=1.3, label="sqrt rule lr ~ B^1/2")
  _batch_ticks(ax, [r["batch_size"] for r in sweep])
  ax.set(xlabel="batch size B (sequences per step)", ylabel="Adam learning rate",
         title=f"Learning rate per batch size ({results['config']['lr_rule']})")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  _suptitle(fig, results, width=90)
  save_figure(fig, path)


def plot_loss_curves(results, path):
  """Validation loss of each B's best run vs steps and vs examples, with the target."""
  best = _best_runs(results)
  colors = _colors(sorted(best))
  fig, (ax_s, ax_e) = plt.subplots(1, 2, figsize=(14, 5))
  pilot = results["target"].get("pilot")
  for b in sorted(best):
    steps = np.asarray(best[b]["curve"]["step"], np.float64)
    val = _floats(best[b]["curve"]["val_nll"])
    ax_s.semilogx(steps[1:], val[1:], color=colors[b], lw=1.3, label=f"B={b}")
    ax_e.semilogx(steps[1:] * b, val[1:], color=colors[b], lw=1.3, label=f"B={b}")
  if pilot:
    steps = np.asarray(pilot["curve"]["step"][1:], np.float64)
    ax_s.semilogx(steps, _floats(pilot["curve"]["val_nll"][1:]), color="gray", lw=0.8, alpha=0.7,
                  label=f"pilot (B={pilot['batch_size']})")
  floors = results.get("floor")
  for ax in (ax_s, ax_e):
    ax.axhline(results["target"]["loss"], color="black", ls="--", lw=1, label="target")
    if floors:
      ax.axhline(floors["val"], color="black", ls=":", lw=1, label="true-model floor (val)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7.5, ncol=2)
    ax.set_ylabel("validation NLL (nats / token)")
  ax_s.set(xlabel="training step", title="Validation loss of each B's best run")
  ax_e.set(xlabel="training examples B x step (sequences)", title="... against examples seen")
  _suptitle(fig, results)
  save_figure(fig, path)


def _checkpoint(gv) -> str:
  c = gv["checkpoint"]
  return (f"best run at B={c['batch_size']}, lr {c['best_learning_rate']:.2e}, step "
          f"{c['stopped_at_step']}, validation loss {c['final_val_nll']:.4f}")


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
                 f"{r['steps_to_target']:.1f}" if r["reached"] else f"> {r['stopped_at_step']}",
                 fmt(r["examples_to_target"], ",.0f"),
                 f"{prev['steps_to_target'] / r['steps_to_target']:.2f}x"
                 if prev and prev["reached"] and r["reached"] else "-",
                 fmt(r["final_train_nll"], ".4f"), fmt(r["final_val_nll"], ".4f"), fmt(gap, "+.4f"),
                 fmt(r["hessian_top_eigenvalue"], ".3g"), fmt(r["epsilon_sharpness"], ".3g"),
                 fmt(r["b_simple"], ".1f"), fmt(r["b_simple_late"], ".1f")])
    if floors:  # The gap the true model has on the same tokens, taken off.
      rows[-1].insert(9, fmt(None if gap is None else gap - (floors["val"] - floors["train"]), "+.4f"))
  if floors:
    header.insert(9, "gap net of floors")
  lines = markdown_table(header, rows, "r" * len(header)) + [""]
  unreached = [r["batch_size"] for r in sweep if not r["reached"]]
  if unreached:
    lines += [f"Not reached within the step cap: B = {unreached} (left out of the fit).", ""]
  return lines


def _fit_and_regimes(results) -> list[str]:
  fit, ns, reg = results["fit"], results["noise_scale"], results["regimes"]
  lines = []
  if fit:
    lines += [
        f"**Fit** (McCandlish et al. 2018, S = S_min (1 + B_crit/B), E = E_min (1 + B/B_crit), "
        "least squares on log S): "
        f"S_min = {fit['s_min']:.1f} steps, E_min = {fit['e_min']:,.0f} sequences, "
        f"**B_crit = {fit['b_crit']:.1f}** sequences (rms log residual {fit['rms_log_residual']:.3f}).",
        "", f"**B_simple** measured during training (two-batch estimator every step, B_small = B / "
        f"{results['config']['noise_microbatches']} micro-batches, B_big = B; |G|^2 and tr(Sigma) "
        f"averaged over the steps of each B's best run, ratio last; median over B): "
        f"**{fmt(ns['b_simple'], '.1f')}**; B_crit / B_simple = "
        f"{fmt(ns['b_simple'] and fit['b_crit'] / ns['b_simple'], '.2f')}. Over the second half of "
        f"the steps only (near the target): {fmt(ns['b_simple_late'], '.1f')}.", ""]
  if reg:
    sm, lg = reg["small"], reg["large"]
    words = (f"**Regimes.** Small B: doubling B from {sm['from']} to {sm['to']} cuts the steps to "
             f"target {sm['speedup']:.2f}x (perfect scaling: 2x) while the examples to target change "
             f"{sm['examples_ratio']:.2f}x (perfect scaling: 1x). Large B: doubling from {lg['from']} "
             f"to {lg['to']} cuts the steps {lg['speedup']:.2f}x and multiplies the examples "
             f"{lg['examples_ratio']:.2f}x (diminishing returns: 1x and 2x).")
    if fit:
      words += (f" By the fit, B = {sm['from']} needs {100 * reg['excess_examples_small']:.0f}% more "
                f"examples than E_min and B = {lg['to']} needs {100 * reg['excess_examples_large']:.0f}% "
                f"more (E / E_min - 1 = B / B_crit); steps approach S_min = {fit['s_min']:.0f}.")
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
      f"**Gradient variance vs B** at a fixed checkpoint ({_checkpoint(gv)}): fitted log-log slope "
      f"**{gv['slope']:.3f}** (theory -1, |slope + 1| = {abs(gv['slope'] + 1):.3f}). For each B, "
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
  """results.md: the protocol, the sweep table, the fit and regimes, the gradient variance law."""
  lines = (_protocol(results) + _sweep_table(results) + _fit_and_regimes(results) + _variance(results)
           + [f"{results['runs_total']} training runs, {results['examples_total']:,} training "
              f"sequences in all; {results['wall_time_s']:.0f} s wall."])
  return "\n".join(lines) + "\n"


FIGURES = {"tradeoff.png": plot_tradeoff, "gradient_variance.png": plot_gradient_variance,
           "noise_scale.png": plot_noise_scale, "sharpness.png": plot_sharpness,
           "learning_rate.png": plot_learning_rate, "loss_curves.png": plot_loss_curves}


def plot_all(results: dict, workdir: str) -> list[str]:
  """Draws every figure into `workdir`; returns their file names."""
  written = []
  for name, plot in FIGURES.items():
    if name == "gradient_variance.png" and not results.get("gradient_variance"):
      continue
    plot(results, os.path.join(workdir, name))
    written.append(name)
  return written


def main(argv=None):
  redraw_main(__doc__, "batch_size", plot_all, argv)


if __name__ == "__main__":
  main()
