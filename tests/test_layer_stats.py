"""Per-layer statistics of a training step (`llm_math.layer_stats`) against the model's own tensors,
and the log-spaced snapshot schedule (config.checkpoint_schedule='log')."""
import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_math import checkpoint
from llm_math import layer_stats
from llm_math import model as model_lib
from llm_math import summaries
from llm_math import train as train_lib
from tests import helpers

_CFG = model_lib.ModelConfig(vocab_size=37, max_len=8, num_layers=3, num_heads=2, d_model=16,
                             d_ff=32)
_TOKENS = np.random.default_rng(0).integers(0, 37, size=(3, 8))


def _params(scale: float = 1.0):
  params = nn.unbox(model_lib.Transformer(_CFG).init(jax.random.PRNGKey(1), _TOKENS)["params"])
  return jax.tree_util.tree_map(lambda x: x * scale, params)


def test_group_rms_and_the_update_ratio_are_their_definitions():
  old = {"block_0": {"attn": {"query": {"kernel": jnp.full((2, 3), 2.0)}},
                     "mlp": {"fc_in": {"kernel": jnp.ones((4,)), "bias": jnp.zeros((4,))}}},
         "lm_head": {"kernel": jnp.array([3.0, 4.0])}}
  new = jax.tree_util.tree_map(lambda x: x * 1.5, old)
  grads = jax.tree_util.tree_map(jnp.ones_like, old)
  out = {k: float(v) for k, v in layer_stats.step_stats(old, grads, new).items()}
  assert out["rms_param/block_0/attn"] == pytest.approx(3.0)
  assert out["rms_param/block_0/mlp"] == pytest.approx(1.5 * np.sqrt(4 / 8))  # ones and zeros
  assert out["rms_param/lm_head"] == pytest.approx(1.5 * np.sqrt(12.5))
  assert out["rms_grad/block_0/mlp"] == pytest.approx(1.0)
  assert out["rms_update/block_0/attn"] == pytest.approx(1.0)
  assert out["update_ratio/lm_head"] == pytest.approx(0.5 / 1.5)
  assert all(layer_stats.is_layer_stat(k) for k in out)
  assert not any(layer_stats.is_layer_stat(k) for k in ("loss", "grad_norm", "z_loss"))


def test_forward_stats_are_the_models_attention_and_logits():
  """Entropy per block from the sown attention probabilities, the max attention logit from the
  queries and keys by hand, log Z and the max logit from the model's logits; chunked = whole."""
  params = _params(scale=3.0)
  model = model_lib.Transformer(_CFG)
  stats = {k: float(v) for k, v in layer_stats.forward_stats(model)(params, (_TOKENS,)).items()}
  chunked = layer_stats.forward_stats(model, loss_chunk=2)(params, (_TOKENS,))
  for k in ("output_logit_max", "log_z_mean", "log_z_sq_mean"):
    assert float(chunked[k]) == pytest.approx(stats[k], rel=1e-5)
  logits, state = model.apply({"params": params}, _TOKENS, mutable=["intermediates"])
  probs = np.asarray(model_lib.attention_probs(state["intermediates"]), np.float64)
  entropy = -np.sum(np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1)), 0), -1)
  for l in range(_CFG.num_layers):
    assert stats[f"attn_entropy/block_{l}"] == pytest.approx(entropy[l].mean(), rel=1e-5)
  log_z = jax.nn.logsumexp(np.asarray(logits, np.float64), axis=-1)
  assert stats["log_z_mean"] == pytest.approx(float(log_z.mean()), rel=1e-5)
  assert stats["log_z_sq_mean"] == pytest.approx(float((log_z ** 2).mean()), rel=1e-5)
  assert stats["output_logit_max"] == pytest.approx(float(np.max(logits)), rel=1e-5)
  # Layer 0's largest logit over visible keys, from LN(embeddings) through W_Q and W_K.
  x = np.asarray(params["token_embed"]["embedding"])[_TOKENS] + np.asarray(
      params["pos_embed"]["embedding"])[:8][None]
  norm = params["block_0"]["ln_attn"]["norm"]
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  ln = (x - mu) / np.sqrt(var + 1e-5) * np.asarray(norm["scale"]) + np.asarray(norm["bias"])
  attn = params["block_0"]["attn"]
  qk = lambda w: np.einsum("btd,dhk->bhtk", ln, attn[w]["kernel"]) + np.asarray(attn[w]["bias"])[:, None]
  a = np.einsum("bhtk,bhsk->bhts", qk("query"), qk("key")) / np.sqrt(_CFG.head_dim)
  visible = np.tril(np.ones((8, 8), bool))
  assert stats["attn_logit_max/block_0"] == pytest.approx(a[..., visible].max(), rel=1e-4)


