"""The compression experiment end to end on a tiny model: SVD, quantization, LoRA, distillation; the
same numbers on 1 device, on 8 devices (data x fsdp x tensor) and in 2 processes, and after a
SIGTERM midway and a rerun.

experiments.compression defines absl flags at import, as every experiment does, so it runs in
subprocesses here (two experiment modules cannot share one process's flags); the study's config
checks and run plan (llm_math.studies.compression) run here directly.
"""
import math
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import compression as config_lib
from llm_math import checkpoint
from llm_math import evaluation
from llm_math import model as model_lib
from llm_math import train_config
from llm_math.analysis import compression
from llm_math.analysis import lora as lora_lib
from llm_math.errors import UsageError
from llm_math.studies import compression as study

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
DISTILLED = "distilled, T=2"


@pytest.fixture(scope="module", autouse=True)
def cli_env(tmp_path_factory):
  """Compilation dominates these tiny runs (about 20 programs per training run): one persistent
  compilation cache for every run of this module, and XLA's backend optimizations off (2-3x faster
  compiles; every run compared here is compiled the same way)."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax_cache")))
    mp.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    mp.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    mp.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    yield


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """One run of every study on a tiny model on one device: (workdir, results)."""
  workdir = tmp_path_factory.mktemp("compression")
  helpers.run_study("compression", workdir, TINY)
  return workdir, helpers.results(workdir)


def _trained(workdir, results):
  """The base model and an evaluator on the base run's validation windows."""
  trained = checkpoint.load_trained(str(workdir / "base"))
  dataset = helpers.tiny_dataset(trained.config)
  model = model_lib.Transformer(train_config.model_config(trained.config, dataset.vocab_size))
  windows = evaluation.validation_windows(trained.config, dataset.val_ids)
  assert results["base"]["step"] == trained.step == trained.config.num_steps
  return trained, evaluation.evaluator(trained.config, windows, model.apply)


def test_svd_curve_and_eckart_young_at_the_tree_level(run):
  workdir, results = run
  svd, base = results["svd"], results["base"]
  uniform = [r for r in svd["records"] if r["method"] == "uniform"]
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
    if r["method"] == "global energy":  # The budget keeps at least its share of sum s^2.
      assert r["energy_kept"] >= r["setting"] - 1e-6
  # The recorded perplexity is that of the truncated checkpoint, recomputed here independently.
  trained, evaluate = _trained(workdir, results)
  flat = compression.flatten_tree(trained.params)
  updates = {}
  for path, rank in uniform[1]["ranks"].items():
    u, s, vt = np.linalg.svd(compression.kernel_to_matrix(
        jnp.asarray(flat[path]), compression.num_input_axes(path)), full_matrices=False)
    updates[path] = ((u[:, :rank] * s[:rank]) @ vt[:rank]).reshape(flat[path].shape)
  assert evaluate(compression.replace_leaves(trained.params, updates)) == pytest.approx(
      uniform[1]["val_nll"], abs=1e-4)


def test_quantization_schemes_and_storage(run):
  workdir, results = run
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


def test_lora_trains_the_factors_of_a_frozen_base(run):
  workdir, results = run
  lo = results["lora"]
  runs = {r["name"]: r for r in lo["runs"]}
  none, full, adapted = runs["no fine-tuning"], runs["full fine-tuning"], runs["LoRA r=2"]
  # q and v kernels of d_model x d_model in the one layer: r (d + d) parameters each.
  d = 32
  assert adapted["adapted_matrices"] == 2 and adapted["adapted_params"] == 2 * d * d
  assert adapted["trainable_params"] == 2 * 2 * 2 * d
  # b = 0 at the start: the first point of the LoRA curve is the base model itself.
  assert adapted["curve"][0][0] == 0
  assert adapted["curve"][0][1] == pytest.approx(none["val_nll"], abs=1e-6)
  assert [s for s, _ in adapted["curve"]] == [0, 8, 16]
  assert adapted["val_nll"] < none["val_nll"] and full["val_nll"] < none["val_nll"]
  assert adapted["share_of_full_gain"] == pytest.approx(
      (none["val_nll"] - adapted["val_nll"]) / (none["val_nll"] - full["val_nll"]))
  assert full["trainable_params"] == lo["params_total"] == results["base"]["params"]
  assert "lag=12" in lo["target"] and "lag=4" in results["data"]
  assert lo["target_changes"] == {"lag": [4, 12], "zipf_exponent": [1.0, 1.5]}
  # The run's checkpoint holds the base bit for bit as trained, and factors that moved.
  trained, _ = _trained(workdir, results)
  tree, step = checkpoint.load_params(str(workdir / "lora" / "rank_2"))
  assert step == 16
  for path, leaf in compression.flatten_tree(trained.params).items():
    np.testing.assert_array_equal(compression.flatten_tree(tree["base"])[path], leaf)
  pairs = lora_lib.factor_pairs(tree["lora"])
  assert len(pairs) == 2 and all(np.any(np.asarray(b)) for _, b in pairs.values())


