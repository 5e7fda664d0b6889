"""Knowledge distillation loss (Hinton et al. 2015) for next-token logits.

Per token, with temperature T, p = softmax(t / T) (teacher), q = softmax(s / T) (student):

  loss = alpha * T^2 * KL(p || q) + (1 - alpha) * CE(label, softmax(s)),

averaged over tokens (optionally weighted by a mask). The soft term's gradient is
d KL(p || q) / d s = (q - p) / T; as T grows, q - p ~ ((s - mean s) - (t - mean t)) / (T V), so the
gradient falls like 1/T^2 and the T^2 factor keeps it on the scale of the hard term for any T.
The teacher logits are treated as constants (no gradient flows into them).

`distillation_objective` is the training objective of {"student": params, "teacher": params} (the
teacher's logits computed inside the loss from its frozen parameters) as (total, count), and
`paired_summary` compares students trained from the same initialization and batches.
"""
from collections.abc import Callable, Sequence
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from llm_math.analysis import compression
from llm_math.analysis import information


def soft_kl(student_logits_NxV: jax.Array, teacher_logits_NxV: jax.Array,
            temperature: float = 1.0) -> jax.Array:
  """KL(softmax(t/T) || softmax(s/T)) per token, in nats: shape [...] for logits [..., V]."""
  _check_temperature(temperature)
  _check_same_shape(student_logits_NxV, teacher_logits_NxV)
  return _soft_kl(student_logits_NxV, teacher_logits_NxV, temperature)


