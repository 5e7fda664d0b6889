"""Sharded training over meshes of 8 CPU devices, and 2 processes joined by jax.distributed.

The multi-device cases need XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts, so
`test_meshes_in_a_subprocess` computes single-device reference losses here and reruns this file in a
child process with 8 devices, where the `needs_8_devices` tests compare against them.
"""
import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llm_math import checkpoint
from llm_math import model as model_lib
from llm_math import optimizer as optimizer_lib
from llm_math import sharding
from llm_math import train as train_lib
from llm_math import train_config
from llm_math.errors import UsageError

from tests import helpers

REFERENCE = os.environ.get("LLM_MATH_SHARDING_REFERENCE")
needs_8_devices = pytest.mark.skipif(
    jax.device_count() < 8 or not REFERENCE, reason="runs in the 8-device child process")
MESHES = ["data:8", "data:2,fsdp:2,tensor:2", "data:1,fsdp:2,tensor:4", "data:1,fsdp:1,tensor:8"]


def _config(**kw):
  c = helpers.tiny_config(num_steps=8, log_every=1, eval_every=4, checkpoint_every=4, batch_size=8,
                          learning_rate=1e-2, **kw)
  c.model.update(num_heads=8, d_model=32, d_ff=64)
  return c


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def test_parse_and_make_mesh_errors():
  assert sharding.parse_mesh("data:-1,tensor:2") == {"data": -1, "fsdp": 1, "tensor": 2}
  with pytest.raises(UsageError, match="expected 'data:N,fsdp:N,tensor:N'"):
    sharding.parse_mesh("model:2")
  with pytest.raises(UsageError, match="needs 3 devices"):
    sharding.make_mesh("data:3", devices=jax.devices()[:1])
  with pytest.raises(UsageError, match="at most one -1"):
    sharding.make_mesh("data:-1,fsdp:-1")


@pytest.mark.slow
def test_meshes_in_a_subprocess(tmp_path):
  """Single-device reference here; the 8-device comparisons in a child pytest process."""
  if jax.device_count() != 1:
    pytest.skip("the parent run is the single-device one")
  config = _config()
  dataset = helpers.tiny_dataset(config)
  result = train_lib.train(config, dataset, str(tmp_path / "ref"), log=lambda *_: None)
  reference = {"losses": _losses(tmp_path / "ref"), "val": [v for _, v in result.val_curve]}
  ref_path = tmp_path / "reference.json"
  ref_path.write_text(json.dumps(reference))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu", "LLM_MATH_SHARDING_REFERENCE": str(ref_path)}
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         "-m", "not slow", __file__], cwd=helpers.REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
  assert "8 passed" in proc.stdout, proc.stdout[-2000:]


@needs_8_devices
@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_training_matches_one_device(tmp_path, mesh):
  reference = json.loads(open(REFERENCE).read())
  config = _config(mesh=mesh)
  result = train_lib.train(config, helpers.tiny_dataset(config), str(tmp_path), log=lambda *_: None)
  np.testing.assert_allclose(_losses(tmp_path), reference["losses"], rtol=2e-5)
  np.testing.assert_allclose([v for _, v in result.val_curve], reference["val"], rtol=2e-5)
  # Parameters are laid out as the logical-axis rules say.
  params = result.state.params
  shape = dict(sharding.make_mesh(mesh).shape)
  name = lambda axis: axis if shape[axis] > 1 else None
  expect = {
      ("block_0", "mlp", "fc_in", "kernel"): P(name("fsdp"), name("tensor")),
      ("block_0", "attn", "query", "kernel"): P(name("fsdp"), name("tensor"), None),
      ("token_embed", "embedding"): P(name("tensor"), name("fsdp")),
  }
  for path, spec in expect.items():
    leaf = params
    for key in path:
      leaf = leaf[key]
    actual = tuple(a if (a and shape.get(a, 1) > 1) else None for a in leaf.sharding.spec)
    actual += (None,) * (len(spec) - len(actual))
    assert actual == tuple(spec), (mesh, path, leaf.sharding.spec)
    assert len(leaf.sharding.device_set) == 8


@needs_8_devices
@pytest.mark.parametrize("mesh", ["data:2,fsdp:2,tensor:2", "data:1,fsdp:4,tensor:2"])
def test_residual_stream_carries_the_rules_sharding(mesh):
  """Inside the jitted step the residual stream is constrained to the layout the rules name:
  'batch' -> (data, fsdp); 'embed' -> fsdp is taken by the batch already, 'length' is replicated.
  Without rules in the model config the same step has no constraint at all."""
  config = _config(mesh=mesh)
  mesh_ = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.logical_axis_rules)
  batch_sh = sharding.batch_sharding(mesh_, rules)
  tokens = jax.device_put(np.zeros((8, config.seq_len), np.int32), batch_sh)
  constraints = {}
  for with_rules in (True, False):
    mcfg = train_config.model_config(config, 32)
    if not with_rules:
      mcfg = dataclasses.replace(mcfg, logical_axis_rules=())
    model = model_lib.Transformer(mcfg)
    state, state_sh = train_lib.create_state(
        train_lib.lm_init(model, config.seq_len), optimizer_lib.optimizer(config), mesh_, rules,
        jax.random.PRNGKey(0))
    step = jax.jit(functools.partial(train_lib.train_step, loss_fn=train_lib.lm_loss(model)),
                   in_shardings=(state_sh, batch_sh, None), out_shardings=(state_sh, None))
    with sharding.use_mesh(mesh_):
      text = step.lower(state, (tokens, tokens), jax.random.PRNGKey(1)).as_text()
    constraints[with_rules] = [l for l in text.splitlines()
                               if "sharding_constraint" in l or "@Sharding" in l]
  assert not constraints[False]
  d = config.model.d_model
  residual = [l for l in constraints[True] if f"x{config.seq_len}x{d}x" in l]
  assert len(residual) >= config.model.num_layers, constraints[True]
  if "sdy." in residual[0]:  # Shardy: the mesh axes by name.
    assert all('[{"data", "fsdp"}, {}, {}]' in l for l in residual), residual
  else:  # GSPMD: batch split over data x fsdp devices, the rest replicated over tensor.
    n = mesh_.shape["data"] * mesh_.shape["fsdp"]
    assert all(f"devices=[{n},1,1," in l for l in residual), residual