def test_distillation_runs_are_paired_by_seed(run):
  workdir, results = run
  d = results["distill"]
  assert d["student_params"] < d["teacher_params"]
  assert list(d["summary"]) == [DISTILLED, SCRATCH]
  by_seed = {}
  for r in d["runs"]:
    by_seed.setdefault(r["seed"], {})[r["name"]] = r
  assert sorted(by_seed) == [0, 1]
  for seed, runs in by_seed.items():
    # The same initialization within a seed (the same step-0 loss), different across seeds.
    assert runs[DISTILLED]["curve"][0][1] == pytest.approx(runs[SCRATCH]["curve"][0][1], abs=1e-6)
    assert runs[SCRATCH]["alpha"] == 0.0 and runs[DISTILLED]["temperature"] == 2.0
    for r in runs.values():
      assert r["curve"][-1][1] < r["curve"][0][1]  # every student learned
    # The teacher in the distilled run's checkpoint is the base model, untouched.
    tree, _ = checkpoint.load_params(str(workdir / "distill" / f"seed_{seed}" / "T_2"))
    base, _ = checkpoint.load_params(str(workdir / "base"))
    for path, leaf in compression.flatten_tree(base).items():
      np.testing.assert_array_equal(compression.flatten_tree(tree["teacher"])[path], leaf)
  assert by_seed[0][SCRATCH]["curve"][0][1] != by_seed[1][SCRATCH]["curve"][0][1]
  m = d["summary"][DISTILLED]
  expected = [by_seed[s][DISTILLED]["val_nll"] - by_seed[s][SCRATCH]["val_nll"] for s in (0, 1)]
  np.testing.assert_allclose(m["minus_scratch_per_seed"], expected, rtol=1e-12)
  assert m["seeds_better_than_scratch"] == sum(x < 0 for x in expected)


def test_report_and_figures_regenerate_without_jax(run):
  workdir, results = run
  md = (workdir / "results.md").read_text()
  for heading in ("Perplexity vs rank", "Perplexity vs quantization scheme",
                  "LoRA transfer: quality vs rank", "Distillation vs training from scratch"):
    assert heading in md
  assert "int8 per-channel: perplexity" in md and "within 1% of float" in md
  assert "int4 RTN costs" in md and "| LoRA r=2 | 256 |" in md
  assert results["config"]["lora"]["ranks"] == [2]
  assert results["headline"]["base_val_nll"] == results["base"]["val_nll"]
  for name in ("svd.png", "quant.png", "lora.png", "distill.png", "results.md"):
    os.remove(workdir / name)
  code = ("import runpy, sys; sys.argv = ['plot', '--workdir=%s']; "
          "runpy.run_module('experiments.redraw', run_name='__main__'); "
          "assert 'jax' not in sys.modules" % workdir)
  subprocess.run([sys.executable, "-c", code], cwd=helpers.REPO, check=True,
                 capture_output=True, timeout=120)
  for name in ("svd.png", "quant.png", "lora.png", "distill.png"):
    assert (workdir / name).stat().st_size > 10_000
  assert (workdir / "results.md").read_text() == md


def test_config_mistakes_are_usage_errors():
  assert study.parse_studies("quant, svd") == ["svd", "quant"]
  with pytest.raises(UsageError, match="--config.studies"):
    study.parse_studies("svd,prune")
  check = lambda config: (study.check(config), study.check_shapes(config, 32))
  check(config_lib.get_config())
  for field, value, fragment in [
      ("quant.schemes", "int4-group48", "--config.quant.schemes='int4-group48': expected groups"),
      ("quant.schemes", "int16-per_tensor", "--config.quant.schemes: scheme: 'int16-per_tensor'"),
      ("quant.scale_dtype", "int8", "--config.quant.scale_dtype"),
      ("svd.rank_fractions", (0.0, 0.5), "--config.svd.rank_fractions"),
      ("svd.pattern", "(", "--config.svd.pattern"),
      ("lora.ranks", (1, 65), "--config.lora.ranks"),
      ("lora.targets", "no_such_kernel$", "--config.lora.targets='no_such_kernel\\$': pattern"),
      ("lora.num_steps", 0, "--config.lora.num_steps"),
      ("distill.temperatures", (0.0,), "--config.distill.temperatures"),
      ("distill.seeds", (1, 1), "--config.distill.seeds"),
      ("distill.alpha", 1.5, "--config.distill.alpha"),
      ("distill.student.d_model", 30, "--config.distill.student"),
      ("distill.student.depth", 3, "--config.distill.student.depth")]:
    config = config_lib.get_config()
    *path, name = field.split(".")
    block = config
    for p in path:
      block = block[p]
    block[name] = value
    with pytest.raises(UsageError, match=fragment) as error:
      check(config)
    assert "\n" not in str(error.value)


