"""Fused attention: which kernel it picks (cuDNN or XLA), and that it trains with dropout on."""
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_math import model as model_lib

T = 12


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("head_dim", [8, 64, 128])
def test_cudnn_on_a_cuda_gpu_for_half_precision_and_supported_head_dims(dtype, head_dim):
  assert model_lib.fused_attention_implementation("gpu", dtype, head_dim) == "cudnn"
  assert model_lib.fused_attention_implementation("gpu", dtype, head_dim, "9.0") == "cudnn"
  assert model_lib.fused_attention_implementation("gpu", dtype, head_dim, "8.0") == "cudnn"


@pytest.mark.parametrize("platform,dtype,head_dim,capability", [
    ("cpu", jnp.bfloat16, 64, None),
    ("cpu", jnp.float16, 64, None),
    ("cpu", jnp.float32, 64, None),
    ("tpu", jnp.bfloat16, 64, None),
    ("rocm", jnp.bfloat16, 64, None),
    ("gpu", jnp.float32, 64, None),          # cuDNN flash attention takes fp16/bf16 only
    ("gpu", jnp.bfloat16, 60, None),         # not a multiple of 8
    ("gpu", jnp.bfloat16, 4, None),
    ("gpu", jnp.bfloat16, 136, None),        # above 128 (jax allows 256 from Hopper on)
    ("gpu", jnp.bfloat16, 256, "9.0"),
    ("gpu", jnp.bfloat16, 64, "7.0"),        # Volta: no cuDNN flash attention
])
def test_xla_everywhere_else(platform, dtype, head_dim, capability):
  assert model_lib.fused_attention_implementation(platform, dtype, head_dim, capability) == "xla"


def test_default_platform_on_this_machine():
  platform, _ = model_lib.default_platform()
  assert platform == jax.devices()[0].platform == "cpu"


def _config(**kw):
  return model_lib.ModelConfig(**{**dict(vocab_size=T, max_len=T, num_layers=2, num_heads=2,
                                         d_model=16, d_ff=32), **kw})


def _init(cfg):
  m = model_lib.Transformer(cfg)
  return m, nn.meta.unbox(m.init(jax.random.PRNGKey(0), jnp.zeros((1, T), jnp.int32)))["params"]


def _spy():
  return mock.patch.object(jax.nn, "dot_product_attention", wraps=jax.nn.dot_product_attention)


@pytest.mark.parametrize("causal", [True, False])
def test_fused_equals_explicit_in_float32_on_cpu(causal):
  """Without dropout (or in evaluation) both paths compute the same function."""
  explicit, params = _init(_config(causal=causal, dropout_rate=0.1))
  fused = model_lib.Transformer(_config(causal=causal, dropout_rate=0.1, attention_impl="fused"))
  tokens = jax.random.randint(jax.random.PRNGKey(5), (3, T), 0, T)
  with _spy() as spy:
    out = jax.jit(fused.apply)({"params": params}, tokens)
  np.testing.assert_allclose(out, jax.jit(explicit.apply)({"params": params}, tokens), rtol=1e-5,
                             atol=1e-6)
  assert spy.call_count == 2  # one call per layer
  assert all(c.kwargs["implementation"] == "xla" for c in spy.call_args_list)


def test_fused_attention_trains_with_dropout():
  """dropout_rate > 0, deterministic=False: the fused kernel is taken (no attention probabilities
  are formed or dropped), residual dropout still acts, and loss and gradients are finite."""
  m, params = _init(_config(dropout_rate=0.3, attention_impl="fused"))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, T + 1), 0, T)
  x, y = tokens[:, :-1], tokens[:, 1:]

  def loss(p, key):
    logits, state = m.apply({"params": p}, x, deterministic=False, rngs={"dropout": key},
                            mutable=["intermediates"])
    nll, count = model_lib.cross_entropy(logits, y)
    return nll / count, state["intermediates"]

  loss_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  with _spy() as spy:
    (value, intermediates), grads = loss_and_grad(params, jax.random.PRNGKey(2))
  assert spy.call_count == 2
  assert all(c.kwargs["implementation"] == "xla" for c in spy.call_args_list)
  # Intermediates were collected, but no attention probabilities were formed.
  assert "residual" in intermediates["block_0"]
  assert "attention_probs" not in intermediates["block_0"].get("attn", {})
  assert np.isfinite(float(value))
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
  assert any(np.any(np.asarray(g) != 0) for g in leaves)
  # Residual/MLP dropout is still on: another key gives another loss, evaluation a third.
  (other, _), _ = loss_and_grad(params, jax.random.PRNGKey(3))
  nll, count = model_lib.cross_entropy(jax.jit(m.apply)({"params": params}, x), y)
  assert len({float(value), float(other), float(nll / count)}) == 3


def test_explicit_path_is_kept_in_training_with_dropout():
  """attention_impl='explicit' with dropout: no fused kernel, the probabilities are sown."""
  m, params = _init(_config(dropout_rate=0.5))
  tokens = jax.random.randint(jax.random.PRNGKey(4), (2, T), 0, T)
  apply = jax.jit(m.apply, static_argnames=("deterministic", "mutable"))
  with _spy() as spy:
    _, state = apply({"params": params}, tokens, deterministic=False,
                     rngs={"dropout": jax.random.PRNGKey(0)}, mutable=("intermediates",))
  assert spy.call_count == 0
  assert model_lib.attention_probs(state["intermediates"]).shape == (2, 2, 2, T, T)


def test_decoding_takes_the_explicit_path_with_fused_attention():
  cfg = _config(attention_impl="fused", decode=True)
  m = model_lib.Transformer(cfg)
  tokens = jnp.zeros((1, 1), jnp.int32)
  with _spy() as spy:
    variables = m.init(jax.random.PRNGKey(0), tokens)
    m.apply(variables, tokens, positions_BxT=jnp.zeros((1, 1), jnp.int32), mutable=["cache"])
  assert spy.call_count == 0


def test_the_chosen_path_is_logged_once():
  m, params = _init(_config(attention_impl="fused"))
  model_lib._LOGGED_ATTENTION_PATHS.clear()  # pylint: disable=protected-access
  tokens = jnp.zeros((1, T), jnp.int32)
  with mock.patch.object(model_lib.logging, "info") as info:
    m.apply({"params": params}, tokens)
    m.apply({"params": params}, tokens)
  assert info.call_count == 1
  assert info.call_args.args[1:] == ("xla", "cpu", "float32", 8)
