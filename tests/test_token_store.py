"""Token stores: prepared splits equal each split tokenized whole (text: and tfds: sources), the
blocks rule, max_chars, unigram counts, idempotence, memmapped training."""
import errno
import fcntl
import os
import random
import socket
import subprocess
import sys

import numpy as np
import pytest

from llm_math import data as data_lib
from llm_math import files
from llm_math import token_store
from llm_math import tokenizers
from llm_math.errors import UsageError

from tests import helpers

_WORDS = helpers.CORPUS_WORDS
_write_corpus = helpers.write_corpus


def _joined_text(paths) -> str:
  """The text of a text: source as data.load read it before token stores: each file read whole with
  universal newlines, joined by '\\n'."""
  texts = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      texts.append(f.read())
  return "\n".join(texts)


def _tail(text: str) -> tuple[str, str]:
  cut = int(len(text) * 0.9)
  return text[:cut], text[cut:]


def _reference(train_text: str, val_text: str, kind: str, vocab_size=None):
  """(train_ids, val_ids, tokenizer): each split tokenized whole (data.load's former path)."""
  tokenizer = tokenizers.build(kind, train_text, [val_text], vocab_size)
  return tokenizer.encode(train_text), tokenizer.encode(val_text), tokenizer


def _mtimes(directory):
  return {name: os.stat(directory / name).st_mtime_ns for name in
          ("train.bin", "val.bin", "train.counts.npy", "val.counts.npy", "tokenizer.json",
           "manifest.json")}


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_tail_rule_ids_equal_tokenizing_the_splits_whole(tmp_path, kind):
  a, b = tmp_path / "a.txt", tmp_path / "b.txt"
  _write_corpus(a, 30_000, seed=1, newline="\r\n")  # Read with universal newlines, as open() does.
  _write_corpus(b, 20_000, seed=2)
  spec = f"text:{a},{b}"
  manifest = token_store.prepare(spec, tmp_path / "out", kind, chunk_bytes=4096, workers=1)
  train_ids, val_ids, tokenizer, manifest = token_store.open(tmp_path / "out")
  train_text, val_text = _tail(_joined_text([a, b]))
  expected_train, expected_val, expected = _reference(train_text, val_text, kind)
  assert isinstance(train_ids, np.memmap) and train_ids.dtype == np.dtype("<u2")
  np.testing.assert_array_equal(train_ids, expected_train)
  np.testing.assert_array_equal(val_ids, expected_val)
  assert tokenizer.vocab_size == expected.vocab_size
  assert (manifest["splits"]["train"]["chars"], manifest["splits"]["val"]["chars"]) == (
      len(train_text), len(val_text))
  assert manifest["splits"]["train"]["tokens"] == len(expected_train)
  assert token_store.TRAIN_FRACTION == 0.9


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
  train_ref, val_ref, tok_ref = _reference(*_tail(_joined_text([path])), "char")
  in_memory = data_lib.Dataset("in memory", train_ref, val_ref, tok_ref)
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


def test_reference_nlls_use_the_stored_unigram_counts(tmp_path, monkeypatch):
  from llm_math import evaluation  # pylint: disable=g-import-not-at-top
  from llm_math.analysis import ngram  # pylint: disable=g-import-not-at-top
  path = tmp_path / "c.txt"
  _write_corpus(path, 20_000, seed=13)
  out = tmp_path / "out"
  token_store.prepare(f"text:{path}", out, "char", workers=1)
  ds = data_lib.load(f"tokens:{out}")
  v = ds.vocab_size
  np.testing.assert_array_equal(ds.train_counts, np.bincount(np.asarray(ds.train_ids), minlength=v))
  windows = data_lib.eval_windows(ds.val_ids, 32)
  positions, _ = windows.scored()
  counts = np.bincount(np.asarray(ds.train_ids), minlength=v) + 1.0  # Counting the whole split.
  expected = float(-np.mean(np.log(counts[np.asarray(ds.val_ids)[positions]] / counts.sum())))
  in_memory = data_lib.Dataset("in memory", np.asarray(ds.train_ids), ds.val_ids, ds.tokenizer)
  assert evaluation.reference_nlls(in_memory, windows)["unigram"] == expected  # Counted in chunks.
  monkeypatch.setattr(ngram, "token_counts", lambda *_: pytest.fail("the split was read"))
  refs = evaluation.reference_nlls(ds, windows)
  assert refs["unigram"] == expected and refs["uniform"] == np.log(v)


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


