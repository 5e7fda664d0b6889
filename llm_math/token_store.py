"""Corpora tokenized once into flat token files that training memory-maps (nanoGPT's prepare.py).

The one place that reads corpora: `text:PATH[,PATH...]` (local UTF-8 files, joined by '\n', read
with universal newlines) and `tfds:NAME[/CONFIG]` (a prepared TensorFlow Datasets dataset with a
`text` feature; the examples of a split joined by '\n'). `max_chars` cuts the text: the joined
files before they are split, and each tfds split on its own (data.load's rule).

A prepared directory holds:
  train.bin, val.bin   the token ids of each split, flat little-endian uint16 (vocab_size <= 65535)
                       or uint32, in corpus order
  train.counts.npy, val.counts.npy   each split's unigram counts: int64[vocab_size], the number of
                       times each id occurs (`unigram_counts`), so a unigram baseline reads no ids
  tokenizer.json (+ tokenizer.model)   the tokenizer, as `tokenizers.save` writes it
  manifest.json        written last: format version, source, split rule, tokenizer, dtype, token and
                       character counts per split (for bits per character), and `hash`, a sha256 of
                       the source's text (UTF-8, stream by stream) and of the settings

A directory without manifest.json is half-written: `open` refuses it, `prepare` redoes it.

Shared disks. Every file is written under a temporary name unique across hosts (host name, process
id, random token: containers on a pod often share process ids) and renamed into place whole, and
manifest.json comes last, so a reader sees no manifest or a complete directory, never a part of a
file; a writer that finds another's matching manifest when it is done drops its own files. Which
process prepares a shared directory (`prepare_shared`, the data cache's entry point): where flock
works (local disks; NFS with locking, across hosts), the processes take turns under it and the first
prepares. An object-store FUSE mount (fstype in OBJECT_STORE_MOUNTS, e.g. fuse.gcsfuse, read from
/proc/mounts) passes for a local path (only '://' URLs are not local), but its locks hold within one
host only; there, and where flock fails with ENOLCK, EOPNOTSUPP or ENOSYS (some NFS and FUSE
mounts), process 0 prepares without a cross-host lock and the others wait for its manifest.json (a
one-line warning names the directory; after WAIT_S a UsageError says to prepare ahead). Independent
jobs that share such a directory are not told apart: prepare it ahead with one process
(`experiments.prepare_data`).

`prepare` streams the source: it reads files in chunks, and tfds splits example by example, and cuts
the text into pieces of about `chunk_bytes` that end at line breaks, never holding a whole corpus or
split; it tokenizes the pieces on a process pool (order preserved) while appending ids to the .bin
files. Three passes over the source: one counts characters, collects the alphabet and hashes the
text; one samples the training split for SentencePiece (only that tokenizer); one tokenizes. The
ids equal those of tokenizing each split's whole text at once (every tokenizer here encodes line by
line).

Split rules (`split`; None means 'tail' for text: sources and the dataset's own splits for tfds:):
  tail          the last 10% of characters are validation (data.load's rule for text: sources; the
                ids equal data.load's for every tokenizer trained on the same text)
  blocks:K:N    the corpus cut into blocks of at least N characters, each ending at the first line
                break at or after its N-th character (or at the end of the corpus); every K-th block
                (index % K == K - 1) is validation
  tfds          (tfds: sources only, and their only rule) the dataset's 'train' split is training,
                its 'validation' split (else 'test') is validation
"""

import codecs
import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import io
import json
import mmap
import multiprocessing
import os
import re
import socket
import sys
import time

import numpy as np

from llm_math import files
from llm_math import tokenizers
from llm_math.errors import UsageError

FORMAT_VERSION = 2  # 2: unigram counts per split; the hash covers the source's text, not its files.
TRAIN_FRACTION = 0.9  # The 'tail' rule: data.TRAIN_FRACTION, today's split of text: sources.
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
DEFAULT_SAMPLE_CHARS = 20_000_000
_CHUNK_BYTES = 4 << 20
_MAX_CARRY_CHARS = 64 << 20  # A line longer than this is cut (only SentencePiece ids notice).
_CORPUS = "corpus"  # The one stream of a text: source; its splits are cut from it.
# Shared preparation (prepare_shared): filesystems whose file locks do not reach other hosts.
OBJECT_STORE_MOUNTS = ("fuse.gcsfuse", "fuse.s3fs", "fuse.mountpoint-s3", "fuse.goofys",
                       "fuse.blobfuse", "fuse.blobfuse2")
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS)  # flock's "not here".
WAIT_S = 6 * 3600.0  # How long the other processes wait for process 0 to prepare.
POLL_S = 5.0
_MOUNTS = "/proc/mounts"


