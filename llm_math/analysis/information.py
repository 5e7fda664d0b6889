"""Information theory of language models: units and identities.

Conventions: natural logarithms (nats) unless a name says bits; `nll` is a mean negative
log-likelihood per token in nats. Distribution functions take probabilities `p_...xV` or logits
`logits_...xV` and reduce over `axis` (default: the last, the vocabulary), returning an array with
that axis removed. Terms with p = 0 contribute 0 (the convention 0 log 0 = 0); a q = 0 where p > 0
gives an infinite cross-entropy / KL, as it should. Inputs are assumed to be normalized
distributions; nothing here checks that (the functions stay jit-compatible).

Gradients are finite wherever the value is: each log is taken of a safe argument (1 in place of the
0 of a 0 log 0 term), so no 0 * inf reaches the backward pass. They are exact wherever the function
is differentiable (d/dp_i H(p, q) = -log q_i also at p_i = 0 < q_i); a 0 log 0 term, whose one-sided
derivative in p is -inf, contributes 0 to the gradient (so d/dp_i H(p) = -(log p_i + 1) for p_i > 0
and 0 for p_i = 0).

Identities (tested): H(p, q) = H(p) + KL(p || q); KL(p || q) >= 0 with equality iff p = q;
I(X; Y) = H(X) + H(Y) - H(X, Y) >= 0 with equality iff p(x, y) = p(x) p(y); H(uniform_n) = log n.
"""
import math

import jax
import jax.numpy as jnp

LN2 = math.log(2.0)


def perplexity(nll_nats: float) -> float:
  """PPL = exp(mean NLL in nats); inf (not an OverflowError) past float64's range, NaN for NaN."""
  return math.exp(nll_nats) if nll_nats < 709.0 or math.isnan(nll_nats) else math.inf


def nats_to_bits(nats: float) -> float:
  """1 nat = 1/ln 2 bits. Works elementwise on arrays too."""
  return nats / LN2


def bits_to_nats(bits: float) -> float:
  """1 bit = ln 2 nats. Works elementwise on arrays too."""
  return bits * LN2


def bits_per_char(nll_nats_per_token: float, tokens: int, chars: int) -> float:
  """Bits per character from a per-token NLL: total bits over the characters those tokens cover.

  BPC = (NLL_token / ln 2) * tokens / chars, a tokenizer-independent unit.
  """
  if chars <= 0:
    raise ValueError(f"chars must be a positive count, got {chars}")
  if tokens < 0:
    raise ValueError(f"tokens must be a non-negative count, got {tokens}")
  return nats_to_bits(nll_nats_per_token) * tokens / chars


def bits_per_byte(nll_nats_per_token: float, tokens: int, num_bytes: int) -> float:
  """Bits per UTF-8 byte of the scored text: BPB = (NLL_token / ln 2) * tokens / bytes, the figure
  compared across tokenizers and across scripts (a character may be 1-4 bytes)."""
  if num_bytes <= 0:
    raise ValueError(f"num_bytes must be a positive count, got {num_bytes}")
  return bits_per_char(nll_nats_per_token, tokens, num_bytes)


