"""Named model/batch shapes of the throughput benchmarks, shared by the JAX and PyTorch ones.

JAX- and torch-free, so either benchmark imports it without the other's framework.
"""

from typing import NamedTuple


class Shape(NamedTuple):
  layers: int
  d_model: int
  heads: int
  context: int
  batch: int
  vocab: int


SHAPES = {
    # nanoGPT's CPU recipe (config/train_shakespeare_char.py at its README's CPU settings).
    "nanogpt_cpu": Shape(layers=4, d_model=128, heads=4, context=64, batch=12, vocab=65),
    "gpt2_small": Shape(layers=12, d_model=768, heads=12, context=1024, batch=12, vocab=50304),
    "gpt2_small_b32": Shape(layers=12, d_model=768, heads=12, context=1024, batch=32, vocab=50304),
    # experiments/configs/english_pd.py: SentencePiece 8K on 2 CPU cores.
    "english_pd": Shape(layers=4, d_model=192, heads=4, context=128, batch=16, vocab=8000),
    "synthetic_default": Shape(layers=2, d_model=64, heads=4, context=64, batch=32, vocab=32),
}
