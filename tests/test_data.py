"""Data: splits, deterministic batches, evaluation windows, the synthetic source, error paths."""
import os
import time

import numpy as np
import pytest

from llm_math import data as data_lib
from llm_math import synthetic
from llm_math import token_store
from llm_math.errors import UsageError

from tests import helpers


def test_text_split_is_first_90_percent(tmp_path):
  path = tmp_path / "corpus.txt"
  text = "".join(chr(ord("a") + i % 26) for i in range(1000))
  path.write_text(text)
  ds = data_lib.load(f"text:{path}", tokenizer="char", workdir=str(tmp_path))
  assert ds.tokenizer.decode(ds.train_ids) == text[:900]
  assert ds.tokenizer.decode(ds.val_ids) == text[900:]
  assert (tmp_path / "tokenizer.json").exists()


def test_train_batches_are_a_pure_function_of_seed_and_step():
  ids = np.arange(10_000, dtype=np.int32)
  x1, y1 = data_lib.train_batch(ids, 32, 8, seed=3, step=17)
  x2, y2 = data_lib.train_batch(ids, 32, 8, seed=3, step=17)
  np.testing.assert_array_equal(x1, x2)
  np.testing.assert_array_equal(y1, y2)
  np.testing.assert_array_equal(y1[:, :-1], x1[:, 1:])  # targets are inputs shifted by one
  x3, _ = data_lib.train_batch(ids, 32, 8, seed=3, step=18)
  x4, _ = data_lib.train_batch(ids, 32, 8, seed=4, step=17)
  assert not np.array_equal(x1, x3) and not np.array_equal(x1, x4)
  assert x1.max() < len(ids) - 1


@pytest.mark.parametrize("n,seq_len,stride", [(103, 8, 8), (103, 8, 3), (64, 16, 16), (17, 16, 1),
                                              (500, 32, 7)])
def test_eval_windows_score_every_token_once(n, seq_len, stride):
  ids = np.arange(n, dtype=np.int32) * 7 % 101
  w = data_lib.eval_windows(ids, seq_len, stride)
  scored = w.weights_NxT > 0
  positions = np.sort(w.positions_NxT[scored])
  np.testing.assert_array_equal(positions, np.arange(1, n))
  np.testing.assert_array_equal(w.targets_NxT, ids[w.positions_NxT])
  np.testing.assert_array_equal(w.inputs_NxT, ids[w.positions_NxT - 1])
  ctx = w.context_NxT[scored]
  if len(w.inputs_NxT) > 1 and stride < seq_len:
    assert (ctx[w.positions_NxT[scored] > seq_len] >= seq_len - stride + 1).all()
  assert w.describe()["tokens_scored"] == n - 1


def test_eval_stride_out_of_range_is_a_clear_error():
  with pytest.raises(UsageError, match="eval_stride"):
    data_lib.eval_windows(np.arange(100), 16, 17)


def test_synthetic_source_is_deterministic_and_matches_its_entropy_rate():
  src = synthetic.LaggedCopySource(vocab_size=16, lag=5, copy_prob=0.6)
  x = src.sample(200_000, seed=1)
  np.testing.assert_array_equal(x, src.sample(200_000, seed=1))
  assert not np.array_equal(x, src.sample(200_000, seed=2))
  # Marginals are pi, and x_t == x_{t-L} with probability alpha + (1 - alpha) sum pi^2.
  np.testing.assert_allclose(np.bincount(x, minlength=16) / len(x), src.unigram, atol=0.005)
  same = np.mean(x[5:] == x[:-5])
  np.testing.assert_allclose(same, 0.6 + 0.4 * np.sum(src.unigram ** 2), atol=0.005)
  # The exact conditional NLL averages to the closed-form entropy rate (Monte Carlo, ~2e-3 s.e.).
  nll = src.conditional_nll(x, np.arange(5, len(x)), np.full(len(x) - 5, 10**9))
  assert abs(nll.mean() - src.entropy_rate()) < 0.01
  # Without the lag in its context, the best prediction is the unigram.
  short = src.conditional_nll(x, np.arange(5, len(x)), np.full(len(x) - 5, 4))
  np.testing.assert_allclose(short, -np.log(src.unigram[x[5:]]))
  assert src.entropy_rate() < src.unigram_entropy() < np.log(16)


def test_synthetic_load_and_bad_config():
  ds = data_lib.load("synthetic", seed=0, synthetic_config=dict(vocab_size=8, lag=3,
                                                               train_tokens=1000, val_tokens=100))
  assert ds.vocab_size == 8 and len(ds.train_ids) == 1000 and len(ds.val_ids) == 100
  with pytest.raises(UsageError, match="copy_prob"):
    data_lib.load("synthetic", synthetic_config=dict(copy_prob=1.5))


@pytest.mark.parametrize("spec,match", [
    ("wikipedia", "expected 'synthetic'"),
    ("text:", "no path given"),
    ("text:/nonexistent/file.txt", "no such file"),
    ("tfds:", "no dataset name"),
    ("tfds:no_such_dataset_xyz", "has no dataset of that name"),
])
def test_bad_data_specs_are_clear_errors(spec, match):
  with pytest.raises(UsageError, match=match):
    data_lib.load(spec)


