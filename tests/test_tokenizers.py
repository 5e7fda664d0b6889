"""Tokenizers: exact round trips and the characters each token stands for."""
import os

import numpy as np
import pytest

from llm_math import tokenizers
from llm_math.errors import UsageError

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "Caf\u00e9 na\u00efve \u2014 \u00fcber 42!  Two  spaces.\n") * 40


def test_char_round_trip_and_alphabet():
  tok = tokenizers.build("char", TEXT)
  ids = tok.encode(TEXT)
  assert tok.decode(ids) == TEXT
  assert tok.vocab_size == len(set(TEXT))
  assert tok.char_lengths.sum() == tok.vocab_size  # one character per id
  assert tok.byte_lengths[ids].sum() == len(TEXT.encode("utf-8")) > len(TEXT)  # e-acute: 2 bytes


def test_char_unknown_character_is_a_clear_error():
  tok = tokenizers.build("char", "abc")
  with pytest.raises(UsageError, match="'z'"):
    tok.encode("abz")


def test_byte_round_trip_and_char_count():
  tok = tokenizers.build("byte", TEXT)
  ids = tok.encode(TEXT)
  assert len(ids) == len(TEXT.encode("utf-8")) > len(TEXT)
  assert tok.decode(ids) == TEXT
  assert tok.char_lengths[ids].sum() == len(TEXT)
  assert tok.byte_lengths[ids].sum() == len(ids)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_round_trip_save_load(tmp_path, model_type):
  tok = tokenizers.build("sentencepiece", TEXT, vocab_size=300, model_type=model_type)
  assert tok.vocab_size == 300
  ids = tok.encode(TEXT)
  assert len(ids) < len(TEXT)  # merges happened
  assert tok.decode(ids) == TEXT
  assert tok.char_lengths[ids].sum() == len(TEXT)
  assert tok.byte_lengths[ids].sum() == len(TEXT.encode("utf-8"))
  unseen = "\u4e2d\u6587 and new words\nline"
  assert tok.decode(tok.encode(unseen)) == unseen  # byte fallback
  assert tok.byte_lengths[tok.encode(unseen)].sum() == len(unseen.encode("utf-8"))
  tok.save(str(tmp_path))
  again = tokenizers.load(str(tmp_path))
  np.testing.assert_array_equal(again.encode(TEXT), ids)


def test_sentencepiece_vocab_too_large_is_a_clear_error():
  with pytest.raises(UsageError, match="--vocab_size=5000"):
    tokenizers.build("sentencepiece", "tiny corpus\n" * 5, vocab_size=5000)
  with pytest.raises(UsageError, match="needs more than"):
    tokenizers.build("sentencepiece", TEXT, vocab_size=100)


def test_unknown_tokenizer_and_missing_saved_tokenizer(tmp_path):
  with pytest.raises(UsageError, match="--tokenizer='word'"):
    tokenizers.build("word", TEXT)
  with pytest.raises(UsageError, match="no saved tokenizer"):
    tokenizers.load(str(tmp_path))


def test_save_load_char_and_byte(tmp_path):
  for kind in ("char", "byte"):
    d = tmp_path / kind
    os.makedirs(d)
    tok = tokenizers.build(kind, TEXT)
    tok.save(str(d))
    assert tokenizers.load(str(d)).decode(tok.encode(TEXT)) == TEXT
