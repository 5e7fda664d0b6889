"""Figures of the stability study (`llm_math.studies.stability`) from its results.json.

Draws lr_sweep.png (final validation loss against the peak learning rate, a panel per
model size, a line per variant), lr_sensitivity.png (learning-rate sensitivity against parameters,
with 95% intervals over seeds) and logit_growth.png (the max attention logit, the attention entropy
and the output log Z against the step at a high learning rate, with and without each fix).
"""

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from llm_math.figures import draw_each  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.figures import save_figure  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.reports import measurement_caption  # pylint: disable=g-import-not-at-top,wrong-import-position
from llm_math.reports.stability import logit_growth_runs  # pylint: disable=g-import-not-at-top,wrong-import-position

STYLE = {"baseline": ("tab:red", "o", "-"), "qk_norm": ("tab:blue", "s", "-"),
         "z_loss": ("tab:orange", "^", "--"), "qk_norm+z_loss": ("tab:green", "D", ":")}


def _floats(values) -> np.ndarray:
  return np.asarray([np.nan if v is None else v for v in values], np.float64)


def _references(ax, results):
  ax.axhline(results["initial_loss"], color="0.4", ls="--", lw=0.9,
             label=f"uniform ln|V| = {results['initial_loss']:.3f} (L0)")
  floor = results["references"].get("floor")
  if floor is not None:
    ax.axhline(floor, color="0.4", ls=":", lw=0.9, label=f"floor (true model) = {floor:.3f}")


def plot_lr_sweep(results: dict, path: str):
  sizes = list(dict.fromkeys(s["size"] for s in results["summary"]))
  fig, axes = plt.subplots(1, len(sizes), figsize=(4.6 * len(sizes), 4.2), sharey=True,
                           squeeze=False)
  l0 = results["initial_loss"]
  for ax, size in zip(axes[0], sizes):
    rows = [s for s in results["summary"] if s["size"] == size]
    for i, row in enumerate(rows):
      color, marker, ls = STYLE.get(row["variant"], ("k", "o", "-"))
      lrs, loss = np.asarray(row["learning_rates"]), _floats(row["final_val_nll"])
      ax.plot(lrs, loss, color=color, marker=marker, ls=ls, ms=5, label=row["variant"])
      for run in results["runs"]:  # each seed, faint
        if run["size"] == size and run["variant"] == row["variant"] and not run["diverged"]:
          ax.plot(run["learning_rate"], run["final_val_nll"], marker, color=color, ms=3, alpha=0.3)
      gone = np.asarray(row["diverged"]) > 0
      # Diverged: an x above L0, nudged right per variant so that coinciding ones stay visible.
      ax.plot(lrs[gone] * 1.08 ** i, np.full(gone.sum(), l0 * 1.03), "x", color=color, ms=8, mew=2)
    _references(ax, results)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate (AdamW)")
    ax.set_title(f"d_model x layers = {size} ({rows[0]['params']:,} params)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
  axes[0][0].set_ylabel("final validation NLL (nats/token), mean over seeds")
  axes[0][0].legend(fontsize=8, title="x: diverged (any seed)", title_fontsize=8)
  fig.suptitle(f"Final loss vs learning rate: {results['data']}; "
               f"{measurement_caption(results['evaluation'])}", fontsize=9)
  save_figure(fig, path)


def plot_lr_sensitivity(results: dict, path: str):
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for i, variant in enumerate(dict.fromkeys(s["variant"] for s in results["summary"])):
    rows = [s for s in results["summary"] if s["variant"] == variant]
    color, marker, ls = STYLE.get(variant, ("k", "o", "-"))
    n = np.asarray([r["params"] for r in rows], np.float64)
    mean = _floats([r["lr_sensitivity"]["mean"] for r in rows])
    ci = [r["lr_sensitivity"]["ci95"] for r in rows]
    err = np.asarray([[m - c[0], c[1] - m] if c else [0, 0] for m, c in zip(mean, ci)]).T
    # Variants side by side at each size (x nudged by 6% per variant).
    ax.errorbar(n * 1.06 ** i, mean, yerr=err, color=color, marker=marker, ls=ls, capsize=4,
                label=variant)
  seeds = rows[0]["lr_sensitivity"]["n"]
  ax.set_xscale("log")
  smallest = {}  # One tick per size, at its fewest parameters (qk_norm adds its norm scales).
  for r in results["summary"]:
    smallest[r["size"]] = min(smallest.get(r["size"], r["params"]), r["params"])
  sizes = sorted((p, size) for size, p in smallest.items())
  ax.set_xticks([p for p, _ in sizes])
  ax.set_xticklabels([f"{p:,}\n({size})" for p, size in sizes], fontsize=8)
  ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
  ax.axhline(0, color="0.5", lw=0.8)
  ax.set_xlabel("parameters (d_model x layers)")
  ax.set_ylabel("LR sensitivity E[min(L, L0) - L*] (nats)")
  ax.set_title(f"Learning-rate sensitivity (Wortsman et al. 2023); bars: 95% t-interval over "
               f"{seeds} seeds", fontsize=9)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  save_figure(fig, path)


def plot_logit_growth(results: dict, path: str):
  runs = logit_growth_runs(results)
  panels = (("attn_logit_max", "max attention logit (over blocks)", ("baseline", "qk_norm")),
            ("attn_entropy", "attention entropy, mean over blocks (nats)", ("baseline", "qk_norm")),
            ("log_z_mean", "output log Z, mean over positions", ("baseline", "z_loss")))
  fig, axes = plt.subplots(1, 3, figsize=(14, 4.0))
  for ax, (key, label, variants) in zip(axes, panels):
    for variant in variants:
      if variant in runs and runs[variant]["curves"]["step"]:
        color, _, ls = STYLE[variant]
        c = runs[variant]["curves"]
        ax.plot(c["step"], c[key], color=color, ls=ls,
                label=variant + (" (diverged)" if runs[variant]["diverged"] else ""))
    if key == "attn_logit_max":
      ax.set_yscale("symlog", linthresh=10)  # From O(1) to O(10^4) when the logits grow.
    ax.set_xlabel("training step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  any_run = next(iter(runs.values()))
  fig.suptitle(f"{any_run['size']} model ({any_run['params']:,} params), peak learning rate "
               f"{any_run['learning_rate']:g}, seed {any_run['seed']}: statistics logged during "
               "training", fontsize=10)
  save_figure(fig, path)


FIGURES = {"lr_sweep.png": plot_lr_sweep, "lr_sensitivity.png": plot_lr_sensitivity,
           "logit_growth.png": plot_logit_growth}


def draw(results: dict, workdir) -> list[str]:
  """Draws every figure into `workdir`; returns their file names."""
  return draw_each(FIGURES, results, workdir)
