"""Data sources, splits and batches.

One flag picks the source:
  synthetic              the lagged-copy source of `llm_math.synthetic` (no download, exact floor)
  text:PATH[,PATH...]    local UTF-8 files, concatenated; first 90% train, last 10% validation (or
                         every K-th block of N characters: split 'blocks:K:N')
  tfds:NAME[/CONFIG]     a TensorFlow Datasets text dataset ('train' and 'validation' or 'test' splits)
  tokens:DIR             a corpus tokenized once by `experiments.prepare_data` (`llm_math.token_store`)

Every text source is tokenized once: text: and tfds: sources are prepared into a cache directory on
first use (streamed, never read whole into memory) and, like tokens:DIR, memory-mapped from there, so
corpora larger than memory train as well and a second run starts without tokenizing.

Training batches are a pure function of (seed, step): random windows of the training stream, so a
resumed run sees exactly the batches an uninterrupted one would. Evaluation covers the validation
stream contiguously with fixed windows and says what context every scored token had.
"""

import collections
import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import os

import numpy as np

from llm_math import files
from llm_math import sharding
from llm_math.analysis import ngram
from llm_math import synthetic
from llm_math.errors import UsageError


@dataclasses.dataclass
class Dataset:
  """Token streams of both splits, the tokenizer that made them, and the source when it is known.

  `train_counts` (int64[vocab_size]) holds how often each id occurs in train_ids when that was
  counted ahead (a token store's train.counts.npy); None means `train_unigram_counts` counts them.
  """
  description: str
  train_ids: np.ndarray
  val_ids: np.ndarray
  tokenizer: object
  source: synthetic.LaggedCopySource | None = None
  train_counts: np.ndarray | None = None

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def train_unigram_counts(self) -> np.ndarray:
    """int64[vocab_size]: how often each id occurs in train_ids; the stored counts when there are
    some, else counted a bounded chunk at a time (a memory-mapped split is never read whole)."""
    if self.train_counts is not None:
      return self.train_counts
    return ngram.token_counts(self.train_ids, self.vocab_size)


@dataclasses.dataclass(frozen=True)
class SyntheticTokenizer:
  """Identity 'tokenizer' of the synthetic source: ids are symbols, one symbol = one character, stored
  as one byte."""
  vocab_size: int
  kind = "synthetic"

  @property
  def char_lengths(self):
    return np.ones(self.vocab_size, np.int32)

  byte_lengths = char_lengths

  def decode(self, ids) -> str:
    return " ".join(map(str, np.asarray(ids).tolist()))

  def save(self, directory):
    del directory


