"""Token stores: prepared splits equal data.load's, the blocks rule, idempotence, memmapped training."""
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from llm_math import data as data_lib
from llm_math import token_store
from llm_math.errors import UsageError

from tests import helpers

_WORDS = ["the", "cat", "sat", "on", "a", "mat", "naïve", "café", "日本", "zebra", "of", "and", "\t"]


def _write_corpus(path, n_chars: int, seed: int = 0, newline: str = "\n") -> str:
  """A random text of about `n_chars` characters (some lines empty, some non-ASCII)."""
  rng = random.Random(seed)
  lines, n = [], 0
  while n < n_chars:
    line = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(0, 12)))
    lines.append(line)
    n += len(line) + 1
  text = newline.join(lines)
  path.write_bytes(text.encode("utf-8"))
  return text


def _mtimes(directory):
  return {name: os.stat(directory / name).st_mtime_ns for name in
          ("train.bin", "val.bin", "tokenizer.json", "manifest.json")}


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_tail_rule_ids_equal_data_load(tmp_path, kind):
  a, b = tmp_path / "a.txt", tmp_path / "b.txt"
  _write_corpus(a, 30_000, seed=1, newline="\r\n")  # Read with universal newlines, as data.load does.
  _write_corpus(b, 20_000, seed=2)
  spec = f"text:{a},{b}"
  manifest = token_store.prepare(spec, tmp_path / "out", kind, chunk_bytes=4096, workers=1)
  train_ids, val_ids, tokenizer, manifest = token_store.open(tmp_path / "out")
  expected = data_lib.load(spec, tokenizer=kind)
  assert isinstance(train_ids, np.memmap) and train_ids.dtype == np.dtype("<u2")
  np.testing.assert_array_equal(train_ids, expected.train_ids)
  np.testing.assert_array_equal(val_ids, expected.val_ids)
  assert tokenizer.vocab_size == expected.tokenizer.vocab_size
  chars = len(expected.tokenizer.decode(expected.train_ids)), len(expected.tokenizer.decode(
      expected.val_ids))
  assert (manifest["splits"]["train"]["chars"], manifest["splits"]["val"]["chars"]) == chars
  assert manifest["splits"]["train"]["tokens"] == len(expected.train_ids)
  assert token_store.TRAIN_FRACTION == data_lib.TRAIN_FRACTION


def _reference_blocks(text: str, n: int) -> list[str]:
  blocks, start = [], 0
  while start < len(text):
    newline = text.find("\n", start + n - 1)
    end = len(text) if newline < 0 else newline + 1
    blocks.append(text[start:end])
    start = end
  return blocks


def test_blocks_rule_puts_every_kth_block_in_validation(tmp_path):
  path = tmp_path / "c.txt"
  text = _write_corpus(path, 60_000, seed=3)
  k, n = 4, 700
  manifest = token_store.prepare(f"text:{path}", tmp_path / "out", "byte", split=f"blocks:{k}:{n}",
                                 chunk_bytes=5000, workers=2)  # Several chunks on a process pool.
  assert manifest["workers"] == 2
  train_ids, val_ids, tokenizer, manifest = token_store.open(tmp_path / "out")
  blocks = _reference_blocks(text, n)
  assert all(len(b) >= n and b.endswith("\n") for b in blocks[:-1])
  assert tokenizer.decode(val_ids) == "".join(b for i, b in enumerate(blocks) if i % k == k - 1)
  assert tokenizer.decode(train_ids) == "".join(b for i, b in enumerate(blocks) if i % k != k - 1)
  # Walking the blocks and taking each from its split gives the corpus's tokens in order.
  streams, pos, merged = {True: val_ids, False: train_ids}, {True: 0, False: 0}, []
  for i, block in enumerate(blocks):
    is_val, size = i % k == k - 1, len(block.encode("utf-8"))
    merged.append(np.asarray(streams[is_val][pos[is_val]:pos[is_val] + size]))
    pos[is_val] += size
  np.testing.assert_array_equal(np.concatenate(merged), tokenizer.encode(text))
  assert manifest["split_rule"] == {"rule": "blocks", "every": k, "block_chars": n}
  assert manifest["splits"]["val"]["chars"] == sum(len(b) for b in blocks[k - 1::k])


def test_prepare_is_idempotent_and_redoes_a_half_written_dir(tmp_path):
  path = tmp_path / "c.txt"
  _write_corpus(path, 5_000)
  out = tmp_path / "out"
  assert not token_store.prepare(f"text:{path}", out, "char")["reused"]
  before = _mtimes(out)
  again = token_store.prepare(f"text:{path}", out, "char")
  assert again["reused"] and _mtimes(out) == before
  os.utime(path)  # Touched, same bytes: recognized by its hash.
  assert token_store.prepare(f"text:{path}", out, "char")["reused"]

  (out / "manifest.json").unlink()  # As if preparation had stopped before its last write.
  with pytest.raises(UsageError, match="no manifest.json"):
    token_store.open(out)
  with pytest.raises(UsageError, match="no manifest.json"):
    data_lib.load(f"tokens:{out}")
  redone = token_store.prepare(f"text:{path}", out, "char")
  assert not redone["reused"] and (out / "manifest.json").exists()
  token_store.open(out)


