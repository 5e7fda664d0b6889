"""Figures of the compression study (`llm_math.studies.compression`) from its results.json, one per
study present in the results:

svd.png      perplexity vs the fraction of singular values kept and vs the factored parameter count,
             with the float model and the references; the singular value spectra.
quant.png    perplexity change, bits/param and the two against each other, per quantization scheme.
lora.png     target perplexity vs trainable parameters (LoRA ranks, full fine-tuning, no
             fine-tuning, scratch) and the target validation curves.
distill.png  student validation loss over steps per temperature vs from scratch (mean and range
             over seeds), the excess over the floor, and the paired final difference vs T.
"""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import ticker  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from llm_math.figures import draw_each  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.figures import save_figure  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.reports import fields  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.reports import measurement_caption  # pylint: disable=g-import-not-at-top,wrong-import-position

_REFERENCE_STYLES = {"floor": ("black", "-", "floor (true model)"),
                     "unigram": ("tab:orange", "--", "unigram (add-one)"),
                     "uniform": ("tab:gray", ":", "uniform")}
_FLOAT_STYLE = dict(color="tab:blue", ls="--", lw=1.3)


def _plain_log_axis(axis, minor_digits=(2, 3, 5)):
  """Plain numbers on a log axis; over more than a decade minor ticks are labelled only at
  these leading digits (so that the labels do not collide)."""
  def minor(v, _):
    lo, hi = sorted(axis.get_view_interval())
    if v <= 0:
      return ""
    if lo > 0 and hi / lo < 10:
      return f"{v:g}"
    lead = round(v / 10**math.floor(math.log10(v) + 1e-9), 6)
    return f"{v:g}" if lead in minor_digits else ""
  axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  axis.set_minor_formatter(ticker.FuncFormatter(minor))


def _num(value) -> float:
  """NaN for None: results.json stores a non-finite value (an infinite perplexity) as null."""
  return math.nan if value is None else value


def _references(ax, refs: dict, ppl: bool = True, names=("floor", "unigram")):
  for name in names:
    if name in refs:
      color, ls, label = _REFERENCE_STYLES[name]
      value = float(np.exp(refs[name])) if ppl else refs[name]  # np.exp: inf, never an OverflowError
      ax.axhline(value, color=color, ls=ls, lw=1.1,
                 label=f"{label}: {'ppl ' if ppl else ''}{value:.3f}{'' if ppl else ' nats'}")


def _title(fig, results: dict, evaluation: dict | None = None):
  ev = evaluation or results["evaluation"]
  fig.suptitle(f"{ev['data']}\n{measurement_caption(ev)}", fontsize=9.5)


def plot_svd(results: dict, path: str):
  svd, base = results["svd"], results["base"]
  fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
  for ax, key, xlabel in (
      (axes[0], "singular_values_kept",
       "fraction of singular values kept, sum r / sum min(in, out) (log scale)"),
      (axes[1], "factored_fraction",
       "parameters stored as factors r (in + out) / dense in x out (log scale)")):
    for method, marker in (("uniform", "o"), ("global energy", "s")):
      recs = sorted((r for r in svd["records"] if r["method"] == method),
                    key=lambda r: r["singular_values_kept"])
      if not recs:
        continue
      x = [r["params_factored"] / r["params_dense"] if key == "factored_fraction" else r[key]
           for r in recs]
      label = ("same rank fraction in every matrix" if method == "uniform"
               else "global energy budget (ranks chosen over all matrices)")
      ax.plot(x, [r["val_ppl"] for r in recs], marker=marker, ms=5, label=label)
    ax.axhline(base["val_ppl"], label=f"float32 model: ppl {base['val_ppl']:.3f}", **_FLOAT_STYLE)
    ax.axhline(base["val_ppl"] * 1.01, color="tab:blue", ls=":", lw=1,
               label="float + 1% perplexity")
    _references(ax, results["references"])
    if key == "factored_fraction":
      ax.axvline(1.0, color="tab:red", ls=":", lw=1.1, label="factors cost as much as dense")
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="validation perplexity (log scale)")
    _plain_log_axis(ax.xaxis)
    _plain_log_axis(ax.yaxis)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7.5, loc="lower left")
  axes[0].set_title("Perplexity vs rank (SVD truncation of every kernel)")
  axes[1].set_title("Perplexity vs the parameters the factors would take")
  ax = axes[2]
  for p, s in fields(svd["spectra"]).items():
    s = np.asarray(s)
    shape = svd["matrix_shapes"][p]
    ax.plot(np.arange(1, len(s) + 1) / len(s), s / s[0], lw=1.2,
            label=f"{p.removesuffix('/kernel')} [{shape[0]}x{shape[1]}]")
  ax.set(yscale="log", xlabel="i / min(in, out)", ylabel="s_i / s_1 (log scale)",
         title="Singular value spectra of the kernels")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7, ncol=2)
  _title(fig, results)
  save_figure(fig, path, dpi=120)


