"""The attention-spectra study (llm_math.studies.attention_spectra, run by
experiments/attention_spectra.py) end to end on a tiny config: spectra, bounds, rank collapse, and
the same numbers on 1 device, 8 devices and 2 processes, and after a preemption."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from experiments.configs import attention_spectra as default_config
from llm_math import checkpoint
from llm_math import studies
from llm_math.analysis import spectra
from llm_math.errors import UsageError
from llm_math.figures import attention_spectra as figures
from llm_math.reports import attention_spectra as report
from llm_math.studies import attention_spectra as study
from tests import helpers

FIGURES = ("eigenvalues.png", "singular_values.png", "stationary.png", "entropy_gap.png",
           "rank_collapse.png", "sink_mass.png", "attention_maps.png", "entropy_lr.png",
           "dynamics.png")
TINY = {"seq_len": 12, "batch_size": 8, "num_steps": 6, "warmup_steps": 2, "log_every": 3,
        "checkpoint_every": 6, "model.num_layers": 2, "model.d_model": 16, "model.d_ff": 32,
        "model.num_heads": 2, "synthetic.train_tokens": 20000, "synthetic.val_tokens": 2000,
        "synthetic.lag": 4, "spectra.track_steps": (0, 3, 6), "spectra.analysis_windows": 2,
        "spectra.eval_windows": 8, "deep.num_layers": 6, "deep.num_steps": 0,
        "deep.batch_size": 4, "deep.random_inputs": 4}


def _flag(key, value) -> str:
  text = f"({','.join(map(str, value))})" if isinstance(value, tuple) else value
  return f"--config.{key}={text}"


ARGS = [_flag(k, v) for k, v in TINY.items()]
# Headline numbers: each run's final val NLL, first-layer entropy (per head) and query-key norms,
# and each architecture's relative residual at the last layer (with and without the causal mask).
HEADLINE = ([f"runs.{run}.snapshots.-1.{key}" for run in study.RUNS
             for key in ("val_nll", "mean_row_entropy.0", "qk_norm")]
            + [f"rank_collapse.architectures.{arch}.{profile}.fro.-1"
               for arch in study.ARCHITECTURES for profile in ("init", "init_bidirectional")]
            + ["rank_collapse.uniform_causal_reference"])


def tiny_config(**overrides):
  c = default_config.get_config()
  for key, value in {**TINY, **overrides}.items():
    section, _, field = key.rpartition(".")
    (c[section] if section else c)[field] = value
  return c


def _arrays(workdir) -> dict:
  with np.load(os.path.join(str(workdir), "spectra.npz")) as npz:
    return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
  """Compilation dominates these tiny runs: one compilation cache for all of this module's runs
  (a rerun, and the runs that share a program, compile once) and XLA's backend optimizations off."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax_cache")))
    mp.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    mp.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    yield


@pytest.fixture(scope="module")
def one_device(tmp_path_factory, cli_env):
  """The study through launch/local.sh on one CPU device: (workdir, results.json, spectra.npz)."""
  workdir = tmp_path_factory.mktemp("one_device")
  helpers.run_study("attention_spectra", workdir, ARGS, devices=1)
  return str(workdir), helpers.results(workdir), _arrays(workdir)


# ----------------------------------------------------------------------------------------------
# What one run measures.
# ----------------------------------------------------------------------------------------------


