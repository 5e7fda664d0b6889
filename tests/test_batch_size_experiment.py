"""The batch-size study (`llm_math.studies.batch_size`, run by experiments/batch_size.py) end to end:
the sweep on one device, on 8 devices, as 2 processes and preempted by SIGTERM; the learning-rate
search, the run configs, the fit's notes, the report and figures, the CLI."""
import copy
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from experiments.configs import batch_size as default_config
from llm_math import reports
from llm_math.analysis import gradient_noise as gn
from llm_math.errors import UsageError
from llm_math.figures import batch_size as figures_lib
from llm_math.studies import batch_size as study_lib
from tests import helpers

# A sweep of two batch sizes in a few dozen steps each: the pilot at B=8, one run per B (sqrt rule).
# B / noise_microbatches = 4 and 8 rows divide over the 4 data-parallel devices of the 8-device mesh.
ARGS = [
    "--config.seq_len=16", "--config.model.num_layers=1", "--config.model.d_model=32",
    "--config.model.d_ff=64", "--config.model.num_heads=2", "--config.synthetic.train_tokens=20000",
    "--config.synthetic.val_tokens=4000", "--config.synthetic.lag=4", "--config.batch_sizes=8,16",
    "--config.noise_microbatches=2", "--config.lr_rule=sqrt", "--config.lr_reference_batch=8",
    "--config.pilot_steps=60", "--config.num_steps=200", "--config.eval_max_tokens=1024",
    "--config.eval_growth=1.2", "--config.gradient_variance.checkpoint_batch=8",
    "--config.gradient_variance.fresh_batches=16", "--config.gradient_variance.num_examples=32",
    "--config.gradient_variance.num_batches=16", "--config.sharpness.batch=8",
    "--config.sharpness.lanczos_steps=8", "--config.sharpness.ascent_steps=3",
]


def headline_numbers(results: dict) -> list[str]:
  """The numbers the three settings must agree on: the target, each B's steps to target, final
  losses, noise scale and sharpness, the fit and the gradient-variance slope."""
  per_batch = [f"sweep.{i}.{k}" for i in range(len(results["sweep"]))
               for k in ("steps_to_target", "final_val_nll", "final_train_nll", "b_simple",
                         "hessian_top_eigenvalue")]
  return ["target.loss", *per_batch, "noise_scale.b_simple", "fit.b_crit",
          "gradient_variance.slope", "gradient_variance.trace_sigma_unbiased"]


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  """The reduced sweep on one device (launch/local.sh, DEVICES=1)."""
  workdir = tmp_path_factory.mktemp("batch_size_one_device")
  out = helpers.run_study("batch_size", workdir, ARGS, devices=1)
  return workdir, helpers.results(workdir), out.stdout


@pytest.mark.parametrize("setting", helpers.other_settings(r"b16_lr\S+ step 4:"))
def test_sweep_agrees_across_devices_processes_and_preemption(one_device, tmp_path, setting):
  """The same sweep on 8 devices (data x fsdp x tensor), as 2 processes, or stopped by SIGTERM in
  the run at B=16 and rerun with the same command, ends with the same numbers as on one device."""
  setting = dict(setting)
  args = ARGS + ([f"--mesh={setting.pop('mesh')}"] if "mesh" in setting else [])
  first = helpers.run_study("batch_size", tmp_path, args, **setting)
  if "stop_after" in setting:
    assert "checkpoint saved" in first.stdout and not (tmp_path / "results.json").exists()
    second = helpers.run_study("batch_size", tmp_path, args)
    assert "resumed from the checkpoint" in second.stdout
    assert "pilot step" not in second.stdout  # Finished runs are reused, not trained again.
  rtol = 1e-6 if "stop_after" in setting else 1e-3
  baseline = one_device[1]
  helpers.assert_same_numbers(baseline, helpers.results(tmp_path), headline_numbers(baseline),
                              rtol=rtol)


