"""The Transformer: causality, attention probabilities, positions, logical axes, FLOP count."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_math import flops
from llm_math import model as model_lib

T = 12


def _init(**kw):
  cfg = model_lib.ModelConfig(**{**dict(vocab_size=T, max_len=T, num_layers=2, num_heads=2,
                                        d_model=16, d_ff=32), **kw})
  m = model_lib.Transformer(cfg)
  params = nn.meta.unbox(m.init(jax.random.PRNGKey(0), jnp.zeros((1, T), jnp.int32)))["params"]
  return m, params


def _input_gradient_norms(m, params, t):
  """|d logits[t] / d input[s]| for s = 0..T-1.

  Position s reads embedding row s (tokens = 0..T-1, each once), so the gradient with respect to
  row s of the (untied) embedding table is the gradient with respect to the input at position s.
  """
  tokens = jnp.arange(T)[None, :]

  def out(embedding):
    p = {**params, "token_embed": {"embedding": embedding}}
    return jnp.sum(m.apply({"params": p}, tokens)[0, t] ** 2)

  g_TxD = jax.grad(out)(params["token_embed"]["embedding"])
  return np.abs(np.asarray(g_TxD)).sum(axis=1)


@pytest.mark.parametrize("pos", model_lib.POS_ENCODINGS)
def test_causality_through_gradients(pos):
  m, params = _init(pos_encoding=pos)
  for t in (0, 5, T - 1):
    norms = _input_gradient_norms(m, params, t)
    np.testing.assert_array_equal(norms[t + 1:], 0.0)
    assert np.all(norms[: t + 1] > 0.0), (t, norms)


def test_bidirectional_sees_the_future():
  m, params = _init(causal=False)
  norms = _input_gradient_norms(m, params, 0)
  assert np.all(norms > 0.0)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_rows_sum_to_one(causal):
  m, params = _init(causal=causal, num_layers=3)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (4, T), 0, T)
  logits, state = m.apply({"params": params}, tokens, mutable=["intermediates"])
  a = np.asarray(model_lib.attention_probs(state["intermediates"]))
  assert a.shape == (3, 4, 2, T, T)
  # Each layer sowed exactly one [B, H, T, T] array, and the stack keeps the layers in order.
  for i in range(3):
    sown = state["intermediates"][f"block_{i}"]["attn"]["attention_probs"]
    assert len(sown) == 1 and sown[0].shape == (4, 2, T, T)
    np.testing.assert_array_equal(a[i], sown[0])
  np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-6)
  assert np.all(a >= 0)
  upper = np.triu(np.ones((T, T), bool), k=1)
  if causal:
    np.testing.assert_array_equal(a[..., upper], 0.0)
  else:
    assert np.all(a[..., upper] > 0)
  # Asking for the probabilities does not change the logits.
  np.testing.assert_allclose(logits, m.apply({"params": params}, tokens), rtol=1e-6)


def test_every_kernel_has_logical_axis_names():
  cfg = model_lib.ModelConfig(vocab_size=T, max_len=T, num_layers=1, num_heads=2, d_model=16, d_ff=32)
  boxed = model_lib.Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, T), jnp.int32))
  specs = nn.get_partition_spec(boxed)["params"]
  flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, tuple))[0]
  names = {jax.tree_util.keystr(k): tuple(v) for k, v in flat}
  assert names["['block_0']['attn']['query']['kernel']"] == ("embed", "heads", "kv")
  assert names["['block_0']['attn']['out']['kernel']"] == ("heads", "kv", "embed")
  assert names["['block_0']['mlp']['fc_in']['kernel']"] == ("embed", "mlp")
  assert names["['token_embed']['embedding']"] == ("vocab", "embed")
  assert names["['lm_head']['kernel']"] == ("embed", "vocab")
  # Every parameter: one name per dimension, and each named dimension has the size its name means.
  sizes = {"vocab": T, "embed": 16, "heads": 2, "kv": 8, "mlp": 32}
  shapes = {jax.tree_util.keystr(k): v.shape
            for k, v in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(boxed)["params"])[0]}
  assert set(names) == set(shapes) and len(names) == 21
  for path, axes in names.items():
    assert len(axes) == len(shapes[path]), path
    for axis, size in zip(axes, shapes[path]):
      assert (axis is None and path == "['pos_embed']['embedding']") or sizes[axis] == size, path


@pytest.mark.parametrize("tie", [False, True])
def test_param_count_and_flops_formula(tie):
  cfg = model_lib.ModelConfig(vocab_size=50, max_len=T, num_layers=2, num_heads=4, d_model=32,
                              d_ff=128, tie_embeddings=tie)
  _, params = (model_lib.Transformer(cfg), nn.meta.unbox(model_lib.Transformer(cfg).init(
      jax.random.PRNGKey(0), jnp.zeros((1, T), jnp.int32)))["params"])
  d, f, v, l = 32, 128, 50, 2
  per_block = 4 * d * d + 4 * d + 2 * d * f + f + d + 2 * 2 * d  # attn + mlp + 2 LayerNorms
  expected = v * d + T * d + l * per_block + 2 * d + (0 if tie else d * v)
  assert flops.count_params(params) == expected
  n_matmul = expected - T * d - (0 if tie else v * d)  # lookups excluded; the head counted once
  assert flops.flops_per_token(cfg, expected) == 6 * n_matmul + 12 * l * T * d
  assert flops.flops_per_token(cfg, expected, causal_attention_flops_halved=True) == (
      6 * n_matmul + 6 * l * T * d)


def test_dtype_bfloat16_keeps_fp32_params_and_logits():
  m, params = _init(dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  logits = m.apply({"params": params}, jnp.zeros((1, T), jnp.int32))
  assert logits.dtype == jnp.float32
  m32, _ = _init()
  np.testing.assert_allclose(logits, m32.apply({"params": params}, jnp.zeros((1, T), jnp.int32)),
                             atol=0.05)


def test_sinusoidal_positions_closed_form():
  pe = np.asarray(model_lib.sinusoidal_positions(7, 8))
  t, i = 5, 2
  np.testing.assert_allclose(pe[t, 2 * i], np.sin(t / 10000 ** (2 * i / 8)), rtol=1e-5)
  np.testing.assert_allclose(pe[t, 2 * i + 1], np.cos(t / 10000 ** (2 * i / 8)), rtol=1e-5)


def test_rotary_scores_depend_only_on_relative_position():
  key_q, key_k = jax.random.split(jax.random.PRNGKey(3))
  q = jax.random.normal(key_q, (1, 1, 1, 8))
  k = jax.random.normal(key_k, (1, 1, 1, 8))
  score = lambda tq, tk: float(jnp.sum(model_lib.apply_rotary(q, jnp.array([[tq]]))
                                       * model_lib.apply_rotary(k, jnp.array([[tk]]))))
  np.testing.assert_allclose(score(7, 3), score(14, 10), rtol=1e-4)
  assert abs(score(7, 3) - score(7, 5)) > 1e-4


def test_bad_model_config_is_a_clear_error():
  with pytest.raises(ValueError, match="divisible by num_heads"):
    model_lib.ModelConfig(vocab_size=5, max_len=4, d_model=10, num_heads=3)
  with pytest.raises(ValueError, match="pos_encoding"):
    model_lib.ModelConfig(vocab_size=5, max_len=4, pos_encoding="alibi")


@pytest.mark.parametrize("pos", model_lib.POS_ENCODINGS)
def test_decode_with_cache_matches_full_forward(pos):
  """Prefill 5 tokens, then feed one token at a time: logits equal the uncached model's."""
  m, params = _init(pos_encoding=pos)
  tokens = jax.random.randint(jax.random.PRNGKey(4), (2, T), 0, T)
  full = m.apply({"params": params}, tokens)
  dec = model_lib.Transformer(m.config.__class__(**{**m.config.__dict__, "decode": True}))
  cache = dec.init(jax.random.PRNGKey(0), tokens)["cache"]
  pos_BxT = jnp.broadcast_to(jnp.arange(T)[None], (2, T))
  logits, state = dec.apply({"params": params, "cache": cache}, tokens[:, :5],
                            positions_BxT=pos_BxT[:, :5], mutable=["cache"])
  outs = [logits]
  for t in range(5, T):
    logits, state = dec.apply({"params": params, "cache": state["cache"]}, tokens[:, t:t + 1],
                              positions_BxT=pos_BxT[:, t:t + 1], mutable=["cache"])
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5)