@dataclasses.dataclass(frozen=True)
class SplitRule:
  """'tail' (nothing set), 'blocks:K:N' (every = K, block_chars = N) or a tfds dataset's own splits
  (tfds_splits = (training split, validation split))."""
  every: int = 0
  block_chars: int = 0
  tfds_splits: tuple[str, ...] = ()

  @property
  def spec(self) -> str:
    if self.tfds_splits:
      return "tfds " + "/".join(self.tfds_splits)
    return f"blocks:{self.every}:{self.block_chars}" if self.every else "tail"

  def describe(self) -> str:
    if self.tfds_splits:
      return f"the dataset's {self.tfds_splits[0]!r} split / its {self.tfds_splits[1]!r} split"
    if self.every:
      return (f"every {self.every}th block of {self.block_chars:,} characters (to a line break) "
              "is validation")
    return f"first {TRAIN_FRACTION:.0%} of characters train / last {1 - TRAIN_FRACTION:.0%} validation"

  def to_json(self) -> dict:
    if self.tfds_splits:
      return {"rule": "tfds", "train": self.tfds_splits[0], "val": self.tfds_splits[1]}
    if self.every:
      return {"rule": "blocks", "every": self.every, "block_chars": self.block_chars}
    return {"rule": "tail", "train_fraction": TRAIN_FRACTION}


def parse_split(text: str) -> SplitRule:
  if text == "tail":
    return SplitRule()
  parts = text.split(":")
  if (len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2].isdigit()
      and int(parts[1]) >= 2 and int(parts[2]) >= 1):
    return SplitRule(int(parts[1]), int(parts[2]))
  raise UsageError(f"--split={text!r}: expected 'tail' or 'blocks:K:N' (every K-th block of N "
                   "characters is validation; K >= 2, N >= 1)")


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


@dataclasses.dataclass
class Source:
  """A corpus opened for reading: text files, or a tfds dataset's splits.

  streams: the names of its texts in reading order, each cut to `max_chars` characters: ('corpus',)
  for text files (the joined files; the split rule cuts both splits from it), (training split,
  validation split) for tfds. `files` are the files whose sizes and times tell that the source is
  unchanged; `dataset` is a tfds dataset's name, version and data_dir (None for text).
  """
  spec: str
  streams: tuple[str, ...]
  max_chars: int | None = None
  paths: tuple[str, ...] = ()  # text: the files
  examples: dict | None = None  # tfds: split name -> random-access examples (tfds.data_source)
  dataset: dict | None = None
  files: tuple[str, ...] = ()


def text_paths(source_spec: str) -> list[str]:
  """The files of a 'text:PATH[,PATH...]' spec."""
  if not source_spec.startswith("text:"):
    raise UsageError(f"--data={source_spec!r}: expected 'text:PATH[,PATH...]' or "
                     "'tfds:NAME[/CONFIG]'")
  paths = [p for p in source_spec[len("text:"):].split(",") if p]
  if not paths:
    raise UsageError("--data=text:PATH[,PATH...]: no path given")
  for p in paths:
    if not os.path.isfile(p):
      raise UsageError(f"--data=text:{p}: no such file")
  return paths


def _network_reachable(host: str = "storage.googleapis.com", port: int = 443,
                       timeout: float = 3.0) -> bool:
  try:
    with socket.create_connection((host, port), timeout=timeout):
      return True
  except OSError:
    return False


def _first_line(error: Exception) -> str:
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0] if lines else ''}"


def open_tfds(name: str, data_dir: str | None = None, max_chars: int | None = None) -> Source:
  """Opens the tfds dataset `name` ('NAME[/CONFIG]', with a `text` feature, prepared under
  `data_dir` or downloaded when there is a network) for reading example by example."""
  flag = f"--data=tfds:{name}"
  if not name:
    raise UsageError("--data=tfds:NAME[/CONFIG]: no dataset name given")
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UsageError(f"{flag}: tfds: sources need tensorflow-datasets ({_first_line(e)})") from None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise UsageError(f"{flag}: tensorflow-datasets has no dataset of that name") from None
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(f"{flag}: could not open it ({_first_line(e)})") from None
  if not builder.is_prepared():
    where = data_dir or "the default tfds data_dir (~/tensorflow_datasets)"
    if not _network_reachable():
      raise UsageError(
          f"{flag}: not prepared under {where} and there is no network to download it; prepare it "
          "where there is (`tfds build` or tfds.builder(...).download_and_prepare()) and pass "
          "--tfds_data_dir=DIR")
    try:
      builder.download_and_prepare()
    except Exception as e:  # pylint: disable=broad-except
      raise UsageError(f"{flag}: could not download and prepare it ({_first_line(e)})") from None
  splits = builder.info.splits
  val_split = next((s for s in ("validation", "test") if s in splits), None)
  if "train" not in splits or val_split is None:
    raise UsageError(
        f"{flag}: needs a 'train' and a 'validation' or 'test' split, has {list(splits)}")
  if "text" not in builder.info.features:
    raise UsageError(f"{flag}: needs a 'text' feature, has {list(builder.info.features)}")
  try:
    examples = tfds.data_source(name, data_dir=data_dir, download=False)
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(
        f"{flag}: could not open its examples for reading ({_first_line(e)})") from None
  root = files.path(builder.data_dir)
  dataset_files = tuple(sorted(os.fspath(p) for p in root.iterdir() if not p.is_dir()))
  return Source(f"tfds:{name}", ("train", val_split), max_chars, examples=examples,
                dataset={"name": name, "version": str(builder.info.version),
                         "data_dir": os.fspath(root)},
                files=dataset_files)


