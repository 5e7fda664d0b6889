r"""Spectra of attention over training, entropy at a high learning rate, and rank collapse with depth.

An attention matrix A = softmax(Q K^T / sqrt(d_k)) is row-stochastic: a Markov chain on positions
with spectral radius 1. This script trains three versions of one model on the same data and, at
`spectra.track_steps`, analyses every layer and head on a fixed batch of validation windows
(`llm_math.analysis.spectra`):

  causal          next-token prediction, the default learning rate;
  causal_high_lr  the same at `high_lr_factor` x the learning rate, `high_lr_warmup_steps` warmup;
  bidirectional   `model.causal=False`. Trained on next-token prediction it would cheat (position t
                  attends to t + 1, which is its target), so it is trained as a masked LM instead:
                  each position is replaced by a [MASK] token (id V) with probability `mask_rate`
                  and the loss is the NLL of the original tokens at the masked positions only.

Measured per layer and head: eigenvalues (causal A is lower-triangular, so its eigenvalues are
exactly its diagonal A_tt: det(A - lambda I) = prod_t (A_tt - lambda); A_00 = 1), the spectral gap
1 - |lambda_2|, the stationary distribution (causal: e_0, a sink built into the mask), singular
values and effective rank, row entropy, sink mass (mean weight on position 0), and
sigma = ||W_Q W_K^T||_2 / sqrt(d_k) with the entropy lower bound of Zhai et al. (2023) beside the
measured entropy. Rank collapse (Dong et al. 2021): deep models of four architectures (pure
attention; attention + skip; attention + MLP; the full pre-LN block) fed uniformly random tokens,
the relative residual ||X - 1 x^T|| / ||X|| of every layer's residual stream, at initialization and
after a short training run.

  python -m experiments.attention_spectra --workdir=/tmp/spectra        # embedded synthetic source
  python -m experiments.attention_spectra --workdir=/tmp/spectra_shakespeare \
      --data=text:../shared/data/tinyshakespeare.txt

Writes to --workdir: results.json (every scalar, the protocol and the config), spectra.npz (per
snapshot: eigenvalues, singular values, stationary distributions of window 0; the final attention
matrices), results.md, and the figures of `experiments/plot_attention_spectra.py`. Nothing is
checkpointed: an interrupted run starts again from scratch.
"""

import dataclasses
import functools
import json
import math
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments import plot_attention_spectra
from llm_math import data as data_lib
from llm_math import files
from llm_math import flops as flops_lib
from llm_math import model as model_lib
from llm_math import sharding
from llm_math.analysis import spectra
from llm_math import train as train_lib
from llm_math import xla_cpu
from llm_math.errors import UsageError

RUNS = ("causal", "causal_high_lr", "bidirectional")
ARCHITECTURES = {
    "pure attention": dict(residual=False, mlp=False, layernorm=False),
    "attention + skip": dict(residual=True, mlp=False, layernorm=False),
    "attention + MLP": dict(residual=False, mlp=True, layernorm=False),
    "full block": dict(residual=True, mlp=True, layernorm=True),
}
# Per-head scalars of `spectra.attention_summary` that results.json keeps (window means, [L][H]).
HEAD_STATISTICS = ("mean_row_entropy", "mean_normalized_row_entropy", "spectral_gap",
                   "second_eigenvalue_modulus", "effective_rank", "sink_mass",
                   "stationary_sink_mass")


# ----------------------------------------------------------------------------------------------
# Configuration.
# ----------------------------------------------------------------------------------------------


def check_config(config):
  """UsageError for settings this experiment cannot run with."""
  sp, deep = config.spectra, config.deep
  steps = list(sp.track_steps)
  if (not steps or any(not isinstance(s, int) for s in steps) or steps != sorted(set(steps))
      or steps[0] != 0 or steps[-1] != config.num_steps):
    raise UsageError(f"--config.spectra.track_steps={tuple(steps)}: expected increasing integer "
                     f"steps from 0 to num_steps={config.num_steps}, e.g. (0, 100, "
                     f"{config.num_steps})")
  if config.seq_len < 2:
    raise UsageError(f"--config.seq_len={config.seq_len}: attention spectra need seq_len >= 2")
  for name, value in (("spectra.analysis_windows", sp.analysis_windows),
                      ("spectra.eval_windows", sp.eval_windows), ("deep.num_layers", deep.num_layers),
                      ("deep.batch_size", deep.batch_size), ("deep.random_inputs", deep.random_inputs),
                      ("batch_size", config.batch_size), ("log_every", config.log_every)):
    if value < 1:
      raise UsageError(f"--config.{name}={value}: expected a positive integer")
  if deep.num_steps < 0 or deep.init_std <= 0:
    raise UsageError(f"--config.deep.num_steps={deep.num_steps} / init_std={deep.init_std}: "
                     "expected steps >= 0 and a positive init_std")
  if not 0.0 < sp.mask_rate < 1.0:
    raise UsageError(f"--config.spectra.mask_rate={sp.mask_rate}: expected a fraction in (0, 1)")
  if sp.high_lr_factor <= 0 or sp.high_lr_warmup_steps < 0:
    raise UsageError(f"--config.spectra.high_lr_factor={sp.high_lr_factor} / high_lr_warmup_steps="
                     f"{sp.high_lr_warmup_steps}: expected a positive factor and warmup >= 0")


