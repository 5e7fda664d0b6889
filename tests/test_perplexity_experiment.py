"""The perplexity study: baselines on equal terms, sweeps, the power-law fit, figures."""
import ast
import os
import subprocess
import sys

import numpy as np
import pytest

from llm_math import data as data_lib
from llm_math import evaluation as evaluation_lib
from llm_math.analysis import ngram
from llm_math.errors import UsageError
from llm_math.reports import perplexity as report_lib
from llm_math.studies import perplexity

from tests import helpers


def test_parse_sweep_flags():
  assert perplexity.parse_model_sizes("64x2, 128x4") == [(64, 2), (128, 4)]
  assert perplexity.parse_model_sizes("") == []
  with pytest.raises(UsageError, match="--model_sizes"):
    perplexity.parse_model_sizes("64-2")
  assert perplexity.parse_tokenizers("char,sentencepiece:1000", "byte", 0) == [
      ("char", 0), ("sentencepiece", 1000)]
  assert perplexity.parse_tokenizers("", "byte", 0) == [("byte", 0)]
  config = helpers.tiny_config()
  config.ngram.orders = "1,x"
  with pytest.raises(UsageError, match="ngram_orders"):
    perplexity.ngram_orders(config.ngram)


@pytest.mark.parametrize("field, value, flag", [
    ("model_sizes", "64-2", "--config.model_sizes='64-2' (--model_sizes)"),
    ("tokenizers", "sentencepiece:many", "--config.tokenizers="),
    ("ngram.orders", "1,0", "--config.ngram.orders='1,0' (--ngram_orders)"),
    ("ngram.methods", "kneser_ney,witten_bell", "--config.ngram.methods: 'witten_bell'"),
    ("ngram.max_train_tokens", -1, "--config.ngram.max_train_tokens=-1")])
def test_check_names_the_field_in_one_line(field, value, flag):
  config = helpers.tiny_config()
  perplexity.check(config)
  parent, _, name = field.rpartition(".")
  (config[parent] if parent else config)[name] = value
  with pytest.raises(UsageError) as error:
    perplexity.check(config)
  assert str(error.value).startswith(flag) and "\n" not in str(error.value)


def test_size_config_divides_d_model_among_the_heads():
  config = helpers.tiny_config()
  config.model.num_heads = 4
  assert perplexity.size_config(config, None) is config
  for size, heads in (((64, 3), 4), ((30, 1), 3)):
    c = perplexity.size_config(config, size)
    assert (c.model.d_model, c.model.num_layers, c.model.num_heads, c.model.d_ff) == (
        size[0], size[1], heads, 4 * size[0])
  assert config.model.d_model == 32  # The config itself is left as it was.