def open_source(source_spec: str, max_chars: int | None = None,
                tfds_data_dir: str | None = None) -> Source:
  """The source named by 'text:PATH[,PATH...]' or 'tfds:NAME[/CONFIG]', to be read up to
  `max_chars` characters (None: all)."""
  if max_chars is not None and max_chars < 1:
    raise UsageError(f"--max_chars={max_chars}: expected a positive number of characters (or none "
                     "for all)")
  if source_spec.startswith("tfds:"):
    return open_tfds(source_spec[len("tfds:"):], tfds_data_dir, max_chars)
  paths = tuple(text_paths(source_spec))
  return Source(source_spec, (_CORPUS,), max_chars, paths=paths, files=paths)


def iter_text(paths, chunk_bytes: int = _CHUNK_BYTES, on_bytes=None):
  """Yields the corpus text in pieces that end at line breaks (all but the last).

  The corpus is the files joined by '\\n', decoded as `open(path, encoding='utf-8')` does (universal
  newlines), i.e. exactly data.load's text for a text: source. `on_bytes(index, raw)` sees every raw
  block of file `index`.
  """
  carry = ""
  for index, path in enumerate(paths):
    if index:
      carry += "\n"
    decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")(), translate=True)
    offset = 0
    with io.open(path, "rb") as f:
      while True:
        raw = f.read(chunk_bytes)
        if on_bytes:
          on_bytes(index, raw)
        pending = len(decoder.getstate()[0])
        try:
          carry += decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as e:
          raise UsageError(f"--data=text:{path}: not UTF-8 text ({e.reason} at byte "
                           f"{offset - pending + e.start})") from None
        offset += len(raw)
        cut = carry.rfind("\n") + 1 if len(carry) < _MAX_CARRY_CHARS else len(carry)
        if cut:
          yield carry[:cut]
          carry = carry[cut:]
        if not raw:
          break
    if not offset:
      raise UsageError(f"--data=text:{path}: the file is empty")
  if carry:
    yield carry


def take_chars(pieces, max_chars: int | None):
  """The first `max_chars` characters (all if None) of the text that `pieces` make up, in the same
  pieces (the last one cut); reads no piece after the one that reaches max_chars."""
  if max_chars is None:
    yield from pieces
    return
  left = max_chars
  for piece in pieces:
    piece = piece[:left]
    left -= len(piece)
    if piece:
      yield piece
    if not left:
      return


def join_pieces(texts, max_chars: int | None = None, chunk_chars: int = _CHUNK_BYTES):
  """Yields '\\n'.join(texts)[:max_chars] in pieces of about `chunk_chars` characters that end at
  line breaks (all but the last), without ever joining all of `texts`.

  `texts` (e.g. the examples of a split) is read lazily, one text at a time, and not past the one
  that reaches max_chars. A text longer than a chunk is cut into chunks too.
  """
  parts, size, left = [], 0, max_chars
  for index, text in enumerate(texts):
    if index:
      text = "\n" + text
    if left is not None:
      text = text[:left]
      left -= len(text)
    for start in range(0, len(text), chunk_chars):
      parts.append(text[start:start + chunk_chars])
      size += len(parts[-1])
      if size >= chunk_chars:
        carry = "".join(parts)
        cut = carry.rfind("\n") + 1 if len(carry) < _MAX_CARRY_CHARS else len(carry)
        if cut:
          yield carry[:cut]
        parts, size = [carry[cut:]], len(carry) - cut
    if left == 0:
      break
  if size:
    yield "".join(parts)


def _example_texts(examples, where: str):
  """The `text` feature of each of `examples` (random access, as tfds.data_source gives), as str."""
  for index in range(len(examples)):
    text = examples[index]["text"]
    if isinstance(text, bytes):
      try:
        text = text.decode("utf-8")
      except UnicodeDecodeError as e:
        raise UsageError(f"{where}: example {index} is not UTF-8 text ({e.reason} at byte "
                         f"{e.start})") from None
    yield str(text)


