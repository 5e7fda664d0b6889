"""Generation in llm_math.generate: the cache changes nothing, the context rule is exact, and the
chain rule holds on a small trained model (enumerating every sequence of a 3-token vocabulary)."""
import dataclasses
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from llm_math import generate as g
from llm_math import model as model_lib
from llm_math.analysis import sampling
from llm_math import train as train_lib
from llm_math import train_config
from tests import helpers

V, W = 3, 8  # vocabulary, context (max_len)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 1-layer model trained for a few seconds on the lagged-copy source (V=3, lag 2)."""
  config = helpers.tiny_config(**{
      "seq_len": W, "num_steps": 80, "learning_rate": 1e-2, "min_learning_rate": 1e-3,
      "eval_every": 80, "log_every": 80, "checkpoint_every": 80, "eval_max_tokens": 512,
      "synthetic.vocab_size": V, "synthetic.lag": 2, "synthetic.copy_prob": 0.8})
  dataset = helpers.tiny_dataset(config)
  result = train_lib.train(config, dataset, str(tmp_path_factory.mktemp("gen")), log=lambda _: None)
  # Learned something: validation NLL well below the uniform ln 3 = 1.0986.
  assert result.val_curve[-1][1] < 0.9, result.val_curve
  return jax.device_get(result.state.params), train_config.model_config(config, V)


@jax.jit(static_argnames="cfg")
def _last_logits(params, tokens_BxT, cfg):
  return model_lib.Transformer(cfg).apply({"params": params}, tokens_BxT)[:, -1]


def _reference(params, cfg, prompt_BxP, n_new, key, temperature, top_k, top_p, keep):
  """Step by step with the plain model on the exact window s[c(n) : n] of the context rule."""
  keep = g.context_keep(cfg.max_len, keep)
  seq = np.asarray(prompt_BxP)
  for j in range(n_new):
    n = seq.shape[1]
    c = g.context_start(n, cfg.max_len, keep)
    assert 1 <= n - c <= cfg.max_len
    logits_BxV = _last_logits(params, jnp.asarray(seq[:, c:n]), cfg)
    token = sampling.sample(jax.random.fold_in(key, j), logits_BxV, temperature, top_k, top_p)
    seq = np.concatenate([seq, np.asarray(token)[:, None]], axis=1)
  return seq[:, prompt_BxP.shape[1]:]


def test_context_window_grows_to_max_len_then_keeps_its_last_keep_tokens():
  for max_len, keep in [(8, 4), (8, 1), (8, 8), (5, 2), (1, 1)]:
    starts = [g.context_start(n, max_len, keep) for n in range(1, 60)]
    for n, c in enumerate(starts, start=1):
      assert 1 <= n - c <= max_len  # every window is non-empty and fits
      assert n - c == n if n <= max_len else n - c >= keep
      # Traced and Python evaluations agree.
      assert int(g.context_start(jnp.asarray(n), max_len, keep)) == c
    for n in range(2, 60):
      prev, cur = starts[n - 2], starts[n - 1]
      # Either the window grows by one token, or it was full and is cut to its last `keep` tokens.
      assert cur == prev or (n - 1 - prev == max_len and n - cur == keep), (max_len, keep, n)


@pytest.mark.parametrize("temperature,top_k,top_p,keep,prompt_len", [
    (0.0, None, None, 3, 1),  # greedy
    (0.7, 2, None, W, 11),  # keep = W: a sliding window (re-prefill every step); prompt > W
    (1.3, None, 0.8, None, 5),  # the default keep = W // 2
])
def test_cached_uncached_and_reference_loop_give_the_same_tokens(trained, temperature, top_k,
                                                                  top_p, keep, prompt_len):
  """30 new tokens cross the W=8 window several times; all three implementations agree."""
  params, cfg = trained
  prompt = np.random.default_rng(prompt_len).integers(0, V, (3, prompt_len))
  key = jax.random.PRNGKey(7)
  kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, keep=keep)
  cached = g.generate(params, cfg, prompt, 30, key, use_cache=True, **kwargs)
  uncached = g.generate(params, cfg, prompt, 30, key, use_cache=False, **kwargs)
  np.testing.assert_array_equal(cached.tokens, uncached.tokens)
  np.testing.assert_allclose(cached.logprob, uncached.logprob, atol=1e-5)
  np.testing.assert_allclose(cached.entropy, uncached.entropy, atol=1e-5)
  np.testing.assert_array_equal(
      cached.tokens, _reference(params, cfg, prompt, 30, key, temperature, top_k, top_p, keep))
  if temperature == 0:
    np.testing.assert_array_equal(cached.logprob, 0.0)
    np.testing.assert_array_equal(cached.entropy, 0.0)
  else:  # a sampled token is never outside the truncated support; 0 <= H <= log(kept tokens)
    assert np.all(np.isfinite(cached.logprob)) and np.all(cached.logprob <= 0)
    assert np.all(cached.entropy >= -1e-6)
    assert np.all(cached.entropy <= np.log(top_k or V) + 1e-5)
  # Rows are independent draws: with a fresh key the same prompt gives different text.
  if temperature > 0:
    assert not np.array_equal(cached.tokens, g.generate(
        params, cfg, prompt, 30, jax.random.PRNGKey(8), **kwargs).tokens)


