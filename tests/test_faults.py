"""Fault injection: damaged checkpoints fall back, a diverging run stops cleanly, bad configs are
one-line errors, and results stay valid JSON. Each case is what a long run on shared hardware meets."""
import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from llm_math import checkpoint
from llm_math.analysis import information
from llm_math import train as train_lib
from llm_math import train_config
from llm_math.errors import UsageError

from tests import helpers

# 12 steps with checkpoints at 4, 8, 12 (all kept): the damage goes to step 12, the fallback is 8.
_CONFIG = dict(num_steps=12, checkpoint_every=4, keep_checkpoints=3, eval_every=6, log_every=2)


def _params(state):
  return jax.tree_util.tree_leaves(jax.device_get(state.params))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """(workdir, final params) of one uninterrupted run."""
  workdir = str(tmp_path_factory.mktemp("finished"))
  config = helpers.tiny_config(**_CONFIG)
  result = train_lib.train(config, helpers.tiny_dataset(config), workdir, log=lambda *_: None)
  return workdir, _params(result.state)


def _data_files(step_dir):
  """The tensorstore data files of a step, largest first."""
  found = glob.glob(os.path.join(step_dir, "**", "d", "*"), recursive=True)
  return sorted((f for f in found if os.path.isfile(f)), key=os.path.getsize, reverse=True)


def _corrupt_bytes(step_dir):
  with open(_data_files(step_dir)[0], "r+b") as f:
    f.seek(100)
    f.write(np.random.default_rng(0).bytes(200))


def _truncate(step_dir):
  path = _data_files(step_dir)[0]
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _delete_files(step_dir):
  for path in _data_files(step_dir)[:2]:
    os.remove(path)


def _drop_commit_marker(step_dir):
  os.remove(os.path.join(step_dir, checkpoint.COMMIT_MARKER))


def _leave_temporary_dir(step_dir):
  """What a save interrupted before its rename leaves behind."""
  os.rename(step_dir, step_dir + ".orbax-checkpoint-tmp-1700000000000000")


@pytest.mark.parametrize("damage", [_corrupt_bytes, _truncate, _delete_files, _drop_commit_marker,
                                    _leave_temporary_dir])
def test_damaged_latest_step_falls_back_and_ends_bit_identical(finished_run, tmp_path, damage):
  source, final_params = finished_run
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  step_dir = os.path.join(workdir, "checkpoints", "12")
  damage(step_dir)
  lines = []
  config = helpers.tiny_config(**_CONFIG)
  result = train_lib.train(config, helpers.tiny_dataset(config), workdir, log=lines.append)
  assert "resumed from the checkpoint at step 8" in "\n".join(lines), lines
  for a, b in zip(_params(result.state), final_params):
    np.testing.assert_array_equal(a, b)
  if damage is not _leave_temporary_dir:  # Orbax never listed the unfinished step.
    assert any(l.startswith("checkpoint step 12 is damaged") and "12.corrupt" in l for l in lines)
    assert os.path.isdir(step_dir + ".corrupt")  # Kept for inspection, not deleted.


def test_every_step_damaged_starts_fresh_and_keeps_them_all(finished_run, tmp_path):
  source, final_params = finished_run
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  for step in (4, 8, 12):
    _corrupt_bytes(os.path.join(workdir, "checkpoints", str(step)))
  lines = []
  config = helpers.tiny_config(**_CONFIG)
  result = train_lib.train(config, helpers.tiny_dataset(config), workdir, log=lines.append)
  assert sum("is damaged" in l for l in lines) == 3
  assert not any("resumed" in l for l in lines)
  for a, b in zip(_params(result.state), final_params):
    np.testing.assert_array_equal(a, b)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [
      "12", "12.corrupt", "4", "4.corrupt", "8", "8.corrupt"]
  # The first run's history is kept whole beside the new one, which says why it starts again.
  earlier = [json.loads(l) for l in open(os.path.join(source, "metrics.jsonl"))]
  kept = [json.loads(l) for l in open(os.path.join(workdir, "metrics.earlier-1.jsonl"))]
  assert kept == earlier
  now = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert now[0]["restart"].startswith("no intact checkpoint")
  assert now[0]["earlier_metrics"] == "metrics.earlier-1.jsonl"
  assert any("kept them in metrics.earlier-1.jsonl" in l for l in lines)


def test_a_different_model_is_an_error_not_a_fallback(finished_run, tmp_path):
  source, _ = finished_run
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  config = helpers.tiny_config(**_CONFIG)
  config.model.d_ff = 96
  with pytest.raises(UsageError, match=r"written by a different model \(params/block_0/mlp"):
    train_lib.train(config, helpers.tiny_dataset(config), workdir, log=lambda *_: None)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "4", "8"]


_KILL_MID_SAVE = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from llm_math import xla_cpu
    xla_cpu.tune()  # As in tests/conftest.py: the same XLA settings give the same numbers.
    from llm_math import checkpoint, train
    from tests import helpers
    save = checkpoint.save
    def save_then_die(mngr, step, state, **kwargs):
      save(mngr, step, state, **kwargs)  # Asynchronous: the files are still being written.
      if step == 8:
        os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.save = save_then_die
    config = helpers.tiny_config(**{config!r})
    train.train(config, helpers.tiny_dataset(config), {workdir!r}, log=lambda *_: None)