def plot_quant(results: dict, path: str):
  q, base = results["quant"], results["base"]
  recs = q["records"]
  names = [r["scheme"] for r in recs]
  colors = ["tab:blue" if r["bits"] == 32 else "tab:green" if r["bits"] == 8
            else "tab:red" if r["bits"] == 4 else "tab:purple" for r in recs]
  fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
  ax = axes[0]
  change = [_num(r["ppl_change_pct"]) for r in recs]
  bars = ax.bar(names, change, color=colors)
  for bar, r, pct in zip(bars, recs, change):
    ax.annotate(f"ppl {_num(r['val_ppl']):.3f}", (bar.get_x() + bar.get_width() / 2,
                                                  bar.get_height()),
                ha="center", va="bottom" if pct >= 0 else "top", fontsize=7.5)
  ax.axhline(1.0, color="black", ls=":", lw=1.1, label="+1% perplexity")
  ax.axhline(0.0, color="black", lw=0.8)
  ax.set_yscale("symlog", linthresh=0.1)
  _plain_log_axis(ax.yaxis)
  ax.set(ylabel="perplexity change vs float32 (%, symlog scale)",
         title=f"Perplexity cost (float32 ppl {base['val_ppl']:.3f})")
  ax.legend(fontsize=8)
  ax = axes[1]
  bars = ax.bar(names, [r["bits_per_param"] for r in recs], color=colors)
  for bar, r in zip(bars, recs):
    ax.annotate(f"{r['bits_per_param']:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center", va="bottom", fontsize=8)
  ax.set(yscale="log", ylabel="bits per quantized parameter, codes + scales (log scale)",
         title=f"Storage ({q['params_quantized']:,} parameters in '{q['pattern']}', "
               f"{q['scale_dtype']} scales)")
  _plain_log_axis(ax.yaxis)
  for a in axes[:2]:
    a.tick_params(axis="x", rotation=35, labelsize=8)
    for label in a.get_xticklabels():
      label.set_ha("right")
    a.grid(alpha=0.3, axis="y", which="both")
  ax = axes[2]
  for r, c in zip(recs, colors):
    ax.scatter(r["bits_per_param"], _num(r["val_ppl"]), color=c, s=30, zorder=3)
  ax.axhline(base["val_ppl"], label=f"float32: ppl {base['val_ppl']:.3f}", **_FLOAT_STYLE)
  ax.axhline(base["val_ppl"] * 1.01, color="tab:blue", ls=":", lw=1, label="float + 1%")
  _references(ax, results["references"], names=("floor",))
  lo = min([r["val_ppl"] for r in recs if r["val_ppl"] is not None]
           + [float(np.exp(v)) for k, v in results["references"].items() if k == "floor"])
  hi = max([r["val_ppl"] for r in recs if r["val_ppl"] is not None] + [base["val_ppl"] * 1.01])
  log_y = hi / lo > 3  # A log axis only where perplexity spans a wide range.
  ax.set(xscale="log", yscale="log" if log_y else "linear",
         xlabel="bits per quantized parameter (log scale)",
         ylabel="validation perplexity" + (" (log scale)" if log_y else ""),
         title="Perplexity vs storage")
  ax.xaxis.set_major_locator(ticker.FixedLocator([4, 8, 16, 32]))
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  if log_y:
    _plain_log_axis(ax.yaxis)
  else:
    ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.35 * (hi - lo))
  # Schemes of one bit width sit close together: their labels go in a column above the group
  # (the leftmost point's highest, so that the leader lines do not cross the labels).
  for bits in sorted({r["bits"] for r in recs}):
    group = sorted((r for r in recs if r["bits"] == bits), key=lambda r: r["bits_per_param"])
    color = colors[recs.index(group[0])]
    for k, r in enumerate(group):
      ax.annotate(r["scheme"], (r["bits_per_param"], _num(r["val_ppl"])),
                  textcoords="offset points", xytext=(8, 14 + 11 * (len(group) - 1 - k)),
                  fontsize=7.5, color=color,
                  arrowprops=dict(arrowstyle="-", color=color, lw=0.5, alpha=0.7,
                                  shrinkA=0, shrinkB=3))
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  _title(fig, results)
  save_figure(fig, path, dpi=120)


