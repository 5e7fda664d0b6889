"""Default config of experiments/batch_size.py: a batch-size sweep of a few minutes on 2 CPU cores.

A 1-layer Transformer (d_model 64, context 32) on the lagged-copy source with lag 8: it learns to copy
within a few hundred steps and then approaches the floor, where gradient noise dominates and larger
batches pay off. The same config runs on tiny shakespeare (--data=text:../shared/data/tinyshakespeare.txt):
the target loss comes from a pilot run, so nothing here is specific to one corpus.

Optimizer: Adam (the `optimizer` of llm_math.train with weight decay and clipping off) at a constant
learning rate after a short warmup, so steps-to-target depend on B and the learning rate only.

Every run of the sweep is a run of llm_math.train.fit with a config derived from this one (batch_size
= B, its learning rate, grad_accum_steps = the noise micro-batches); the fields of the sweep itself
(batch_sizes, lr_*, pilot_steps, ...) are not part of a run's config, so a sweep extended with more
batch sizes or learning rates reuses the runs it already made.
"""
import ml_collections

from experiments.configs import perplexity


def get_config() -> ml_collections.ConfigDict:
  c = perplexity.get_config()
  # Fields of the perplexity config that a sweep has no use for: the batch size and its accumulation
  # come from batch_sizes and noise_microbatches, evaluation steps from eval_growth.
  for field in ("batch_size", "grad_accum_steps", "min_learning_rate", "eval_every", "log_every",
                "ngram", "train_transformer", "model_sizes", "tokenizers"):
    del c[field]
  c.model.update(num_layers=1, num_heads=4, d_model=64, d_ff=256, pos_encoding="learned")
  c.seq_len = 32
  c.synthetic.update(lag=8)

  # The sweep: batch sizes B (sequences per step), powers of two.
  c.batch_sizes = (2, 4, 8, 16, 32, 64, 128, 256)

  # Learning rate per B. The rule lr(B) = learning_rate * (B / lr_reference_batch)^a with a = 1 ('linear'),
  # 1/2 ('sqrt') or 0 ('constant'); 'tune' searches powers of lr_tune_factor around the sqrt rule and
  # keeps the learning rate that reaches the target in the fewest steps (Shallue et al. 2018), widening
  # the search (up to lr_max_extend more values per side) while the best is at its edge.
  c.lr_rule = "tune"
  c.learning_rate = 2e-3
  c.lr_reference_batch = 16
  c.lr_tune_factor = 2.0
  c.lr_max_extend = 2
  c.warmup_steps = 10
  c.grad_clip = 0.0  # Clipping at a fixed norm would act more on small (noisier) batches.
  c.weight_decay = 0.0

  # The target validation loss. 0 = from the pilot: the smallest B at its rule learning rate trains for
  # pilot_steps steps; the target is the lowest 3-evaluation running mean of its validation loss plus
  # target_margin. Steps-to-target fall with B, so every larger B can reach it within num_steps.
  c.target_loss = 0.0
  c.pilot_steps = 3000
  c.target_margin = 0.01
  c.num_steps = 6000  # Step cap of every run; a run also stops once it cannot beat the best lr at its B.

  # Evaluation: validation loss on the first eval_max_tokens validation tokens (independent windows,
  # one batch of eval_batch_size) at steps growing geometrically by eval_growth (1, 2, ..., then +5%);
  # steps-to-target interpolate linearly between the two evaluations around the first crossing.
  c.eval_max_tokens = 8192
  c.eval_stride = 0
  c.eval_batch_size = 256
  c.eval_growth = 1.05
  c.checkpoint_every = 1000
  c.keep_checkpoints = 1

  # Noise scale during training: each batch is split into noise_microbatches micro-batches
  # (grad_accum_steps of the run: B_small = B / M, B_big = B); numerator and denominator are averaged
  # over steps.
  c.noise_microbatches = 8

  # Gradient variance vs B at a fixed checkpoint (the best run at checkpoint_batch): for each
  # B = 1, 2, ..., max(batch_sizes), fresh_batches independent mini-batches of fresh training windows
  # (their sample variance estimates E|g_B - G|^2); tr(Sigma) for the prediction tr(Sigma)/B from the
  # per-example gradients of num_examples other windows, which are also re-drawn num_batches times
  # per B to show the finite-population law.
  c.gradient_variance = ml_collections.ConfigDict(dict(
      checkpoint_batch=16, fresh_batches=64, num_examples=512, num_batches=256))

  # Sharpness of each B's solution on a fixed batch of training windows: top Hessian eigenvalue by
  # Lanczos, and Keskar et al.'s epsilon-sharpness (box radius epsilon (|w| + 1), projected ascent).
  c.sharpness = ml_collections.ConfigDict(dict(
      batch=64, lanczos_steps=20, epsilon=1e-3, ascent_steps=10))
  return c