def run_config(config, name: str):
  """The training config of one run: `causal`, `causal_high_lr`, `bidirectional` or `deep`."""
  c = config.copy_and_resolve_references()
  c.model.causal = name != "bidirectional"
  if name == "causal_high_lr":
    c.learning_rate *= c.spectra.high_lr_factor
    c.min_learning_rate *= c.spectra.high_lr_factor
    c.warmup_steps = c.spectra.high_lr_warmup_steps
  elif name == "deep":
    c.model.num_layers = c.deep.num_layers
    c.num_steps = c.deep.num_steps
    c.batch_size = c.deep.batch_size
    c.warmup_steps = min(c.warmup_steps, c.deep.num_steps // 2)
    c.model.init_std = c.deep.init_std
  return c


# ----------------------------------------------------------------------------------------------
# Objectives and training with snapshots.
# ----------------------------------------------------------------------------------------------


def mask_tokens(tokens_BxT: np.ndarray, mask_id: int, rate: float, rng: np.random.Generator):
  """Masked-LM corruption: each position becomes `mask_id` with probability `rate`.

  Returns (inputs_BxT, targets_BxT = tokens_BxT, weights_BxT = 1 at masked positions, else 0).
  """
  masked_BxT = rng.random(tokens_BxT.shape) < rate
  inputs_BxT = np.where(masked_BxT, mask_id, tokens_BxT).astype(tokens_BxT.dtype)
  return inputs_BxT, tokens_BxT, masked_BxT.astype(np.float32)


def masked_lm_step(state, inputs_BxT, targets_BxT, weights_BxT, rng):
  """One AdamW step on the mean NLL of the weighted (masked) targets; returns (state, metrics)."""
  dropout_rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    logits = state.apply_fn({"params": params}, inputs_BxT, deterministic=False,
                            rngs={"dropout": dropout_rng})
    nll_sum, count = model_lib.cross_entropy(logits, targets_BxT, weights_BxT)
    return nll_sum / jnp.maximum(count, 1.0)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), {"loss": loss}


def _next_token_step(state, inputs_BxT, targets_BxT, weights_BxT, rng):
  del weights_BxT  # Every target counts: train_lib.train_step, the perplexity objective.
  return train_lib.train_step(state, inputs_BxT, targets_BxT, rng)


def training_batch(config, dataset, objective: str, step: int):
  """(inputs, targets, weights) of `step`: random training windows, masked for the masked LM."""
  inputs_BxT, targets_BxT = data_lib.train_batch(
      dataset.train_ids, config.seq_len, config.batch_size, config.seed, step)
  if objective == "next_token":
    return inputs_BxT, targets_BxT, np.ones(inputs_BxT.shape, np.float32)
  return mask_tokens(inputs_BxT, dataset.vocab_size, config.spectra.mask_rate,
                     np.random.default_rng([config.seed, step, 1]))


def _finite(tree) -> bool:
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree_util.tree_leaves(tree))


@dataclasses.dataclass
class TrackedRun:
  """A training run's snapshots (one JSON record and one dict of arrays per tracked step)."""
  records: list
  arrays: list
  train_curve: dict
  diverged_at: int | None
  params: int
  wall_time_s: float


def train_and_track(config, mcfg: model_lib.ModelConfig, dataset, objective: str,
                    track_steps, on_snapshot, name: str, log=print,
                    init_params=None) -> TrackedRun:
  """Trains `mcfg` from scratch for `config.num_steps` steps and calls `on_snapshot(step, params)`
  -> (record, arrays) at every step of `track_steps` (0 = initialization).

  AdamW, clipping and the schedule are `train_lib.optimizer(config)`; the state is initialized in
  its sharded layout by `train_lib.create_train_state` (its parameters replaced by `init_params`
  when given). A non-finite loss or parameter stops the run at that step (`diverged_at`) instead
  of raising: the snapshots before it are kept.
  """
  start = time.time()
  model = model_lib.Transformer(mcfg)
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.logical_axis_rules)
  dp = sharding.data_parallel_size(mesh, rules)
  if config.batch_size % dp:
    raise UsageError(f"--config.batch_size={config.batch_size} is not divisible by the {dp} "
                     f"data-parallel devices of mesh {dict(mesh.shape)}")
  init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  state, state_sharding = train_lib.create_train_state(
      model, train_lib.optimizer(config), mesh, rules, config.seq_len, init_rng)
  if init_params is not None:
    state = state.replace(params=jax.device_put(init_params, state_sharding.params))
  batch_sh = sharding.batch_sharding(mesh, rules)
  step_fn = jax.jit(masked_lm_step if objective == "masked" else _next_token_step,
                    in_shardings=(state_sharding, batch_sh, batch_sh, batch_sh, None),
                    out_shardings=(state_sharding, None), donate_argnums=0)
  tracked = set(track_steps)
  await_each_step = xla_cpu.await_each_step()
  records, arrays, curve, diverged_at = [], [], {"step": [], "loss": []}, None

  def snapshot(step):
    params = jax.device_get(state.params)
    if not _finite(params):
      return False
    record, snapshot_arrays = on_snapshot(step, params)
    records.append(record)
    arrays.append(snapshot_arrays)
    return True

  with sharding.use_mesh(mesh):
    if 0 in tracked:
      snapshot(0)
    for step in range(config.num_steps):
      state, metrics = step_fn(state, *training_batch(config, dataset, objective, step),
                               dropout_rng)
      if await_each_step:  # several CPU devices: see llm_math.xla_cpu
        jax.block_until_ready(metrics["loss"])
      done = step + 1
      if done % config.log_every == 0 or done in tracked or done == config.num_steps:
        loss = float(jax.device_get(metrics["loss"]))
        if not math.isfinite(loss):
          diverged_at = done
          log(f"{name}: loss {loss} at step {done}: stopped (diverged)")
          break
        curve["step"].append(done)
        curve["loss"].append(loss)
        if done % config.log_every == 0:
          log(f"{name}: step {done:5d} | train loss {loss:.4f} | {time.time() - start:.0f} s")
      if done in tracked and not snapshot(done):
        diverged_at = done
        log(f"{name}: non-finite parameters at step {done}: stopped (diverged)")
        break
  return TrackedRun(records, arrays, curve, diverged_at,
                    flops_lib.count_params(jax.device_get(state.params)), time.time() - start)


