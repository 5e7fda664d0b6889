"""A model-size sweep on tiny shakespeare (character level): 5 Transformers from ~10k to ~0.8M
parameters, the same data, steps and schedule, and a fitted power law L(N) = a N^-alpha + c.

  python -m experiments.perplexity --config=experiments/configs/size_sweep.py --workdir=/tmp/sizes

Every size sees the same 1.5M training tokens (1500 steps x 16 x 64), so the sweep measures loss vs
parameters at fixed data, not compute-optimal scaling.
"""
from experiments.configs import tinyshakespeare_cpu


def get_config():
  c = tinyshakespeare_cpu.get_config()
  c.model_sizes = "32x1,48x2,64x2,96x3,128x4"
  c.num_steps = 1500
  c.batch_size = 16
  c.eval_every = 500
  c.checkpoint_every = 1500
  c.ngram.update(orders="1,3,5,7", methods="kneser_ney")
  return c
