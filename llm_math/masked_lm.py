"""Masked-LM data: a bidirectional model trained on next-token prediction would attend to its own
target (position t + 1), so it is trained and scored on masked tokens instead: the training batches
of `data.train_batch` and the evaluation windows of `data.EvalWindows`, masked where a draw from the
seed (and the step) says, the same draw on any number of devices or processes.
"""
import dataclasses

import numpy as np

from llm_math import data as data_lib


def mask_tokens(tokens_BxT: np.ndarray, masked_BxT: np.ndarray, mask_id: int):
  """Masked-LM corruption: (inputs_BxT = mask_id where masked, else the token; targets_BxT =
  tokens_BxT; weights_BxT = 1 at masked positions, else 0)."""
  inputs_BxT = np.where(masked_BxT, mask_id, tokens_BxT).astype(tokens_BxT.dtype)
  return inputs_BxT, tokens_BxT, np.asarray(masked_BxT, np.float32)


def masked_lm_batch(ids: np.ndarray, seq_len: int, batch_size: int, seed: int, step: int,
                    mask_id: int, rate: float, rows: slice = slice(None)):
  """Rows `rows` of the masked-LM batch of `step`: the training windows of `data.train_batch`,
  each position replaced by `mask_id` with probability `rate`. The mask is drawn over the global
  batch from (seed, step), so every process and device count sees the same batch."""
  tokens_BxT, _ = data_lib.train_batch(ids, seq_len, batch_size, seed, step, rows)
  masked_BxT = np.random.default_rng([seed, step, 1]).random((batch_size, seq_len))[rows] < rate
  return mask_tokens(tokens_BxT, masked_BxT, mask_id)


@dataclasses.dataclass(frozen=True)
class MaskedWindows:
  """Evaluation windows (`data.EvalWindows`) scored as a masked LM: window n's tokens are masked
  by row n of `masked_NxT`, and the targets are the original tokens at the masked positions (use
  independent windows, stride seq_len, to score each token at most once). Duck-types EvalWindows
  for `evaluation.Evaluator`: the masks do not depend on the batch size or the process count."""
  windows: data_lib.EvalWindows
  masked_NxT: np.ndarray
  mask_id: int

  def __len__(self) -> int:
    return len(self.windows)

  def batch(self, lo: int, hi: int):
    """(inputs_BxT, targets_BxT, weights_BxT) of windows lo..hi-1; rows past the last window are
    padding with weight 0."""
    tokens_BxT = self.windows.batch(lo, hi)[0]
    masked_BxT = np.zeros(tokens_BxT.shape, bool)
    masked_BxT[: max(min(hi, len(self)) - lo, 0)] = self.masked_NxT[lo:hi]
    return mask_tokens(tokens_BxT, masked_BxT, self.mask_id)


def masked_windows(windows: data_lib.EvalWindows, mask_id: int, rate: float,
                   seed: int) -> MaskedWindows:
  """`windows` with one fixed draw of masks (rate `rate`, from `seed`)."""
  masked_NxT = np.random.default_rng([seed, 2**31 - 1]).random((len(windows), windows.seq_len))
  return MaskedWindows(windows, masked_NxT < rate, mask_id)