@needs_8_devices
def test_checkpoint_restores_onto_another_mesh(tmp_path):
  """Save at step 4 on a (2,2,2) mesh, resume on (1,2,4): the continuation equals the reference."""
  reference = json.loads(open(REFERENCE).read())

  def preempt_after_step_4(line):
    if line.startswith("step      4 | loss"):
      os.kill(os.getpid(), signal.SIGTERM)

  first = train_lib.train(_config(mesh=MESHES[1]), helpers.tiny_dataset(_config()), str(tmp_path),
                          log=preempt_after_step_4)
  assert first.interrupted and checkpoint.manager(str(tmp_path)).latest_step() == 4
  result = train_lib.train(_config(mesh=MESHES[2]), helpers.tiny_dataset(_config()), str(tmp_path),
                           log=lambda *_: None)
  assert result.final_step == 8
  np.testing.assert_allclose(_losses(tmp_path), reference["losses"], rtol=2e-5)
  kernel = result.state.params["block_0"]["mlp"]["fc_in"]["kernel"]
  assert kernel.sharding.mesh.shape["tensor"] == 4


def _two_processes_and_one(tmp_path, args: list[str]) -> str:
  """Runs perplexity as 2 processes (launch/local_multiprocess.sh) and as 1 process with 2 devices
  (launch/local.sh); checks their losses are equal and returns the 2-process run's stdout."""
  env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
  multi = subprocess.run(
      ["bash", "launch/local_multiprocess.sh", "perplexity", f"--workdir={tmp_path / 'multi'}"] + args,
      cwd=helpers.REPO, env={**env, "NUM_PROCESSES": "2"}, capture_output=True, text=True,
      timeout=600)
  assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-3000:]
  single = subprocess.run(
      ["bash", "launch/local.sh", "perplexity", f"--workdir={tmp_path / 'single'}"] + args,
      cwd=helpers.REPO, env={**env, "DEVICES": "2"}, capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  np.testing.assert_allclose(_losses(tmp_path / "multi"), _losses(tmp_path / "single"), rtol=1e-6)
  return multi.stdout


def test_two_processes_train_like_one(tmp_path):  # The default run's one 2-process case.
  """launch/local_multiprocess.sh: 2 processes x 1 device == 1 process x 2 devices, loss for loss."""
  if jax.device_count() != 1:  # The 8-device child of test_meshes_in_a_subprocess passes XLA_FLAGS on.
    pytest.skip("runs in the single-device parent")
  out = _two_processes_and_one(
      tmp_path, helpers.TINY_OVERRIDES + ["--config.num_steps=8", "--config.log_every=1"])
  assert "2 cpu in 2 process(es)" in out
  assert len(_losses(tmp_path / "multi")) == 8


@pytest.mark.slow
def test_two_processes_train_on_prepared_tokens_like_one(tmp_path):
  """--data=tokens:DIR under launch/local_multiprocess.sh: each process reads only its rows of every
  batch (rows 0:4 and 4:8), and the losses equal one process's with 2 devices."""
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("".join(f"{i} the quick brown fox {i % 7} jumps over the lazy dog\n"
                            for i in range(2000)))
  tokens = tmp_path / "tokens"
  subprocess.run([sys.executable, "-m", "experiments.prepare_data", f"--data=text:{corpus}",
                  f"--out={tokens}"], cwd=helpers.REPO, check=True, capture_output=True)
  out = _two_processes_and_one(tmp_path, [
      f"--data=tokens:{tokens}", "--config.num_steps=6", "--config.seq_len=16",
      "--config.batch_size=8", "--config.model.num_layers=1", "--config.model.d_model=32",
      "--config.model.d_ff=64", "--config.model.num_heads=2", "--config.eval_every=6",
      "--config.log_every=1", "--config.checkpoint_every=6", "--config.warmup_steps=2",
      "--config.eval_max_tokens=2000", "--config.eval_stride=0", "--ngram_orders=1"])
  for process, rows in ((0, "0:4"), (1, "4:8")):
    assert f"process {process} of 2 reads rows {rows} of each global batch of 8" in out
  assert len(_losses(tmp_path / "multi")) == 6
