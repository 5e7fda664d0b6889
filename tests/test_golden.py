"""Golden metrics of one training step: a change to the model, the loss, the optimizer, the
initialization or the data order shows up here as a changed number, not as a silent drift."""

import jax
import numpy as np

from llm_math import data as data_lib
from llm_math import model as model_lib
from llm_math import sharding
from llm_math import synthetic
from llm_math import train as train_lib
from llm_math import train_config

# The first step of the run below (float32, CPU; other backends agree to the tolerance).
GOLDEN = {"loss": 3.454044342, "grad_norm": 2.91928339, "param_norm": 12.878487587,
          "update_norm": 0.4114837348}
TOLERANCE = 2e-5  # Relative: float32 reductions may reorder across backends and XLA versions.

UPDATE_MESSAGE = (
    "The first training step's metrics changed. If the change is intended (a new initializer, "
    "loss, optimizer default or data order), replace GOLDEN in tests/test_golden.py with the "
    "measured values printed here and say why in the commit message:\n  GOLDEN = {measured}")


def _first_step() -> dict:
  tc = train_config.TrainConfig(seed=0, seq_len=16, batch_size=8, num_steps=10, warmup_steps=0,
                                learning_rate=3e-3, min_learning_rate=3e-4, weight_decay=0.1,
                                grad_clip=1.0)
  mcfg = model_lib.ModelConfig(vocab_size=32, max_len=tc.seq_len, num_layers=2, num_heads=2,
                               d_model=32, d_ff=64, pos_encoding="rotary",
                               logical_axis_rules=tc.logical_axis_rules)
  source = synthetic.LaggedCopySource(vocab_size=32, lag=4, copy_prob=0.8, zipf_exponent=1.0)
  dataset = data_lib.Dataset("golden", source.sample(4096, seed=0), source.sample(512, seed=1),
                             data_lib.SyntheticTokenizer(32), source)
  task = train_lib.lm_task(tc, dataset, model_lib.Transformer(mcfg))
  mesh = sharding.make_mesh(tc.mesh)
  init_rng, step_rng = train_lib.run_rngs(tc.seed)
  state, _ = train_lib.create_state(task.init, task.tx, mesh, tc.logical_axis_rules, init_rng)
  batch = task.batch(0, slice(None))
  with sharding.use_mesh(mesh):
    _, metrics = jax.jit(lambda s, b, r: train_lib.train_step(s, b, r, loss_fn=task.loss))(
        state, batch, step_rng)
  return {k: float(metrics[k]) for k in GOLDEN}


def test_first_step_metrics_are_golden():
  measured = _first_step()
  rounded = {k: round(v, 10) for k, v in measured.items()}
  for key, value in GOLDEN.items():
    assert np.isclose(measured[key], value, rtol=TOLERANCE, atol=0), (
        f"{key}: {measured[key]:.10f}, golden {value:.10f}. "
        + UPDATE_MESSAGE.format(measured=rounded))
