"""Figures of the batch-size study (`llm_math.studies.batch_size`) from its results.json.

Draws tradeoff.png (steps and examples to target vs B, the S-E frontier, the study's notes on the
fit), gradient_variance.png, noise_scale.png (B_simple over training), sharpness.png (sharpness and
generalization gap vs B), learning_rate.png (best learning rate vs B) and loss_curves.png (validation
loss of each B's best run). Each draws whatever the results hold: a missing, degenerate or
unbounded fit leaves its curves out, not the figure.
"""

import math
import textwrap

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from llm_math.figures import draw_each  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.figures import error_bars  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.figures import save_figure  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.figures import seeds_note  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.reports import pm  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.reports.batch_size import checkpoint_caption  # pylint: disable=g-import-not-at-top,wrong-import-position


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


def _positive(value) -> float | None:
  """`value` when it is a finite number > 0 (what a log axis can show), else None."""
  return value if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else None


def _on_plot(value: float, measured: np.ndarray) -> bool:
  """Whether a fitted S_min or E_min gets its reference line on a log axis of the `measured` values:
  > 0 and at least 1% of the smallest (a fit at its bound 0 would stretch the axis by decades)."""
  return value > 0 and (not len(measured) or value >= 0.01 * measured.min())


def _notes(results, width=200) -> str:
  """The study's notes on its fits (results["notes"]) as lines under a title, or ''."""
  notes = results.get("notes") or []
  return "".join("\n" + textwrap.fill(f"note: {n}", width) for n in notes)


def _batch_ticks(ax, batch_sizes):
  """Ticks at the batch sizes themselves (powers of two), labelled as plain integers."""
  ax.set_xticks([float(b) for b in batch_sizes])
  ax.set_xticklabels([f"{b:g}" for b in batch_sizes])
  ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def _b_crit(results) -> float | None:
  """The fit's B_crit where its reference line goes: within B/2 .. 2B of the measured batch sizes
  (where the fit's curves are drawn), else None (a fit at a bound puts it decades away)."""
  b_crit = _positive((results["fit"] or {}).get("b_crit"))
  sizes = [r["batch_size"] for r in results["sweep"]]
  return b_crit if b_crit and min(sizes) / 2 <= b_crit <= 2 * max(sizes) else None


def _b_lines(ax, results, label=True):
  """Vertical reference lines at the fitted B_crit (`_b_crit`) and the measured B_simple."""
  b_crit, b_simple = _b_crit(results), results["noise_scale"]["b_simple"]
  fit = results["fit"] or {}
  if b_crit:
    ax.axvline(b_crit, color="tab:red", ls="--", lw=1.2,
               label=f"B_crit (fit) = {pm(fit, 'b_crit', '.1f')}" if label else None)
    ci = (fit.get("ci95") or {}).get("b_crit")
    if ci and all(_positive(v) for v in ci):
      ax.axvspan(*ci, color="tab:red", alpha=0.08, lw=0,
                 label="B_crit 95% bootstrap interval" if label else None)
  if b_simple:
    ax.axvline(b_simple, color="tab:purple", ls=":", lw=1.5,
               label=f"B_simple (measured in training) = {pm(results['noise_scale'], 'b_simple', '.1f')}"
               if label else None)


