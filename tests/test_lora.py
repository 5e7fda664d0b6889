"""Tests for llm_math.analysis.lora: init, apply (merge), parameter counts, LoRA-only training."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm_math import train
from llm_math.analysis import compression as cp
from llm_math.analysis import lora as lr

from tests.helpers import D, DH, F, H, transformer_params


class AttnLike(nn.Module):
  """Tiny module with DenseGeneral kernels laid out like attention: [D, H, Dh], [H, Dh, D]."""

  @nn.compact
  def __call__(self, x_NxD):
    h = nn.tanh(nn.DenseGeneral((H, DH), name="query")(x_NxD))
    return nn.DenseGeneral(D, axis=(-2, -1), name="out")(h)


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="fc_out")(nn.gelu(nn.Dense(F, name="fc_in")(x)))


def tree_bits(tree):
  return {p: np.array(x, copy=True) for p, x in cp.flatten_tree(tree).items()}


def test_init_default_targets_shapes_and_zero_b():
  params = transformer_params()
  factors = lr.init_lora(jax.random.PRNGKey(0), params, rank=4)
  pairs = lr.factor_pairs(factors)
  assert set(pairs) == {f"block_{i}/attn/{n}/kernel" for i in range(2) for n in ("query", "value")}
  for a, b in pairs.values():
    assert a.shape == (D, 4) and b.shape == (4, H * DH)
    assert not np.any(np.asarray(b))
    assert 0.5 < float(jnp.std(a)) * np.sqrt(D) < 1.5  # a ~ N(0, 1/in)
  # Independent keys per matrix.
  assert not np.allclose(pairs["block_0/attn/query/kernel"][0], pairs["block_1/attn/query/kernel"][0])
  # A plain nested dict mirroring the params tree: only the factors are leaves.
  assert factors["block_0"]["attn"]["query"]["kernel"]["a"] is pairs["block_0/attn/query/kernel"][0]
  assert len(jax.tree_util.tree_leaves(factors)) == 8
  # The shapes are all it reads: abstract params give the same factors.
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, factors,
                         lr.init_lora(jax.random.PRNGKey(0), abstract, rank=4))


def test_b_zero_leaves_params_and_outputs_unchanged():
  params = transformer_params()
  factors = lr.init_lora(jax.random.PRNGKey(1), params, 4, targets=r"kernel$")
  new = lr.apply_lora(params, factors, 16.0)
  for path, leaf in cp.flatten_tree(params).items():
    np.testing.assert_array_equal(cp.flatten_tree(new)[path], leaf)
  model = AttnLike()
  x = jax.random.normal(jax.random.PRNGKey(2), (5, D))
  mp = model.init(jax.random.PRNGKey(3), x)["params"]
  mf = lr.init_lora(jax.random.PRNGKey(4), mp, 2, targets=r"(query|out)/kernel$",
                    input_axes=((r"^out/kernel$", 2),))
  np.testing.assert_array_equal(model.apply({"params": lr.apply_lora(mp, mf, 4.0)}, x),
                                model.apply({"params": mp}, x))


def random_b(factors, seed=0):
  """The same factors with nonzero b (as after training)."""
  leaves, treedef = jax.tree_util.tree_flatten(factors)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [jax.random.normal(k, x.shape) * 0.3 for k, x in zip(keys, leaves)])


def test_delta_is_scaled_low_rank_in_kernel_layout():
  params = transformer_params(seed=1)
  factors = random_b(lr.init_lora(jax.random.PRNGKey(0), params, 3,
                                  targets=r"attn/(query|out)/kernel$"))
  new = cp.flatten_tree(lr.apply_lora(params, factors, 6.0))
  old = cp.flatten_tree(params)
  for path, (a, b) in lr.factor_pairs(factors).items():
    n_in = 2 if "attn/out" in path else 1
    delta = np.asarray(cp.kernel_to_matrix(new[path], n_in) - cp.kernel_to_matrix(old[path], n_in))
    np.testing.assert_allclose(delta, 6.0 / 3 * np.asarray(a) @ np.asarray(b),
                               rtol=1e-4, atol=1e-5)
    assert np.linalg.matrix_rank(delta, tol=1e-4) == 3
  pairs = lr.factor_pairs(factors)
  assert pairs["block_0/attn/out/kernel"][0].shape == (H * DH, 3)
  assert pairs["block_0/attn/out/kernel"][1].shape == (3, D)


def test_merged_model_reproduces_unmerged_outputs():
  x = jax.random.normal(jax.random.PRNGKey(0), (7, D))
  # Dense MLP: merged flax apply vs the unmerged side-path computation.
  model = MLP()
  mp = model.init(jax.random.PRNGKey(1), x)["params"]
  mf = random_b(lr.init_lora(jax.random.PRNGKey(2), mp, 2, targets=r"kernel$"))
  merged = model.apply({"params": lr.apply_lora(mp, mf, 3.0)}, x)
  s = 1.5
  pairs = lr.factor_pairs(mf)
  (ai, bi), (ao, bo) = pairs["fc_in/kernel"], pairs["fc_out/kernel"]
  h = nn.gelu(lr.lora_dense(x, mp["fc_in"]["kernel"], ai, bi, s) + mp["fc_in"]["bias"][None, :])
  unmerged = lr.lora_dense(h, mp["fc_out"]["kernel"], ao, bo, s) + mp["fc_out"]["bias"][None, :]
  np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5)
  assert not np.allclose(merged, model.apply({"params": mp}, x), atol=1e-3)
  # DenseGeneral with multi-axis kernels.
  model = AttnLike()
  mp = model.init(jax.random.PRNGKey(3), x)["params"]
  # This module's output projection is at 'out/kernel', so its 2 input axes need their own rule.
  mf = random_b(lr.init_lora(jax.random.PRNGKey(4), mp, 2, targets=r"kernel$",
                             input_axes=((r"^out/kernel$", 2),)), seed=1)
  pairs = lr.factor_pairs(mf)
  assert pairs["out/kernel"][0].shape == (H * DH, 2)
  merged = model.apply({"params": lr.apply_lora(mp, mf, 2.0)}, x)
  (aq, bq), (ao, bo) = pairs["query/kernel"], pairs["out/kernel"]
  q = lr.lora_dense(x, mp["query"]["kernel"].reshape(D, -1), aq, bq, 1.0)
  h = jnp.tanh(q + mp["query"]["bias"].reshape(-1)[None, :])
  unmerged = lr.lora_dense(h, mp["out"]["kernel"].reshape(-1, D), ao, bo, 1.0)
  np.testing.assert_allclose(merged, unmerged + mp["out"]["bias"][None, :], rtol=1e-5, atol=1e-5)


def test_parameter_counts_and_share_of_gain():
  assert lr.lora_reduction(4096, 4096, 8) == 256.0
  params = transformer_params()
  factors = lr.init_lora(jax.random.PRNGKey(0), params, 2)
  assert lr.lora_param_count(factors) == 4 * 2 * (D + H * DH)
  assert lr.adapted_param_count(factors) == 4 * D * H * DH
  assert (lr.adapted_param_count(factors) / lr.lora_param_count(factors)
          == lr.lora_reduction(D, H * DH, 2))
  with pytest.raises(ValueError, match="rank"):
    lr.init_lora(jax.random.PRNGKey(0), params, 0)
  with pytest.raises(ValueError, match="rank"):
    lr.init_lora(jax.random.PRNGKey(0), params, D + 1)
  with pytest.raises(ValueError, match="alpha"):
    lr.apply_lora(params, factors, 0.0)
  # No fine-tuning at 2.5 nats, full fine-tuning at 2.0: an adapter at 2.1 recovers 80%.
  assert lr.share_of_gain(2.5, 2.0, 2.1) == pytest.approx(0.8)
  assert lr.share_of_gain(2.5, 2.0, 2.6) == pytest.approx(-0.2)
  assert np.isnan(lr.share_of_gain(2.0, 2.0, 1.9))


def test_training_updates_only_lora_and_reduces_loss():
  """Fine-tune {"base": frozen MLP, "lora": factors} with AdamW (weight decay, which would move an
  unmasked base) towards a target that differs from the base by a rank-2 change of fc_in."""
  model = MLP()
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (64, D))
  base = model.init(jax.random.PRNGKey(1), x)["params"]
  u = jax.random.normal(jax.random.PRNGKey(2), (D, 2)) / 2
  w = jax.random.normal(jax.random.PRNGKey(3), (2, F)) / 2
  target_params = cp.replace_leaves(base, {"fc_in/kernel": base["fc_in"]["kernel"] + u @ w})
  y = model.apply({"params": target_params}, x)

  def loss_fn(params, batch):
    xb, yb = batch
    return jnp.mean((model.apply({"params": params}, xb) - yb) ** 2)

  tree = {"base": base,
          "lora": lr.init_lora(jax.random.PRNGKey(4), base, rank=2, targets=r"fc_in/kernel$")}
  loss = lr.lora_loss(loss_fn, 2.0)
  before = tree_bits(base)
  # Gradients reach the factors only; with b = 0 only b gets a nonzero gradient.
  grads = jax.grad(loss)(tree, (x, y))
  assert not any(np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(grads["base"]))
  (a_grad, b_grad), = lr.factor_pairs(grads["lora"]).values()
  assert np.any(np.asarray(b_grad)) and not np.any(np.asarray(a_grad))

  tx = cp.train_only(optax.adamw(3e-2, weight_decay=0.1), "lora")
  opt_state = tx.init(tree)
  # Optimizer state (Adam's two moments) only for the factors.
  n_state = sum(np.size(s) for s in jax.tree_util.tree_leaves(opt_state))
  assert n_state == 2 * lr.lora_param_count(tree["lora"]) + 1  # + the step count

  @jax.jit
  def step(tree, opt_state):
    value, grads = jax.value_and_grad(loss)(tree, (x, y))
    updates, opt_state = tx.update(grads, opt_state, tree)
    return optax.apply_updates(tree, updates), opt_state, value

  losses = []
  for _ in range(150):
    tree, opt_state, value = step(tree, opt_state)
    losses.append(float(value))
  assert losses[-1] < 0.05 * losses[0]
  (a, b), = lr.factor_pairs(tree["lora"]).values()
  assert np.any(np.asarray(b))
  # The frozen base is bit for bit what it was.
  for path, bits in tree_bits(tree["base"]).items():
    np.testing.assert_array_equal(bits, before[path])
  # Merged weights differ from the base only at the adapted kernel.
  merged = cp.flatten_tree(lr.apply_lora(tree["base"], tree["lora"], 2.0))
  for path, bits in before.items():
    if path == "fc_in/kernel":
      assert not np.array_equal(merged[path], bits)
    else:
      np.testing.assert_array_equal(merged[path], bits)


def test_lora_task_freezes_the_base_of_a_task():
  """lora_task turns a Task of the base model into one of {"base", "lora"}: the base from
  base_init, fresh factors (b = 0), the loss of the merged model, the optimizer on the factors."""
  params = transformer_params(seed=2)
  task = train.Task(init=None, loss=lambda p, batch, rng: (jnp.sum(p["lm_head"]["kernel"]), 1.0),
                    batch=lambda step, rows: (), tx=optax.sgd(1.0))
  lora_task = lr.lora_task(task, lambda rng: params, params, 2, 4.0, r"lm_head/kernel$")
  tree = lora_task.init(jax.random.PRNGKey(0))
  assert tree["base"] is params
  (a, b), = lr.factor_pairs(tree["lora"]).values()
  assert a.shape == (D, 2) and not np.any(np.asarray(b))
  tree["lora"] = random_b(tree["lora"])
  (a, b), = lr.factor_pairs(tree["lora"]).values()
  total, _ = lora_task.loss(tree, (), None)
  assert float(total) == pytest.approx(float(jnp.sum(params["lm_head"]["kernel"] + 2.0 * a @ b)),
                                       rel=1e-5)
  grads = jax.grad(lambda t: lora_task.loss(t, (), None)[0])(tree)
  updates, _ = lora_task.tx.update(grads, lora_task.tx.init(tree), tree)
  assert not any(np.any(np.asarray(u)) for u in jax.tree_util.tree_leaves(updates["base"]))
  np.testing.assert_allclose(lr.factor_pairs(updates["lora"])["lm_head/kernel"][1],
                             -lr.factor_pairs(grads["lora"])["lm_head/kernel"][1])


def test_apply_on_wrong_tree_raises():
  params = transformer_params()
  factors = lr.init_lora(jax.random.PRNGKey(0), params, 2)
  with pytest.raises(ValueError, match="params"):
    lr.apply_lora({"lm_head": params["lm_head"]}, factors, 4.0)