def test_another_source_or_settings_is_detected(tmp_path):
  path = tmp_path / "c.txt"
  _write_corpus(path, 5_000, seed=4)
  out = tmp_path / "out"
  first = token_store.prepare(f"text:{path}", out, "char")
  assert token_store.open(out, expected_hash=first["hash"])[3]["hash"] == first["hash"]

  other = token_store.prepare(f"text:{path}", out, "char", split="blocks:5:100")
  assert not other["reused"] and other["hash"] != first["hash"]
  with pytest.raises(UsageError, match="another source or with other settings"):
    token_store.open(out, expected_hash=first["hash"])

  _write_corpus(path, 5_000, seed=5)  # New bytes under the same name.
  changed = token_store.prepare(f"text:{path}", out, "char", split="blocks:5:100")
  assert not changed["reused"] and changed["hash"] != other["hash"]

  (out / "val.bin").write_bytes(b"\0\0")  # A token file that does not match its manifest.
  with pytest.raises(UsageError, match="val.bin"):
    token_store.open(out)


def test_load_tokens_dir_memmaps_and_trains_on_the_same_batches(tmp_path):
  path = tmp_path / "c.txt"
  _write_corpus(path, 20_000, seed=6)
  out = tmp_path / "out"
  token_store.prepare(f"text:{path}", out, "char")
  workdir = tmp_path / "run"
  workdir.mkdir()
  ds = data_lib.load(f"tokens:{out}", workdir=str(workdir))
  in_memory = data_lib.load(f"text:{path}", tokenizer="char")
  assert isinstance(ds.train_ids, np.memmap) and isinstance(ds.val_ids, np.memmap)
  assert str(out) in ds.description and "split tail" in ds.description
  assert (workdir / "tokenizer.json").exists()
  data_lib.check_fits(ds, 32)
  for step in (0, 7):
    x, y = data_lib.train_batch(ds.train_ids, 32, 8, seed=1, step=step)
    x_ref, y_ref = data_lib.train_batch(in_memory.train_ids, 32, 8, seed=1, step=step)
    np.testing.assert_array_equal(x, x_ref)
    np.testing.assert_array_equal(y, y_ref)
  w, w_ref = data_lib.eval_windows(ds.val_ids, 32), data_lib.eval_windows(in_memory.val_ids, 32)
  np.testing.assert_array_equal(w.targets_NxT, w_ref.targets_NxT)


def test_sentencepiece_round_trips_and_counts_characters(tmp_path):
  path = tmp_path / "c.txt"
  text = _write_corpus(path, 200_000, seed=7)
  manifest = token_store.prepare(f"text:{path}", tmp_path / "out", "sentencepiece", vocab_size=300,
                                 chunk_bytes=20_000, workers=1, sample_chars=50_000)
  train_ids, val_ids, tokenizer, manifest = token_store.open(tmp_path / "out")
  assert tokenizer.vocab_size == 300 and manifest["tokenizer"]["kind"] == "sentencepiece"
  split = int(len(text) * token_store.TRAIN_FRACTION)
  assert tokenizer.decode(train_ids) == text[:split]
  assert tokenizer.decode(val_ids) == text[split:]
  for name, ids in (("train", train_ids), ("val", val_ids)):
    chars = manifest["splits"][name]["chars"]
    assert chars == int(tokenizer.char_lengths[np.asarray(ids)].sum())
    assert manifest["splits"][name]["tokens"] == len(ids) < chars  # Merges: fewer tokens than chars.


def test_sentencepiece_ids_equal_data_load_when_the_sample_is_the_whole_training_split(tmp_path):
  path = tmp_path / "c.txt"
  _write_corpus(path, 60_000, seed=8)
  token_store.prepare(f"text:{path}", tmp_path / "out", "sentencepiece", vocab_size=300,
                      chunk_bytes=8192, workers=1)
  train_ids, val_ids, _, _ = token_store.open(tmp_path / "out")
  expected = data_lib.load(f"text:{path}", tokenizer="sentencepiece", vocab_size=300)
  np.testing.assert_array_equal(train_ids, expected.train_ids)
  np.testing.assert_array_equal(val_ids, expected.val_ids)


@pytest.mark.parametrize("args,message", [
    (("tfds:tiny_shakespeare",), "tfds sources are not yet supported"),
    (("text:",), "no path given"),
    (("text:/nonexistent/c.txt",), "no such file"),
    (("text:{path}", "char", None, "blocks:1:10"), "--split='blocks:1:10'"),
    (("text:{path}", "sentencepiece"), "needs --vocab_size"),
    (("text:{empty}",), "the file is empty"),
    (("text:{latin1}",), "not UTF-8 text"),
])
def test_user_mistakes(tmp_path, args, message):
  path, empty, latin1 = tmp_path / "c.txt", tmp_path / "e.txt", tmp_path / "l.txt"
  _write_corpus(path, 1000)
  empty.write_text("")
  latin1.write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
  spec = args[0].format(path=path, empty=empty, latin1=latin1)
  with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("[", r"\[")):
    token_store.prepare(spec, tmp_path / "out", *args[1:])


def test_prepare_data_script(tmp_path):
  path = tmp_path / "c.txt"
  _write_corpus(path, 5_000)
  cmd = [sys.executable, "-m", "experiments.prepare_data", f"--data=text:{path}", "--tokenizer=byte",
         "--split=blocks:3:200", f"--out={tmp_path / 'out'}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, cwd=helpers.REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "train" in proc.stdout and "MB/s" in proc.stdout and "<u2" in proc.stdout
  again = subprocess.run(cmd, cwd=helpers.REPO, env=env, capture_output=True, text=True, timeout=120)
  assert "already prepared" in again.stdout, again.stdout
