"""Figures from saved results (results.json). Imports matplotlib and numpy only, never JAX, so every
figure can be regenerated from the files an experiment wrote."""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import ticker  # pylint: disable=g-import-not-at-top,wrong-import-position

_BASELINE_STYLES = {"uniform": ("tab:gray", ":"), "unigram": ("tab:orange", "--"),
                    "floor": ("black", "-"), "entropy_rate": ("black", "-.")}


def measurement_caption(evaluation: dict) -> str:
  """How a number was measured: split, tokens scored, context each token had."""
  return (f"{evaluation['split']} split, {evaluation['tokens_scored']:,} tokens scored, context "
          f"{evaluation['context_min']}-{evaluation['context_max']} tokens "
          f"(mean {evaluation['context_mean']:.1f})")


def plot_perplexity(results: dict, path: str):
  """Validation loss and perplexity over training against the baselines, and the excess over the
  floor on a log scale when the source's floor is known."""
  floor = next((r for r in results["records"] if r["name"].startswith("floor")), None)
  fig, axes = plt.subplots(1, 3 if floor else 2, figsize=(17 if floor else 12, 4.8))
  ax_nll, ax_ppl = axes[0], axes[1]
  for name, curve in results["curves"].items():
    steps, nll = curve["step"], curve["val_nll"]
    ax_nll.plot(steps, nll, marker="o", ms=3, label=name)
    ax_ppl.plot(steps, [math.exp(v) for v in nll], marker="o", ms=3, label=name)
    if floor:
      axes[2].plot(steps, [v - floor["val_nll_nats"] for v in nll], marker="o", ms=3, label=name)
  for rec in results["records"]:
    if rec["kind"] == "model":
      continue
    color, style = _BASELINE_STYLES.get(rec["name"].split(" ")[0], ("tab:purple", "--"))
    label = f"{rec['name']} ({rec['val_nll_nats']:.3f} nats)"
    ax_nll.axhline(rec["val_nll_nats"], color=color, ls=style, lw=1.2, label=label)
    ax_ppl.axhline(math.exp(rec["val_nll_nats"]), color=color, ls=style, lw=1.2, label=label)
  ax_nll.set(xlabel="training step", ylabel="validation NLL (nats / token)",
             title="Validation loss")
  ax_ppl.set(xlabel="training step", ylabel="validation perplexity exp(NLL)", yscale="log",
             title="Validation perplexity (log scale)")
  ax_ppl.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
  ax_ppl.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
  if floor:
    axes[2].axhline(0.05, color="tab:red", ls=":", lw=1.2, label="0.05 nats")
    axes[2].set(xlabel="training step", ylabel="validation NLL - floor (nats, log scale)",
                yscale="log", title="Excess loss over the true model")
    axes[2].legend(fontsize=8)
  for ax in axes:
    ax.grid(alpha=0.3, which="both")
  ax_nll.legend(fontsize=8, loc="upper right")
  fig.suptitle(f"{results['data']}\n{measurement_caption(results['evaluation'])}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)
