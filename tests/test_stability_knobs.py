"""Training-stability knobs (Wortsman et al. 2023): QK-layernorm, soft-capped attention and output
logits, z-loss. Each against its mathematics: closed-form gradients, the bounds it guarantees,
float64 computations by hand from the same parameters; and, off, the model computing what it did
without it.
"""
import dataclasses
import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm_math import studies
from experiments.configs import perplexity
from llm_math import evaluation
from llm_math import model as model_lib
from llm_math import train as train_lib
from llm_math import train_config
from llm_math.errors import UsageError

from tests import helpers

T, V, K = 8, 13, 8  # Context, vocabulary, head dim (d_model 16 over 2 heads).
OFF = dict(qk_norm=False, attn_logit_softcap=0.0, logit_softcap=0.0, z_loss=0.0)
ALL_ON = dict(qk_norm=True, attn_logit_softcap=2.0, logit_softcap=3.0, z_loss=0.1)


def _config(**kw) -> model_lib.ModelConfig:
  return model_lib.ModelConfig(**{**dict(vocab_size=V, max_len=T, num_layers=2, num_heads=2,
                                        d_model=16, d_ff=32, pos_encoding="rotary"), **kw})


def _init(**kw):
  m = model_lib.Transformer(_config(**kw))
  params = nn.meta.unbox(m.init(jax.random.PRNGKey(0), jnp.zeros((1, T), jnp.int32)))["params"]
  return m, params


def _scaled(params, factor):
  """Every parameter times `factor`, except the QK-norm scales (kept at their initial ones)."""
  def scale(path, x):
    names = {getattr(k, "key", None) for k in path}
    return x if names & {"query_norm", "key_norm"} else x * factor
  return jax.tree_util.tree_map_with_path(scale, params)


def _batch(seed=1, b=3):
  tokens = jax.random.randint(jax.random.PRNGKey(seed), (b, T + 1), 0, V)
  return tokens[:, :-1], tokens[:, 1:]


def _objective(loss_fn):
  """params -> (total + sum(extra)) / count of a Task loss, and its parts: what train_step takes."""
  def objective(params, batch):
    total, count, extra = train_lib._loss_parts(loss_fn(params, batch, jax.random.PRNGKey(0)))
    return (total + sum(extra.values())) / count, (total / count, extra.get("z_loss", 0.0) / count)
  return objective


def _visible_log_ratio(probs_LxBxHxTxT) -> float:
  """max over rows of log(max p / min p) over each row's visible (causal) keys."""
  a = np.asarray(probs_LxBxHxTxT, np.float64)
  visible = np.tril(np.ones((T, T), bool))
  high = np.where(visible, a, -np.inf).max(-1)
  low = np.where(visible, a, np.inf).min(-1)
  with np.errstate(divide="ignore"):
    return float(np.max(np.log(high) - np.log(low)))


def test_softcap_is_bounded_and_tends_to_the_identity():
  """c tanh(x / c): odd, |.| <= c for every x (< c until float64 rounds tanh to 1), and
  1 - capped / x = u^2 / 3 - 2 u^4 / 15 + ... with u = x / c, in [0, u^2 / 3] since
  tanh u >= u - u^3 / 3 for u >= 0: the identity as c -> inf with relative error O(x^2 / c^2).
  c = 0 is the identity itself."""
  with helpers.x64():
    x = jnp.asarray(np.concatenate([-np.logspace(-3, 30, 300), np.logspace(-3, 30, 300)]))
    for c in (0.5, 3.0, 50.0):
      y = np.asarray(model_lib.softcap(x, c))
      assert np.all(np.abs(y) <= c)
      assert np.all(np.abs(y[np.abs(np.asarray(x)) < 10 * c]) < c)
      np.testing.assert_array_equal(np.sign(y), np.sign(x))
      np.testing.assert_array_equal(np.asarray(model_lib.softcap(-x, c)), -y)
    x = jnp.asarray(np.concatenate([-np.linspace(0.5, 5.0, 50), np.linspace(0.5, 5.0, 50)]))
    for c in (10.0, 1e2, 1e3, 1e4):
      rel = 1.0 - np.asarray(model_lib.softcap(x, c)) / np.asarray(x)
      u2 = (np.asarray(x) / c) ** 2
      assert np.all(rel >= 0) and np.all(rel <= u2 / 3 * (1 + 1e-6))
      np.testing.assert_allclose(rel / (u2 / 3), 1.0, atol=0.4 * u2.max() + 1e-6)
  assert model_lib.softcap(x, 0.0) is x


