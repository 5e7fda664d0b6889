"""Scoring held-out tokens: the one evaluator every run uses, and the reference NLLs beside it.

    windows (data.EvalWindows) + score(params, inputs, targets, weights) -> Evaluator(params) -> nats

The evaluator reads its windows batch by batch (this process's rows only), lays each batch out over
the mesh like a training batch, and sums (weighted NLL, weight) over batches, so the mean is exact
whatever the batch size, device count or process count. `validation_windows` is the one rule for the
windows a config's runs are scored on. `reference_nlls` scores the uniform model, the add-one unigram
and, on the synthetic source, the true model on exactly the tokens the windows score, with the
context each of them had: the reference numbers every study quotes come from it.
"""

import dataclasses
import math
from typing import Callable

import jax
import numpy as np

from llm_math import data as data_lib
from llm_math import model as model_lib
from llm_math import sharding
from llm_math import train_config


def nll_score(apply_fn: Callable, loss_chunk: int = 0, select: Callable = lambda p: p,
              logit_softcap: float | None = None, rules=()) -> Callable:
  """score(params, inputs_BxT, targets_BxT, weights_BxT) -> (weighted NLL sum, weight sum).

  `apply_fn` is a Transformer's apply; with loss_chunk = C > 0 the output projection runs C
  positions at a time (`model.chunked_cross_entropy`), never holding the [B, T, V] logits, with
  the output logits soft-capped at `logit_softcap` (None: that of the Transformer whose bound
  `apply` apply_fn is, its config.logit_softcap, so chunked and whole scores agree; 0 for any other
  function) and the output kernel laid out by the logical axis `rules`. `select` picks the model's
  parameters out of the trained tree (e.g. a student's).
  """
  if logit_softcap is None:
    module_config = getattr(getattr(apply_fn, "__self__", None), "config", None)
    logit_softcap = getattr(module_config, "logit_softcap", 0.0)

  def score(params, inputs_BxT, targets_BxT, weights_BxT):
    params = select(params)
    out = apply_fn({"params": params}, inputs_BxT, deterministic=True,
                   return_hidden=bool(loss_chunk))
    return model_lib.output_nll(out, params, targets_BxT, weights_BxT, loss_chunk, logit_softcap,
                                rules=rules)

  return score


@dataclasses.dataclass
class Evaluator:
  """`__call__(params)` -> mean score (nats per scored token) over fixed windows.

  `score` is (params, inputs_BxT, targets_BxT, weights_BxT) -> (sum, weight), e.g. `nll_score`.
  The batch size is rounded to a multiple of the data-parallel devices; the last batch is padded
  with zero-weight rows.
  """
  windows: data_lib.EvalWindows
  score: Callable
  batch_size: int
  mesh: object
  rules: tuple

  def __post_init__(self):
    dp = sharding.data_parallel_size(self.mesh, self.rules)
    self.batch_size = max(dp, self.batch_size // dp * dp)
    self._batch_sh = sharding.batch_sharding(self.mesh, self.rules)
    self._step = jax.jit(self.score, in_shardings=(None,) + (self._batch_sh,) * 3)

  def __call__(self, params) -> float:
    total, count = 0.0, 0.0
    for i in range(0, len(self.windows), self.batch_size):
      rows = sharding.process_rows(self.batch_size, offset=i)
      with sharding.use_mesh(self.mesh):
        nll, n = self._step(params, *(sharding.global_batch(x, self._batch_sh)
                                      for x in self.windows.batch(rows.start, rows.stop)))
      total += float(nll)
      count += float(n)
    return total / count


def validation_windows(config, val_ids: np.ndarray) -> data_lib.EvalWindows:
  """The validation windows of a config: its first `eval_max_tokens` tokens (0 = all) at
  `eval_stride` (0 = independent windows), every `eval_sample_every`-th independent window."""
  tc = train_config.train_config(config)
  return data_lib.eval_windows(val_ids[: tc.eval_max_tokens or None], tc.seq_len,
                               tc.eval_stride or None, tc.eval_sample_every)


def evaluator(config, windows: data_lib.EvalWindows, apply_fn: Callable,
              select: Callable = lambda p: p) -> Evaluator:
  """The evaluator of a config's model on `windows`: its mesh, rules, eval batch and loss_chunk."""
  tc = train_config.train_config(config)
  mesh, rules = sharding.make_mesh(tc.mesh), tc.logical_axis_rules
  score = nll_score(apply_fn, tc.loss_chunk, select, rules=rules)
  return Evaluator(windows, score, tc.eval_batch_size, mesh, rules)


def reference_nlls(dataset: data_lib.Dataset, windows: data_lib.EvalWindows) -> dict:
  """Mean NLL (nats) of reference models on exactly the tokens `windows` score.

  uniform: ln|V|. unigram: add-one token frequencies of the training split (a token store's stored
  counts, else counted a chunk at a time: memory does not grow with the split). On a synthetic source,
  also floor: the true model with the context each scored token had in its window, and
  entropy_rate: the true model with unlimited context (the limit of the floor as T grows).
  Returns {uniform, unigram[, floor, entropy_rate]}, in that order.
  """
  positions, contexts = windows.scored()
  counts = dataset.train_unigram_counts() + 1.0
  targets = np.asarray(windows.ids)[positions]
  refs = {"uniform": math.log(dataset.vocab_size),
          "unigram": float(-np.mean(np.log(counts[targets] / counts.sum())))}
  if dataset.source is not None:
    refs["floor"] = float(dataset.source.conditional_nll(np.asarray(windows.ids), positions,
                                                         contexts).mean())
    refs["entropy_rate"] = float(dataset.source.entropy_rate())
  return refs
