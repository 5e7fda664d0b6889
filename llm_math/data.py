"""Data sources, splits and batches.

One flag picks the source:
  synthetic              the lagged-copy source of `llm_math.synthetic` (no download, exact floor)
  text:PATH[,PATH...]    local UTF-8 files, concatenated; first 90% train, last 10% validation
  tfds:NAME[/CONFIG]     a TensorFlow Datasets text dataset ('train' and 'validation' or 'test' splits)
  tokens:DIR             a corpus tokenized once by `experiments.prepare_data` (`llm_math.token_store`):
                         its splits are memory-mapped, so corpora larger than memory train as well

Training batches are a pure function of (seed, step): random windows of the training stream, so a
resumed run sees exactly the batches an uninterrupted one would. Evaluation covers the validation
stream contiguously with fixed windows and says what context every scored token had.
"""

import collections
import concurrent.futures
import dataclasses
import itertools
import os
import socket

import numpy as np

from llm_math import sharding
from llm_math import synthetic
from llm_math import tokenizers
from llm_math.errors import UsageError

TRAIN_FRACTION = 0.9


@dataclasses.dataclass
class Dataset:
  """Token streams of both splits, the tokenizer that made them, and the source when it is known."""
  description: str
  train_ids: np.ndarray
  val_ids: np.ndarray
  tokenizer: object
  source: synthetic.LaggedCopySource | None = None

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size


@dataclasses.dataclass(frozen=True)
class SyntheticTokenizer:
  """Identity 'tokenizer' of the synthetic source: ids are symbols, one symbol = one character."""
  vocab_size: int
  kind = "synthetic"

  @property
  def char_lengths(self):
    return np.ones(self.vocab_size, np.int32)

  def decode(self, ids) -> str:
    return " ".join(map(str, np.asarray(ids).tolist()))

  def save(self, directory):
    del directory