def test_sentencepiece_ids_equal_tokenizing_whole_when_the_sample_is_the_training_split(tmp_path):
  path = tmp_path / "c.txt"
  _write_corpus(path, 60_000, seed=8)
  token_store.prepare(f"text:{path}", tmp_path / "out", "sentencepiece", vocab_size=300,
                      chunk_bytes=8192, workers=1)
  train_ids, val_ids, _, _ = token_store.open(tmp_path / "out")
  expected_train, expected_val, _ = _reference(*_tail(_joined_text([path])), "sentencepiece", 300)
  np.testing.assert_array_equal(train_ids, expected_train)
  np.testing.assert_array_equal(val_ids, expected_val)


@pytest.mark.parametrize("args,message", [
    (("tokens:/tmp/x",), "expected 'text:PATH[,PATH...]' or 'tfds:NAME[/CONFIG]'"),
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


def test_temp_names_differ_between_hosts_with_the_same_pid(tmp_path, monkeypatch):
  monkeypatch.setattr(os, "getpid", lambda: 7)  # Containers on a pod often share process ids.
  target = files.path(tmp_path / "train.bin")
  names = {}
  for host in ("host-a", "host-b"):
    monkeypatch.setattr(socket, "gethostname", lambda host=host: host)
    names[host] = files.temp_path(target).name
  assert names["host-a"].startswith(".train.bin.tmp.host-a.7.")
  assert names["host-b"].startswith(".train.bin.tmp.host-b.7.")
  assert files.temp_path(target) != files.temp_path(target)  # And a random token per file.
  # Every file of a store is written under such a name, and none is left behind.
  made, temp_path = [], files.temp_path
  monkeypatch.setattr(files, "temp_path", lambda t: made.append(temp_path(t)) or made[-1])
  path, out = tmp_path / "c.txt", tmp_path / "out"
  _write_corpus(path, 5_000)
  token_store.prepare(f"text:{path}", out, "sentencepiece", 320, workers=1)
  assert sorted(p.name.split(".tmp.")[0] for p in made) == [
      ".manifest.json", ".tokenizer.json", ".tokenizer.model", ".train.bin", ".train.counts.npy",
      ".val.bin", ".val.counts.npy"]
  assert all(".tmp.host-b.7." in p.name for p in made)
  assert not [p for p in out.iterdir() if ".tmp." in p.name]


def test_flock_without_locks_lets_process_0_prepare_and_the_others_wait(tmp_path, monkeypatch,
                                                                        capsys):
  def no_locks(*_):
    raise OSError(errno.ENOLCK, "No locks available")
  monkeypatch.setattr(fcntl, "flock", no_locks)
  path, out = tmp_path / "c.txt", tmp_path / "cache" / "c-char"
  _write_corpus(path, 5_000)
  out.parent.mkdir()
  spec = f"text:{path}"
  with open(f"{out}.lock", "a") as lock:
    with pytest.raises(UsageError, match="waited 0 s for process 0 to prepare .* prepare it ahead "
                                         "with one process") as e:
      token_store.prepare_shared(lock, spec, out, "char", primary=False, timeout_s=0)
    assert "\n" not in str(e.value)
    manifest = token_store.prepare_shared(lock, spec, out, "char", primary=True)
    waited = token_store.prepare_shared(lock, spec, out, "char", primary=False, timeout_s=0)
  warnings = capsys.readouterr().err.splitlines()
  assert len(warnings) == 3 and all(
      w.startswith(f"warning: {out}: file locks do not work there (ENOLCK: No locks available); "
                   "process 0 prepares it") for w in warnings)
  assert not manifest["reused"] and waited["reused"] and waited["hash"] == manifest["hash"]
  train_ids, val_ids, _, _ = token_store.open(out)
  expected_train, expected_val, _ = _reference(*_tail(_joined_text([path])), "char")
  np.testing.assert_array_equal(train_ids, expected_train)
  np.testing.assert_array_equal(val_ids, expected_val)
  # The data cache takes the same way (one process: it prepares).
  ds = data_lib.load(spec, tokenizer="char", cache_dir=str(tmp_path / "cache2"))
  np.testing.assert_array_equal(ds.val_ids, expected_val)
  assert "file locks do not work there (ENOLCK" in capsys.readouterr().err


def test_a_writer_that_finds_another_finished_keeps_its_files(tmp_path, monkeypatch):
  path, out = tmp_path / "c.txt", tmp_path / "out"
  _write_corpus(path, 5_000)
  encode_all, other = token_store._encode_all, {}

  def another_host_finishes_first(*args):
    yield from encode_all(*args)
    monkeypatch.setattr(token_store, "_encode_all", encode_all)
    other.update(token_store.prepare(f"text:{path}", out, "char"), mtimes=_mtimes(out))
  monkeypatch.setattr(token_store, "_encode_all", another_host_finishes_first)
  manifest = token_store.prepare(f"text:{path}", out, "char")
  assert not other["reused"] and manifest["reused"] and manifest["hash"] == other["hash"]
  assert _mtimes(out) == other["mtimes"]  # Nothing replaced under the other's readers.
  assert not [p for p in out.iterdir() if ".tmp." in p.name]


def test_mount_type_reads_the_mount_table(tmp_path):
  root = os.path.realpath(tmp_path)
  table = (f"/dev/sda1 / ext4 rw 0 0\n"
           f"bucket {root}/gcs fuse.gcsfuse rw,nosuid,nodev 0 0\n"
           f"server:/export {root}/my\\040nfs nfs4 rw 0 0\n")
  assert token_store.mount_type(f"{root}/gcs/cache/c-char", table) == "fuse.gcsfuse"
  assert token_store.mount_type(f"{root}/gcs", table) == "fuse.gcsfuse"
  assert token_store.mount_type(f"{root}/gcs-other/c", table) == "ext4"
  assert token_store.mount_type(f"{root}/my nfs/c", table) == "nfs4"
  assert token_store.mount_type(f"{root}/c", "") == ""


def test_on_a_gcsfuse_mount_process_0_prepares_and_the_others_wait(tmp_path, monkeypatch, capsys):
  cache = tmp_path / "gcs"
  cache.mkdir()
  mounts = tmp_path / "mounts"
  mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\n"
                    f"bucket {os.path.realpath(cache)} fuse.gcsfuse rw 0 0\n")
  monkeypatch.setattr(token_store, "_MOUNTS", str(mounts))
  locked, flock = [], fcntl.flock
  monkeypatch.setattr(fcntl, "flock", lambda f, op: locked.append(op) or flock(f, op))
  path, out = tmp_path / "c.txt", cache / "c-char"
  _write_corpus(path, 5_000)
  spec = f"text:{path}"
  with open(f"{out}.lock", "a") as lock:
    with pytest.raises(UsageError, match="waited 0 s for process 0"):
      token_store.prepare_shared(lock, spec, out, "char", primary=False, timeout_s=0)
    assert not locked  # A waiting process holds no lock that process 0 on its host would need.
    manifest = token_store.prepare_shared(lock, spec, out, "char", primary=True)
    assert not manifest["reused"] and locked  # Processes of one host still take turns.
    waited = token_store.prepare_shared(lock, spec, out, "char", primary=False, timeout_s=0)
    assert waited["reused"] and waited["hash"] == manifest["hash"]
    _write_corpus(path, 5_000, seed=3)  # A changed source: the old files are not what it waits for.
    with pytest.raises(UsageError, match="waited 0 s for process 0"):
      token_store.prepare_shared(lock, spec, out, "char", primary=False, timeout_s=0)
  assert f"warning: {out}: a fuse.gcsfuse mount, where file locks hold within one host only" in (
      capsys.readouterr().err)


def test_user_mistakes_with_max_chars(tmp_path):
  path = tmp_path / "c.txt"
  _write_corpus(path, 1000)
  with pytest.raises(UsageError, match="--max_chars=0: expected a positive number"):
    token_store.prepare(f"text:{path}", tmp_path / "out", max_chars=0)


@pytest.mark.parametrize("split", ["tail", "blocks:3:500"])
@pytest.mark.parametrize("max_chars", [12_345, 10**9])
def test_max_chars_cuts_the_text_before_it_is_split(tmp_path, split, max_chars):
  a, b = tmp_path / "a.txt", tmp_path / "b.txt"
  _write_corpus(a, 10_000, seed=9)
  _write_corpus(b, 10_000, seed=10)
  out = tmp_path / "out"
  manifest = token_store.prepare(f"text:{a},{b}", out, "char", split=split, max_chars=max_chars,
                                 chunk_bytes=1000, workers=1)
  train_ids, val_ids, tokenizer, _ = token_store.open(out)
  text = _joined_text([a, b])[:max_chars]  # data.load's former rule: cut, then split.
  if split == "tail":
    train_text, val_text = _tail(text)
  else:
    blocks = _reference_blocks(text, 500)
    train_text = "".join(b for i, b in enumerate(blocks) if i % 3 != 2)
    val_text = "".join(b for i, b in enumerate(blocks) if i % 3 == 2)
  expected_train, expected_val, expected = _reference(train_text, val_text, "char")
  np.testing.assert_array_equal(train_ids, expected_train)
  np.testing.assert_array_equal(val_ids, expected_val)
  assert tokenizer.chars == expected.chars
  assert manifest["max_chars"] == max_chars
  assert manifest["splits"]["train"]["chars"] + manifest["splits"]["val"]["chars"] == len(text)
  # Another max_chars is another preparation.
  other = token_store.prepare(f"text:{a},{b}", out, "char", split=split, max_chars=1000)
  assert not other["reused"] and other["hash"] != manifest["hash"]


def test_join_pieces_equals_the_join_and_reads_lazily():
  rng = random.Random(11)
  texts = []
  for _ in range(60):
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(0, 30)))
             for _ in range(rng.choice([0, 1, 1, 3, 20]))]
    texts.append("\n".join(lines))
  texts.append("x" * 5000)  # One line longer than a chunk.
  texts += ["", "", "end"]
  joined = "\n".join(texts)
  for chunk_chars in (7, 100, 1000, 10**6):
    for max_chars in (None, 1, len(texts[0]) + 1, 777, len(joined) - 1, len(joined) + 5):
      read = []

      def reading(read=read):
        for t in texts:
          read.append(t)
          yield t

      pieces = list(token_store.join_pieces(reading(), max_chars, chunk_chars))
      assert "".join(pieces) == joined[:max_chars]
      assert all(p.endswith("\n") for p in pieces[:-1]) and all(pieces)
      if max_chars is not None and max_chars < len(joined):  # Nothing read past max_chars.
        assert len("\n".join(read[:-1])) < max_chars <= len("\n".join(read))
  assert not list(token_store.join_pieces([]))