def test_z_loss_gradient_is_its_closed_form():
  """d/dl_t of z sum_t w_t log^2 Z_t (Z_t = sum_v exp l_tv) is 2 z w_t log Z_t softmax(l_t), and the
  whole objective (NLL + z log^2 Z, summed over weighted tokens, over sum_t w_t) has gradient
  w_t (p_t - onehot(y_t) + 2 z log Z_t p_t) / sum_t w_t: jax.grad through `cross_entropy` (float32,
  as the loss always is) within 1e-6 of the closed forms in float64; the returned sums too."""
  z = 0.3
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)) + 1.5  # log Z well away from 0.
  targets = rng.integers(0, 7, size=(2, 5))
  weights = rng.uniform(0.2, 1.0, size=(2, 5))
  weights[0, 1] = 0.0  # A masked position takes no part.
  log_z = np.log(np.exp(logits).sum(-1))
  p = np.exp(logits - log_z[..., None])
  onehot = np.eye(7)[targets]
  closed_z = 2 * z * (weights * log_z)[..., None] * p
  closed_total = weights[..., None] * (p - onehot + 2 * z * log_z[..., None] * p) / weights.sum()
  nll_sum = -(weights * np.log(np.take_along_axis(p, targets[..., None], -1)[..., 0])).sum()
  l, w = jnp.asarray(logits, jnp.float32), jnp.asarray(weights, jnp.float32)
  y = jnp.asarray(targets)
  nll, count, log_z_sq = model_lib.cross_entropy(l, y, w, with_log_z_sq=True)
  np.testing.assert_allclose(nll, nll_sum, rtol=1e-6)
  np.testing.assert_allclose(count, weights.sum(), rtol=1e-6)
  np.testing.assert_allclose(log_z_sq, (weights * log_z**2).sum(), rtol=1e-6)
  g_z = jax.grad(lambda l: z * model_lib.cross_entropy(l, y, w, with_log_z_sq=True)[2])(l)
  np.testing.assert_allclose(g_z, closed_z, atol=1e-6, rtol=0)
  np.testing.assert_array_equal(g_z[0, 1], 0.0)

  def objective(l):
    nll, count, log_z_sq = model_lib.cross_entropy(l, y, w, with_log_z_sq=True)
    return (nll + z * log_z_sq) / count

  np.testing.assert_allclose(jax.grad(objective)(l), closed_total, atol=1e-6, rtol=0)
  # Asking for log^2 Z leaves the NLL as it was, bit for bit.
  assert float(model_lib.cross_entropy(l, y, w)[0]) == float(nll)


