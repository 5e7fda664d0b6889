"""Tests for llm_math.analysis.ngram: normalization, add-k closed forms, Kneser-Ney against a dict reference,
windowed scoring, and the tiny shakespeare sanity ordering."""
import collections
import dataclasses
import itertools
import math
import pathlib

import numpy as np
import pytest

from llm_math.analysis import ngram

SHAKESPEARE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def _zipf_stream(rng, vocab_size, length, used=None):
  """A stream with Zipf-like unigram frequencies and some bigram structure, over the first `used` ids."""
  used = used or vocab_size
  probs = 1.0 / np.arange(1, used + 1)
  probs /= probs.sum()
  x = rng.choice(used, size=length, p=probs)
  # Repeat a few short phrases so that higher orders have repeated n-grams.
  phrase = rng.choice(used, size=4)
  for start in rng.choice(length - 4, size=length // 20, replace=False):
    x[start:start + 4] = phrase
  return x.astype(np.int64)


def _contexts(rng, train, vocab_size, order, count):
  """Left-padded contexts: seen ones from the stream, random (mostly unseen), shorter and empty ones."""
  width = max(order - 1, 1) + 1
  rows = []
  for _ in range(count):
    length = int(rng.integers(0, width + 1))
    if rng.random() < 0.5 and train.size > length:
      start = int(rng.integers(0, train.size - length + 1))
      toks = train[start:start + length]
    else:
      toks = rng.integers(0, vocab_size, size=length)
    rows.append(np.concatenate([np.full(width - length, -1), toks]))
  return np.array(rows, np.int64)


# ----------------------------------------------------------------- slow, obviously-correct references


def _ref_discounts(counts):
  """Modified KN discounts with the documented fallbacks, in plain Python."""
  n = [sum(1 for c in counts if c == r) for r in (1, 2, 3, 4)]
  y = n[0] / (n[0] + 2 * n[1]) if n[0] > 0 else 0.5
  out = []
  for r in (1, 2, 3):
    d = r - (r + 1) * y * n[r] / n[r - 1] if n[r - 1] > 0 else y
    out.append(min(max(d, ngram.MIN_DISCOUNT), r))
  return out


def _ref_kn(train, vocab_size, order):
  """Returns prob(context_tuple, w) for interpolated modified Kneser-Ney, built from dicts."""
  train = [int(t) for t in train]
  raw = {m: collections.Counter(tuple(train[t - m + 1:t + 1]) for t in range(m - 1, len(train)))
         for m in range(1, order + 1)}
  counts = {order: raw[order]}
  for m in range(1, order):
    cont = collections.Counter()
    for gram in raw[m + 1]:
      cont[gram[1:]] += 1  # one per distinct left extension
    counts[m] = cont
  disc = {m: _ref_discounts(list(counts[m].values())) for m in counts}
  totals = {m: collections.Counter() for m in counts}
  mass = {m: collections.Counter() for m in counts}
  for m, table in counts.items():
    for gram, c in table.items():
      totals[m][gram[:-1]] += c
      mass[m][gram[:-1]] += disc[m][min(c, 3) - 1]

  def prob_m(m, h, w):
    if m == 0:
      return 1.0 / vocab_size
    h = h[len(h) - (m - 1):] if m > 1 else ()
    total = totals[m][h]
    if total == 0:
      return prob_m(m - 1, h, w)
    c = counts[m][h + (w,)]
    own = max(c - disc[m][min(c, 3) - 1], 0.0) / total if c > 0 else 0.0
    return own + mass[m][h] / total * prob_m(m - 1, h, w)

  def prob(context, w):
    context = tuple(int(t) for t in context)
    m = min(len(context), order - 1) + 1
    return prob_m(m, context, w)

  return prob, disc


def _ref_add_k(train, vocab_size, order, k):
  """Returns prob(context_tuple, w) = (c(h,w) + k) / (c(h) + kV) at order min(len(context), n-1) + 1."""
  train = [int(t) for t in train]
  grams = collections.Counter()
  ctxs = collections.Counter()
  for m in range(1, order + 1):
    for t in range(m - 1, len(train)):
      grams[tuple(train[t - m + 1:t + 1])] += 1
      ctxs[tuple(train[t - m + 1:t])] += 1

  def prob(context, w):
    context = tuple(int(t) for t in context)
    m = min(len(context), order - 1) + 1
    h = context[len(context) - (m - 1):] if m > 1 else ()
    return (grams[h + (w,)] + k) / (ctxs[h] + k * vocab_size)

  return prob


def _unpad(row):
  return tuple(int(t) for t in row if t >= 0)


# ----------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("method", [ngram.KNESER_NEY, ngram.ADD_K])
@pytest.mark.parametrize("order", [1, 2, 3, 5])
@pytest.mark.parametrize("vocab_size,used,length", [(7, 5, 60), (40, 30, 800)])
def test_distribution_normalized_and_positive(method, order, vocab_size, used, length):
  rng = np.random.default_rng(order * 100 + vocab_size)
  train = _zipf_stream(rng, vocab_size, length, used)
  model = ngram.fit(train, vocab_size, order, method, k=0.3)
  ctx = _contexts(rng, train, vocab_size, order, 64)
  p = ngram.conditional_distribution(model, ctx)
  assert p.shape == (64, vocab_size)
  np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=0, atol=1e-12)
  assert np.all(p > 0)
  # Tokens never seen in training (ids >= used) are unseen contexts too.
  unseen = np.full((3, max(order - 1, 1)), vocab_size - 1)
  np.testing.assert_allclose(ngram.conditional_distribution(model, unseen).sum(axis=1), 1.0, atol=1e-12)


