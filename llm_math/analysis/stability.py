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