def iter_stream(source: Source, stream: str, chunk_bytes: int = _CHUNK_BYTES):
  """Yields the text of `stream` (one of source.streams), cut to source.max_chars characters, in
  pieces of about `chunk_bytes` characters that end at line breaks (all but the last)."""
  if source.paths:
    return take_chars(iter_text(source.paths, chunk_bytes), source.max_chars)
  texts = _example_texts(source.examples[stream], f"--data={source.spec} split {stream}")
  return join_pieces(texts, source.max_chars, chunk_bytes)


def cut_blocks(text: str, block_index: int, block_len: int, rule: SplitRule):
  """Splits `text` (the corpus continuing a block of `block_len` characters with index
  `block_index`) by the blocks rule. Returns (train_text, val_text, block_index, block_len) after it."""
  train, val = [], []
  pos = 0
  while pos < len(text):
    need = max(rule.block_chars - block_len, 1)
    newline = text.find("\n", pos + need - 1)
    end = len(text) if newline < 0 else newline + 1
    (val if block_index % rule.every == rule.every - 1 else train).append(text[pos:end])
    if newline < 0:
      block_len += end - pos
    else:
      block_index, block_len = block_index + 1, 0
    pos = end
  return "".join(train), "".join(val), block_index, block_len


def split_rule(source: Source, split: str | None) -> SplitRule:
  """The rule named by `split` for a text: source ('tail' if None); a tfds source's own splits."""
  if source.examples is not None:
    if split:
      raise UsageError(f"--split={split!r}: a tfds source is split by its own splits "
                       f"({'/'.join(source.streams)}); leave --split unset")
    return SplitRule(tfds_splits=source.streams)
  return parse_split(split or "tail")


def iter_splits(source: Source, rule: SplitRule, total_chars: int, chunk_bytes: int = _CHUNK_BYTES):
  """Yields (train_text, val_text) pieces of the source in order; each piece of a split ends at a
  line break or where that split's text ends, so tokenizing piece by piece equals tokenizing it.

  A text: source is one stream of `total_chars` characters cut by `rule`; a tfds source yields its
  training split as (piece, '') and then its validation split as ('', piece).
  """
  if rule.tfds_splits:
    train_stream, val_stream = rule.tfds_splits
    for text in iter_stream(source, train_stream, chunk_bytes):
      yield text, ""
    for text in iter_stream(source, val_stream, chunk_bytes):
      yield "", text
    return
  split_at = int(total_chars * TRAIN_FRACTION)
  pos, block_index, block_len = 0, 0, 0
  for text in iter_stream(source, _CORPUS, chunk_bytes):
    if rule.every:
      train, val, block_index, block_len = cut_blocks(text, block_index, block_len, rule)
      yield train, val
    else:
      cut = min(max(split_at - pos, 0), len(text))
      yield text[:cut], text[cut:]
    pos += len(text)


@dataclasses.dataclass
class _Scan:
  chars: dict[str, int]  # stream -> characters
  alphabet: str  # every character of every stream, sorted
  sha256: dict[str, str]  # stream -> sha256 of its UTF-8 text
  source_bytes: int  # UTF-8 bytes of all streams


def _scan(source: Source, chunk_bytes: int) -> _Scan:
  """The counting pass: characters, the alphabet and the hash of each stream."""
  chars, hashes, alphabet, n_bytes = {}, {}, set(), 0
  for stream in source.streams:
    hasher, n = hashlib.sha256(), 0
    for text in iter_stream(source, stream, chunk_bytes):
      raw = text.encode("utf-8")
      hasher.update(raw)
      n_bytes += len(raw)
      n += len(text)
      alphabet.update(text)
    chars[stream], hashes[stream] = n, hasher.hexdigest()
  return _Scan(chars, "".join(sorted(alphabet)), hashes, n_bytes)


