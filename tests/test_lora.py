"""Tests for llm_math.analysis.lora: init, apply/merge, parameter counts and LoRA-only training."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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
  lora = lr.init_lora(jax.random.PRNGKey(0), params, rank=4, alpha=8.0)
  assert set(lora.factors) == {f"block_{i}/attn/{n}/kernel"
                               for i in range(2) for n in ("query", "value")}
  for f in lora.factors.values():
    assert f["a"].shape == (D, 4) and f["b"].shape == (4, H * DH)
    assert not np.any(np.asarray(f["b"]))
    assert 0.5 < float(jnp.std(f["a"])) * np.sqrt(D) < 1.5  # a ~ N(0, 1/in)
  assert lr.lora_scaling(lora, "block_0/attn/query/kernel") == 2.0
  # Independent keys per matrix.
  assert not np.allclose(lora.factors["block_0/attn/query/kernel"]["a"],
                         lora.factors["block_1/attn/query/kernel"]["a"])
  # Only the factors are pytree leaves.
  assert len(jax.tree_util.tree_leaves(lora)) == 8


def test_b_zero_leaves_params_and_outputs_unchanged():
  params = transformer_params()
  lora = lr.init_lora(jax.random.PRNGKey(1), params, 4, 16.0, targets=r"kernel$")
  new = lr.apply_lora(params, lora)
  for path, leaf in cp.flatten_tree(params).items():
    np.testing.assert_array_equal(cp.flatten_tree(new)[path], leaf)
  model = AttnLike()
  x = jax.random.normal(jax.random.PRNGKey(2), (5, D))
  mp = model.init(jax.random.PRNGKey(3), x)["params"]
  ml = lr.init_lora(jax.random.PRNGKey(4), mp, 2, 4.0, targets=r"(query|out)/kernel$",
                    input_axes=((r"^out/kernel$", 2),))
  np.testing.assert_array_equal(model.apply({"params": lr.apply_lora(mp, ml)}, x),
                                model.apply({"params": mp}, x))


def random_b(lora, seed=0):
  """The same LoRA with nonzero b factors (as after training)."""
  leaves, treedef = jax.tree_util.tree_flatten(lora)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [jax.random.normal(k, x.shape) * 0.3 for k, x in zip(keys, leaves)])


def test_delta_is_scaled_low_rank_in_kernel_layout():
  params = transformer_params(seed=1)
  lora = random_b(lr.init_lora(jax.random.PRNGKey(0), params, 3, 6.0,
                               targets=r"attn/(query|out)/kernel$"))
  new = cp.flatten_tree(lr.apply_lora(params, lora))
  old = cp.flatten_tree(params)
  for path, f in lora.factors.items():
    n_in = 2 if "attn/out" in path else 1
    delta = np.asarray(cp.kernel_to_matrix(new[path], n_in) - cp.kernel_to_matrix(old[path], n_in))
    np.testing.assert_allclose(delta, 2.0 * np.asarray(f["a"]) @ np.asarray(f["b"]),
                               rtol=1e-4, atol=1e-5)
    assert np.linalg.matrix_rank(delta, tol=1e-4) == 3
  assert lora.factors["block_0/attn/out/kernel"]["a"].shape == (H * DH, 3)
  assert lora.factors["block_0/attn/out/kernel"]["b"].shape == (3, D)


def test_merged_model_reproduces_unmerged_outputs():
  x = jax.random.normal(jax.random.PRNGKey(0), (7, D))
  # Dense MLP: merged flax apply vs the unmerged side-path computation.
  model = MLP()
  mp = model.init(jax.random.PRNGKey(1), x)["params"]
  ml = random_b(lr.init_lora(jax.random.PRNGKey(2), mp, 2, 3.0, targets=r"kernel$"))
  merged = model.apply({"params": lr.merge_lora(mp, ml)}, x)
  s = 1.5
  fi, fo = ml.factors["fc_in/kernel"], ml.factors["fc_out/kernel"]
  h = nn.gelu(lr.lora_dense(x, mp["fc_in"]["kernel"], fi["a"], fi["b"], s)
              + mp["fc_in"]["bias"][None, :])
  unmerged = (lr.lora_dense(h, mp["fc_out"]["kernel"], fo["a"], fo["b"], s)
              + mp["fc_out"]["bias"][None, :])
  np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5)
  assert not np.allclose(merged, model.apply({"params": mp}, x), atol=1e-3)
  # DenseGeneral with multi-axis kernels.
  model = AttnLike()
  mp = model.init(jax.random.PRNGKey(3), x)["params"]
  # This module's output projection is at 'out/kernel', so its 2 input axes need their own rule.
  ml = random_b(lr.init_lora(jax.random.PRNGKey(4), mp, 2, 2.0, targets=r"kernel$",
                             input_axes=((r"^out/kernel$", 2),)), seed=1)
  assert ml.factors["out/kernel"]["a"].shape == (H * DH, 2)
  merged = model.apply({"params": lr.merge_lora(mp, ml)}, x)
  fq, fo = ml.factors["query/kernel"], ml.factors["out/kernel"]
  q = lr.lora_dense(x, mp["query"]["kernel"].reshape(D, -1), fq["a"], fq["b"], 1.0)
  h = jnp.tanh(q + mp["query"]["bias"].reshape(-1)[None, :])
  unmerged = lr.lora_dense(h, mp["out"]["kernel"].reshape(-1, D), fo["a"], fo["b"], 1.0)
  np.testing.assert_allclose(merged, unmerged + mp["out"]["bias"][None, :], rtol=1e-5, atol=1e-5)


def test_parameter_counts():
  assert lr.lora_reduction(4096, 4096, 8) == 256.0
  params = transformer_params()
  lora = lr.init_lora(jax.random.PRNGKey(0), params, 2, 4.0)
  assert lr.lora_param_count(lora) == 4 * 2 * (D + H * DH)
  assert lr.adapted_param_count(lora) == 4 * D * H * DH
  assert lr.adapted_param_count(lora) / lr.lora_param_count(lora) == lr.lora_reduction(D, H * DH, 2)
  with pytest.raises(ValueError, match="rank"):
    lr.init_lora(jax.random.PRNGKey(0), params, 0, 4.0)
  with pytest.raises(ValueError, match="rank"):
    lr.init_lora(jax.random.PRNGKey(0), params, D + 1, 4.0)
  with pytest.raises(ValueError, match="alpha"):
    lr.init_lora(jax.random.PRNGKey(0), params, 2, 0.0)


def test_training_updates_only_lora_and_reduces_loss():
  """Fine-tune a frozen MLP towards a target that differs from it by a rank-2 change of fc_in."""
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

  lora = lr.init_lora(jax.random.PRNGKey(4), base, rank=2, alpha=2.0, targets=r"fc_in/kernel$")
  before = tree_bits(base)
  # Gradients exist only for the LoRA factors; with b = 0 only b gets a nonzero gradient.
  grads = jax.grad(lr.lora_loss(loss_fn, base))(lora, (x, y))
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(lora)
  assert np.any(np.asarray(grads.factors["fc_in/kernel"]["b"]))
  assert not np.any(np.asarray(grads.factors["fc_in/kernel"]["a"]))

  optimizer = optax.adam(3e-2)
  opt_state = optimizer.init(lora)
  step = lr.make_lora_train_step(loss_fn, optimizer)
  lora0 = lora
  losses = []
  for _ in range(150):
    lora, opt_state, loss = step(lora, opt_state, base, (x, y))
    losses.append(float(loss))
  assert losses[-1] < 0.05 * losses[0]
  # The LoRA factors moved; the frozen base is bit-for-bit what it was.
  assert not np.array_equal(lora.factors["fc_in/kernel"]["a"], lora0.factors["fc_in/kernel"]["a"])
  assert np.any(np.asarray(lora.factors["fc_in/kernel"]["b"]))
  for path, bits in tree_bits(base).items():
    np.testing.assert_array_equal(bits, before[path])
  # Merged weights differ from the base only at the adapted kernel.
  merged = cp.flatten_tree(lr.merge_lora(base, lora))
  for path, bits in before.items():
    if path == "fc_in/kernel":
      assert not np.array_equal(merged[path], bits)
    else:
      np.testing.assert_array_equal(merged[path], bits)


def test_apply_on_wrong_tree_raises():
  params = transformer_params()
  lora = lr.init_lora(jax.random.PRNGKey(0), params, 2, 4.0)
  with pytest.raises(ValueError, match="params"):
    lr.apply_lora({"lm_head": params["lm_head"]}, lora)
