"""What a Transformer of `llm_math.model` computes inside: its attention, residual streams and
query-key weights on given tokens, and what `llm_math.analysis.spectra` says about them.

`model_internals` runs the model once and returns every layer's attention probabilities, residual
stream and attention input; `analyse_snapshot` summarizes them per layer and head (entropy, spectral
gap, effective rank, sinks, sigma = ||W_Q W_K^T|| / sqrt(d_k) and the Zhai et al. bound on the exact
logits), `residual_profile` follows rank collapse through the depth (Dong et al. 2021), and
`restrict_params` cuts the parameters of an ablated architecture from one shared draw. Parameters
are whole host arrays (`train.to_host`); a scanned model (`scan_layers`) is read layer by layer.
"""
import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llm_math import model as model_lib
from llm_math.analysis import spectra

# Per-head statistics of `spectra.attention_summary` that `analyse_snapshot` keeps, as window means.
HEAD_STATISTICS = ("mean_row_entropy", "mean_normalized_row_entropy", "spectral_gap",
                   "second_eigenvalue_modulus", "effective_rank", "sink_mass",
                   "stationary_sink_mass")
# What the statistics of `analyse_snapshot` and `residual_profile` are, in words (for reports).
DEFINITIONS = {
    "entropy": "row entropy in nats; normalized = H_t / log(positions row t may attend to)",
    "causal_eigenvalues": ("causal A is lower-triangular: its eigenvalues are exactly the diagonal "
                           "A_tt (A_00 = 1), read off, not computed by an eigensolver; its "
                           "stationary distribution is e_0"),
    "qk_norm": "sigma = ||W_Q W_K^T||_2 / sqrt(d_k) per head (kernels, biases excluded)",
    "zhai_bound": ("Zhai et al. (2023) Thm 3.1 per row with s = sigma' ||X'||_2^2, X' = [LN(x), 1] "
                   "(the attention input with a ones column) and sigma' from [W; b]: the exact "
                   "logits; mean over rows and windows"),
    "sink_mass": "mean attention on position 0 over rows (causal: rows 1..T-1)",
    "relative_residual": ("||X - 1 x^T|| / ||X|| of the residual stream after each block (layer 0 "
                          "= embeddings), float64 from float32 activations"),
}


@functools.lru_cache(maxsize=None)
def model_internals(mcfg: model_lib.ModelConfig):
  """jit(params, tokens_BxT) -> (a_LxBxHxTxT, x_LxBxTxD, ln_LxBxTxD) of the Transformer `mcfg`.

  a: every layer's attention probabilities; x: the residual stream after every block; ln: every
  attention's input, the output of the block's `ln_attn` (x itself without LayerNorm), captured
  with flax's `capture_intermediates`. Params are whole (host) arrays, so the model's logical
  sharding constraints are dropped; scanned blocks (`scan_layers`) are read layer by layer
  (`model.unrolled`). Compiled once per model config.
  """
  model = model_lib.Transformer(dataclasses.replace(mcfg, logical_axis_rules=(), scan_layers=False))
  capture = lambda mdl, _: isinstance(mdl, model_lib.LayerNorm) and mdl.name == "ln_attn"

  @jax.jit
  def forward(params, tokens_BxT):
    _, state = model.apply({"params": model_lib.unrolled(params)}, tokens_BxT,
                           mutable=["intermediates"],
                           capture_intermediates=capture)
    inter = state["intermediates"]
    ln_LxBxTxD = jnp.stack([inter[f"block_{l}"]["ln_attn"]["__call__"][0]
                            for l in range(mcfg.num_layers)])
    return model_lib.attention_probs(inter), model_lib.residual_streams(inter), ln_LxBxTxD

  return forward


def _augmented_qk(attn_params, which: str) -> np.ndarray:
  """W_{which} as `[H, D(+1), K]`; with a bias b the row b is appended, so [x, 1] W' = x W + b."""
  kernel_HxDxK = np.transpose(np.asarray(attn_params[which]["kernel"], np.float64), (1, 0, 2))
  if "bias" not in attn_params[which]:
    return kernel_HxDxK
  bias_Hx1xK = np.asarray(attn_params[which]["bias"], np.float64)[:, None, :]
  return np.concatenate([kernel_HxDxK, bias_Hx1xK], axis=1)


def qk_norms_and_entropy_bound(params, mcfg: model_lib.ModelConfig, ln_LxBxTxD: Any,
                               row_entropy_LxBxHxT: Any):
  """sigma per head, and the Zhai et al. bound per head next to the entropy it bounds.

  Returns (sigma_LxH, bound_LxH, slack_min) as lists and a float. sigma = ||W_Q W_K^T||_2 /
  sqrt(d_k) (kernels only). The bound (`attention_entropy_lower_bound`, per row, mean over rows
  and windows) uses the exact logits [x, 1] W_Q' W_K'^T [x, 1]^T / sqrt(d_k), biases appended as a
  row and inputs as [LN(x), 1], so it must hold row by row: slack_min = min over rows (causal: rows
  1..T-1, row 0 attends to one position) of measured entropy - bound, >= 0 up to float32
  rounding. Rotary positions rotate q and k per position and the bound does not apply: bound_LxH
  and slack_min are then None.
  """
  sigma_LxH, bound_LxH, slack_min = [], [], math.inf
  params = model_lib.unrolled(params)
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
    first = 1 if mcfg.causal else 0
    slack_min = min(slack_min, float(np.min(np.asarray(row_entropy_LxBxHxT[l])[..., first:]
                                            - bound_BxHxT[..., first:])))
  if mcfg.pos_encoding == "rotary":
    return sigma_LxH, None, None
  return sigma_LxH, bound_LxH, slack_min