# ----------------------------------------------------------------------------------------------
# Analysis of one snapshot.
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def model_functions(mcfg: model_lib.ModelConfig):
  """(internals_fn, nll_fn) of the Transformer `mcfg`, compiled once per model config."""
  model = model_lib.Transformer(mcfg)
  return internals_fn(model), nll_fn(model)


def internals_fn(model: model_lib.Transformer):
  """jit(params, tokens_BxT) -> (a_LxBxHxTxT, residual x_LxBxTxD, attention inputs LN(x) LxBxTxD).

  The attention inputs are the outputs of each block's `ln_attn` (the identity when the model has
  no LayerNorm), captured with flax's `capture_intermediates`.
  """
  num_layers = model.config.num_layers
  capture = lambda mdl, _: isinstance(mdl, model_lib.LayerNorm) and mdl.name == "ln_attn"

  @jax.jit
  def forward(params, tokens_BxT):
    _, state = model.apply({"params": params}, tokens_BxT, mutable=["intermediates"],
                           capture_intermediates=capture)
    inter = state["intermediates"]
    ln_LxBxTxD = jnp.stack([inter[f"block_{l}"]["ln_attn"]["__call__"][0]
                            for l in range(num_layers)])
    return model_lib.attention_probs(inter), model_lib.residual_streams(inter), ln_LxBxTxD

  return forward


def nll_fn(model: model_lib.Transformer):
  """jit(params, inputs, targets, weights) -> mean NLL (nats) over the weighted targets."""

  @jax.jit
  def nll(params, inputs_BxT, targets_BxT, weights_BxT):
    logits = model.apply({"params": params}, inputs_BxT, deterministic=True)
    total, count = model_lib.cross_entropy(logits, targets_BxT, weights_BxT)
    return total / jnp.maximum(count, 1.0)

  return nll


def _augmented_qk(attn_params, which: str) -> np.ndarray:
  """W_{which} as `[H, D(+1), K]`; with a bias b the row b is appended, so [x, 1] W' = x W + b."""
  kernel_HxDxK = np.transpose(np.asarray(attn_params[which]["kernel"], np.float64), (1, 0, 2))
  if "bias" not in attn_params[which]:
    return kernel_HxDxK
  bias_Hx1xK = np.asarray(attn_params[which]["bias"], np.float64)[:, None, :]
  return np.concatenate([kernel_HxDxK, bias_Hx1xK], axis=1)


def qk_norms_and_entropy_bound(params, mcfg: model_lib.ModelConfig, ln_LxBxTxD: np.ndarray,
                               row_entropy_LxBxHxT: np.ndarray):
  """sigma per head, and the Zhai et al. bound per head next to the entropy it bounds.

  sigma_LxH = ||W_Q W_K^T||_2 / sqrt(d_k) (kernels only). The bound uses the exact logits
  [x, 1] W_Q' W_K'^T [x, 1]^T / sqrt(d_k) (biases appended as a row, inputs as [LN(x), 1]), so it
  must hold row by row; `slack_min` = min over rows (causal: rows 1..T-1; row 0 attends to one
  position) of (measured entropy - bound), >= 0 up to float32 rounding. Rotary positions rotate q and k per position and the bound does not apply:
  the bound is then None.
  """
  sigma_LxH, bound_LxH, slack_min = [], [], math.inf
  for l in range(mcfg.num_layers):
    attn = params[f"block_{l}"]["attn"]
    kernel = lambda w: np.transpose(np.asarray(attn[w]["kernel"], np.float64), (1, 0, 2))
    sigma_LxH.append(spectra.qk_spectral_norm(kernel("query"), kernel("key")).tolist())
    if mcfg.pos_encoding == "rotary":
      continue
    x_BxTxD = np.asarray(ln_LxBxTxD[l], np.float64)
    if "bias" in attn["query"]:
      x_BxTxD = np.concatenate([x_BxTxD, np.ones(x_BxTxD.shape[:-1] + (1,))], axis=-1)
    bound_BxHxT = spectra.attention_entropy_lower_bound(
        _augmented_qk(attn, "query"), _augmented_qk(attn, "key"), x_BxTxD[:, None],
        causal=mcfg.causal)
    bound_LxH.append(bound_BxHxT.mean(axis=(0, 2)).tolist())
    first = 1 if mcfg.causal else 0  # causal row 0 has one position: entropy = bound = 0
    slack_min = min(slack_min, float(np.min(row_entropy_LxBxHxT[l][..., first:]
                                            - bound_BxHxT[..., first:])))
  if mcfg.pos_encoding == "rotary":
    return sigma_LxH, None, None
  return sigma_LxH, bound_LxH, slack_min