@jax.jit
def _soft_kl(student_logits_NxV, teacher_logits_NxV, temperature):
  log_p = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits_NxV) / temperature, axis=-1)
  log_q = jax.nn.log_softmax(student_logits_NxV / temperature, axis=-1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def cross_entropy(logits_NxV: jax.Array, labels_N: jax.Array) -> jax.Array:
  """-log softmax(logits)[label] per token: shape [...] for logits [..., V], int labels [...]."""
  if labels_N.shape != logits_NxV.shape[:-1]:
    raise ValueError(f"labels: expected shape {logits_NxV.shape[:-1]}, got {labels_N.shape}")
  return _cross_entropy(logits_NxV, labels_N)


@jax.jit
def _cross_entropy(logits_NxV, labels_N):
  log_q = jax.nn.log_softmax(logits_NxV, axis=-1)
  return -jnp.take_along_axis(log_q, labels_N[..., None].astype(jnp.int32), axis=-1)[..., 0]


def distillation_sums(student_logits_NxV: jax.Array, teacher_logits_NxV: jax.Array,
                      labels_N: jax.Array, temperature: float = 2.0, alpha: float = 0.5,
                      weights_N: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(sum of w * [alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(labels, s)], sum of w).

  Logits [..., V], labels and optional weights [...] (default 1: every token counts); sums over
  batches add up, so their ratio is the mean over all tokens however the batch is split.
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha: expected a mixing weight in [0, 1], got {alpha}")
  per_token = (alpha * temperature**2 * soft_kl(student_logits_NxV, teacher_logits_NxV, temperature)
               + (1.0 - alpha) * cross_entropy(student_logits_NxV, labels_N))
  if weights_N is None:
    weights_N = jnp.ones_like(per_token)
  if weights_N.shape != per_token.shape:
    raise ValueError(f"weights: expected shape {per_token.shape}, got {weights_N.shape}")
  weights_N = weights_N.astype(per_token.dtype)
  return jnp.sum(weights_N * per_token), jnp.sum(weights_N)


def distillation_loss(student_logits_NxV: jax.Array, teacher_logits_NxV: jax.Array,
                      labels_N: jax.Array, temperature: float = 2.0, alpha: float = 0.5,
                      weights_N: jax.Array | None = None) -> jax.Array:
  """alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(labels, s), mean over tokens.

  With weights the mean is sum(w * loss) / sum(w) (a 0/1 mask averages over the kept tokens).
  Returns a scalar.
  """
  total, count = distillation_sums(student_logits_NxV, teacher_logits_NxV, labels_N, temperature,
                                   alpha, weights_N)
  return total / jnp.maximum(count, 1e-12)


def distillation_objective(student_apply: Callable, teacher_apply: Callable, temperature: float,
                           alpha: float) -> Callable:
  """loss(params, (inputs_BxT, targets_BxT[, weights_BxT]), rng) -> `distillation_sums`, for
  params = {"student": ..., "teacher": ...} of two flax language models (apply functions).

  The teacher's logits come from stop_gradient(params["teacher"]) in deterministic mode, inside the
  loss, so a frozen teacher travels (and shards) with the student; the student runs with dropout
  drawn from `rng`.
  """
  _check_temperature(temperature)

  def loss(params, batch, rng):
    inputs_BxT, targets_BxT = batch[:2]
    teacher_BxTxV = teacher_apply({"params": jax.lax.stop_gradient(params["teacher"])},
                                  inputs_BxT, deterministic=True)
    student_BxTxV = student_apply({"params": params["student"]}, inputs_BxT, deterministic=False,
                                  rngs={"dropout": rng})
    return distillation_sums(student_BxTxV, teacher_BxTxV, targets_BxT, temperature, alpha,
                             batch[2] if len(batch) > 2 else None)

  return loss


def distillation_task(task, teacher_init: Callable, student_apply: Callable,
                      teacher_apply: Callable, temperature: float, alpha: float):
  """`task` (the student's train.Task) as distillation from a frozen teacher: params
  {"student": task.init(rng), "teacher": teacher_init(rng)}, `distillation_objective` as the loss,
  and the task's optimizer on the student only (`compression.train_only`). The student starts
  where `task` would, so a distilled and a plain student of one seed share their initialization."""
  init = lambda rng: {"student": task.init(rng), "teacher": teacher_init(rng)}
  return dataclasses.replace(
      task, init=init, tx=compression.train_only(task.tx, "student"),
      loss=distillation_objective(student_apply, teacher_apply, temperature, alpha))


def paired_summary(runs: Sequence[dict], baseline: str) -> dict[str, dict]:
  """Per run name: its final validation NLL over seeds, and its difference to the `baseline` run
  (the student trained from scratch) paired by seed, i.e. with the same initialization and batches.

  `runs` are {"name", "seed", "alpha", "temperature", "val_nll", "curve": [(step, nll)]}, every name
  with the baseline's seeds and evaluation steps. A summary has alpha, temperature,
  val_nll_per_seed, val_nll_mean/min/max, val_ppl_mean (at the mean NLL), minus_scratch_per_seed,
  minus_scratch_mean, seeds_better_than_scratch (seeds with a lower NLL than the baseline), and
  the curves' steps and curve_mean/min/max over seeds.
  """
  by_name = {}
  for run in runs:
    by_name.setdefault(run["name"], {})[run["seed"]] = run
  if baseline not in by_name:
    raise ValueError(f"baseline: no run named {baseline!r}; names are {list(by_name)}")
  seeds = sorted(by_name[baseline])
  summary = {}
  for name, mine in by_name.items():
    if sorted(mine) != seeds:
      raise ValueError(f"runs: {name!r} has seeds {sorted(mine)}, the baseline {seeds}")
    finals = np.array([mine[s]["val_nll"] for s in seeds])
    curves = np.array([[v for _, v in mine[s]["curve"]] for s in seeds])
    diff = finals - np.array([by_name[baseline][s]["val_nll"] for s in seeds])
    first = mine[seeds[0]]
    summary[name] = {"alpha": first["alpha"], "temperature": first["temperature"],
                     "val_nll_per_seed": finals.tolist(), "val_nll_mean": float(finals.mean()),
                     "val_nll_min": float(finals.min()), "val_nll_max": float(finals.max()),
                     "val_ppl_mean": information.perplexity(float(finals.mean())),
                     "minus_scratch_per_seed": diff.tolist(),
                     "minus_scratch_mean": float(diff.mean()),
                     "seeds_better_than_scratch": int(np.sum(diff < 0)),
                     "steps": [s for s, _ in first["curve"]],
                     "curve_mean": curves.mean(0).tolist(), "curve_min": curves.min(0).tolist(),
                     "curve_max": curves.max(0).tolist()}
  return summary


def _check_temperature(temperature: float) -> None:
  if not temperature > 0:
    raise ValueError(f"temperature: expected a positive value, got {temperature}")


def _check_same_shape(student: jax.Array, teacher: jax.Array) -> None:
  if student.shape != teacher.shape:
    raise ValueError(
        f"teacher_logits: expected the student's shape {student.shape}, got {teacher.shape}")
