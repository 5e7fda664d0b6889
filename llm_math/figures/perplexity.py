"""Figures of the perplexity study (`llm_math.studies.perplexity`) from its results.json.

perplexity.png   validation loss / perplexity over training against uniform, unigram, the best n-gram
                 and (synthetic data) the floor, plus the excess over the floor on a log scale
loss_vs_time.png validation bits/char (and nats/token) against training wall time, with the unigram
                 and the best n-gram (equal and full context) as lines
ngram_orders.png loss vs n-gram order (add-k and Kneser-Ney, equal and full context), Transformers as lines
scaling.png      validation loss vs parameters and vs training compute, log axes, fitted power laws

Each is drawn when the results hold what it shows (`drawable`).
"""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from llm_math.analysis import intervals  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.figures import band  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.figures import draw_each  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.figures import error_bars  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.figures import plain_log_ticks  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.figures import save_figure  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.figures import seeds_note  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.reports import measurement_caption  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.reports import pm  # pylint: disable=g-import-not-at-top,wrong-import-position

LN2 = math.log(2.0)
_STYLES = {"uniform": ("tab:gray", ":"), "unigram": ("tab:orange", "--"),
           "floor": ("black", "-"), "entropy_rate": ("black", "-.")}


def _best_ngram(records, tokenizer):
  grams = [r for r in records if r["kind"] == "ngram" and r["tokenizer"] == tokenizer
           and r.get("context") == "equal"]
  return min(grams, key=lambda r: r["val_nll_nats"]) if grams else None


def _excess_over_floor(results: dict, curve: dict, floor: dict) -> tuple:
  """(NLL - floor at each evaluation, its 95% intervals or None): over seeds, the difference is
  taken seed by seed (each seed's data has its own floor), so the interval is the paired one."""
  n = results.get("n_seeds")
  runs = (curve.get("per_seed") or {}).get("val_nll")
  floors = (floor.get("per_seed") or {}).get("val_nll_nats")
  if not (n and runs):
    return np.asarray(curve["val_nll"]) - floor["val_nll_nats"], None
  excess_SxT = np.asarray(runs) - np.asarray(floors or [floor["val_nll_nats"]] * n)[:, None]
  stats = [intervals.mean_ci95(column.tolist()) for column in excess_SxT.T]
  return np.array([s["mean"] for s in stats]), [s["ci95"] for s in stats]


def plot_curves(results: dict, path: str):
  """Validation loss and perplexity over training for the first tokenizer's models."""
  tokenizer = next(iter(results["evaluations"]))
  ev = results["evaluations"][tokenizer]
  records = [r for r in results["records"] if r["tokenizer"] == tokenizer]
  floor = next((r for r in records if r["name"].startswith("floor")), None)
  fig, axes = plt.subplots(1, 3 if floor else 2, figsize=(17 if floor else 12, 4.8))
  ax_nll, ax_ppl = axes[0], axes[1]
  for name, curve in results["curves"].items():
    if curve.get("tokenizer", tokenizer) != tokenizer:
      continue
    steps, nll, ci = curve["step"], curve["val_nll"], curve.get("val_nll_ci95")
    line, = ax_nll.plot(steps, nll, marker="o", ms=3, label=name)
    ax_ppl.plot(steps, np.exp(nll), marker="o", ms=3, label=name)
    band(ax_nll, steps, ci, color=line.get_color())
    band(ax_ppl, steps, ci, np.exp, color=line.get_color())
    if floor:
      excess, excess_ci = _excess_over_floor(results, curve, floor)
      axes[2].plot(steps, excess, marker="o", ms=3, label=name)
      band(axes[2], steps, excess_ci, color=line.get_color())
  lines = [r for r in records if r["kind"] in ("baseline", "floor")]
  best = _best_ngram(records, tokenizer)
  if best and best["order"] > 1:
    lines.append(best)
  for rec in lines:
    color, style = _STYLES.get(rec["name"].split(" ")[0], ("tab:purple", "--"))
    label = f"{rec['name']} ({rec['val_nll_nats']:.3f} nats)"
    ax_nll.axhline(rec["val_nll_nats"], color=color, ls=style, lw=1.2, label=label)
    ax_ppl.axhline(np.exp(rec["val_nll_nats"]), color=color, ls=style, lw=1.2, label=label)
  ax_nll.set(xlabel="training step", ylabel="validation NLL (nats / token)", title="Validation loss")
  ax_ppl.set(xlabel="training step", ylabel="validation perplexity exp(NLL)", yscale="log",
             title="Validation perplexity (log scale)")
  plain_log_ticks(ax_ppl.yaxis)
  if floor:
    axes[2].axhline(0.05, color="tab:red", ls=":", lw=1.2, label="0.05 nats")
    axes[2].set(xlabel="training step", ylabel="validation NLL - floor (nats, log scale)",
                yscale="log", title="Excess loss over the true model" + (
                    "\n(band: 95% t-interval of the per-seed excess)" if results.get("n_seeds")
                    else ""))
    axes[2].legend(fontsize=8)
  for ax in axes:
    ax.grid(alpha=0.3, which="both")
  ax_nll.legend(fontsize=7, loc="best")
  fig.suptitle(f"{results['data']} [{tokenizer}]{seeds_note(results)}\n{measurement_caption(ev)}",
               fontsize=10)
  save_figure(fig, path)