def analyse_snapshot(params, mcfg: model_lib.ModelConfig, forward, tokens_BxT: np.ndarray):
  """Statistics of every layer and head on `tokens_BxT`: (record, arrays).

  record (JSON): per statistic of HEAD_STATISTICS an `[L][H]` list of means over the windows;
  `qk_norm` and `zhai_bound` `[L][H]`; `zhai_slack_min`. arrays (window 0 only):
  eigenvalues `[L, H, T]` complex, singular_values and stationary_distribution `[L, H, T]`,
  attention `[L, H, T, T]`.
  """
  probs, _, ln_inputs = jax.device_get(forward(params, tokens_BxT))
  a_LxBxHxTxT = np.asarray(probs, np.float64)
  summary = {k: np.asarray(v) for k, v in
             spectra.attention_summary(a_LxBxHxTxT, causal=mcfg.causal).items()}
  record = {key: summary[key].mean(axis=1).tolist() for key in HEAD_STATISTICS}
  sigma, bound, slack = qk_norms_and_entropy_bound(params, mcfg, np.asarray(ln_inputs),
                                                   summary["row_entropy"])
  record.update(qk_norm=sigma, zhai_bound=bound, zhai_slack_min=slack)
  arrays = {
      "eigenvalues": summary["eigenvalues_real"][:, 0] + 1j * summary["eigenvalues_imag"][:, 0],
      "singular_values": summary["singular_values"][:, 0],
      "stationary_distribution": summary["stationary_distribution"][:, 0],
      "attention": a_LxBxHxTxT[:, 0].astype(np.float32),
  }
  return record, arrays


def embedding_output(params, mcfg: model_lib.ModelConfig, tokens_BxT: np.ndarray) -> np.ndarray:
  """The residual stream entering block 0: token embeddings (+ learned or sinusoidal positions)."""
  t = tokens_BxT.shape[1]
  x_BxTxD = np.asarray(params["token_embed"]["embedding"])[tokens_BxT]
  if mcfg.pos_encoding == "learned":
    x_BxTxD = x_BxTxD + np.asarray(params["pos_embed"]["embedding"])[:t][None]
  elif mcfg.pos_encoding == "sinusoidal":
    x_BxTxD = x_BxTxD + np.asarray(model_lib.sinusoidal_positions(mcfg.max_len, mcfg.d_model))[:t][None]
  return x_BxTxD


def _relative_residuals(x_LxBxTxD: np.ndarray) -> dict:
  """Frobenius and composite relative residuals, `[L]` lists (means over sequences).

  A stream that is exactly 0 (underflow) has no defined ratio: it is reported as None.
  """
  zero_LxB = spectra.matrix_norm(x_LxBxTxD) == 0
  fro_LxB = np.where(zero_LxB, np.nan, spectra.relative_residual(x_LxBxTxD, "fro"))
  composite_LxB = np.where(zero_LxB, np.nan, spectra.relative_residual(x_LxBxTxD, "composite"))
  as_list = lambda v: [None if math.isnan(x) else float(x) for x in v]
  return {"fro": as_list(fro_LxB.mean(axis=1)), "fro_min": as_list(fro_LxB.min(axis=1)),
          "fro_max": as_list(fro_LxB.max(axis=1)), "composite": as_list(composite_LxB.mean(axis=1))}


def residual_profile(params, mcfg: model_lib.ModelConfig, forward, tokens_BxT: np.ndarray) -> dict:
  """Relative residual ||X - 1 x^T|| / ||X|| of the residual stream after each layer (0 = input).

  Keys (`[L + 1]` lists, means over the input sequences unless named): fro (Frobenius norm,
  x = column mean), fro_min / fro_max (over sequences), composite (Dong et al.'s sqrt(l1 linf)
  norm, x = column median), rms (root mean square entry of X: without skip connections or
  LayerNorm each layer rescales it); normalized_entropy `[L]` (mean normalized row entropy).
  """
  probs, streams, _ = jax.device_get(forward(params, tokens_BxT))
  x_LxBxTxD = np.concatenate([embedding_output(params, mcfg, tokens_BxT)[None],
                              np.asarray(streams)], axis=0).astype(np.float64)
  h_LxBxHxT = spectra.normalized_row_entropy(np.asarray(probs, np.float64), causal=mcfg.causal)
  return {**_relative_residuals(x_LxBxTxD),
          "rms": np.sqrt(np.mean(x_LxBxTxD ** 2, axis=(1, 2, 3))).tolist(),
          "normalized_entropy": np.nanmean(h_LxBxHxT, axis=(1, 2, 3)).tolist()}


def uniform_causal_reference(x_BxTxD: np.ndarray, num_layers: int) -> list:
  """Relative residual of U^l X, l = 0..L, with U_ts = 1 / (t + 1) for s <= t: causal attention
  that has not learned anything (uniform over the prefix). U's eigenvalues are 1, 1/2, 1/3, ...,
  so U^l X converges to 1 x_0^T like 2^-l; uniform bidirectional attention (1 1^T / T) would make
  X rank one in a single layer."""
  t = x_BxTxD.shape[1]
  u_TxT = np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]
  xs = [np.asarray(x_BxTxD, np.float64)]
  for _ in range(num_layers):
    xs.append(np.einsum("ts,bsd->btd", u_TxT, xs[-1]))
  return _relative_residuals(np.stack(xs))["fro"]

# ----------------------------------------------------------------------------------------------
# The experiment.
# ----------------------------------------------------------------------------------------------


