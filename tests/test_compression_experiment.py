"""The compression experiment end to end on a tiny model: SVD, quantization, LoRA, distillation.

experiments.compression defines absl flags at import, as every experiment does, so it is only
imported in subprocesses here (two experiment modules cannot share one process's flags).
"""
import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from llm_math.analysis import compression
from llm_math import model as model_lib
from llm_math import sharding
from llm_math import train as train_lib

from tests import helpers

_REPLACED = ("eval_stride", "num_steps", "eval_every", "log_every", "checkpoint_every")
TINY = [a for a in helpers.TINY_OVERRIDES if not any(f".{k}=" in a for k in _REPLACED)] + [
    "--config.eval_stride=8", "--config.num_steps=40", "--config.warmup_steps=5",
    "--config.eval_every=20", "--config.log_every=20", "--config.checkpoint_every=40",
    "--config.svd.rank_fractions=(0.25,0.5,1.0)", "--config.svd.energies=(0.9,0.99)",
    "--config.quant.schemes=int8-per_channel,int4-per_tensor,int4-group16",
    "--config.lora.ranks=(2,)", "--config.lora.num_steps=16", "--config.lora.eval_every=8",
    "--config.lora.warmup_steps=2", "--config.lora.scratch=False",
    "--config.lora.target_synthetic.train_tokens=20000",
    "--config.lora.target_synthetic.val_tokens=2000",
    "--config.distill.student.d_model=16", "--config.distill.student.d_ff=32",
    "--config.distill.temperatures=(2.0,)", "--config.distill.seeds=(0,1)",
    "--config.distill.num_steps=10", "--config.distill.eval_every=5",
    "--config.distill.warmup_steps=2",
]
SCRATCH = "scratch (labels only)"


