"""Parameter counts, training FLOPs per token and model FLOP utilization (MFU).

The FLOP formula (Kaplan et al. 2020; the one nanoGPT's `estimate_mfu` and PaLM's appendix use):

    FLOPs per trained token = 6 N + 12 L T d_model

- N counts the parameters that enter a matrix multiply: every kernel of every block plus the output
  projection (the tied embedding counts once, as the output projection). Token and position embedding
  lookups are gathers, not matmuls, and are left out; LayerNorm and bias parameters are included (they
  are negligible and keep N equal to a plain count of non-embedding parameters plus the head).
  The factor 6 is 2 (multiply-add) x 3 (forward, backward w.r.t. activations, backward w.r.t. weights).
- 12 L T d_model is attention's QK^T and AV over the full T x T score matrix (2 matmuls x 2 FLOPs x 3
  passes, per layer, per token, over T keys of width d_model). A causal mask makes half of those scores
  useless; like nanoGPT and PaLM we still count the full matrix, which is what a dense kernel computes.
  `causal_attention_flops_halved=True` gives the stricter count (MaxText's convention).
"""

import math

import jax

from llm_math.model import ModelConfig

# Dense bf16 peak FLOP/s per chip (no sparsity), keyed by a substring of `jax.Device.device_kind`.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "TPU v5": 459e12,  # v5p's device_kind; after the 'TPU v5 lite' entries, which match first.
}


def count_params(params) -> int:
  """Total number of scalars in a parameter pytree."""
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def count_embedding_params(config: ModelConfig) -> int:
  """Parameters used only by embedding lookups (excluded from N in the FLOP formula)."""
  token = 0 if config.tie_embeddings else config.vocab_size * config.d_model
  position = config.max_len * config.d_model if config.pos_encoding == "learned" else 0
  return token + position


def flops_per_token(config: ModelConfig, n_params: int, seq_len: int | None = None,
                    causal_attention_flops_halved: bool = False) -> float:
  """Training FLOPs per token: 6 N + 12 L T d (see the module docstring for what N counts)."""
  t = config.max_len if seq_len is None else seq_len
  n = n_params - count_embedding_params(config)
  attention = 12 * config.num_layers * t * config.d_model
  if causal_attention_flops_halved:
    attention /= 2
  return 6.0 * n + attention


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  """Dense bf16 peak FLOP/s of `device` from `PEAK_BF16_FLOPS`, or None when unknown (e.g. CPU)."""
  device = device or jax.devices()[0]
  for key, value in PEAK_BF16_FLOPS.items():
    if key.lower() in device.device_kind.lower():
      return value
  return None


def mfu(tokens_per_second: float, flops_per_token_: float, num_devices: int,
        peak_per_device: float | None) -> float | None:
  """Model FLOP utilization: achieved model FLOP/s over the devices' summed peak."""
  if not peak_per_device:
    return None
  return tokens_per_second * flops_per_token_ / (num_devices * peak_per_device)