def initial_params(mcfg: model_lib.ModelConfig, seed: int):
  """The parameters `train_lib.create_train_state` would draw for `mcfg` (same init, same key)."""
  model = model_lib.Transformer(mcfg)
  init_rng, _ = jax.random.split(jax.random.PRNGKey(seed))
  init = lambda rng: nn.meta.unbox(
      model.init(rng, jnp.zeros((1, mcfg.max_len), jnp.int32))["params"])
  return jax.device_get(jax.jit(init)(init_rng))


def restrict_params(params, mcfg: model_lib.ModelConfig):
  """The subtree of `params` that model `mcfg` has (e.g. no MLP or LayerNorm parameters)."""
  model = model_lib.Transformer(mcfg)
  abstract = jax.eval_shape(lambda: nn.meta.unbox(
      model.init(jax.random.PRNGKey(0), jnp.zeros((1, mcfg.max_len), jnp.int32))["params"]))

  def restrict(tree, shape_tree, path=""):
    if not hasattr(shape_tree, "items"):
      if tuple(tree.shape) != tuple(shape_tree.shape):
        raise ValueError(f"params{path}: shape {tree.shape}, model expects {shape_tree.shape}")
      return tree
    return {k: restrict(tree[k], v, f"{path}/{k}") for k, v in shape_tree.items()}

  return restrict(params, abstract)


def evaluation_sets(config, dataset):
  """Fixed validation data: windows of seq_len tokens at stride seq_len (first `eval_windows`).

  Returns {objective: (inputs, targets, weights)} for next-token and masked scoring, and the
  number of windows. Masks of the masked set are drawn once from (seed, 'eval').
  """
  windows = data_lib.eval_windows(dataset.val_ids, config.seq_len)
  n = min(config.spectra.eval_windows, len(windows.inputs_NxT))
  inputs_NxT, targets_NxT = windows.inputs_NxT[:n], windows.targets_NxT[:n]
  masked = mask_tokens(inputs_NxT, dataset.vocab_size, config.spectra.mask_rate,
                       np.random.default_rng([config.seed, 2**31 - 1]))
  return {"next_token": (inputs_NxT, targets_NxT, np.ones(inputs_NxT.shape, np.float32)),
          "masked": masked}, n


def train_spectra_run(config, dataset, name: str, eval_sets, log=print):
  """One of RUNS, analysed at every tracked step: (JSON record, stacked window-0 arrays)."""
  c = run_config(config, name)
  objective = "masked" if name == "bidirectional" else "next_token"
  vocab = dataset.vocab_size + (objective == "masked")  # + the [MASK] token
  mcfg = train_lib.model_config(c, vocab)
  forward, nll = model_functions(mcfg)
  inputs, targets, weights = eval_sets[objective]
  tokens_BxT = inputs[: c.spectra.analysis_windows]

  def on_snapshot(step, params):
    record, arrays = analyse_snapshot(params, mcfg, forward, tokens_BxT)
    record = {"step": step, "val_nll": float(nll(params, inputs, targets, weights)), **record}
    h = np.asarray(record["mean_normalized_row_entropy"]).mean(axis=1)
    log(f"{name}: step {step:5d} | val nll {record['val_nll']:.4f} | normalized entropy per "
        f"layer {np.array2string(h, precision=3)}")
    return record, arrays

  run = train_and_track(c, mcfg, dataset, objective, c.spectra.track_steps, on_snapshot, name, log)
  record = {
      "objective": objective, "causal": mcfg.causal, "params": run.params,
      "learning_rate": c.learning_rate, "min_learning_rate": c.min_learning_rate,
      "warmup_steps": c.warmup_steps, "num_steps": c.num_steps, "batch_size": c.batch_size,
      "snapshots": run.records, "train_curve": run.train_curve, "diverged_at": run.diverged_at,
      "wall_time_s": run.wall_time_s,
  }
  arrays = {key: np.stack([a[key] for a in run.arrays]) for key in
            ("eigenvalues", "singular_values", "stationary_distribution")}
  arrays["attention_final"] = run.arrays[-1]["attention"]
  arrays["steps"] = np.asarray([r["step"] for r in run.records])
  return record, arrays


def rank_collapse(config, dataset, eval_sets, log=print) -> dict:
  """Relative residual per layer of the four ARCHITECTURES, at initialization and trained.

  Every architecture starts from the same draw (the full block's parameters, restricted to the
  modules it has), so the four differ only in their switches. The models are causal and trained
  on next-token prediction; at initialization the same parameters are also applied without the
  causal mask (`init_bidirectional`).
  """
  c = run_config(config, "deep")
  rng = np.random.default_rng([config.seed, 3])
  tokens_BxT = rng.integers(0, dataset.vocab_size, size=(c.deep.random_inputs, c.seq_len))
  inputs, targets, weights = eval_sets["next_token"]
  full_mcfg = dataclasses.replace(train_lib.model_config(c, dataset.vocab_size), causal=True,
                                  residual=True, mlp=True, layernorm=True)
  full_params = initial_params(full_mcfg, c.seed)
  out = {}
  for arch, switches in ARCHITECTURES.items():
    start = time.time()
    mcfg = dataclasses.replace(full_mcfg, **switches)
    forward, nll = model_functions(mcfg)
    bidi_mcfg = dataclasses.replace(mcfg, causal=False)
    bidi_forward, _ = model_functions(bidi_mcfg)
    params = restrict_params(full_params, mcfg)

    def profile_at(step, params, forward=forward, nll=nll, mcfg=mcfg):
      profile = residual_profile(params, mcfg, forward, tokens_BxT)
      profile.update(step=step, val_nll=float(nll(params, inputs, targets, weights)))
      return profile, {}

    init, _ = profile_at(0, params)
    trained, diverged_at = None, None
    if c.num_steps > 0:
      run = train_and_track(c, mcfg, dataset, "next_token", (c.num_steps,), profile_at, arch,
                            log, init_params=params)
      trained, diverged_at = (run.records[-1] if run.records else None), run.diverged_at
    log(f"{arch}: relative residual at layer {mcfg.num_layers}: {init['fro'][-1]} at init"
        + (f", {trained['fro'][-1]} at step {trained['step']}" if trained else "")
        + f" ({time.time() - start:.0f} s)")
    out[arch] = {"switches": switches, "params": flops_lib.count_params(params), "init": init,
                 "init_bidirectional": residual_profile(params, bidi_mcfg, bidi_forward,
                                                        tokens_BxT),
                 "trained": trained, "diverged_at": diverged_at,
                 "wall_time_s": time.time() - start}
  reference = uniform_causal_reference(embedding_output(full_params, full_mcfg, tokens_BxT),
                                       full_mcfg.num_layers)
  return {"num_layers": c.model.num_layers, "num_steps": c.num_steps, "batch_size": c.batch_size,
          "learning_rate": c.learning_rate, "warmup_steps": c.warmup_steps,
          "init_std": c.model.init_std,
          "inputs": f"{c.deep.random_inputs} sequences of {c.seq_len} uniformly random tokens",
          "uniform_causal_reference": reference,
          "architectures": out}