def test_a_scanned_models_stats_are_the_unrolled_models():
  params = _params()
  scanned = dataclasses.replace(_CFG, scan_layers=True)
  a = layer_stats.forward_stats(model_lib.Transformer(_CFG))(params, (_TOKENS,))
  b = layer_stats.forward_stats(model_lib.Transformer(scanned))(model_lib.stacked(params),
                                                                 (_TOKENS,))
  assert set(a) == set(b)
  for k in a:
    assert float(b[k]) == pytest.approx(float(a[k]), rel=1e-5), k
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  assert set(layer_stats.step_stats(params, grads, params)) == set(
      layer_stats.step_stats(model_lib.stacked(params), model_lib.stacked(grads),
                             model_lib.stacked(params)))


def test_log_spaced_schedule_is_pythias():
  assert [s for s in range(3001) if checkpoint.log_spaced(s, 1000)] == [
      0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 3000]
  assert [s for s in range(65) if checkpoint.log_spaced(s, 64)] == [0, 1, 2, 4, 8, 16, 32, 64]


def test_a_run_with_layer_stats_and_log_snapshots(tmp_path):
  """Stats at log steps only, in metrics.jsonl and TensorBoard, for every layer and parameter group;
  the update is the one the run without them makes; snapshots at 0, 1, 2 and then every 4, each
  readable."""
  config = helpers.tiny_config(num_steps=8, log_every=4, eval_every=8, checkpoint_every=4)
  config.model.num_layers = 2
  dataset = helpers.tiny_dataset(config)
  plain = train_lib.train(config, dataset, str(tmp_path / "plain"), log=lambda *_: None)
  config.layer_stats = True
  config.checkpoint_schedule = "log"
  run = tmp_path / "stats"
  result = train_lib.train(config, dataset, str(run), log=lambda *_: None)
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(plain.state.params)),
                  jax.tree_util.tree_leaves(jax.device_get(result.state.params))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  records = [json.loads(l) for l in open(run / "metrics.jsonl")]
  logged = [r for r in records if "loss" in r]
  assert [r["step"] for r in logged] == [4, 8]
  expected = {f"{name}/block_{l}" for name in ("attn_entropy", "attn_logit_max") for l in (0, 1)}
  expected |= {f"{kind}/block_{l}/{sub}" for kind in ("rms_param", "rms_grad", "rms_update",
                                                      "update_ratio")
               for l in (0, 1) for sub in ("attn", "mlp", "ln_attn", "ln_mlp")}
  expected |= {"output_logit_max", "log_z_mean", "log_z_sq_mean", "rms_update/lm_head"}
  for r in logged:
    assert expected <= set(r), sorted(expected - set(r))
    assert 0 < r["attn_entropy/block_0"] <= np.log(config.seq_len)
  events = summaries.read_scalars(str(run))
  assert [s for s, _ in events["attn_entropy/block_1"]] == [4, 8]
  assert checkpoint.saved_steps(str(run)) == [0, 1, 2, 4, 8]
  mngr = checkpoint.manager(str(run), None, read_only=True, directory=checkpoint.SNAPSHOTS)
  assert sorted(mngr.all_steps()) == [0, 1, 2, 4, 8]
  mngr.close()
  params, step = checkpoint.load_params(str(run), step=2, log=lambda *_: None)
  assert step == 2 and "block_0" in params
