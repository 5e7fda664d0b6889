"""Count-based n-gram language models over integer token ids (numpy only, vectorized).

Two estimators of P(w | h), h the preceding `order - 1` tokens, V the vocabulary size:

* Add-k (Lidstone), the classic estimator at the highest order:
    P(w | h) = (c(h, w) + k) / (c(h) + k V),
  c(h, w) the count of h followed by w in the training stream and c(h) = sum_w c(h, w) (a context never
  seen gives the uniform 1/V).
* Interpolated modified Kneser-Ney (Chen & Goodman 1998, section 3.5). For m = order, ..., 1, with h_m
  the last m - 1 tokens of h:
    P_m(w | h_m) = max(c_m(h_m, w) - D_m(c_m), 0) / c_m(h_m)  +  gamma_m(h_m) P_{m-1}(w | h_{m-1}),
    gamma_m(h) = (D_m1 N1(h.) + D_m2 N2(h.) + D_m3+ N3+(h.)) / c_m(h),
    P_0(w) = 1 / V,
  where c_m is the raw count at the highest order and the continuation count
  N1+(. h w) = |{v : c(v h w) > 0}| at lower orders, c_m(h) = sum_w c_m(h, w), and N_r(h.) is the number
  of w with c_m(h, w) = r (N3+ : >= 3). A context with c_m(h) = 0 (never seen, or seen only at the very
  start of the stream where no left extension exists) backs off entirely: P_m = P_{m-1}.
  The discounts of each order come from that order's counts of counts n_r = |{(h, w) : c_m(h, w) = r}|:
    Y = n1 / (n1 + 2 n2),  D_r = r - (r + 1) Y n_{r+1} / n_r   (r = 1, 2, 3; D_1 = Y).
  Degenerate counts of counts (small corpora) are handled as: Y = 0.5 when n1 = 0; D_r = Y when n_r = 0;
  and every D_r is clipped into [MIN_DISCOUNT, r], which keeps max(c - D, 0) = c - D >= 0 and gamma > 0
  for every seen context, so every token gets a positive probability.

Both distributions sum to one over the V tokens for every context.

Storage is a reversed context trie: the id of a context (w_{-j}, ..., w_{-1}) of length j is its index in
the sorted array of keys  id(w_{-j+1}, ..., w_{-1}) * V + w_{-j}, so the ids of all suffixes of a context
come out of one chain of `searchsorted` calls, and an n-gram (h, w) is the key  id(h) * V + w.

Counting (`count`) makes one pass over the stream per order m, `chunk_tokens` tokens at a time (each chunk
reads the m tokens before it, so every n-gram is counted once): the chunk's context ids come from the
contexts already found, its keys are counted (np.unique, or np.bincount while the keys are few) and merged
into the sorted (key, count) arrays. Memory is bounded by the distinct n-grams plus one chunk, not by the
length of the stream (a memory-mapped stream's pages are released after each chunk), and the counts are
exactly those of counting the whole stream at once. Time is O(order^2 N log N); scoring is
O(order * T log N), both without Python loops over tokens. `fit` = `smooth(count(...))`; counts of order n
also give every lower order (`smooth(counts, order=m)`), so a table of orders counts once.

Context modes of `score` (positions are 0-based indices into the scored stream, every token is scored):
* window=None: the stream is one sequence; token i is predicted from min(i, order - 1) preceding tokens.
* window=W: the stream is cut into consecutive windows [0, W), [W, 2W), ...; the token at window position
  j = i mod W is predicted from the min(j, order - 1) tokens before it inside its window (the first token
  of a window gets the unigram / no-context distribution). This is what a causal model with context length
  W sees when it scores non-overlapping windows of W targets and predicts the first one from nothing (e.g.
  a BOS token). To mimic the other common convention (inputs x[0:W], targets x[1:W+1], so target j sees
  j + 1 tokens), score windows of W + 1 tokens and drop each window's first position; `context_lengths`
  gives the per-token context sizes for such masks.
A model given fewer than order - 1 context tokens uses its own lower-order distribution: for Kneser-Ney
the interpolated P_{j+1}(w | last j tokens) (continuation counts at its top level), for add-k the add-k
estimator of order j + 1 (raw counts).
"""
import dataclasses
import mmap
from typing import Optional

import numpy as np

