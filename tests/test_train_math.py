"""The training step and the evaluation against independent computations of the same numbers.

Gradient accumulation against the plain full-batch gradient and update; strided evaluation against a
token-by-token brute force that runs the model on each scored token's context alone.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm_math import data as data_lib
from llm_math import evaluation
from llm_math import model as model_lib
from llm_math import optimizer as optimizer_lib
from llm_math import sharding
from llm_math import train as train_lib
from llm_math import train_config

from tests import helpers


def _setup(config, tx=None):
  """Model, sharded state (train.create_state), mesh and rules of a tiny config."""
  dataset = helpers.tiny_dataset(config)
  model = model_lib.Transformer(train_config.model_config(config, dataset.vocab_size))
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.logical_axis_rules)
  state, _ = train_lib.create_state(train_lib.lm_init(model, config.seq_len),
                                    tx or optimizer_lib.optimizer(config), mesh, rules,
                                    jax.random.PRNGKey(config.seed))
  return dataset, model, state, mesh, rules


def _step_fn(model, accum):
  step = functools.partial(train_lib.train_step, loss_fn=train_lib.lm_loss(model),
                           grad_accum_steps=accum)
  return jax.jit(lambda state, x, y, rng: step(state, (x, y), rng))


def _allclose_trees(a, b, rtol, atol):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_gradient_accumulation_is_the_full_batch_gradient():
  """With SGD at learning rate 1 the update is minus the gradient, so new params expose it exactly.

  The reference is computed here, independently of train_step: jax.grad of the mean next-token NLL
  of the whole batch in one forward pass. Accumulating over M micro-batches (row r of micro-batch
  m = row r M + m) must give the same loss and the same gradient up to float32 rounding.
  """
  config = helpers.tiny_config()
  assert config.model.dropout_rate == 0.0
  dataset, model, state, mesh, _ = _setup(config, tx=optax.sgd(1.0))
  inputs, targets = data_lib.train_batch(dataset.train_ids, config.seq_len, config.batch_size,
                                         config.seed, step=0)

  def full_batch_loss(params):
    nll, count = model_lib.cross_entropy(model.apply({"params": params}, inputs), targets)
    return nll / count

  loss, grads = jax.value_and_grad(full_batch_loss)(state.params)
  expected_params = jax.tree_util.tree_map(jnp.subtract, state.params, grads)
  grad_norm = math.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree_util.tree_leaves(grads)))
  rng = jax.random.PRNGKey(1)
  for accum in (1, 8):  # The plain step, and one row per micro-batch.
    with sharding.use_mesh(mesh):
      new, metrics = _step_fn(model, accum)(state, inputs, targets, rng)
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-6), accum
    assert float(metrics["grad_norm"]) == pytest.approx(grad_norm, rel=1e-5), accum
    _allclose_trees(new.params, expected_params, rtol=1e-5, atol=1e-7)
    assert int(new.step) == 1


def test_gradient_accumulation_matches_with_the_real_optimizer():
  """Three AdamW steps (clipping, weight decay, no warmup) on three batches: M = 4 micro-batches
  report the same losses and reach the same parameters as the full batch (up to float32
  rounding)."""
  config = helpers.tiny_config(warmup_steps=0, learning_rate=1e-2)
  dataset, model, state, mesh, _ = _setup(config)
  rng = jax.random.PRNGKey(0)
  states = {1: state, 4: state}
  step_fns = {accum: _step_fn(model, accum) for accum in states}
  with sharding.use_mesh(mesh):
    for step in range(3):
      inputs, targets = data_lib.train_batch(dataset.train_ids, config.seq_len, config.batch_size,
                                             config.seed, step)
      losses = {}
      for accum in states:
        states[accum], metrics = step_fns[accum](states[accum], inputs, targets, rng)
        losses[accum] = float(metrics["loss"])
      assert losses[4] == pytest.approx(losses[1], rel=1e-6)
  # Adam divides each entry by sqrt(v): where a gradient entry is near 0, the float32 rounding of
  # the summation order can move that entry's update by a sizeable part of a step. So the updates
  # are compared as a whole: the distance between the two runs against the distance travelled.
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])
  start, one, many = flat(state.params), flat(states[1].params), flat(states[4].params)
  assert np.linalg.norm(many - one) < 1e-4 * np.linalg.norm(one - start)  # ~1e-5 measured


def _expected_contexts(n_tokens, seq_len, stride):
  """{position p: context length c} of every scored target, from the windowing rule alone.

  Windows start at 0, stride, 2 stride, ... while they fit, and one more flush with the end of the
  stream if needed. The first window scores its targets 1..T with contexts 1..T; every later
  target p is scored in the first regular window that has it among its last `stride` targets, i.e.
  window k = ceil((p - T) / stride), start k stride (or, past the last regular window, in the flush
  window), with context p - start.
  """
  n_targets = n_tokens - 1
  last_regular = (n_targets - seq_len) // stride * stride
  contexts = {}
  for p in range(1, n_targets + 1):
    if p <= seq_len:
      contexts[p] = p
      continue
    start = math.ceil((p - seq_len) / stride) * stride
    if start > last_regular:
      start = n_targets - seq_len
    contexts[p] = p - start
  return contexts


@pytest.mark.parametrize("pos_encoding", ["learned", "rotary"])
def test_strided_evaluation_equals_a_per_token_brute_force(pos_encoding):
  """stride 5 < T = 16 over 100 validation tokens (with a flush last window).

  Brute force: every target p with context c is scored by running the model on the c tokens before
  it alone, at positions 0..c-1 (where the window puts them), and taking -log softmax of the token.
  """
  config = helpers.tiny_config()
  config.model.pos_encoding = pos_encoding
  dataset, model, state, mesh, rules = _setup(config)
  # Random parameters well away from the near-uniform initialization, so that each token's NLL
  # depends strongly on its context (a wrong context would show).
  leaves, treedef = jax.tree_util.tree_flatten(state.params)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_unflatten(
      treedef, [jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32) for x in leaves])
  t, stride = config.seq_len, 5
  ids = dataset.val_ids[:100]
  windows = data_lib.eval_windows(ids, t, stride)
  scored = windows.weights_NxT > 0
  got = dict(zip(windows.positions_NxT[scored].tolist(), windows.context_NxT[scored].tolist()))
  assert int(scored.sum()) == len(ids) - 1  # Every target once...
  assert got == _expected_contexts(len(ids), t, stride)  # ... with the context the rule gives it.
  assert min(c for p, c in got.items() if p > t) == t - stride + 1

  by_context = {}
  for p, c in got.items():
    by_context.setdefault(c, []).append(p)
  apply = jax.jit(model.apply)
  brute = {}
  for c, positions in by_context.items():
    contexts = np.stack([ids[p - c:p] for p in positions])
    logprobs = jax.nn.log_softmax(apply({"params": params}, contexts)[:, -1], axis=-1)
    for p, row in zip(positions, np.asarray(logprobs, np.float64)):
      brute[p] = -row[ids[p]]
  expected = np.mean(list(brute.values()))

  # Token by token through the windows...
  logprobs = np.asarray(jax.nn.log_softmax(apply({"params": params}, windows.inputs_NxT),
                                           axis=-1))
  nll_NxT = -np.take_along_axis(logprobs, windows.targets_NxT[..., None], axis=-1)[..., 0]
  for p, nll in zip(windows.positions_NxT[scored].tolist(), nll_NxT[scored]):
    assert nll == pytest.approx(brute[p], abs=1e-5), p
  # ... and the evaluator's mean (batches of 4 windows: the last batch is padded).
  assert len(windows.inputs_NxT) % 4
  evaluate = evaluation.Evaluator(windows, evaluation.nll_score(model.apply), 4, mesh, rules)
  assert evaluate(params) == pytest.approx(expected, abs=1e-5)


def _weighted_task_step(accum):
  """train_step on least squares with per-row weights (a masked task): loss sums w_r |x_r - p|^2 and
  counts sum_r w_r, so micro-batches can hold different counts, or none."""
  def loss_fn(params, batch, rng):
    del rng
    x_BxD, w_Bx1 = batch
    return jnp.sum(w_Bx1 * jnp.square(x_BxD - params["p"][None])), jnp.sum(w_Bx1)

  tx = optax.sgd(1.0)
  state = train_lib.LoopState.create(apply_fn=None, params={"p": jnp.zeros((3,), jnp.float32)},
                                     tx=tx, sums=train_lib._zero_sums())
  step = jax.jit(functools.partial(train_lib.train_step, loss_fn=loss_fn, grad_accum_steps=accum))
  return state, step


def test_micro_batch_noise_term_weights_micro_batches_by_their_counts():
  """McCandlish's small-batch term sum_m c_m |g_m|^2 / sum_m c_m: micro-batches of unequal counts
  (masked positions) weighted by them, and one with no scored terms adding nothing (not a NaN)."""
  x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
  w = np.array([1, 1, 0, 1, 1, 0, 0, 0], np.float32)[:, None]  # Micro-batch 2 of 4 ({2, 6}): empty.
  state, step = _weighted_task_step(accum=4)
  new, _ = step(state, (x, w), jax.random.PRNGKey(0))
  # Independently: micro-batch m holds rows m, m + 4 (row r of micro-batch m = row r M + m).
  terms, counts, full = [], [], np.zeros(3)
  for m in range(4):
    rows = [m, m + 4]
    c = w[rows].sum()
    g_sum = -2 * (w[rows] * x[rows]).sum(0)  # d/dp of sum_r w_r |x_r - p|^2 at p = 0.
    full += g_sum
    counts.append(c)
    terms.append(np.sum((g_sum / c) ** 2) if c else 0.0)
  expected_micro = np.dot(counts, terms) / np.sum(counts)
  g = full / np.sum(counts)
  sums = jax.device_get(new.sums)
  assert np.isfinite(float(sums["micro_grad_sq"]))
  np.testing.assert_allclose(float(sums["micro_grad_sq"]), expected_micro, rtol=1e-5)
  np.testing.assert_allclose(float(sums["grad_sq"]), np.sum(g ** 2), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(new.params["p"]), -g, rtol=1e-5)  # SGD at lr 1: p = -g.
  # With one micro-batch the two terms coincide.
  state, step = _weighted_task_step(accum=1)
  new, _ = step(state, (x, w), jax.random.PRNGKey(0))
  sums = jax.device_get(new.sums)
  np.testing.assert_allclose(float(sums["micro_grad_sq"]), float(sums["grad_sq"]), rtol=1e-6)


def test_float16_backward_carries_the_mean_not_the_sum():
  """A float16 computation over 2^17 terms: the gradient of their sum is about 2^17 per entry, past
  float16's largest value (65504), while that of their mean is about 1. train_step differentiates the
  mean, so the gradient is finite and right."""
  n = 1 << 17

  def loss_fn(params, batch, rng):
    del rng
    (x_Nx1,) = batch
    y = x_Nx1.astype(jnp.float16) * params["a"].astype(jnp.float16)  # d y_i / d a = x_i = 1.
    return jnp.sum(y.astype(jnp.float32)), jnp.asarray(n, jnp.float32)

  assert not np.isfinite(float(jax.grad(lambda a: jnp.sum(
      (jnp.ones((n, 1), jnp.float16) * a.astype(jnp.float16))), allow_int=False)(
          jnp.float32(0.5))))  # The sum's gradient overflows in float16.
  state = train_lib.LoopState.create(apply_fn=None, params={"a": jnp.float32(0.5)},
                                     tx=optax.sgd(1.0), sums=train_lib._zero_sums())
  step = jax.jit(functools.partial(train_lib.train_step, loss_fn=loss_fn))
  new, metrics = step(state, (np.ones((n, 1), np.float32),), jax.random.PRNGKey(0))
  assert float(metrics["grad_norm"]) == pytest.approx(1.0, rel=1e-3)
  assert float(new.params["a"]) == pytest.approx(-0.5, rel=1e-3)