def _file_stats(paths) -> list[dict]:
  """Size and modification time of each file (the quick check that a source is unchanged)."""
  out = []
  for p in paths:
    if files.is_local(p):
      st = os.stat(p)
      out.append({"path": os.path.abspath(p), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    else:
      st = files.path(p).stat()
      out.append({"path": os.fspath(p), "bytes": st.length, "mtime": st.mtime})
  return out


def settings_hash(source_sha256: dict[str, str], settings: dict) -> str:
  """The identity of a prepared directory: the source's text (stream by stream) and the settings."""
  return hashlib.sha256(json.dumps({"source_sha256": source_sha256, "settings": settings},
                                   sort_keys=True).encode()).hexdigest()


def _train_chars(rule: SplitRule, scan: _Scan) -> int:
  """Characters of the training split: exact for 'tail' and tfds, about right for blocks."""
  if rule.tfds_splits:
    return scan.chars[rule.tfds_splits[0]]
  fraction = (rule.every - 1) / rule.every if rule.every else TRAIN_FRACTION
  return int(scan.chars[_CORPUS] * fraction)


def _sample_training_text(source, rule, scan, sample_chars: int, chunk_bytes: int) -> str:
  """At most about `sample_chars` characters of the training split, spread evenly over it."""
  train_chars = _train_chars(rule, scan)
  if rule.tfds_splits:  # Only the training split is read.
    pieces = iter_stream(source, rule.tfds_splits[0], chunk_bytes)
  else:
    pieces = (train for train, _ in iter_splits(source, rule, scan.chars[_CORPUS], chunk_bytes))
  parts, seen, taken = [], 0, 0
  for train in pieces:
    seen += len(train)
    if train and taken < sample_chars * seen / max(train_chars, 1):
      parts.append(train)
      taken += len(train)
  return "".join(parts)


# Tokenizing workers: each rebuilds the tokenizer once from a picklable description.
_WORKER = {}


def _tokenizer_spec(tokenizer) -> tuple:
  if tokenizer.kind == "char":
    return ("char", tokenizer.chars)
  if tokenizer.kind == "byte":
    return ("byte", None)
  return ("sentencepiece", tokenizer.model_proto)


def _init_worker(spec: tuple, dtype: str):
  kind, payload = spec
  _WORKER["dtype"] = np.dtype(dtype)
  if kind == "char":
    codes = np.frombuffer(payload.encode("utf-32-le"), np.uint32)
    _WORKER["encode"] = lambda text: _encode_chars(codes, text)
  elif kind == "byte":
    _WORKER["encode"] = tokenizers.ByteTokenizer().encode
  else:
    _WORKER["encode"] = tokenizers.SentencePieceTokenizer(payload).encode


def _encode_chars(sorted_codes_V: np.ndarray, text: str) -> np.ndarray:
  """CharTokenizer.encode, vectorized: the alphabet is sorted by code point, so ids are ranks."""
  codes_N = np.frombuffer(text.encode("utf-32-le"), np.uint32)
  ids_N = np.searchsorted(sorted_codes_V, codes_N)
  bad = (ids_N >= len(sorted_codes_V)) | (sorted_codes_V[np.minimum(ids_N, len(sorted_codes_V) - 1)]
                                          != codes_N)
  if bad.any():
    raise UsageError(f"character {chr(codes_N[bad][0])!r} is not in the tokenizer's alphabet")
  return ids_N


def _encode_pair(pair):
  encode, dtype = _WORKER["encode"], _WORKER["dtype"]
  return tuple(encode(text).astype(dtype) if text else np.zeros(0, dtype) for text in pair)


def _encode_all(pairs, spec, dtype: np.dtype, workers: int):
  """Yields _encode_pair of each pair in order, on `workers` processes (in this one if 1), with a
  bounded number of chunks in flight."""
  if workers <= 1:
    _init_worker(spec, dtype.str)
    yield from map(_encode_pair, pairs)
    return
  context = multiprocessing.get_context("spawn")  # The parent may run JAX threads: do not fork.
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                              initargs=(spec, dtype.str)) as pool:
    pending = collections.deque()
    for pair in pairs:
      pending.append(pool.submit(_encode_pair, pair))
      if len(pending) >= 2 * workers:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


def _bin_path(directory, split: str):
  return files.path(directory) / f"{split}.bin"


def _counts_path(directory, split: str):
  return files.path(directory) / f"{split}.counts.npy"


def _write_counts(directory, split: str, counts_V: np.ndarray):
  buf = io.BytesIO()
  np.save(buf, counts_V)
  files.write_bytes(_counts_path(directory, split), buf.getvalue())  # Renamed into place whole.


def _read_counts(directory, split: str) -> np.ndarray | None:
  path = _counts_path(directory, split)
  if not path.exists():
    return None
  with path.open("rb") as f:
    return np.load(f, allow_pickle=False)


def _complete(directory, manifest: dict) -> str | None:
  """Why the prepared `directory` with `manifest` is not usable, or None."""
  if manifest.get("format_version") != FORMAT_VERSION:
    return f"format version {manifest.get('format_version')}, expected {FORMAT_VERSION}"
  itemsize = np.dtype(manifest["dtype"]).itemsize
  for split in SPLITS:
    path = _bin_path(directory, split)
    expected = manifest["splits"][split]["tokens"] * itemsize
    if not path.exists() or path.stat().length != expected:
      return f"{path.name} is missing or not {expected:,} bytes long"
  for split in SPLITS:
    counts = _read_counts(directory, split)
    if (counts is None or counts.shape != (manifest["tokenizer"]["vocab_size"],)
        or counts.dtype != np.int64 or int(counts.sum()) != manifest["splits"][split]["tokens"]):
      return (f"{_counts_path(directory, split).name} is missing or not the unigram counts of "
              f"{split}.bin")
  if not (files.path(directory) / "tokenizer.json").exists():
    return "tokenizer.json is missing"
  return None


def read_manifest(directory) -> dict | None:
  path = files.path(directory) / MANIFEST
  return files.read_json(path) if path.exists() else None


def _random_access(ids: np.memmap) -> np.memmap:
  """Tells the kernel that `ids` is read at random places (training windows): no read-ahead, so the
  pages resident stay those of the windows read, not megabytes around each of them."""
  advise = getattr(getattr(ids, "_mmap", None), "madvise", None)
  if advise is not None and hasattr(mmap, "MADV_RANDOM"):
    advise(mmap.MADV_RANDOM)
  return ids


def open(directory, expected_hash: str | None = None):  # pylint: disable=redefined-builtin
  """(train_ids, val_ids, tokenizer, manifest) of a prepared directory; the ids are read-only
  np.memmap arrays, so memory does not grow with the corpus."""
  where = f"--data=tokens:{directory}"
  if not files.is_local(directory):
    raise UsageError(f"{where}: token files are memory-mapped and must be on a local disk")
  manifest = read_manifest(directory)
  if manifest is None:
    raise UsageError(f"{where}: no {MANIFEST} (not prepared, or preparation did not finish); run "
                     f"`python -m experiments.prepare_data --out={directory} ...`")
  problem = _complete(directory, manifest)
  if problem:
    raise UsageError(f"{where}: {problem}; prepare it again with experiments.prepare_data")
  if expected_hash is not None and manifest["hash"] != expected_hash:
    raise UsageError(f"{where}: prepared from another source or with other settings "
                     f"({manifest['source']}, split {manifest['split']}, tokenizer "
                     f"{manifest['tokenizer']['kind']}); prepare it again or use another directory")
  dtype = np.dtype(manifest["dtype"])
  ids = []
  for split in SPLITS:
    if manifest["splits"][split]["tokens"]:
      ids.append(_random_access(np.memmap(os.fspath(_bin_path(directory, split)), dtype=dtype,
                                          mode="r")))
    else:
      ids.append(np.zeros(0, dtype))  # mmap cannot map an empty file.
  return ids[0], ids[1], tokenizers.load(directory), manifest


def unigram_counts(directory, split: str) -> np.ndarray:
  """int64[vocab_size]: how often each token id occurs in `split` ('train' or 'val') of a prepared
  directory (counted while it was written: np.bincount of its ids), without reading the ids."""
  if split not in SPLITS:
    raise ValueError(f"split {split!r}: expected one of {SPLITS}")
  where = f"--data=tokens:{directory}"
  manifest = read_manifest(directory)
  if manifest is None:
    raise UsageError(f"{where}: no {MANIFEST} (not prepared, or preparation did not finish)")
  problem = _complete(directory, manifest)
  if problem:
    raise UsageError(f"{where}: {problem}; prepare it again with experiments.prepare_data")
  return _read_counts(directory, split)


def _request(source_spec: str, tokenizer_kind: str, vocab_size: int | None, split: str | None,
             sample_chars: int, model_type: str, max_chars: int | None,
             tfds_data_dir: str | None) -> tuple[Source, SplitRule, dict]:
  """The source, split rule and settings that `prepare` is asked for (checked)."""
  if tokenizer_kind not in tokenizers.KINDS:
    raise UsageError(f"--tokenizer={tokenizer_kind!r}: expected one of {', '.join(tokenizers.KINDS)}")
  if tokenizer_kind == "sentencepiece" and not vocab_size:
    raise UsageError("--tokenizer=sentencepiece needs --vocab_size (e.g. 1000)")
  source = open_source(source_spec, max_chars, tfds_data_dir)
  rule = split_rule(source, split)
  settings = {"format_version": FORMAT_VERSION, "split": rule.to_json(), "max_chars": max_chars,
              "tokenizer": {"kind": tokenizer_kind}}
  if tokenizer_kind == "sentencepiece":
    settings["tokenizer"].update(vocab_size=vocab_size, model_type=model_type,
                                 sample_chars=sample_chars)
  return source, rule, settings


def _prepared(out_dir, source: Source, settings: dict, stats: list[dict], scan: _Scan | None,
              chunk_bytes: int) -> tuple[dict | None, _Scan | None]:
  """(manifest, scan): the manifest of `out_dir` if it is complete and holds `source` prepared with
  `settings` (unchanged file sizes and times, or else an equal hash of the text, say so), else None;
  and `scan`, or the source's scan if this took one (kept for a rewrite)."""
  old = read_manifest(out_dir)
  if old is None or old.get("settings") != settings or _complete(out_dir, old):
    return None, scan
  if old.get("source_files") == stats and old.get("source_dataset") == source.dataset:
    return old, scan
  scan = scan or _scan(source, chunk_bytes)
  return (old if settings_hash(scan.sha256, settings) == old["hash"] else None), scan


def prepare(source_spec: str, out_dir, tokenizer_kind: str = "char", vocab_size: int | None = None,
            split: str | None = None, *, sample_chars: int = DEFAULT_SAMPLE_CHARS,
            model_type: str = "bpe", workers: int | None = None, chunk_bytes: int = _CHUNK_BYTES,
            max_chars: int | None = None, tfds_data_dir: str | None = None, log=None) -> dict:
  """Tokenizes the source into `out_dir` (see the module docstring) and returns its manifest.

  source_spec: 'text:PATH[,PATH...]' or 'tfds:NAME[/CONFIG]' (prepared under `tfds_data_dir`).
  split: None (text: 'tail'; tfds: the dataset's splits), or 'tail' / 'blocks:K:N' for text: only.
  max_chars: read at most this many characters (text: of the joined files, before they are split;
  tfds: of each split); None reads all.

  Idempotent: a directory already prepared from the same text with the same settings is returned as
  it is (manifest["reused"] is True; unchanged file sizes and times, or else an equal hash of the
  text, say so); anything else there is rewritten. With workers > 1 the pool spawns processes (the
  caller may run JAX threads, so no fork): call it from a module or a script whose top level is
  guarded by `if __name__ == "__main__"`.
  """
  log = log or (lambda _: None)
  start = time.perf_counter()
  source, rule, settings = _request(source_spec, tokenizer_kind, vocab_size, split, sample_chars,
                                    model_type, max_chars, tfds_data_dir)
  stats = _file_stats(source.files)
  old, scan = _prepared(out_dir, source, settings, stats, None, chunk_bytes)
  if old is not None:
    log(f"{out_dir}: already prepared from this source with these settings")
    return dict(old, reused=True)

  out = files.path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / MANIFEST).unlink(missing_ok=True)  # From here on the directory is half-written.

  scan = scan or _scan(source, chunk_bytes)
  log(f"counted {sum(scan.chars.values()):,} characters ({scan.source_bytes / 1e6:,.1f} MB), "
      f"{len(scan.alphabet)} distinct")
  if tokenizer_kind == "char":
    tokenizer = tokenizers.CharTokenizer(scan.alphabet)
  elif tokenizer_kind == "byte":
    tokenizer = tokenizers.ByteTokenizer()
  else:
    sample = _sample_training_text(source, rule, scan, sample_chars, chunk_bytes)
    log(f"training SentencePiece (vocab {vocab_size}) on {len(sample):,} characters")
    tokenizer = tokenizers.build("sentencepiece", sample, (), vocab_size, model_type)
    del sample
  dtype = token_dtype(tokenizer.vocab_size)

  counts = {s: {"tokens": 0, "chars": 0} for s in SPLITS}
  unigrams = {s: np.zeros(tokenizer.vocab_size, np.int64) for s in SPLITS}
  pairs = iter_splits(source, rule, scan.chars.get(_CORPUS, 0), chunk_bytes)

  def counted(pairs):
    for pair in pairs:
      for s, text in zip(SPLITS, pair):
        counts[s]["chars"] += len(text)
      yield pair

  # One core reads, splits and writes; the others tokenize (on 2 cores one process is fastest).
  workers = workers or max((os.cpu_count() or 1) - 1, 1)
  if scan.source_bytes <= chunk_bytes:
    workers = 1  # One chunk: starting processes would cost more than it saves.
  digest = settings_hash(scan.sha256, settings)
  tmp = {s: files.temp_path(_bin_path(out, s)) for s in SPLITS}
  try:
    handles = {}
    with contextlib.ExitStack() as stack:
      for s in SPLITS:
        handles[s] = stack.enter_context(tmp[s].open("wb"))
      for ids_pair in _encode_all(counted(pairs), _tokenizer_spec(tokenizer), dtype, workers):
        for s, ids in zip(SPLITS, ids_pair):
          handles[s].write(ids.tobytes())
          counts[s]["tokens"] += len(ids)
          unigrams[s] += np.bincount(ids, minlength=tokenizer.vocab_size)
    done = read_manifest(out)
    if done is not None and done.get("hash") == digest and not _complete(out, done):
      log(f"{out_dir}: another process prepared it meanwhile; using its files")
      return dict(done, reused=True)  # Its readers keep their files (the finally drops ours).
    for s in SPLITS:
      tmp[s].replace(_bin_path(out, s))
  finally:
    for leftover in tmp.values():
      leftover.unlink(missing_ok=True)
  for s in SPLITS:
    _write_counts(out, s, unigrams[s])
  tokenizer.save(out)

  wall = time.perf_counter() - start
  manifest = {
      "format_version": FORMAT_VERSION,
      "source": source_spec,
      "source_files": stats,
      "source_dataset": source.dataset,
      "source_sha256": scan.sha256,
      "source_bytes": scan.source_bytes,
      "max_chars": max_chars,
      "split": rule.spec,
      "split_rule": rule.to_json(),
      "tokenizer": {"kind": tokenizer.kind, "vocab_size": int(tokenizer.vocab_size)},
      "dtype": dtype.str,
      "splits": {s: dict(counts[s], file=f"{s}.bin", counts_file=f"{s}.counts.npy")
                 for s in SPLITS},
      "settings": settings,
      "hash": digest,
      "wall_s": wall,
      "workers": workers,
  }
  files.write_json(out / MANIFEST, manifest)
  return dict(manifest, reused=False)