def test_add_k_closed_forms_by_hand():
  # Stream a b a b c over V = 4 (token 3 never occurs), k = 1/2.
  train = np.array([0, 1, 0, 1, 2])
  bigram = ngram.fit(train, 4, 2, ngram.ADD_K, k=0.5)
  p = ngram.conditional_distribution(bigram, np.array([[0], [1], [2], [3]]))
  # c(a.) = 2: c(a b) = 2.  c(b.) = 2: c(b a) = 1, c(b c) = 1.  c, d never precede a token.
  np.testing.assert_allclose(p[0], [0.5 / 4, 2.5 / 4, 0.5 / 4, 0.5 / 4])
  np.testing.assert_allclose(p[1], [1.5 / 4, 0.5 / 4, 1.5 / 4, 0.5 / 4])
  np.testing.assert_allclose(p[2], [0.25] * 4)
  np.testing.assert_allclose(p[3], [0.25] * 4)
  # The unigram level (first token of a stream, or an empty context): (c(w) + k) / (5 + 4k).
  unigram = [2.5 / 7, 2.5 / 7, 1.5 / 7, 0.5 / 7]
  np.testing.assert_allclose(ngram.conditional_distribution(bigram, np.array([[-1]]))[0], unigram)
  order1 = ngram.fit(train, 4, 1, ngram.ADD_K, k=0.5)
  np.testing.assert_allclose(ngram.conditional_distribution(order1, np.array([[2]]))[0], unigram)
  # Stream scoring: token 0 from the unigram, then bigrams.
  nll = ngram.score(bigram, np.array([0, 1, 3, 1]))
  np.testing.assert_allclose(nll, -np.log([2.5 / 7, 2.5 / 4, 0.5 / 4, 0.25]))


@pytest.mark.parametrize("method", [ngram.KNESER_NEY, ngram.ADD_K])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_dict_reference(method, order, seed):
  rng = np.random.default_rng(seed)
  vocab_size = 9
  train = _zipf_stream(rng, vocab_size, 300, used=7)
  model = ngram.fit(train, vocab_size, order, method, k=0.7)
  if method == ngram.KNESER_NEY:
    ref, disc = _ref_kn(train, vocab_size, order)
    for m in range(1, order + 1):
      np.testing.assert_allclose(model.discounts[m - 1], disc[m], rtol=1e-12)
  else:
    ref = _ref_add_k(train, vocab_size, order, 0.7)
  # Every context of length <= order - 1 over a 4-token sub-alphabet, plus random ones.
  rows = [(-1,) * (order - 1 - L) + c for L in range(order) for c in itertools.product(range(4), repeat=L)]
  width = max(order - 1, 1)
  ctx = np.array([(-1,) * (width - len(r)) + r for r in rows], np.int64).reshape(-1, width)
  ctx = np.concatenate([ctx, _contexts(rng, train, vocab_size, order, 40)[:, -width:]])
  got = ngram.conditional_distribution(model, ctx)
  want = np.array([[ref(_unpad(row), w) for w in range(vocab_size)] for row in ctx])
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
  # Stream scoring against the reference, full context.
  stream = _zipf_stream(rng, vocab_size, 50)
  want_nll = [-math.log(ref(tuple(stream[max(0, i - order + 1):i]), int(stream[i]))) for i in range(50)]
  np.testing.assert_allclose(ngram.score(model, stream), want_nll, rtol=1e-12)