def test_empty_and_non_utf8_files_are_clear_errors(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  with pytest.raises(UsageError, match="the file is empty"):
    data_lib.load(f"text:{empty}")
  binary = tmp_path / "binary.txt"
  binary.write_bytes(b"\xff\xfe\x00abc")
  with pytest.raises(UsageError, match="not UTF-8"):
    data_lib.load(f"text:{binary}")


def test_corpus_shorter_than_a_window_is_a_clear_error(tmp_path):
  path = tmp_path / "short.txt"
  path.write_text("to be or not to be, that is the question")
  ds = data_lib.load(f"text:{path}")
  with pytest.raises(UsageError, match="fewer than one context window"):
    data_lib.check_fits(ds, 64)


def test_tfds_not_prepared_offline_fails_fast(tmp_path, monkeypatch):
  monkeypatch.setattr(token_store, "_network_reachable", lambda *a, **k: False)
  start = time.time()
  with pytest.raises(UsageError, match="tiny_shakespeare: not prepared under .* no network"):
    data_lib.load("tfds:tiny_shakespeare", tfds_data_dir=str(tmp_path))
  assert time.time() - start < 10


@pytest.mark.skipif(not os.path.isdir(os.path.join(helpers.SHARED_DATA, "tfds")),
                    reason="shared tfds data_dir absent")
def test_tfds_reads_a_prepared_data_dir():
  ds = data_lib.load("tfds:tiny_shakespeare", tokenizer="char",
                     tfds_data_dir=os.path.join(helpers.SHARED_DATA, "tfds"))
  assert len(ds.train_ids) == 1_003_854
  assert len(ds.val_ids) == 55_770
  assert ds.vocab_size == 65


class _RecordingIds(np.ndarray):
  """A token stream that records which positions are read (as a memory-mapped split would page)."""

  def __getitem__(self, index):
    self.read.update(np.asarray(index).reshape(-1).tolist())
    return np.asarray(self)[index]


def _recording(ids):
  out = np.asarray(ids).view(_RecordingIds)
  out.read = set()
  return out


def test_each_process_reads_only_its_rows_of_a_batch():
  ids = _recording(np.arange(5000, dtype=np.uint16))
  x_all, _ = data_lib.train_batch(np.asarray(ids), 16, 8, seed=1, step=3)
  for p in range(2):
    ids.read.clear()
    x, y = data_lib.train_batch(ids, 16, 8, seed=1, step=3, rows=slice(4 * p, 4 * p + 4))
    np.testing.assert_array_equal(x, x_all[4 * p:4 * p + 4])
    assert x.dtype == np.int32 and y.dtype == np.int32
    assert ids.read == set(np.concatenate([x[:, 0][:, None] + np.arange(17)]).reshape(-1).tolist())


def test_eval_windows_read_the_stream_batch_by_batch():
  ids = _recording(np.arange(1000, dtype=np.uint16) * 7 % 251)
  w = data_lib.eval_windows(ids, 16, 8)
  full = (w.inputs_NxT, w.targets_NxT, w.weights_NxT)
  ids.read.clear()
  x, y, m = w.batch(10, 14)
  assert ids.read == set(range(w.starts_N[10], w.starts_N[13] + 17))
  for got, want in zip((x, y, m), full):
    np.testing.assert_array_equal(got, want[10:14])
  x, y, m = w.batch(len(w) - 1, len(w) + 3)  # Padding past the last window: zero weight.
  assert x.shape == (4, 16) and m[1:].sum() == 0 and m[0].sum() > 0
  positions, contexts = w.scored()
  scored = w.weights_NxT > 0
  np.testing.assert_array_equal(positions, w.positions_NxT[scored])
  np.testing.assert_array_equal(contexts, w.context_NxT[scored])


def test_text_sources_are_tokenized_once_into_the_cache(tmp_path, capsys):
  path = tmp_path / "corpus.txt"
  path.write_text("".join(f"line {i} of the corpus\n" for i in range(3000)))
  cache = tmp_path / "cache"
  logs = []
  ds = data_lib.load(f"text:{path}", tokenizer="char", cache_dir=str(cache), log=logs.append)
  assert isinstance(ds.train_ids, np.memmap) and any("later runs reuse it" in l for l in logs)
  (prepared,) = [p for p in cache.iterdir() if p.is_dir()]
  assert prepared.name.startswith("corpus.txt-char-")
  manifest = token_store.read_manifest(prepared)
  logs.clear()
  again = data_lib.load(f"text:{path}", tokenizer="char", cache_dir=str(cache), log=logs.append)
  assert not any("later runs reuse it" in line for line in logs)  # Reused, not tokenized again.
  assert token_store.read_manifest(prepared)["hash"] == manifest["hash"]
  np.testing.assert_array_equal(again.val_ids, ds.val_ids)
  blocks = data_lib.load(f"text:{path}", tokenizer="char", cache_dir=str(cache), split="blocks:4:500")
  assert "split blocks:4:500" in blocks.description
  assert len(blocks.val_ids) > 0 and len(list(cache.glob("corpus.txt-char-*/"))) == 2
  with pytest.raises(UsageError, match="--data_cache=gs://b: token files are memory-mapped"):
    data_lib.load(f"text:{path}", cache_dir="gs://b")


def test_eval_sample_every_kth_window_scores_whole_windows_spread_over_the_stream():
  ids = np.arange(1000, dtype=np.int32) * 7 % 101
  every = data_lib.eval_windows(ids, 16, every=4)
  all_ = data_lib.eval_windows(ids, 16)
  np.testing.assert_array_equal(every.starts_N, np.arange(0, 1000 - 16, 16)[::4])
  np.testing.assert_array_equal(every.inputs_NxT, all_.inputs_NxT[::4][:len(every)])
  assert every.weights_NxT.all() and every.describe()["tokens_scored"] == 16 * len(every)
  assert every.describe()["context_min"] == 1 and every.describe()["context_max"] == 16
  with pytest.raises(UsageError, match="eval_sample_every"):
    data_lib.eval_windows(ids, 16, 8, every=2)
