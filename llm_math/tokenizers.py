"""Tokenizers: characters, UTF-8 bytes, and SentencePiece (BPE or unigram) trained on the training split.

Every tokenizer maps text <-> int32 ids and knows how many characters each id stands for
(`char_lengths`) and how many UTF-8 bytes (`byte_lengths`), so a per-token NLL converts exactly to bits
per character or per byte and models with different vocabularies are compared on one scale.
"""

import io
import os

import numpy as np

from llm_math import files
from llm_math.errors import UsageError

KINDS = ("char", "byte", "sentencepiece")
_SP_NEWLINE = "\n"


class CharTokenizer:
  """One id per distinct character.

  The alphabet is the sorted set of characters of all splits (nanoGPT's convention: the symbol set is
  known, its statistics are learned from the training split only).
  """
  kind = "char"

  def __init__(self, chars: str):
    self.chars = chars
    self._index = {c: i for i, c in enumerate(chars)}
    self.vocab_size = len(chars)
    self.char_lengths = np.ones(self.vocab_size, np.int32)
    self.byte_lengths = np.array([len(c.encode("utf-8")) for c in chars], np.int32)

  @classmethod
  def train(cls, texts):
    return cls("".join(sorted(set().union(*map(set, texts)))))

  def encode(self, text: str) -> np.ndarray:
    try:
      return np.fromiter((self._index[c] for c in text), np.int32, count=len(text))
    except KeyError as e:
      raise UsageError(f"character {e.args[0]!r} is not in the tokenizer's alphabet") from None

  def decode(self, ids) -> str:
    return "".join(self.chars[i] for i in np.asarray(ids).tolist())

  def save(self, directory):
    files.write_json(files.path(directory) / "tokenizer.json", {"kind": self.kind, "chars": self.chars})


class ByteTokenizer:
  """The 256 UTF-8 byte values; a continuation byte (0b10xxxxxx) covers zero characters."""
  kind = "byte"
  vocab_size = 256

  def __init__(self):
    b = np.arange(256)
    self.char_lengths = np.where((b >= 0x80) & (b < 0xC0), 0, 1).astype(np.int32)
    self.byte_lengths = np.ones(256, np.int32)

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(np.asarray(ids, np.uint8).tolist()).decode("utf-8", errors="replace")

  def save(self, directory):
    files.write_json(files.path(directory) / "tokenizer.json", {"kind": self.kind})


class SentencePieceTokenizer:
  """SentencePiece BPE or unigram model with byte fallback and newline as a piece of its own.

  Text is normalized with the identity rule and whitespace is kept as is, so decode(encode(s)) == s.
  Lines are encoded separately and joined by the newline piece (SentencePiece sees one line per sentence).
  """
  kind = "sentencepiece"

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self.model_proto = model_proto
    self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self.sp.get_piece_size()
    self.newline_id = self.sp.piece_to_id(_SP_NEWLINE)
    lengths = []  # (characters, bytes) per piece
    for i in range(self.vocab_size):
      piece = self.sp.id_to_piece(i)
      if self.sp.is_byte(i):
        byte = int(piece[3:5], 16)
        lengths.append((0 if 0x80 <= byte < 0xC0 else 1, 1))
      elif self.sp.is_control(i) or self.sp.is_unknown(i):
        lengths.append((0, 0))
      else:
        text = piece.replace("\u2581", " ")
        lengths.append((len(text), len(text.encode("utf-8"))))
    self.char_lengths, self.byte_lengths = np.asarray(lengths, np.int32).reshape(-1, 2).T

  @classmethod
  def train(cls, text: str, vocab_size: int, model_type: str = "bpe"):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    lines = [line for line in text.split("\n") if line]
    if not lines:
      raise UsageError("cannot train SentencePiece on an empty training split")
    writer = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(lines), model_writer=writer, vocab_size=vocab_size,
          model_type=model_type, character_coverage=1.0, byte_fallback=True,
          normalization_rule_name="identity", remove_extra_whitespaces=False,
          add_dummy_prefix=False, user_defined_symbols=[_SP_NEWLINE], bos_id=-1, eos_id=-1,
          unk_id=0, pad_id=-1, minloglevel=2, num_threads=os.cpu_count() or 1,
          max_sentence_length=1 << 16, train_extremely_large_corpus=False)
    except RuntimeError as e:
      raise UsageError(
          f"--vocab_size={vocab_size}: SentencePiece could not train on this corpus "
          f"({str(e).strip().splitlines()[-1]})") from None
    return cls(writer.getvalue())

  def encode(self, text: str) -> np.ndarray:
    pieces = self.sp.encode(text.split("\n"))
    out = []
    for i, ids in enumerate(pieces):
      if i:
        out.append(self.newline_id)
      out.extend(ids)
    return np.asarray(out, np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids).tolist()
    lines, current = [], []
    for i in ids:
      if i == self.newline_id:
        lines.append(current)
        current = []
      else:
        current.append(i)
    lines.append(current)
    return "\n".join(self.sp.decode(line) for line in lines)

  def save(self, directory):
    files.write_bytes(files.path(directory) / "tokenizer.model", self.model_proto)
    files.write_json(files.path(directory) / "tokenizer.json",
                     {"kind": self.kind, "model_file": "tokenizer.model"})


def build(kind: str, train_text: str, other_texts=(), vocab_size: int | None = None,
          model_type: str = "bpe"):
  """Builds a tokenizer of `kind` from the training split (`other_texts` only extend a char alphabet)."""
  if kind == "char":
    return CharTokenizer.train([train_text, *other_texts])
  if kind == "byte":
    return ByteTokenizer()
  if kind == "sentencepiece":
    required = 256 + len(set(train_text)) + 2  # byte pieces, every character, unk and newline
    if not vocab_size or vocab_size <= required:
      raise UsageError(f"--vocab_size={vocab_size}: SentencePiece with byte fallback needs more than "
                       f"{required} on this corpus (256 bytes + {len(set(train_text))} characters + "
                       "unk + newline), plus room for merges")
    return SentencePieceTokenizer.train(train_text, vocab_size, model_type)
  raise UsageError(f"--tokenizer={kind!r}: expected one of {', '.join(KINDS)}")


def load(directory):
  """Loads a tokenizer written by `save` into `directory` (a local path or a URL)."""
  path = files.path(directory) / "tokenizer.json"
  if not path.exists():
    raise UsageError(f"{path}: no saved tokenizer (is this a training workdir?)")
  meta = files.read_json(path)
  if meta["kind"] == "char":
    return CharTokenizer(meta["chars"])
  if meta["kind"] == "byte":
    return ByteTokenizer()
  return SentencePieceTokenizer((files.path(directory) / meta["model_file"]).read_bytes())