def plot_lora(results: dict, path: str):
  lo = results["lora"]
  runs = lo["runs"]
  by_kind = {r["kind"]: r for r in runs if r["kind"] != "lora"}
  loras = sorted((r for r in runs if r["kind"] == "lora"), key=lambda r: r["trainable_params"])
  fig, axes = plt.subplots(1, 2, figsize=(15, 5.4))
  ax = axes[0]
  if loras:
    ax.plot([r["trainable_params"] for r in loras], [r["val_ppl"] for r in loras], marker="o",
            color="tab:green", label=f"LoRA on '{lo['targets']}', alpha={lo['alpha']:g}")
    for r in loras:
      ax.annotate(f"r={r['rank']}", (r["trainable_params"], r["val_ppl"]),
                  textcoords="offset points", xytext=(4, 5), fontsize=8)
  full = by_kind["full"]
  ax.scatter([full["trainable_params"]], [full["val_ppl"]], marker="*", s=120, color="tab:blue",
             zorder=3)
  ax.axhline(full["val_ppl"], color="tab:blue", ls="--", lw=1.2,
             label=f"full fine-tuning ({full['trainable_params']:,} params): ppl "
                   f"{full['val_ppl']:.3f}")
  ax.axhline(by_kind["none"]["val_ppl"], color="tab:red", ls="-.", lw=1.2,
             label=f"no fine-tuning: ppl {by_kind['none']['val_ppl']:.3f}")
  if "scratch" in by_kind:
    ax.axhline(by_kind["scratch"]["val_ppl"], color="tab:purple", ls=":", lw=1.2,
               label=f"scratch on target, same steps: ppl {by_kind['scratch']['val_ppl']:.3f}")
  _references(ax, lo["references"], names=("floor",))
  ax.set(xscale="log", yscale="log", xlabel="trainable parameters (log scale)",
         ylabel="target validation perplexity (log scale)",
         title=f"Transfer after {lo['num_steps']} steps: quality vs trainable parameters")
  _plain_log_axis(ax.yaxis)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7.5)
  ax = axes[1]
  cmap = plt.get_cmap("viridis")
  for i, r in enumerate(loras):
    steps, nll = zip(*r["curve"])
    ax.plot(steps, nll, color=cmap(i / max(1, len(loras))), lw=1.2,
            label=f"{r['name']} ({r['trainable_params']:,} params)")
  styles = {"full": ("tab:blue", "--"), "scratch": ("tab:purple", ":")}
  for kind, (color, ls) in styles.items():
    if kind in by_kind:
      steps, nll = zip(*by_kind[kind]["curve"])
      ax.plot(steps, nll, color=color, ls=ls, lw=1.6, label=by_kind[kind]["name"])
  ax.axhline(by_kind["none"]["val_nll"], color="tab:red", ls="-.", lw=1.1, label="no fine-tuning")
  _references(ax, lo["references"], ppl=False, names=("floor",))
  ax.set(xlabel="fine-tuning step", ylabel="target validation NLL (nats / token)",
         title="Target validation loss during fine-tuning")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7.5)
  ev = lo["evaluation"]
  changes = lo.get("target_changes")
  fig.suptitle(f"pretrained on {results['evaluation']['data']} -> fine-tuned on {ev['data']}"
               + (" (" + ", ".join(f"{k} {a:g} -> {b:g}" for k, (a, b) in changes.items()) + ")"
                  if changes else "") + f"\n{measurement_caption(ev)}", fontsize=9.5)
  save_figure(fig, path, dpi=120)


