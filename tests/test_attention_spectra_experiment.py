"""experiments/attention_spectra.py end to end on a tiny config: spectra, bounds, rank collapse."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import attention_spectra as exp
from experiments import plot_attention_spectra
from experiments.configs import attention_spectra as default_config
from llm_math.analysis import spectra
from llm_math import train as train_lib
from llm_math.errors import UsageError
from tests import helpers

FIGURES = ("eigenvalues.png", "singular_values.png", "stationary.png", "entropy_gap.png",
           "rank_collapse.png", "sink_mass.png", "attention_maps.png", "entropy_lr.png")


def tiny_config():
  c = default_config.get_config()
  c.seq_len = 12
  c.batch_size = 8
  c.num_steps = 6
  c.warmup_steps = 2
  c.log_every = 3
  c.model.update(num_layers=2, d_model=16, d_ff=32, num_heads=2)
  c.synthetic.update(train_tokens=20000, val_tokens=2000, lag=4)
  c.spectra.update(track_steps=(0, 3, 6), analysis_windows=2, eval_windows=8)
  # No deep training here (the three tracked runs exercise training); the default run trains them.
  c.deep.update(num_layers=6, num_steps=0, batch_size=4, random_inputs=4)
  return c


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("attention_spectra"))
  results = exp.run_experiment(tiny_config(), workdir, log=lambda *_: None)
  with np.load(os.path.join(workdir, "spectra.npz")) as npz:
    arrays = {k: npz[k] for k in npz.files}
  return workdir, results, arrays


def test_writes_results_and_every_figure(finished):
  workdir, results, _ = finished
  with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
    saved = json.load(f)
  assert saved["runs"].keys() == set(exp.RUNS)
  assert sorted(saved["figures"]) == sorted(FIGURES)
  for name in FIGURES:
    with open(os.path.join(workdir, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
  for run in saved["runs"].values():
    assert [s["step"] for s in run["snapshots"]] == [0, 3, 6]
    assert run["diverged_at"] is None
  with open(os.path.join(workdir, "results.md"), encoding="utf-8") as f:
    md = f.read()
  # The rank-collapse result is stated with its numbers, and so is the learning-rate comparison.
  arch = results["rank_collapse"]["architectures"]
  pure, skip = arch["pure attention"]["init"]["fro"], arch["attention + skip"]["init"]["fro"]
  assert f"falls from {pure[0]:.3g} (embeddings) to {pure[-1]:.3g} at layer 6" in md
  assert f"attention + skip keeps {skip[-1]:.3g}" in md
  high = results["runs"]["causal_high_lr"]["snapshots"][-1]
  assert f"its val NLL {high['val_nll']:.4f}" in md


def test_causal_eigenvalues_are_the_exact_diagonal(finished):
  _, results, arrays = finished
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


def test_bidirectional_spectra_are_those_of_a_stochastic_matrix(finished):
  _, _, arrays = finished
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


def test_zhai_bound_holds_on_every_row_and_sigma_matches_the_weights(finished):
  _, results, _ = finished
  for name in ("causal", "causal_high_lr", "bidirectional"):
    for snap in results["runs"][name]["snapshots"]:
      assert snap["zhai_slack_min"] >= -1e-4, (name, snap["step"])
      entropy, bound = np.asarray(snap["mean_row_entropy"]), np.asarray(snap["zhai_bound"])
      assert np.all(bound <= entropy + 1e-4)
      assert np.all(bound >= 0)
  # At initialization every head is nearly uniform and sigma is tiny: the bound is informative.
  init = results["runs"]["causal"]["snapshots"][0]
  assert np.max(init["qk_norm"]) < 0.2
  assert np.min(init["zhai_bound"]) > 0.1


def test_high_lr_run_is_the_causal_run_at_ten_times_the_rate(finished):
  _, results, _ = finished
  normal, high = results["runs"]["causal"], results["runs"]["causal_high_lr"]
  assert high["learning_rate"] == pytest.approx(10 * normal["learning_rate"])
  assert high["warmup_steps"] == 0 and normal["warmup_steps"] == 2
  # Same initialization: identical statistics at step 0, different ones after training.
  assert high["snapshots"][0]["mean_row_entropy"] == normal["snapshots"][0]["mean_row_entropy"]
  assert high["snapshots"][-1]["qk_norm"] != normal["snapshots"][-1]["qk_norm"]


def test_pure_attention_collapses_with_depth_and_skip_connections_prevent_it(finished):
  _, results, _ = finished
  arch = results["rank_collapse"]["architectures"]
  pure, skip = arch["pure attention"]["init"]["fro"], arch["attention + skip"]["init"]["fro"]
  assert len(pure) == 7  # embeddings + 6 layers
  assert pure[0] == pytest.approx(skip[0])  # same embeddings
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


def test_uniform_causal_reference_decays_at_rate_one_half():
  """U (U_ts = 1/(t+1)) has eigenvalues 1, 1/2, 1/3, ...: the residual shrinks 2x per layer."""
  x_BxTxD = np.random.default_rng(0).normal(size=(3, 10, 5))
  ref = np.asarray(exp.uniform_causal_reference(x_BxTxD, 40))
  assert ref[0] == pytest.approx(np.mean(spectra.relative_residual(x_BxTxD)))
  np.testing.assert_allclose(ref[31:] / ref[30:-1], 0.5, rtol=1e-3)
  # Brute force: explicit powers of U.
  u = np.tril(np.ones((10, 10))) / np.arange(1, 11)[:, None]
  x5 = np.einsum("ts,bsd->btd", np.linalg.matrix_power(u, 5), x_BxTxD)
  assert ref[5] == pytest.approx(np.mean(spectra.relative_residual(x5)), rel=1e-9)


def test_mask_tokens_masks_the_stated_fraction_and_scores_only_masked_positions():
  tokens = np.random.default_rng(1).integers(0, 7, size=(64, 50)).astype(np.int32)
  inputs, targets, weights = exp.mask_tokens(tokens, 7, 0.2, np.random.default_rng(2))
  masked = weights > 0
  assert abs(masked.mean() - 0.2) < 0.02
  assert np.all(inputs[masked] == 7) and np.all(inputs[~masked] == tokens[~masked])
  np.testing.assert_array_equal(targets, tokens)


def test_a_diverging_run_stops_and_keeps_earlier_snapshots():
  c = tiny_config()
  c.model.num_layers = 1
  c.learning_rate = float("inf")
  c.min_learning_rate = float("inf")
  dataset = helpers.tiny_dataset(c)
  mcfg = train_lib.model_config(c, dataset.vocab_size)
  run = exp.train_and_track(c, mcfg, dataset, "next_token", (0, 3, 6),
                            lambda step, params: ({"step": step}, {}), "inf lr", log=lambda *_: None)
  assert run.diverged_at is not None and run.diverged_at <= 3
  assert [r["step"] for r in run.records] == [0]


@pytest.mark.parametrize("field,value,fragment", [
    ("spectra.track_steps", (0, 5), "track_steps"),
    ("spectra.track_steps", (3, 6), "track_steps"),
    ("spectra.mask_rate", 1.0, "mask_rate"),
    ("deep.num_layers", 0, "deep.num_layers"),
])
def test_bad_settings_are_usage_errors(field, value, fragment):
  c = tiny_config()
  section, key = field.split(".")
  c[section][key] = value
  with pytest.raises(UsageError, match=fragment):
    exp.check_config(c)


def test_plot_script_redraws_from_files_without_jax(finished):
  workdir, _, _ = finished
  for name in FIGURES:
    os.remove(os.path.join(workdir, name))
  code = ("import sys; from experiments import plot_attention_spectra as p; "
          f"p.main(['--workdir', {workdir!r}]); assert 'jax' not in sys.modules")
  proc = subprocess.run([sys.executable, "-c", code], cwd=helpers.REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert all(os.path.exists(os.path.join(workdir, name)) for name in FIGURES)
  missing = subprocess.run([sys.executable, "-m", "experiments.plot_attention_spectra",
                            "--workdir", os.path.join(workdir, "nothing")], cwd=helpers.REPO,
                           capture_output=True, text=True, timeout=120)
  assert missing.returncode == 2 and missing.stderr.startswith("error: ")
  assert plot_attention_spectra.FLOAT32_UNIT_ROUNDOFF == 2.0 ** -24


def test_command_line_mistake_is_a_one_line_error(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.attention_spectra", f"--workdir={tmp_path}",
       "--config.spectra.mask_rate=2"], cwd=helpers.REPO, capture_output=True, text=True,
      timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "error: --config.spectra.mask_rate=2.0: expected a fraction in (0, 1)"]