def mount_type(path, mounts: str | None = None) -> str:
  """The type of the filesystem that holds `path` ('ext4', 'nfs4', 'fuse.gcsfuse', ...), as the
  mount table `mounts` (the text of /proc/mounts if None) says; '' where there is none."""
  if mounts is None:
    try:
      with io.open(_MOUNTS, encoding="utf-8", errors="replace") as f:
        mounts = f.read()
    except OSError:
      return ""
  target = os.path.realpath(os.fspath(path))
  best, fstype = -1, ""
  for line in mounts.splitlines():
    fields = line.split()
    if len(fields) < 3:
      continue
    point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])  # '\040': ' '
    inside = target == point or target.startswith(point.rstrip("/") + "/")
    if inside and len(point) >= best:  # The deepest mount; of equal ones the last (on top).
      best, fstype = len(point), fields[2]
  return fstype


def _lock(lock) -> str | None:
  """Takes an exclusive flock of the open file `lock` (waiting for it); None, or why locks do not
  work on its filesystem."""
  try:
    fcntl.flock(lock, fcntl.LOCK_EX)
  except OSError as e:
    if e.errno not in _NO_LOCKS:
      raise
    return f"file locks do not work there ({errno.errorcode.get(e.errno, e.errno)}: {e.strerror})"
  return None


