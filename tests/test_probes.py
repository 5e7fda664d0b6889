"""Tests for llm_math.probes: a Transformer's attention, residual streams and query-key weights,
read from the model and checked against the same quantities computed by hand."""
import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_math import model as model_lib
from llm_math import probes
from llm_math.analysis import spectra


def _model(**overrides):
  """(ModelConfig, unboxed params) of a small Transformer with sharp attention (init_std 0.5)."""
  fields = dict(vocab_size=11, max_len=8, num_layers=2, num_heads=2, d_model=16, d_ff=32,
                init_std=0.5, pos_encoding="learned")
  mcfg = model_lib.ModelConfig(**{**fields, **overrides})
  boxed = model_lib.Transformer(mcfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  return mcfg, jax.device_get(nn.meta.unbox(boxed["params"]))


def _layer_norm(x, norm):
  x = np.asarray(x, np.float64)
  centred = x - x.mean(-1, keepdims=True)
  return centred / np.sqrt(centred.var(-1, keepdims=True) + 1e-5) * norm["scale"] + norm["bias"]


_TOKENS = np.random.default_rng(0).integers(0, 11, size=(3, 8)).astype(np.int32)


@pytest.mark.parametrize("causal", [True, False])
def test_model_internals_match_the_model_computed_by_hand(causal):
  """Layer 0's attention from LN(embeddings) through W_Q, W_K (`attention_probs`), and the logits
  from the last residual stream, against the model's own forward pass."""
  mcfg, params = _model(causal=causal)
  a, x, ln = jax.device_get(probes.model_internals(mcfg)(params, _TOKENS))
  assert a.shape == (2, 3, 2, 8, 8) and x.shape == ln.shape == (2, 3, 8, 16)
  block = params["block_0"]
  ln0 = _layer_norm(probes.embedding_output(params, mcfg, _TOKENS), block["ln_attn"]["norm"])
  np.testing.assert_allclose(ln[0], ln0, atol=1e-4)
  attn = block["attn"]
  qk = lambda w: np.einsum("btd,dhk->bhtk", ln0, attn[w]["kernel"]) + attn[w]["bias"][:, None]
  np.testing.assert_allclose(a[0], spectra.attention_probs(qk("query"), qk("key"), causal=causal),
                             atol=1e-5)
  assert np.all(spectra.is_lower_triangular(a) == causal)
  logits = _layer_norm(x[-1], params["ln_final"]["norm"]) @ params["lm_head"]["kernel"]
  np.testing.assert_allclose(model_lib.Transformer(mcfg).apply({"params": params}, _TOKENS), logits,
                             atol=1e-3)


def test_snapshot_analysis_of_a_model_and_its_entropy_bound():
  mcfg, params = _model()
  scalars, arrays = probes.analyse_snapshot(params, mcfg, _TOKENS)
  assert set(scalars) == set(probes.HEAD_STATISTICS) | {"qk_norm", "zhai_bound", "zhai_slack_min"}
  json.dumps(scalars, allow_nan=False)
  a, _, _ = jax.device_get(probes.model_internals(mcfg)(params, _TOKENS))
  np.testing.assert_array_equal(arrays["attention"], a[:, 0])  # window 0, [L, H, T, T]
  np.testing.assert_allclose(arrays["eigenvalues"].real,  # causal: the sorted diagonal
                             -np.sort(-np.diagonal(a[:, 0], axis1=-2, axis2=-1), axis=-1))
  entropy_LxH = spectra.row_entropy(a).mean(axis=(1, 3))
  np.testing.assert_allclose(scalars["mean_row_entropy"], entropy_LxH, rtol=1e-12)
  # sigma against the explicit D x D product; the bound below the entropy on every row.
  for l in range(2):
    attn = params[f"block_{l}"]["attn"]
    for h in range(2):
      product = attn["query"]["kernel"][:, h] @ attn["key"]["kernel"][:, h].T
      assert scalars["qk_norm"][l][h] == pytest.approx(np.linalg.norm(product, 2) / np.sqrt(8),
                                                       rel=1e-5)
  assert scalars["zhai_slack_min"] >= -1e-5
  assert np.all(np.asarray(scalars["zhai_bound"]) <= entropy_LxH + 1e-5)
  rotary, params = _model(pos_encoding="rotary")
  scalars, _ = probes.analyse_snapshot(params, rotary, _TOKENS)
  assert scalars["zhai_bound"] is None and scalars["zhai_slack_min"] is None
  assert len(scalars["qk_norm"]) == 2


def test_a_scanned_models_snapshot_and_profile_are_its_unrolled_twins():
  """A run trained with scan_layers (params['blocks'], stacked) is analysed layer by layer: the
  same statistics as the same weights unrolled."""
  mcfg, params = _model()
  scanned = dataclasses.replace(mcfg, scan_layers=True)
  stacked = model_lib.stacked(params)
  for (a, arrays_a), (b, arrays_b) in [(probes.analyse_snapshot(stacked, scanned, _TOKENS),
                                        probes.analyse_snapshot(params, mcfg, _TOKENS))]:
    np.testing.assert_allclose(a["mean_row_entropy"], b["mean_row_entropy"], rtol=1e-5)
    np.testing.assert_allclose(a["qk_norm"], b["qk_norm"], rtol=1e-6)
    np.testing.assert_allclose(arrays_a["attention"], arrays_b["attention"], atol=1e-6)
  np.testing.assert_allclose(probes.residual_profile(stacked, scanned, _TOKENS)["fro"],
                             probes.residual_profile(params, mcfg, _TOKENS)["fro"], rtol=1e-5)


def test_residual_profile_of_identity_blocks_stays_at_the_embeddings():
  """With the attention output zeroed, x + Attn(x) = x: every layer has the embeddings' residual."""
  mcfg, params = _model(mlp=False, layernorm=False)
  for l in range(2):
    out = params[f"block_{l}"]["attn"]["out"]
    out["kernel"], out["bias"] = np.zeros_like(out["kernel"]), np.zeros_like(out["bias"])
  profile = probes.residual_profile(params, mcfg, _TOKENS)
  x0 = probes.embedding_output(params, mcfg, _TOKENS)
  np.testing.assert_allclose(profile["fro"], np.mean(spectra.relative_residual(x0)), rtol=1e-6)
  np.testing.assert_allclose(profile["rms"], np.sqrt(np.mean(x0 ** 2)), rtol=1e-6)
  assert len(profile["normalized_entropy"]) == 2 and len(profile["composite"]) == 3
  assert profile["fro_min"][0] <= profile["fro"][0] <= profile["fro_max"][0]


def test_restrict_params_cuts_an_ablated_model_from_the_full_draw():
  mcfg, _ = _model()
  full = model_lib.Transformer(mcfg).init(jax.random.PRNGKey(3), _TOKENS)["params"]
  pure = dataclasses.replace(mcfg, residual=False, mlp=False, layernorm=False)
  like = jax.eval_shape(model_lib.Transformer(pure).init, jax.random.PRNGKey(0), _TOKENS)["params"]
  cut = probes.restrict_params(full, like)
  assert set(cut["block_0"]) == {"attn"} and "ln_final" not in cut
  assert cut["block_1"]["attn"]["query"]["kernel"] is full["block_1"]["attn"]["query"]["kernel"]
  logits = model_lib.Transformer(pure).apply({"params": nn.meta.unbox(cut)}, _TOKENS)
  assert logits.shape == (3, 8, 11)
  wider, _ = _model(d_model=8)
  wide_like = jax.eval_shape(model_lib.Transformer(wider).init, jax.random.PRNGKey(0), _TOKENS)
  with pytest.raises(ValueError, match=r"params/block_0/\S+: shape \(\d+, 8\), the model expects"):
    probes.restrict_params(full, wide_like["params"])
  with pytest.raises(ValueError, match="lacks"):
    probes.restrict_params(cut, like | {"extra": {}})
