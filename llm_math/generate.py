"""Autoregressive generation, with and without a key/value cache, and sequence log-likelihoods.

Chain rule: a language model defines p(s_1 .. s_n | s_0) = prod_t p(s_t | s_<t), so generation
draws s_t from (a truncated, tempered version of) p(. | s_<t) one token at a time, and the
log-likelihood of a sequence is the sum of its per-token conditional log-probabilities
(`token_logprobs`).

Context rule (both paths, identical by construction). The model sees at most W = max_len tokens. The
token s_n (0-based index in prompt + generated tokens) is predicted from the window s[c(n) : n] with

    c(n) = 0                                   while n <= W,
    c(n) = step * floor((n - keep) / step)     after that,      step = W + 1 - keep,

i.e. the window grows to W tokens; when one more token would not fit, it is cut to its last `keep`
tokens (default W // 2) and grows again. Positions restart at 0 inside each window. The cached
path appends one token per step to the cache and, when the window is cut, re-prefills a fresh cache
with the `keep` tokens it kept; the uncached path recomputes the full forward pass over the same
window at every step. Both draw new token j with the key `jax.random.fold_in(key, j)`, so for the
same key they produce the same tokens (up to float rounding that would have to flip a sampling
decision), and a longer generation extends a shorter one with the same key.

Cost per generated token: the cached path runs a 1-token forward pass (attending to <= W cached
keys), the uncached path a forward pass over the W-token (padded) window: about W times the matmul
FLOPs. Where per-call overhead dominates (small models on a CPU) the measured speed-up is smaller.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llm_math.analysis import information
from llm_math import model as model_lib
from llm_math.analysis import sampling


class Generation(NamedTuple):
  """What `generate` returns; every array is `[B, N]` for B prompts and N new tokens."""
  tokens: jax.Array  # int32, the generated tokens (the prompt is not repeated).
  logprob: jax.Array  # log q_t(s_t), q_t the tempered, truncated conditional s_t was drawn from.
  entropy: jax.Array  # H(q_t) in nats: entropy of the distribution each token was drawn from.


def context_keep(max_len: int, keep: int | None = None) -> int:
  """Tokens kept when the window is cut: `keep` in [1, max_len], default max(1, max_len // 2)."""
  keep = max(1, max_len // 2) if keep is None else keep
  if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or not 1 <= keep <= max_len:
    raise ValueError(f"keep must be an integer in [1, max_len={max_len}], got {keep!r}")
  return int(keep)


def context_start(n, max_len: int, keep: int):
  """c(n): token n is predicted from s[c(n) : n] (module docstring). Python ints or arrays."""
  step = max_len + 1 - keep
  if isinstance(n, (int, np.integer)):
    return step * max(0, (int(n) - keep) // step)
  return step * jnp.maximum(0, (n - keep) // step)


def _check_sampling(temperature, top_k, top_p) -> None:
  if not isinstance(temperature, (int, float)) or temperature < 0:
    raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                            or top_k < 1):
    raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
  if top_p is not None and (not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
    raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p!r}")


def _draw(key, logits_BxV, temperature, top_k, top_p):
  """One token per row from q = sampling_distribution(logits): -> (s, log q(s), H(q)), each [B]."""
  token_B = sampling.sample(key, logits_BxV, temperature, top_k, top_p)
  q_BxV = sampling.sampling_distribution(logits_BxV, temperature, top_k, top_p)
  q_B = jnp.take_along_axis(q_BxV, token_B[:, None], axis=-1)[:, 0]
  return token_B, jnp.log(q_B), information.entropy(q_BxV)


def _zero_cache(decoder: model_lib.Transformer, batch: int):
  """An empty key/value cache (index 0) for `batch` rows, built from shapes only."""
  shapes = jax.eval_shape(decoder.init, jax.random.PRNGKey(0), jnp.zeros((batch, 1), jnp.int32))
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def _positions(batch: int, start, length: int):
  return jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32)[None, :], (batch, length))


@functools.partial(jax.jit, static_argnames=(
    "model_config", "max_new_tokens", "temperature", "top_k", "top_p", "use_cache", "keep"))
def _generate(params, prompt_BxP, key, *, model_config, max_new_tokens, temperature, top_k, top_p,
              use_cache, keep):
  w = model_config.max_len
  b, p = prompt_BxP.shape
  n_new = max_new_tokens
  # Prompt and generated tokens, padded by W so that every window slice stays in bounds.
  buffer_BxS = jnp.zeros((b, p + n_new + w), jnp.int32).at[:, :p].set(prompt_BxP)
  keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(n_new))
  draw = functools.partial(_draw, temperature=temperature, top_k=top_k, top_p=top_p)
  start = functools.partial(context_start, max_len=w, keep=keep)
  write = lambda buf, token_B, n: jax.lax.dynamic_update_slice(buf, token_B[:, None], (0, n))

  if use_cache:
    decoder = model_lib.Transformer(dataclasses.replace(model_config, decode=True))
    empty = _zero_cache(decoder, b)

    def prefill(window_BxL):
      logits_BxLxV, state = decoder.apply(
          {"params": params, "cache": empty}, window_BxL,
          positions_BxT=_positions(b, 0, window_BxL.shape[1]), mutable=["cache"])
      return logits_BxLxV[:, -1], state["cache"]

    def append(cache, token_B, position):
      logits_Bx1xV, state = decoder.apply(
          {"params": params, "cache": cache}, token_B[:, None],
          positions_BxT=_positions(b, position, 1), mutable=["cache"])
      return logits_Bx1xV[:, 0], state["cache"]

    def step(carry, xs):
      buf, cache, logits_BxV = carry
      j, step_key = xs
      n = p + j  # the index of the token drawn now
      token_B, logprob_B, entropy_B = draw(step_key, logits_BxV)
      buf = write(buf, token_B, n)
      c_now, c_next = start(n), start(n + 1)
      logits_BxV, cache = jax.lax.cond(
          c_next == c_now,
          lambda: append(cache, token_B, n - c_now),
          lambda: prefill(jax.lax.dynamic_slice(buf, (0, n + 1 - keep), (b, keep))))
      return (buf, cache, logits_BxV), (token_B, logprob_B, entropy_B)

    logits_BxV, cache = prefill(prompt_BxP[:, start(p):])
    (_, _, logits_BxV), outs = jax.lax.scan(
        step, (buffer_BxS, cache, logits_BxV), (jnp.arange(n_new - 1), keys[:-1]))
    last = draw(keys[-1], logits_BxV)
    tokens_NxB, logprob_NxB, entropy_NxB = (
        jnp.concatenate([o, l[None]], axis=0) for o, l in zip(outs, last))
  else:
    model = model_lib.Transformer(dataclasses.replace(model_config, decode=False))

    def step(buf, xs):
      j, step_key = xs
      n = p + j
      c = start(n)
      # The padded window s[c : c + W]; causal attention makes the tokens after n - 1 irrelevant.
      logits_BxWxV = model.apply({"params": params}, jax.lax.dynamic_slice(buf, (0, c), (b, w)))
      logits_BxV = jax.lax.dynamic_index_in_dim(logits_BxWxV, n - 1 - c, axis=1, keepdims=False)
      token_B, logprob_B, entropy_B = draw(step_key, logits_BxV)
      return write(buf, token_B, n), (token_B, logprob_B, entropy_B)

    _, (tokens_NxB, logprob_NxB, entropy_NxB) = jax.lax.scan(
        step, buffer_BxS, (jnp.arange(n_new), keys))
  return Generation(tokens_NxB.T, logprob_NxB.T, entropy_NxB.T)