def test_kn_context_seen_only_at_stream_start_backs_off():
  # Token 8 occurs only at position 0: as a bigram context it has continuation count 0 (no left
  # extension), so P_2(. | 8) must fall back entirely to the unigram continuation distribution.
  train = np.array([8, 3] + [0, 1, 2, 1] * 6 + [3, 0])
  ref, _ = _ref_kn(train, 9, 3)
  model = ngram.fit(train, 9, 3, ngram.KNESER_NEY)
  ctx = np.array([[-1, 8], [4, 8], [-1, -1], [8, 3], [2, 1]])
  want = np.array([[ref(_unpad(row), w) for w in range(9)] for row in ctx])
  got = ngram.conditional_distribution(model, ctx)
  np.testing.assert_allclose(got, want, rtol=1e-12)
  np.testing.assert_allclose(got[0], got[2], rtol=1e-12)
  np.testing.assert_allclose(got[1], got[2], rtol=1e-12)


def test_kn_discounts_formula_and_degenerate_cases():
  counts = np.array([1] * 50 + [2] * 20 + [3] * 10 + [4] * 6 + [9] * 3 + [0] * 7)
  y = 50 / (50 + 40)
  want = [1 - 2 * y * 20 / 50, 2 - 3 * y * 10 / 20, 3 - 4 * y * 6 / 10]
  np.testing.assert_allclose(ngram.kn_discounts(counts), want)
  np.testing.assert_allclose(want[0], y)  # D1 = Y identically.
  # All singletons: Y = 1, D1 = 1; n2 = n3 = 0 fall back to Y.
  np.testing.assert_allclose(ngram.kn_discounts(np.ones(5, int)), [1.0, 1.0, 1.0])
  # No singletons: Y = 1/2; D2 = 2 - 1.5 * n3/n2 < 0 -> clipped to MIN_DISCOUNT; D3+ = 3 - 0 (n4 = 0).
  np.testing.assert_allclose(ngram.kn_discounts(np.array([2, 3, 3, 3, 3])),
                             [0.5, ngram.MIN_DISCOUNT, 3.0])
  # No count 3 at all: D3+ falls back to Y.
  np.testing.assert_allclose(ngram.kn_discounts(np.array([1, 1, 2, 5])), [0.5, 2 - 1.5 * 0 / 1, 0.5])
  assert np.all(ngram.kn_discounts(np.array([], int)) > 0)


def test_kn_real_discounts_are_unclamped_on_a_larger_corpus():
  rng = np.random.default_rng(3)
  train = _zipf_stream(rng, 20, 3000)
  model = ngram.fit(train, 20, 3, ngram.KNESER_NEY)
  for d in model.discounts[1:]:
    assert np.all(d > ngram.MIN_DISCOUNT) and np.all(d < [1, 2, 3])


@pytest.mark.parametrize("method", [ngram.KNESER_NEY, ngram.ADD_K])
@pytest.mark.parametrize("order,window", [(3, 5), (4, 2), (5, 7), (2, 1)])
def test_window_context_is_reset(method, order, window):
  rng = np.random.default_rng(order + window)
  vocab_size = 12
  train = _zipf_stream(rng, vocab_size, 500)
  model = ngram.fit(train, vocab_size, order, method, k=0.2)
  stream = _zipf_stream(rng, vocab_size, 40)
  nll = ngram.score(model, stream, window=window)
  lengths = ngram.context_lengths(stream.size, order, window)
  np.testing.assert_array_equal(lengths, np.minimum(np.arange(40) % window, order - 1))
  # Each token scored from exactly min(j, order - 1) context tokens of its own window.
  width = max(order - 1, 1)
  ctx = np.full((40, width), -1)
  for i, n in enumerate(lengths):
    if n:
      ctx[i, width - n:] = stream[i - n:i]
  p = ngram.conditional_distribution(model, ctx)
  np.testing.assert_allclose(nll, -np.log(p[np.arange(40), stream]), rtol=1e-12)
  # Same as scoring each window as its own stream.
  pieces = [ngram.score(model, stream[s:s + window]) for s in range(0, 40, window)]
  np.testing.assert_allclose(nll, np.concatenate(pieces), rtol=1e-12)
  # A window at least as long as the stream is the full-context mode; short windows lose context.
  np.testing.assert_allclose(ngram.score(model, stream, window=40), ngram.score(model, stream))
  if order > 1 and window < 40:
    assert not np.allclose(nll, ngram.score(model, stream))


