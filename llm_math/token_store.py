"""Corpora tokenized once into flat token files that training memory-maps (nanoGPT's prepare.py).

A prepared directory holds:
  train.bin, val.bin   the token ids of each split, flat little-endian uint16 (vocab_size <= 65535)
                       or uint32, in corpus order
  tokenizer.json (+ tokenizer.model)   the tokenizer, as `tokenizers.save` writes it
  manifest.json        written last: format version, source, split rule, tokenizer, dtype, token and
                       character counts per split (for bits per character), and `hash`, a sha256 of
                       the source's bytes and of the settings

A directory without manifest.json is half-written: `open` refuses it, `prepare` redoes it.

`prepare` streams the source: it reads the files in chunks that end at line breaks, never the whole
corpus, and tokenizes chunks on a process pool (order preserved) while appending ids to the .bin
files. Three passes over the source: one counts characters, collects the alphabet and hashes the bytes;
one samples the training split for SentencePiece (only that tokenizer); one tokenizes.

Split rules (`--split`):
  tail          the last 10% of characters are validation (data.load's rule for text: sources; the ids
                equal data.load's for every tokenizer trained on the same text)
  blocks:K:N    the corpus cut into blocks of at least N characters, each ending at the first line
                break at or after its N-th character (or at the end of the corpus); every K-th block
                (index % K == K - 1) is validation
"""

import codecs
import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import time

import numpy as np

from llm_math import files
from llm_math import tokenizers
from llm_math.errors import UsageError

FORMAT_VERSION = 1
TRAIN_FRACTION = 0.9  # The 'tail' rule: data.TRAIN_FRACTION, today's split of text: sources.
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
DEFAULT_SAMPLE_CHARS = 20_000_000
_CHUNK_BYTES = 4 << 20
_MAX_CARRY_CHARS = 64 << 20  # A line longer than this is cut (only SentencePiece ids notice).


@dataclasses.dataclass(frozen=True)
class SplitRule:
  """'tail' (every > 0 is unset) or 'blocks:K:N' (every = K, block_chars = N)."""
  every: int = 0
  block_chars: int = 0

  @property
  def spec(self) -> str:
    return f"blocks:{self.every}:{self.block_chars}" if self.every else "tail"

  def describe(self) -> str:
    if self.every:
      return (f"every {self.every}th block of {self.block_chars:,} characters (to a line break) "
              "is validation")
    return f"first {TRAIN_FRACTION:.0%} of characters train / last {1 - TRAIN_FRACTION:.0%} validation"

  def to_json(self) -> dict:
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


def text_paths(source_spec: str) -> list[str]:
  """The files of a 'text:PATH[,PATH...]' spec (other sources are not streamed yet)."""
  if source_spec.startswith("tfds:"):
    raise UsageError("tfds sources are not yet supported by prepare_data; use text:")
  if not source_spec.startswith("text:"):
    raise UsageError(f"--data={source_spec!r}: prepare_data expects 'text:PATH[,PATH...]'")
  paths = [p for p in source_spec[len("text:"):].split(",") if p]
  if not paths:
    raise UsageError("--data=text:PATH[,PATH...]: no path given")
  for p in paths:
    if not os.path.isfile(p):
      raise UsageError(f"--data=text:{p}: no such file")
  return paths


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


def iter_splits(paths, rule: SplitRule, total_chars: int, chunk_bytes: int = _CHUNK_BYTES):
  """Yields (train_text, val_text) pieces of the corpus in order; each piece of a split ends at a line
  break or where that split's text ends, so tokenizing piece by piece equals tokenizing the split."""
  split_at = int(total_chars * TRAIN_FRACTION)
  pos, block_index, block_len = 0, 0, 0
  for text in iter_text(paths, chunk_bytes):
    if rule.every:
      train, val, block_index, block_len = cut_blocks(text, block_index, block_len, rule)
      yield train, val
    else:
      cut = min(max(split_at - pos, 0), len(text))
      yield text[:cut], text[cut:]
    pos += len(text)


@dataclasses.dataclass
class _Scan:
  total_chars: int
  alphabet: str
  file_sha256: list[str]
  source_bytes: int


def _scan(paths, chunk_bytes: int) -> _Scan:
  """The counting pass: characters, the alphabet and each file's sha256."""
  hashers = [hashlib.sha256() for _ in paths]
  n_bytes = [0]

  def on_bytes(index, raw):
    hashers[index].update(raw)
    n_bytes[0] += len(raw)

  total, chars = 0, set()
  for text in iter_text(paths, chunk_bytes, on_bytes):
    total += len(text)
    chars.update(text)
  return _Scan(total, "".join(sorted(chars)), [h.hexdigest() for h in hashers], n_bytes[0])


def _file_sha256(paths, chunk_bytes: int = _CHUNK_BYTES) -> list[str]:
  out = []
  for path in paths:
    h = hashlib.sha256()
    with io.open(path, "rb") as f:
      for raw in iter(lambda: f.read(chunk_bytes), b""):
        h.update(raw)
    out.append(h.hexdigest())
  return out


def _file_stats(paths) -> list[dict]:
  return [{"path": os.path.abspath(p), "bytes": os.stat(p).st_size,
           "mtime_ns": os.stat(p).st_mtime_ns} for p in paths]


def settings_hash(file_sha256: list[str], settings: dict) -> str:
  """The identity of a prepared directory: the source's bytes (file by file) and the settings."""
  return hashlib.sha256(json.dumps({"source_sha256": file_sha256, "settings": settings},
                                   sort_keys=True).encode()).hexdigest()