def test_unigram_counts_equal_the_bincount_of_the_ids(tmp_path):
  path = tmp_path / "c.txt"
  _write_corpus(path, 30_000, seed=12)
  out = tmp_path / "out"
  manifest = token_store.prepare(f"text:{path}", out, "sentencepiece", vocab_size=300,
                                 chunk_bytes=3000, workers=1)
  assert manifest["splits"]["train"]["counts_file"] == "train.counts.npy"
  train_ids, val_ids, tokenizer, _ = token_store.open(out)
  for split, ids in (("train", train_ids), ("val", val_ids)):
    counts = token_store.unigram_counts(out, split)
    assert counts.dtype == np.int64 and counts.shape == (tokenizer.vocab_size,)
    np.testing.assert_array_equal(counts, np.bincount(np.asarray(ids), minlength=300))
  (out / "val.counts.npy").unlink()  # Counts missing: not a usable directory, prepared again.
  with pytest.raises(UsageError, match="val.counts.npy"):
    token_store.open(out)
  assert not token_store.prepare(f"text:{path}", out, "sentencepiece", vocab_size=300)["reused"]


_TFDS_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tfds")


@pytest.fixture(name="shakespeare")
def _shakespeare():
  """The tiny_shakespeare examples of each split, {split: [text, ...]}, read directly with tfds."""
  if not os.path.isdir(_TFDS_DIR):
    pytest.skip(f"no prepared tfds data_dir at {_TFDS_DIR}")
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    source = tfds.data_source("tiny_shakespeare", data_dir=_TFDS_DIR, download=False)
    return {split: [source[split][i]["text"].decode("utf-8") for i in range(len(source[split]))]
            for split in ("train", "validation")}
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"tensorflow_datasets cannot open tiny_shakespeare under {_TFDS_DIR}: {e}")