def _read_text_files(paths):
  texts = []
  for path in paths:
    if not os.path.isfile(path):
      raise UsageError(f"--data=text:{path}: no such file")
    try:
      with open(path, encoding="utf-8") as f:
        texts.append(f.read())
    except UnicodeDecodeError as e:
      raise UsageError(f"--data=text:{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not texts[-1]:
      raise UsageError(f"--data=text:{path}: the file is empty")
  return "\n".join(texts)


def _network_reachable(host: str = "storage.googleapis.com", port: int = 443,
                       timeout: float = 3.0) -> bool:
  try:
    with socket.create_connection((host, port), timeout=timeout):
      return True
  except OSError:
    return False


def _read_tfds(name: str, data_dir: str | None, max_chars: int | None):
  """Returns (train_text, validation_text) of a tfds dataset with a `text` feature."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  flag = f"--data=tfds:{name}"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise UsageError(f"{flag}: tensorflow-datasets has no dataset of that name") from None
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(f"{flag}: could not open it ({type(e).__name__}: {e})") from None
  if not builder.is_prepared():
    where = data_dir or "the default tfds data_dir (~/tensorflow_datasets)"
    if not _network_reachable():
      raise UsageError(
          f"{flag}: not prepared under {where} and there is no network to download it; prepare it "
          "where there is (`tfds build` or tfds.builder(...).download_and_prepare()) and pass "
          "--tfds_data_dir=DIR")
    builder.download_and_prepare()
  splits = builder.info.splits
  val_split = next((s for s in ("validation", "test") if s in splits), None)
  if "train" not in splits or val_split is None:
    raise UsageError(f"{flag}: needs a 'train' and a 'validation' or 'test' split, has {list(splits)}")
  if "text" not in builder.info.features:
    raise UsageError(f"{flag}: needs a 'text' feature, has {list(builder.info.features)}")
  source = tfds.data_source(name, data_dir=data_dir, download=False)

  def join(split):
    parts, total = [], 0
    for i in range(len(source[split])):
      text = source[split][i]["text"]
      text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
      parts.append(text)
      total += len(text) + 1
      if max_chars and total >= max_chars:
        break
    return "\n".join(parts)[:max_chars]

  return join("train"), join(val_split)


def _from_text(description, train_text, val_text, tokenizer_kind, vocab_size, workdir):
  tokenizer = tokenizers.build(tokenizer_kind, train_text, [val_text], vocab_size)
  if workdir and sharding.is_primary():  # Every process builds the same tokenizer; one writes it.
    tokenizer.save(workdir)
  return Dataset(description, tokenizer.encode(train_text), tokenizer.encode(val_text), tokenizer)


def load(spec: str, *, tokenizer: str = "char", vocab_size: int | None = None, seed: int = 0,
         synthetic_config=None, tfds_data_dir: str | None = None, max_chars: int | None = None,
         workdir: str | None = None) -> Dataset:
  """Loads and tokenizes the source named by `spec` (see the module docstring)."""
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
  if spec.startswith("text:"):
    paths = [p for p in spec[len("text:"):].split(",") if p]
    if not paths:
      raise UsageError("--data=text:PATH[,PATH...]: no path given")
    text = _read_text_files(paths)[:max_chars]
    split = int(len(text) * TRAIN_FRACTION)
    return _from_text(f"text {','.join(map(os.path.basename, paths))} ({len(text):,} chars, "
                      "first 90% train / last 10% validation)",
                      text[:split], text[split:], tokenizer, vocab_size, workdir)
  if spec.startswith("tfds:"):
    name = spec[len("tfds:"):]
    if not name:
      raise UsageError("--data=tfds:NAME[/CONFIG]: no dataset name given")
    train_text, val_text = _read_tfds(name, tfds_data_dir, max_chars)
    return _from_text(f"tfds {name}", train_text, val_text, tokenizer, vocab_size, workdir)
  if spec.startswith("tokens:"):
    return _from_tokens(spec[len("tokens:"):], workdir)
  raise UsageError(f"--data={spec!r}: expected 'synthetic', 'text:PATH[,PATH...]', "
                   "'tfds:NAME[/CONFIG]' or 'tokens:DIR'")


def _from_tokens(directory, workdir):
  """A prepared directory; its tokenizer is the one it was prepared with (--tokenizer and
  --vocab_size do not apply), and its splits stay on disk as read-only memmaps."""
  from llm_math import token_store  # pylint: disable=g-import-not-at-top
  if not directory:
    raise UsageError("--data=tokens:DIR: no directory given")
  train_ids, val_ids, tok, manifest = token_store.open(directory)
  if workdir and sharding.is_primary():
    tok.save(workdir)
  counts = manifest["splits"]
  description = (f"tokens {directory} ({manifest['tokenizer']['kind']} tokens of {manifest['source']}: "
                 f"{counts['train']['tokens']:,} train / {counts['val']['tokens']:,} validation, "
                 f"split {manifest['split']})")
  return Dataset(description, train_ids, val_ids, tok)


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
  window_BxT1 = ids[starts_B[:, None] + np.arange(seq_len + 1)[None, :]]
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


@dataclasses.dataclass
class EvalWindows:
  """Contiguous evaluation windows over a stream.

  inputs_NxT[n] = stream[s_n : s_n + T], targets_NxT[n] = stream[s_n + 1 : s_n + T + 1], s_n = n * stride.
  weights_NxT marks the scored targets: all of window 0, then only the last `stride` targets of each
  later window (the last window is moved back to end with the stream and scores only what is new), so
  every token from position 1 on is scored exactly once. A target at window position j
  is predicted from j + 1 tokens of context (`context_NxT`). stride == T gives nanoGPT's convention
  (independent windows; contexts 1..T); a smaller stride gives every scored token at least T - stride + 1.
  """
  inputs_NxT: np.ndarray
  targets_NxT: np.ndarray
  weights_NxT: np.ndarray
  positions_NxT: np.ndarray  # index of each target in the stream
  context_NxT: np.ndarray

  def describe(self) -> dict:
    scored = self.weights_NxT > 0
    ctx = self.context_NxT[scored]
    return {"tokens_scored": int(scored.sum()), "context_min": int(ctx.min()),
            "context_mean": float(ctx.mean()), "context_max": int(ctx.max())}


def eval_windows(ids: np.ndarray, seq_len: int, stride: int | None = None) -> EvalWindows:
  stride = seq_len if stride is None else stride
  if not 1 <= stride <= seq_len:
    raise UsageError(f"--config.eval_stride={stride}: expected 1 <= stride <= seq_len={seq_len}")
  n_targets = len(ids) - 1
  starts_N = np.arange(0, n_targets - seq_len + 1, stride)
  if starts_N[-1] + seq_len < n_targets:  # A last window flush with the end of the stream.
    starts_N = np.append(starts_N, n_targets - seq_len)
  pos_NxT = starts_N[:, None] + np.arange(1, seq_len + 1)[None, :]
  first_scored_N = np.where(np.arange(len(starts_N)) == 0, 0, seq_len - stride)
  prev_end_N = np.concatenate([[0], starts_N[:-1] + seq_len])
  scored = ((np.arange(seq_len)[None, :] >= first_scored_N[:, None])
            & (pos_NxT > prev_end_N[:, None]))
  return EvalWindows(
      inputs_NxT=ids[pos_NxT - 1], targets_NxT=ids[pos_NxT], weights_NxT=scored.astype(np.float32),
      positions_NxT=pos_NxT, context_NxT=np.broadcast_to(np.arange(1, seq_len + 1), pos_NxT.shape))