def _check_same_shape(name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
  if jnp.shape(a) != jnp.shape(b):
    raise ValueError(
        f"{name_a} and {name_b} must have the same shape, got {jnp.shape(a)} and {jnp.shape(b)}")


def _plogq(p: jax.Array, q: jax.Array) -> jax.Array:
  """Elementwise p * log q from probabilities, with 0 log 0 = 0 and finite gradients there.

  The double-where trick: the log is taken of q with 1 in place of the q = 0 of 0 log 0 terms, so
  neither the value nor the backward pass meets log 0 there (a where on log's output still sends
  0 * inf = NaN back through log). Where p = 0 < q the term is 0 * log q with its exact gradient
  (log q in p, 0 in q); where p > 0 = q it is -inf, as it should be.
  """
  zero_log_zero = (p == 0) & (q == 0)
  return p * jnp.log(jnp.where(zero_log_zero, 1.0, q))


def _plogq_from_log(p: jax.Array, log_q: jax.Array) -> jax.Array:
  """Elementwise p * log q from log q (e.g. log_softmax, which is -inf at -inf logits).

  The same convention as `_plogq`: a p = 0 term with log q = -inf is 0, and the where is on the
  argument of the product so its gradient is 0 rather than 0 * inf = NaN.
  """
  zero_log_zero = (p == 0) & jnp.isneginf(log_q)
  return p * jnp.where(zero_log_zero, 0.0, log_q)


def entropy(p: jax.Array, axis: int = -1) -> jax.Array:
  """Shannon entropy H(p) = -sum_i p_i log p_i in nats, reduced over `axis`."""
  p = jnp.asarray(p)
  return -jnp.sum(_plogq(p, p), axis=axis)


def entropy_from_logits(logits: jax.Array, axis: int = -1) -> jax.Array:
  """H(softmax(logits)) in nats, computed stably from log_softmax; -inf logits are allowed."""
  log_p = jax.nn.log_softmax(logits, axis=axis)
  return -jnp.sum(_plogq_from_log(jnp.exp(log_p), log_p), axis=axis)


def cross_entropy(p: jax.Array, q: jax.Array, axis: int = -1) -> jax.Array:
  """H(p, q) = -sum_i p_i log q_i in nats: expected code length under q for data from p."""
  _check_same_shape("p", p, "q", q)
  p, q = jnp.asarray(p), jnp.asarray(q)
  return -jnp.sum(_plogq(p, q), axis=axis)


def cross_entropy_from_logits(p: jax.Array, logits_q: jax.Array, axis: int = -1) -> jax.Array:
  """H(p, softmax(logits_q)) in nats; `p` are target probabilities (soft labels)."""
  _check_same_shape("p", p, "logits_q", logits_q)
  log_q = jax.nn.log_softmax(logits_q, axis=axis)
  return -jnp.sum(_plogq_from_log(jnp.asarray(p), log_q), axis=axis)


def token_nll(logits_NxV: jax.Array, labels_N: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood -log softmax(logits)[label] in nats.

  Args:
    logits_NxV: logits `[..., V]`.
    labels_N: integer targets `[...]` in [0, V).

  Returns:
    NLL `[...]`; its mean is the usual language-model loss, exp(mean) the perplexity.
  """
  logits_NxV = jnp.asarray(logits_NxV)
  labels_N = jnp.asarray(labels_N)
  if labels_N.shape != logits_NxV.shape[:-1]:
    raise ValueError(
        f"labels must have shape logits.shape[:-1]={logits_NxV.shape[:-1]}, got {labels_N.shape}")
  log_p = jax.nn.log_softmax(logits_NxV, axis=-1)
  return -jnp.take_along_axis(log_p, labels_N[..., None], axis=-1)[..., 0]


def kl_divergence(p: jax.Array, q: jax.Array, axis: int = -1) -> jax.Array:
  """KL(p || q) = sum_i p_i log(p_i / q_i) in nats; >= 0 (Gibbs), = 0 iff p = q."""
  _check_same_shape("p", p, "q", q)
  p, q = jnp.asarray(p), jnp.asarray(q)
  return jnp.sum(_plogq(p, p) - _plogq(p, q), axis=axis)


def kl_divergence_from_logits(logits_p: jax.Array, logits_q: jax.Array,
                              axis: int = -1) -> jax.Array:
  """KL(softmax(logits_p) || softmax(logits_q)) in nats, from log_softmax (stable)."""
  _check_same_shape("logits_p", logits_p, "logits_q", logits_q)
  log_p = jax.nn.log_softmax(logits_p, axis=axis)
  log_q = jax.nn.log_softmax(logits_q, axis=axis)
  p = jnp.exp(log_p)
  return jnp.sum(_plogq_from_log(p, log_p) - _plogq_from_log(p, log_q), axis=axis)


def mutual_information(joint_XxY: jax.Array) -> jax.Array:
  """I(X; Y) = sum_xy p(x,y) log[p(x,y) / (p(x) p(y))] = KL(p(x,y) || p(x) p(y)) in nats.

  Args:
    joint_XxY: joint probability table `[X, Y]` summing to 1.

  Returns:
    Scalar I(X; Y) = H(X) + H(Y) - H(X, Y) >= 0, zero iff the table is a product.
  """
  joint_XxY = jnp.asarray(joint_XxY)
  if joint_XxY.ndim != 2:
    raise ValueError(f"joint_XxY must be a 2-D probability table [X, Y], got shape "
                     f"{joint_XxY.shape}")
  p_x = jnp.sum(joint_XxY, axis=1)
  p_y = jnp.sum(joint_XxY, axis=0)
  product_XxY = p_x[:, None] * p_y[None, :]
  return jnp.sum(_plogq(joint_XxY, joint_XxY) - _plogq(joint_XxY, product_XxY))


def entropy_bits(p: jax.Array, axis: int = -1) -> jax.Array:
  """H(p) in bits."""
  return nats_to_bits(entropy(p, axis=axis))


def cross_entropy_bits(p: jax.Array, q: jax.Array, axis: int = -1) -> jax.Array:
  """H(p, q) in bits."""
  return nats_to_bits(cross_entropy(p, q, axis=axis))


def kl_divergence_bits(p: jax.Array, q: jax.Array, axis: int = -1) -> jax.Array:
  """KL(p || q) in bits."""
  return nats_to_bits(kl_divergence(p, q, axis=axis))