def wait_prepared(source_spec: str, out_dir, tokenizer_kind: str = "char",
                  vocab_size: int | None = None, split: str | None = None, *,
                  sample_chars: int = DEFAULT_SAMPLE_CHARS, model_type: str = "bpe",
                  chunk_bytes: int = _CHUNK_BYTES, max_chars: int | None = None,
                  tfds_data_dir: str | None = None, timeout_s: float = WAIT_S,
                  poll_s: float = POLL_S) -> dict:
  """The manifest of `out_dir` once another process has prepared it as `prepare` with these
  arguments would (its manifest.json, written last, is the completion marker); a UsageError after
  `timeout_s`."""
  source, _, settings = _request(source_spec, tokenizer_kind, vocab_size, split, sample_chars,
                                 model_type, max_chars, tfds_data_dir)
  stats = _file_stats(source.files)
  deadline, scan = time.monotonic() + timeout_s, None
  while True:
    done, scan = _prepared(out_dir, source, settings, stats, scan, chunk_bytes)
    if done is not None:
      return dict(done, reused=True)
    if time.monotonic() >= deadline:
      raise UsageError(
          f"{out_dir}: waited {timeout_s:,.0f} s for process 0 to prepare {source_spec} there; "
          f"prepare it ahead with one process (`python -m experiments.prepare_data "
          f"--data={source_spec} --out=DIR ...`) and train with --data=tokens:DIR")
    time.sleep(poll_s)