def analyse_snapshot(params, mcfg: model_lib.ModelConfig, tokens_BxT: np.ndarray):
  """Every layer and head of the Transformer `mcfg` with (host) `params` on `tokens_BxT`.

  Returns (scalars, arrays). scalars (JSON): per statistic of HEAD_STATISTICS an `[L][H]` list of
  means over the B windows; qk_norm and zhai_bound `[L][H]` and zhai_slack_min
  (`qk_norms_and_entropy_bound`). arrays, of window 0: eigenvalues `[L, H, T]` complex,
  singular_values and stationary_distribution `[L, H, T]`, attention `[L, H, T, T]` float32.
  """
  probs, _, ln_inputs = jax.device_get(model_internals(mcfg)(params, tokens_BxT))
  a_LxBxHxTxT = np.asarray(probs, np.float64)
  summary = {k: np.asarray(v)
             for k, v in spectra.attention_summary(a_LxBxHxTxT, mcfg.causal).items()}
  scalars = {key: summary[key].mean(axis=1).tolist() for key in HEAD_STATISTICS}
  sigma, bound, slack = qk_norms_and_entropy_bound(params, mcfg, ln_inputs, summary["row_entropy"])
  scalars.update(qk_norm=sigma, zhai_bound=bound, zhai_slack_min=slack)
  arrays = {
      "eigenvalues": summary["eigenvalues_real"][:, 0] + 1j * summary["eigenvalues_imag"][:, 0],
      "singular_values": summary["singular_values"][:, 0],
      "stationary_distribution": summary["stationary_distribution"][:, 0],
      "attention": a_LxBxHxTxT[:, 0].astype(np.float32),
  }
  return scalars, arrays


# ----------------------------------------------------------------------------------------------
# Rank collapse in a Transformer (Dong et al. 2021): the residual stream layer by layer.
# ----------------------------------------------------------------------------------------------


def embedding_output(params, mcfg: model_lib.ModelConfig, tokens_BxT: np.ndarray) -> np.ndarray:
  """The residual stream entering block 0: token embeddings (+ learned or sinusoidal positions)."""
  t = tokens_BxT.shape[1]
  x_BxTxD = np.asarray(params["token_embed"]["embedding"])[tokens_BxT]
  if mcfg.pos_encoding == "learned":
    x_BxTxD = x_BxTxD + np.asarray(params["pos_embed"]["embedding"])[:t][None]
  elif mcfg.pos_encoding == "sinusoidal":
    positions_TxD = np.asarray(model_lib.sinusoidal_positions(mcfg.max_len, mcfg.d_model))[:t]
    x_BxTxD = x_BxTxD + positions_TxD[None]
  return x_BxTxD


def residual_profile(params, mcfg: model_lib.ModelConfig, tokens_BxT: np.ndarray) -> dict:
  """Relative residual ||X - 1 x^T|| / ||X|| of the residual stream after each layer (0 = input).

  Keys (`[L + 1]` lists, means over the input sequences unless named): fro, fro_min, fro_max,
  composite (`spectra.relative_residuals_by_layer`), rms (root mean square entry of X: without skip
  connections or LayerNorm each layer rescales it); normalized_entropy `[L]` (mean normalized row
  entropy of each layer's attention).
  """
  probs, streams, _ = jax.device_get(model_internals(mcfg)(params, tokens_BxT))
  x_LxBxTxD = np.concatenate([embedding_output(params, mcfg, tokens_BxT)[None],
                              np.asarray(streams)], axis=0).astype(np.float64)
  h_LxBxHxT = spectra.normalized_row_entropy(np.asarray(probs, np.float64), causal=mcfg.causal)
  return {**spectra.relative_residuals_by_layer(x_LxBxTxD),
          "rms": np.sqrt(np.mean(x_LxBxTxD ** 2, axis=(1, 2, 3))).tolist(),
          "normalized_entropy": np.nanmean(h_LxBxHxT, axis=(1, 2, 3)).tolist()}


def restrict_params(params, like):
  """The subtree of `params` with the keys of `like`: e.g. the full block's parameters cut to a
  model without MLP or LayerNorm (`like` its params or `jax.eval_shape` of its init), so ablated
  architectures share one draw. Leaves may be boxed (`nn.Partitioned`); their shapes must agree.
  """
  def restrict(tree, shape_tree, path):
    if isinstance(shape_tree, Mapping):
      if not isinstance(tree, Mapping) or set(shape_tree) - set(tree):
        raise ValueError(f"params{path}: lacks {sorted(set(shape_tree) - set(tree or {}))}")
      return {k: restrict(tree[k], v, f"{path}/{k}") for k, v in shape_tree.items()}
    shape = lambda x: tuple(getattr(x, "value", x).shape)
    if shape(tree) != shape(shape_tree):
      raise ValueError(f"params{path}: shape {shape(tree)}, the model expects {shape(shape_tree)}")
    return tree

  return restrict(params, like, "")