KNESER_NEY = "kneser_ney"
ADD_K = "add_k"
METHODS = (KNESER_NEY, ADD_K)
MIN_DISCOUNT = 0.1
CHUNK_TOKENS = 1 << 20  # Tokens `count` reads at a time (under 100 MB of working arrays at order 5).
DENSE_KEYS = 1 << 21  # Key ranges up to this size are counted in a dense array (np.bincount).


@dataclasses.dataclass(frozen=True)
class NgramModel:
  """A fitted n-gram model: P_m(w|h) = alpha_m(h, w) + gamma_m(h) * lower(w), lower = P_{m-1} (KN) or 1/V.

  Attributes:
    vocab_size: V.
    order: n (the model conditions on n - 1 tokens).
    method: "kneser_ney" or "add_k".
    k: the add-k pseudo-count (unused by Kneser-Ney).
    context_keys: [j] sorted int64 keys of the contexts of length j (j = 0..n-1; [0] = [0], the empty one).
    ngram_keys: [m - 1] sorted int64 keys  context_id * V + w  of the m-grams seen (m = 1..n).
    alpha: [m - 1] float64, the discounted own-order mass of each m-gram in ngram_keys[m - 1].
    gamma: [m - 1] float64 per context id of length m - 1, the weight of the lower order (1 if unseen).
    discounts: [m - 1] (D1, D2, D3+) of order m (Kneser-Ney; zeros for add-k).
  """
  vocab_size: int
  order: int
  method: str
  k: float
  context_keys: tuple
  ngram_keys: tuple
  alpha: tuple
  gamma: tuple
  discounts: tuple