def test_writes_results_figures_and_a_directory_per_run(one_device):
  workdir, results, _ = one_device
  assert results["runs"].keys() == set(study.RUNS)
  assert sorted(results["figures"]) == sorted(FIGURES)
  for name in FIGURES:
    with open(os.path.join(workdir, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
  for name, run in results["runs"].items():
    assert [s["step"] for s in run["snapshots"]] == [0, 3, 6]
    assert run["diverged_at"] is None
    run_dir = os.path.join(workdir, run["run_dir"])
    assert run["run_dir"] == os.path.join("models", name)
    assert sorted(os.listdir(os.path.join(run_dir, "spectra"))) == [
        "step_000000.npz", "step_000003.npz", "step_000006.npz"]
    # The snapshot scalars are metrics.jsonl records of the run, next to its val NLL.
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
      logged = [json.loads(line) for line in f if '"spectra"' in line]
    assert [r["step"] for r in logged] == [0, 3, 6]
    assert logged[-1]["spectra"]["qk_norm"] == run["snapshots"][-1]["qk_norm"]
    assert logged[-1]["val_nll"] == run["snapshots"][-1]["val_nll"]
  for arch in results["rank_collapse"]["architectures"].values():
    assert os.path.isfile(os.path.join(workdir, arch["run_dir"], "metrics.jsonl"))
  with open(os.path.join(workdir, "results.md"), encoding="utf-8") as f:
    md = f.read()
  # The rank-collapse result is stated with its numbers, and so is the learning-rate comparison.
  arch = results["rank_collapse"]["architectures"]
  pure, skip = arch["pure attention"]["init"]["fro"], arch["attention + skip"]["init"]["fro"]
  assert f"falls from {pure[0]:.3g} (embeddings) to {pure[-1]:.3g} at layer 6" in md
  assert f"attention + skip keeps {skip[-1]:.3g}" in md
  high = results["runs"]["causal_high_lr"]["snapshots"][-1]
  assert f"its val NLL {high['val_nll']:.4f}" in md


def test_dynamics_are_measured_on_every_log_spaced_checkpoint(one_device):
  """After training, every run is analysed at each step its snapshots/ kept (0, 1, 2, 4 below
  checkpoint_every = 6, then 6): per layer, one value per step; at steps 0 (the initialization)
  and 6 (the end) the checkpoint holds the parameters the hook analysed during training."""
  workdir, results, _ = one_device
  for name, run in results["runs"].items():
    dyn = run["dynamics"]
    kept = checkpoint.saved_steps(os.path.join(workdir, run["run_dir"]),
                                  directories=(checkpoint.SNAPSHOTS,))
    assert dyn["steps"] == kept == [0, 1, 2, 4, 6], name
    hooked = {s["step"]: s for s in run["snapshots"]}
    for key in study.DYNAMICS:
      assert np.shape(dyn[key]) == (5, 2), (name, key)  # [steps, layers]
      for i, step in ((0, 0), (-1, 6)):
        np.testing.assert_allclose(dyn[key][i], np.mean(hooked[step][key], axis=1), rtol=0,
                                   atol=1e-6, err_msg=f"{name} {key} step {step}")
  # Trained states: step 1 at the high rate (no warmup); the causal run's first update has the
  # warmup's learning rate 0, so its step 1 repeats step 0 and step 2 is the first that moves.
  high, causal = (results["runs"][name]["dynamics"] for name in ("causal_high_lr", "causal"))
  assert high["sink_mass"][1] != high["sink_mass"][0]
  assert causal["sink_mass"][2] != causal["sink_mass"][0]
  with open(os.path.join(workdir, "results.md"), encoding="utf-8") as f:
    md = f.read()
  h = causal["mean_normalized_row_entropy"]
  assert (f"step 0 -> step 6: layer 1: normalized entropy {h[0][0]:.3f} -> {h[-1][0]:.3f}, "
          f"effective rank {causal['effective_rank'][0][0]:.2f}") in md
  assert "models/<name>/snapshots" in results["protocol"]["dynamics"]


def test_a_run_without_log_spaced_checkpoints_has_no_dynamics(one_device):
  """A rank-collapse model keeps rolling checkpoints only: no dynamics, one line, and the report
  and figures go without them."""
  workdir, results, _ = one_device
  deep = results["rank_collapse"]["architectures"]["full block"]
  run_dir = os.path.join(workdir, deep["run_dir"])
  lines = []
  assert study.dynamics(run_dir, None, None, lines.append) is None
  assert lines == [f"no log-spaced checkpoints in {run_dir}/snapshots: no dynamics"]
  without = json.loads(json.dumps(results))
  for run in without["runs"].values():
    run["dynamics"] = None
  assert list(figures.figures_of(without)) == [n for n in FIGURES if n != "dynamics.png"]
  assert "The causal run kept no log-spaced checkpoints" in report.report(without)


def test_hook_arrays_of_an_older_run_are_read_where_it_wrote_them(tmp_path):
  """Runs analysed before snapshots/ held the log-spaced checkpoints wrote their window-0 arrays
  there; a reused run is read from there, new arrays go to spectra/."""
  (tmp_path / "snapshots").mkdir()
  (tmp_path / "snapshots" / "step_000000.npz").write_bytes(b"")
  assert study.snapshot_path(str(tmp_path), 0) == tmp_path / "snapshots" / "step_000000.npz"
  assert study.snapshot_path(str(tmp_path), 3) == tmp_path / "spectra" / "step_000003.npz"


def test_causal_eigenvalues_are_the_exact_diagonal(one_device):
  _, results, arrays = one_device
  lam_LxHxT = arrays["causal.eigenvalues"][-1]
  a_LxHxTxT = arrays["causal.attention_final"].astype(np.float64)
  assert np.all(lam_LxHxT.imag == 0)
  diagonal_sorted = -np.sort(-np.diagonal(a_LxHxTxT, axis1=-2, axis2=-1), axis=-1)
  np.testing.assert_allclose(lam_LxHxT.real, diagonal_sorted, atol=1e-7)
  np.testing.assert_allclose(lam_LxHxT[..., 0].real, 1.0, atol=1e-6)  # A_00 = 1
  # Causal: the stationary distribution is e_0, and the spectral gap is 1 - max_{t>=1} A_tt.
  pi = arrays["causal.stationary_distribution"]
  np.testing.assert_array_equal(pi[..., 0], 1.0)
  snap = results["runs"]["causal"]["snapshots"][-1]
  assert np.all(np.asarray(snap["stationary_sink_mass"]) == 1.0)
  np.testing.assert_array_equal(arrays["causal.steps"], [0, 3, 6])


def test_bidirectional_spectra_are_those_of_a_stochastic_matrix(one_device):
  _, _, arrays = one_device
  a_LxHxTxT = arrays["bidirectional.attention_final"].astype(np.float64)
  assert not np.all(spectra.is_lower_triangular(a_LxHxTxT))
  lam = arrays["bidirectional.eigenvalues"][-1]
  np.testing.assert_allclose(np.abs(lam[..., 0]), 1.0, atol=1e-5)  # spectral radius 1
  np.testing.assert_allclose(np.sort(np.abs(lam), axis=-1),
                             np.sort(np.abs(np.linalg.eigvals(a_LxHxTxT)), axis=-1), atol=1e-5)
  pi_LxHxT = arrays["bidirectional.stationary_distribution"][-1]
  np.testing.assert_allclose(np.einsum("lht,lhts->lhs", pi_LxHxT, a_LxHxTxT), pi_LxHxT,
                             atol=1e-5)
  np.testing.assert_allclose(pi_LxHxT.sum(-1), 1.0, atol=1e-9)
  sv = arrays["bidirectional.singular_values"][-1]
  assert np.all(sv[..., 0] >= 1.0 - 1e-5)  # ||A||_2 >= rho(A) = 1


def test_zhai_bound_holds_on_every_row_and_sigma_matches_the_weights(one_device):
  _, results, _ = one_device
  for name in study.RUNS:
    for snap in results["runs"][name]["snapshots"]:
      assert snap["zhai_slack_min"] >= -1e-4, (name, snap["step"])
      entropy, bound = np.asarray(snap["mean_row_entropy"]), np.asarray(snap["zhai_bound"])
      assert np.all(bound <= entropy + 1e-4)
      assert np.all(bound >= 0)
  # At initialization every head is nearly uniform and sigma is tiny: the bound is informative.
  init = results["runs"]["causal"]["snapshots"][0]
  assert np.max(init["qk_norm"]) < 0.2
  assert np.min(init["zhai_bound"]) > 0.1


def test_high_lr_run_is_the_causal_run_at_ten_times_the_rate(one_device):
  _, results, _ = one_device
  normal, high = results["runs"]["causal"], results["runs"]["causal_high_lr"]
  assert high["learning_rate"] == pytest.approx(10 * normal["learning_rate"])
  assert high["warmup_steps"] == 0 and normal["warmup_steps"] == 2
  # Same initialization: identical statistics at step 0, different ones after training.
  assert high["snapshots"][0]["mean_row_entropy"] == normal["snapshots"][0]["mean_row_entropy"]
  assert high["snapshots"][-1]["qk_norm"] != normal["snapshots"][-1]["qk_norm"]
  assert normal["train_curve"]["step"] == [3, 6]


def test_pure_attention_collapses_with_depth_and_skip_connections_prevent_it(one_device):
  _, results, _ = one_device
  arch = results["rank_collapse"]["architectures"]
  pure, skip = arch["pure attention"]["init"]["fro"], arch["attention + skip"]["init"]["fro"]
  assert len(pure) == 7  # embeddings + 6 layers
  assert pure[0] == pytest.approx(skip[0])  # same embeddings: one draw for every architecture
  # (Not monotone layer by layer: X W_V W_O can stretch the residual directions.)
  assert pure[-1] < 0.15 * pure[0] and pure[-1] < 0.15 * skip[-1]
  assert min(skip) > 0.5  # X + A X keeps the identity's share of X
  # Nearly uniform causal attention at init: close to the U^l X reference (rate 1/2 per layer).
  reference = results["rank_collapse"]["uniform_causal_reference"]
  assert 0.3 < pure[-1] / reference[-1] < 3
  # Without the mask uniform-ish attention averages every row at once: faster collapse.
  bidi = arch["pure attention"]["init_bidirectional"]["fro"]
  assert bidi[-1] is None or bidi[-1] < 0.1 * pure[-1]
  assert all(r["trained"] is None for r in arch.values())  # deep.num_steps = 0
  assert arch["full block"]["params"] > arch["attention + MLP"]["params"] > arch[
      "pure attention"]["params"]


def test_a_short_deep_run_is_profiled_after_training(tmp_path):
  c = tiny_config(**{"deep.num_steps": 2, "deep.num_layers": 3})
  dataset = studies.load_dataset(c)
  windows = study.first_independent_windows(c, dataset.val_ids)
  tokens_BxT = np.random.default_rng(0).integers(0, dataset.vocab_size, size=(4, c.seq_len))
  record = study.rank_collapse_run(c, dataset, "attention + skip", windows, tokens_BxT,
                                 str(tmp_path), log=lambda *_: None)
  trained = record["trained"]
  assert trained["step"] == 2 and len(trained["fro"]) == 4
  assert trained["fro"] != record["init"]["fro"] and np.isfinite(trained["val_nll"])
  assert os.path.isdir(tmp_path / "models" / "deep" / "attention_skip" / "checkpoints")


def test_a_diverging_run_stops_and_keeps_earlier_snapshots(tmp_path):
  c = tiny_config(**{"model.num_layers": 1})
  c.learning_rate = c.min_learning_rate = 1e38  # Updates of 1e38: float32 overflows within steps.
  c.checkpoint_schedule = "rolling"  # No log-spaced snapshots of the overflowing steps 1 and 2.
  dataset = studies.load_dataset(c)
  run = study.tracked_run(c, dataset, "causal", study.first_independent_windows(c, dataset.val_ids),
                          str(tmp_path), log=lambda *_: None)
  assert run["diverged_at"] == 3
  assert [s["step"] for s in run["snapshots"]] == [0]
  assert os.listdir(tmp_path / "models" / "causal" / "spectra") == ["step_000000.npz"]


def test_a_run_preempted_midway_resumes_without_recomputing_its_snapshots(one_device, tmp_path):
  """SIGTERM during the snapshot at step 3 saves a checkpoint there; the rerun continues from it,
  keeps the snapshots of steps 0 and 3 (records and files) and ends as the uninterrupted run of
  the command line did (there compiled without backend optimizations: rounding may differ)."""
  c = tiny_config()
  dataset = studies.load_dataset(c)
  windows = study.first_independent_windows(c, dataset.val_ids)
  run = lambda workdir, log: study.tracked_run(c, dataset, "causal", windows, str(workdir), log)

  def preempt_at_step_3(line):
    if line.startswith("causal: snapshot at step 3 |"):
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(studies.Interrupted, match="interrupted at step 3; its state is saved"):
    run(tmp_path / "preempted", preempt_at_step_3)  # The runner exits 130 on it.
  snapshots = tmp_path / "preempted" / "models" / "causal" / "spectra"
  written = {p.name: p.stat().st_mtime_ns for p in snapshots.iterdir()}
  assert sorted(written) == ["step_000000.npz", "step_000003.npz"]
  lines = []
  resumed = run(tmp_path / "preempted", lines.append)
  assert "resumed from the checkpoint at step 3" in "\n".join(lines)
  assert [l.split(" |")[0] for l in lines if "snapshot" in l] == ["causal: snapshot at step 6"]
  assert all(p.stat().st_mtime_ns == written[p.name] for p in snapshots.iterdir()
             if p.name in written)
  helpers.assert_same_numbers({"causal": resumed}, one_device[1]["runs"],
                              list(_number_paths(resumed, "causal")), rtol=1e-5)


@pytest.mark.parametrize("field,value,fragment", [
    ("spectra.track_steps", (0, 5), "track_steps"),
    ("spectra.track_steps", (3, 6), "track_steps"),
    ("spectra.mask_rate", 1.0, "mask_rate"),
    ("deep.num_layers", 0, "deep.num_layers"),
    ("deep.init_std", float("inf"), "init_std"),
])
def test_bad_settings_are_usage_errors(field, value, fragment):
  with pytest.raises(UsageError, match=fragment):
    study.check(tiny_config(**{field: value}))


def test_redraw_from_files_without_jax(one_device, tmp_path):
  workdir = tmp_path / "copy"
  os.makedirs(workdir)
  for name in ("results.json", "spectra.npz"):
    with open(os.path.join(one_device[0], name), "rb") as src:
      (workdir / name).write_bytes(src.read())
  code = ("import sys; from experiments import redraw; "
          f"redraw.main(['--workdir', {str(workdir)!r}]); assert 'jax' not in sys.modules")
  proc = subprocess.run([sys.executable, "-c", code], cwd=helpers.REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert all((workdir / name).exists() for name in FIGURES)
  with open(os.path.join(one_device[0], "results.md"), encoding="utf-8") as f:
    assert (workdir / "results.md").read_text(encoding="utf-8") == f.read()
  missing = subprocess.run([sys.executable, "-m", "experiments.redraw",
                            "--workdir", str(workdir / "nothing")], cwd=helpers.REPO,
                           capture_output=True, text=True, timeout=120)
  assert missing.returncode == 2 and missing.stderr.startswith("error: ")
  assert figures.FLOAT32_UNIT_ROUNDOFF == 2.0 ** -24


@pytest.mark.parametrize("args,error", [
    (["--config.spectra.mask_rate=2"],
     "error: --config.spectra.mask_rate=2.0: expected a fraction in (0, 1)"),
    (["--mesh=data:2", "--config.deep.batch_size=3"],
     "error: --config.deep.batch_size=3: expected a multiple of the 2 data-parallel devices of "
     "--config.mesh='data:2'"),
])
def test_command_line_mistake_is_a_one_line_error(tmp_path, args, error):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.attention_spectra", f"--workdir={tmp_path}", *args],
      cwd=helpers.REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, "LLM_MATH_CPU_DEVICES": "2"})
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [error]


def test_rerun_with_another_config_is_a_one_line_error(one_device):
  workdir = one_device[0]
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.attention_spectra", f"--workdir={workdir}", *ARGS,
       "--config.spectra.mask_rate=0.3"], cwd=helpers.REPO, capture_output=True, text=True,
      timeout=120, env={**os.environ, "LLM_MATH_CPU_DEVICES": "1"})
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "holds a run with a different config (spectra:" in lines[0], lines
  assert helpers.results(workdir)["config"]["spectra"]["mask_rate"] == 0.15


