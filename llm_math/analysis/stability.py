"""Learning-rate sensitivity of a training recipe (Wortsman et al. 2023, "Small-scale proxies for
large-scale Transformer training instabilities", Sec. 2).

Over a grid of learning rates eta spaced evenly in log, with final loss L(eta), the loss at
initialization L0 and the best final loss L* = min_eta L(eta):

    LR sensitivity = E_eta [ min(L(eta), L0) - L* ],

the mean excess over the best run, each run's excess capped at the loss of not training at all. A
run that diverged (a non-finite or missing loss) counts as L0. 0 means every learning rate of the
grid is as good as the best; a recipe that only trains in a narrow band has a large one.
"""

import math

import numpy as np

from llm_math.analysis import intervals


def capped_losses(final_losses, initial_loss: float) -> np.ndarray:
  """min(L(eta), L0) per learning rate; a diverged run (None, NaN, inf) counts as L0."""
  return np.asarray([initial_loss if loss is None or not math.isfinite(loss)
                     else min(loss, initial_loss) for loss in final_losses], np.float64)


def lr_sensitivity(final_losses, initial_loss: float) -> float:
  """E_eta[min(L(eta), L0) - L*] over the grid's final losses (see the module docstring)."""
  capped = capped_losses(final_losses, initial_loss)
  return float(np.mean(capped - capped.min()))


def best_learning_rate(learning_rates, final_losses) -> float | None:
  """The learning rate of the lowest finite final loss (None when every run diverged)."""
  finite = [(loss, lr) for lr, loss in zip(learning_rates, final_losses)
            if loss is not None and math.isfinite(loss)]
  return min(finite)[1] if finite else None


def summarize(runs: list[dict], learning_rates, seeds, variants, initial_loss: float) -> list[dict]:
  """Per model size and variant of a grid of runs ({size, params, variant, learning_rate, seed,
  final_val_nll (None: diverged)}): the final loss per learning rate (mean over seeds), how many
  seeds diverged there, the best learning rate, and the learning-rate sensitivity per seed with its
  mean and Student-t 95% interval (`intervals.mean_ci95`)."""
  lrs, out = list(learning_rates), []
  for size in dict.fromkeys(r["size"] for r in runs):
    for variant in variants:
      mine = [r for r in runs if r["size"] == size and r["variant"] == variant]
      by_seed = {s: [next(r["final_val_nll"] for r in mine if r["seed"] == s
                          and r["learning_rate"] == lr) for lr in lrs] for s in seeds}
      mean_loss = [intervals.mean_ci95([by_seed[s][i] for s in by_seed])["mean"]
                   for i in range(len(lrs))]
      sensitivity = [lr_sensitivity(v, initial_loss) for v in by_seed.values()]
      out.append({"size": size, "params": mine[0]["params"], "variant": variant,
                  "learning_rates": lrs, "final_val_nll": mean_loss,
                  "diverged": [sum(v[i] is None for v in by_seed.values()) for i in range(len(lrs))],
                  "best_learning_rate": best_learning_rate(lrs, mean_loss),
                  "lr_sensitivity_per_seed": sensitivity,
                  "lr_sensitivity": intervals.mean_ci95(sensitivity)})
  return out