def _all_sequences(first: int, length: int) -> np.ndarray:
  """Every sequence of `length` tokens starting with `first`: [V^(length-1), length]."""
  tails = np.array(list(itertools.product(range(V), repeat=length - 1)), np.int32)
  return np.concatenate([np.full((len(tails), 1), first, np.int32), tails], axis=1)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_chain_rule_joint_sums_to_one_and_marginalizes(trained, temperature):
  """p(s_1..s_{L-1} | s_0) = prod_t p(s_t | s_<t) over all 3^(L-1) tails sums to 1 for every s_0,
  and summing out the last tokens gives the product of the first conditionals (no leak from the
  future)."""
  params, cfg = trained
  length = W + 1  # the longest sequence one forward pass scores
  seqs = np.concatenate([_all_sequences(first, length) for first in range(V)])
  logp_NxT = np.asarray(g.token_logprobs(params, cfg, seqs, temperature), np.float64)
  shape = (V,) * length
  joint = np.exp(logp_NxT.sum(-1)).reshape(shape)
  np.testing.assert_allclose(joint.sum(axis=tuple(range(1, length))), 1.0, atol=1e-5)
  for prefix_len in range(length - 1, 1, -1):
    joint = joint.sum(axis=-1)  # marginalize the last token
    # p(s_1..s_{k-1} | s_0) from the chain rule, read off the rows whose later tokens are all 0.
    first_rows = np.exp(logp_NxT[:, :prefix_len - 1].sum(-1)).reshape(shape)[
        (Ellipsis,) + (0,) * (length - prefix_len)]
    np.testing.assert_allclose(joint, first_rows, rtol=2e-4, atol=1e-7)
  # The model is not trivially uniform: the chain-rule joint is far from 3^-(L-1).
  assert np.exp(logp_NxT.sum(-1)).max() > 10 * V ** -(length - 1)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.8, 2, 0.9)])
def test_generated_sequences_follow_the_chain_rule_distribution(trained, temperature, top_k, top_p):
  """20,000 samples of 4 tokens after a fixed first token: their frequencies over the 81 tails match
  prod_t q(s_t | s_<t), q = the truncated sampling distribution (chi-square), and the per-step
  log q that generate reports sums to the same log-probability."""
  params, cfg = trained
  n_samples, first = 20000, 1
  seqs = _all_sequences(first, 5)
  logits_NxTxV = model_lib.Transformer(cfg).apply({"params": params}, jnp.asarray(seqs[:, :-1]))
  q_NxTxV = sampling.sampling_distribution(logits_NxTxV, temperature, top_k, top_p)
  q_NxT = np.take_along_axis(np.asarray(q_NxTxV, np.float64), seqs[:, 1:, None], axis=-1)[..., 0]
  expected_N = q_NxT.prod(-1)
  np.testing.assert_allclose(expected_N.sum(), 1.0, atol=1e-5)

  out = g.generate(params, cfg, np.full((n_samples, 1), first), 4, jax.random.PRNGKey(3),
                   temperature, top_k, top_p)
  index_S = np.ravel_multi_index(np.asarray(out.tokens).T, (V,) * 4)
  counts_N = np.bincount(index_S, minlength=V ** 4)
  support = expected_N > 0
  assert counts_N[~support].sum() == 0  # nothing outside the truncated support is ever drawn
  _, p_value = stats.chisquare(counts_N[support], n_samples * expected_N[support] /
                               expected_N[support].sum())
  assert p_value > 1e-3, p_value
  np.testing.assert_allclose(np.asarray(out.logprob).sum(-1), np.log(expected_N[index_S]),
                             atol=1e-4)


def test_untruncated_generation_logprob_is_the_teacher_forced_log_likelihood(trained):
  """At T=1 without truncation, log q_t(s_t) of a generated sequence = token_logprobs(s); and a
  longer generation with the same key extends the shorter one."""
  params, cfg = trained
  prompt = np.random.default_rng(0).integers(0, V, (4, 2))
  out = g.generate(params, cfg, prompt, W - 1, jax.random.PRNGKey(0))
  full = np.concatenate([prompt, np.asarray(out.tokens)], axis=1)
  teacher = np.asarray(g.token_logprobs(params, cfg, full))[:, prompt.shape[1] - 1:]
  np.testing.assert_allclose(out.logprob, teacher, atol=1e-5)
  longer = g.generate(params, cfg, prompt, 3 * W, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(np.asarray(longer.tokens)[:, :W - 1], out.tokens)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(prompt=[[0, 5]]), "ids in [0, 3)"),
    (dict(prompt=[1, 2]), "prompt must be token ids [B, P]"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(keep=W + 1), "keep"),
])
def test_bad_arguments_raise_value_errors(trained, kwargs, fragment):
  params, cfg = trained
  args = dict(prompt=[[0, 1]], max_new_tokens=4, temperature=1.0, top_k=None, top_p=None, keep=None)
  args.update(kwargs)
  with pytest.raises(ValueError, match=re.escape(fragment)):
    g.generate(params, cfg, args.pop("prompt"), args.pop("max_new_tokens"), jax.random.PRNGKey(0),
               **args)


def test_bidirectional_model_cannot_generate(trained):
  params, cfg = trained
  with pytest.raises(ValueError, match="causal"):
    g.generate(params, dataclasses.replace(cfg, causal=False), [[0]], 2, jax.random.PRNGKey(0))
