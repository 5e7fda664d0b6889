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


class CausalSelfAttention(nn.Module):
  """Multi-head softmax(QK^T / sqrt(d_k)) V attention; causal unless config.causal is False."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, deterministic: bool):
    cfg = self.config
    qkv = lambda name: nn.DenseGeneral(
        features=(cfg.num_heads, cfg.head_dim), use_bias=cfg.use_bias, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, kernel_init=_dense_init(cfg.init_std, ("embed", "heads", "kv")),
        bias_init=_zeros(("heads", "kv")), name=name)(x_BxTxD)
    q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = qkv("query"), qkv("key"), qkv("value")
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
    if cfg.causal or cfg.decode:
      # Key s is visible to the query at position t when s <= t (in decode mode keys are cache slots).
      key_pos_S = jnp.arange(k_BxTxHxK.shape[1])
      query_pos_BxT = positions_BxT if cfg.decode else jnp.arange(x_BxTxD.shape[1])[None, :]
      mask_BxTxS = key_pos_S[None, None, :] <= query_pos_BxT[:, :, None]
      logits_BxHxTxS = jnp.where(mask_BxTxS[:, None], logits_BxHxTxS, jnp.finfo(jnp.float32).min)
    probs_BxHxTxS = jax.nn.softmax(logits_BxHxTxS, axis=-1)
    self.sow("intermediates", "attention_probs", probs_BxHxTxS)
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
  """Decoder-only Transformer: tokens_BxT (int) -> logits_BxTxV (float32)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT, deterministic: bool = True, positions_BxT=None,
               return_hidden: bool = False):
    """`positions_BxT` (default 0..T-1) are the tokens' absolute positions; decoding passes them.

    With `return_hidden=True` the final-normed hidden states h_BxTxD are returned instead of the
    logits, for losses that apply the output projection themselves (`chunked_cross_entropy`, with
    `output_kernel(params)`).
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
      scanned = nn.scan(_ScanStep, variable_axes={"params": 0, "intermediates": 0, "cache": 0},
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
      return embed.attend(x_BxTxD).astype(jnp.float32)
    return nn.Dense(
        cfg.vocab_size, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=_dense_init(cfg.init_std, ("embed", "vocab")), name="lm_head")(
            x_BxTxD).astype(jnp.float32)


def _per_layer(intermediates):
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
  return jnp.stack([layer["attn"]["attention_probs"][0] for layer in _per_layer(intermediates)])


def residual_streams(intermediates) -> jax.Array:
  """Stacks every block's output residual stream: -> x_LxBxTxD."""
  return jnp.stack([layer["residual"][0] for layer in _per_layer(intermediates)])


def output_kernel(params) -> jax.Array:
  """The output projection W_DxV of a Transformer's params (E^T when the embeddings are tied)."""
  if "lm_head" in params:
    return params["lm_head"]["kernel"]
  return params["token_embed"]["embedding"].T


def chunked_cross_entropy(hidden_BxTxD, kernel_DxV, targets_BxT, chunk: int, weights_BxT=None,
                          rules=()):
  """`cross_entropy(hidden @ kernel, targets, weights)` without holding the [B, T, V] logits:
  (weighted nll sum, weight sum).

  The sequence is cut into T / chunk pieces; a `lax.map` computes each piece's float32 logits
  [B, chunk, V] and its summed NLL, and `jax.checkpoint` makes the backward pass recompute them piece
  by piece. Peak memory for the loss falls from B*T*V to B*chunk*V floats (for GPT-2's V = 50304 at
  B x T = 12 x 1024: 2.5 GB of float32 logits, and as much again for their gradient). The batch axis
  is untouched, so a batch sharded over devices stays sharded. The matmul takes its inputs in the
  hidden states' (compute) dtype and accumulates in float32.

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
    logits_BxCxV = jnp.einsum("bcd,dv->bcv", h_BxCxD, w_DxV,
                              preferred_element_type=jnp.float32)
    return cross_entropy(logits_BxCxV, y_BxC, weights_BxC)[0]

  return jnp.sum(jax.lax.map(piece, (h_NxBxCxD, y_NxBxC, w_NxBxC))), jnp.sum(weights_BxT)


def output_nll(out, params, targets_BxT, weights_BxT=None, loss_chunk: int = 0, rules=()):
  """(weighted NLL sum, weight sum) from a Transformer's output: logits, or with loss_chunk > 0 the
  hidden states (`return_hidden=True`), projected `loss_chunk` positions at a time (the output
  kernel laid out by the logical axis `rules`)."""
  if loss_chunk:
    return chunked_cross_entropy(out, output_kernel(params), targets_BxT, loss_chunk, weights_BxT,
                                 rules)
  return cross_entropy(out, targets_BxT, weights_BxT)


def cross_entropy(logits_BxTxV, targets_BxT, weights_BxT=None):
  """Mean negative log-likelihood in nats over weighted target tokens, and the weight total.

  Returns (sum of weighted NLL, sum of weights) so callers can average across batches exactly.
  """
  logprobs = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  nll_BxT = -jnp.take_along_axis(logprobs, targets_BxT[..., None], axis=-1)[..., 0]
  if weights_BxT is None:
    weights_BxT = jnp.ones_like(nll_BxT)
  return jnp.sum(nll_BxT * weights_BxT), jnp.sum(weights_BxT)
