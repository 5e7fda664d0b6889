"""Compiled for a TPU without a TPU: the train step of a small config on v5e:2x2 (libtpu's compiler,
no chips) with data, fsdp and fsdp x tensor meshes, and experiments.compile as a user runs it.

Skipped where libtpu is not installed (`pip install -e ".[tpu]"`, which .ci/run does)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="libtpu is not installed: pip install -e '.[tpu]'")

from llm_math import aot  # noqa: E402
from experiments.configs import perplexity as perplexity_config  # noqa: E402
from tests import helpers  # noqa: E402

_MESHES = {"data": "data:4", "fsdp": "fsdp:4", "fsdp_tensor": "fsdp:2,tensor:2"}


def _config(mesh: str):
  c = perplexity_config.get_config()
  c.model.update(num_layers=2, num_heads=4, d_model=128, d_ff=512, dtype="bfloat16")
  c.seq_len = 128
  c.batch_size = 16
  c.mesh = mesh
  return c


@pytest.fixture(scope="module")
def reports():
  devices = aot.topology_devices("v5e:2x2")
  return {name: aot.compile_report(_config(mesh), devices, 4096, "v5e:2x2")
          for name, mesh in _MESHES.items()}


def test_every_mesh_fits_with_no_host_transfer_and_xla_counts_our_flops(reports):
  for name, r in reports.items():
    assert r["device_kind"] == "TPU v5 lite" and r["chips"] == 4, name
    assert r["fits"] is True and r["hbm_bytes_per_chip"] == 16 * 2**30, name
    assert r["host_transfers"] == [], (name, r["host_transfers"])
    # XLA's count of the compiled program against 6N + 12LTd per token, per chip.
    assert 0.8 <= r["flops_ratio_xla_to_model"] <= 1.6, (name, r["flops_ratio_xla_to_model"])
    assert r["roofline_step_seconds"] > 0 and 0 < r["mfu_bound"] <= 1, name
    assert r["per_chip_bytes"]["total"] > 0 and r["compile_seconds"] > 0, name


def test_data_parallelism_all_reduces_the_gradient(reports):
  r = reports["data"]
  # The gradient leaves the bfloat16 matmuls as bfloat16, and XLA reduces it across chips before
  # widening it to the float32 parameters: 2 bytes per parameter cross the links, not 4.
  assert r["collectives"]["all-reduce"]["bytes"] >= 0.9 * r["params"] * 2
  assert r["collectives"]["all-gather"]["count"] == 0


def test_fsdp_shards_the_state_and_gathers_parameters(reports):
  data, fsdp = reports["data"], reports["fsdp"]
  # The state (parameters, two moments) is split 4 ways; the batch is the only other argument.
  assert fsdp["per_chip_bytes"]["arguments"] <= 0.35 * data["per_chip_bytes"]["arguments"]
  assert fsdp["collectives"]["all-gather"]["count"] > 0


def test_tensor_parallelism_reduces_activations(reports):
  r = reports["fsdp_tensor"]
  assert r["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
  assert r["collectives"]["all-reduce"]["count"] + r["collectives"]["reduce-scatter"]["count"] > 0
  assert r["per_chip_bytes"]["arguments"] < reports["data"]["per_chip_bytes"]["arguments"]


def _compile_cli(tmp_path, *args):
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  env.pop("JAX_PLATFORMS", None)  # The topology needs the TPU plugin loaded.
  return subprocess.run([sys.executable, "-m", "experiments.compile", f"--workdir={tmp_path}",
                         *args], cwd=helpers.REPO, env=env, capture_output=True, text=True,
                        timeout=600)


def test_compile_command_writes_the_report_and_a_summary_line(tmp_path):
  proc = _compile_cli(tmp_path, "--topology=v5e:2x2", "--config.mesh=fsdp:-1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "compile_report.json").read_text())
  for key in ("topology", "device_kind", "chips", "mesh", "params", "per_chip_bytes",
              "hbm_bytes_per_chip", "fits", "flops_per_step", "collectives", "compile_seconds",
              "roofline_step_seconds", "mfu_bound", "eval"):
    assert key in report, key
  assert set(report["per_chip_bytes"]) >= {"arguments", "outputs", "temp", "total"}
  last = proc.stdout.strip().splitlines()[-1]
  assert last.startswith(f"{report['params'] / 1e6:.1f}M params on v5e:2x2") and "fits" in last


def test_a_config_that_does_not_fit_exits_1_naming_its_largest_buffers(tmp_path):
  proc = _compile_cli(tmp_path, "--topology=v5e:2x2", "--config.mesh=data:4",
                      "--config.model.d_model=8192", "--config.model.d_ff=32768",
                      "--config.model.num_heads=64", "--vocab_size=65536")
  assert proc.returncode == 1, proc.stderr[-3000:]
  error = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(error) == 1 and "largest buffers" in error[0] and "GiB" in error[0], proc.stderr[-2000:]
  assert "DOES NOT FIT" in proc.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("args, fragment", [
    (["--topology=v9z:3x3"], "--topology=v9z:3x3: cannot describe it"),
    (["--topology=v5e:2x2", "--config.mesh=data:3"], "needs 3 devices, have 4"),
    (["--topology=v5e:2x2", "--config.data=text:x.txt"], "--vocab_size is needed"),
])
def test_compile_mistakes_are_one_line_errors(tmp_path, args, fragment):
  proc = _compile_cli(tmp_path, *args)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert any(l.startswith("error:") and fragment in l for l in proc.stderr.splitlines()), \
      proc.stderr[-2000:]


def test_a_scanned_models_costs_are_its_whole_step():
  """XLA counts a while loop's body once; the report extrapolates a scanned model's FLOPs and
  collectives to every layer (a second compile with two layers per iteration), so they agree with
  the unrolled model's own counts."""
  devices = aot.topology_devices("v5e:2x2")
  config = _config("data:4")
  config.model.num_layers = 3  # Odd: one layer stays outside the two-layer loop.
  unrolled = aot.compile_report(config, devices, 4096, "v5e:2x2")
  config.model.scan_layers = True
  scanned = aot.compile_report(config, devices, 4096, "v5e:2x2")
  assert scanned["scanned_layers_extrapolated"] and not unrolled["scanned_layers_extrapolated"]
  assert scanned["flops_per_step"] == pytest.approx(unrolled["flops_per_step"], rel=0.02)
  assert scanned["collectives"]["all-reduce"]["bytes"] == pytest.approx(
      unrolled["collectives"]["all-reduce"]["bytes"], rel=0.05)


def test_a_sweep_studys_config_compiles_its_largest_run(tmp_path):
  """experiments.batch_size has no single batch_size: its largest run is compiled."""
  proc = _compile_cli(tmp_path, "--config=experiments/configs/batch_size.py", "--topology=v5e:2x2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "compile_report.json").read_text())
  assert report["batch_size"] == 256 and report["fits"] is True