""")


def test_kill_9_mid_save_resumes_bit_identical(finished_run, tmp_path):
  _, final_params = finished_run
  workdir = str(tmp_path / "run")
  code = _KILL_MID_SAVE.format(repo=helpers.REPO, config=_CONFIG, workdir=workdir)
  proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "JAX_PLATFORMS": "cpu"},
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == -9, proc.stderr
  lines = []
  config = helpers.tiny_config(**_CONFIG)
  result = train_lib.train(config, helpers.tiny_dataset(config), workdir, log=lines.append)
  assert any(l.startswith("resumed from the checkpoint at step") for l in lines), lines
  for a, b in zip(_params(result.state), final_params):
    np.testing.assert_array_equal(a, b)


def test_divergence_stops_before_saving_the_diverged_state(tmp_path):
  """A huge learning rate: the loss grows far past ln|V| while staying finite."""
  config = helpers.tiny_config(num_steps=40, learning_rate=1e6, warmup_steps=40, grad_clip=0.0,
                               checkpoint_every=1, log_every=1)
  bound = train_config.train_config(config).loss_bound(32)
  assert bound == pytest.approx(config.max_loss_factor * np.log(32))
  with pytest.raises(train_lib.DivergenceError, match="above the divergence bound"):
    train_lib.train(config, helpers.tiny_dataset(config), str(tmp_path), log=lambda *_: None)
  losses = {r["step"]: r["loss"] for r in map(json.loads, open(tmp_path / "metrics.jsonl"))
            if "loss" in r}
  mngr = checkpoint.manager(str(tmp_path))
  assert mngr.all_steps() and all(losses[s] <= bound for s in mngr.all_steps())
  state, step = checkpoint.restore_latest(mngr, log=pytest.fail)  # The last save is intact.
  assert step == max(mngr.all_steps()) and state is not None


def test_perplexity_never_overflows():
  assert information.perplexity(1000.0) == float("inf")
  assert information.perplexity(2.0) == pytest.approx(np.exp(2.0))


@pytest.mark.parametrize("field,value,expected", [
    ("batch_size", 0, "expected a positive integer"),
    ("seq_len", 0, "expected a positive integer"),
    ("num_steps", -5, "expected a non-negative integer"),
    ("learning_rate", -1.0, "expected a positive number"),
    ("min_learning_rate", 1.0, "expected a number in [0, learning_rate"),
    ("warmup_steps", 13, "expected an integer in [0, num_steps=12]"),
    ("eval_stride", 17, "expected an integer in [0, seq_len=16]"),
    ("b2", 1.0, "expected a number in [0, 1)"),
    ("grad_accum_steps", 3, "not divisible"),
    ("max_loss_factor", -1.0, "expected a non-negative number"),
])
def test_invalid_config_is_one_line_naming_the_field(field, value, expected):
  config = helpers.tiny_config(**{field: value})
  with pytest.raises(UsageError) as e:
    train_config.check_config(config)
  message = str(e.value)
  assert message.startswith("--config.") and field in message.split(":")[0] + message
  assert expected in message and "\n" not in message


def _cli(args, workdir):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  return subprocess.run([sys.executable, "-m", "experiments.perplexity", f"--workdir={workdir}"]
                        + args, cwd=helpers.REPO, env=env, capture_output=True, text=True,
                        timeout=300)


@pytest.mark.parametrize("args,fragment", [
    (["--config.batch_size=0"], "error: --config.batch_size=0: expected a positive integer"),
    (["--config.learning_rate=-1"], "error: --config.learning_rate=-1.0: expected a positive"),
    (["--config.seq_len=0"], "error: --config.seq_len=0: expected a positive integer"),
    (["--config=/no/such/config.py"], "error: --config=/no/such/config.py: cannot load"),
])
def test_failed_start_is_one_line_and_leaves_no_workdir(tmp_path, args, fragment):
  workdir = tmp_path / "new_run"
  proc = _cli(args, workdir)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and fragment in proc.stderr
  assert not workdir.exists()


def test_failed_start_keeps_what_the_workdir_held(tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  proc = _cli([f"--data=text:{tmp_path / 'missing.txt'}"], tmp_path)
  assert proc.returncode == 2, proc.stderr
  assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_diverging_command_is_a_clean_stop_and_rerun_keeps_results(tmp_path):
  diverge = helpers.TINY_OVERRIDES + ["--config.learning_rate=1e6", "--config.warmup_steps=12",
                                      "--config.grad_clip=0", "--config.log_every=1"]
  proc = _cli(diverge, tmp_path / "diverged")
  assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
  assert "error: training loss is" in proc.stderr and "divergence bound" in proc.stderr

  first = _cli(helpers.TINY_OVERRIDES, tmp_path / "ok")
  assert first.returncode == 0, first.stderr
  strict = lambda text: json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
  before = strict((tmp_path / "ok" / "results.json").read_text())
  again = _cli(helpers.TINY_OVERRIDES, tmp_path / "ok")  # A rerun of the finished run.
  assert again.returncode == 0, again.stderr
  after = strict((tmp_path / "ok" / "results.json").read_text())
  model = lambda r: next(x for x in r["records"] if x["kind"] == "model")
  assert model(after)["tokens_per_s"] == model(before)["tokens_per_s"] > 0
  assert model(after)["wall_time_s"] == model(before)["wall_time_s"] > 0
  assert model(after)["val_nll_nats"] == model(before)["val_nll_nats"]
