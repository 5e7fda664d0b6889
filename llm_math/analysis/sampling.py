"""Decoding: greedy, temperature, top-k and top-p (nucleus) sampling from logits `[..., V]`.

The pipeline, in the usual order: divide the logits by the temperature T, keep the top-k tokens,
then keep the smallest set of the remaining tokens whose probability (after renormalization) sums
to at least p. Removed tokens get logit -inf, so `softmax` of the filtered logits is the truncated,
renormalized distribution actually sampled from (`sampling_distribution`). T = 0 means greedy.

Ties are broken deterministically by token index: among equal logits the lower index ranks first
(as `jnp.argmax` does), so top-k keeps exactly k tokens and top-p a nucleus that is minimal in
size even when probabilities tie at its edge.

jit: every function is jit-compatible. `top_k=None` / `top_p=None` (filter off) must be static
Python `None`; numeric `temperature`, `top_k` and `top_p` may be Python numbers (validated, raising
`ValueError`) or traced scalars (not validated), so one compiled sampler serves all settings;
they are scalars shared by every row.
Filtering sorts the vocabulary once, O(V log V) per row.
"""
import jax
import jax.numpy as jnp


def greedy(logits_BxV: jax.Array) -> jax.Array:
  """argmax over the vocabulary (lowest index among ties), int32 `[...]`."""
  return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)


def apply_temperature(logits_BxV: jax.Array, temperature: float | jax.Array) -> jax.Array:
  """logits / T for T > 0: T < 1 sharpens, T > 1 flattens the softmax."""
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise ValueError(f"temperature must be positive here, got {temperature}")
  return logits_BxV / temperature


def _descending_ranks(logits_BxV: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(order, ranks): order[..., r] is the token of rank r (0 = largest logit, ties by index),
  ranks[..., i] the rank of token i."""
  order_BxV = jnp.argsort(-logits_BxV, axis=-1, stable=True)
  ranks_BxV = jnp.argsort(order_BxV, axis=-1, stable=True)
  return order_BxV, ranks_BxV


def _check_top_k(top_k) -> None:
  if isinstance(top_k, (bool, float)) or (isinstance(top_k, int) and top_k < 1):
    raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")


def _check_top_p(top_p) -> None:
  if isinstance(top_p, (int, float)) and not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p}")


def top_k_mask(logits_BxV: jax.Array, k: int | jax.Array) -> jax.Array:
  """Bool `[..., V]`: True on the k largest logits (exactly min(k, V) tokens, ties by index)."""
  _check_top_k(k)
  _, ranks_BxV = _descending_ranks(logits_BxV)
  return ranks_BxV < k


def top_p_mask(logits_BxV: jax.Array, p: float | jax.Array) -> jax.Array:
  """Bool `[..., V]`: the nucleus, the smallest top-ranked set with probability >= p.

  With probabilities sorted in decreasing order, token of rank r is kept iff the mass of the
  tokens ranked above it is < p. The top token is always kept; p = 1 keeps every token.
  """
  _check_top_p(p)
  order_BxV, ranks_BxV = _descending_ranks(logits_BxV)
  sorted_probs_BxV = jax.nn.softmax(jnp.take_along_axis(logits_BxV, order_BxV, axis=-1), axis=-1)
  cumulative_BxV = jnp.cumsum(sorted_probs_BxV, axis=-1)
  mass_above_BxV = jnp.concatenate(
      [jnp.zeros_like(cumulative_BxV[..., :1]), cumulative_BxV[..., :-1]], axis=-1)
  keep_sorted_BxV = (mass_above_BxV < p) | (jnp.asarray(p) >= 1.0)
  return jnp.take_along_axis(keep_sorted_BxV, ranks_BxV, axis=-1)


def top_k_filter(logits_BxV: jax.Array, k: int | jax.Array) -> jax.Array:
  """Logits with everything outside the top k set to -inf."""
  return jnp.where(top_k_mask(logits_BxV, k), logits_BxV, -jnp.inf)


def top_p_filter(logits_BxV: jax.Array, p: float | jax.Array) -> jax.Array:
  """Logits with everything outside the nucleus of mass p set to -inf."""
  return jnp.where(top_p_mask(logits_BxV, p), logits_BxV, -jnp.inf)


def filter_logits(logits_BxV: jax.Array, temperature: float | jax.Array = 1.0,
                  top_k: int | jax.Array | None = None,
                  top_p: float | jax.Array | None = None) -> jax.Array:
  """Temperature, then top-k, then top-p; returns the logits that are sampled from (T > 0)."""
  logits_BxV = apply_temperature(logits_BxV, temperature)
  if top_k is not None:
    logits_BxV = top_k_filter(logits_BxV, top_k)
  if top_p is not None:
    logits_BxV = top_p_filter(logits_BxV, top_p)
  return logits_BxV


def _check_temperature(temperature) -> None:
  if isinstance(temperature, (int, float)) and temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")


def sampling_distribution(logits_BxV: jax.Array, temperature: float | jax.Array = 1.0,
                          top_k: int | jax.Array | None = None,
                          top_p: float | jax.Array | None = None) -> jax.Array:
  """The truncated, renormalized distribution `sample` draws from, `[..., V]`.

  softmax(filter_logits(logits / T)); for T = 0 the one-hot of the greedy token.
  """
  _check_temperature(temperature)
  v = logits_BxV.shape[-1]
  one_hot_BxV = jax.nn.one_hot(greedy(logits_BxV), v, dtype=logits_BxV.dtype)
  if isinstance(temperature, (int, float)):
    if temperature == 0:
      return one_hot_BxV
    return jax.nn.softmax(filter_logits(logits_BxV, temperature, top_k, top_p), axis=-1)
  positive = temperature > 0
  safe_t = jnp.where(positive, temperature, 1.0)
  probs_BxV = jax.nn.softmax(filter_logits(logits_BxV, safe_t, top_k, top_p), axis=-1)
  return jnp.where(positive, probs_BxV, one_hot_BxV)


def sample(key: jax.Array, logits_BxV: jax.Array, temperature: float | jax.Array = 1.0,
           top_k: int | jax.Array | None = None,
           top_p: float | jax.Array | None = None) -> jax.Array:
  """Draw one token per row, int32 `[...]`: categorical over `filter_logits`, greedy at T = 0.

  Uses `jax.random.categorical` (Gumbel-max) on the filtered logits, so with no effective
  truncation (T = 1, top_k >= V, top_p = 1) it returns exactly the tokens of
  `jax.random.categorical(key, logits)` for the same key.
  """
  _check_temperature(temperature)
  if isinstance(temperature, (int, float)):
    if temperature == 0:
      return greedy(logits_BxV)
    filtered_BxV = filter_logits(logits_BxV, temperature, top_k, top_p)
    return jax.random.categorical(key, filtered_BxV, axis=-1).astype(jnp.int32)
  positive = temperature > 0
  safe_t = jnp.where(positive, temperature, 1.0)
  filtered_BxV = filter_logits(logits_BxV, safe_t, top_k, top_p)
  drawn = jax.random.categorical(key, filtered_BxV, axis=-1).astype(jnp.int32)
  return jnp.where(positive, drawn, greedy(logits_BxV))
