"""Tests for llm_math.masked_lm: masked-LM batches and evaluation windows."""
import numpy as np

from llm_math import data as data_lib
from llm_math import masked_lm


def test_mask_tokens_masks_and_scores_only_masked_positions():
  tokens = np.random.default_rng(1).integers(0, 7, size=(4, 9)).astype(np.int32)
  masked = np.random.default_rng(2).random(tokens.shape) < 0.3
  inputs, targets, weights = masked_lm.mask_tokens(tokens, masked, 7)
  assert inputs.dtype == np.int32 and weights.dtype == np.float32
  assert np.all(inputs[masked] == 7) and np.all(inputs[~masked] == tokens[~masked])
  np.testing.assert_array_equal(targets, tokens)
  np.testing.assert_array_equal(weights, masked)


def test_masked_lm_batch_is_the_same_global_batch_in_any_rows():
  ids = np.random.default_rng(3).integers(0, 7, size=5000).astype(np.int32)
  batch = lambda rows=slice(None): masked_lm.masked_lm_batch(ids, 10, 256, 5, 17, 7, 0.2, rows)
  inputs, targets, weights = batch()
  for whole, *halves in zip(batch(), batch(slice(0, 128)), batch(slice(128, 256))):
    np.testing.assert_array_equal(whole, np.concatenate(halves))
  assert abs(weights.mean() - 0.2) < 0.01
  np.testing.assert_array_equal(targets, data_lib.train_batch(ids, 10, 256, 5, 17)[0])
  assert np.all(inputs[weights > 0] == 7)
  assert not np.array_equal(weights, masked_lm.masked_lm_batch(ids, 10, 256, 5, 18, 7, 0.2)[2])


def test_masked_windows_do_not_depend_on_the_batching():
  ids = np.random.default_rng(4).integers(0, 7, size=200).astype(np.int32)
  windows = masked_lm.masked_windows(data_lib.eval_windows(ids, 10), 7, 0.3, seed=0)
  n = len(windows)
  whole = windows.batch(0, n)
  pieces = [windows.batch(lo, lo + 3) for lo in range(0, n, 3)]
  for i, array in enumerate(whole):
    np.testing.assert_array_equal(array, np.concatenate([p[i] for p in pieces])[:n])
  padded = windows.batch(n - 1, n + 2)
  assert np.all(padded[2][1:] == 0)  # rows past the last window score nothing
  inputs, targets, weights = whole
  tokens = data_lib.eval_windows(ids, 10).inputs_NxT  # A masked LM predicts the masked tokens.
  np.testing.assert_array_equal(targets, tokens)
  np.testing.assert_array_equal(inputs, np.where(weights > 0, 7, tokens))
  assert abs(weights.mean() - 0.3) < 0.1
