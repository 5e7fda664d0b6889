"""Per-layer statistics of a training step, logged at log steps when config.layer_stats is on.

What each block's attention does (Zhai et al. 2023's entropy collapse, Wortsman et al. 2023's
attention-logit growth), how large the output logits' normalizer gets (what z-loss penalizes), and
how each group of parameters moves:

    attn_entropy/block_i    mean over heads, queries and sequences of H(A_t) = -sum_s A_ts log A_ts
                            (nats), A = softmax(QK^T / sqrt(d_k)) of block i
    attn_logit_max/block_i  the largest attention logit QK^T / sqrt(d_k) (after any soft-cap) over
                            visible keys
    output_logit_max        the largest output logit
    log_z_mean, log_z_sq_mean   mean of log Z and of log^2 Z, Z = sum_v exp(logit_v) per position
    rms_param/G, rms_grad/G, rms_update/G   root mean square entry of group G's parameters (after
                            the step), gradients and updates (new - old parameters)
    update_ratio/G          rms_update / rms_param

A group G is a block's sub-layer (block_i/attn, block_i/mlp, block_i/ln_attn, block_i/ln_mlp) or a
top-level module (token_embed, pos_embed, lm_head, ln_final); scanned blocks are read layer by layer.
The forward statistics come from a deterministic forward pass over the step's batch (its first
micro-batch under gradient accumulation) that sows them into the 'stats' collection: the attention
ones exist on the explicit attention path only (the fused kernel never forms the probabilities).
`is_layer_stat` tells these names apart, so that `fit` writes them to metrics.jsonl and TensorBoard
but keeps them out of its log line.
"""

import collections

import jax
import jax.numpy as jnp
import flax.linen as nn

from llm_math import model as model_lib

PREFIXES = ("attn_entropy/", "attn_logit_max/", "rms_param/", "rms_grad/", "rms_update/",
            "update_ratio/", "output_logit_max", "log_z_mean", "log_z_sq_mean")


def is_layer_stat(name: str) -> bool:
  """Whether a metric's name is one of this module's statistics."""
  return name.startswith(PREFIXES)


def group_of(path: tuple) -> str:
  """The group of a parameter's key path: 'block_i/<sub-layer>' inside a block, else the top-level
  module's name."""
  keys = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
  if keys[0].startswith("block_") and len(keys) > 1:
    return f"{keys[0]}/{keys[1]}"
  return keys[0]


def group_rms(tree) -> dict[str, jax.Array]:
  """{group: root mean square entry of the group's leaves} of a params-shaped tree (scanned blocks
  unstacked first)."""
  sums, counts = collections.defaultdict(float), collections.defaultdict(int)
  for path, leaf in jax.tree_util.tree_leaves_with_path(model_lib.unrolled(tree)):
    group = group_of(path)
    sums[group] = sums[group] + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
    counts[group] += leaf.size
  return {g: jnp.sqrt(sums[g] / counts[g]) for g in sums}


def step_stats(old_params, grads, new_params) -> dict[str, jax.Array]:
  """rms of each group's parameters (after the step), gradients and updates, and update / parameter
  rms (a ratio of 0 for a group of zeros)."""
  param = group_rms(new_params)
  update = group_rms(jax.tree_util.tree_map(jnp.subtract, new_params, old_params))
  grad = group_rms(grads)
  out = {}
  for g in param:
    out[f"rms_param/{g}"] = param[g]
    out[f"rms_grad/{g}"] = grad[g]
    out[f"rms_update/{g}"] = update[g]
    out[f"update_ratio/{g}"] = jnp.where(param[g] > 0, update[g] / jnp.maximum(param[g], 1e-30), 0.0)
  return out


def output_logit_stats(hidden_BxTxD, kernel_DxV, chunk: int = 0,
                       logit_softcap: float = 0.0) -> dict[str, jax.Array]:
  """The largest output logit and the mean log Z and log^2 Z over positions, computed `chunk`
  positions at a time (0: all at once) so the [B, T, V] logits are never held whole."""
  b, t, d = hidden_BxTxD.shape
  chunk = chunk or t
  h_NxBxCxD = jnp.moveaxis(hidden_BxTxD.reshape(b, t // chunk, chunk, d), 1, 0)
  w_DxV = kernel_DxV.astype(hidden_BxTxD.dtype)

  def piece(h_BxCxD):
    logits_BxCxV = model_lib.softcap(
        jnp.einsum("bcd,dv->bcv", h_BxCxD, w_DxV, preferred_element_type=jnp.float32),
        logit_softcap)
    log_z_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    return jnp.max(logits_BxCxV), jnp.sum(log_z_BxC), jnp.sum(jnp.square(log_z_BxC))

  top, log_z, log_z_sq = jax.lax.map(piece, h_NxBxCxD)
  return {"output_logit_max": jnp.max(top), "log_z_mean": jnp.sum(log_z) / (b * t),
          "log_z_sq_mean": jnp.sum(log_z_sq) / (b * t)}


def forward_stats(model: nn.Module, loss_chunk: int = 0):
  """stats(params, batch) -> {name: scalar}: the attention statistics of every block and the output
  logits' of a deterministic forward pass of the Transformer `model` over the batch's inputs."""
  cfg = model.config

  def stats(params, batch):
    hidden_BxTxD, state = model.apply({"params": params}, batch[0], deterministic=True,
                                      return_hidden=True, mutable=["stats"])
    out = {}
    for i, layer in enumerate(model_lib.per_layer(state.get("stats", {}))):
      for name, (value,) in layer.get("attn", {}).items():
        out[f"{name}/block_{i}"] = value
    out.update(output_logit_stats(hidden_BxTxD, model_lib.output_kernel(params), loss_chunk,
                                  cfg.logit_softcap))
    return out

  return stats