def _as_stream(ids, name: str):
  """ids as a 1-D integer array, not copied (a memory map stays one), or raises ValueError."""
  if not hasattr(ids, "dtype"):
    ids = np.asarray(ids)
  if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
    raise ValueError(f"{name} must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
  return ids


def _check_range(ids: np.ndarray, vocab_size: int, name: str):
  """Raises ValueError unless every value of ids lies in [0, vocab_size)."""
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    raise ValueError(f"{name} must lie in [0, vocab_size={vocab_size}), got [{ids.min()}, {ids.max()}]")


def _check_ids(ids, vocab_size: int, name: str) -> np.ndarray:
  """Returns ids as a 1-D int64 array with values in [0, vocab_size), or raises ValueError."""
  ids = np.asarray(_as_stream(ids, name)).astype(np.int64)
  _check_range(ids, vocab_size, name)
  return ids


def _lookup(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
  """Index of each key in sorted_keys, or -1 where absent (negative keys are always absent)."""
  if sorted_keys.size == 0:
    return np.full(keys.shape, -1, np.int64)
  idx = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
  return np.where((sorted_keys[idx] == keys) & (keys >= 0), idx, -1)


def kn_discounts(counts: np.ndarray) -> np.ndarray:
  """Modified Kneser-Ney discounts (D1, D2, D3+) from the positive counts of one order.

  Y = n1/(n1 + 2 n2), D_r = r - (r+1) Y n_{r+1}/n_r; Y = 0.5 if n1 = 0, D_r = Y if n_r = 0, then each D_r
  is clipped into [MIN_DISCOUNT, r].

  Args:
    counts: integer counts c(h, w) of one order (zeros are ignored).

  Returns:
    float64 array (D1, D2, D3+).
  """
  counts = np.asarray(counts)
  n = np.array([np.sum(counts == r) for r in range(1, 5)], np.float64)  # n1..n4
  y = n[0] / (n[0] + 2.0 * n[1]) if n[0] > 0 else 0.5
  d = np.array([r - (r + 1) * y * n[r] / n[r - 1] if n[r - 1] > 0 else y for r in (1, 2, 3)])
  return np.clip(d, MIN_DISCOUNT, np.array([1.0, 2.0, 3.0]))


@dataclasses.dataclass(frozen=True)
class NgramCounts:
  """Raw counts of the n-grams of a stream, orders 1..order (what `smooth` turns into a model).

  Attributes:
    vocab_size: V.
    order: n.
    num_tokens: N, the length of the counted stream.
    context_keys: [j] sorted int64 keys of the contexts of length j (j = 0..n-1), as in NgramModel.
    ngram_keys: [m - 1] sorted int64 keys  context_id * V + w  of the m-grams seen (m = 1..n).
    counts: [m - 1] int64 c(h, w) of each key of ngram_keys[m - 1].
  """
  vocab_size: int
  order: int
  num_tokens: int
  context_keys: tuple
  ngram_keys: tuple
  counts: tuple


def _check_model_args(vocab_size, order, method: str = KNESER_NEY, k: float = 1.0):
  """Raises ValueError for a bad vocab_size, order, method or add-k pseudo-count."""
  if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
    raise ValueError(f"vocab_size must be an integer >= 1, got {vocab_size!r}")
  if not isinstance(order, (int, np.integer)) or order < 1:
    raise ValueError(f"order must be an integer >= 1, got {order!r}")
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if method == ADD_K and not (np.isfinite(k) and k > 0):
    raise ValueError(f"k must be a finite number > 0 for add_k, got {k!r}")


def _release_pages(ids):
  """Hands the resident pages of a memory-mapped `ids` back to the page cache (a no-op otherwise), so a
  pass over a token file on disk keeps one chunk in memory, not the file."""
  advise = getattr(getattr(ids, "_mmap", None), "madvise", None)
  if advise is not None and hasattr(mmap, "MADV_DONTNEED"):
    advise(mmap.MADV_DONTNEED)


def _read(ids, lo: int, hi: int) -> np.ndarray:
  """ids[lo:hi] as a new int64 array; a memory map's pages are released after the copy."""
  out = np.array(ids[lo:hi], dtype=np.int64)
  _release_pages(ids)
  return out


def _chunk_starts(num_tokens: int, chunk_tokens: int) -> range:
  if not isinstance(chunk_tokens, (int, np.integer)) or chunk_tokens < 1:
    raise ValueError(f"chunk_tokens must be an integer >= 1, got {chunk_tokens!r}")
  return range(0, num_tokens, int(chunk_tokens))


def _check_stream(ids, vocab_size: int, name: str, chunk_tokens: int):
  """Returns `ids` (not copied) after checking that it is a 1-D integer array with values in
  [0, vocab_size), chunk by chunk; raises ValueError otherwise."""
  ids = _as_stream(ids, name)
  lo, hi = 0, vocab_size - 1
  for start in _chunk_starts(ids.size, chunk_tokens):
    chunk = _read(ids, start, start + chunk_tokens)
    lo, hi = (int(chunk.min()), int(chunk.max())) if start == 0 else (
        min(lo, int(chunk.min())), max(hi, int(chunk.max())))
  if lo < 0 or hi >= vocab_size:
    raise ValueError(f"{name} must lie in [0, vocab_size={vocab_size}), got [{lo}, {hi}]")
  return ids


def _chunk_keys(context_keys, x, lo: int, hi: int, m: int, vocab_size: int) -> tuple:
  """Order-m keys of the targets t in [lo, hi) of the stream x, from the contexts of lengths < m:

    m-grams:  id(x[t-m+1:t]) * V + x[t]      for t >= m - 1,
    contexts: id(x[t-m+1:t]) * V + x[t - m]  for t >= m (the keys of context_keys[m]).

  Reads x[max(lo - m, 0):hi]: the m tokens before the chunk, so every target is counted once whatever
  the chunk boundaries. Returns (m-gram keys, context keys), int64.
  """
  start = max(lo - m, 0)
  x_L = _read(x, start, hi)
  t_B = np.arange(lo, start + x_L.size)
  token_at = lambda t: x_L[np.maximum(t, 0) - start]  # x[t]; t >= start wherever it is used
  ids_B = np.zeros(t_B.size, np.int64)  # The empty context.
  for j in range(1, m):  # Extend the context one token to the left: x[t - j].
    ids_B = _lookup(context_keys[j], np.where(t_B >= j, ids_B * vocab_size + token_at(t_B - j), -1))
  return ((ids_B * vocab_size + token_at(t_B))[t_B >= m - 1],
          (ids_B * vocab_size + token_at(t_B - m))[t_B >= m])


def _merge_counts(keys_a, counts_a, keys_b, counts_b) -> tuple:
  """The union of two sorted arrays of distinct keys, with the counts of equal keys added."""
  if keys_a.size == 0:
    return keys_b, counts_b
  pos = np.searchsorted(keys_a, keys_b)
  found = keys_a[np.minimum(pos, keys_a.size - 1)] == keys_b
  counts_a = counts_a.copy()
  counts_a[pos[found]] += counts_b[found]
  new = ~found
  return (np.insert(keys_a, pos[new], keys_b[new]), np.insert(counts_a, pos[new], counts_b[new]))


class _KeyCounter:
  """Counts int64 keys in [0, key_range) added chunk by chunk: a dense np.bincount array for small
  ranges, else sorted (key, count) arrays merged per chunk. `result()` equals np.unique(all keys,
  return_counts=True) with int64 counts."""

  def __init__(self, key_range: int):
    self.dense = np.zeros(key_range, np.int64) if key_range <= DENSE_KEYS else None
    self.keys, self.counts = np.zeros(0, np.int64), np.zeros(0, np.int64)

  def add(self, keys: np.ndarray):
    if self.dense is not None:
      self.dense += np.bincount(keys, minlength=self.dense.size)
    elif keys.size:
      uniq, cnt = np.unique(keys, return_counts=True)
      self.keys, self.counts = _merge_counts(self.keys, self.counts, uniq, cnt.astype(np.int64))

  def result(self) -> tuple:
    if self.dense is not None:
      keys = np.flatnonzero(self.dense).astype(np.int64)
      return keys, self.dense[keys]
    return self.keys, self.counts


def count(train_ids, vocab_size: int, order: int, chunk_tokens: int = CHUNK_TOKENS) -> NgramCounts:
  """Counts the n-grams of orders 1..order of `train_ids` (one stream), `chunk_tokens` at a time.

  Args:
    train_ids: int array [N] (a memory map is read chunk by chunk), token ids in [0, vocab_size).
    vocab_size: V >= 1.
    order: n >= 1.
    chunk_tokens: tokens read at a time; the counts do not depend on it, the memory does.

  Returns:
    NgramCounts, the same whatever chunk_tokens.
  """
  _check_model_args(vocab_size, order)
  x = _check_stream(train_ids, vocab_size, "train_ids", chunk_tokens)
  n_tok = x.size
  if n_tok < 1:
    raise ValueError("train_ids must hold at least one token")
  if float(n_tok + 1) * vocab_size >= 2.0**62:
    raise ValueError(f"train_ids length * vocab_size must be < 2**62 for int64 keys, got "
                     f"{n_tok} * {vocab_size}")
  v, order = int(vocab_size), int(order)
  context_keys, ngram_keys, raw_counts = [np.zeros(1, np.int64)], [], []
  for m in range(1, order + 1):
    key_range = context_keys[m - 1].size * v  # Both kinds of key are id(m - 1 tokens) * V + token.
    grams = _KeyCounter(key_range)
    contexts = _KeyCounter(key_range) if m < order else None
    for lo in _chunk_starts(n_tok, chunk_tokens):
      gram_keys, context_keys_m = _chunk_keys(context_keys, x, lo, lo + chunk_tokens, m, v)
      grams.add(gram_keys)
      if contexts is not None:
        contexts.add(context_keys_m)
    keys, counts = grams.result()
    ngram_keys.append(keys)
    raw_counts.append(counts)
    if contexts is not None:
      context_keys.append(contexts.result()[0])
  return NgramCounts(vocab_size=v, order=order, num_tokens=n_tok, context_keys=tuple(context_keys),
                     ngram_keys=tuple(ngram_keys), counts=tuple(raw_counts))


def unigram_counts(counts_V, vocab_size: Optional[int] = None) -> NgramCounts:
  """The order-1 NgramCounts of a stream from its token counts int64[V] (e.g. a token store's
  train.counts.npy): equal to count(stream, V, 1) without reading the stream."""
  counts_V = np.asarray(counts_V)
  vocab_size = counts_V.size if vocab_size is None else vocab_size
  if (counts_V.ndim != 1 or counts_V.size != vocab_size
      or not np.issubdtype(counts_V.dtype, np.integer) or (counts_V.size and counts_V.min() < 0)):
    raise ValueError(f"counts_V must be {vocab_size} non-negative integer counts, got shape "
                     f"{counts_V.shape} dtype {counts_V.dtype}")
  keys = np.flatnonzero(counts_V).astype(np.int64)
  if keys.size == 0:
    raise ValueError("counts_V must count at least one token")
  return NgramCounts(vocab_size=int(vocab_size), order=1, num_tokens=int(counts_V.sum()),
                     context_keys=(np.zeros(1, np.int64),), ngram_keys=(keys,),
                     counts=(counts_V[keys].astype(np.int64),))


def token_counts(ids, vocab_size: int, chunk_tokens: int = CHUNK_TOKENS) -> np.ndarray:
  """int64[V]: how often each id occurs in `ids` (np.bincount, `chunk_tokens` tokens at a time)."""
  x = _check_stream(ids, vocab_size, "ids", chunk_tokens)
  total_V = np.zeros(vocab_size, np.int64)
  for lo in _chunk_starts(x.size, chunk_tokens):
    total_V += np.bincount(_read(x, lo, lo + chunk_tokens), minlength=vocab_size)
  return total_V


def smooth(counts: NgramCounts, order: Optional[int] = None, method: str = KNESER_NEY,
           k: float = 1.0) -> NgramModel:
  """The smoothed model of order `order` (default and at most: counts.order) from raw counts.

  Args:
    counts: NgramCounts of order >= `order`.
    order: n >= 1 (context of n - 1 tokens).
    method: "kneser_ney" (interpolated modified KN) or "add_k".
    k: add-k pseudo-count, > 0.

  Returns:
    NgramModel, the same as fitting order `order` on the counted stream.
  """
  order = counts.order if order is None else order
  _check_model_args(counts.vocab_size, order, method, k)
  if order > counts.order:
    raise ValueError(f"order {order} exceeds the order of the counts ({counts.order})")
  vocab_size, order = counts.vocab_size, int(order)
  context_keys, ngram_keys = counts.context_keys[:order], counts.ngram_keys[:order]
  raw_counts = counts.counts[:order]

  alpha, gamma, discounts = [], [], []
  for m in range(1, order + 1):
    keys = ngram_keys[m - 1]
    n_ctx = context_keys[m - 1].size
    ctx = keys // vocab_size
    if method == ADD_K or m == order:
      counts_m = raw_counts[m - 1]
    else:
      # Continuation counts: each distinct (m+1)-gram (v h w) adds one to the m-gram (h w).
      up = ngram_keys[m]
      parent = context_keys[m][up // vocab_size] // vocab_size
      child = _lookup(keys, parent * vocab_size + up % vocab_size)
      counts_m = np.bincount(child, minlength=keys.size).astype(np.int64)
    total = np.bincount(ctx, weights=counts_m, minlength=n_ctx)
    if method == ADD_K:
      denom = total + k * vocab_size
      alpha.append(counts_m / denom[ctx])
      gamma.append(k * vocab_size / denom)
      discounts.append(np.zeros(3))
      continue
    d = kn_discounts(counts_m)
    d_of = np.concatenate([[0.0], d])[np.minimum(counts_m, 3)]
    seen = total > 0
    safe_total = np.where(seen, total, 1.0)
    alpha.append((counts_m - d_of) / safe_total[ctx])
    mass = np.bincount(ctx, weights=d_of, minlength=n_ctx)  # = D1 N1 + D2 N2 + D3 N3+
    gamma.append(np.where(seen, mass / safe_total, 1.0))
    discounts.append(d)

  return NgramModel(vocab_size=vocab_size, order=order, method=method,
                    k=float(k) if method == ADD_K else 0.0,
                    context_keys=tuple(context_keys), ngram_keys=tuple(ngram_keys),
                    alpha=tuple(alpha), gamma=tuple(gamma), discounts=tuple(discounts))


def fit(train_ids, vocab_size: int, order: int, method: str = KNESER_NEY, k: float = 1.0,
        chunk_tokens: int = CHUNK_TOKENS) -> NgramModel:
  """Counts n-grams of `train_ids` (one stream) and returns the smoothed model.

  Args:
    train_ids: int array [N], token ids in [0, vocab_size) (a memory map is read chunk by chunk).
    vocab_size: V >= 1.
    order: n >= 1 (context of n - 1 tokens).
    method: "kneser_ney" (interpolated modified KN) or "add_k".
    k: add-k pseudo-count, > 0.
    chunk_tokens: tokens counted at a time (see `count`); the model does not depend on it.

  Returns:
    NgramModel.
  """
  _check_model_args(vocab_size, order, method, k)
  return smooth(count(train_ids, vocab_size, order, chunk_tokens), order, method, k)


def _context_chain(model: NgramModel, prev_tokens_CxB: np.ndarray, n_ctx_B: np.ndarray) -> np.ndarray:
  """Context ids of every length: row j is the id of the last j tokens, -1 if unseen or unavailable.

  Args:
    model: fitted model.
    prev_tokens_CxB: row j - 1 holds the token j positions back (j = 1..C), any value where unavailable.
    n_ctx_B: number of usable context tokens of each column, in [0, C].

  Returns:
    int64 [order, B].
  """
  n_b = n_ctx_B.shape[0]
  ids = np.full((model.order, n_b), -1, np.int64)
  ids[0] = 0
  for j in range(1, model.order):
    ok = (n_ctx_B >= j) & (ids[j - 1] >= 0)
    keys = np.where(ok, ids[j - 1] * model.vocab_size + prev_tokens_CxB[j - 1], -1)
    ids[j] = _lookup(model.context_keys[j], keys)
  return ids


def _top_orders(model: NgramModel, n_ctx_B: np.ndarray) -> np.ndarray:
  """The order used for each prediction: min(n_ctx, order - 1) + 1."""
  return np.minimum(n_ctx_B, model.order - 1) + 1


def _target_probs(model: NgramModel, ctx_ids_OxB: np.ndarray, n_ctx_B: np.ndarray,
                  targets_B: np.ndarray) -> np.ndarray:
  """P(target | context) for each column, float64 [B]."""
  v = model.vocab_size
  top = _top_orders(model, n_ctx_B)
  p = np.full(targets_B.shape, 1.0 / v)
  first = 1 if model.method == KNESER_NEY else int(top.min(initial=model.order))
  for m in range(first, model.order + 1):
    use = top >= m if model.method == KNESER_NEY else top == m
    ctx = ctx_ids_OxB[m - 1]
    known = use & (ctx >= 0)
    idx = _lookup(model.ngram_keys[m - 1], np.where(known, ctx * v + targets_B, -1))
    a = np.where(idx >= 0, model.alpha[m - 1][np.maximum(idx, 0)], 0.0)
    g = model.gamma[m - 1][np.maximum(ctx, 0)] if model.gamma[m - 1].size else np.ones_like(p)
    lower = p if model.method == KNESER_NEY else np.full_like(p, 1.0 / v)
    p = np.where(known, a + g * lower, np.where(use, lower, p))
  return p


def context_lengths(num_tokens: int, order: int, window: Optional[int] = None) -> np.ndarray:
  """Number of context tokens `score` gives each of num_tokens positions: min(i or i mod W, order - 1)."""
  if window is not None and (not isinstance(window, (int, np.integer)) or window < 1):
    raise ValueError(f"window must be None or an integer >= 1, got {window!r}")
  pos = np.arange(num_tokens, dtype=np.int64)
  if window is not None:
    pos = pos % window
  return np.minimum(pos, order - 1)


def score(model: NgramModel, ids, window: Optional[int] = None) -> np.ndarray:
  """Per-token negative log-likelihood (nats) of a stream; every token is scored.

  Token i is predicted from the min(c_i, order - 1) tokens before it, c_i = i (window=None) or
  c_i = i mod W (window=W: consecutive windows of W tokens, no context crosses a window boundary).

  Args:
    model: fitted model.
    ids: int array [T] in [0, V).
    window: None or W >= 1.

  Returns:
    float64 [T], -ln P(ids[i] | context_i).
  """
  x = _check_ids(ids, model.vocab_size, "ids")
  return score_at(model, x, np.arange(x.size), context_lengths(x.size, model.order, window))


def score_at(model: NgramModel, stream, positions, context_lengths_) -> np.ndarray:
  """-ln P(stream[i] | the c_i tokens before i) for i in `positions`, c_i = `context_lengths_`.

  The general form of `score`: it scores any set of stream positions, each with the context it is
  allowed (capped at order - 1), e.g. exactly the targets and contexts of a Transformer's evaluation
  windows (`llm_math.data.EvalWindows.positions_NxT` / `context_NxT`). Only the tokens at the
  positions and the order - 1 before each are read (and checked to lie in [0, V)), so the stream may be
  a memory map of any length.
  """
  x = _as_stream(stream, "stream")
  pos = np.asarray(positions, np.int64).reshape(-1)
  ctx = np.asarray(context_lengths_, np.int64).reshape(-1)
  if pos.shape != ctx.shape or (pos.size and (pos.min() < 0 or pos.max() >= x.size)):
    raise ValueError("positions must index the stream and match context_lengths_ in size")
  if pos.size and np.any(ctx > pos):
    raise ValueError("a context length exceeds the number of tokens before its position")
  n_ctx = np.minimum(ctx, model.order - 1)
  prev = np.zeros((max(model.order - 1, 1), pos.size), np.int64)
  for j in range(1, model.order):
    prev[j - 1] = x[np.maximum(pos - j, 0)]
  _check_range(prev, model.vocab_size, "stream")
  targets = _check_ids(x[pos], model.vocab_size, "stream")
  ctx_ids = _context_chain(model, prev, n_ctx)
  return -np.log(_target_probs(model, ctx_ids, n_ctx, targets))


def _split_contexts(model: NgramModel, contexts_BxC) -> tuple:
  """Validates left-padded contexts; returns (prev_tokens_CxB, n_ctx_B)."""
  c = np.asarray(contexts_BxC)
  if c.ndim != 2 or not (np.issubdtype(c.dtype, np.integer) or c.size == 0):
    raise ValueError(f"contexts_BxC must be a 2-D integer array, got shape {c.shape} dtype {c.dtype}")
  c = c.astype(np.int64)
  if c.size and c.max() >= model.vocab_size:
    raise ValueError(f"contexts_BxC tokens must be < vocab_size={model.vocab_size}, got {c.max()}")
  present = c >= 0
  # Number of trailing tokens >= 0; padding (< 0) must sit on the left.
  n_ctx = present.sum(axis=1)
  if np.any(present[:, ::-1].cumprod(axis=1).sum(axis=1) != n_ctx):
    raise ValueError("contexts_BxC padding (negative entries) must be on the left of each row")
  width = max(model.order - 1, 1)
  prev = np.zeros((width, c.shape[0]), np.int64)
  for j in range(1, min(width, c.shape[1]) + 1):
    prev[j - 1] = np.maximum(c[:, -j], 0)
  return prev, np.minimum(n_ctx, model.order - 1)


def conditional_distribution(model: NgramModel, contexts_BxC) -> np.ndarray:
  """Full next-token distributions P(. | context) for a batch of contexts.

  Args:
    model: fitted model.
    contexts_BxC: int array [B, C]; row b is a context, oldest token first; negative entries are left
      padding (so rows may hold fewer than C tokens). Only the last order - 1 tokens are used.

  Returns:
    float64 [B, V], rows sum to one.
  """
  v = model.vocab_size
  prev, n_ctx = _split_contexts(model, contexts_BxC)
  n_b = n_ctx.shape[0]
  ctx_ids = _context_chain(model, prev, n_ctx)
  top = _top_orders(model, n_ctx)
  p_BxV = np.full((n_b, v), 1.0 / v)
  for m in range(1, model.order + 1):
    use = top >= m if model.method == KNESER_NEY else top == m
    ctx = ctx_ids[m - 1]
    known = use & (ctx >= 0)
    keys = model.ngram_keys[m - 1]
    g = np.where(known, model.gamma[m - 1][np.maximum(ctx, 0)] if model.gamma[m - 1].size else 1.0, 1.0)
    if model.method == ADD_K:
      p_BxV = np.where(use[:, None], 1.0 / v, p_BxV)
    p_BxV = p_BxV * g[:, None]
    # Scatter alpha of the m-grams of each known context: a contiguous range of the sorted keys.
    lo = np.where(known, np.searchsorted(keys, np.maximum(ctx, 0) * v), 0)
    hi = np.where(known, np.searchsorted(keys, (np.maximum(ctx, 0) + 1) * v), 0)
    lengths = hi - lo
    rows = np.repeat(np.arange(n_b), lengths)
    starts = np.repeat(lo - (np.cumsum(lengths) - lengths), lengths)
    entries = np.arange(rows.size) + starts
    p_BxV[rows, keys[entries] % v] += model.alpha[m - 1][entries]  # (row, w) pairs are distinct
  return p_BxV
