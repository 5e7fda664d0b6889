"""The frozen training config (its defaults and one-line errors) and the learning-rate schedules."""

import ml_collections
import numpy as np
import pytest

from llm_math import optimizer
from llm_math import train_config
from llm_math.errors import UsageError


def test_fields_a_config_lacks_take_the_one_set_of_defaults():
  tc = train_config.train_config(ml_collections.ConfigDict({"seq_len": 32, "data": "synthetic"}))
  assert tc.seq_len == 32 and tc == train_config.TrainConfig(seq_len=32)
  assert tc.save_every == tc.num_steps and tc.loss_bound(32) == np.inf
  assert train_config.train_config(tc) is tc
  bounded = train_config.TrainConfig(max_loss_factor=3.0)
  assert bounded.loss_bound(32) == pytest.approx(3 * np.log(32))
  lists = ml_collections.ConfigDict({"logical_axis_rules": [["batch", ["data", "fsdp"]]]})
  assert train_config.train_config(lists).logical_axis_rules == (("batch", ("data", "fsdp")),)


@pytest.mark.parametrize("field,value,message", [
    ("schedule", "linear", "--config.schedule='linear': expected one of cosine, wsd"),
    ("decay_fraction", 0.0, "--config.decay_fraction=0.0: expected a number in (0, 1]"),
    ("warmup_steps", 2000, "--config.warmup_steps=2000: expected an integer in [0, num_steps=1000]"),
    ("checkpoint_every", 0, "--config.checkpoint_every=0: expected a positive integer"),
    ("batch_size", 0, "--config.batch_size=0: expected a positive integer"),
])
def test_a_bad_field_is_one_line_naming_it(field, value, message):
  with pytest.raises(UsageError) as e:
    train_config.train_config(ml_collections.ConfigDict({field: value}))
  assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_wsd_warms_up_holds_then_decays_linearly():
  tc = train_config.TrainConfig(num_steps=100, warmup_steps=10, learning_rate=1.0,
                                min_learning_rate=0.1, schedule="wsd", decay_fraction=0.2)
  lr = optimizer.learning_rate_schedule(tc)
  assert optimizer.stable_steps(tc) == 80
  np.testing.assert_allclose([float(lr(s)) for s in (0, 5, 10, 50, 80, 90, 100)],
                             [0.0, 0.5, 1.0, 1.0, 1.0, 0.55, 0.1], rtol=1e-6)


def test_wsd_runs_of_any_length_agree_until_the_shorter_one_decays():
  """Why one long run serves many token budgets: its stable-phase checkpoints are where each
  shorter budget's cool-down starts."""
  short, long = (train_config.TrainConfig(num_steps=n, warmup_steps=10, schedule="wsd",
                                          decay_fraction=0.25) for n in (100, 400))
  lr_short, lr_long = optimizer.learning_rate_schedule(short), optimizer.learning_rate_schedule(long)
  steps = np.arange(optimizer.stable_steps(short) + 1)
  np.testing.assert_array_equal([float(lr_short(s)) for s in steps],
                                [float(lr_long(s)) for s in steps])
  assert float(lr_short(90)) < float(lr_long(90))
