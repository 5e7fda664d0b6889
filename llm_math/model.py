"""A decoder-only Transformer language model in flax linen.

    x_BxTxD = embed(tokens_BxT) (+ learned or sinusoidal positions)
    for each block:  x = x + Attn(LN(x));  x = x + FFN(LN(x))        (pre-LayerNorm)
    logits_BxTxV = LN(x) @ W_out                                       (W_out = E^T when tied)

    Attn(x) = concat_h softmax(Q_h K_h^T / sqrt(d_k) + M) V_h  W_O,   M = -inf above the diagonal
    FFN(x)  = act(x W_1 + b_1) W_2 + b_2,                          act = ReLU (max(0, .)) or GELU

Every kernel carries logical axis names ('vocab', 'embed', 'heads', 'kv', 'mlp') so that a list of
logical-to-mesh rules (see `llm_math.sharding`) decides how parameters are laid out on a device mesh.
`dtype` is the compute dtype and `param_dtype` the storage dtype; LayerNorm, the attention softmax and the
logits used by the loss are always computed in float32.

Attention probabilities are exposed on demand: each attention layer `sow`s its `[B, H, T, T]`
probabilities into the 'intermediates' collection, which costs nothing unless the caller applies the
model with `mutable=['intermediates']`. Only the explicit attention path has them; the fused one
(`attention_impl='fused'`: cuDNN flash attention where it applies, XLA elsewhere) never forms them.

With `causal=False` the model attends in both directions (for the spectral analysis of attention).

Training-stability knobs (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer
training instabilities"), each off by default, where the model computes exactly what it did before:

    qk_norm:            Q_h, K_h <- LN(Q_h), LN(K_h) over the head dim, before rotary (QK-layernorm)
    attn_logit_softcap: a <- c tanh(a / c) on a = Q_h K_h^T / sqrt(d_k), before the mask  (Gemma 2)
    logit_softcap:      logits <- c tanh(logits / c), wherever output logits are formed  (Gemma 2)
    z_loss:             the objective adds z mean_t log^2 Z_t, Z_t = sum_v exp(logit_tv)   (PaLM)
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

POS_ENCODINGS = ("learned", "sinusoidal", "rotary")
# remat setting -> jax.checkpoint policy (None: no rematerialization; "full": save nothing).
REMAT_POLICIES = {False: None, "none": None, True: "full", "full": "full",
                  "dots_saveable": "dots_saveable",
                  "dots_with_no_batch_dims_saveable": "dots_with_no_batch_dims_saveable"}
ACTIVATIONS = ("relu", "gelu")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static hyper-parameters of the Transformer (built from the experiment config)."""
  vocab_size: int
  max_len: int  # Longest sequence the model is applied to (the context length T).
  num_layers: int = 2
  num_heads: int = 4
  d_model: int = 64
  d_ff: int = 256
  dropout_rate: float = 0.0
  pos_encoding: str = "learned"
  activation: str = "gelu"
  tie_embeddings: bool = False
  causal: bool = True
  use_bias: bool = True
  # Architecture switches for ablations (rank collapse): skip connections, the MLP, LayerNorm.
  residual: bool = True
  mlp: bool = True
  layernorm: bool = True
  # Autoregressive decoding with a key/value cache of max_len positions (see `llm_math.generate`).
  decode: bool = False
  # 'explicit': softmax(QK^T/sqrt(d_k))V written out (attention probabilities can be sown), with
  # dropout_rate applied to the attention probabilities in training.
  # 'fused': jax.nn.dot_product_attention, with cuDNN flash attention where
  # `fused_attention_implementation` allows it (CUDA GPU, bf16/fp16, supported head dim) and XLA
  # elsewhere. It is taken in training too, dropout or not: the fused kernel has no dropout on the
  # attention probabilities, so there dropout_rate applies only to the embeddings and to the
  # attention and MLP outputs added to the residual stream. Decoding (decode=True) always takes
  # the explicit path.
  attention_impl: str = "explicit"
  # Rematerialization of each block in the backward pass: False/'none' keeps every activation,
  # True/'full' recomputes the whole block, 'dots_saveable' keeps every matmul output and recomputes
  # the rest (elementwise ops, softmax, LayerNorm), 'dots_with_no_batch_dims_saveable' keeps only the
  # matmuls with the weights (not attention's QK^T and AV, whose [B, H, T, T] outputs dominate at
  # long context: MaxText's 'minimal').
  remat: Any = False
  # Apply the blocks as one nn.scan over stacked parameters (a leading 'layers' axis: params['blocks']
  # instead of params['block_0'], ...). The step then compiles one block whatever the depth, and the
  # compiler sees a per-layer boundary (parameters gathered, gradients reduced, layer by layer).
  # `unrolled(params)` and `stacked(params)` convert between the two layouts.
  scan_layers: bool = False
  scan_unroll: int = 1  # Blocks per iteration of the scan's loop (`llm_math.aot` costs a layer so).
  # Logical axis -> mesh axes rules (`llm_math.sharding`) for the activations the model constrains
  # (the residual stream between blocks); they take effect under a mesh (jax.set_mesh), else no-op.
  logical_axis_rules: tuple = ()
  init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # Training-stability knobs (Wortsman et al. 2023), each off by default.
  # qk_norm: LayerNorm of every head's queries and keys over the head dim (`HeadLayerNorm`), before
  # rotary positions, so that |Q_h K_h^T| / sqrt(d_k) <= sqrt(d_k) at unit scales.
  qk_norm: bool = False
  # attn_logit_softcap = c > 0: attention logits a = Q_h K_h^T / sqrt(d_k) become c tanh(a / c)
  # before the causal mask (0 = off). The explicit path only: with attention_impl='fused' it is an
  # error (jax.nn.dot_product_attention has no such option), not a silent switch of kernels.
  attn_logit_softcap: float = 0.0
  # logit_softcap = c > 0: output logits become c tanh(logits / c) in float32 (0 = off), wherever
  # they are formed: the model's output (so evaluation and generation) and `chunked_cross_entropy`.
  logit_softcap: float = 0.0
  # z_loss = z > 0: the training objective (`llm_math.train.lm_loss`) is NLL + z log^2 Z per scored
  # token, Z = sum_v exp(logit_v) (PaLM's auxiliary loss, 1e-4 there; 0 = off). A coefficient of the
  # objective, not of the function the model computes: outputs, evaluation and the reported loss
  # ignore it. It lives here, with the logits it acts on, so that the model block holds everything
  # `lm_loss` builds from and configs saved before it existed resume with it off.
  z_loss: float = 0.0

  def __post_init__(self):
    if self.d_model % self.num_heads:
      raise ValueError(f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}")
    if self.pos_encoding not in POS_ENCODINGS:
      raise ValueError(f"pos_encoding={self.pos_encoding!r}: expected one of {POS_ENCODINGS}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation={self.activation!r}: expected one of {ACTIVATIONS}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}: expected one of {tuple(REMAT_POLICIES)}")
    if self.attention_impl not in ("explicit", "fused"):
      raise ValueError(f"attention_impl={self.attention_impl!r}: expected 'explicit' or 'fused'")
    if self.pos_encoding == "rotary" and self.head_dim % 2:
      raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}")
    for name in ("vocab_size", "max_len", "num_layers", "num_heads", "d_model", "d_ff"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    for name in ("attn_logit_softcap", "logit_softcap", "z_loss"):
      value = getattr(self, name)
      number = isinstance(value, (int, float)) and not isinstance(value, bool)
      if not number or not 0 <= value < math.inf:
        raise ValueError(f"{name}={value!r}: expected a non-negative finite number (0 = off)")
    if self.attn_logit_softcap and self.attention_impl == "fused":
      raise ValueError(f"attn_logit_softcap={self.attn_logit_softcap} needs attention_impl="
                       "'explicit': the fused kernel (jax.nn.dot_product_attention) cannot cap "
                       "the attention logits")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads


# cuDNN flash attention (jax.nn.dot_product_attention with implementation='cudnn') takes bf16/fp16
# Q, K, V and a head dim that is a multiple of 8 and at most 128 (256 from Hopper on; 128 holds on
# every GPU, for the backward pass too); it needs compute capability 8.0 (Ampere) or newer.
CUDNN_ATTENTION_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
CUDNN_MAX_HEAD_DIM = 128
CUDNN_MIN_COMPUTE_CAPABILITY = (8, 0)


def fused_attention_implementation(platform: str, dtype, head_dim: int,
                                   compute_capability: str | None = None) -> str:
  """The `implementation=` of jax.nn.dot_product_attention for the fused path: 'cudnn' or 'xla'.

  'cudnn' when every condition of cuDNN flash attention holds: `platform` is 'gpu' (a CUDA GPU;
  see `default_platform`), `dtype` is bfloat16 or float16, `head_dim` is a multiple of 8 and at most
  CUDNN_MAX_HEAD_DIM, and `compute_capability` ('major.minor'; None = unknown, not checked) is at
  least 8.0. 'xla' otherwise: CPU, TPU, ROCm, float32 on a GPU, unsupported head dims.

  The conditions are those jax checks before calling cuDNN (jax/_src/cudnn/
  fused_attention_stablehlo.py: `check_layout` wants fp16/bf16 Q/K/V; `check_is_flash_attention`
  wants head dim <= 128, or <= 256 on Hopper or newer, and a multiple of 8), taken for the oldest
  supported GPU; cuDNN's attention support matrix adds SM80 (Ampere) or newer.
  """
  if platform != "gpu" or jnp.dtype(dtype) not in CUDNN_ATTENTION_DTYPES:
    return "xla"
  if head_dim % 8 or not 0 < head_dim <= CUDNN_MAX_HEAD_DIM:
    return "xla"
  if compute_capability is not None:
    major_minor = tuple(int(x) for x in compute_capability.split(".")[:2])
    if major_minor < CUDNN_MIN_COMPUTE_CAPABILITY:
      return "xla"
  return "cudnn"


def default_platform() -> tuple[str, str | None]:
  """(platform, compute capability) of the default device: 'cpu', 'tpu', 'gpu' for a CUDA GPU
  (with its 'major.minor' capability) or 'rocm' for an AMD one (which has no cuDNN)."""
  device = jax.devices()[0]
  platform = device.platform
  if platform == "gpu" and "cuda" not in device.client.platform_version.lower():
    platform = "rocm"
  return platform, getattr(device, "compute_capability", None)


_LOGGED_ATTENTION_PATHS = set()


def _log_attention_path_once(implementation: str, platform: str, dtype, head_dim: int) -> None:
  """Logs (INFO) which kernel the fused attention path uses, once per process and setting."""
  key = (implementation, platform, jnp.dtype(dtype).name, head_dim)
  if key not in _LOGGED_ATTENTION_PATHS:
    _LOGGED_ATTENTION_PATHS.add(key)
    logging.info("fused attention: implementation=%r (platform %s, %s, head_dim %d)", *key)


def _dense_init(std: float, axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _residual_std(config) -> float:
  """GPT-2's init for projections into the residual stream: std / sqrt(2 * num_layers)."""
  return config.init_std / math.sqrt(2 * config.num_layers)


def _zeros(axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def sinusoidal_positions(length: int, d_model: int) -> jax.Array:
  """The fixed encoding of Vaswani et al.: PE[t, 2i] = sin(t / 10000^(2i/d)), PE[t, 2i+1] = cos(...)."""
  t_T1 = jnp.arange(length, dtype=jnp.float32)[:, None]
  inv_freq = jnp.exp(-math.log(10000.0) * jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model)
  angles_TxF = t_T1 * inv_freq[None, :]
  pe = jnp.zeros((length, d_model), jnp.float32)
  pe = pe.at[:, 0::2].set(jnp.sin(angles_TxF))
  return pe.at[:, 1::2].set(jnp.cos(angles_TxF[:, : d_model // 2]))


def apply_rotary(x_BxTxHxK: jax.Array, positions_BxT: jax.Array) -> jax.Array:
  """Rotary position embedding (Su et al. 2021): rotate feature pairs (i, i + K/2) by angle t * theta_i."""
  half = x_BxTxHxK.shape[-1] // 2
  theta = 10000.0 ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles_BxTxF = positions_BxT[..., None].astype(jnp.float32) * theta[None, None, :]
  sin = jnp.sin(angles_BxTxF)[:, :, None, :]
  cos = jnp.cos(angles_BxTxF)[:, :, None, :]
  x1, x2 = x_BxTxHxK[..., :half].astype(jnp.float32), x_BxTxHxK[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxK.dtype)


def gelu(x):
  """Exact GELU, x Phi(x) = x (1 + erf(x / sqrt 2)) / 2, in PyTorch's erf form.

  jax.nn.gelu(approximate=False) writes it with erfc, which XLA expands into two branches with an
  exponential; erf is one rational polynomial. Both stay within 2e-6 of float64 on [-10, 10], and the
  erf form saved ~3 ms per training step of the nanoGPT CPU shape on XLA:CPU (best of four runs
  35.4 -> 32.6 ms on 2 cores).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))).astype(x.dtype))


def softcap(x: jax.Array, cap: float) -> jax.Array:
  """c tanh(x / c) for cap c > 0 (Gemma 2's soft-capping); x itself for c = 0 (off).

  An odd, increasing map of R onto (-c, c): |c tanh(x / c)| < c for every x, and
  c tanh(x / c) = x - x^3 / (3 c^2) + O(x^5 / c^4), so the relative change is about x^2 / (3 c^2):
  the identity as c -> inf. Its derivative 1 - tanh^2(x / c) lies in (0, 1]: a capped logit never
  passes on a larger gradient than the uncapped one.
  """
  if not cap:
    return x
  return cap * jnp.tanh(x / cap)


class LayerNorm(nn.Module):
  """LayerNorm computed in float32 whatever the compute dtype, with logically named parameters."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    if not cfg.layernorm:
      return x
    y = nn.LayerNorm(
        epsilon=1e-5, dtype=jnp.float32, param_dtype=cfg.param_dtype, use_bias=cfg.use_bias,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=_zeros(("embed",)), name="norm")(x.astype(jnp.float32))
    return y.astype(cfg.dtype)


class HeadLayerNorm(nn.Module):
  """QK-layernorm (Dehghani et al. 2023; Wortsman et al. 2023): each head's query or key vector
  x in R^K normalized over the head dim, in float32,

      LN(x)_i = gamma_i (x_i - mean(x)) / sqrt(var(x) + eps),      i = 1 .. K,

  with one learned scale gamma [K] shared by the heads (logical axis 'kv') and no bias, whatever
  config.use_bias says. Without a bias LN(x) = gamma * u, |u|^2 = K var(x) / (var(x) + eps) <= K, so
  by Cauchy-Schwarz the attention logits obey |LN(q).LN(k)| / sqrt(K) <= sqrt(K) max|gamma_q|
  max|gamma_k| for every input (sqrt(K) at the initial unit scales); and a bias on the keys would
  only add q.b_k to every logit of a row, which the softmax removes. The variance is taken in two
  passes, mean((x - mean x)^2): the one-pass mean(x^2) - mean(x)^2 cancels when |mean x| >> std x
  (large activations, the regime this norm is for) and could then inflate |LN(x)| past the bound.
  Independent of config.layernorm (the residual-stream LayerNorm ablation).
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxHxK):
    cfg = self.config
    y = nn.LayerNorm(
        epsilon=1e-5, dtype=jnp.float32, param_dtype=cfg.param_dtype, use_bias=False,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("kv",)),
        name="norm")(x_BxTxHxK.astype(jnp.float32))
    return y.astype(cfg.dtype)


class CausalSelfAttention(nn.Module):
  """Multi-head softmax(QK^T / sqrt(d_k)) V attention; causal unless config.causal is False.

  With config.qk_norm, Q and K are `HeadLayerNorm`ed per head before rotary positions (which rotate
  feature pairs, so keep the norms); with config.attn_logit_softcap = c the logits
  a = QK^T / sqrt(d_k) become c tanh(a / c) before the mask, so that the probabilities of any two
  visible keys differ by a factor of at most exp(2c).
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, deterministic: bool):
    cfg = self.config
    qkv = lambda name: nn.DenseGeneral(
        features=(cfg.num_heads, cfg.head_dim), use_bias=cfg.use_bias, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, kernel_init=_dense_init(cfg.init_std, ("embed", "heads", "kv")),
        bias_init=_zeros(("heads", "kv")), name=name)(x_BxTxD)
    q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = qkv("query"), qkv("key"), qkv("value")
    if cfg.qk_norm:  # Before rotary and before the cache: cached keys are normalized ones.
      q_BxTxHxK = HeadLayerNorm(cfg, name="query_norm")(q_BxTxHxK)
      k_BxTxHxK = HeadLayerNorm(cfg, name="key_norm")(k_BxTxHxK)
    if cfg.pos_encoding == "rotary":
      q_BxTxHxK = apply_rotary(q_BxTxHxK, positions_BxT)
      k_BxTxHxK = apply_rotary(k_BxTxHxK, positions_BxT)

    if cfg.decode:
      k_BxTxHxK, v_BxTxHxK = self._append_to_cache(k_BxTxHxK, v_BxTxHxK)
    scale = 1.0 / math.sqrt(cfg.head_dim)
    if cfg.attention_impl == "fused" and not cfg.decode:
      # No dropout on the attention probabilities (the fused kernel has none), in training too.
      platform, capability = default_platform()
      implementation = fused_attention_implementation(
          platform, q_BxTxHxK.dtype, cfg.head_dim, capability)
      _log_attention_path_once(implementation, platform, q_BxTxHxK.dtype, cfg.head_dim)
      out_BxTxHxK = jax.nn.dot_product_attention(
          q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, scale=scale, is_causal=cfg.causal,
          implementation=implementation)
      return self._project_out(out_BxTxHxK)
    logits_BxHxTxS = jnp.einsum(
        "bthk,bshk->bhts", q_BxTxHxK, k_BxTxHxK, preferred_element_type=jnp.float32) * scale
    logits_BxHxTxS = softcap(logits_BxHxTxS, cfg.attn_logit_softcap)
    if cfg.causal or cfg.decode:
      # Key s is visible to the query at position t when s <= t (in decode mode keys are cache slots).
      key_pos_S = jnp.arange(k_BxTxHxK.shape[1])
      query_pos_BxT = positions_BxT if cfg.decode else jnp.arange(x_BxTxD.shape[1])[None, :]
      mask_BxTxS = key_pos_S[None, None, :] <= query_pos_BxT[:, :, None]
      logits_BxHxTxS = jnp.where(mask_BxTxS[:, None], logits_BxHxTxS, jnp.finfo(jnp.float32).min)
    probs_BxHxTxS = jax.nn.softmax(logits_BxHxTxS, axis=-1)
    self.sow("intermediates", "attention_probs", probs_BxHxTxS)
    if self.is_mutable_collection("stats"):  # `llm_math.layer_stats`: free unless asked for.
      # Masked logits are float32's min, so the max is over visible keys; 0 log 0 = 0.
      self.sow("stats", "attn_logit_max", jnp.max(logits_BxHxTxS))
      entropy_BxHxT = -jnp.sum(jax.scipy.special.xlogy(probs_BxHxTxS, probs_BxHxTxS), axis=-1)
      self.sow("stats", "attn_entropy", jnp.mean(entropy_BxHxT))
    probs_BxHxTxS = nn.Dropout(cfg.dropout_rate)(probs_BxHxTxS, deterministic=deterministic)

    out_BxTxHxK = jnp.einsum("bhts,bshk->bthk", probs_BxHxTxS.astype(cfg.dtype), v_BxTxHxK)
    return self._project_out(out_BxTxHxK)

  def _project_out(self, out_BxTxHxK):
    cfg = self.config
    return nn.DenseGeneral(
        features=cfg.d_model, axis=(-2, -1), use_bias=cfg.use_bias, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=_dense_init(_residual_std(cfg), ("heads", "kv", "embed")),
        bias_init=_zeros(("embed",)), name="out")(out_BxTxHxK)

  def _append_to_cache(self, k_BxTxHxK, v_BxTxHxK):
    """Writes this step's keys/values at the cache index; returns the whole cache [B, max_len, H, K]."""
    b, t, h, d = k_BxTxHxK.shape
    shape = (b, self.config.max_len, h, d)
    initialized = self.has_variable("cache", "cached_key")  # model.init only creates the cache.
    cached_k = self.variable("cache", "cached_key", jnp.zeros, shape, k_BxTxHxK.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, shape, v_BxTxHxK.dtype)
    index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialized:
      return k_BxTxHxK, v_BxTxHxK
    i = index.value
    cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k_BxTxHxK, (0, i, 0, 0))
    cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v_BxTxHxK, (0, i, 0, 0))
    index.value = i + t
    return cached_k.value, cached_v.value


class FeedForward(nn.Module):
  """FFN(x) = act(x W_1 + b_1) W_2 + b_2 with act = ReLU or GELU."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.config
    h_BxTxF = nn.Dense(
        cfg.d_ff, use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=_dense_init(cfg.init_std, ("embed", "mlp")), bias_init=_zeros(("mlp",)),
        name="fc_in")(x_BxTxD)
    h_BxTxF = nn.relu(h_BxTxF) if cfg.activation == "relu" else gelu(h_BxTxF)
    return nn.Dense(
        cfg.d_model, use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=_dense_init(_residual_std(cfg), ("mlp", "embed")), bias_init=_zeros(("embed",)),
        name="fc_out")(h_BxTxF)


class Block(nn.Module):
  """Pre-LayerNorm residual block: x + Attn(LN(x)), then + FFN(LN(x)).

  With config.residual=False the skip connections are dropped (x = Attn(LN(x)), x = FFN(LN(x))), with
  config.mlp=False the FFN sub-layer is, so pure attention is residual=mlp=layernorm=False.
  Each block sows its output residual stream as 'intermediates'/'residual' (free unless asked for).
  """
  config: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT):
    cfg, deterministic = self.config, self.deterministic
    drop = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    skip = (lambda x: x) if cfg.residual else jnp.zeros_like
    x_BxTxD = skip(x_BxTxD) + drop(CausalSelfAttention(cfg, name="attn")(
        LayerNorm(cfg, name="ln_attn")(x_BxTxD), positions_BxT, deterministic))
    if cfg.mlp:
      x_BxTxD = skip(x_BxTxD) + drop(FeedForward(cfg, name="mlp")(
          LayerNorm(cfg, name="ln_mlp")(x_BxTxD)))
    self.sow("intermediates", "residual", x_BxTxD)
    return x_BxTxD


def _rematerialized(module_cls, remat):
  """`module_cls`, rematerialized in the backward pass as the `remat` setting says."""
  policy = REMAT_POLICIES[remat]
  if policy is None:
    return module_cls
  if policy == "full":
    return nn.remat(module_cls)
  return nn.remat(module_cls, policy=getattr(jax.checkpoint_policies, policy))


def _constrain_residual(x_BxTxD, cfg: ModelConfig):
  """The residual stream between blocks, laid out by the logical axis rules (under a mesh)."""
  return nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed"),
                                    rules=cfg.logical_axis_rules or None)


class _ScanStep(nn.Module):
  """One block as a step of nn.scan: (x, positions) -> (next x, nothing)."""
  config: ModelConfig
  deterministic: bool
  block_cls: Any

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT):
    x_BxTxD = self.block_cls(self.config, self.deterministic, name="block")(x_BxTxD, positions_BxT)
    return _constrain_residual(x_BxTxD, self.config), None


def unrolled(params: dict) -> dict:
  """Parameters with scanned blocks (params['blocks']['block'][...] stacked along a leading axis of
  L) as L separate blocks params['block_0'], ..., params['block_{L-1}']; other trees unchanged."""
  if "blocks" not in params:
    return params
  stacked_tree = params["blocks"]["block"]
  n = jax.tree_util.tree_leaves(stacked_tree)[0].shape[0]
  rest = {k: v for k, v in params.items() if k != "blocks"}
  return {**rest, **{f"block_{i}": jax.tree_util.tree_map(lambda x, i=i: x[i], stacked_tree)
                     for i in range(n)}}


def stacked(params: dict) -> dict:
  """The inverse of `unrolled`: blocks params['block_i'] stacked into params['blocks']['block']."""
  names = sorted((k for k in params if k.startswith("block_")), key=lambda k: int(k[6:]))
  if not names:
    return params
  rest = {k: v for k, v in params.items() if k not in names}
  blocks = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *(params[k] for k in names))
  return {**rest, "blocks": {"block": blocks}}


class Transformer(nn.Module):
  """Decoder-only Transformer: tokens_BxT (int) -> logits_BxTxV (float32), soft-capped at
  config.logit_softcap when that is set."""
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT, deterministic: bool = True, positions_BxT=None,
               return_hidden: bool = False):
    """`positions_BxT` (default 0..T-1) are the tokens' absolute positions; decoding passes them.

    With `return_hidden=True` the final-normed hidden states h_BxTxD are returned instead of the
    logits, for losses that apply the output projection themselves (`chunked_cross_entropy`, with
    `output_kernel(params)` and config.logit_softcap).
    """
    cfg = self.config
    b, t = tokens_BxT.shape
    if t > cfg.max_len:
      raise ValueError(f"sequence length {t} exceeds the model's max_len={cfg.max_len}")
    embed = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=_dense_init(cfg.init_std, ("vocab", "embed")), name="token_embed")
    x_BxTxD = embed(tokens_BxT)
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(t)[None, :], (b, t))
    if cfg.pos_encoding == "learned":
      x_BxTxD += nn.Embed(
          cfg.max_len, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
          embedding_init=_dense_init(cfg.init_std, (None, "embed")), name="pos_embed")(positions_BxT)
    elif cfg.pos_encoding == "sinusoidal":
      x_BxTxD += sinusoidal_positions(cfg.max_len, cfg.d_model)[positions_BxT].astype(cfg.dtype)
    x_BxTxD = nn.Dropout(cfg.dropout_rate)(x_BxTxD, deterministic=deterministic)

    block_cls = _rematerialized(Block, cfg.remat)
    if cfg.scan_layers:
      scanned = nn.scan(_ScanStep, variable_axes={"params": 0, "intermediates": 0, "stats": 0,
                                                  "cache": 0},
                        split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast,),
                        length=cfg.num_layers, unroll=cfg.scan_unroll,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      x_BxTxD, _ = scanned(cfg, deterministic, block_cls, name="blocks")(x_BxTxD, positions_BxT)
    else:
      for i in range(cfg.num_layers):
        x_BxTxD = block_cls(cfg, deterministic, name=f"block_{i}")(x_BxTxD, positions_BxT)
        x_BxTxD = _constrain_residual(x_BxTxD, cfg)

    x_BxTxD = LayerNorm(cfg, name="ln_final")(x_BxTxD)
    if return_hidden and not self.is_initializing():
      return x_BxTxD
    if cfg.tie_embeddings:
      logits_BxTxV = embed.attend(x_BxTxD).astype(jnp.float32)
    else:
      logits_BxTxV = nn.Dense(
          cfg.vocab_size, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
          kernel_init=_dense_init(cfg.init_std, ("embed", "vocab")), name="lm_head")(
              x_BxTxD).astype(jnp.float32)
    return softcap(logits_BxTxV, cfg.logit_softcap)


def per_layer(intermediates):
  """Each layer's sown intermediates, unstacked when the blocks were scanned."""
  if "blocks" in intermediates:
    return [unrolled({"blocks": intermediates["blocks"]})[f"block_{i}"]
            for i in range(len(jax.tree_util.tree_leaves(intermediates["blocks"])[0]))]
  layers = sorted((k for k in intermediates if k.startswith("block_")), key=lambda k: int(k[6:]))
  return [intermediates[k] for k in layers]


def attention_probs(intermediates) -> jax.Array:
  """Stacks the sown attention probabilities of every layer: -> a_LxBxHxTxT (float32).

  Use with `_, state = model.apply(variables, tokens, mutable=['intermediates'])` and pass
  `state['intermediates']`.
  """
  return jnp.stack([layer["attn"]["attention_probs"][0] for layer in per_layer(intermediates)])


def residual_streams(intermediates) -> jax.Array:
  """Stacks every block's output residual stream: -> x_LxBxTxD."""
  return jnp.stack([layer["residual"][0] for layer in per_layer(intermediates)])


def output_kernel(params) -> jax.Array:
  """The output projection W_DxV of a Transformer's params (E^T when the embeddings are tied)."""
  if "lm_head" in params:
    return params["lm_head"]["kernel"]
  return params["token_embed"]["embedding"].T


def chunked_cross_entropy(hidden_BxTxD, kernel_DxV, targets_BxT, chunk: int, weights_BxT=None,
                          logit_softcap: float = 0.0, with_log_z_sq: bool = False, rules=()):
  """`cross_entropy(softcap(hidden @ kernel, logit_softcap), targets, weights, with_log_z_sq)`
  without holding the [B, T, V] logits: (weighted nll sum, weight sum[, weighted log^2 Z sum]).

  The sequence is cut into T / chunk pieces; a `lax.map` computes each piece's float32 logits
  [B, chunk, V] (soft-capped, see `softcap`) and its summed NLL (and log^2 Z), and `jax.checkpoint`
  makes the backward pass recompute them piece by piece. Peak memory for the loss falls from B*T*V
  to B*chunk*V floats (for GPT-2's V = 50304 at B x T = 12 x 1024: 2.5 GB of float32 logits, and as
  much again for their gradient). The batch axis is untouched, so a batch sharded over devices stays
  sharded. The matmul takes its inputs in the hidden states' (compute) dtype and accumulates in
  float32. `logit_softcap` must be the model's (config.logit_softcap), so that this loss is the loss
  of the model's own logits.

  Under a mesh the kernel is laid out whole along d_model (only its vocabulary axis stays split, by
  `rules`) before the loop: gathered once per step. Left to the compiler, a kernel sharded along
  d_model (fsdp) was gathered, and its float32 gradient all-reduced whole, in every iteration
  (XLA:TPU, GPT-2 small at fsdp:4: 2.4 GB of collectives per step instead of 0.3 GB).
  """
  b, t, d = hidden_BxTxD.shape
  if chunk <= 0 or t % chunk:
    raise ValueError(f"loss chunk {chunk} must be positive and divide the sequence length {t}")
  h_NxBxCxD = jnp.moveaxis(hidden_BxTxD.reshape(b, t // chunk, chunk, d), 1, 0)
  y_NxBxC = jnp.moveaxis(targets_BxT.reshape(b, t // chunk, chunk), 1, 0)
  if weights_BxT is None:
    weights_BxT = jnp.ones((b, t), jnp.float32)
  w_NxBxC = jnp.moveaxis(weights_BxT.astype(jnp.float32).reshape(b, t // chunk, chunk), 1, 0)
  dtype = hidden_BxTxD.dtype
  w_DxV = nn.with_logical_constraint(kernel_DxV.astype(dtype), (None, "vocab"), rules=rules or None)

  @jax.checkpoint
  def piece(h_y_w):
    h_BxCxD, y_BxC, weights_BxC = h_y_w
    logits_BxCxV = softcap(jnp.einsum("bcd,dv->bcv", h_BxCxD, w_DxV,
                                      preferred_element_type=jnp.float32), logit_softcap)
    sums = cross_entropy(logits_BxCxV, y_BxC, weights_BxC, with_log_z_sq)
    return (sums[0], sums[2]) if with_log_z_sq else sums[0]

  per_piece = jax.lax.map(piece, (h_NxBxCxD, y_NxBxC, w_NxBxC))
  if with_log_z_sq:
    return jnp.sum(per_piece[0]), jnp.sum(weights_BxT), jnp.sum(per_piece[1])
  return jnp.sum(per_piece), jnp.sum(weights_BxT)


def output_nll(out, params, targets_BxT, weights_BxT=None, loss_chunk: int = 0,
               logit_softcap: float = 0.0, with_log_z_sq: bool = False, rules=()):
  """(weighted NLL sum, weight sum[, weighted log^2 Z sum]) from a Transformer's output: logits,
  or with loss_chunk > 0 the hidden states (`return_hidden=True`), projected `loss_chunk` positions
  at a time (the output kernel laid out by the logical axis `rules`) and soft-capped at
  `logit_softcap` (the model's config.logit_softcap; logits come capped from the model, so the cap
  is only read on the chunked path)."""
  if loss_chunk:
    return chunked_cross_entropy(out, output_kernel(params), targets_BxT, loss_chunk, weights_BxT,
                                 logit_softcap, with_log_z_sq, rules)
  return cross_entropy(out, targets_BxT, weights_BxT, with_log_z_sq)


def cross_entropy(logits_BxTxV, targets_BxT, weights_BxT=None, with_log_z_sq: bool = False):
  """Mean negative log-likelihood in nats over weighted target tokens, and the weight total.

  Returns (sum of weighted NLL, sum of weights) so callers can average across batches exactly; with
  `with_log_z_sq` also sum_t w_t log^2 Z_t, Z_t = sum_v exp(logit_tv) (z-loss's term, whose gradient
  with respect to the logits is 2 w_t log Z_t softmax(logit_t)). The NLL is computed the same way
  either way, so asking for log^2 Z leaves it bit for bit as it was.
  """
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  logprobs = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  nll_BxT = -jnp.take_along_axis(logprobs, targets_BxT[..., None], axis=-1)[..., 0]
  if weights_BxT is None:
    weights_BxT = jnp.ones_like(nll_BxT)
  sums = (jnp.sum(nll_BxT * weights_BxT), jnp.sum(weights_BxT))
  if not with_log_z_sq:
    return sums
  log_z_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  return sums + (jnp.sum(jnp.square(log_z_BxT) * weights_BxT),)