@pytest.mark.parametrize("kind,vocab_size,max_chars,chunk_bytes", [
    ("char", None, None, 1 << 20),
    ("sentencepiece", 400, None, 1 << 20),
    ("sentencepiece", 400, 120_001, 5000),  # Several chunks, each ending at a line break.
    ("byte", None, 50_000, 3000),
])
def test_tfds_ids_equal_tokenizing_the_joined_splits(tmp_path, shakespeare, kind, vocab_size,
                                                     max_chars, chunk_bytes):
  out = tmp_path / "out"
  manifest = token_store.prepare("tfds:tiny_shakespeare", out, kind, vocab_size,
                                 max_chars=max_chars, chunk_bytes=chunk_bytes, workers=1,
                                 tfds_data_dir=_TFDS_DIR)
  train_ids, val_ids, tokenizer, manifest = token_store.open(out)
  # The reference: data.load's former path, each split joined whole and tokenized at once.
  train_text = "\n".join(shakespeare["train"])[:max_chars]
  val_text = "\n".join(shakespeare["validation"])[:max_chars]
  expected_train, expected_val, expected = _reference(train_text, val_text, kind, vocab_size)
  np.testing.assert_array_equal(train_ids, expected_train)
  np.testing.assert_array_equal(val_ids, expected_val)
  assert tokenizer.vocab_size == expected.vocab_size
  if kind == "char":
    assert tokenizer.chars == expected.chars
  assert manifest["split"] == "tfds train/validation"
  assert manifest["source_dataset"]["name"] == "tiny_shakespeare"
  assert (manifest["splits"]["train"]["chars"], manifest["splits"]["val"]["chars"]) == (
      len(train_text), len(val_text))
  np.testing.assert_array_equal(token_store.unigram_counts(out, "val"),
                                np.bincount(np.asarray(val_ids), minlength=tokenizer.vocab_size))
  before = _mtimes(out)
  again = token_store.prepare("tfds:tiny_shakespeare", out, kind, vocab_size, max_chars=max_chars,
                              chunk_bytes=chunk_bytes, workers=1, tfds_data_dir=_TFDS_DIR)
  assert again["reused"] and again["hash"] == manifest["hash"] and _mtimes(out) == before


def test_tfds_user_mistakes(tmp_path, shakespeare):
  del shakespeare
  with pytest.raises(UsageError, match="a tfds source is split by its own splits") as e:
    token_store.prepare("tfds:tiny_shakespeare", tmp_path / "out", split="tail",
                        tfds_data_dir=_TFDS_DIR)
  assert "\n" not in str(e.value)
  with pytest.raises(UsageError, match="has no dataset of that name") as e:
    token_store.prepare("tfds:no_such_dataset_xyz", tmp_path / "out", tfds_data_dir=_TFDS_DIR)
  assert "\n" not in str(e.value)
  assert not (tmp_path / "out").exists()


def test_prepare_data_script_reads_tfds(tmp_path, shakespeare):
  del shakespeare
  cmd = [sys.executable, "-m", "experiments.prepare_data", "--data=tfds:tiny_shakespeare",
         f"--tfds_data_dir={_TFDS_DIR}", "--tokenizer=byte", "--max_chars=20000",
         f"--out={tmp_path / 'out'}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, cwd=helpers.REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "split tfds train/validation" in proc.stdout
  manifest = token_store.read_manifest(tmp_path / "out")
  assert manifest["splits"]["train"]["tokens"] == manifest["splits"]["val"]["tokens"] == 20_000
