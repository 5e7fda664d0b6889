"""experiments/batch_size.py: the train step's noise estimate, the variance law, the sweep end to end."""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

from experiments import batch_size as exp
from experiments import plot_batch_size
from experiments.configs import batch_size as default_config
from llm_math import data as data_lib
from llm_math.analysis import gradient_noise as gn
from llm_math.errors import UsageError
from tests import helpers


def tiny_config():
  c = default_config.get_config()
  c.seq_len = 16
  c.model.update(num_layers=1, d_model=32, d_ff=64, num_heads=2)
  c.synthetic.update(train_tokens=20000, val_tokens=4000, lag=4)
  c.batch_sizes = (2, 4, 8)
  c.lr_reference_batch = 4
  c.pilot_steps = 80
  c.max_steps = 200
  c.eval_tokens = 1024
  c.eval_growth = 1.2
  c.lr_max_extend = 1
  c.gradient_variance.update(checkpoint_batch=4, fresh_batches=16, num_examples=16, num_batches=16)
  c.sharpness.update(batch=8, lanczos_steps=8, ascent_steps=3)
  return c


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("batch_size"))
  config = tiny_config()
  exp.check_config(config)
  results = exp.run_experiment(config, workdir, log=lambda *_: None)
  return workdir, results


def test_writes_results_and_every_figure(finished):
  workdir, results = finished
  with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
    saved = json.load(f)
  assert sorted(saved["figures"]) == sorted(plot_batch_size.FIGURES)
  for name in plot_batch_size.FIGURES:
    with open(os.path.join(workdir, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
  assert [r["batch_size"] for r in saved["sweep"]] == [2, 4, 8]
  assert saved["config"]["batch_sizes"] == [2, 4, 8]
  md = open(os.path.join(workdir, "results.md"), encoding="utf-8").read()
  fit, ns = results["fit"], results["noise_scale"]
  assert f"**B_crit = {fit['b_crit']:.1f}**" in md
  assert f"**{ns['b_simple']:.1f}**; B_crit / B_simple = {fit['b_crit'] / ns['b_simple']:.2f}" in md
  assert f"**{results['gradient_variance']['slope']:.3f}** (theory -1" in md


def test_runs_share_the_initialization_and_reach_the_target(finished):
  _, results = finished
  target = results["target"]["loss"]
  pilot_curve = results["target"]["pilot"]["curve"]["val_nll"]
  # The target is the pilot's best 3-point running mean plus the margin.
  assert target == pytest.approx(np.convolve(pilot_curve, np.ones(3) / 3, "valid").min() + 0.01)
  starts = {r["curve"]["val_nll"][0] for r in results["runs"]}
  assert len(starts) == 1 and starts == {pilot_curve[0]}  # Same parameters at step 0.
  for row in results["sweep"]:
    assert row["reached"], row["batch_size"]
    runs = [r for r in results["runs"] if r["batch_size"] == row["batch_size"]]
    best = [r for r in runs if r["best_at_batch_size"]]
    assert len(best) == 1 and best[0]["learning_rate"] == row["best_learning_rate"]
    # No other learning rate reached the target in fewer steps.
    assert all(r["steps_to_target"] >= row["steps_to_target"] for r in runs if r["reached"])
    # Steps to target lie on the validation curve: between the two evaluations around the crossing.
    steps, vals = best[0]["curve"]["step"], best[0]["curve"]["val_nll"]
    assert vals[-1] <= target < vals[-2]
    assert steps[-2] <= row["steps_to_target"] <= steps[-1]
    assert row["examples_to_target"] == pytest.approx(row["steps_to_target"] * row["batch_size"])
    assert row["generalization_gap"] == pytest.approx(row["final_val_nll"] - row["final_train_nll"])
    assert row["hessian_top_eigenvalue"] > 0 and row["epsilon_sharpness"] >= 0
    assert row["hessian_top_eigenvalue"] >= row["hessian_bottom_ritz_value"]


def _log_cost(b, s, s_min, e_min):
  """sum_i (log S_i - log(S_min + E_min / B_i))^2, written out here (not gn.tradeoff_steps)."""
  return float(np.sum((np.log(s) - np.log(s_min + e_min / b)) ** 2))


def test_fit_and_regimes_follow_the_sweep(finished):
  _, results = finished
  sweep, fit = results["sweep"], results["fit"]
  b = np.array([r["batch_size"] for r in sweep], float)
  s = np.array([r["steps_to_target"] for r in sweep])
  # The fit against an independent optimizer: scipy's trust-region least squares on the same log
  # residuals over (log S_min, log E_min), from a start unrelated to the fit's own.
  independent = scipy.optimize.least_squares(
      lambda th: np.log(np.exp(th[0]) + np.exp(th[1]) / b) - np.log(s),
      x0=np.log([s.min() / 2, (b * s).min() / 2]), xtol=1e-15, ftol=1e-15, gtol=1e-15)
  s_min, e_min = np.exp(independent.x)
  assert _log_cost(b, s, fit["s_min"], fit["e_min"]) <= _log_cost(b, s, s_min, e_min) + 1e-12
  np.testing.assert_allclose([fit["s_min"], fit["e_min"], fit["b_crit"]],
                             [s_min, e_min, e_min / s_min], rtol=1e-4)
  assert fit["rms_log_residual"] == pytest.approx(
      np.sqrt(_log_cost(b, s, fit["s_min"], fit["e_min"]) / len(s)), rel=1e-9)
  doublings = results["regimes"]["doublings"]
  assert [(d["from"], d["to"]) for d in doublings] == [(2, 4), (4, 8)]
  np.testing.assert_allclose([d["speedup"] for d in doublings], s[:-1] / s[1:])
  np.testing.assert_allclose([d["examples_ratio"] for d in doublings], 2 * s[1:] / s[:-1])
  # B_simple: numerator and denominator averaged over the steps, the ratio last.
  for row, run in zip(sweep, [r for r in results["runs"] if r["best_at_batch_size"]]):
    noise = run["noise"]
    assert sum(noise["weight"]) == run["stopped_at_step"]
    expected = sum(noise["trace_sum"]) / sum(noise["g_sq_sum"])
    assert row["b_simple"] == pytest.approx(expected, rel=1e-6)


def _sweep_rows(batch_sizes, steps):
  return [{"batch_size": b, "reached": s is not None, "steps_to_target": s,
           "examples_to_target": None if s is None else b * s} for b, s in zip(batch_sizes, steps)]


@pytest.mark.parametrize("noise", [0.0, 0.02])
def test_tradeoff_fit_recovers_a_known_hyperbola(noise):
  """Steps-to-target generated from S_min = 40, E_min = 640 (B_crit = 16) on the hyperbola
  (S/S_min - 1)(E/E_min - 1) = 1, exactly or with 2% log-normal noise: the sweep's fit recovers
  them, and the regimes follow the closed forms S(B)/S(2B) and B/B_crit."""
  s_min, e_min = 40.0, 640.0
  b = 2.0 ** np.arange(1, 10)  # 2 ... 512: both regimes, B_crit in the middle.
  # On the hyperbola: E = B S with S = S_min (1 + E_min / (S_min B)), solved here from the curve.
  s = s_min * (1 + e_min / (s_min * b))
  np.testing.assert_allclose((s / s_min - 1) * (b * s / e_min - 1), 1.0, rtol=1e-12)
  rng = np.random.default_rng(3)
  measured = s * np.exp(noise * rng.standard_normal(b.size))
  # An unreached batch size (steps None) is left out of the fit.
  rows = _sweep_rows(list(b.astype(int)) + [1024], list(measured) + [None])
  fit = exp.fit_tradeoff(rows)
  assert fit["batch_sizes"] == list(b.astype(int))
  tol = 1e-8 if noise == 0 else 0.06
  np.testing.assert_allclose([fit["s_min"], fit["e_min"], fit["b_crit"]], [s_min, e_min, 16.0],
                             rtol=tol)
  if noise == 0:
    assert fit["rms_log_residual"] < 1e-9
  else:  # The residual is the noise the points were given (8 dof left of 9 points).
    assert 0.5 * noise < fit["rms_log_residual"] < 1.5 * noise
  regimes = exp.scaling_regimes(rows[:-1], fit)
  assert (regimes["small"]["from"], regimes["large"]["to"]) == (2, 512)
  if noise == 0:
    closed = lambda bb: (s_min + e_min / bb) / (s_min + e_min / (2 * bb))
    np.testing.assert_allclose([d["speedup"] for d in regimes["doublings"]], closed(b[:-1]),
                               rtol=1e-12)
    assert regimes["excess_examples_small"] == pytest.approx(2 / 16)
    assert regimes["excess_examples_large"] == pytest.approx(512 / 16)
  assert exp.fit_tradeoff(_sweep_rows([2, 4], [30.0, None])) is None  # One reached B: no fit.


def test_gradient_variance_follows_one_over_b(finished):
  _, results = finished
  gv = results["gradient_variance"]
  fresh = gv["fresh"]
  assert fresh["batch_sizes"] == [1, 2, 4, 8]
  # The least-squares line through (log B, log V) in closed form, not through gn.loglog_slope.
  x, y = np.log(fresh["batch_sizes"]), np.log(fresh["variance"])
  slope = np.sum((x - x.mean()) * (y - y.mean())) / np.sum((x - x.mean()) ** 2)
  assert gv["slope"] == pytest.approx(slope, rel=1e-9)
  assert gv["intercept"] == pytest.approx(y.mean() - slope * x.mean(), rel=1e-9, abs=1e-12)
  assert abs(gv["slope"] + 1) < 0.25  # 16 batches per B: a loose band; the default run uses 64.
  np.testing.assert_allclose(fresh["predicted"],
                             gv["trace_sigma_unbiased"] / np.asarray(fresh["batch_sizes"]))
  ratio = np.asarray(fresh["variance"]) / np.asarray(fresh["predicted"])
  assert np.all((ratio > 0.4) & (ratio < 2.5)), ratio  # Independent estimates of the same law.


def test_fresh_batch_variance_on_a_closed_form():
  """loss = mean_i w[x_i0]: per-window gradient e_{x_i0}, so tr(Sigma) = 1 - sum_v p_v^2.

  p is the distribution of the first token of a training window, whose start is uniform over the
  first len(ids) - T positions; E|g_B - G|^2 = tr(Sigma) / B must come out within 4 standard errors.
  """
  rng = np.random.default_rng(0)
  vocab, seq_len = 5, 4
  ids = rng.choice(vocab, size=3000, p=[0.4, 0.3, 0.15, 0.1, 0.05]).astype(np.int32)
  p = np.bincount(ids[:len(ids) - seq_len], minlength=vocab) / (len(ids) - seq_len)
  trace_sigma = 1.0 - np.sum(p**2)

  def loss_fn(params, inputs_BxT, targets_BxT):
    del targets_BxT
    return jnp.mean(params["w"][inputs_BxT[:, 0]])

  params = {"w": jnp.zeros(vocab)}
  out = exp.fresh_batch_variance(loss_fn, params, ids, seq_len, seed=1, batch_sizes=[1, 4, 32],
                                 num_batches=2000)
  for b, var, se in zip(out["batch_sizes"], out["variance"], out["stderr"]):
    assert se < 0.05 * trace_sigma / b
    assert abs(var - trace_sigma / b) <= 4 * se, b


def test_gradient_variance_record_on_a_known_one_over_b_law():
  """The same closed-form loss through the whole measurement: E|g_B - G|^2 = c / B with
  c = tr(Sigma) = 1 - sum_v p_v^2 and G = p, so |G|^2 = sum_v p_v^2. The record must give slope -1,
  intercept log c, tr(Sigma) ~ c, |G|^2 ~ sum p^2 and the prediction c / B, all known beforehand."""
  rng = np.random.default_rng(4)
  vocab, seq_len = 5, 4
  ids = rng.choice(vocab, size=4000, p=[0.4, 0.3, 0.15, 0.1, 0.05]).astype(np.int32)
  p = np.bincount(ids[:len(ids) - seq_len], minlength=vocab) / (len(ids) - seq_len)
  c = 1.0 - np.sum(p**2)

  def loss_fn(params, inputs_BxT, targets_BxT):
    del targets_BxT
    return jnp.mean(params["w"][inputs_BxT[:, 0]])

  config = tiny_config()
  config.seq_len, config.batch_sizes = seq_len, (2, 4, 8, 16, 32)
  config.gradient_variance.update(num_examples=256, fresh_batches=2000, num_batches=200)
  dataset = data_lib.Dataset("closed form", ids, ids, data_lib.SyntheticTokenizer(vocab))
  setup = exp.Setup(config, dataset, loss_fn, *[None] * 6)
  gv = exp.gradient_variance_record(setup, {"w": jnp.zeros(vocab)}, jax.random.PRNGKey(0))
  fresh = gv["fresh"]
  assert fresh["batch_sizes"] == [1, 2, 4, 8, 16, 32]
  # Each point within 4 standard errors of c / B, the fitted line within a few hundredths of it.
  for b, var, se in zip(fresh["batch_sizes"], fresh["variance"], fresh["stderr"]):
    assert abs(var - c / b) <= 4 * se, b
  assert abs(gv["slope"] + 1.0) < 0.03
  assert gv["intercept"] == pytest.approx(np.log(c), abs=0.05)
  # The per-example side: 256 windows give tr(Sigma) and |G|^2 to about 5% (1 s.e.; bands ~4 s.e.).
  assert gv["trace_sigma_unbiased"] == pytest.approx(c, rel=0.15)
  assert gv["g_sq_unbiased"] == pytest.approx(np.sum(p**2), rel=0.2)
  assert gv["b_simple"] == pytest.approx(c / np.sum(p**2), rel=0.3)
  np.testing.assert_allclose(fresh["predicted"],
                             gv["trace_sigma_unbiased"] / np.array([1, 2, 4, 8, 16, 32]), rtol=1e-6)
  assert abs(gv["resampled"]["slope_with_replacement"] + 1.0) < 0.1


def test_train_step_gradient_and_two_batch_estimate():
  """One step with SGD(1): params move by -lr x the batch gradient; the noise accumulator holds the
  two-batch estimates from the M micro-batch gradients computed independently."""
  rng = np.random.default_rng(1)
  x_BxT = jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)
  y_BxT = jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)

  def loss_fn(params, inputs, targets):
    return jnp.mean((jnp.tanh(inputs * params["a"]) + params["b"] - targets) ** 2)

  params = {"a": jnp.asarray(0.7), "b": jnp.asarray(0.1)}
  step = exp.make_train_step(loss_fn, optax.sgd(1.0), batch_size=8, num_microbatches=4)
  new, _, noise, loss = step(params, optax.sgd(1.0).init(params), gn.noise_scale_init(), x_BxT,
                             y_BxT, 0.5)
  grad = jax.grad(loss_fn)(params, x_BxT, y_BxT)
  assert float(loss) == pytest.approx(float(loss_fn(params, x_BxT, y_BxT)), rel=1e-6)
  for k in params:
    assert float(new[k]) == pytest.approx(float(params[k] - 0.5 * grad[k]), rel=1e-5)
  micro = [jax.grad(loss_fn)(params, x_BxT[i:i + 2], y_BxT[i:i + 2]) for i in range(0, 8, 2)]
  sq = lambda g: float(g["a"]) ** 2 + float(g["b"]) ** 2
  g_sq, trace = gn.two_batch_estimates(np.mean([sq(g) for g in micro]), sq(grad), 2, 8)
  assert float(noise.weight) == 1.0
  assert float(noise.g_sq_sum) == pytest.approx(float(g_sq), rel=1e-4, abs=1e-7)
  assert float(noise.trace_sum) == pytest.approx(float(trace), rel=1e-4)


