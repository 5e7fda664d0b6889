"""The perplexity experiment: baselines on equal terms, sweeps, the power-law fit, figures."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import perplexity
from llm_math import data as data_lib
from llm_math import ngram
from llm_math import train as train_lib
from llm_math.errors import UsageError

from tests import helpers


def test_parse_sweep_flags():
  assert perplexity.parse_model_sizes("64x2, 128x4") == [(64, 2), (128, 4)]
  assert perplexity.parse_model_sizes("") == []
  with pytest.raises(UsageError, match="--model_sizes"):
    perplexity.parse_model_sizes("64-2")
  assert perplexity.parse_tokenizers("char,sentencepiece:1000", "byte", 0) == [
      ("char", 0), ("sentencepiece", 1000)]
  assert perplexity.parse_tokenizers("", "byte", 0) == [("byte", 0)]
  with pytest.raises(UsageError, match="ngram_orders"):
    perplexity._int_list("1,x", "ngram_orders")  # pylint: disable=protected-access


def test_baselines_are_scored_on_the_models_tokens():
  config = helpers.tiny_config()
  config.ngram.orders = "1,3"
  dataset = helpers.tiny_dataset(config)
  windows = train_lib.validation_windows(config, dataset)
  records = {r["name"]: r for r in perplexity.baseline_records(dataset, windows, "synthetic",
                                                               config.ngram)}
  scored = windows.weights_NxT > 0
  kn3 = ngram.fit(dataset.train_ids, dataset.vocab_size, 3, ngram.KNESER_NEY)
  expected = ngram.score_at(kn3, dataset.val_ids, windows.positions_NxT[scored],
                            windows.context_NxT[scored]).mean()
  assert records["KN 3-gram (Transformer's windows)"]["val_nll_nats"] == pytest.approx(expected)
  assert records["uniform"]["val_nll_nats"] == pytest.approx(np.log(32))
  unigram = np.bincount(dataset.train_ids, minlength=32) + 1.0
  targets = windows.targets_NxT[scored]
  assert records["unigram (add-one)"]["val_nll_nats"] == pytest.approx(
      -np.log(unigram[targets] / unigram.sum()).mean())
  # The synthetic floor is below every baseline; synthetic symbols are one character each.
  floor = records["floor (true model, same context)"]
  assert all(r["val_nll_nats"] > floor["val_nll_nats"] for r in records.values()
             if r["kind"] != "floor")
  assert floor["bits_per_char"] == pytest.approx(floor["val_nll_nats"] / np.log(2))


@pytest.mark.slow
def test_size_sweep_fits_a_power_law_and_draws_figures(tmp_path):
  args = [a for a in helpers.TINY_OVERRIDES if "num_steps" not in a] + [
      "--config.num_steps=30", "--model_sizes=8x1,16x1,32x1", "--ngram_orders=1,2"]
  proc = subprocess.run([sys.executable, "-m", "experiments.perplexity", f"--workdir={tmp_path}"]
                        + args, cwd=helpers.REPO, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.load(open(tmp_path / "results.json"))
  models = [r for r in results["records"] if r["kind"] == "model"]
  assert [r["d_model"] for r in models] == [8, 16, 32]
  assert models[0]["params"] < models[1]["params"] < models[2]["params"]
  assert all(r["train_flops"] == r["flops_per_token"] * r["train_tokens"] for r in models)
  fit = results["power_law"]["synthetic"]["params"]
  assert fit["alpha"] > 0 and np.isfinite(fit["c"])
  for name in ("perplexity.png", "ngram_orders.png", "scaling.png", "results.md"):
    assert (tmp_path / name).stat().st_size > 0
  assert (tmp_path / "models" / "synthetic" / "d16_L1" / "metrics.jsonl").exists()
  # Figures regenerate from results.json alone.
  os.remove(tmp_path / "scaling.png")
  subprocess.run([sys.executable, "-m", "experiments.plot_perplexity", f"--workdir={tmp_path}"],
                 cwd=helpers.REPO, check=True, capture_output=True, timeout=120)
  assert (tmp_path / "scaling.png").exists()


@pytest.mark.skipif(not os.path.exists(helpers.TINY_SHAKESPEARE), reason="shared data absent")
def test_char_and_sentencepiece_baselines_compare_in_bits_per_char(tmp_path):
  config = helpers.tiny_config()
  config.ngram.update(orders="1,3", methods="kneser_ney")
  by_tokenizer = {}
  for kind, vocab in (("char", None), ("sentencepiece", 1000)):
    ds = data_lib.load(f"text:{helpers.TINY_SHAKESPEARE}", tokenizer=kind, vocab_size=vocab,
                       max_chars=200_000, workdir=str(tmp_path))
    windows = train_lib.validation_windows(config, ds)
    by_tokenizer[kind] = {r["name"]: r for r in perplexity.baseline_records(ds, windows, kind,
                                                                           config.ngram)}
  # Per token the subword unigram is worse (bigger vocabulary) ...
  uni = "unigram (add-one)"
  assert by_tokenizer["sentencepiece"][uni]["val_nll_nats"] > by_tokenizer["char"][uni]["val_nll_nats"]
  # ... but per character it is better, since each token covers several characters.
  assert by_tokenizer["sentencepiece"][uni]["bits_per_char"] < by_tokenizer["char"][uni]["bits_per_char"]