def run_experiment(config, workdir: str, log=print) -> dict:
  """Everything: the three tracked runs, rank collapse, results.json/.md, spectra.npz, figures."""
  start = time.time()
  check_config(config)
  files.path(workdir).mkdir(parents=True, exist_ok=True)
  dataset = common.load_dataset(config, workdir)
  log(f"data: {dataset.description}; vocabulary {dataset.vocab_size}; "
      f"{len(dataset.train_ids):,} training / {len(dataset.val_ids):,} validation tokens")
  eval_sets, n_eval = evaluation_sets(config, dataset)
  n_analysis = min(config.spectra.analysis_windows, n_eval)
  runs, arrays = {}, {}
  for name in RUNS:
    runs[name], run_arrays = train_spectra_run(config, dataset, name, eval_sets, log)
    arrays.update({f"{name}.{key}": value for key, value in run_arrays.items()})
  results = {
      "experiment": "attention_spectra",
      "data": dataset.description,
      "entropy_rate_nats": dataset.source.entropy_rate() if dataset.source is not None else None,
      "protocol": {
          "analysis": (f"validation windows 0..{n_analysis - 1} (seq_len {config.seq_len}, stride "
                       f"seq_len); per-head statistics are means over these windows; spectra.npz "
                       "holds window 0"),
          "analysis_windows": n_analysis,
          "eval": (f"val_nll: mean NLL (nats) over {n_eval} validation windows; next-token runs "
                   f"score every target (contexts 1..{config.seq_len}), the masked LM scores the "
                   f"masked positions (rate {config.spectra.mask_rate}, one fixed draw)"),
          "eval_windows": n_eval,
          "entropy": "row entropy in nats; normalized = H_t / log(positions row t may attend to)",
          "causal_eigenvalues": ("causal A is lower-triangular: its eigenvalues are exactly the "
                                 "diagonal A_tt (A_00 = 1), read off, not computed by an "
                                 "eigensolver; its stationary distribution is e_0"),
          "bidirectional_objective": (
              "masked LM: trained on next-token prediction a bidirectional model can attend to "
              "position t + 1, its own target, and learns to copy it"),
          "qk_norm": "sigma = ||W_Q W_K^T||_2 / sqrt(d_k) per head (kernels, biases excluded)",
          "zhai_bound": ("Zhai et al. (2023) Thm 3.1 per row with s = sigma' ||X'||_2^2, X' = "
                         "[LN(x), 1] (the attention input with a ones column) and sigma' from "
                         "[W; b]: the exact logits; mean over rows and windows"),
          "sink_mass": "mean attention on position 0 over rows (causal: rows 1..T-1)",
          "relative_residual": ("||X - 1 x^T|| / ||X|| of the residual stream after each block "
                                "(layer 0 = embeddings), float64 from float32 activations"),
      },
      "runs": runs,
      "rank_collapse": rank_collapse(config, dataset, eval_sets, log),
      "config": json.loads(config.to_json_best_effort()),
  }
  results["wall_time_s"] = time.time() - start
  if common.is_primary():
    write_results(workdir, results, arrays)
    log(f"wrote results.json, results.md, spectra.npz and {len(results['figures'])} figures to "
        f"{workdir} ({time.time() - start:.0f} s)")
  return results


# ----------------------------------------------------------------------------------------------
# Reports.
# ----------------------------------------------------------------------------------------------


def _layer_means(snapshot: dict, key: str) -> list[float]:
  return [float(np.mean(row)) for row in snapshot[key]]


def _uniform_causal_entropy(results: dict) -> float:
  """Mean row entropy (nats) of uniform causal attention over seq_len positions: mean_t log(t + 1)."""
  return float(np.mean(np.log(np.arange(1, results["config"]["seq_len"] + 1))))


def _g(value) -> str:
  return "n/a" if value is None else f"{value:.3g}"


def _fmt(values, spec=".3f") -> str:
  return ", ".join(format(v, spec) for v in values)