def test_pure_helpers():
  assert exp.crossing_step([0, 10, 20], [3.0, 2.0, 1.0], 1.5) == pytest.approx(15.0)
  assert exp.crossing_step([0, 10], [1.0, 0.5], 2.0) == 0.0
  assert exp.crossing_step([0, 10], [3.0, 2.5], 1.0) is None
  assert [exp.next_eval_step(d, 1.5) for d in (0, 1, 2, 10)] == [1, 2, 3, 15]
  assert exp.target_from_curve([5.0, 1.0, 4.0, 2.0, 2.0, 2.0], 0.1) == pytest.approx(2.1)
  noise = {"step": [1, 2, 4], "weight": [1, 1, 2], "g_sq_sum": [1.0, 3.0, 4.0],
           "trace_sum": [10.0, 20.0, 60.0]}
  late = exp.noise_scale_between(noise, 1, math.inf)
  assert late["b_simple"] == pytest.approx(80.0 / 7.0) and late["steps_averaged"] == 3
  assert exp.noise_scale_between(noise, 4, 10)["b_simple"] is None
  config = tiny_config()
  config.lr_rule, config.learning_rate, config.lr_reference_batch = "sqrt", 1e-3, 4
  assert exp.rule_learning_rate(config, 16) == pytest.approx(2e-3)
  config.lr_rule = "linear"
  assert exp.rule_learning_rate(config, 16) == pytest.approx(4e-3)