def _gelu64(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _attention64(x_TxD, p):
  """Causal multi-head attention in float64 numpy from the params of one 'attn' module."""
  proj = lambda name: (np.einsum("td,dhk->thk", x_TxD, p[name]["kernel"]) + p[name]["bias"])
  q, k, v = proj("query"), proj("key"), proj("value")
  scores_HxTxS = np.einsum("thk,shk->hts", q, k) / math.sqrt(q.shape[-1])
  scores_HxTxS[:, np.triu(np.ones((len(x_TxD),) * 2, bool), k=1)] = -np.inf
  probs = np.exp(scores_HxTxS - scores_HxTxS.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out_TxHxK = np.einsum("hts,shk->thk", probs, v)
  return np.einsum("thk,hkd->td", out_TxHxK, p["out"]["kernel"]) + p["out"]["bias"]


@pytest.mark.parametrize("residual,mlp",
                         [(False, False), (True, False), (False, True), (True, True)])
def test_ablated_blocks_compute_the_sublayers_without_the_skip(residual, mlp):
  """Each block's output stream against a float64 hand computation from the same parameters:
  x = [x +] Attn(x), then x = [x +] FFN(x) (no LayerNorm), the skip term present only with
  residual."""
  m, params = _init(residual=residual, mlp=mlp, layernorm=False)
  block = params["block_0"]
  assert ("mlp" in block) == mlp and "ln_attn" not in block and "ln_final" not in params
  # Random parameters of unit-ish scale, so that the skip term and the sub-layers are comparable.
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_unflatten(
      treedef, [jnp.asarray(0.5 * rng.standard_normal(x.shape), jnp.float32) for x in leaves])
  p64 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (2, T), 0, T))
  logits, state = m.apply({"params": params}, jnp.asarray(tokens), mutable=["intermediates"])
  streams = np.asarray(model_lib.residual_streams(state["intermediates"]))
  for b in range(2):
    x = p64["token_embed"]["embedding"][tokens[b]] + p64["pos_embed"]["embedding"][:T]
    for i in range(2):
      pb = p64[f"block_{i}"]
      x = (x if residual else 0.0) + _attention64(x, pb["attn"])
      if mlp:
        fc_in, fc_out = pb["mlp"]["fc_in"], pb["mlp"]["fc_out"]
        hidden = _gelu64(x @ fc_in["kernel"] + fc_in["bias"])
        x = (x if residual else 0.0) + hidden @ fc_out["kernel"] + fc_out["bias"]
      np.testing.assert_allclose(streams[i, b], x, rtol=1e-4, atol=1e-4 * np.abs(x).max())
    expected = x @ p64["lm_head"]["kernel"]
    np.testing.assert_allclose(logits[b], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("mlp", [False, True])
def test_without_the_skip_a_silenced_last_block_forgets_the_input(mlp):
  """Zero the kernels projecting the last block's sub-layers into the stream (attention out, and the
  MLP's fc_out): without skip connections the logits then no longer depend on the tokens or the
  position at all (only the biases reach the output); with skip connections they still do."""
  tokens = jax.random.randint(jax.random.PRNGKey(6), (3, T), 0, T)
  spread = {}
  for residual in (False, True):
    m, params = _init(residual=residual, mlp=mlp, layernorm=False)
    last = params["block_1"]
    last = {**last, "attn": {**last["attn"], "out": {
        "kernel": jnp.zeros_like(last["attn"]["out"]["kernel"]),
        "bias": jnp.full_like(last["attn"]["out"]["bias"], 0.3)}}}
    if mlp:
      fc_out = last["mlp"]["fc_out"]
      last["mlp"] = {**last["mlp"],
                     "fc_out": {**fc_out, "kernel": jnp.zeros_like(fc_out["kernel"])}}
    logits = np.asarray(m.apply({"params": {**params, "block_1": last}}, tokens))
    spread[residual] = np.abs(logits - logits[:1, :1]).max()
  assert spread[False] == 0.0
  assert spread[True] > 1e-3


@pytest.mark.parametrize("causal", [True, False])
def test_fused_attention_and_remat_match_the_explicit_model(causal):
  m, params = _init(causal=causal)
  tokens = jax.random.randint(jax.random.PRNGKey(5), (2, T), 0, T)
  ref = m.apply({"params": params}, tokens)
  for kw in (dict(attention_impl="fused"), dict(remat=True)):
    other = model_lib.Transformer(m.config.__class__(**{**m.config.__dict__, **kw}))
    np.testing.assert_allclose(other.apply({"params": params}, tokens), ref, atol=2e-5)
    loss = lambda p, mm: jnp.mean(mm.apply({"params": p}, tokens) ** 2)
    g_ref, g = jax.grad(loss)(params, m), jax.grad(loss)(params, other)
    for a, b in zip(jax.tree_util.tree_leaves(g_ref), jax.tree_util.tree_leaves(g)):
      np.testing.assert_allclose(a, b, atol=2e-5)


def test_gelu_is_the_exact_gelu_with_its_derivative():
  """x Phi(x) against float64 closed forms: value, and derivative Phi(x) + x phi(x) through autodiff."""
  x = np.linspace(-8.0, 8.0, 4001)
  phi = np.exp(-x**2 / 2) / np.sqrt(2 * np.pi)
  cdf = 0.5 * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))
  x32 = jnp.asarray(x, jnp.float32)
  np.testing.assert_allclose(model_lib.gelu(x32), x * cdf, atol=3e-6)
  np.testing.assert_allclose(jax.vmap(jax.grad(model_lib.gelu))(x32), cdf + x * phi, atol=3e-6)
  np.testing.assert_allclose(model_lib.gelu(x32), jax.nn.gelu(x32, approximate=False), atol=3e-6)


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_cross_entropy_matches_the_full_logits(tie):
  """Loss and every parameter gradient through the chunked output projection equal the plain ones."""
  m, params = _init(tie_embeddings=tie)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (3, T + 1), 0, T)
  x, y = tokens[:, :-1], tokens[:, 1:]

  def full(p):
    nll, count = model_lib.cross_entropy(m.apply({"params": p}, x), y)
    return nll / count

  def chunked(p):
    hidden = m.apply({"params": p}, x, return_hidden=True)
    nll, count = model_lib.chunked_cross_entropy(hidden, model_lib.output_kernel(p), y, chunk=4)
    return nll / count

  (l_full, g_full), (l_chunk, g_chunk) = jax.value_and_grad(full)(params), jax.value_and_grad(
      chunked)(params)
  np.testing.assert_allclose(l_chunk, l_full, rtol=1e-6)
  assert ("lm_head" in params) != tie
  for a, b in zip(jax.tree_util.tree_leaves(g_chunk), jax.tree_util.tree_leaves(g_full)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="divide the sequence length 12"):
    model_lib.chunked_cross_entropy(jnp.zeros((1, T, 16)), jnp.zeros((16, T)), y[:1], chunk=5)


