"""Compiled for a TPU without a TPU: the train step of a small config on v5e:2x2 (libtpu's compiler,
no chips) with data, fsdp and fsdp x tensor meshes, and experiments.compile as a user runs it.

Skipped where libtpu is not installed (`pip install -e ".[tpu]"`, which .ci/run does)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="libtpu is not installed: pip install -e '.[tpu]'")
# The tests that read the compiled meshes share one worker, so the fixture compiles them once.
_SHARED = pytest.mark.xdist_group("tpu_meshes")

from llm_math import aot  # noqa: E402
from experiments.configs import perplexity as perplexity_config  # noqa: E402
from tests import helpers  # noqa: E402

_MESHES = {"data": "data:4", "fsdp": "fsdp:4", "fsdp_tensor": "fsdp:2,tensor:2"}
_D, _FF, _LAYERS, _BATCH, _T = 512, 2048, 4, 16, 128
# One block's matrices in bfloat16 (what a chip gathers, or reduces, for one layer).
_LAYER_BYTES = 2 * (4 * _D * _D + 2 * _D * _FF)


def _config(mesh: str, scanned: bool = False):
  """A small model; scanned, it is 4 layers wide enough (d_model 512, head_dim 128) that a
  quarter of d_model fills TPU's 128-lane tiles, so per-chip bytes show sharding, not padding."""
  c = perplexity_config.get_config()
  c.model.update(num_layers=2, num_heads=4, d_model=128, d_ff=512, dtype="bfloat16")
  if scanned:
    c.model.update(num_layers=_LAYERS, d_model=_D, d_ff=_FF, scan_layers=True)
    c.loss_chunk = 32
  c.seq_len = _T
  c.batch_size = _BATCH
  c.mesh = mesh
  return c


@pytest.fixture(scope="module")
def reports():
  """The scanned model's step on each mesh, compiled once (no extrapolating compiles), and a
  sequence-parallel variant whose rules split the residual stream's length over 'tensor'."""
  devices = aot.topology_devices("v5e:2x2")
  out = {name: aot.compile_report(_config(mesh, scanned=True), devices, 4096, "v5e:2x2",
                                  extrapolate=False) for name, mesh in _MESHES.items()}
  sequence = _config("fsdp:2,tensor:2", scanned=True)
  sequence.logical_axis_rules = [("length", "tensor") if rule[0] == "length" else rule
                                 for rule in sequence.logical_axis_rules]
  out["sequence"] = aot.compile_report(sequence, devices, 4096, "v5e:2x2", extrapolate=False)
  return out


def _loop(report, name: str) -> dict:
  """The per-iteration collectives of the layer scan's forward ('jvp') or backward ('transpose')
  loop."""
  suffix = {"forward": "/jvp(Transformer)/while",
            "backward": "/transpose(jvp(Transformer))/while"}[name]
  [loop] = [l for l in report["loops"] if l["op_name"].endswith(suffix)]
  assert loop["trip_count"] == _LAYERS, loop
  return loop


def _bytes(collectives: dict, *kinds) -> int:
  return sum(collectives[k]["bytes"] for k in kinds)


@_SHARED
def test_every_mesh_fits_with_no_host_transfer(reports):
  for name, r in reports.items():
    assert r["device_kind"] == "TPU v5 lite" and r["chips"] == 4, name
    assert r["fits"] is True and r["hbm_bytes_per_chip"] == 16 * 2**30, name
    assert r["host_transfers"] == [], (name, r["host_transfers"])
    assert r["roofline_step_seconds"] > 0 and 0 < r["mfu_bound"] <= 1, name
    assert r["per_chip_bytes"]["total"] > 0 and r["compile_seconds"] > 0, name


@_SHARED
def test_data_parallelism_all_reduces_each_layers_gradient_in_the_backward_loop(reports):
  r = reports["data"]
  assert _bytes(_loop(r, "forward")["per_iteration"], *aot.COLLECTIVES) == 0
  # The gradient leaves the bfloat16 matmuls as bfloat16, and XLA reduces it across chips before
  # widening it to the float32 parameters: 2 bytes per parameter, a layer at a time.
  backward = _loop(r, "backward")["per_iteration"]
  assert backward["all-reduce"]["bytes"] == pytest.approx(_LAYER_BYTES, rel=0.02)
  assert r["collectives"]["all-gather"]["count"] == 0


@_SHARED
def test_fsdp_shards_the_state_gathers_each_layer_and_reduce_scatters_its_gradient(reports):
  data, fsdp = reports["data"], reports["fsdp"]
  mem, data_mem = fsdp["per_chip_bytes"], data["per_chip_bytes"]
  # The state (parameters, two moments) is split 4 ways; the batch is the only other argument.
  assert mem["arguments"] <= 0.35 * data_mem["arguments"]
  assert mem["total"] <= 0.85 * data_mem["total"]
  assert mem["temp"] <= data_mem["temp"]
  # Inside the layer loop: one layer's parameters gathered per iteration (forward), gathered again
  # and its gradient reduce-scattered (backward); no all-reduce of a whole layer's gradient.
  forward, backward = _loop(fsdp, "forward")["per_iteration"], _loop(fsdp, "backward")["per_iteration"]
  assert _bytes(forward, "all-gather", "collective-permute") == pytest.approx(_LAYER_BYTES, rel=0.05)
  assert _bytes(backward, "all-gather", "collective-permute") == pytest.approx(_LAYER_BYTES, rel=0.05)
  assert backward["reduce-scatter"]["count"] >= 1
  assert backward["reduce-scatter"]["bytes"] >= 0.5 * _LAYER_BYTES
  assert backward["all-reduce"]["bytes"] < 0.5 * _LAYER_BYTES
  # Outside the loops nothing as large as the stacked layers is gathered: only the embeddings.
  embeddings = 2 * 2 * 4096 * _D  # Token embedding and output head, bfloat16.
  assert _bytes(fsdp["collectives_outside_loops"], "all-gather") <= 1.1 * embeddings


