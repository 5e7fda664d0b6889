"""Small configs, datasets and parameter trees shared by the tests."""
import os
import random

import jax
import jax.numpy as jnp
import numpy as np

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
    "--config.eval_stride=0", "--config.warmup_steps=2",
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


def x64():
  """Scoped float64 (jax.enable_x64 context manager on recent jax, jax.experimental before)."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # pylint: disable=g-import-not-at-top
  return enable_x64()


# Shapes of `transformer_params`: vocab, context, d_model, heads, head dim, MLP width.
V, T, D, H, DH, F = 11, 8, 16, 2, 8, 32


def transformer_params(seed=0, n_layers=2):
  """A hand-built params tree with the project's Transformer layout (random values)."""
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  ln = lambda: {"scale": jnp.ones((D,)), "bias": jnp.zeros((D,))}
  params = {"token_embed": {"embedding": f(V, D)}, "pos_embed": {"embedding": f(T, D)}}
  for i in range(n_layers):
    params[f"block_{i}"] = {
        "ln_attn": ln(),
        "attn": {
            "query": {"kernel": f(D, H, DH), "bias": f(H, DH)},
            "key": {"kernel": f(D, H, DH), "bias": f(H, DH)},
            "value": {"kernel": f(D, H, DH), "bias": f(H, DH)},
            "out": {"kernel": f(H, DH, D), "bias": f(D)},
        },
        "ln_mlp": ln(),
        "mlp": {"fc_in": {"kernel": f(D, F), "bias": f(F)},
                "fc_out": {"kernel": f(F, D), "bias": f(D)}},
    }
  params["ln_final"] = ln()
  params["lm_head"] = {"kernel": f(D, V)}
  return params


CORPUS_WORDS = ["the", "cat", "sat", "on", "a", "mat", "naïve", "café", "日本", "zebra", "of", "and",
                "\t"]


def write_corpus(path, n_chars: int, seed: int = 0, newline: str = "\n") -> str:
  """A random text of about `n_chars` characters (some lines empty, some non-ASCII); returns it."""
  rng = random.Random(seed)
  lines, n = [], 0
  while n < n_chars:
    line = " ".join(rng.choice(CORPUS_WORDS) for _ in range(rng.randint(0, 12)))
    lines.append(line)
    n += len(line) + 1
  text = newline.join(lines)
  path.write_bytes(text.encode("utf-8"))
  return text
