r"""Figures and report of experiments/compression.py from its results.json (matplotlib and numpy
only, no JAX), so both can be redrawn from the file alone:

  python -m experiments.plot_compression --workdir=/tmp/compression   # figures and results.md

svd.png      perplexity vs the fraction of singular values kept and vs the factored parameter count,
             with the float model and the references; the singular value spectra.
quant.png    perplexity change, bits/param and the two against each other, per quantization scheme.
lora.png     target perplexity vs trainable parameters (LoRA ranks, full fine-tuning, no
             fine-tuning, scratch) and the target validation curves.
distill.png  student validation loss over steps per temperature vs from scratch (mean and range
             over seeds), the excess over the floor, and the paired final difference vs T.
"""

import argparse
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import ticker  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math import reports
from llm_math import files  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.figures import save_figure
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
  for p, s in svd["spectra"].items():
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


# ------------------------------------------------------------------------------------------------
# The report (results.md) and the headline numbers.


def target_changes(config: dict) -> dict | None:
  """{field: [base, target]} of the synthetic source fields the LoRA transfer changes (None when
  either source is a corpus), from a config as a dict."""
  if config["lora"]["target_data"] != "synthetic" or config["data"] != "synthetic":
    return None
  base, target = config["synthetic"], config["lora"]["target_synthetic"]
  return {k: [base.get(k), v] for k, v in sorted(target.items())
          if k not in ("train_tokens", "val_tokens") and base.get(k) != v}


def headline(results: dict) -> dict:
  """The numbers the README quotes, in one place: base NLL, perplexity change per quantization
  scheme, singular values kept per energy budget, LoRA's share of full fine-tuning's gain per rank,
  distilled minus scratch NLL per temperature (lists of records, so no key holds a dot)."""
  out = {"base_val_nll": results["base"]["val_nll"]}
  if "quant" in results:
    out["quant"] = [{k: r[k] for k in ("scheme", "bits_per_param", "ppl_change_pct")}
                    for r in results["quant"]["records"] if r["bits"] < 32]
  if "svd" in results:
    out["svd_energy"] = [{"energy": r["setting"], "singular_values_kept": r["singular_values_kept"],
                          "ppl_change_pct": r["ppl_change_pct"]}
                         for r in results["svd"]["records"] if r["method"] == "global energy"]
  if "lora" in results:
    out["lora"] = [{k: r[k] for k in ("name", "trainable_params", "val_nll", "share_of_full_gain")
                    if k in r} for r in results["lora"]["runs"]]
  if "distill" in results:
    d = results["distill"]
    out["distill"] = [{"name": name, **{k: m[k] for k in (
        "temperature", "val_nll_mean", "minus_scratch_mean", "seeds_better_than_scratch")}}
                      for name, m in d["summary"].items()]
    out["distill_teacher_val_nll"] = d["teacher"]["val_nll"]
  return out


def _caption(ev: dict) -> str:
  return (f"{ev['split']} split of {ev['data']}: {ev['tokens_scored']:,} tokens scored, windows of "
          f"{ev['seq_len']} moved by {ev['stride']}, context {ev['context_min']}-"
          f"{ev['context_max']} tokens (mean {ev['context_mean']:.1f})")


def _references_line(what: str, refs: dict) -> str:
  return f"{what}: " + ", ".join(f"{k} {v:.4f} nats (ppl {math.exp(v):.3f})"
                                 for k, v in refs.items()) + "."


def _pct(r: dict) -> str:
  return reports.fmt(r["ppl_change_pct"], "+.2f") + "%"


def _svd_section(s: dict, base: dict) -> list[str]:
  recs = s["records"]
  rows = [[r["method"], f"{r['setting']:g}", f"{r['singular_values_kept']:.3f}",
           f"{r['energy_kept']:.4f}", f"{r['relative_error']:.4f}",
           f"{r['params_factored'] / r['params_dense']:.3f}", f"{r['val_nll']:.4f}",
           reports.fmt(r["val_ppl"], ".3f"), _pct(r)] for r in recs]
  lines = ["", "## Perplexity vs rank (SVD truncation)", "",
           f"Matrices `{s['pattern']}` ({len(s['spectra'])} of them) replaced by their best rank-r "
           "approximation; 'uniform' keeps the same fraction of min(in, out) in every matrix, "
           "'global energy' keeps the largest singular values over all matrices until that share "
           "of sum s^2. Stored as factors they would take r (in + out) numbers.", ""]
  lines += reports.markdown_table(
      ["method", "setting", "singular values kept", "energy kept", "rel. Frobenius error",
       "factored / dense params", "val NLL", "perplexity", "PPL change"], rows, "lrrrrrrrr")
  uniform = sorted((r for r in recs if r["method"] == "uniform"), key=lambda r: r["setting"])
  within = [r for r in recs if r["ppl_change_pct"] is not None and r["ppl_change_pct"] <= 1.0]
  if uniform:
    lo, hi = uniform[0], uniform[-1]
    lines += ["", f"Perplexity falls from {reports.fmt(lo['val_ppl'], '.3f')} at rank fraction "
              f"{lo['setting']:g} to {reports.fmt(hi['val_ppl'], '.3f')} at {hi['setting']:g} "
              f"(float {base['val_ppl']:.3f})."]
  if within:
    r = min(within, key=lambda r: r["params_factored"])
    lines.append(f"The fewest factored parameters within 1% of float: {r['method']} "
                 f"{r['setting']:g}, {r['singular_values_kept']:.1%} of the singular values, "
                 f"{r['params_factored']:,} vs {r['params_dense']:,} dense ({_pct(r)}).")
  return lines