def default_cache_dir() -> str:
  """Where text: and tfds: sources are prepared on first use: $LLM_MATH_DATA_CACHE, else
  ~/.cache/llm_math/tokens."""
  return os.environ.get("LLM_MATH_DATA_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "llm_math", "tokens")


def cache_key(spec: str, settings: dict) -> str:
  """A readable, unique directory name for a source prepared with `settings`: the source's last
  name, the tokenizer and a hash of the resolved source (absolute paths) and the settings."""
  kind, _, rest = spec.partition(":")
  if kind == "text":
    source = [os.path.abspath(p) for p in rest.split(",") if p]
    name = os.path.basename(source[-1]) if source else "text"
  else:
    source, name = rest, rest.replace("/", "_")
  digest = hashlib.sha256(json.dumps({"source": source, "kind": kind, **settings},
                                     sort_keys=True).encode()).hexdigest()[:12]
  tokenizer = settings["tokenizer"] + (str(settings["vocab_size"] or "")
                                       if settings["tokenizer"] == "sentencepiece" else "")
  return f"{name}-{tokenizer}-{digest}"


def _prepared(spec: str, tokenizer: str, vocab_size, split, max_chars, tfds_data_dir, cache_dir,
              log) -> str:
  """The cache directory of `spec` prepared by `token_store.prepare` (on first use; later uses
  reuse it). Processes sharing a disk take turns under a file lock: one prepares, the rest reuse
  (`token_store.prepare_shared`; without cross-host locks process 0 prepares, the rest wait)."""
  from llm_math import token_store  # pylint: disable=g-import-not-at-top
  settings = {"tokenizer": tokenizer, "vocab_size": vocab_size, "split": split or "",
              "max_chars": max_chars or 0,
              "tfds_data_dir": os.path.abspath(tfds_data_dir) if tfds_data_dir else ""}
  root = cache_dir or default_cache_dir()
  if not files.is_local(root):
    raise UsageError(f"--data_cache={root}: token files are memory-mapped; use a local directory")
  directory = os.path.join(root, cache_key(spec, settings))
  try:
    os.makedirs(root, exist_ok=True)
    lock = open(directory + ".lock", "a")  # pylint: disable=consider-using-with
  except OSError as e:
    raise UsageError(f"--data_cache={root}: cannot write there ({e.strerror or e})") from None
  with lock:
    manifest = token_store.prepare_shared(
        lock, spec, directory, tokenizer, vocab_size, split or None, primary=sharding.is_primary(),
        max_chars=max_chars, tfds_data_dir=tfds_data_dir, log=log)
  if not manifest["reused"]:
    log(f"prepared {spec} into {directory} in {manifest['wall_s']:.1f} s; later runs reuse it")
  return directory


def load(spec: str, *, tokenizer: str = "char", vocab_size: int | None = None, seed: int = 0,
         synthetic_config=None, tfds_data_dir: str | None = None, max_chars: int | None = None,
         workdir: str | None = None, split: str | None = None, cache_dir: str | None = None,
         log=None) -> Dataset:
  """Loads the source named by `spec` (see the module docstring).

  text: and tfds: sources are tokenized once into `cache_dir` (default: `default_cache_dir()`) by
  `token_store.prepare` and memory-mapped from there, as tokens:DIR is. `split` is the split rule of
  text sources ('tail' by default, or 'blocks:K:N'); tfds sources have their own splits.
  """
  log = log or (lambda _: None)
  if spec == "synthetic":
    cfg = dict(synthetic_config or {})
    n_train, n_val = cfg.pop("train_tokens", 1 << 20), cfg.pop("val_tokens", 1 << 16)
    try:
      source = synthetic.LaggedCopySource(**cfg)
    except (TypeError, ValueError) as e:
      raise UsageError(f"--config.synthetic: {e}") from None
    return Dataset(f"synthetic lagged-copy (V={source.vocab_size}, lag={source.lag}, "
                   f"alpha={source.copy_prob})",
                   source.sample(n_train, seed=2 * seed), source.sample(n_val, seed=2 * seed + 1),
                   SyntheticTokenizer(source.vocab_size), source)
  if spec.startswith(("text:", "tfds:")):
    directory = _prepared(spec, tokenizer, vocab_size, split, max_chars, tfds_data_dir, cache_dir,
                          log)
    return _from_tokens(directory, workdir, spec)
  if spec.startswith("tokens:"):
    return _from_tokens(spec[len("tokens:"):], workdir)
  raise UsageError(f"--data={spec!r}: expected 'synthetic', 'text:PATH[,PATH...]', "
                   "'tfds:NAME[/CONFIG]' or 'tokens:DIR'")


def _from_tokens(directory, workdir, spec: str | None = None):
  """A prepared directory; its tokenizer is the one it was prepared with (--tokenizer and
  --vocab_size do not apply to tokens:DIR), and its splits stay on disk as read-only memmaps."""
  from llm_math import token_store  # pylint: disable=g-import-not-at-top
  if not directory:
    raise UsageError("--data=tokens:DIR: no directory given")
  train_ids, val_ids, tok, manifest = token_store.open(directory)
  if workdir and sharding.is_primary():
    tok.save(workdir)
  counts = manifest["splits"]
  chars = counts["train"]["chars"] + counts["val"]["chars"]
  if spec is None:
    description = (f"tokens {directory} ({manifest['tokenizer']['kind']} tokens of "
                   f"{manifest['source']}: ")
  else:
    description = f"{spec.split(':')[0]} {_source_name(spec)} ({chars:,} chars, "
  description += (f"{counts['train']['tokens']:,} train / {counts['val']['tokens']:,} validation "
                  f"tokens, split {manifest['split']})")
  return Dataset(description, train_ids, val_ids, tok,
                 train_counts=token_store.unigram_counts(directory, "train"))


def _source_name(spec: str) -> str:
  kind, _, rest = spec.partition(":")
  return ",".join(map(os.path.basename, rest.split(","))) if kind == "text" else rest


def check_fits(dataset: Dataset, seq_len: int):
  """A split shorter than one context window (+1 target) cannot train or evaluate a model."""
  for split, ids in (("training", dataset.train_ids), ("validation", dataset.val_ids)):
    if len(ids) < seq_len + 1:
      raise UsageError(
          f"the {split} split of {dataset.description} has {len(ids)} tokens, fewer than one context "
          f"window plus a target ({seq_len + 1}); use a longer corpus or a smaller --config.seq_len")


def train_batch(ids: np.ndarray, seq_len: int, batch_size: int, seed: int, step: int,
                rows: slice = slice(None)):
  """The training batch of `step`: random windows, a pure function of (seed, step).

  Returns inputs_BxT and targets_BxT (targets are the inputs shifted by one token). `rows` selects
  this process's rows of the global batch (multi-host: each process builds only its slice).
  """
  rng = np.random.default_rng([seed, step])
  starts_B = rng.integers(0, len(ids) - seq_len, size=batch_size)[rows]
  window_BxT1 = np.asarray(ids[starts_B[:, None] + np.arange(seq_len + 1)[None, :]], np.int32)
  return window_BxT1[:, :-1], window_BxT1[:, 1:]


def prefetch(make_batch, start: int, stop: int, depth: int = 2):
  """Yields make_batch(step) for step in [start, stop), computed `depth` steps ahead on a thread.

  Batch construction (numpy indexing, host-to-device copies) then overlaps the accelerator's step.
  """
  steps = iter(range(start, stop))
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    pending = collections.deque(pool.submit(make_batch, s) for s in itertools.islice(steps, depth))
    while pending:
      batch = pending.popleft().result()
      for s in itertools.islice(steps, 1):
        pending.append(pool.submit(make_batch, s))
      yield batch


@dataclasses.dataclass(frozen=True)
class EvalWindows:
  """Contiguous evaluation windows over a stream, read from it batch by batch.

  Window n covers inputs stream[s_n : s_n + T] and targets stream[s_n + 1 : s_n + T + 1], with
  s_n = n * stride. It scores its targets from column `first_scored_N[n]` on: all of window 0, then
  only the last `stride` targets of each later window (the last window is moved back to end with the
  stream and scores only what is new), so every token from position 1 on is scored exactly once. A
  target at window column j is predicted from j + 1 tokens of context. stride == T gives nanoGPT's
  convention (independent windows; contexts 1..T); a smaller stride gives every scored token at least
  T - stride + 1.

  The stream may be a memory-mapped split: `batch(lo, hi)` reads only windows lo..hi-1, so scoring a
  validation split larger than memory needs memory for one batch. The `*_NxT` properties build all
  windows at once (small streams, analyses).
  """
  ids: np.ndarray  # the stream [L]
  starts_N: np.ndarray  # first input position of each window
  first_scored_N: np.ndarray  # first scored column of each window
  seq_len: int

  def __len__(self) -> int:
    return len(self.starts_N)

  def batch(self, lo: int, hi: int):
    """(inputs_BxT int32, targets_BxT int32, weights_BxT float32) of windows lo..hi-1; rows past the
    last window are zero with weight 0 (padding to a fixed batch shape)."""
    n = max(min(hi, len(self)) - lo, 0)
    window_nxT1 = np.asarray(self.ids[self.starts_N[lo:lo + n, None]
                                      + np.arange(self.seq_len + 1)[None, :]], np.int32)
    weights_nxT = (np.arange(self.seq_len)[None, :]
                   >= self.first_scored_N[lo:lo + n, None]).astype(np.float32)
    pad = ((0, hi - lo - n), (0, 0))
    return (np.pad(window_nxT1[:, :-1], pad), np.pad(window_nxT1[:, 1:], pad),
            np.pad(weights_nxT, pad))

  @property
  def inputs_NxT(self) -> np.ndarray:
    return self.batch(0, len(self))[0]

  @property
  def targets_NxT(self) -> np.ndarray:
    return self.batch(0, len(self))[1]

  @property
  def weights_NxT(self) -> np.ndarray:
    return self.batch(0, len(self))[2]

  @property
  def positions_NxT(self) -> np.ndarray:
    """The index in the stream of each target."""
    return self.starts_N[:, None] + np.arange(1, self.seq_len + 1)[None, :]

  @property
  def context_NxT(self) -> np.ndarray:
    """Tokens of context each target is predicted from."""
    return np.broadcast_to(np.arange(1, self.seq_len + 1), (len(self), self.seq_len))

  def scored(self):
    """(positions_M, contexts_M) of the M scored targets, in stream order, without the windows."""
    counts_N = self.seq_len - self.first_scored_N
    row_M = np.repeat(np.arange(len(self)), counts_N)
    column_M = np.arange(counts_N.sum()) - np.repeat(np.cumsum(counts_N) - counts_N, counts_N)
    column_M += self.first_scored_N[row_M]
    return self.starts_N[row_M] + column_M + 1, column_M + 1

  def context_at(self, positions) -> np.ndarray:
    """Tokens of context each of `positions` (stream indices) has in the window that scores it.

    E.g. the contexts another set of windows' targets would have in these windows; every position
    must be scored by one of them (any position from 1 on, unless windows are sampled).
    """
    pos = np.asarray(positions, np.int64).reshape(-1)
    first_N = self.starts_N + self.first_scored_N + 1  # First scored position of each window.
    row = np.searchsorted(first_N, pos, side="right") - 1
    if pos.size and (row.min() < 0 or np.any(pos > self.starts_N[np.maximum(row, 0)]
                                               + self.seq_len)):
      raise ValueError("a position is not scored by these windows")
    return pos - self.starts_N[row]

  def describe(self) -> dict:
    counts_N = self.seq_len - self.first_scored_N
    lo_N, t = self.first_scored_N + 1, self.seq_len  # Contexts of window n: lo_N[n] .. T.
    return {"tokens_scored": int(counts_N.sum()), "context_min": int(lo_N.min()),
            "context_mean": float(((lo_N + t) / 2 * counts_N).sum() / counts_N.sum()),
            "context_max": t}


def eval_windows(ids: np.ndarray, seq_len: int, stride: int | None = None,
                 every: int = 1) -> EvalWindows:
  """The windows of `ids` at `stride` (default seq_len); see EvalWindows.

  every > 1 keeps every `every`-th of the independent windows (stride == seq_len) and scores all of
  their tokens: a sample spread evenly over the whole stream, at 1/every of the cost.
  """
  stride = seq_len if stride is None else stride
  if not 1 <= stride <= seq_len:
    raise UsageError(f"--config.eval_stride={stride}: expected 1 <= stride <= seq_len={seq_len}")
  if every < 1 or (every > 1 and stride != seq_len):
    raise UsageError(f"--config.eval_sample_every={every}: expected 1, or more with independent "
                     f"windows (eval_stride 0 or seq_len={seq_len})")
  if every > 1:
    starts_N = np.arange(0, len(ids) - seq_len, seq_len)[::every]
    return EvalWindows(ids, starts_N, np.zeros(len(starts_N), np.int64), seq_len)
  n_targets = len(ids) - 1
  starts_N = np.arange(0, n_targets - seq_len + 1, stride)
  if starts_N[-1] + seq_len < n_targets:  # A last window flush with the end of the stream.
    starts_N = np.append(starts_N, n_targets - seq_len)
  prev_end_N = np.concatenate([[0], starts_N[:-1] + seq_len])
  rule_N = np.where(np.arange(len(starts_N)) == 0, 0, seq_len - stride)
  return EvalWindows(ids, starts_N, np.maximum(rule_N, prev_end_N - starts_N), seq_len)