def test_train_step_minimizes_nll_plus_z_loss_and_reports_them_apart():
  """SGD at learning rate 1 exposes the gradient: the update is minus the gradient of
  mean NLL + z mean log^2 Z, computed here from the model's logits alone; the step reports `loss` =
  the mean NLL and `z_loss` = z mean log^2 Z, with gradient accumulation (4 micro-batches) too."""
  z = 0.05
  model, params = _init(z_loss=z, logit_softcap=4.0)
  params = _scaled(params, 3.0)  # Logits of a few nats, so that the cap and log Z matter.
  inputs, targets = _batch(b=4)

  def parts(p):
    logits = model.apply({"params": p}, inputs)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)
    nll, log_z_sq = jnp.mean(nll), jnp.mean(jax.nn.logsumexp(logits, -1) ** 2)
    return nll + z * log_z_sq, (nll, log_z_sq)

  grads, (nll, log_z_sq) = jax.jit(jax.grad(parts, has_aux=True))(params)
  assert float(log_z_sq) > 1.0
  state = train_lib.LoopState.create(apply_fn=None, params=params, tx=optax.sgd(1.0),
                                     sums=train_lib._zero_sums())
  for accum in (1, 4):
    step = jax.jit(functools.partial(train_lib.train_step, loss_fn=train_lib.lm_loss(model),
                                     grad_accum_steps=accum))
    new, metrics = step(state, (inputs, targets), jax.random.PRNGKey(1))
    jax.tree_util.tree_map(
        lambda a, b, g: np.testing.assert_allclose(a, b - g, rtol=1e-5, atol=1e-6),
        new.params, params, grads)
    assert float(metrics["loss"]) == pytest.approx(float(nll), rel=1e-6), accum
    assert float(metrics["z_loss"]) == pytest.approx(z * float(log_z_sq), rel=1e-5), accum


def test_knobs_off_by_default_compute_the_model_without_them():
  """The defaults are off and the default experiment config builds them off: a config with the knobs
  passed off is equal to one without them (so flax builds the same module: the same computation
  bit for bit), whose program has no tanh and no LayerNorm beyond the residual stream's
  (5 = 2 per block + the final one) and no new parameters; its loss returns a plain
  (total, count) and train_step reports no z_loss. With every knob on, the program has one tanh per
  attention layer and one for the output, and two more LayerNorms per layer."""
  default = _config()
  assert {k: getattr(default, k) for k in OFF} == OFF
  assert _config(**OFF) == default and hash(_config(**OFF)) == hash(default)
  from_experiment = train_config.model_config(perplexity.get_config(), V)
  assert from_experiment == model_lib.ModelConfig(**{
      f.name: getattr(from_experiment, f.name) for f in dataclasses.fields(from_experiment)
      if f.name not in OFF})
  m, params = _init()
  x, y = _batch()
  program = str(jax.make_jaxpr(lambda p: m.apply({"params": p}, x))(params))
  assert "tanh" not in program and program.count("rsqrt") == 5
  assert set(params["block_0"]["attn"]) == {"query", "key", "value", "out"}
  for chunk in (0, 4):
    out = jax.eval_shape(train_lib.lm_loss(m, chunk), params, (x, y), jax.random.PRNGKey(0))
    assert len(out) == 2
  state = train_lib.LoopState.create(apply_fn=None, params=params, tx=optax.sgd(1.0),
                                     sums=train_lib._zero_sums())
  _, metrics = jax.eval_shape(functools.partial(train_lib.train_step, loss_fn=train_lib.lm_loss(m)),
                              state, (x, y), jax.random.PRNGKey(0))
  assert set(metrics) == set(train_lib._STEP_METRICS)
  on, params_on = _init(**ALL_ON)
  program = str(jax.make_jaxpr(lambda p: on.apply({"params": p}, x))(params_on))
  assert program.count("tanh") == 3 and program.count("rsqrt") == 5 + 2 * 2


@pytest.mark.parametrize("knobs", [dict(logit_softcap=3.0, tie_embeddings=True), ALL_ON],
                         ids=["logit_softcap_tied", "all"])