def _env():
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """One run of every study on a tiny model: (workdir, results, the config checks' process).

  The config checks (_CHECKS) run in a second process alongside, to use both cores.
  """
  workdir = tmp_path_factory.mktemp("compression")
  checks = subprocess.Popen([sys.executable, "-c", _CHECKS], cwd=helpers.REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  proc = subprocess.run([sys.executable, "-m", "experiments.compression", f"--workdir={workdir}"]
                        + TINY, cwd=helpers.REPO, env=_env(), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / "results.json", encoding="utf-8") as f:
    yield workdir, json.load(f), checks
  checks.kill()


def _trained(workdir, results):
  """The base model, its config and an evaluator on the base run's validation windows."""
  trained = train_lib.load_trained(str(workdir / "base"))
  config = trained.config
  dataset = helpers.tiny_dataset(config)
  model = model_lib.Transformer(train_lib.model_config(config, dataset.vocab_size))
  windows = train_lib.validation_windows(config, dataset)
  evaluate = train_lib.Evaluator(windows, model.apply, config.eval_batch_size,
                                 sharding.make_mesh(config.mesh),
                                 tuple(tuple(r) for r in config.logical_axis_rules))
  assert results["base"]["step"] == trained.step == config.num_steps
  return trained, evaluate


def test_svd_curve_and_eckart_young_at_the_tree_level(run):
  workdir, results, _ = run
  svd, base = results["svd"], results["base"]
  uniform = sorted((r for r in svd["records"] if r["method"] == "uniform"),
                   key=lambda r: r["setting"])
  assert [r["setting"] for r in uniform] == [0.25, 0.5, 1.0]
  # A curve: each fraction keeps more singular values and more energy than the last.
  kept = [r["singular_values_kept"] for r in uniform]
  energy = [r["energy_kept"] for r in uniform]
  assert kept == sorted(kept) and len(set(kept)) == 3
  assert energy == sorted(energy) and energy[-1] == pytest.approx(1.0)
  # Full rank is the float model; a quarter of the singular values costs perplexity.
  assert uniform[-1]["val_nll"] == pytest.approx(base["val_nll"], abs=1e-4)
  assert uniform[0]["val_nll"] > base["val_nll"] + 1e-3
  spectra = {p: np.asarray(s) for p, s in svd["spectra"].items()}
  total2 = sum(float(np.sum(s**2)) for s in spectra.values())
  for r in svd["records"]:
    # Eckart-Young over all matrices: squared error = the discarded squared singular values.
    discarded = sum(float(np.sum(spectra[p][k:]**2)) for p, k in r["ranks"].items())
    assert r["relative_error"] == pytest.approx(math.sqrt(discarded / total2), abs=1e-4)
    assert r["energy_kept"] == pytest.approx(1 - discarded / total2, abs=1e-5)
    assert r["params_factored"] == sum(k * sum(svd["matrix_shapes"][p])
                                       for p, k in r["ranks"].items())
  # The global budget keeps at least the requested share of sum s^2.
  for r in svd["records"]:
    if r["method"] == "global energy":
      assert r["energy_kept"] >= r["setting"] - 1e-6
  # The recorded perplexity is that of the truncated checkpoint, recomputed here independently.
  trained, evaluate = _trained(workdir, results)
  flat = compression.flatten_tree(trained.params)
  half = next(r for r in uniform if r["setting"] == 0.5)
  updates = {}
  for path, rank in half["ranks"].items():
    n_in = compression.num_input_axes(path)
    w = jnp.asarray(flat[path])
    updates[path] = compression.matrix_to_kernel(
        compression.truncate_svd(compression.kernel_to_matrix(w, n_in), rank), w.shape)
  assert evaluate(compression.replace_leaves(trained.params, updates)) == pytest.approx(
      half["val_nll"], abs=1e-4)


def test_quantization_schemes_and_storage(run):
  workdir, results, _ = run
  q, base = results["quant"], results["base"]
  by = {r["scheme"]: r for r in q["records"]}
  assert list(by) == ["float32", "int8-per_channel", "int4-per_tensor", "int4-group16"]
  assert by["float32"]["val_nll"] == base["val_nll"]
  int8 = by["int8-per_channel"]
  assert abs(int8["ppl_change_pct"]) < 1.0
  assert int8["ppl_change_pct"] == pytest.approx(
      100 * (math.exp(int8["val_nll"] - base["val_nll"]) - 1), rel=1e-6)
  assert by["int4-per_tensor"]["relative_error"] > int8["relative_error"]
  assert by["int4-group16"]["relative_error"] < by["int4-per_tensor"]["relative_error"]
  # bits/param = code bits + 16-bit scales: one per output column, or per 16 inputs and column.
  trained, evaluate = _trained(workdir, results)
  flat = compression.flatten_tree(trained.params)
  mats = {p: compression.kernel_to_matrix(jnp.asarray(flat[p]), compression.num_input_axes(p))
          for p in compression.select_matrices(trained.params, q["pattern"])}
  n = sum(m.size for m in mats.values())
  assert q["params_quantized"] == n
  channels = sum(m.shape[1] for m in mats.values())
  assert int8["bits_per_param"] == pytest.approx(8 + 16 * channels / n)
  assert by["int4-per_tensor"]["bits_per_param"] == pytest.approx(4 + 16 * len(mats) / n)
  assert by["int4-group16"]["bits_per_param"] == pytest.approx(4 + 16 / 16)
  # The recorded int8 perplexity is the dequantized checkpoint's, recomputed kernel by kernel.
  updates = {p: compression.matrix_to_kernel(
      compression.quantize_dequantize(m, 8, "per_channel", scale_dtype=jnp.float16),
      flat[p].shape) for p, m in mats.items()}
  assert evaluate(compression.replace_leaves(trained.params, updates)) == pytest.approx(
      int8["val_nll"], abs=1e-5)


def test_lora_transfer_counts_and_curves(run):
  _, results, _ = run
  lo = results["lora"]
  runs = {r["name"]: r for r in lo["runs"]}
  none, full = runs["no fine-tuning"], runs["full fine-tuning"]
  # q and v kernels of d_model x d_model in each of the layers: r (d + d) parameters each.
  d, layers = 32, 1
  for rank in (2,):
    r = runs[f"LoRA r={rank}"]
    assert r["adapted_matrices"] == 2 * layers
    assert r["trainable_params"] == 2 * layers * rank * 2 * d
    assert r["adapted_params"] == 2 * layers * d * d
    # B = 0 at the start: the first point of every LoRA curve is the base model itself.
    assert r["curve"][0] == [0, none["val_nll"]]
    assert [s for s, _ in r["curve"]] == [0, 8, 16]
    assert r["val_nll"] < none["val_nll"]
  assert full["trainable_params"] == lo["params_total"] == results["base"]["params"]
  assert full["val_nll"] < none["val_nll"]
  assert "lag=12" in lo["target"] and "lag=4" in results["data"]
  assert lo["target_changes"] == {"lag": [4, 12], "zipf_exponent": [1.0, 1.5]}


def test_distillation_runs_are_paired_by_seed(run):
  _, results, _ = run
  d = results["distill"]
  assert d["student_params"] < d["teacher_params"]
  scratch = SCRATCH
  names = ["distilled, T=2", scratch]
  assert list(d["summary"]) == names
  by_seed = {}
  for r in d["runs"]:
    by_seed.setdefault(r["seed"], {})[r["name"]] = r
  assert sorted(by_seed) == [0, 1]
  for seed, runs in by_seed.items():
    # Same initialization within a seed (identical step-0 loss), different across seeds.
    assert len({runs[n]["curve"][0][1] for n in names}) == 1
    assert runs[scratch]["alpha"] == 0.0 and runs["distilled, T=2"]["temperature"] == 2.0
    for n in names:
      assert runs[n]["curve"][-1][1] < runs[n]["curve"][0][1]  # every student learned
  assert by_seed[0][scratch]["curve"][0][1] != by_seed[1][scratch]["curve"][0][1]
  for n in names[:1]:
    m = d["summary"][n]
    expected = [by_seed[s][n]["val_nll"] - by_seed[s][scratch]["val_nll"] for s in (0, 1)]
    np.testing.assert_allclose(m["minus_scratch_per_seed"], expected, rtol=1e-12)
    assert m["seeds_better_than_scratch"] == sum(x < 0 for x in expected)
    assert m["val_nll_mean"] == pytest.approx(np.mean([by_seed[s][n]["val_nll"] for s in (0, 1)]))


def test_report_and_figures_regenerate_without_jax(run):
  workdir, results, _ = run
  md = (workdir / "results.md").read_text()
  for heading in ("Perplexity vs rank", "Perplexity vs quantization scheme",
                  "LoRA transfer: quality vs rank", "Distillation vs training from scratch"):
    assert heading in md
  assert "int8 per-channel: perplexity" in md and "within 1% of float" in md
  assert "int4 RTN costs" in md and "| LoRA r=2 | 256 |" in md
  assert results["config"]["lora"]["ranks"] == [2]
  for name in ("svd.png", "quant.png", "lora.png", "distill.png"):
    os.remove(workdir / name)
  code = ("import runpy, sys; sys.argv = ['plot', '--workdir=%s']; "
          "runpy.run_module('experiments.plot_compression', run_name='__main__'); "
          "assert 'jax' not in sys.modules" % workdir)
  subprocess.run([sys.executable, "-c", code], cwd=helpers.REPO, env=_env(), check=True,
                 capture_output=True, timeout=120)
  for name in ("svd.png", "quant.png", "lora.png", "distill.png"):
    assert (workdir / name).stat().st_size > 10_000


_CHECKS = r"""
import pytest
from experiments import compression as e
from experiments.configs import compression as default
from llm_math.errors import UsageError

assert e.parse_studies("quant, svd") == ["svd", "quant"]
with pytest.raises(UsageError, match="--config.studies"):
  e.parse_studies("svd,prune")
assert e.parse_scheme("int4-group32") == {
    "name": "int4-group32", "bits": 4, "granularity": "group", "group_size": 32}
with pytest.raises(UsageError, match="int16-per_tensor"):
  e.parse_scheme("int16-per_tensor")
studies = list(e.STUDIES)
e.check_config(default.get_config(), 32, studies)
for field, value, fragment in [
    ("quant.schemes", "int4-group48", "needs groups of 48"),
    ("svd.rank_fractions", (0.0, 0.5), "rank_fractions"),
    ("lora.ranks", (1, 65), "lora.ranks"),
    ("lora.targets", "no_such_kernel$", "matches no parameter"),
    ("distill.temperatures", (0.0,), "distill.temperatures"),
    ("distill.seeds", (1, 1), "distill.seeds"),
    ("distill.alpha", 1.5, "distill.alpha"),
    ("distill.student.d_model", 30, "--config.distill.student")]:
  config = default.get_config()
  *path, name = field.split(".")
  block = config
  for p in path:
    block = block[p]
  block[name] = value
  with pytest.raises(UsageError, match=fragment):
    e.check_config(config, 32, studies)
print("checked")
"""


def test_config_mistakes_are_usage_errors(run):
  checks = run[2]
  stdout, stderr = checks.communicate(timeout=120)
  assert checks.returncode == 0 and "checked" in stdout, stderr[-3000:]
