"""Training: the loss falls, resume is exact, NaN stops cleanly, checkpoints refuse other shapes."""
import json
import os
import signal

import jax
import numpy as np
import pytest

from llm_math import checkpoint
from llm_math import summaries
from llm_math import train as train_lib
from llm_math import train_config
from llm_math.errors import UsageError

from tests import helpers


def _quiet(*_):
  pass


def test_short_run_loss_falls(tmp_path):
  config = helpers.tiny_config(num_steps=40, learning_rate=1e-2, eval_every=20, checkpoint_every=40)
  result = train_lib.train(config, helpers.tiny_dataset(config), str(tmp_path), log=_quiet)
  steps, losses = zip(*result.val_curve)
  assert steps == (0, 20, 40)
  assert losses[0] > np.log(32) - 0.2  # ~uniform at init
  assert losses[-1] < losses[0] - 0.4
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  train_records = [r for r in records if "loss" in r]
  assert {"step", "loss", "ppl", "lr", "grad_norm", "tokens_per_s"} <= set(train_records[0])
  assert train_records[-1]["loss"] < train_records[0]["loss"]
  assert result.params > 0 and result.flops_per_token > 6 * result.params * 0.5


def test_tensorboard_events_match_metrics_jsonl(tmp_path):
  """The event files beside metrics.jsonl hold the same scalars, read back as TensorBoard reads them."""
  config = helpers.tiny_config(num_steps=6, log_every=2, eval_every=3, checkpoint_every=6)
  train_lib.train(config, helpers.tiny_dataset(config), str(tmp_path), log=_quiet)
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  events = summaries.read_scalars(str(tmp_path))
  for tag in ("loss", "lr", "grad_norm", "param_norm", "update_norm", "tokens_per_s", "val_nll"):
    expected = [(r["step"], r[tag]) for r in records if tag in r]
    assert len(expected) >= 2
    got = events[tag]
    assert [s for s, _ in got] == [s for s, _ in expected]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in expected], rtol=1e-6)


