"""Tests for llm_math.analysis.distillation: the soft/hard loss, its gradients, the objective and task
of a frozen teacher, and the paired comparison of students."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_math import model as model_lib
from llm_math import train
from llm_math import train_config
from llm_math.analysis import distillation as ds

from tests import helpers


def logits(seed, shape, scale=2.0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape) * scale


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 11), (1, 2)])
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 0.3), (4.0, 1.0), (0.5, 0.0)])
def test_loss_matches_float64_reference(shape, temperature, alpha):
  s, t = logits(0, shape), logits(1, shape)
  labels = jax.random.randint(jax.random.PRNGKey(2), shape[:-1], 0, shape[-1])
  log_p = np_log_softmax(np.asarray(t) / temperature)
  log_q = np_log_softmax(np.asarray(s) / temperature)
  kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
  ce = -np.take_along_axis(np_log_softmax(s), np.asarray(labels)[..., None], axis=-1)[..., 0]
  expected = np.mean(alpha * temperature**2 * kl + (1 - alpha) * ce)
  got = ds.distillation_loss(s, t, labels, temperature, alpha)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ds.soft_kl(s, t, temperature), kl, rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(ds.soft_kl(s, t, temperature)) >= -1e-6)


def test_kl_zero_iff_same_distribution():
  s = logits(3, (4, 9))
  np.testing.assert_allclose(ds.soft_kl(s, s, 3.0), 0.0, atol=1e-6)
  # Softmax is shift invariant per token.
  np.testing.assert_allclose(ds.soft_kl(s + 5.0, s, 3.0), 0.0, atol=1e-5)
  assert float(jnp.min(ds.soft_kl(s, logits(4, (4, 9)), 3.0))) > 1e-3


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0, 10.0])
def test_soft_gradient_is_q_minus_p_over_t(temperature):
  s, t = logits(5, (6, 13)), logits(6, (6, 13))
  # Per token (sum over tokens so that each token's gradient is its own):
  grad = jax.grad(lambda s: jnp.sum(ds.soft_kl(s, t, temperature)))(s)
  q, p = jax.nn.softmax(s / temperature), jax.nn.softmax(t / temperature)
  np.testing.assert_allclose(grad, (q - p) / temperature, rtol=1e-4, atol=1e-6)
  # Through the full loss with alpha = 1: T^2 (q - p) / T / N = T (q - p) / N.
  labels = jnp.zeros((6,), jnp.int32)
  grad_loss = jax.grad(lambda s: ds.distillation_loss(s, t, labels, temperature, 1.0))(s)
  np.testing.assert_allclose(grad_loss, temperature * (q - p) / 6, rtol=1e-4, atol=1e-6)
  # No gradient flows into the teacher.
  grad_t = jax.grad(lambda t: ds.distillation_loss(s, t, labels, temperature, 1.0))(t)
  assert not np.any(np.asarray(grad_t))


def test_hard_gradient_is_softmax_minus_onehot():
  s, t = logits(7, (5, 8)), logits(8, (5, 8))
  labels = jnp.array([0, 3, 7, 2, 2])
  grad = jax.grad(lambda s: ds.distillation_loss(s, t, labels, 2.0, 0.0))(s)
  np.testing.assert_allclose(grad, (jax.nn.softmax(s) - jax.nn.one_hot(labels, 8)) / 5,
                             rtol=1e-5, atol=1e-7)


def test_t_squared_keeps_gradient_scale():
  """The soft gradient (q - p)/T shrinks like 1/T^2; T^2 (q - p)/T = T (q - p) tends to
  ((s - mean s) - (t - mean t)) / V. Numeric example (V = 10, logits ~ N(0, 4), one token):

    T           1       2       4       8       16      32
    |grad KL|   0.988   0.273   0.0634  0.0148  0.00354 0.000866
    |T^2 grad|  0.988   1.091   1.015   0.946   0.907   0.887    (limit 0.867)
  """
  s, t = logits(0, (1, 10)), logits(1, (1, 10))  # same draw as the table
  norms, scaled = [], []
  for temperature in (1.0, 2.0, 4.0, 8.0, 16.0, 32.0):
    g = jax.grad(lambda s: jnp.sum(ds.soft_kl(s, t, temperature)))(s)
    norms.append(float(jnp.linalg.norm(g)))
    scaled.append(float(jnp.linalg.norm(temperature**2 * g)))
  limit = float(jnp.linalg.norm(((s - jnp.mean(s)) - (t - jnp.mean(t))) / 10))
  # Without T^2 the gradient falls ~4x per doubling of T (at large T) ...
  np.testing.assert_allclose(np.array(norms[3:-1]) / np.array(norms[4:]), 4.0, rtol=0.05)
  assert norms[-1] < 2e-3 * norms[0]
  # ... with T^2 it stays within a factor 1.5 of its T = 1 value and converges to the limit.
  assert max(scaled) / min(scaled) < 1.5
  np.testing.assert_allclose(scaled[-1], limit, rtol=0.03)
  np.testing.assert_allclose([norms[0], norms[3], scaled[3]], [0.9883, 0.01478, 0.9458], rtol=1e-3)


def test_weights_mask_averages_over_kept_tokens():
  s, t = logits(9, (3, 4, 6)), logits(10, (3, 4, 6))
  labels = jax.random.randint(jax.random.PRNGKey(11), (3, 4), 0, 6)
  mask = jnp.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], jnp.float32)
  keep = np.asarray(mask, bool)
  got = ds.distillation_loss(s, t, labels, 2.0, 0.7, weights_N=mask)
  ref = ds.distillation_loss(s[keep], t[keep], labels[keep], 2.0, 0.7)
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  ones = ds.distillation_loss(s, t, labels, 2.0, 0.7, weights_N=jnp.ones((3, 4)))
  np.testing.assert_allclose(ones, ds.distillation_loss(s, t, labels, 2.0, 0.7), rtol=1e-6)


def test_bad_arguments():
  s, t = logits(0, (2, 5)), logits(1, (2, 5))
  labels = jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match="temperature"):
    ds.distillation_loss(s, t, labels, 0.0)
  with pytest.raises(ValueError, match="alpha"):
    ds.distillation_loss(s, t, labels, 1.0, 1.5)
  with pytest.raises(ValueError, match="teacher_logits"):
    ds.distillation_loss(s, t[:, :4], labels)
  with pytest.raises(ValueError, match="labels"):
    ds.distillation_loss(s, t, jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="weights"):
    ds.distillation_loss(s, t, labels, weights_N=jnp.ones((3,)))


def test_sums_add_up_over_split_batches():
  """(total, count) of two halves add up to the whole batch's: what gradient accumulation and
  sharded batches rely on; their ratio is the loss."""
  s, t = logits(12, (4, 5, 7)), logits(13, (4, 5, 7))
  labels = jax.random.randint(jax.random.PRNGKey(14), (4, 5), 0, 7)
  total, count = ds.distillation_sums(s, t, labels, 2.0, 0.3)
  parts = [ds.distillation_sums(s[i:i + 2], t[i:i + 2], labels[i:i + 2], 2.0, 0.3) for i in (0, 2)]
  np.testing.assert_allclose(total, parts[0][0] + parts[1][0], rtol=1e-6)
  assert float(count) == 20.0 == float(parts[0][1] + parts[1][1])
  np.testing.assert_allclose(total / count, ds.distillation_loss(s, t, labels, 2.0, 0.3), rtol=1e-6)


def _teacher_and_student():
  """The tiny Transformer config of the tests, its model (teacher) and a narrower one (student)."""
  config = helpers.tiny_config()
  teacher = model_lib.Transformer(train_config.model_config(config, 32))
  config.model.update(d_model=16, d_ff=32)
  return config, teacher, model_lib.Transformer(train_config.model_config(config, 32))


def test_objective_reads_the_frozen_teacher_inside_the_loss():
  config, teacher, student = _teacher_and_student()
  tree = nn.meta.unbox({"student": train.lm_init(student, config.seq_len)(jax.random.PRNGKey(0)),
                        "teacher": train.lm_init(teacher, config.seq_len)(jax.random.PRNGKey(1))})
  inputs = jax.random.randint(jax.random.PRNGKey(2), (3, config.seq_len), 0, 32)
  targets = jnp.roll(inputs, -1, axis=1)
  loss = ds.distillation_objective(student.apply, teacher.apply, 2.0, 0.5)
  total, count = loss(tree, (inputs, targets), jax.random.PRNGKey(3))
  s = student.apply({"params": tree["student"]}, inputs)
  t = teacher.apply({"params": tree["teacher"]}, inputs)
  np.testing.assert_allclose([total, count], ds.distillation_sums(s, t, targets, 2.0, 0.5),
                             rtol=1e-5)
  assert float(count) == 3 * config.seq_len
  grads = jax.grad(lambda p: loss(p, (inputs, targets), jax.random.PRNGKey(3))[0])(tree)
  assert not any(np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(grads["teacher"]))
  assert any(np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(grads["student"]))
  with pytest.raises(ValueError, match="temperature"):
    ds.distillation_objective(student.apply, teacher.apply, 0.0, 0.5)


def test_task_shares_the_students_initialization_and_trains_it_alone():
  config, teacher, student = _teacher_and_student()
  plain = train.lm_task(config, helpers.tiny_dataset(config), student)
  teacher_params = train.lm_init(teacher, config.seq_len)(jax.random.PRNGKey(1))
  task = ds.distillation_task(plain, lambda rng: teacher_params, student.apply, teacher.apply,
                              1.0, 0.5)
  rng = jax.random.PRNGKey(7)
  tree = task.init(rng)
  # The distilled student starts where the plain one does (a pairing by seed), on its batches.
  jax.tree_util.tree_map(np.testing.assert_array_equal, tree["student"], plain.init(rng))
  assert tree["teacher"] is teacher_params and task.batch is plain.batch
  tree = nn.meta.unbox(tree)
  grads = jax.tree_util.tree_map(jnp.ones_like, tree)
  state, alone_state = task.tx.init(tree), plain.tx.init(tree["student"])
  for _ in range(3):  # Past the warmup's zero learning rate at step 0.
    updates, state = task.tx.update(grads, state, tree)
    alone, alone_state = plain.tx.update(grads["student"], alone_state, tree["student"])
  assert not any(np.any(np.asarray(u)) for u in jax.tree_util.tree_leaves(updates["teacher"]))
  assert all(np.any(np.asarray(u)) for u in jax.tree_util.tree_leaves(updates["student"]))
  jax.tree_util.tree_map(np.testing.assert_array_equal, updates["student"], alone)


def test_paired_summary_by_seed():
  run = lambda name, seed, nll, curve, alpha=0.5, t=2.0: {
      "name": name, "seed": seed, "alpha": alpha, "temperature": t, "val_nll": nll,
      "curve": [(0, 3.0), (10, curve)]}
  runs = [run("scratch", 0, 2.0, 2.0, 0.0, 1.0), run("T=2", 0, 1.9, 1.9),
          run("scratch", 1, 2.2, 2.2, 0.0, 1.0), run("T=2", 1, 2.3, 2.3)]
  summary = ds.paired_summary(runs, "scratch")
  assert list(summary) == ["scratch", "T=2"]
  m = summary["T=2"]
  np.testing.assert_allclose(m["minus_scratch_per_seed"], [-0.1, 0.1])
  assert m["minus_scratch_mean"] == pytest.approx(0.0, abs=1e-12)
  assert m["seeds_better_than_scratch"] == 1
  assert (m["val_nll_mean"], m["val_nll_min"], m["val_nll_max"]) == pytest.approx((2.1, 1.9, 2.3))
  assert m["val_ppl_mean"] == pytest.approx(np.exp(2.1))
  assert m["steps"] == [0, 10] and m["curve_mean"] == pytest.approx([3.0, 2.1])
  assert m["curve_min"] == pytest.approx([3.0, 1.9]) and m["curve_max"] == pytest.approx([3.0, 2.3])
  assert (m["alpha"], m["temperature"]) == (0.5, 2.0)
  assert summary["scratch"]["minus_scratch_per_seed"] == [0.0, 0.0]
  with pytest.raises(ValueError, match="baseline"):
    ds.paired_summary(runs, "teacher")
  with pytest.raises(ValueError, match="seeds"):
    ds.paired_summary(runs[:3], "scratch")