@pytest.mark.parametrize("field,value,match", [
    ("lr_rule", "cubic", "lr_rule"),
    ("batch_sizes", (8, 4), "batch_sizes"),
    ("noise_microbatches", 3, "noise_microbatches"),
    ("gradient_variance.checkpoint_batch", 32, "checkpoint_batch"),
    ("gradient_variance.fresh_batches", 1, "fresh_batches"),
    ("max_steps", 0, "max_steps"),
])
def test_bad_config_raises_usage_error(field, value, match):
  config = tiny_config()
  target = config
  *path, last = field.split(".")
  for name in path:
    target = target[name]
  target[last] = value
  with pytest.raises(UsageError, match=match):
    exp.check_config(config)


def test_cli_error_is_one_line_and_plots_regenerate_without_jax(finished, tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.batch_size", f"--workdir={tmp_path}",
                         "--config.lr_rule=cubic"], cwd=helpers.REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --config.lr_rule='cubic'")
  assert "Traceback" not in proc.stderr
  workdir, _ = finished
  os.remove(os.path.join(workdir, "tradeoff.png"))
  code = ("import sys; from experiments import plot_batch_size as p; "
          f"p.main(['--workdir={workdir}']); assert 'jax' not in sys.modules")
  proc = subprocess.run([sys.executable, "-c", code], cwd=helpers.REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert os.path.exists(os.path.join(workdir, "tradeoff.png"))