def test_configs_are_data_only():
  """The study's config files import ml_collections and other config files, nothing else (no JAX);
  the default's logical axis rules are the library's."""
  from llm_math import sharding  # pylint: disable=g-import-not-at-top
  from experiments.configs import perplexity as config_file  # pylint: disable=g-import-not-at-top
  for name in ("perplexity", "size_sweep", "tinyshakespeare_cpu", "tinyshakespeare_gpu",
               "english_pd", "scaling_law"):
    tree = ast.parse(open(os.path.join(helpers.REPO, "experiments", "configs", f"{name}.py")).read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | {
        n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"ml_collections", "experiments.configs"}, (name, imported)
  rules = config_file.get_config().logical_axis_rules
  assert [tuple(r) for r in rules] == list(sharding.DEFAULT_RULES)


def test_baselines_are_scored_on_the_models_tokens():
  config = helpers.tiny_config()
  config.ngram.orders = "1,3"
  dataset = helpers.tiny_dataset(config)
  windows = evaluation_lib.validation_windows(config, dataset.val_ids)
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
  # The reference rows are `evaluation.reference_nlls`, the numbers every study quotes.
  references = evaluation_lib.reference_nlls(dataset, windows)
  assert list(references) == ["uniform", "unigram", "floor", "entropy_rate"]
  for key, nll in references.items():
    assert records[perplexity.REFERENCE_ROWS[key][0]]["val_nll_nats"] == nll
  # The synthetic floor is below every baseline; synthetic symbols are one character each.
  floor = records["floor (true model, same context)"]
  assert all(r["val_nll_nats"] > floor["val_nll_nats"] for r in records.values()
             if r["kind"] != "floor")
  assert floor["bits_per_char"] == pytest.approx(floor["val_nll_nats"] / np.log(2))
  assert floor["bits_per_byte"] == pytest.approx(floor["bits_per_char"])  # one byte per symbol


def _reset_contexts(positions, stream_len: int, window: int) -> np.ndarray:
  """Context of each position with independent windows of `window` targets over a stream of
  `stream_len` tokens: 1..W in each window, and in the last window, moved back to end with the
  stream, the distance from its start."""
  n_targets = stream_len - 1
  regular = positions <= n_targets // window * window
  return np.where(regular, (positions - 1) % window + 1, positions - (n_targets - window))


@pytest.mark.parametrize("evaluation", [{"eval_max_tokens": 1000}, {"eval_sample_every": 3}],
                         ids=["eval_max_tokens", "eval_sample_every"])
def test_ngram_window_rows_score_the_transformers_tokens(tmp_path, evaluation):
  """With ngram.window = W and a capped or sampled evaluation, every n-gram row scores exactly the
  tokens the Transformer's windows score (its record's count), with the context its name says."""
  config = helpers.tiny_config(num_steps=2, eval_every=2, checkpoint_every=2, **evaluation)
  config.ngram.update(orders="1,3", window=20)
  dataset = helpers.tiny_dataset(config)  # 2,000 validation tokens
  windows = evaluation_lib.validation_windows(config, dataset.val_ids)
  (transformer,), _ = perplexity.train_models(config, dataset, windows, "synthetic", str(tmp_path),
                                               False)
  # The Transformer's scored targets, read from its evaluation batches (not from windows.scored()).
  positions = windows.positions_NxT[windows.weights_NxT > 0]
  assert transformer["tokens_scored"] == positions.size < len(dataset.val_ids) - 1
  records = {r["name"]: r for r in perplexity.baseline_records(dataset, windows, "synthetic",
                                                               config.ngram)}
  stream = dataset.val_ids[:config.eval_max_tokens or None]
  reset = _reset_contexts(positions, len(stream), 20)
  assert reset.min() == 1 and reset.max() == 20  # Not the Transformer's contexts 1..16.
  contexts = {"context reset every 20": reset, "full left context": positions}
  for method, label in ((ngram.KNESER_NEY, "KN"), (ngram.ADD_K, "add-0.1")):
    for order in (1, 3):
      model = ngram.fit(dataset.train_ids, dataset.vocab_size, order, method, k=0.1)
      for context, ctx in contexts.items():
        record = records[f"{label} {order}-gram ({context})"]
        assert record["val_nll_nats"] == pytest.approx(
            ngram.score_at(model, dataset.val_ids, positions, ctx).mean(), rel=1e-12)
        assert record["tokens_scored"] == transformer["tokens_scored"]
  assert all(r["tokens_scored"] == transformer["tokens_scored"] for r in records.values())


def _model_records(tokenizer, params, losses, tokens=1e6):
  return [{"kind": "model", "tokenizer": tokenizer, "params": n, "train_flops": 6 * n * tokens,
           "val_nll_nats": loss} for n, loss in zip(params, losses)]


@pytest.mark.parametrize("noise", [0.0, 0.003])
def test_fit_scaling_recovers_a_known_power_law(noise):
  """Losses generated from L(N) = a N^-alpha + c (exactly, or with 0.3% log-normal noise) give back
  a, alpha, c on the params axis, and on the compute axis C = 6 N D the same alpha and c with
  a_C = a (6 D)^alpha. Other record kinds, and a tokenizer with fewer than 3 sizes, are left out."""
  a, alpha, c, tokens = 40.0, 0.3, 1.5, 1e6
  n = np.geomspace(1e4, 1e8, 9)
  loss = (a * n**-alpha + c) * np.exp(noise * np.random.default_rng(0).standard_normal(n.size))
  records = (_model_records("char", n, loss, tokens)
             + _model_records("byte", [1e4, 1e5], [3.0, 2.0])  # Two sizes: no fit.
             + [{"kind": "ngram", "tokenizer": "char", "params": 1e9, "val_nll_nats": 9.0},
                {"kind": "baseline", "tokenizer": "char", "params": 1, "val_nll_nats": 0.1}])
  fits = perplexity.fit_scaling(records)
  assert list(fits) == ["char"]
  by_params, by_compute = fits["char"]["params"], fits["char"]["compute"]
  if noise == 0:
    np.testing.assert_allclose([by_params["a"], by_params["alpha"], by_params["c"]], [a, alpha, c],
                               rtol=1e-6)
    np.testing.assert_allclose([by_compute["a"], by_compute["alpha"], by_compute["c"]],
                               [a * (6 * tokens)**alpha, alpha, c], rtol=1e-6)
    assert by_params["rms_log_residual"] < 1e-9 and by_compute["rms_log_residual"] < 1e-9
  else:
    for fit in (by_params, by_compute):
      assert fit["alpha"] == pytest.approx(alpha, abs=0.02)
      assert fit["c"] == pytest.approx(c, abs=0.03)
      assert fit["rms_log_residual"] < 2 * noise
    assert by_params["a"] == pytest.approx(a, rel=0.2)  # a trades off against alpha
    # Both axes fit the same points: C is a fixed multiple of N, so the laws agree everywhere.
    np.testing.assert_allclose(by_compute["alpha"], by_params["alpha"], rtol=1e-4)
    assert by_compute["a"] == pytest.approx(by_params["a"] * (6 * tokens)**by_params["alpha"],
                                            rel=1e-3)


def _check_against_independent_fit(fit, n, loss):
  """A fit to 3 points, checked without llm_math.analysis.scaling_laws.

  With c at its bound 0 the log-space fit is the straight line of log L on log N: np.polyfit gives
  alpha and a. With c > 0 three parameters fit three points exactly: a N^-alpha + c reproduces them.
  """
  n, loss = np.asarray(n, np.float64), np.asarray(loss, np.float64)
  predicted = fit["a"] * n ** -fit["alpha"] + fit["c"]
  rms = np.sqrt(np.mean((np.log(predicted) - np.log(loss)) ** 2))
  assert fit["rms_log_residual"] == pytest.approx(rms, rel=1e-6, abs=1e-12)
  assert fit["c"] >= 0.0
  if fit["c"] == 0.0:
    slope, intercept = np.polyfit(np.log(n), np.log(loss), 1)
    assert fit["alpha"] == pytest.approx(-slope, rel=1e-6)
    assert fit["a"] == pytest.approx(np.exp(intercept), rel=1e-5)
  else:
    np.testing.assert_allclose(predicted, loss, rtol=1e-6)


SWEEP_ARGS = [a for a in helpers.TINY_OVERRIDES if "num_steps" not in a] + [
    "--config.num_steps=30", "--model_sizes=8x1,16x1,32x1", "--ngram_orders=1,2"]


def sweep_numbers(results: dict) -> list[str]:
  """The headline numbers of a sweep: every model's and baseline's validation NLL. (The power law
  through three points is ill-conditioned: its parameters amplify float32 rounding.)"""
  return [f"records.{i}.val_nll_nats" for i in range(len(results["records"]))]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  """The reduced size sweep on one device (launch/local.sh, DEVICES=1)."""
  workdir = tmp_path_factory.mktemp("sweep_one_device")
  helpers.run_study("perplexity", workdir, SWEEP_ARGS, devices=1)
  return workdir, helpers.results(workdir)


@pytest.mark.parametrize("setting", helpers.other_settings(r"^step +12 \| loss"))
def test_size_sweep_agrees_across_devices_processes_and_preemption(sweep, tmp_path, setting):
  """The same sweep on 8 devices (data x fsdp x tensor), as 2 processes, or stopped by SIGTERM in
  the first model and rerun with the same command, ends with the same numbers as on one device."""
  setting = dict(setting)
  args = SWEEP_ARGS + ([f"--mesh={setting.pop('mesh')}"] if "mesh" in setting else [])
  first = helpers.run_study("perplexity", tmp_path, args, **setting)
  if "stop_after" in setting:
    assert "checkpoint saved" in first.stdout and not (tmp_path / "results.json").exists()
    helpers.run_study("perplexity", tmp_path, args)
  rtol = 1e-6 if "stop_after" in setting else 2e-4
  helpers.assert_same_numbers(sweep[1], helpers.results(tmp_path), sweep_numbers(sweep[1]),
                             rtol=rtol)


def test_size_sweep_fits_a_power_law_and_draws_figures(sweep):
  tmp_path, results = sweep
  models = [r for r in results["records"] if r["kind"] == "model"]
  assert [r["d_model"] for r in models] == [8, 16, 32]
  assert models[0]["params"] < models[1]["params"] < models[2]["params"]
  assert all(r["train_flops"] == r["flops_per_token"] * r["train_tokens"] for r in models)
  for axis, key in (("params", "params"), ("compute", "train_flops")):
    fit = results["power_law"]["synthetic"][axis]
    _check_against_independent_fit(fit, [r[key] for r in models],
                                   [r["val_nll_nats"] for r in models])
  for name in ("perplexity.png", "loss_vs_time.png", "ngram_orders.png", "scaling.png",
               "results.md"):
    assert (tmp_path / name).stat().st_size > 0
  assert (tmp_path / "models" / "synthetic" / "d16_L1" / "metrics.jsonl").exists()
  for curve in results["curves"].values():  # The time axis of loss_vs_time.png: measured, increasing.
    assert len(curve["elapsed_s"]) == len(curve["step"]) and curve["elapsed_s"][0] >= 0
    assert all(b > a for a, b in zip(curve["elapsed_s"], curve["elapsed_s"][1:]))
  assert results["figures"] == ["perplexity.png", "loss_vs_time.png", "ngram_orders.png",
                                "scaling.png"]
  # Figures regenerate from results.json alone.
  os.remove(tmp_path / "scaling.png")
  subprocess.run([sys.executable, "-m", "experiments.redraw", f"--workdir={tmp_path}"],
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
    windows = evaluation_lib.validation_windows(config, ds.val_ids)
    by_tokenizer[kind] = {r["name"]: r for r in perplexity.baseline_records(ds, windows, kind,
                                                                           config.ngram)}
  # Per token the subword unigram is worse (bigger vocabulary) ...
  uni = "unigram (add-one)"
  assert by_tokenizer["sentencepiece"][uni]["val_nll_nats"] > by_tokenizer["char"][uni]["val_nll_nats"]
  # ... but per character it is better, since each token covers several characters.
  assert by_tokenizer["sentencepiece"][uni]["bits_per_char"] < by_tokenizer["char"][uni]["bits_per_char"]


def test_ngram_max_train_tokens_caps_the_counts_and_is_reported():
  config = helpers.tiny_config()
  config.ngram.update(orders="1,3", methods="kneser_ney", max_train_tokens=5000)
  dataset = helpers.tiny_dataset(config)  # 20,000 training tokens
  windows = evaluation_lib.validation_windows(config, dataset.val_ids)
  records = {r["name"]: r for r in perplexity.baseline_records(dataset, windows, "synthetic",
                                                               config.ngram)}
  positions, contexts = windows.scored()
  kn3 = ngram.fit(dataset.train_ids[:5000], dataset.vocab_size, 3, ngram.KNESER_NEY)
  capped = records["KN 3-gram (Transformer's windows)"]
  assert capped["val_nll_nats"] == ngram.score_at(kn3, dataset.val_ids, positions, contexts).mean()
  assert capped["train_tokens"] == 5000
  # The add-one unigram still counts the whole split.
  unigram = np.bincount(dataset.train_ids, minlength=32) + 1.0
  assert records["unigram (add-one)"]["val_nll_nats"] == pytest.approx(
      -np.log(unigram[dataset.val_ids[positions]] / unigram.sum()).mean())
  evaluation = {"split": "validation", **windows.describe(), "vocab_size": 32, "chars_scored": 1,
                "train_tokens": 20000,
                "ngram_train_tokens": perplexity.ngram_train_tokens(20000, config.ngram)}
  report = report_lib.report({"data": "tiny", "evaluations": {"synthetic": evaluation},
                              "records": list(records.values())})
  assert "n-grams counted on the first 5,000 of 20,000 training tokens" in report
  for cap, used in ((0, 20000), (20000, 20000), (10**9, 20000), (1, 1)):
    config.ngram.max_train_tokens = cap
    assert perplexity.ngram_train_tokens(20000, config.ngram) == used
  assert "counted on all 20,000" in report_lib.ngram_caption(
      {"train_tokens": 20000, "ngram_train_tokens": 20000})
  config.ngram.max_train_tokens = -1
  with pytest.raises(UsageError, match="--config.ngram.max_train_tokens=-1"):
    perplexity.baseline_records(dataset, windows, "synthetic", config.ngram)