def test_bad_arguments_raise():
  train = np.array([0, 1, 2, 1])
  with pytest.raises(ValueError, match="order"):
    ngram.fit(train, 3, 0)
  with pytest.raises(ValueError, match="method"):
    ngram.fit(train, 3, 2, "witten_bell")
  with pytest.raises(ValueError, match="k must"):
    ngram.fit(train, 3, 2, ngram.ADD_K, k=0.0)
  with pytest.raises(ValueError, match="train_ids"):
    ngram.fit(train, 2, 2)
  with pytest.raises(ValueError, match="train_ids"):
    ngram.fit(train.astype(float), 3, 2)
  with pytest.raises(ValueError, match="vocab_size"):
    ngram.fit(train, 0, 2)
  model = ngram.fit(train, 3, 2)
  with pytest.raises(ValueError, match="window"):
    ngram.score(model, train, window=0)
  with pytest.raises(ValueError, match="ids"):
    ngram.score(model, np.array([3]))
  with pytest.raises(ValueError, match="padding"):
    ngram.conditional_distribution(model, np.array([[1, -1]]))


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="tiny shakespeare corpus not available")
def test_tiny_shakespeare_orders():
  codes = np.frombuffer(SHAKESPEARE.read_bytes(), np.uint8)  # ASCII: one byte per character
  chars, ids = np.unique(codes, return_inverse=True)
  assert chars.size == 65
  split = int(0.9 * ids.size)  # 1,003,854 train / 111,540 validation characters
  train, val = ids[:split], ids[split:]
  nll = {}
  for method, order in [(ngram.KNESER_NEY, 2), (ngram.KNESER_NEY, 5), (ngram.ADD_K, 4), (ngram.ADD_K, 8)]:
    model = ngram.fit(train, len(chars), order, method, k=0.1)
    nll[method, order] = ngram.score(model, val).mean()
  assert nll[ngram.KNESER_NEY, 5] < nll[ngram.KNESER_NEY, 2] - 0.5
  assert nll[ngram.ADD_K, 8] > nll[ngram.ADD_K, 4] + 0.5  # add-k overfits long contexts
  assert nll[ngram.KNESER_NEY, 5] < nll[ngram.ADD_K, 4]
  assert 1.3 < nll[ngram.KNESER_NEY, 5] < 1.8  # well below uniform ln 65 = 4.17 nats


@pytest.mark.parametrize("method", [ngram.KNESER_NEY, ngram.ADD_K])
def test_score_at_matches_score_and_eval_windows(method):
  """score_at on a Transformer's evaluation windows == score of each window as its own stream."""
  from llm_math import data as data_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  train = rng.integers(0, 7, 3000)
  val = rng.integers(0, 7, 301)
  model = ngram.fit(train, 7, 4, method)
  np.testing.assert_allclose(
      ngram.score_at(model, val, np.arange(301), ngram.context_lengths(301, 4)),
      ngram.score(model, val))
  w = data_lib.eval_windows(val, 16)
  scored = w.weights_NxT > 0
  nll = ngram.score_at(model, val, w.positions_NxT[scored], w.context_NxT[scored])
  # Window n: inputs val[s:s+16], targets val[s+1:s+17]: score the 17 tokens, drop the first.
  expected = []
  for n, start in enumerate(w.positions_NxT[:, 0] - 1):
    window_nll = ngram.score(model, val[start:start + 17])[1:]
    expected.append(window_nll[scored[n]])
  np.testing.assert_allclose(nll, np.concatenate(expected))


# ------------------------------------------------------------------ counting in bounded chunks


def _whole_stream_counts(x, vocab_size, order):
  """(context_keys, ngram_keys, counts) counted over the whole stream at once: np.unique over the int64
  keys of every token, with the context id of every token held in memory (the unchunked reference)."""
  n_tok = x.size
  ctx_id = np.zeros(n_tok, np.int64)
  context_keys, ngram_keys, counts = [np.zeros(1, np.int64)], [], []
  for m in range(1, order + 1):
    uniq, cnt = (np.unique(ctx_id[m - 1:] * vocab_size + x[m - 1:], return_counts=True)
                 if n_tok >= m else (np.zeros(0, np.int64), np.zeros(0, np.int64)))
    ngram_keys.append(uniq)
    counts.append(cnt.astype(np.int64))
    if m == order:
      break
    next_id = np.full(n_tok, -1, np.int64)
    uniq = np.zeros(0, np.int64)
    if n_tok > m:
      uniq, inv = np.unique(ctx_id[m:] * vocab_size + x[:-m], return_inverse=True)
      next_id[m:] = inv.reshape(-1)
    context_keys.append(uniq)
    ctx_id = next_id
  return ngram.NgramCounts(vocab_size, order, n_tok, tuple(context_keys), tuple(ngram_keys),
                           tuple(counts))