def _params_of(result):
  return jax.tree_util.tree_leaves(jax.device_get(result.state.params))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_resumes_exactly(tmp_path, signum):
  """SIGINT (Ctrl-C) or SIGTERM (preemption) mid-run saves a checkpoint; rerunning continues to
  bit-identical parameters and metrics."""
  config = helpers.tiny_config(num_steps=12, checkpoint_every=4, log_every=1, eval_every=6)
  dataset = helpers.tiny_dataset(config)
  full = train_lib.train(config, dataset, str(tmp_path / "full"), log=_quiet)

  def interrupt_at_step_7(line):
    if line.startswith("step      7 | loss"):
      os.kill(os.getpid(), signum)

  part_dir = str(tmp_path / "part")
  first = train_lib.train(config, dataset, part_dir, log=interrupt_at_step_7)
  assert first.interrupted and first.final_step == 7
  assert checkpoint.manager(part_dir).latest_step() == 7
  resumed = train_lib.train(config, dataset, part_dir, log=_quiet)
  assert not resumed.interrupted and resumed.final_step == 12
  for a, b in zip(_params_of(full), _params_of(resumed)):
    np.testing.assert_array_equal(a, b)
  assert resumed.val_curve == full.val_curve
  strip = lambda r: {k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")}
  read = lambda d: [strip(json.loads(l)) for l in open(os.path.join(d, "metrics.jsonl"))]
  assert read(part_dir) == read(str(tmp_path / "full"))


def test_nan_loss_stops_cleanly_and_keeps_last_good_checkpoint(tmp_path):
  config = helpers.tiny_config(num_steps=30, learning_rate=1e32, warmup_steps=0, grad_clip=0.0,
                               checkpoint_every=1, log_every=1)
  dataset = helpers.tiny_dataset(config)
  with pytest.raises(train_lib.DivergenceError, match="training loss is (nan|inf)"):
    train_lib.train(config, dataset, str(tmp_path), log=_quiet)
  mngr = checkpoint.manager(str(tmp_path))
  assert mngr.all_steps()
  # The newest save was still being written when the error surfaced; it completed and is intact.
  _, latest = checkpoint.restore_latest(mngr, log=pytest.fail)
  assert latest == max(mngr.all_steps())
  for step in mngr.all_steps():
    params, _ = checkpoint.load_params(str(tmp_path), step)  # Intact: its fingerprint matches.
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


def test_restoring_into_a_different_model_is_a_clear_error(tmp_path):
  config = helpers.tiny_config(num_steps=4, checkpoint_every=4)
  dataset = helpers.tiny_dataset(config)
  train_lib.train(config, dataset, str(tmp_path), log=_quiet)
  wider = helpers.tiny_config(num_steps=8, checkpoint_every=4)
  wider.model.d_model = 48
  with pytest.raises(UsageError, match="written by a different model"):
    train_lib.train(wider, dataset, str(tmp_path), log=_quiet)


def test_batch_not_divisible_by_data_parallel_devices_is_a_clear_error(tmp_path):
  config = helpers.tiny_config(batch_size=3, mesh=f"data:{len(jax.devices())}")
  if len(jax.devices()) == 1:
    pytest.skip("needs several devices")
  with pytest.raises(UsageError, match="not divisible"):
    train_lib.train(config, helpers.tiny_dataset(config), str(tmp_path), log=_quiet)


def test_bad_dtype_is_a_clear_error(tmp_path):
  config = helpers.tiny_config()
  config.model.dtype = "float8"
  with pytest.raises(UsageError, match="--config.model.dtype='float8'"):
    train_lib.train(config, helpers.tiny_dataset(config), str(tmp_path), log=_quiet)


def test_chunked_loss_trains_like_the_full_logits(tmp_path):
  """config.loss_chunk changes memory, not the run: same losses and parameters to float tolerance."""
  runs = {}
  for chunk in (0, 4):
    config = helpers.tiny_config(num_steps=6, eval_every=6, checkpoint_every=6, loss_chunk=chunk)
    runs[chunk] = train_lib.train(config, helpers.tiny_dataset(config), str(tmp_path / str(chunk)),
                                  log=_quiet)
  np.testing.assert_allclose(runs[4].val_curve, runs[0].val_curve, rtol=1e-5)
  # Adam divides by sqrt(v): where a gradient is near zero, float summation order moves the update
  # by a fraction of the learning rate (seen on an Intel Xeon: 1.5e-6 after 6 steps at lr <= 3e-3).
  for a, b in zip(_params_of(runs[4]), _params_of(runs[0])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  config = helpers.tiny_config(loss_chunk=5)
  with pytest.raises(UsageError, match="--config.loss_chunk=5"):
    train_lib.train(config, helpers.tiny_dataset(config), str(tmp_path / "bad"), log=_quiet)


def test_a_scanned_run_checkpoints_its_layout_and_reads_back_unrolled(tmp_path):
  """A run with scan_layers (and dots-saveable remat) trains and checkpoints its stacked layout,
  and `load_trained` reads it back unrolled: the unrolled model on the unstacked parameters gives
  the scanned model's logits. (Equality of the two layouts' losses and gradients: test_model.)"""
  from llm_math import model as model_lib  # pylint: disable=g-import-not-at-top
  config = helpers.tiny_config(num_steps=4, eval_every=4, checkpoint_every=4)
  config.model.num_layers = 2
  config.model.scan_layers = True
  config.model.remat = "dots_saveable"
  dataset = helpers.tiny_dataset(config)
  result = train_lib.train(config, dataset, str(tmp_path), log=_quiet)
  assert "blocks" in result.state.params and "block_0" not in result.state.params
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  trained = checkpoint.load_trained(str(tmp_path))
  assert {"block_0", "block_1"} <= set(trained.params) and "blocks" not in trained.params
  assert trained.model_config.scan_layers is False
  tokens = np.asarray(dataset.val_ids[:config.seq_len])[None]
  scanned = model_lib.Transformer(train_config.model_config(config, dataset.vocab_size))
  np.testing.assert_allclose(
      trained.model.apply({"params": trained.params}, tokens),
      scanned.apply({"params": jax.device_get(result.state.params)}, tokens), rtol=1e-5, atol=1e-6)