# ----------------------------------------------------------------------------------------------
# The same numbers on 8 devices, on 2 processes, and after SIGTERM and a rerun.
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~1 min; the size sweep and batch-size 8-device runs cover the sharded path by default.
def test_eight_devices_agree_with_one(one_device, tmp_path):
  # Rolling checkpoints only: the headline numbers do not read the log-spaced snapshots (their
  # restore onto other meshes is tested with the checkpoints), and 8 devices save them slowly.
  helpers.run_study("attention_spectra", tmp_path, ARGS + ["--mesh=data:2,fsdp:2,tensor:2",
                                                           "--config.checkpoint_schedule=rolling"],
                    devices=8)
  helpers.assert_same_numbers(helpers.results(tmp_path), one_device[1], HEADLINE, rtol=1e-4,
                              atol=1e-6)


@pytest.mark.slow
def test_two_processes_agree_with_one(one_device, tmp_path):
  proc = helpers.run_study("attention_spectra", tmp_path, ARGS, processes=2)
  assert "process 1 of 2 reads rows 4:8 of each global batch of 8" in proc.stdout
  helpers.assert_same_numbers(helpers.results(tmp_path), one_device[1], HEADLINE, rtol=1e-4,
                              atol=1e-6)


@pytest.mark.slow
def test_sigterm_midway_then_rerun_gives_the_same_results(one_device, tmp_path):
  """Preempted as the high-lr run starts (the causal run has finished), the same command
  continues: the finished run returns from its checkpoint without new snapshots, and every number
  of results.json is that of the uninterrupted run."""
  stopped = helpers.run_study("attention_spectra", tmp_path, ARGS,
                              stop_after=r"causal_high_lr: snapshot at step 0 \|")
  assert stopped.returncode == 130 and "received SIGTERM" in stopped.stdout
  assert not os.path.exists(tmp_path / "results.json")
  rerun = helpers.run_study("attention_spectra", tmp_path, ARGS)
  assert "causal: snapshot" not in rerun.stdout  # Finished: not trained or analysed again.
  assert "causal_high_lr: snapshot at step 6" in rerun.stdout
  expected = one_device[1]
  helpers.assert_same_numbers(helpers.results(tmp_path), expected,
                              list(_number_paths(expected["runs"], "runs"))
                              + list(_number_paths(expected["rank_collapse"], "rank_collapse")),
                              rtol=1e-6)


def _number_paths(tree, prefix: str):
  """The paths (for helpers.pick) of every number or list of numbers in `tree`, timings aside."""
  if isinstance(tree, dict):
    for key, value in tree.items():
      if key != "wall_time_s":
        yield from _number_paths(value, f"{prefix}.{key}")
  elif isinstance(tree, list) and any(isinstance(v, (dict, list)) for v in tree):
    for i, value in enumerate(tree):
      yield from _number_paths(value, f"{prefix}.{i}")
  elif tree is None or isinstance(tree, (int, float, list)):
    yield prefix