def _sample_training_text(paths, rule, scan, sample_chars: int, chunk_bytes: int) -> str:
  """At most about `sample_chars` characters of the training split, spread evenly over it."""
  fraction = (rule.every - 1) / rule.every if rule.every else TRAIN_FRACTION
  train_chars = int(scan.total_chars * fraction)  # Exact for 'tail', about right for blocks.
  parts, seen, taken = [], 0, 0
  for train, _ in iter_splits(paths, rule, scan.total_chars, chunk_bytes):
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
  if not (files.path(directory) / "tokenizer.json").exists():
    return "tokenizer.json is missing"
  return None


def read_manifest(directory) -> dict | None:
  path = files.path(directory) / MANIFEST
  return files.read_json(path) if path.exists() else None


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
      ids.append(np.memmap(os.fspath(_bin_path(directory, split)), dtype=dtype, mode="r"))
    else:
      ids.append(np.zeros(0, dtype))  # mmap cannot map an empty file.
  return ids[0], ids[1], tokenizers.load(directory), manifest


def prepare(source_spec: str, out_dir, tokenizer_kind: str = "char", vocab_size: int | None = None,
            split: str = "tail", *, sample_chars: int = DEFAULT_SAMPLE_CHARS,
            model_type: str = "bpe", workers: int | None = None, chunk_bytes: int = _CHUNK_BYTES,
            log=None) -> dict:
  """Tokenizes the source into `out_dir` (see the module docstring) and returns its manifest.

  Idempotent: a directory already prepared from the same bytes with the same settings is returned as
  it is (manifest["reused"] is True); anything else there is rewritten. With workers > 1 the pool
  spawns processes (the caller may run JAX threads, so no fork): call it from a module or a script
  whose top level is guarded by `if __name__ == "__main__"`.
  """
  log = log or (lambda _: None)
  start = time.perf_counter()
  paths = text_paths(source_spec)
  rule = parse_split(split)
  if tokenizer_kind not in tokenizers.KINDS:
    raise UsageError(f"--tokenizer={tokenizer_kind!r}: expected one of {', '.join(tokenizers.KINDS)}")
  if tokenizer_kind == "sentencepiece" and not vocab_size:
    raise UsageError("--tokenizer=sentencepiece needs --vocab_size (e.g. 1000)")
  settings = {"format_version": FORMAT_VERSION, "split": rule.to_json(),
              "tokenizer": {"kind": tokenizer_kind}}
  if tokenizer_kind == "sentencepiece":
    settings["tokenizer"].update(vocab_size=vocab_size, model_type=model_type,
                                 sample_chars=sample_chars)
  stats = _file_stats(paths)

  old = read_manifest(out_dir)
  if old is not None and old.get("settings") == settings and not _complete(out_dir, old):
    same = (old.get("source_files") == stats
            or settings_hash(_file_sha256(paths, chunk_bytes), settings) == old["hash"])
    if same:
      log(f"{out_dir}: already prepared from these files with these settings")
      return dict(old, reused=True)

  out = files.path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / MANIFEST).unlink(missing_ok=True)  # From here on the directory is half-written.

  scan = _scan(paths, chunk_bytes)
  log(f"counted {scan.total_chars:,} characters ({scan.source_bytes / 1e6:,.1f} MB), "
      f"{len(scan.alphabet)} distinct")
  if tokenizer_kind == "char":
    tokenizer = tokenizers.CharTokenizer(scan.alphabet)
  elif tokenizer_kind == "byte":
    tokenizer = tokenizers.ByteTokenizer()
  else:
    sample = _sample_training_text(paths, rule, scan, sample_chars, chunk_bytes)
    log(f"training SentencePiece (vocab {vocab_size}) on {len(sample):,} characters")
    tokenizer = tokenizers.build("sentencepiece", sample, (), vocab_size, model_type)
    del sample
  dtype = token_dtype(tokenizer.vocab_size)

  counts = {s: {"tokens": 0, "chars": 0} for s in SPLITS}
  pairs = iter_splits(paths, rule, scan.total_chars, chunk_bytes)

  def counted(pairs):
    for pair in pairs:
      for s, text in zip(SPLITS, pair):
        counts[s]["chars"] += len(text)
      yield pair

  workers = workers or os.cpu_count() or 1
  if scan.source_bytes <= chunk_bytes:
    workers = 1  # One chunk: starting processes would cost more than it saves.
  tmp = {s: out / f".{s}.bin.tmp.{os.getpid()}" for s in SPLITS}
  handles = {s: tmp[s].open("wb") for s in SPLITS}
  try:
    for ids_pair in _encode_all(counted(pairs), _tokenizer_spec(tokenizer), dtype, workers):
      for s, ids in zip(SPLITS, ids_pair):
        handles[s].write(ids.tobytes())
        counts[s]["tokens"] += len(ids)
  finally:
    for h in handles.values():
      h.close()
  for s in SPLITS:
    tmp[s].replace(_bin_path(out, s))
  tokenizer.save(out)

  wall = time.perf_counter() - start
  manifest = {
      "format_version": FORMAT_VERSION,
      "source": source_spec,
      "source_files": stats,
      "source_sha256": scan.file_sha256,
      "source_bytes": scan.source_bytes,
      "split": rule.spec,
      "split_rule": rule.to_json(),
      "tokenizer": {"kind": tokenizer.kind, "vocab_size": int(tokenizer.vocab_size)},
      "dtype": dtype.str,
      "splits": {s: dict(counts[s], file=f"{s}.bin") for s in SPLITS},
      "settings": settings,
      "hash": settings_hash(scan.file_sha256, settings),
      "wall_s": wall,
      "workers": workers,
  }
  files.write_json(out / MANIFEST, manifest)
  return dict(manifest, reused=False)