def test_every_run_has_its_own_config():
  """Each run's config holds what that run depends on, and nothing of the other runs: adding a
  rank or a temperature leaves the existing runs' configs (and directories) valid."""
  config = config_lib.get_config()
  base = {"model": "WORKDIR/base", "step": 1500}
  plan = study.plan_runs(config, study.STUDIES, base)
  assert list(plan) == (
      [("lora", f"rank_{r}") for r in (1, 2, 4, 8, 16)] + [("lora", "full"), ("lora", "scratch")]
      + [("distill", f"seed_{s}", n) for s in (0, 1, 2) for n in ("T_1", "T_2", "T_4", "scratch")])
  rank4, full = plan["lora", "rank_4"], plan["lora", "full"]
  assert (rank4.num_steps, rank4.learning_rate, rank4.weight_decay) == (400, 1e-2, 0.0)
  assert rank4.adapter.to_dict() == {"rank": 4, "alpha": 8.0, "targets": config.lora.targets}
  assert (full.learning_rate, full.weight_decay, full.min_learning_rate) == (1e-3, 0.1, 1e-4)
  assert rank4.base.to_dict() == full.base.to_dict() == base and "base" not in plan[
      "lora", "scratch"]
  assert rank4.target.synthetic.lag == 12 and rank4.model.to_dict() == config.model.to_dict()
  t2 = plan["distill", "seed_1", "T_2"]
  assert (t2.seed, t2.num_steps, t2.model.d_model, t2.distillation.temperature) == (1, 600, 64, 2.0)
  assert "teacher" not in plan["distill", "seed_1", "scratch"]
  for run in plan.values():
    assert not set(study.STUDY_FIELDS) & set(run)
  config.lora.ranks, config.distill.temperatures = (2, 32), (2.0, 8.0)
  wider = study.plan_runs(config, ["lora", "distill"], base)
  for names in (("lora", "rank_2"), ("lora", "full"), ("distill", "seed_0", "T_2")):
    assert wider[names].to_dict() == plan[names].to_dict()
  assert ("lora", "rank_32") in wider and ("distill", "seed_2", "T_8") in wider
  assert study.run_config(config).to_dict() == {
      k: v for k, v in config.to_dict().items() if k not in study.STUDY_FIELDS}


def test_a_changed_setting_is_a_one_line_error_naming_the_run(run, tmp_path):
  workdir, _ = run
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  changed = [a for a in TINY if "lora.learning_rate" not in a] + ["--config.lora.learning_rate=0.02"]
  proc = subprocess.run([sys.executable, "-m", "experiments.compression", f"--workdir={copy}"]
                        + changed, cwd=helpers.REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2
  error = proc.stderr.strip().splitlines()[-1]
  assert error.startswith("error: ") and "lora/rank_2 holds a run" in error
  assert "learning_rate: 0.01 there, 0.02 now" in error


def _headline_paths(tree, prefix="headline") -> list[str]:
  """The dotted paths of the numbers under results["headline"]."""
  if isinstance(tree, dict):
    return [p for k, v in tree.items() for p in _headline_paths(v, f"{prefix}.{k}")]
  if isinstance(tree, list):
    return [p for i, v in enumerate(tree) for p in _headline_paths(v, f"{prefix}.{i}")]
  return [prefix] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def _assert_same_headline(a: dict, b: dict, rtol: float):
  """NLLs and shares to `rtol`; perplexity changes (a difference of two NLLs, in percent) to
  10 rtol percentage points; counts exactly."""
  paths = _headline_paths(a["headline"])
  assert paths == _headline_paths(b["headline"]) and len(paths) > 20
  pct = [p for p in paths if p.endswith("ppl_change_pct")]
  helpers.assert_same_numbers(a, b, [p for p in paths if p not in pct], rtol=rtol, atol=rtol)
  helpers.assert_same_numbers(a, b, pct, rtol=0.0, atol=10 * rtol)


@pytest.mark.slow  # ~40 s; the size sweep and batch-size 8-device runs cover the sharded path by default.
def test_eight_devices_match_one_device(run, tmp_path):
  helpers.run_study("compression", tmp_path, TINY + ["--mesh=data:2,fsdp:2,tensor:2"], devices=8)
  _assert_same_headline(run[1], helpers.results(tmp_path), rtol=1e-4)


@pytest.mark.slow
def test_two_processes_match_one_device(run, tmp_path):
  helpers.run_study("compression", tmp_path, TINY, processes=2)
  _assert_same_headline(run[1], helpers.results(tmp_path), rtol=1e-4)


@pytest.mark.slow
def test_sigterm_midway_then_rerun_gives_the_same_results(run, tmp_path):
  # Preempted in the first distillation run (its step-5 evaluation), after the LoRA runs finished.
  stopped = helpers.run_study("compression", tmp_path, TINY, stop_after=r"step\s+5 \| val nll")
  assert "checkpoint saved" in stopped.stdout and not (tmp_path / "results.json").exists()
  helpers.run_study("compression", tmp_path, TINY)
  resumed = helpers.results(tmp_path)
  _assert_same_headline(run[1], resumed, rtol=1e-6)
  curves = [f"{study}.runs.{i}.curve" for study in ("lora", "distill")
            for i in range(len(resumed[study]["runs"]))]
  helpers.assert_same_numbers(run[1], resumed, curves, rtol=1e-6)
