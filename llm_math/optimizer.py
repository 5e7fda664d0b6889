"""The optimizer of every run: global-norm clipping, then AdamW (optax) on a learning-rate schedule.

Schedules (TrainConfig.schedule):
- 'cosine': linear warmup from 0 to learning_rate over warmup_steps, then cosine decay to
  min_learning_rate at num_steps.
- 'wsd' (warmup-stable-decay): the same warmup, learning_rate held constant, then a linear decay to
  min_learning_rate over the last decay_fraction of num_steps. Until its decay starts, a WSD run is
  the same whatever its num_steps: a longer run's checkpoint from the stable phase is where a shorter
  budget's cool-down starts (`stable_steps`).
"""

import jax
import optax

from llm_math import train_config as train_config_lib


def stable_steps(tc: train_config_lib.TrainConfig) -> int:
  """The step where a 'wsd' schedule starts to decay (num_steps for 'cosine': it never holds)."""
  if tc.schedule != "wsd":
    return tc.num_steps
  return tc.num_steps - round(tc.decay_fraction * tc.num_steps)


def learning_rate_schedule(config) -> optax.Schedule:
  """step -> learning rate of `config` (a TrainConfig or an experiment config)."""
  tc = train_config_lib.train_config(config)
  if tc.schedule == "wsd":
    decay_start = stable_steps(tc)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, tc.learning_rate, tc.warmup_steps),
         optax.constant_schedule(tc.learning_rate),
         optax.linear_schedule(tc.learning_rate, tc.min_learning_rate,
                               tc.num_steps - decay_start)],
        boundaries=[tc.warmup_steps, decay_start])
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=tc.learning_rate, warmup_steps=tc.warmup_steps,
      decay_steps=max(tc.num_steps, tc.warmup_steps + 1), end_value=tc.min_learning_rate)


def optimizer(config) -> optax.GradientTransformation:
  """Global-norm clipping (grad_clip > 0), then AdamW with weight decay on matrices only (ndim >= 2)."""
  tc = train_config_lib.train_config(config)
  decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(tc.grad_clip) if tc.grad_clip else optax.identity(),
      optax.adamw(learning_rate_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps,
                  weight_decay=tc.weight_decay, mask=decay_mask))