def plot_distill(results: dict, path: str):
  d = results["distill"]
  refs = results["references"]
  floor = refs.get("floor")
  summary = d["summary"]
  scratch_name = next(k for k, v in summary.items() if v["alpha"] == 0)
  distilled = [k for k in summary if k != scratch_name]
  cmap = plt.get_cmap("viridis")
  colors = {k: cmap(0.85 * i / max(1, len(distilled) - 1)) for i, k in enumerate(distilled)}
  colors[scratch_name] = "tab:gray"
  n_seeds = len(d["seeds"])
  panels = ["nll"] + (["excess"] if floor is not None else []) + ["paired"]
  fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.4), squeeze=False)
  teacher = d["teacher"]["val_nll"]
  for ax, panel in zip(axes[0], panels):
    if panel == "paired":
      continue
    shift = floor if panel == "excess" else 0.0
    for name, m in summary.items():
      steps = np.asarray(m["steps"])
      label = (f"student, {name}" + (f" (alpha={m['alpha']:g})" if m["alpha"] > 0
                                      else " (alpha=0: CE only)"))
      ax.plot(steps, np.asarray(m["curve_mean"]) - shift, color=colors[name],
              ls="--" if name == scratch_name else "-", marker="o", ms=3, lw=1.5, label=label)
      ax.fill_between(steps, np.asarray(m["curve_min"]) - shift,
                      np.asarray(m["curve_max"]) - shift, color=colors[name], alpha=0.15, lw=0)
    value = (f"{teacher - shift:+.4f} nats over the floor" if panel == "excess"
             else f"{teacher:.4f} nats")
    ax.axhline(teacher - shift, color="tab:red", ls="-.", lw=1.2,
               label=f"teacher ({d['teacher_params']:,} params): {value}")
    ax.set_xlabel("student training step")
    ax.grid(alpha=0.3, which="both")
    if panel == "excess":
      ax.set_yscale("log")
      _plain_log_axis(ax.yaxis)
      ax.set(ylabel="validation NLL - floor (nats/token, log scale)",
             title="Excess loss over the true model")
    else:
      _references(ax, refs, ppl=False)
      ax.set(ylabel="validation NLL (nats/token)",
             title=f"Student ({d['student_params']:,} params): mean of {n_seeds} seeds, "
                   "band = min-max")
    ax.legend(fontsize=7.5)
  ax = axes[0][-1]
  temps = [summary[k]["temperature"] for k in distilled]
  for k, t in zip(distilled, temps):
    diffs = summary[k]["minus_scratch_per_seed"]
    ax.scatter([t] * len(diffs), diffs, color=colors[k], s=25, alpha=0.7, zorder=3)
    ax.scatter([t], [summary[k]["minus_scratch_mean"]], color=colors[k], marker="_", s=400,
               lw=2.5, zorder=4)
  ax.scatter([], [], color="black", s=25, label="one seed (same init and batches)")
  ax.scatter([], [], color="black", marker="_", s=300, lw=2.5, label="mean over seeds")
  ax.axhline(0.0, color="tab:gray", ls="--", lw=1.2, label="scratch (labels only)")
  ax.set_xscale("log", base=2)
  ax.set_xticks(temps)
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  ax.xaxis.set_minor_locator(ticker.NullLocator())
  ax.set_xlim(min(temps) / 1.5, max(temps) * 1.5)
  ax.set(xlabel="distillation temperature T (log scale)",
         ylabel="final val NLL, distilled - scratch (nats/token)",
         title=f"Paired difference after {d['num_steps']} steps (below 0: distillation helps)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7.5)
  _title(fig, results)
  save_figure(fig, path, dpi=120)


FIGURES = {"svd.png": plot_svd, "quant.png": plot_quant, "lora.png": plot_lora,
           "distill.png": plot_distill}


def draw(results: dict, workdir) -> list[str]:
  """Draws the figure of every study present in `results` into `workdir`; returns their names."""
  return draw_each({name: plot for name, plot in FIGURES.items()
                    if name.removesuffix(".png") in results}, results, workdir)