def test_writes_results_report_figures_and_one_workdir_per_run(one_device):
  workdir, results, _ = one_device
  assert sorted(results["figures"]) == sorted(figures_lib.FIGURES)
  for name in figures_lib.FIGURES:
    assert (workdir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
  assert [r["batch_size"] for r in results["sweep"]] == [8, 16]
  md = (workdir / "results.md").read_text()
  fit, ns, gv = results["fit"], results["noise_scale"], results["gradient_variance"]
  lo, hi = fit["ci95"]["b_crit"]  # The config's fit_bootstrap: every fit has its interval.
  assert f"**B_crit = {fit['b_crit']:.1f} [{lo:.1f}, {hi:.1f}]**" in md
  assert f"**{ns['b_simple']:.1f}**; B_crit / B_simple = {fit['b_crit'] / ns['b_simple']:.2f}" in md
  lo, hi = gv["ci95"]["slope"]
  assert f"**{gv['slope']:.3f} [{lo:.3f}, {hi:.3f}]** (theory -1" in md
  assert sorted(os.listdir(workdir / "runs")) == sorted(["pilot", "b8_lr0.002", "b16_lr0.002828"])
  for run in results["runs"]:
    config = json.loads((workdir / run["workdir"] / "config.json").read_text())
    # A run's config: the study's training fields with its B, learning rate and micro-batches.
    assert (config["batch_size"], config["learning_rate"]) == (run["batch_size"], run["learning_rate"])
    assert config["grad_accum_steps"] == 2 and config["target_loss"] == results["target"]["loss"]
    assert not set(study_lib.SWEEP_FIELDS) & set(config)


def _lowest_running_mean(values, window=3):
  return min(sum(values[i:i + window]) / window for i in range(len(values) - window + 1))


def test_runs_share_the_initialization_and_reach_the_target(one_device):
  _, results, _ = one_device
  target = results["target"]["loss"]
  pilot_curve = results["target"]["pilot"]["curve"]["val_nll"]
  assert target == pytest.approx(_lowest_running_mean(pilot_curve) + 0.01, rel=1e-12)
  starts = {r["curve"]["val_nll"][0] for r in results["runs"]}
  assert starts == {pilot_curve[0]}  # Same parameters at step 0.
  assert results["target"]["pilot"]["curve"]["step"][:8] == [0, 1, 2, 3, 4, 5, 6, 8]  # x1.2 apart
  for row, run in zip(results["sweep"], results["runs"]):
    assert row["reached"] and run["best_at_batch_size"] and run["status"] == "reached"
    # Steps to target: linear between the two evaluations around the first crossing, where the run
    # stopped.
    (s0, s1), (v0, v1) = run["curve"]["step"][-2:], run["curve"]["val_nll"][-2:]
    assert v1 <= target < v0 and s1 == run["stopped_at_step"]
    assert row["steps_to_target"] == pytest.approx(s0 + (s1 - s0) * (v0 - target) / (v0 - v1))
    assert row["examples_to_target"] == pytest.approx(row["steps_to_target"] * row["batch_size"])
    assert row["generalization_gap"] == pytest.approx(row["final_val_nll"] - row["final_train_nll"])
    assert row["hessian_top_eigenvalue"] > 0 and row["epsilon_sharpness"] >= 0
    assert row["hessian_top_eigenvalue"] >= row["hessian_bottom_ritz_value"]


def test_noise_scale_comes_from_the_loops_gradient_norms(one_device):
  """Each noise window is the two-batch estimate (B_small = B/2, B_big = B) of the window means the
  loop logged in the run's metrics.jsonl, times its steps; B_simple pools all of them, ratio last."""
  workdir, results, _ = one_device
  for row, run in zip(results["sweep"], results["runs"]):
    b, small = run["batch_size"], run["batch_size"] // 2
    lines = (workdir / run["workdir"] / "metrics.jsonl").read_text().splitlines()
    logged = [r for r in map(json.loads, lines) if "grad_sq" in r]
    noise = run["noise"]
    assert noise["step"] == [r["step"] for r in logged] == run["curve"]["step"][1:]
    assert sum(noise["weight"]) == run["stopped_at_step"]
    for r, g_sq_sum, trace_sum in zip(logged, noise["g_sq_sum"], noise["trace_sum"]):
      n, micro, big = r["window_steps"], r["micro_grad_sq"], r["grad_sq"]
      assert g_sq_sum == pytest.approx(n * (b * big - small * micro) / (b - small), rel=1e-9)
      assert trace_sum == pytest.approx(n * (micro - big) / (1 / small - 1 / b), rel=1e-9)
    assert row["b_simple"] == pytest.approx(sum(noise["trace_sum"]) / sum(noise["g_sq_sum"]))
    assert row["noise_steps"] == run["stopped_at_step"]


def test_fit_passes_through_two_batch_sizes_and_regimes_follow(one_device):
  """Two reached batch sizes determine S = S_min + E_min / B exactly: solved here by hand."""
  _, results, _ = one_device
  (b1, s1), (b2, s2) = [(r["batch_size"], r["steps_to_target"]) for r in results["sweep"]]
  e_min = (s1 - s2) / (1 / b1 - 1 / b2)
  s_min = s1 - e_min / b1
  fit = results["fit"]
  np.testing.assert_allclose([fit["s_min"], fit["e_min"], fit["b_crit"]],
                             [s_min, e_min, e_min / s_min], rtol=1e-6)
  assert fit["rms_log_residual"] < 1e-9
  (doubling,) = results["regimes"]["doublings"]
  assert (doubling["from"], doubling["to"]) == (8, 16)
  assert doubling["speedup"] == pytest.approx(s1 / s2)
  assert doubling["examples_ratio"] == pytest.approx(b2 * s2 / (b1 * s1))


def test_gradient_variance_follows_one_over_b(one_device):
  _, results, _ = one_device
  gv = results["gradient_variance"]
  fresh = gv["fresh"]
  assert fresh["batch_sizes"] == [1, 2, 4, 8, 16] and gv["checkpoint"]["batch_size"] == 8
  # The least-squares line through (log B, log V) in closed form, not through gn.loglog_slope.
  x, y = np.log(fresh["batch_sizes"]), np.log(fresh["variance"])
  slope = np.sum((x - x.mean()) * (y - y.mean())) / np.sum((x - x.mean()) ** 2)
  assert gv["slope"] == pytest.approx(slope, rel=1e-9)
  assert abs(gv["slope"] + 1) < 0.25  # 16 batches per B: a loose band; the default run uses 64.
  np.testing.assert_allclose(fresh["predicted"],
                             gv["trace_sigma_unbiased"] / np.asarray(fresh["batch_sizes"]))
  ratio = np.asarray(fresh["variance"]) / np.asarray(fresh["predicted"])
  assert np.all((ratio > 0.4) & (ratio < 2.5)), ratio  # Independent estimates of the same law.


def test_learning_rate_search_widens_at_the_edge_and_caps_slower_runs(monkeypatch):
  """With steps to target 100 + 10 (k - 2)^2 at lr = rule x 2^k, the search tries k = 0, 1, -1, then
  2 and 3 (the best was at the edge), and stops at lr_max_extend; every run after the first is capped
  at the best steps so far, and runs that hit the cap count as not reached."""
  config = default_config.get_config()
  config.lr_max_extend = 3
  calls = []

  def fake_run(study, batch_size, lr, num_steps, target):
    del study
    k = round(math.log2(lr / study_lib.rule_learning_rate(config, batch_size)))
    steps = 100.0 + 10.0 * (k - 2) ** 2
    calls.append((k, num_steps))
    reached = steps <= num_steps
    return {"batch_size": batch_size, "learning_rate": lr, "reached": reached,
            "steps_to_target": steps if reached else None, "stopped_at_step": min(steps, num_steps),
            "final_val_nll": target if reached else target + 0.1,
            "status": "reached" if reached else "step cap", "wall_time_s": 0.0}, f"result {k}"

  monkeypatch.setattr(study_lib, "train_run", fake_run)
  study = study_lib.Study(config, *[None] * 8, log=lambda *_: None)
  records, best = study_lib.tune_learning_rate(study, 16, target=2.0)
  assert [k for k, _ in calls] == [0, 1, -1, 2, 3]
  assert [cap for _, cap in calls] == [6000, 140, 110, 110, 100]
  assert best == "result 2"
  assert [r["lr_exponent"] for r in records] == [-1, 0, 1, 2, 3]
  assert [r["best_at_batch_size"] for r in records] == [False, False, False, True, False]
  assert [r["reached"] for r in records] == [False, True, True, True, False]
  config.lr_rule, calls[:] = "sqrt", []
  records, _ = study_lib.tune_learning_rate(study, 16, target=2.0)
  assert calls == [(0, 6000)] and records[0]["best_at_batch_size"]


def test_eval_steps_and_learning_rate_rules():
  assert study_lib.eval_steps(1.5, 15) == [1, 2, 3, 5, 8, 12, 15]
  assert study_lib.eval_steps(1.05, 3) == [1, 2, 3]
  config = default_config.get_config()
  config.lr_rule, config.learning_rate, config.lr_reference_batch = "sqrt", 1e-3, 4
  assert study_lib.rule_learning_rate(config, 16) == pytest.approx(2e-3)
  config.lr_rule = "linear"
  assert study_lib.rule_learning_rate(config, 16) == pytest.approx(4e-3)
  run = study_lib.run_config(default_config.get_config(), 4, 3e-3, 500, 2.5)
  assert (run.batch_size, run.grad_accum_steps, run.num_steps) == (4, 4, 500)  # min(M, B) = B
  assert run.learning_rate == run.min_learning_rate == 3e-3 and run.target_loss == 2.5


@pytest.mark.parametrize("field,value,match", [
    ("lr_rule", "cubic", "lr_rule='cubic'"),
    ("batch_sizes", (8, 4), "batch_sizes"),
    ("noise_microbatches", 3, "noise_microbatches=3"),
    ("gradient_variance.checkpoint_batch", 24, "checkpoint_batch=24"),
    ("gradient_variance.fresh_batches", 1, "fresh_batches=1"),
    ("model.dropout_rate", 0.1, "dropout_rate=0.1"),
    ("num_steps", 0, "num_steps=0"),
])
def test_bad_config_raises_usage_error(field, value, match):
  config = default_config.get_config()
  target = config
  *path, last = field.split(".")
  for name in path:
    target = target[name]
  target[last] = value
  with pytest.raises(UsageError, match=match):
    study_lib.check(config)


def test_batch_sizes_must_divide_over_the_data_parallel_devices(monkeypatch):
  monkeypatch.setattr(study_lib.sharding, "data_parallel_size", lambda mesh, rules: 4)
  config = default_config.get_config()  # B = 2 in 2 micro-batches of 1 row: not over 4 devices.
  with pytest.raises(UsageError, match=r"batch_sizes=.*4 data-parallel devices.*B=2"):
    study_lib.check(config)
  config.batch_sizes, config.noise_microbatches = (8, 16, 32), 2
  study_lib.check(config)


def test_cli_errors_are_one_line_and_plots_regenerate_without_jax(one_device, tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.batch_size", f"--workdir={tmp_path}",
                         "--config.lr_rule=cubic"], cwd=helpers.REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --config.lr_rule='cubic'")
  # A run's config changed (b2) in a workdir that holds it: one line naming the field.
  workdir = tmp_path / "copy"
  shutil.copytree(one_device[0], workdir)
  proc = subprocess.run([sys.executable, "-m", "experiments.batch_size", f"--workdir={workdir}",
                         *ARGS, "--config.b2=0.95"], cwd=helpers.REPO, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: --workdir={workdir} holds a run with a different config (b2: 0.99 there, 0.95 now); "
      "use a new --workdir to start another run")
  os.remove(workdir / "tradeoff.png")
  code = ("import sys; from experiments import redraw; "
          f"redraw.main(['--workdir={workdir}']); assert 'jax' not in sys.modules")
  proc = subprocess.run([sys.executable, "-c", code], cwd=helpers.REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert (workdir / "tradeoff.png").exists()


def _rows(steps: dict) -> list[dict]:
  """Sweep rows that reached the target in `steps` {B: S}."""
  return [{"batch_size": b, "reached": True, "steps_to_target": s} for b, s in steps.items()]


def test_fit_notes_name_too_few_points_bounds_and_degenerate_fits():
  """The notes of gradient_noise.tradeoff_record's own fits: steps that rise with B put E_min at
  0 (B_crit = 0), a speed-up above 2x puts S_min at its bound, one point gives no fit."""
  rising = _rows({16: 10.0, 32: 10.5})
  notes = study_lib.fit_notes(rising, gn.tradeoff_record([16, 32], [10.0, 10.5]))
  assert notes[0] == ("the trade-off fit has only 2 points (B = 16, 32) for its 2 parameters: "
                      "nothing tests the law")
  assert notes[1] == ("steps to target do not fall from B = 16 to 32: S = S_min + E_min / B "
                      "cannot follow them")
  assert notes[2].startswith("the fit's E_min = ") and "is at its bound 0" in notes[2]
  faster = _rows({2: 20.0, 4: 8.0, 8: 3.0})
  (note,) = study_lib.fit_notes(faster, gn.tradeoff_record([2, 4, 8], [20.0, 8.0, 3.0]))
  assert note.startswith("the fit's S_min = ") and "at its bound 0" in note
  one = _rows({2: 20.0}) + [{"batch_size": 4, "reached": False, "steps_to_target": None}]
  assert study_lib.fit_notes(one, None) == [
      "no trade-off fit: 1 batch size(s) reached the target after training (2 needed)"]
  inside = _rows({2: 30.0, 4: 20.0, 8: 15.0})  # S = 10 + 40 / B: B_crit = 4, no note.
  assert study_lib.fit_notes(inside, gn.tradeoff_record([2, 4, 8], [30.0, 20.0, 15.0])) == []


def test_degenerate_fits_are_notes_and_every_figure_draws(one_device, tmp_path):
  """The tiny sweep's notes are those of its fit (only 2 points), in results.md. Its results with the
  fits that broke the figures (E_min = 0 from steps that rise with B; S_min at 0 with B_crit
  infinite, which results.json holds as null; no fit at all) still draw (every figure for the
  first, those that draw the fit for the others) and report, each with its notes."""
  workdir, results, _ = one_device
  notes = study_lib.fit_notes(results["sweep"], results["fit"])
  assert notes and results["notes"][:len(notes)] == notes  # Then the bootstraps' own notes.
  results = copy.deepcopy(results)  # The module's other tests read the fixture's.
  assert all(f"- {note}" in (workdir / "results.md").read_text() for note in results["notes"])
  rising = gn.tradeoff_record([8, 16], [10.0, 10.5])  # E_min at its bound: ~1e-33, or exactly 0.
  assert rising["e_min"] < 1e-20 * rising["s_min"]
  for steps, fit in (({8: 10.0, 16: 10.5}, {**rising, "e_min": 0.0, "b_crit": 0.0}),
                     ({8: 20.0, 16: 8.0}, {"s_min": 0.0, "e_min": 160.0, "b_crit": None,
                                           "rms_log_residual": 0.1}),
                     ({8: 0.0, 16: None}, None)):
    assert fit is None or fit["e_min"] == 0.0 or fit["b_crit"] is None
    for row in results["sweep"]:
      s = steps[row["batch_size"]]
      row.update(reached=s is not None, steps_to_target=s,
                 examples_to_target=None if s is None else s * row["batch_size"])
    b, s = study_lib.fit_points(results["sweep"])
    results.update(fit=fit, notes=study_lib.fit_notes(results["sweep"], fit),
                   regimes=gn.doubling_speedups(b, s, fit and fit["b_crit"]))
    assert results["notes"]
    if fit and fit["e_min"] == 0.0:  # The fit a sweep at B = 16, 32 of a few steps gave.
      assert figures_lib.draw(results, tmp_path) == list(figures_lib.FIGURES)
    else:  # The figures that draw the fit.
      figures_lib.plot_tradeoff(results, tmp_path / "tradeoff.png")
      figures_lib.plot_noise_scale(results, tmp_path / "noise_scale.png")
    md = reports.report(results)
    assert all(f"- {note}" in md for note in results["notes"])
    if fit:
      assert f"**B_crit = {'-' if fit['b_crit'] is None else '0.0'}**" in md
