"""Small configs and datasets shared by the tests."""
import os

from experiments.configs import perplexity as default_config
from llm_math import data as data_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("LLM_MATH_SHARED_DATA", os.path.join(REPO, "..", "shared", "data"))
TINY_SHAKESPEARE = os.path.join(SHARED_DATA, "tinyshakespeare.txt")

TINY_OVERRIDES = [
    "--config.num_steps=12", "--config.seq_len=16", "--config.batch_size=8",
    "--config.model.num_layers=1", "--config.model.d_model=32", "--config.model.d_ff=64",
    "--config.model.num_heads=2", "--config.synthetic.train_tokens=20000",
    "--config.synthetic.val_tokens=2000", "--config.synthetic.lag=4",
    "--config.eval_every=6", "--config.log_every=2", "--config.checkpoint_every=4",
    "--config.eval_stride=0",
]


def tiny_config(**overrides):
  """The default config shrunk to a model that trains in a second or two."""
  c = default_config.get_config()
  c.num_steps = 12
  c.seq_len = 16
  c.batch_size = 8
  c.model.update(num_layers=1, d_model=32, d_ff=64, num_heads=2)
  c.synthetic.update(train_tokens=20000, val_tokens=2000, lag=4)
  c.eval_every, c.log_every, c.checkpoint_every, c.eval_stride = 6, 2, 4, 0
  c.warmup_steps = 2
  for key, value in overrides.items():
    target = c
    *path, last = key.split(".")
    for p in path:
      target = target[p]
    target[last] = value
  return c


def tiny_dataset(config):
  return data_lib.load("synthetic", seed=config.seed, synthetic_config=config.synthetic)