@_SHARED
def test_tensor_parallelism_all_reduces_activations_twice_per_layer_like_megatron(reports):
  r = reports["fsdp_tensor"]
  assert r["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
  # Megatron's f and g: the attention and MLP outputs (row-parallel matmuls) are summed over the
  # tensor axis, one [B / fsdp, T, d_model] bfloat16 all-reduce each per layer in the forward pass,
  # and the backward pass all-reduces the two inputs' gradients.
  activation = 2 * (_BATCH // 2) * _T * _D
  forward, backward = _loop(r, "forward")["per_iteration"], _loop(r, "backward")["per_iteration"]
  assert forward["all-reduce"]["count"] == 2
  assert forward["all-reduce"]["bytes"] == pytest.approx(2 * activation, rel=0.01)
  assert backward["all-reduce"]["bytes"] >= 2 * activation
  # The fsdp axis gathers each layer's tensor-parallel half.
  assert _bytes(forward, "all-gather") == pytest.approx(_LAYER_BYTES / 2, rel=0.05)
  assert r["per_chip_bytes"]["arguments"] < reports["data"]["per_chip_bytes"]["arguments"]


@_SHARED
def test_the_residual_streams_constraint_lays_out_the_compiled_loop(reports):
  """The layer loop carries the residual stream as the logical rules say: [B / (data x fsdp), T, D]
  per chip, and [B / fsdp, T / tensor, D] when the rules split 'length' over 'tensor'."""
  for name, shape in (("data", (4, _T, _D)), ("fsdp", (4, _T, _D)),
                      ("fsdp_tensor", (8, _T, _D)), ("sequence", (8, _T // 2, _D))):
    carry = _loop(reports[name], "forward")["carry"]
    assert carry[1] == "bf16[{},{},{}]".format(*shape), (name, carry[:3])


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


def test_loop_costs_are_the_whole_steps():
  """XLA counts a while loop's body once; the report extrapolates the FLOPs of the layer scan and
  of the chunked loss to every layer and chunk (compiles with two layers per iteration and with
  chunks twice as long), and multiplies each loop's collectives by its trip count, so a scanned,
  chunked model's counts agree with the unrolled, unchunked model's."""
  devices = aot.topology_devices("v5e:2x2")
  config = _config("data:4")
  config.model.num_layers = 3  # Odd: one layer stays outside the two-layer loop.
  whole = aot.compile_report(config, devices, 4096, "v5e:2x2")
  config.loss_chunk = 32
  chunked = aot.compile_report(config, devices, 4096, "v5e:2x2")
  config.model.scan_layers = True
  scanned = aot.compile_report(config, devices, 4096, "v5e:2x2")
  complete = {"complete": True}
  assert whole["loops_extrapolated"] == {"layers": False, "loss_chunks": False, **complete}
  assert chunked["loops_extrapolated"] == {"layers": False, "loss_chunks": True, **complete}
  assert scanned["loops_extrapolated"] == {"layers": True, "loss_chunks": True, **complete}
  assert scanned["flops_per_step"] == pytest.approx(chunked["flops_per_step"], rel=0.01)
  # The chunked loss recomputes its logits in the backward pass: 2 B T d V more FLOPs per step.
  recompute = 2 * _BATCH * _T * 128 * 4096 / 4
  assert chunked["flops_per_step"] - whole["flops_per_step"] == pytest.approx(recompute, rel=0.03)
  # XLA's count of the compiled program against 6N + 12LTd per token, per chip.
  for r in (whole, chunked, scanned):
    assert 0.9 <= r["flops_ratio_xla_to_model"] <= 1.4, r["flops_ratio_xla_to_model"]
  assert scanned["collectives"]["all-reduce"]["bytes"] == pytest.approx(
      whole["collectives"]["all-reduce"]["bytes"], rel=0.05)
  assert [l["trip_count"] for l in scanned["loops"]].count(4) == 2  # The loss: 128 / 32 chunks.


def test_a_sweep_studys_config_compiles_its_largest_run(tmp_path):
  """The batch-size study (llm_math.studies.batch_size) has no single batch_size: its largest run is
  compiled."""
  proc = _compile_cli(tmp_path, "--config=experiments/configs/batch_size.py", "--topology=v5e:2x2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "compile_report.json").read_text())
  assert report["batch_size"] == 256 and report["fits"] is True


def test_a_variant_the_compiler_refuses_leaves_the_counts_marked_short():
  """A variant compiled for extrapolation holds more than the program (two layers' activations per
  iteration) and may not fit where the program does: its loop is then not extrapolated, and the
  report says the counts are short."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from llm_math import model as model_lib  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(dict(loss_chunk=32, seq_len=128))
  mcfg = model_lib.ModelConfig(vocab_size=10, max_len=128, num_layers=4, scan_layers=True)
  cost = {"flops": 10.0, "bytes_accessed": 5.0}
  assert aot._loop_costs(lambda m, c: None, config, mcfg, cost) == (  # pylint: disable=protected-access
      cost, {"layers": False, "loss_chunks": False, "complete": False})
  variant = lambda m, c: ({"flops": 12.0, "bytes_accessed": 6.0} if m.scan_unroll == 2
                          else {"flops": 11.0, "bytes_accessed": 5.5})
  # A + (L - 1) * layer + (n - 1) * chunk = 10 + 3 * 2 + 3 * 1.
  assert aot._loop_costs(variant, config, mcfg, cost)[0] == {  # pylint: disable=protected-access
      "flops": 19.0, "bytes_accessed": 9.5}