def test_chunked_loss_equals_the_whole_logits_loss_with_the_knobs(knobs):
  """lm_loss with loss_chunk 4 and 0: the same objective, NLL, z term and gradients (1e-5), at
  parameters x 10 where the caps bite; the evaluator's chunked and whole scores agree too, and
  with a logit cap both differ from the uncapped score. (Of the knobs, only the output cap and
  z-loss act after the hidden states the chunked loss starts from.)"""
  m, params = _init(**knobs)
  params = _scaled(params, 10.0)
  batch = _batch()
  results = {}
  for chunk in (0, 4):
    results[chunk] = jax.jit(jax.value_and_grad(_objective(train_lib.lm_loss(m, chunk)),
                                                has_aux=True))(params, batch)
  ((obj_w, (nll_w, z_w)), g_w), ((obj_c, (nll_c, z_c)), g_c) = results[0], results[4]
  np.testing.assert_allclose(obj_c, obj_w, rtol=1e-5)
  np.testing.assert_allclose(nll_c, nll_w, rtol=1e-5)
  np.testing.assert_allclose(z_c, z_w, rtol=1e-5)
  assert (float(z_w) > 0) == bool(knobs.get("z_loss"))
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(g_w))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                                 atol=1e-5 * scale), g_c, g_w)
  w = jnp.ones(batch[1].shape, jnp.float32)
  score = lambda chunk, **kw: float(jnp.divide(*evaluation.nll_score(m.apply, chunk, **kw)(
      params, *batch, w)))
  assert score(4) == pytest.approx(score(0), rel=1e-5)
  assert score(0) == pytest.approx(float(nll_w), rel=1e-6)
  if knobs.get("logit_softcap"):
    assert abs(score(4, logit_softcap=0.0) - score(4)) > 0.1


def test_logit_softcap_bounds_the_logits_at_any_parameter_scale():
  """With logit_softcap = c the model's logits are c tanh(uncapped logits / c): below c in magnitude
  with every parameter x 1e3, where the uncapped ones exceed 1e4."""
  c = 5.0
  capped, params = _init(logit_softcap=c)
  plain = model_lib.Transformer(dataclasses.replace(capped.config, logit_softcap=0.0))
  params = _scaled(params, 1e3)
  x, _ = _batch()
  raw = plain.apply({"params": params}, x)
  out = capped.apply({"params": params}, x)
  assert float(jnp.max(jnp.abs(raw))) > 1e4
  assert float(jnp.max(jnp.abs(out))) <= c
  np.testing.assert_allclose(out, c * np.tanh(np.asarray(raw, np.float64) / c), rtol=1e-6,
                             atol=1e-6)


def test_qk_norm_bounds_the_attention_logits():
  """HeadLayerNorm at its initial unit scale: |LN(x)|^2 = K var / (var + eps) = K, so by
  Cauchy-Schwarz |LN(q).LN(k)| / sqrt(K) <= sqrt(K) for q, k of any scale (here ~1e3 with offsets
  ~1e4, where the raw q.k / sqrt(K) exceed 1e6). In the model with every parameter x 1e3 (norm scales kept at 1) the
  attention probabilities of a row's visible keys then differ by at most exp(2 sqrt(K)); without
  the norm some underflow to 0."""
  norm = model_lib.HeadLayerNorm(_config())
  key_q, key_k = jax.random.split(jax.random.PRNGKey(2))
  q = 1e3 * jax.random.normal(key_q, (2, T, 2, K)) + 1e4
  k = 1e3 * jax.random.normal(key_k, (2, T, 2, K)) - 3e4
  boxed = norm.init(jax.random.PRNGKey(0), q)
  assert tuple(nn.get_partition_spec(boxed)["params"]["norm"]["scale"]) == ("kv",)
  variables = nn.meta.unbox(boxed)
  assert set(variables["params"]["norm"]) == {"scale"}  # No bias (see HeadLayerNorm).
  ln_q, ln_k = norm.apply(variables, q), norm.apply(variables, k)
  np.testing.assert_allclose(jnp.sum(ln_q**2, -1), K, rtol=1e-5)
  np.testing.assert_allclose(jnp.mean(ln_q, -1), 0.0, atol=1e-5)
  logits = jnp.einsum("bthk,bshk->bhts", ln_q, ln_k) / math.sqrt(K)
  raw = jnp.einsum("bthk,bshk->bhts", q, k) / math.sqrt(K)
  assert float(jnp.max(jnp.abs(logits))) <= math.sqrt(K) * (1 + 1e-5)
  assert float(jnp.max(jnp.abs(raw))) > 1e6
  x, _ = _batch()
  for qk_norm in (True, False):
    m, params = _init(qk_norm=qk_norm, num_layers=1)
    if qk_norm:
      assert params["block_0"]["attn"]["query_norm"]["norm"]["scale"].shape == (K,)
    _, state = m.apply({"params": _scaled(params, 1e3)}, x, mutable=["intermediates"])
    ratio = _visible_log_ratio(model_lib.attention_probs(state["intermediates"]))
    if qk_norm:
      assert ratio <= 2 * math.sqrt(K) + 1e-4
    else:
      assert ratio > 2 * math.sqrt(K) + 10  # inf: probabilities underflowed to 0


