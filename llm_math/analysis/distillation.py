"""Knowledge distillation loss (Hinton et al. 2015) for next-token logits.

Per token, with temperature T, p = softmax(t / T) (teacher), q = softmax(s / T) (student):

  loss = alpha * T^2 * KL(p || q) + (1 - alpha) * CE(label, softmax(s)),

averaged over tokens (optionally weighted by a mask). The soft term's gradient is
d KL(p || q) / d s = (q - p) / T; as T grows, q - p ~ ((s - mean s) - (t - mean t)) / (T V), so the
gradient falls like 1/T^2 and the T^2 factor keeps it on the scale of the hard term for any T.
The teacher logits are treated as constants (no gradient flows into them).
"""
import jax
import jax.numpy as jnp


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


def distillation_loss(
    student_logits_NxV: jax.Array,
    teacher_logits_NxV: jax.Array,
    labels_N: jax.Array,
    temperature: float = 2.0,
    alpha: float = 0.5,
    weights_N: jax.Array | None = None,
) -> jax.Array:
  """alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(labels, s), mean over tokens.

  Logits [..., V], labels and optional weights [...]; with weights the mean is
  sum(w * loss) / sum(w) (a 0/1 mask averages over the kept tokens). Returns a scalar.
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha: expected a mixing weight in [0, 1], got {alpha}")
  per_token = (alpha * temperature**2 * soft_kl(student_logits_NxV, teacher_logits_NxV, temperature)
               + (1.0 - alpha) * cross_entropy(student_logits_NxV, labels_N))
  if weights_N is None:
    return jnp.mean(per_token)
  if weights_N.shape != per_token.shape:
    raise ValueError(f"weights: expected shape {per_token.shape}, got {weights_N.shape}")
  weights_N = weights_N.astype(per_token.dtype)
  return jnp.sum(weights_N * per_token) / jnp.maximum(jnp.sum(weights_N), 1e-12)


def _check_temperature(temperature: float) -> None:
  if not temperature > 0:
    raise ValueError(f"temperature: expected a positive value, got {temperature}")


def _check_same_shape(student: jax.Array, teacher: jax.Array) -> None:
  if student.shape != teacher.shape:
    raise ValueError(
        f"teacher_logits: expected the student's shape {student.shape}, got {teacher.shape}")