def plot_loss_vs_time(results: dict, path: str):
  """Validation loss of each model against its training wall time, in bits per character and nats
  per token, with the unigram and the best n-gram (equal and full context) as lines."""
  tokenizer = next(iter(results["evaluations"]))
  ev = results["evaluations"][tokenizer]
  records = [r for r in results["records"] if r["tokenizer"] == tokenizer]
  to_bpc = ev["tokens_scored"] / ev["chars_scored"] / LN2  # nats/token -> bits/char
  fig, ax = plt.subplots(figsize=(8, 5))
  shown = []  # Values the y-axis must show: every point after the first, and the lines.
  for name, curve in results["curves"].items():
    if curve.get("tokenizer", tokenizer) != tokenizer or not curve.get("elapsed_s"):
      continue
    minutes = np.asarray(curve["elapsed_s"], float) / 60
    bpc = np.asarray(curve["val_nll"]) * to_bpc
    ax.plot(minutes, bpc, marker="o", ms=4,
            label=f"{name}: {bpc[-1]:.3f} bits/char after {minutes[-1]:.1f} min")
    shown += list(bpc[1:])
  lines = [r for r in records if r["name"].startswith("unigram")]
  for context in ("equal", "full"):
    grams = [r for r in records if r["kind"] == "ngram" and r.get("context") == context]
    if grams:
      lines.append(min(grams, key=lambda r: r["val_nll_nats"]))
  for rec, style in zip(lines, (":", "--", "-.")):
    ax.axhline(rec["bits_per_char"], color="tab:gray" if style == ":" else "tab:purple", ls=style,
               lw=1.2, label=f"{rec['name']}: {rec['bits_per_char']:.3f} bits/char")
    shown.append(rec["bits_per_char"])
  if len(lines) > 1:
    best = min(r["bits_per_char"] for r in lines[1:])
    ax.axhline(0.9 * best, color="tab:green", ls=":", lw=1.0,
               label=f"10% below the best n-gram: {0.9 * best:.3f} bits/char")
    shown.append(0.9 * best)
  if shown:  # The untrained model's first point (~ln|V|) would flatten the rest: it is left above.
    low, high = min(shown), max(shown)
    ax.set_ylim(low - 0.05 * (high - low), high + 0.08 * (high - low))
    first = [np.asarray(c["val_nll"])[0] * to_bpc for c in results["curves"].values()
             if c.get("tokenizer", tokenizer) == tokenizer and c.get("elapsed_s")]
    if first and max(first) > ax.get_ylim()[1]:
      ax.text(0.01, 0.98, f"step 0 (untrained): {max(first):.2f} bits/char, above the axis",
              transform=ax.transAxes, fontsize=8, va="top")
  ax.set(xlabel="training wall time (minutes, evaluation included)",
         ylabel="validation bits per character")
  nats = ax.secondary_yaxis("right", functions=(lambda b: b / to_bpc, lambda n: n * to_bpc))
  nats.set_ylabel("validation NLL (nats / token)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="upper right")
  fig.suptitle(f"{results['data']} [{tokenizer}]\n{measurement_caption(ev)}", fontsize=9)
  save_figure(fig, path)


def plot_ngram_orders(results: dict, path: str):
  """Bits per character vs n-gram order; Transformers and the floor as horizontal lines."""
  fig, ax = plt.subplots(figsize=(8, 5))
  for tokenizer in results["evaluations"]:
    records = [r for r in results["records"] if r["tokenizer"] == tokenizer]
    suffix = f" [{tokenizer}]" if len(results["evaluations"]) > 1 else ""
    for method, marker in (("kneser_ney", "o"), ("add_k", "s")):
      for context, style in (("equal", "-"), ("full", "--")):
        pts = sorted((r["order"], r["bits_per_char"]) for r in records if r["kind"] == "ngram"
                     and r["method"] == method and r["context"] == context)
        if pts:
          label = ("Kneser-Ney" if method == "kneser_ney" else "add-k") + (
              ", same context as Transformer" if context == "equal" else ", full left context")
          ax.plot(*zip(*pts), marker=marker, ls=style, label=label + suffix)
    for r in records:
      if r["kind"] in ("model", "floor") or r["name"] == "uniform":
        ax.axhline(r["bits_per_char"], ls=":" if r["kind"] != "model" else "-.", lw=1.2,
                   color="black" if r["kind"] == "floor" else None,
                   label=f"{r['name']} ({r['bits_per_char']:.3f})")
  ax.set(xlabel="n-gram order (context = order - 1 tokens)",
         ylabel="validation bits per character (lower is better)",
         title="Count-based n-gram models vs Transformers")
  ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  ev = next(iter(results["evaluations"].values()))
  fig.suptitle(f"{results['data']}\n{measurement_caption(ev)}", fontsize=9)
  save_figure(fig, path)


def plot_scaling(results: dict, path: str):
  """Validation loss vs parameters and vs training FLOPs with the fitted L = a x^-alpha + c."""
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
  for tokenizer in results["evaluations"]:
    models = sorted((r for r in results["records"] if r["kind"] == "model"
                     and r["tokenizer"] == tokenizer), key=lambda r: r["params"])
    fit = results.get("power_law", {}).get(tokenizer)
    for ax, key, axis in ((axes[0], "params", "params"), (axes[1], "train_flops", "compute")):
      x = np.array([r[key] for r in models], float)
      y = np.array([r["val_nll_nats"] for r in models])
      ax.errorbar(x, y, yerr=error_bars(models, "val_nll_nats"), fmt="o", capsize=3, zorder=3,
                  label=f"Transformers [{tokenizer}]{seeds_note(results)}")
      f = fit and fit[axis]
      if f and f["alpha"] is not None:
        grid = np.geomspace(x.min() / 1.5, x.max() * 1.5, 100)
        line, = ax.plot(grid, f["a"] * grid ** -f["alpha"] + f["c"], "--",
                        label=f"fit a x^-alpha + c: alpha = {pm(f, 'alpha', '.3f')}, "
                        f"c = {pm(f, 'c', '.3f')}")
        if f.get("band") and band(ax, f["band"]["x"], list(zip(f["band"]["lo"], f["band"]["hi"])),
                                  color=line.get_color(), alpha=0.15):
          line.set_label(line.get_label() + "\n(band: 95% bootstrap of the fit)")
        if f["c"] > 1e-3 * y.min():  # A c at (or rounding-close to) its bound 0 has no log-axis place.
          ax.axhline(f["c"], color="gray", ls=":", lw=1, label=f"fitted irreducible c = {f['c']:.3f}")
      for r in results["records"]:
        if r["tokenizer"] == tokenizer and r["name"].startswith("floor"):
          ax.axhline(r["val_nll_nats"], color="black", lw=1.2, label=f"true floor {r['val_nll_nats']:.3f}")
      best = _best_ngram(results["records"], tokenizer)
      if best:
        ax.axhline(best["val_nll_nats"], color="tab:purple", ls="--", lw=1,
                   label=f"best n-gram: {best['name']} ({best['val_nll_nats']:.3f})")
  axes[0].set(xscale="log", yscale="log", xlabel="parameters N",
              ylabel="validation NLL (nats / token, log scale)", title="Loss vs model size")
  axes[1].set(xscale="log", yscale="log", xlabel="training compute C (FLOPs, 6N + 12LTd per token)",
              ylabel="validation NLL (nats / token, log scale)", title="Loss vs training compute")
  for ax in axes:
    plain_log_ticks(ax.yaxis)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
  ev = next(iter(results["evaluations"].values()))
  fig.suptitle(f"{results['data']}\n{measurement_caption(ev)}", fontsize=9)
  save_figure(fig, path)


FIGURES = {"perplexity.png": plot_curves, "loss_vs_time.png": plot_loss_vs_time,
           "ngram_orders.png": plot_ngram_orders, "scaling.png": plot_scaling}


def drawable(results: dict) -> list[str]:
  """The FIGURES the results support: training curves (perplexity.png; loss_vs_time.png when they
  carry elapsed times), n-gram records (ngram_orders.png), two or more models (scaling.png)."""
  supported = {"perplexity.png": bool(results["curves"]),
               "loss_vs_time.png": any(c.get("elapsed_s") for c in results["curves"].values()),
               "ngram_orders.png": any(r["kind"] == "ngram" for r in results["records"]),
               "scaling.png": sum(r["kind"] == "model" for r in results["records"]) >= 2}
  return [name for name in FIGURES if supported[name]]


def draw(results: dict, workdir) -> list[str]:
  """Draws every figure the results support into `workdir`; returns their file names."""
  return draw_each({name: FIGURES[name] for name in drawable(results)}, results, workdir)