def prepare_shared(lock, source_spec: str, out_dir, tokenizer_kind: str = "char",
                   vocab_size: int | None = None, split: str | None = None, *,
                   primary: bool = True, timeout_s: float = WAIT_S, poll_s: float = POLL_S,
                   log=None, **options) -> dict:
  """`prepare` for processes that share `out_dir` (a data cache; see the module docstring): one
  prepares, the others reuse its files. `lock` is an open file beside `out_dir`.

  Under an exclusive flock of `lock` where locks hold across hosts; on an object-store mount
  (OBJECT_STORE_MOUNTS), or where flock fails with ENOLCK, EOPNOTSUPP or ENOSYS, the `primary`
  process (JAX process 0) prepares and the others wait for its manifest (`wait_prepared`), after
  a one-line warning naming `out_dir` on stderr. `options` are prepare's.
  """
  args = (source_spec, out_dir, tokenizer_kind, vocab_size, split)
  fstype = mount_type(out_dir)
  if fstype in OBJECT_STORE_MOUNTS:
    why = f"a {fstype} mount, where file locks hold within one host only"
    if primary:
      _lock(lock)  # Processes of this host still take turns; if locks fail here, no matter.
  else:
    why = _lock(lock)
    if why is None:
      return prepare(*args, log=log, **options)
  print(f"warning: {out_dir}: {why}; process 0 prepares it without a cross-host lock and the "
        f"others wait for its {MANIFEST} (prepare ahead with experiments.prepare_data to skip "
        "this)", file=sys.stderr)
  if primary:
    return prepare(*args, log=log, **options)
  options.pop("workers", None)
  return wait_prepared(*args, timeout_s=timeout_s, poll_s=poll_s, **options)
