"""Default config of experiments/stability.py: learning-rate sweeps of small Transformers with and
without qk-layernorm and z-loss (Wortsman et al. 2023), on the embedded synthetic source.

Every run is the perplexity recipe (AdamW, warmup then cosine decay, weight decay 0.1, gradient
clipping 1.0) with the model size, learning rate, stability options and seed of its point of the
grid; each has its own workdir under runs/ and resumes. Per-layer statistics are logged every
`log_every` steps (attention entropy and max logit per block, output log Z). Defaults: 2 sizes x 6
learning rates x 3 variants x 2 seeds = 72 runs of 200 steps (both fixes together:
--config.stability.variants="('baseline','qk_norm','z_loss','qk_norm+z_loss')").
"""
import ml_collections

from experiments.configs import perplexity


def get_config() -> ml_collections.ConfigDict:
  c = perplexity.get_config()
  for unused in ("ngram", "train_transformer", "model_sizes", "tokenizers", "eval_every",
                 "eval_sample_every"):
    del c[unused]
  c.num_steps = 200
  c.warmup_steps = 20
  c.batch_size = 16
  c.log_every = 10
  c.checkpoint_every = 200
  c.eval_max_tokens = 8192  # Each run's final validation NLL: 8192 tokens, stride 32 of 64.
  c.layer_stats = True
  c.max_loss_factor = 3.0  # A loss above 3 ln|V| stops a run as diverged (an outcome, not an error).
  c.stability = ml_collections.ConfigDict(dict(
      sizes="32x2,128x2",  # d_model x layers; d_ff = 4 d_model, heads = d_model / 16
      learning_rates=(3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0),  # peak; min = peak / 10
      variants=("baseline", "qk_norm", "z_loss"),
      z_loss=1e-4,  # PaLM's and Wortsman et al.'s coefficient
      seeds=(0, 1),
  ))
  return c