def _quant_section(q: dict, base: dict) -> list[str]:
  rows = [[r["scheme"], f"{r['bits_per_param']:.3f}", f"{r['bytes']:,}", f"{r['model_bytes']:,}",
           f"{r['relative_error']:.4f}", f"{r['val_nll']:.4f}", reports.fmt(r["val_ppl"], ".3f"),
           _pct(r)] for r in q["records"]]
  lines = ["", "## Perplexity vs quantization scheme", "",
           f"Symmetric absmax round-to-nearest of the {q['params_quantized']:,} parameters in "
           f"`{q['pattern']}` (of {q['params_total']:,}; the rest stay float32), scales stored as "
           f"{q['scale_dtype']} and counted in bits/param; dequantized on load.", ""]
  lines += reports.markdown_table(["scheme", "bits/param", "quantized bytes", "model bytes",
                                  "rel. weight error", "val NLL", "perplexity", "PPL change"], rows)
  by = {r["scheme"]: r for r in q["records"]}
  if "int8-per_channel" in by:
    r = by["int8-per_channel"]
    within = "within" if abs(r["ppl_change_pct"]) <= 1.0 else "NOT within"
    lines += ["", f"int8 per-channel: perplexity {r['val_ppl']:.3f} vs float {base['val_ppl']:.3f} "
              f"({r['ppl_change_pct']:+.3f}%), {within} 1% of float, at "
              f"{r['bits_per_param']:.3f} bits/param ({32 / r['bits_per_param']:.1f}x smaller)."]
  int4 = [r for r in q["records"] if r["bits"] == 4]
  if int4:
    lines += ["", "int4 RTN costs " + "; ".join(
        f"{r['scheme']} {_pct(r)} perplexity ({r['val_nll'] - base['val_nll']:+.4f} nats) at "
        f"{r['bits_per_param']:.3f} bits/param" for r in int4) + "."]
  return lines


def _lora_section(lo: dict, data: str) -> list[str]:
  changes = lo.get("target_changes")
  rows = [[r["name"], f"{r['trainable_params']:,}",
           f"{100 * r['trainable_params'] / lo['params_total']:.2f}%",
           (f"{r['adapted_params'] / r['trainable_params']:.0f}x ({r['adapted_matrices']} matrices)"
            if r["kind"] == "lora" else "-"),
           reports.fmt(r.get("share_of_full_gain"), ".0%"), f"{r['val_nll']:.4f}",
           reports.fmt(r["val_ppl"], ".3f")] for r in lo["runs"]]
  lines = ["", "## LoRA transfer: quality vs rank", "",
           f"Pretrained on {data}, fine-tuned on {lo['target']}"
           + ("; changed: " + ", ".join(f"{k} {a:g} -> {b:g}" for k, (a, b) in changes.items())
              if changes else "")
           + f"; {lo['num_steps']} steps, the same batches for every run. LoRA adapts "
           f"`{lo['targets']}` with W + (alpha/r) a b, alpha = {lo['alpha']:g}; full fine-tuning "
           f"trains all {lo['params_total']:,} parameters.",
           f"Measured on the {_caption(lo['evaluation'])}.",
           _references_line("Target references", lo["references"]), ""]
  lines += reports.markdown_table(["run", "trainable params", "% of full",
                                  "adapted matrices' params / trainable",
                                  "share of full FT's gain", "val NLL", "perplexity"], rows)
  runs = {r["kind"]: r for r in lo["runs"] if r["kind"] != "lora"}
  loras = [r for r in lo["runs"] if r["kind"] == "lora"]
  full = runs["full"]
  if loras:
    best = min(loras, key=lambda r: r["val_nll"])
    lines += ["", f"The share of full fine-tuning's NLL gain is (no FT - LoRA) / (no FT - full FT), "
              f"from {runs['none']['val_nll']:.4f} to {full['val_nll']:.4f} nats. The best LoRA "
              f"(r={best['rank']}, {best['val_nll']:.4f} nats) trains "
              f"{full['trainable_params'] / best['trainable_params']:.0f}x fewer parameters than "
              f"full fine-tuning and is {best['val_nll'] - full['val_nll']:+.4f} nats from it."]
  if "scratch" in runs:
    sc = runs["scratch"]
    lines += ["", f"The same architecture trained from scratch on the target for the same "
              f"{lo['num_steps']} steps reaches {sc['val_nll']:.4f} nats vs {full['val_nll']:.4f} "
              f"for full fine-tuning ({sc['val_nll'] - full['val_nll']:+.4f} nats; one seed each, "
              "so a gap of a few hundredths of a nat is within what another seed can change)."]
  return lines