def _per_layer(profile: dict) -> str:
  """Geometric-mean factor by which the relative residual shrinks per layer, as 'x0.52'."""
  first, last = profile["fro"][0], profile["fro"][-1]
  if not first or not last:
    return "n/a"
  return f"x{(last / first) ** (1.0 / (len(profile['fro']) - 1)):.3g}"


def markdown_report(results: dict) -> str:
  """results.md: the key numbers in words, then tables."""
  runs, rc = results["runs"], results["rank_collapse"]
  causal, high, bidi = runs["causal"], runs["causal_high_lr"], runs["bidirectional"]
  first, last = causal["snapshots"][0], causal["snapshots"][-1]
  num_layers = len(last["mean_row_entropy"])
  lines = [f"# Attention spectra: {results['data']}", ""]
  arch = rc["architectures"]
  depth = rc["num_layers"]
  pure, skip = arch["pure attention"], arch["attention + skip"]
  last_layer = lambda profile: _g(profile["fro"][-1]) if profile else "n/a"
  lines += ["## Rank collapse with depth (Dong et al. 2021)", "",
            f"Relative residual ||X - 1 x^T||_F / ||X||_F of the residual stream of {depth}-layer "
            f"causal models fed {rc['inputs']} (mean over sequences; layer 0 = embeddings; "
            f"weights N(0, {rc['init_std']:g}^2)). At initialization pure attention's residual "
            f"falls from {_g(pure['init']['fro'][0])} (embeddings) to "
            f"{last_layer(pure['init'])} at layer {depth} ({_per_layer(pure['init'])} per layer: "
            f"collapse towards rank one), while attention + skip keeps "
            f"{last_layer(skip['init'])} ({_per_layer(skip['init'])} per layer)"]
  if pure["trained"] and skip["trained"]:
    lines[-1] += (f"; after {rc['num_steps']} training steps: pure attention "
                  f"{last_layer(pure['trained'])}, attention + skip {last_layer(skip['trained'])}")
  lines[-1] += (f". Uniform causal attention U (U_ts = 1/(t+1), eigenvalues 1, 1/2, 1/3, ...) "
                f"applied {depth} times to the same embeddings leaves "
                f"{_g(rc['uniform_causal_reference'][-1])}. Without the causal mask the same "
                f"initial weights give pure attention {last_layer(pure['init_bidirectional'])}"
                + (" (exactly: every row equal in float32)"
                   if pure["init_bidirectional"]["fro"][-1] == 0 else "")
                + f" and attention + skip {last_layer(skip['init_bidirectional'])} at layer "
                f"{depth}.")
  lines += ["", "| architecture | residual | MLP | LayerNorm | params | layer 1 (init) | "
            f"layer {depth // 2} (init) | layer {depth} (init) | layer {depth} composite (init) | "
            f"layer {depth} no mask (init) | layer {depth} (trained) | val NLL init | "
            "val NLL trained |",
            "|---|:-:|:-:|:-:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  yes = lambda b: "yes" if b else "no"
  for name, r in arch.items():
    s, init, tr = r["switches"], r["init"], r["trained"]
    lines.append(
        f"| {name} | {yes(s['residual'])} | {yes(s['mlp'])} | {yes(s['layernorm'])} | "
        f"{r['params']:,} | {_g(init['fro'][1])} | {_g(init['fro'][depth // 2])} | "
        f"{_g(init['fro'][-1])} | {_g(init['composite'][-1])} | "
        f"{last_layer(r['init_bidirectional'])} | {last_layer(tr)} | {init['val_nll']:.3f} | "
        f"{tr['val_nll'] if tr else float('nan'):.3f} |")
  lines += ["", "Trained: causal next-token prediction, "
            f"{rc['num_steps']} steps of batch {rc['batch_size']}, lr {rc['learning_rate']:g}. "
            f"RMS entry of the stream at layer {depth} at init: "
            + ", ".join(f"{n} {r['init']['rms'][-1]:.2g}" for n, r in arch.items())
            + " (without skip connections or LayerNorm every layer rescales the stream, so "
              "scale-free relative residuals are reported)."]

  lines += ["", "## Learning rate and attention entropy (Zhai et al. 2023)", ""]
  for name, run in (("normal", causal), ("high", high)):
    s0, s1 = run["snapshots"][0], run["snapshots"][-1]
    div = f" (diverged at step {run['diverged_at']})" if run["diverged_at"] else ""
    lines.append(
        f"- {name} lr (peak {run['learning_rate']:g}, {run['warmup_steps']} warmup steps){div}: "
        f"mean row entropy per layer {_fmt(_layer_means(s0, 'mean_row_entropy'))} nats at step "
        f"{s0['step']} -> {_fmt(_layer_means(s1, 'mean_row_entropy'))} at step {s1['step']}; "
        f"largest sigma = ||W_Q W_K^T||/sqrt(d_k) {np.max(s0['qk_norm']):.3g} -> "
        f"{np.max(s1['qk_norm']):.3g}; val NLL {s1['val_nll']:.4f}"
        + (f"; Zhai bound (mean over heads) {_fmt(_layer_means(s1, 'zhai_bound'))}"
           if s1["zhai_bound"] is not None else "") + ".")
  h_normal, h_high = (float(np.mean(r["snapshots"][-1]["mean_row_entropy"])) for r in (causal, high))
  lines += ["", f"Entropy over training, normal against high learning rate (entropy_lr.png): at "
            f"step {high['snapshots'][-1]['step']} the high-lr run's attention entropy (mean over "
            f"layers and heads) is {h_high:.3f} nats against {h_normal:.3f} at the normal rate "
            f"(uniform causal attention: {_uniform_causal_entropy(results):.3f}), its largest "
            f"sigma {np.max(high['snapshots'][-1]['qk_norm']):.3g} against "
            f"{np.max(causal['snapshots'][-1]['qk_norm']):.3g}, and its val NLL "
            f"{high['snapshots'][-1]['val_nll']:.4f} against "
            f"{causal['snapshots'][-1]['val_nll']:.4f} nats."]
  slacks = [s["zhai_slack_min"] for r in runs.values() for s in r["snapshots"]
            if s["zhai_slack_min"] is not None]
  if slacks:
    bound0 = float(np.mean(first["zhai_bound"]))
    lines += ["", f"The Zhai et al. bound is evaluated on the exact logits and holds on every "
              f"row (smallest measured entropy - bound over all runs, snapshots and rows, causal "
              f"row 0 excluded: {min(slacks) + 0.0:.3g} nats"
              + ("; 0 on rows collapsed onto one position, where entropy and bound are both 0"
                 if min(slacks) < 1e-6 else "")
              + f"). It is loose: at initialization "
              f"(causal) it is {bound0:.3f} nats against a measured "
              f"{float(np.mean(first['mean_row_entropy'])):.3f}, and once sigma ||X||_2^2 grows "
              "(||X||_2^2 of LayerNorm-ed inputs is of order T d) it falls to ~0 and no longer "
              "constrains the entropy: the collapse it warns of is seen in sigma, not in the "
              "bound."]

  lines += ["", "## Spectra of the trained models", "",
            "Causal attention is lower-triangular, so its eigenvalues are exactly its diagonal "
            "A_tt (real, in [0, 1], A_00 = 1) and its stationary distribution is e_0: the chain "
            "drains into position 0. Its spectral gap is 1 - max_{t>=1} A_tt. Bidirectional "
            "(masked-LM) attention is a general stochastic matrix with complex eigenvalues.", ""]
  for name, run in (("causal", causal), ("bidirectional", bidi)):
    s = run["snapshots"][-1]
    lines.append(f"- {name} (step {s['step']}, val NLL {s['val_nll']:.4f}, {run['objective']}): "
                 f"normalized entropy per layer {_fmt(_layer_means(s, 'mean_normalized_row_entropy'))}; "
                 f"spectral gap {_fmt(_layer_means(s, 'spectral_gap'))}; effective rank "
                 f"{_fmt(_layer_means(s, 'effective_rank'), '.1f')}; sink mass "
                 f"{_fmt(_layer_means(s, 'sink_mass'))}.")
  if results.get("entropy_rate_nats") is not None:
    lines.append(f"- The source's entropy rate is {results['entropy_rate_nats']:.4f} nats/token "
                 "(next-token val NLL scores contexts 1..T, so it stays above it).")

  lines += ["", "Per layer (means over heads and analysed windows), initialization -> end:", "",
            "| run | layer | entropy (nats) | normalized entropy | spectral gap | |lambda_2| | "
            "effective rank | sink mass | stationary pi_0 | sigma (max head) | Zhai bound |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for name, run in runs.items():
    s0, s1 = run["snapshots"][0], run["snapshots"][-1]
    for l in range(num_layers):
      pair = lambda key, spec=".3f": (f"{np.mean(s0[key][l]):{spec}} -> "
                                      f"{np.mean(s1[key][l]):{spec}}")
      bound = pair("zhai_bound") if s1["zhai_bound"] is not None else "n/a"
      lines.append(
          f"| {name} | {l + 1} | {pair('mean_row_entropy')} | "
          f"{pair('mean_normalized_row_entropy')} | {pair('spectral_gap')} | "
          f"{pair('second_eigenvalue_modulus')} | {pair('effective_rank', '.1f')} | "
          f"{pair('sink_mass')} | {pair('stationary_sink_mass')} | "
          f"{np.max(s0['qk_norm'][l]):.3g} -> {np.max(s1['qk_norm'][l]):.3g} | {bound} |")
  lines += ["", "Protocol: " + "; ".join(f"{k}: {v}" for k, v in results["protocol"].items()
                                         if isinstance(v, str)) + ".", "",
            "Runs: " + "; ".join(
                f"{n}: {r['num_steps']} steps, batch {r['batch_size']}, lr {r['learning_rate']:g} "
                f"-> {r['min_learning_rate']:g}, warmup {r['warmup_steps']}, {r['params']:,} "
                f"params, {r['wall_time_s']:.0f} s" for n, r in runs.items())
            + f". Total wall time {results['wall_time_s']:.0f} s."]
  return "\n".join(lines) + "\n"


def write_results(workdir: str, results: dict, arrays: dict):
  """spectra.npz, the figures (listed in results["figures"]), then results.json and results.md.

  The figures are drawn from what results.json will hold (non-finite floats as None)."""
  files.write_npz(files.path(workdir) / "spectra.npz", **arrays)
  results["figures"] = plot_attention_spectra.plot_all(workdir, files.finite_or_none(results),
                                                       arrays)
  common.write_results(workdir, results, markdown_report(results))


def main(argv):
  del argv
  config = common.config_from_flags()
  workdir = common.prepare_workdir(config)
  try:
    results = run_experiment(config, workdir)
  except KeyboardInterrupt:
    print("interrupted: nothing was saved (runs are not checkpointed); rerun the same command",
          file=sys.stderr)
    sys.exit(130)
  print(markdown_report(results))


if __name__ == "__main__":
  common.run(main, "attention_spectra.py")