def test_attention_softcap_bounds_the_probability_ratios():
  """Capped attention logits lie in (-c, c), so two visible keys' probabilities differ by a factor
  below exp(2c), with every parameter x 1e3; uncapped, some underflow to 0."""
  c = 2.0
  x, _ = _batch()
  for cap in (c, 0.0):
    m, params = _init(attn_logit_softcap=cap)
    _, state = m.apply({"params": _scaled(params, 1e3)}, x, mutable=["intermediates"])
    ratio = _visible_log_ratio(model_lib.attention_probs(state["intermediates"]))
    assert (ratio <= 2 * c + 1e-4) if cap else (ratio > 2 * c + 10)


def _layer_norm64(x, gamma):
  mu = x.mean(-1, keepdims=True)
  return gamma * (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5)


def _rotary64(x_TxHxK):
  half = x_TxHxK.shape[-1] // 2
  angles = np.arange(len(x_TxHxK))[:, None] * 10000.0 ** (-np.arange(half) / half)
  sin, cos = np.sin(angles)[:, None], np.cos(angles)[:, None]
  x1, x2 = x_TxHxK[..., :half], x_TxHxK[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@pytest.mark.parametrize("pos", ["learned", "rotary"])
def test_qk_norm_and_attention_softcap_against_a_float64_hand_computation(pos):
  """The first layer's attention probabilities from the same random parameters in float64:
  q = LN(x W_q + b_q) (then rotary), k likewise, a = c tanh(q.k / sqrt(K) / c), causal softmax:
  the norm before rotary, with its learned scale, and the cap before the mask."""
  c = 1.5
  m, params = _init(pos_encoding=pos, qk_norm=True, attn_logit_softcap=c, layernorm=False)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_unflatten(
      treedef, [jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in leaves])
  p64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  tokens = np.asarray(_batch()[0])
  _, state = m.apply({"params": params}, jnp.asarray(tokens), mutable=["intermediates"])
  probs = np.asarray(model_lib.attention_probs(state["intermediates"]))[0]
  attn = p64["block_0"]["attn"]
  for b in range(len(tokens)):
    x = p64["token_embed"]["embedding"][tokens[b]]
    if pos == "learned":
      x = x + p64["pos_embed"]["embedding"][:T]
    q, k = (_layer_norm64(np.einsum("td,dhk->thk", x, attn[n]["kernel"]) + attn[n]["bias"],
                          attn[f"{n}_norm"]["norm"]["scale"]) for n in ("query", "key"))
    if pos == "rotary":
      q, k = _rotary64(q), _rotary64(k)
    a = c * np.tanh(np.einsum("thk,shk->hts", q, k) / math.sqrt(K) / c)
    a[:, np.triu(np.ones((T, T), bool), k=1)] = -np.inf
    expected = np.exp(a - a.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(probs[b], expected, rtol=1e-4, atol=1e-6)


def test_qk_norm_in_the_fused_and_decode_paths():
  """Fused attention with qk_norm computes the explicit model's logits; decoding one token at a
  time with every knob on gives the full forward's logits (keys are normalized before they are
  cached), bounded by the logit cap; fused attention with an attention cap is refused."""
  m, params = _init(qk_norm=True, logit_softcap=3.0)
  params = _scaled(params, 5.0)
  x, _ = _batch()
  fused = model_lib.Transformer(dataclasses.replace(m.config, attention_impl="fused"))
  np.testing.assert_allclose(fused.apply({"params": params}, x), m.apply({"params": params}, x),
                             atol=2e-5)

  on = dataclasses.replace(m.config, attn_logit_softcap=2.0)
  full = model_lib.Transformer(on).apply({"params": params}, x)
  dec = model_lib.Transformer(dataclasses.replace(on, decode=True))
  cache = dec.init(jax.random.PRNGKey(0), x)["cache"]
  positions = jnp.broadcast_to(jnp.arange(T)[None], x.shape)
  logits, state = dec.apply({"params": params, "cache": cache}, x[:, :3],
                            positions_BxT=positions[:, :3], mutable=["cache"])
  outs = [logits]
  for t in range(3, T):
    logits, state = dec.apply({"params": params, "cache": state["cache"]}, x[:, t:t + 1],
                              positions_BxT=positions[:, t:t + 1], mutable=["cache"])
    outs.append(logits)
  decoded = jnp.concatenate(outs, axis=1)
  np.testing.assert_allclose(decoded, full, atol=2e-5)
  assert float(jnp.max(jnp.abs(decoded))) <= 3.0

  with pytest.raises(ValueError, match="attention_impl='explicit'"):
    dataclasses.replace(on, attention_impl="fused")
  for field, value in (("logit_softcap", -1.0), ("z_loss", math.inf), ("attn_logit_softcap", "1")):
    with pytest.raises(ValueError, match=field):
      _config(**{field: value})


def test_knob_fields_plumb_through_configs_and_old_runs_resume(tmp_path):
  """The model block's knobs reach ModelConfig (a fused config with an attention cap is a one-line
  UsageError); config.json of a run saved before the knobs existed resumes with them off, and
  turning one on in that workdir is refused."""
  config = perplexity.get_config()
  config.model.update(qk_norm=True, attn_logit_softcap=20.0, logit_softcap=30.0, z_loss=1e-4)
  mcfg = train_config.model_config(config, V)
  assert (mcfg.qk_norm, mcfg.attn_logit_softcap, mcfg.logit_softcap, mcfg.z_loss) == (
      True, 20.0, 30.0, 1e-4)
  config.model.attention_impl = "fused"
  with pytest.raises(UsageError, match="--config.model: attn_logit_softcap"):
    train_config.check_config(config)

  config = perplexity.get_config()
  old = json.loads(config.to_json_best_effort())
  for key in OFF:
    del old["model"][key]
  del old["schedule"], old["decay_fraction"]  # Written before the schedule was a field.
  assert {k: v for k, v in studies.with_new_model_defaults(old, json.loads(
      config.to_json_best_effort()))["model"].items() if k in OFF} == OFF
  (tmp_path / "checkpoints" / "500").mkdir(parents=True)
  (tmp_path / "config.json").write_text(json.dumps(old))
  studies.save_config(config, str(tmp_path), "--workdir holds a run", write=False)
  config.model.z_loss = 1e-4
  with pytest.raises(UsageError, match="model"):
    studies.save_config(config, str(tmp_path), "--workdir holds a run", write=False)


def test_a_run_with_every_knob_logs_its_z_loss(tmp_path):
  """fit with every knob on and the chunked loss: finite losses, and each log record (and
  metrics.jsonl) carries the step's z_loss = z mean log^2 Z beside the pure NLL; near the
  initialization the logits are near 0, so log Z is near ln|V|, the loss too."""
  config = helpers.tiny_config(num_steps=4, log_every=2, checkpoint_every=4, loss_chunk=4,
                               **{f"model.{k}": v for k, v in ALL_ON.items()})
  dataset = helpers.tiny_dataset(config)
  result = train_lib.fit(config, train_lib.lm_task(config, dataset), str(tmp_path),
                         log=lambda *_: None)
  records = [r for r in result.records if "loss" in r]
  assert [r["step"] for r in records] == [2, 4]
  for r in records:
    assert math.isfinite(r["loss"])
    assert r["z_loss"] == pytest.approx(ALL_ON["z_loss"] * math.log(dataset.vocab_size) ** 2,
                                        rel=0.2)
  saved = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["z_loss"] for r in saved if "z_loss" in r] == [r["z_loss"] for r in records]