# The training-stability knobs, all on (QK-norm adds per-layer parameters that scan stacks).
_KNOBS = dict(qk_norm=True, attn_logit_softcap=2.0, logit_softcap=3.0)


@pytest.mark.parametrize("remat,knobs", [(False, {}), ("full", {}), ("dots_saveable", {}),
                                         (False, _KNOBS), ("dots_saveable", _KNOBS)])
def test_scanned_blocks_match_the_unrolled_model(remat, knobs):
  """nn.scan over stacked blocks computes the unrolled model: the same logits, loss and gradients
  (1e-6) from the same parameters, moved between the layouts by `stacked` / `unrolled`; and the
  sown attention probabilities come out per layer as before. With the stability knobs on too, the
  QK-norm scales stacked to [L, K] with axes ('layers', 'kv')."""
  base = dict(vocab_size=11, max_len=8, num_layers=3, num_heads=2, d_model=16, d_ff=32,
              pos_encoding="rotary", remat=remat, **knobs)
  unrolled_model = model_lib.Transformer(model_lib.ModelConfig(**base))
  scanned_model = model_lib.Transformer(model_lib.ModelConfig(**base, scan_layers=True))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 11)
  targets = jnp.roll(tokens, -1, axis=1)
  params = unrolled_model.init(jax.random.PRNGKey(0), tokens)["params"]
  params = nn.meta.unbox(params)
  stacked = model_lib.stacked(params)
  assert "blocks" in stacked and not any(k.startswith("block_") for k in stacked)
  assert stacked["blocks"]["block"]["attn"]["query"]["kernel"].shape == (3, 16, 2, 8)
  jax.tree_util.tree_map(np.testing.assert_array_equal, model_lib.unrolled(stacked), params)
  # The scanned model initializes the same tree (its layout) with the 'layers' axis named.
  boxed = jax.eval_shape(lambda r: scanned_model.init(r, tokens)["params"], jax.random.PRNGKey(0))
  assert jax.tree_util.tree_structure(nn.meta.unbox(boxed)) == jax.tree_util.tree_structure(stacked)
  spec = nn.get_partition_spec(boxed)["blocks"]["block"]["mlp"]["fc_in"]["kernel"]
  assert tuple(spec) == ("layers", "embed", "mlp")
  if knobs:
    norm_spec = nn.get_partition_spec(boxed)["blocks"]["block"]["attn"]["key_norm"]["norm"]
    assert tuple(norm_spec["scale"]) == ("layers", "kv")
    assert stacked["blocks"]["block"]["attn"]["query_norm"]["norm"]["scale"].shape == (3, 8)
    # Random scales, different in every layer, so that a mix-up of the layers' norms would show.
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
        if "_norm'" in jax.tree_util.keystr(path) else x, params)
    stacked = model_lib.stacked(params)

  def loss(model, p):
    return model_lib.cross_entropy(model.apply({"params": p}, tokens), targets)[0] / targets.size

  l_u, g_u = jax.value_and_grad(lambda p: loss(unrolled_model, p))(params)
  l_s, g_s = jax.value_and_grad(lambda p: loss(scanned_model, p))(stacked)
  np.testing.assert_allclose(l_s, l_u, rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                         model_lib.unrolled(g_s), g_u)
  _, state_u = unrolled_model.apply({"params": params}, tokens, mutable=["intermediates"])
  _, state_s = scanned_model.apply({"params": stacked}, tokens, mutable=["intermediates"])
  np.testing.assert_allclose(model_lib.attention_probs(state_s["intermediates"]),
                             model_lib.attention_probs(state_u["intermediates"]), rtol=1e-6,
                             atol=1e-7)