def _distill_section(d: dict) -> list[str]:
  summary, n_seeds = d["summary"], len(d["seeds"])
  scratch_name = next(k for k, m in summary.items() if m["alpha"] == 0)
  m = d["student_model"]
  rows = [[f"teacher ({d['teacher_params']:,} params)", "-", "-", f"{d['teacher']['val_nll']:.4f}",
           f"{d['teacher']['val_ppl']:.3f}", "-", "-", "-"]]
  for name, s in summary.items():
    paired = name != scratch_name
    rows.append([f"student, {name}", f"{s['alpha']:g}", f"{s['temperature']:g}" if paired else "-",
                 f"{s['val_nll_mean']:.4f} ({s['val_nll_min']:.4f}-{s['val_nll_max']:.4f})",
                 f"{s['val_ppl_mean']:.3f}",
                 ", ".join(f"{x:+.4f}" for x in s["minus_scratch_per_seed"]) if paired else "-",
                 f"{s['minus_scratch_mean']:+.4f}" if paired else "-",
                 f"{s['seeds_better_than_scratch']}/{n_seeds}" if paired else "-"])
  lines = ["", "## Distillation vs training from scratch", "",
           f"Student {d['student_params']:,} parameters ({m['num_layers']} layer(s), d_model "
           f"{m['d_model']}, {m['num_heads']} heads, d_ff {m['d_ff']}), teacher = the base model. "
           f"For each of {n_seeds} seeds (student initialization and batch order) every student "
           f"starts from the same initialization and sees the same {d['num_steps']} batches with "
           f"the same optimizer; distilled students minimize alpha T^2 KL(teacher_T || student_T) "
           f"+ (1 - alpha) CE with alpha = {d['alpha']:g}, the scratch student CE alone. "
           "Differences are paired by seed.", ""]
  lines += reports.markdown_table(
      ["model", "alpha", "T", "val NLL, mean over seeds (min-max)", "perplexity at mean NLL",
       "NLL - scratch, per seed", "mean NLL - scratch", "seeds better than scratch"], rows)
  distilled = {k: s for k, s in summary.items() if k != scratch_name}
  name, best = min(distilled.items(), key=lambda kv: kv[1]["val_nll_mean"])
  better = best["seeds_better_than_scratch"]
  verdict = "better than" if better == n_seeds else "worse than" if better == 0 else "mixed against"
  reach = next((step for step, v in zip(best["steps"], best["curve_mean"])
                if v <= summary[scratch_name]["val_nll_mean"]), None)
  lines += ["", f"After {d['num_steps']} steps the best distilled student ({name}) is at "
            f"{best['val_nll_mean']:.4f} nats (mean of {n_seeds} seeds) vs "
            f"{summary[scratch_name]['val_nll_mean']:.4f} from scratch: "
            f"{best['minus_scratch_mean']:+.4f} nats, {verdict} scratch ({better}/{n_seeds} seeds "
            f"lower; teacher {d['teacher']['val_nll']:.4f})"
            + (f"; its mean curve reached scratch's final loss by step {reach}." if reach is not None
               else ".")]
  return lines


def report(results: dict) -> str:
  """results.md: every table and the sentences the numbers support."""
  ev, base = results["evaluation"], results["base"]
  lines = [f"# Compression of a Transformer LM: {ev['data']}", "",
           f"Base model: {base['params']:,} parameters, {base['origin']}, step {base['step']}; "
           f"float32 validation NLL {base['val_nll']:.4f} nats, perplexity {base['val_ppl']:.3f}.",
           f"Measured on the {_caption(ev)}.",
           _references_line("References on the same tokens", results["references"])]
  if "svd" in results:
    lines += _svd_section(results["svd"], base)
  if "quant" in results:
    lines += _quant_section(results["quant"], base)
  if "lora" in results:
    lines += _lora_section(results["lora"], ev["data"])
  if "distill" in results:
    lines += _distill_section(results["distill"])
  lines += ["", f"Wall time: {results['wall_time_s']:.0f} s (" + ", ".join(
      f"{k} {v:.0f} s" for k, v in results["timings_s"].items()) + ")."]
  return "\n".join(lines) + "\n"


PLOTS = {"svd": plot_svd, "quant": plot_quant, "lora": plot_lora, "distill": plot_distill}


def plot_all(results: dict, workdir: str) -> list[str]:
  """Draws the figure of every study present in `results`; returns the file names."""
  written = []
  for study, plot in PLOTS.items():
    if study in results:
      plot(results, os.path.join(workdir, f"{study}.png"))
      written.append(f"{study}.png")
  return written


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="A workdir of experiments.compression.")
  args = parser.parse_args()
  path = files.path(args.workdir) / "results.json"
  if not path.exists():
    parser.exit(2, f"error: --workdir={args.workdir}: no results.json (run "
                   "experiments.compression there first)\n")
  results = files.read_json(path)
  files.write_text(files.path(args.workdir) / "results.md", report(results))
  print("wrote results.md, " + ", ".join(plot_all(results, args.workdir)))


if __name__ == "__main__":
  main()