def plot_tradeoff(results, path):
  """Steps vs B (perfect scaling line, fit), examples vs B, and the steps-examples frontier; the
  fit's curves only where its S_min and E_min are finite and >= 0, the frontier and the S_min and
  E_min lines only where they fall on the plot (`_on_plot`)."""
  sweep, fit = results["sweep"], results["fit"] or {}
  reached = [r for r in sweep if r["reached"] and _positive(r["steps_to_target"])]
  b = np.array([r["batch_size"] for r in reached], np.float64)
  s = np.array([r["steps_to_target"] for r in reached])
  e = b * s
  dense = np.geomspace(min(r["batch_size"] for r in sweep) / 2, max(r["batch_size"] for r in sweep) * 2,
                       200)
  fig, (ax_s, ax_e, ax_f) = plt.subplots(1, 3, figsize=(17, 5))
  s_err = error_bars(reached, "steps_to_target")
  measured = "measured (best lr per B)" + seeds_note(results)
  ax_s.errorbar(b, s, yerr=s_err, fmt="o", color="tab:blue", ms=7, capsize=3, label=measured,
                zorder=5)
  ax_e.errorbar(b, e, yerr=None if s_err is None else s_err * b, fmt="o", color="tab:blue", ms=7,
                capsize=3, label=measured, zorder=5)
  ax_s.set(xscale="log", yscale="log")
  ax_e.set(xscale="log", yscale="log")
  if len(b):
    ax_s.loglog(dense, s[0] * b[0] / dense, color="gray", ls=":", lw=1.3,
                label=f"perfect scaling S ~ 1/B (through B={b[0]:g})")
    ax_e.axhline(e[0], color="gray", ls=":", lw=1.3, label=f"perfect scaling E = const (B={b[0]:g})")
  for r in sweep:
    if not r["reached"]:
      for ax, y in ((ax_s, r["stopped_at_step"]), (ax_e, r["stopped_at_step"] * r["batch_size"])):
        ax.plot([r["batch_size"]], [y], marker="^", color="tab:red", ls="none", ms=8,
                label="not reached (run stopped here)")
  s_min, e_min = fit.get("s_min"), fit.get("e_min")
  if all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in (s_min, e_min)):
    ax_s.loglog(dense, s_min + e_min / dense, color="tab:red", lw=1.5,
                label=f"fit S_min (1 + B_crit/B): S_min = {pm(fit, 's_min', '.0f')}")
    ax_e.loglog(dense, e_min + s_min * dense, color="tab:red", lw=1.5,
                label=f"fit E_min (1 + B/B_crit): E_min = {pm(fit, 'e_min', ',.0f')}")
    # The frontier S = S_min / (1 - E_min / E) from just above E_min (from below the measured E
    # when E_min is off the plot) to past the largest measured E.
    low = e_min * 1.01 if _on_plot(e_min, e) else (e.min() if len(e) else 1.0) / 3
    e_dense = np.geomspace(low, max(e.max() if len(e) else low, e_min) * 3, 300)
    if _on_plot(s_min, s):
      ax_f.loglog(e_dense, s_min / (1 - e_min / e_dense), color="tab:red", lw=1.5,
                  label="fit (S/S_min - 1)(E/E_min - 1) = 1")
    if _on_plot(s_min, s):
      ax_s.axhline(s_min, color="tab:red", ls="-.", lw=0.8, alpha=0.6, label="S_min")
    if _on_plot(e_min, e):
      ax_e.axhline(e_min, color="tab:red", ls="-.", lw=0.8, alpha=0.6, label="E_min")
    if _on_plot(s_min, s):
      ax_f.axhline(s_min, color="tab:red", ls="-.", lw=0.8, alpha=0.6, label="S_min")
    if _on_plot(e_min, e):
      ax_f.axvline(e_min, color="tab:red", ls="--", lw=0.8, alpha=0.6, label="E_min")
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
    if unique:
      ax.legend(unique.values(), unique.keys(), fontsize=7.5)
  _suptitle(fig, results, _notes(results))
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
            label=f"least-squares fit: slope {pm(gv, 'slope', '.3f')} (95% interval)")
  slope_ci = (gv.get("ci95") or {}).get("slope")
  if slope_ci:  # Lines of the interval's slopes through the fit at the geometric-mean B.
    pivot = float(np.exp(np.mean(np.log(b))))
    at_pivot = np.exp(gv["intercept"]) * pivot ** gv["slope"]
    lines_2xB = np.array([at_pivot * (b / pivot) ** k for k in slope_ci])
    ax.fill_between(b, lines_2xB.min(0), lines_2xB.max(0), color="tab:blue", alpha=0.15, lw=0,
                    label="slopes of its 95% interval, through the fit at the geometric-mean B")
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
  _suptitle(fig, results, f"\n{gv['num_params']:,} parameters, at the checkpoint: {checkpoint_caption(gv)}")
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
  gv, ns = results["gradient_variance"], results["noise_scale"]
  b_crit = _b_crit(results)
  for ax in (ax_t, ax_l):
    if b_crit:
      ax.axhline(b_crit, color="tab:red", ls="--", lw=1.2, label=f"B_crit (fit) = {b_crit:.1f}")
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


FIGURES = {"tradeoff.png": plot_tradeoff, "gradient_variance.png": plot_gradient_variance,
           "noise_scale.png": plot_noise_scale, "sharpness.png": plot_sharpness,
           "learning_rate.png": plot_learning_rate, "loss_curves.png": plot_loss_curves}


def draw(results: dict, workdir) -> list[str]:
  """Draws every figure into `workdir` (gradient_variance.png only when the results hold the
  measurement); returns their file names."""
  figures = {name: plot for name, plot in FIGURES.items()
             if name != "gradient_variance.png" or results.get("gradient_variance")}
  return draw_each(figures, results, workdir)