def _assert_identical(a, b):
  """Every field equal, arrays bit for bit and of the same dtype."""
  assert type(a) is type(b)
  for field in dataclasses.fields(a):
    x, y = getattr(a, field.name), getattr(b, field.name)
    if isinstance(x, tuple):
      assert len(x) == len(y), field.name
      for p, q in zip(x, y):
        assert p.dtype == q.dtype and p.shape == q.shape and np.array_equal(p, q), field.name
    else:
      assert x == y, field.name


@pytest.mark.parametrize("dense_keys", [0, ngram.DENSE_KEYS])  # merged sorted arrays; np.bincount
def test_chunked_counts_equal_whole_stream_counts(dense_keys, monkeypatch):
  """Counting 7 .. 1000 tokens at a time (many chunks, boundaries overlapping by the order) gives the
  whole-stream counts and, for every order and both methods, bit-identical models."""
  monkeypatch.setattr(ngram, "DENSE_KEYS", dense_keys)
  rng = np.random.default_rng(4)
  train = _zipf_stream(rng, 11, 3001, used=9)
  whole = _whole_stream_counts(train, 11, 6)
  for chunk_tokens in (7, 64, 1000, 10**6):
    counts = ngram.count(train, 11, 6, chunk_tokens=chunk_tokens)
    _assert_identical(counts, whole)
    for order in range(1, 7):
      for method in ngram.METHODS:
        _assert_identical(ngram.fit(train, 11, order, method, k=0.3, chunk_tokens=chunk_tokens),
                          ngram.smooth(_whole_stream_counts(train, 11, order), order, method, k=0.3))
        _assert_identical(ngram.smooth(counts, order, method, k=0.3),
                          ngram.fit(train, 11, order, method, k=0.3))
  for n in (1, 2, 5):  # Streams shorter than the order, and chunks of one token.
    _assert_identical(ngram.count(train[:n], 11, 4, chunk_tokens=1),
                      _whole_stream_counts(train[:n], 11, 4))


def test_memory_mapped_stream_counts_and_scores_like_an_array(tmp_path):
  rng = np.random.default_rng(5)
  train, val = _zipf_stream(rng, 300, 5000), rng.integers(0, 300, 400)
  for name, ids in (("train.bin", train), ("val.bin", val)):
    ids.astype(np.uint16).tofile(tmp_path / name)
  train_map = np.memmap(tmp_path / "train.bin", np.uint16, mode="r")
  val_map = np.memmap(tmp_path / "val.bin", np.uint16, mode="r")
  model = ngram.fit(train_map, 300, 3, chunk_tokens=999)
  _assert_identical(model, ngram.fit(train, 300, 3))
  np.testing.assert_array_equal(ngram.score(model, val_map), ngram.score(model, val))
  np.testing.assert_array_equal(train_map, train)  # Still readable after its pages were released.


def test_unigram_counts_and_token_counts():
  rng = np.random.default_rng(6)
  train = rng.integers(0, 5, 777)
  train[train == 3] = 4  # An id that never occurs.
  counts_V = np.bincount(train, minlength=6)
  np.testing.assert_array_equal(ngram.token_counts(train, 6, chunk_tokens=50), counts_V)
  _assert_identical(ngram.unigram_counts(counts_V), ngram.count(train, 6, 1))
  _assert_identical(ngram.smooth(ngram.unigram_counts(counts_V), 1, ngram.ADD_K, k=1.0),
                    ngram.fit(train, 6, 1, ngram.ADD_K, k=1.0))
  with pytest.raises(ValueError, match="counts_V"):
    ngram.unigram_counts(counts_V, vocab_size=7)
  with pytest.raises(ValueError, match="ids"):
    ngram.token_counts(train, 4)


def test_counting_arguments_raise():
  train = np.array([0, 1, 2, 1, 0])
  counts = ngram.count(train, 3, 2)
  with pytest.raises(ValueError, match="exceeds the order"):
    ngram.smooth(counts, 3)
  with pytest.raises(ValueError, match="chunk_tokens"):
    ngram.count(train, 3, 2, chunk_tokens=0)
  with pytest.raises(ValueError, match=r"train_ids must lie in \[0, vocab_size=3\), got \[0, 5\]"):
    ngram.count(np.array([0, 1, 2, 5, 1]), 3, 2, chunk_tokens=2)
