"""The two-variable scaling law L(N, D) on tiny shakespeare (character level): 4 sizes x 4 budgets,
the size sweep's models and recipe with a WSD schedule (`llm_math.studies.scaling_law`).

  python -m experiments.scaling_law --workdir=/tmp/scaling_law

Sizes 32x1 ... 96x3 (~16k to ~345k parameters); budgets are training steps of 16 x 64 tokens, so D
runs from 0.5M to 4.1M tokens (about 4 epochs of the ~1M training characters at the largest). Each
size trains one trunk of the largest budget; the smaller budgets branch off it where their decay
starts (the last 20% of their steps) and train only that cool-down. The warmup (100 steps) is the
same for every budget, as the branching needs. Every run is scored on the whole validation split
(independent windows of 64, as the size sweep). num_steps is not read: the budgets are the runs'.
"""
from experiments.configs import size_sweep


def get_config():
  c = size_sweep.get_config()
  c.model_sizes = "32x1,48x2,64x2,96x3"
  c.budgets = "500,1000,2000,4000"  # Training steps (increasing); the largest is each size's trunk.
  c.num_steps = 4000
  c.schedule = "wsd"
  c.decay_fraction = 0.2
  c.warmup_steps = 100
  c.eval_every = 4000  # Each run is scored at its end (and the trunk at step 0).
  c.fit_bootstrap = 200  # Bootstrap resamples of the 16 points for the fit's 95% intervals.
  return c