def generate(params, model_config: model_lib.ModelConfig, prompt_BxP, max_new_tokens: int,
             key: jax.Array, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, use_cache: bool = True,
             keep: int | None = None) -> Generation:
  """Draws `max_new_tokens` tokens after each prompt row; jitted (one compilation per setting).

  Args:
    params: the model's parameters (`{'params': ...}` contents, as `load_trained` gives them).
    model_config: the model's config; the decode switch is set here, the rest must match `params`.
    prompt_BxP: int token ids `[B, P]`, P >= 1 (rows are independent samples).
    max_new_tokens: N >= 1.
    key: PRNG key; new token j is drawn with `jax.random.fold_in(key, j)` (rows are independent).
    temperature, top_k, top_p: the sampling pipeline of `llm_math.analysis.sampling` (0 = greedy).
    use_cache: True: prefill + one-token cached steps; False: recompute every window in full.
    keep: tokens kept when the window is cut (module docstring); default max_len // 2.

  Returns:
    Generation(tokens, logprob, entropy), each `[B, N]`.
  """
  if not model_config.causal:
    raise ValueError("model_config.causal must be True: a bidirectional model cannot generate")
  prompt_BxP = np.asarray(prompt_BxP)
  if prompt_BxP.ndim != 2 or prompt_BxP.shape[1] < 1 or prompt_BxP.shape[0] < 1:
    raise ValueError(
        f"prompt must be token ids [B, P] with B, P >= 1, got shape {prompt_BxP.shape}")
  if not np.issubdtype(prompt_BxP.dtype, np.integer) or prompt_BxP.min() < 0 or (
      prompt_BxP.max() >= model_config.vocab_size):
    raise ValueError(f"prompt must hold integer ids in [0, {model_config.vocab_size})")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or (
      max_new_tokens < 1):
    raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
  _check_sampling(temperature, top_k, top_p)
  return _generate(
      params, jnp.asarray(prompt_BxP, jnp.int32), key,
      model_config=dataclasses.replace(model_config, decode=False, dropout_rate=0.0),
      max_new_tokens=int(max_new_tokens), temperature=float(temperature),
      top_k=None if top_k is None else int(top_k), top_p=None if top_p is None else float(top_p),
      use_cache=bool(use_cache), keep=context_keep(model_config.max_len, keep))


@functools.partial(jax.jit, static_argnames=("model_config",))
def _token_logprobs(params, tokens_BxL, temperature, *, model_config):
  model = model_lib.Transformer(model_config)
  logits_BxTxV = model.apply({"params": params}, tokens_BxL[:, :-1]) / temperature
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  return jnp.take_along_axis(logp_BxTxV, tokens_BxL[:, 1:, None], axis=-1)[..., 0]


def token_logprobs(params, model_config: model_lib.ModelConfig, tokens_BxL,
                   temperature: float = 1.0) -> jax.Array:
  """log p_T(s_t | s_<t) for t = 1 .. L-1 by teacher forcing, `[B, L-1]`; p_T = softmax(logits / T).

  Their sum over t is log p(s_1 .. s_{L-1} | s_0) (the chain rule). Needs 2 <= L <= max_len + 1.
  """
  tokens_BxL = np.asarray(tokens_BxL)
  if tokens_BxL.ndim != 2 or not 2 <= tokens_BxL.shape[1] <= model_config.max_len + 1:
    raise ValueError(f"tokens must be [B, L] with 2 <= L <= max_len + 1 = "
                     f"{model_config.max_len + 1}, got shape {tokens_BxL.shape}")
  if not isinstance(temperature, (int, float)) or temperature <= 0:
    raise ValueError(f"temperature must be a positive number, got {temperature!r}")
  return _token_logprobs(params, jnp.asarray(tokens_BxL, jnp.int32), float(temperature),
                         model_config=dataclasses.replace(model_config, decode=False,
                                                          dropout_rate=0.0))
