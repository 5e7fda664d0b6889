"""Compression of weight matrices: SVD truncation and symmetric integer quantization.

Everything here is a pure function over a nested dict of arrays (a flax `params` tree). Matrices
are chosen by a regular expression searched in the '/'-joined key path of each leaf (e.g.
'block_0/attn/query/kernel'). A flax `DenseGeneral` kernel puts its input axes first and its output
axes last, so a kernel with `n_in` input axes is the matrix

  W = kernel.reshape(prod(shape[:n_in]), prod(shape[n_in:]))   # [in, out], y = x @ W

`n_in` is 1 unless a rule in `input_axes` says otherwise (the attention output projection
'attn/out/kernel' of shape [H, Dh, D] has n_in = 2, so its matrix is [H*Dh, D]).

SVD truncation. With W = U S V^T (singular values s_1 >= s_2 >= ...), W_r = U_r S_r V_r^T is the
best rank-r approximation in both the Frobenius and the spectral norm (Eckart-Young-Mirsky):

  ||W - W_r||_F = sqrt(sum_{i>r} s_i^2),   ||W - W_r||_2 = s_{r+1}.

Stored as factors (U_r S_r) [in, r] and V_r^T [r, out] it costs r*(in + out) numbers, not in*out.

Quantization. Symmetric absmax round-to-nearest with b bits: qmax = 2^(b-1) - 1 (127 for int8, 7
for int4), scale = absmax / qmax over a block (the whole tensor, an output column, or a group of g
inputs of one output column), codes = clip(round(w / scale), -qmax, qmax), w_hat = codes * scale, so
|w - w_hat| <= scale / 2 elementwise.

Sweeps. `svd_sweep` and `quant_sweep` score a model after each compression setting with a given
`score(params) -> mean NLL` (an evaluator) and return JSON-ready records: what was kept or stored,
the weight error, and the NLL, perplexity and perplexity change against the uncompressed model.
"""
from collections.abc import Callable, Mapping, Sequence
import functools
import math
import re
from typing import Any

from flax.core import meta as flax_meta
import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm_math.analysis import information

Params = Mapping[str, Any]
InputAxesRules = Sequence[tuple[str, int]]

# Rules (regex over the key path, number of input axes); the first match wins, else 1.
DEFAULT_INPUT_AXES: tuple[tuple[str, int], ...] = ((r"attn/out/kernel$", 2),)
DEFAULT_PATTERN = r"kernel$"
GRANULARITIES = ("per_tensor", "per_channel", "group")
SCALE_DTYPES = {"float16": jnp.float16, "bfloat16": jnp.bfloat16, "float32": jnp.float32}
_SCHEME = re.compile(r"^int(\d+)-(per_tensor|per_channel|group(\d+))$")


# ------------------------------------------------------------------------------------------------
# Parameter-tree plumbing.


def flatten_tree(tree: Params, prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}: every leaf of a nested mapping under its '/'-joined key path."""
  if not isinstance(tree, Mapping):
    raise ValueError(f"tree: expected a nested mapping of arrays, got {type(tree).__name__}")
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      flat.update(flatten_tree(value, path))
    elif isinstance(value, flax_meta.AxisMetadata):
      raise ValueError(f"tree: expected plain arrays at the leaves, '{path}' is a boxed "
                       f"{type(value).__name__}; unbox it first (flax.linen.meta.unbox)")
    else:
      flat[path] = value
  return flat


def unflatten_tree(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b': x} -> {'a': {'b': x}}: the inverse of `flatten_tree`."""
  tree = {}
  for path, leaf in flat.items():
    *parents, name = path.split("/")
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[name] = leaf
  return tree


def replace_leaves(tree: Params, updates: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """A copy of `tree` (as plain dicts) with the leaves at the '/'-joined paths in `updates`
  replaced.

  Leaves not named in `updates` are the same objects as in `tree`.
  """
  out = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      out[key] = replace_leaves(value, updates, path)
    else:
      out[key] = updates.get(path, value)
  return out


def train_only(tx: optax.GradientTransformation, trainable: str) -> optax.GradientTransformation:
  """`tx` on the subtree `params[trainable]`; every other top-level subtree is frozen (zero updates,
  no optimizer state): the optimizer of {"lora": factors, "base": model} or {"student": ...,
  "teacher": ...}. Clipping and weight decay in `tx` see the trainable subtree only.

  The labels are a prefix of the params tree (one per top-level key), so a frozen subtree is masked
  whole, boxes with logical axis names included.
  """
  return optax.multi_transform(
      {"train": tx, "frozen": optax.set_to_zero()},
      lambda params: {key: "train" if key == trainable else "frozen" for key in params})


def num_input_axes(path: str, input_axes: InputAxesRules = DEFAULT_INPUT_AXES) -> int:
  """Number of leading input axes of the kernel at `path`: the first matching rule, else 1."""
  for pattern, n_in in input_axes:
    if re.search(pattern, path):
      return int(n_in)
  return 1


def kernel_to_matrix(kernel: jax.Array, n_in: int = 1) -> jax.Array:
  """Kernel [*in_axes, *out_axes] -> matrix [prod(in_axes), prod(out_axes)] (y = x @ W)."""
  if not 1 <= n_in < kernel.ndim:
    raise ValueError(f"n_in: expected 1 <= n_in < kernel.ndim = {kernel.ndim}, got {n_in}")
  rows = math.prod(kernel.shape[:n_in])
  return jnp.reshape(kernel, (rows, -1))


def matrix_to_kernel(matrix_IxO: jax.Array, shape: Sequence[int]) -> jax.Array:
  """Inverse of `kernel_to_matrix`: reshape [in, out] back to the kernel `shape`."""
  if matrix_IxO.size != math.prod(shape):
    raise ValueError(
        f"shape: expected {matrix_IxO.size} elements to match the matrix, got {tuple(shape)}")
  return jnp.reshape(matrix_IxO, tuple(shape))


def select_matrices(
    params: Params,
    pattern: str = DEFAULT_PATTERN,
    input_axes: InputAxesRules = DEFAULT_INPUT_AXES,
) -> dict[str, int]:
  """{path: n_in} for the leaves whose key path matches `pattern` (re.search), in tree order.

  Raises ValueError if nothing matches or a matched leaf has too few axes to be a matrix.
  """
  selected = {}
  for path, leaf in flatten_tree(params).items():
    if not re.search(pattern, path):
      continue
    n_in = num_input_axes(path, input_axes)
    if np.ndim(leaf) <= n_in:
      raise ValueError(
          f"pattern: matched '{path}' of shape {np.shape(leaf)}, which has no output axis after "
          f"{n_in} input axes")
    selected[path] = n_in
  if not selected:
    raise ValueError(f"pattern: expected to match at least one leaf path, '{pattern}' matched none")
  return selected


def matrix_shapes(
    params: Params,
    pattern: str = DEFAULT_PATTERN,
    input_axes: InputAxesRules = DEFAULT_INPUT_AXES,
) -> dict[str, tuple[int, int]]:
  """{path: (in, out)} of the matrices `pattern` selects; the leaves may be abstract
  (jax.ShapeDtypeStruct, from jax.eval_shape), so nothing is computed."""
  flat = flatten_tree(params)
  return {path: (math.prod(jnp.shape(flat[path])[:n_in]), math.prod(jnp.shape(flat[path])[n_in:]))
          for path, n_in in select_matrices(params, pattern, input_axes).items()}


# ------------------------------------------------------------------------------------------------
# SVD truncation.


def svd(w_IxO: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Thin SVD in float32: u [I, K], s [K] descending, vt [K, O], K = min(I, O); W = u diag(s) vt."""
  if w_IxO.ndim != 2:
    raise ValueError(f"w_IxO: expected a 2-D matrix, got shape {w_IxO.shape}")
  return jnp.linalg.svd(w_IxO.astype(jnp.float32), full_matrices=False)


def low_rank_factors(w_IxO: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
  """Factors (U_r S_r) [I, r], V_r^T [r, O] of the best rank-r approximation W_r = left @ right."""
  u, s, vt = svd(w_IxO)
  rank = _check_rank(rank, s.shape[0])
  return u[:, :rank] * s[None, :rank], vt[:rank]


def truncate_svd(w_IxO: jax.Array, rank: int) -> jax.Array:
  """Best rank-r approximation W_r = U_r S_r V_r^T (Eckart-Young), in float32."""
  u, s, vt = svd(w_IxO)
  return _reconstruct(u, s, vt, _check_rank(rank, s.shape[0]))


@jax.jit
def _reconstruct(u_IxK: jax.Array, s_K: jax.Array, vt_KxO: jax.Array, rank: int) -> jax.Array:
  """U diag(s * [i < r]) V^T: masking instead of slicing keeps one compiled shape for every r."""
  s_kept = jnp.where(jnp.arange(s_K.shape[0]) < rank, s_K, 0.0)
  return (u_IxK * s_kept[None, :]) @ vt_KxO


def truncation_errors(s_K: np.ndarray, rank: int) -> tuple[float, float]:
  """(Frobenius, spectral) error of the rank-r truncation from the singular values alone.

  ||W - W_r||_F = sqrt(sum_{i>r} s_i^2), ||W - W_r||_2 = s_{r+1} (0 when r >= K).
  """
  s_K = np.asarray(s_K, dtype=np.float64)
  rank = _check_rank(rank, s_K.shape[0])
  tail = s_K[rank:]
  return float(np.sqrt(np.sum(tail**2))), float(tail[0]) if tail.size else 0.0


def rank_for_energy(s_K: np.ndarray, energy: float) -> int:
  """Smallest r with sum_{i<=r} s_i^2 >= energy * sum_i s_i^2 (energy in (0, 1])."""
  return int(global_ranks_for_energy([s_K], energy)[0])


def global_ranks_for_energy(singular_values: Sequence[np.ndarray], energy: float) -> list[int]:
  """Per-matrix ranks keeping the fewest singular values, pooled over all matrices, whose energy is
  >= `energy` * the total energy sum_m sum_i s_{m,i}^2.

  Keeping the globally largest s^2 first minimizes the total squared Frobenius error
  sum_m ||W_m - W_m,r_m||_F^2 = sum of the discarded s^2 for the number of singular triplets kept.
  """
  if not 0.0 < energy <= 1.0:
    raise ValueError(f"energy: expected a fraction in (0, 1], got {energy}")
  if not singular_values:
    raise ValueError("singular_values: expected at least one vector of singular values")
  s2 = np.concatenate([np.asarray(s, dtype=np.float64) ** 2 for s in singular_values])
  owner = np.concatenate([np.full(np.size(s), m) for m, s in enumerate(singular_values)])
  # Stable sort: equal values keep their within-matrix order, so each matrix keeps a prefix.
  order = np.argsort(-s2, kind="stable")
  cumulative = np.cumsum(s2[order])
  if cumulative[-1] == 0.0:
    return [0] * len(singular_values)
  n_keep = int(np.searchsorted(cumulative, energy * cumulative[-1], side="left")) + 1
  n_keep = min(n_keep, s2.size)
  return np.bincount(owner[order[:n_keep]], minlength=len(singular_values)).tolist()


def svd_compress_tree(
    params: Params,
    *,
    rank: int | None = None,
    rank_fraction: float | None = None,
    energy: float | None = None,
    pattern: str = DEFAULT_PATTERN,
    input_axes: InputAxesRules = DEFAULT_INPUT_AXES,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Replace the matrices matching `pattern` by best low-rank approximations (dense, same shape).

  Exactly one of:
    rank: the same rank r for every matrix (clipped to min(in, out));
    rank_fraction: r = max(1, round(fraction * min(in, out))) per matrix;
    energy: global selection, `global_ranks_for_energy` over all chosen matrices.

  Returns (new_params, report), report = {'matrices': {path: record}, 'total': record}; a matrix
  record has shape, matrix_shape [in, out], rank, full_rank, frobenius_error (measured
  ||W - W_r||_F), relative_error (/ ||W||_F), energy_kept, params_dense = in*out and
  params_factored = r*(in + out) (storing U_r S_r and V_r^T). Leaves outside the selection are
  returned as the same objects.
  """
  if sum(x is not None for x in (rank, rank_fraction, energy)) != 1:
    raise ValueError("rank/rank_fraction/energy: expected exactly one of them to be given")
  if rank_fraction is not None and not 0.0 < rank_fraction <= 1.0:
    raise ValueError(f"rank_fraction: expected a fraction in (0, 1], got {rank_fraction}")
  flat = flatten_tree(params)
  selected = select_matrices(params, pattern, input_axes)
  factors = {}
  for path, n_in in selected.items():
    factors[path] = svd(kernel_to_matrix(jnp.asarray(flat[path]), n_in))
  if energy is not None:
    ranks = dict(zip(selected, global_ranks_for_energy([np.asarray(f[1]) for f in factors.values()],
                                                       energy)))
  elif rank is not None:
    ranks = {path: _check_rank(rank, f[1].shape[0], clip=True) for path, f in factors.items()}
  else:
    ranks = {path: max(1, int(round(rank_fraction * f[1].shape[0]))) for path, f in factors.items()}

  updates, records = {}, {}
  for path, (u, s, vt) in factors.items():
    kernel = jnp.asarray(flat[path])
    w = kernel_to_matrix(kernel, selected[path]).astype(jnp.float32)
    r = ranks[path]
    w_r = _reconstruct(u, s, vt, r)
    updates[path] = matrix_to_kernel(w_r, kernel.shape).astype(kernel.dtype)
    s64 = np.asarray(s, dtype=np.float64)
    n_rows, n_cols = w.shape
    norm = float(jnp.linalg.norm(w))
    error = float(jnp.linalg.norm(w - w_r))
    records[path] = {
        "shape": tuple(kernel.shape),
        "matrix_shape": (n_rows, n_cols),
        "rank": r,
        "full_rank": int(s.shape[0]),
        "frobenius_error": error,
        "relative_error": error / norm if norm > 0 else 0.0,
        "energy_kept": float(np.sum(s64[:r]**2) / np.sum(s64**2)) if np.any(s64) else 1.0,
        "params_dense": n_rows * n_cols,
        "params_factored": r * (n_rows + n_cols),
    }
  total_energy = sum(float(np.sum(np.asarray(f[1], np.float64)**2)) for f in factors.values())
  kept_energy = sum(float(np.sum(np.asarray(f[1][:ranks[p]], np.float64)**2))
                    for p, f in factors.items())
  total = {
      "params_dense": sum(r["params_dense"] for r in records.values()),
      "params_factored": sum(r["params_factored"] for r in records.values()),
      "frobenius_error": math.sqrt(sum(r["frobenius_error"]**2 for r in records.values())),
      "energy_kept": kept_energy / total_energy if total_energy > 0 else 1.0,
  }
  return replace_leaves(params, updates), {"matrices": records, "total": total}


def _check_rank(rank: int, full_rank: int, clip: bool = False) -> int:
  if int(rank) != rank or rank < 0:
    raise ValueError(f"rank: expected a non-negative integer, got {rank}")
  if rank > full_rank and not clip:
    raise ValueError(f"rank: expected at most min(in, out) = {full_rank}, got {rank}")
  return min(int(rank), full_rank)


# ------------------------------------------------------------------------------------------------
# Symmetric absmax quantization.


def qmax(bits: int) -> int:
  """Largest code of symmetric b-bit quantization: 2^(b-1) - 1 (127 for int8, 7 for int4).

  Two's complement b bits hold [-2^(b-1), 2^(b-1) - 1]; the symmetric grid drops -2^(b-1) so that
  +w and -w get codes of equal magnitude and the absmax maps to +-qmax whatever its sign (with -128
  in use, a block whose absmax is positive could not reach +128). The cost is one unused code:
  log2(256/255) = 0.006 bits for int8, log2(16/15) = 0.09 bits for int4.
  """
  if int(bits) != bits or not 2 <= bits <= 8:
    raise ValueError(f"bits: expected an integer in [2, 8] (codes stored as int8), got {bits}")
  return 2 ** (int(bits) - 1) - 1


def quantize(
    w_IxO: jax.Array,
    bits: int = 8,
    granularity: str = "per_channel",
    group_size: int | None = None,
    scale_dtype: Any = jnp.float32,
) -> tuple[jax.Array, jax.Array]:
  """Symmetric absmax round-to-nearest quantization of a matrix W [in, out] (y = x @ W).

  Blocks that share one scale:
    'per_tensor':  the whole matrix, scales shape [];
    'per_channel': each output column, scales [O];
    'group':       each run of `group_size` = g consecutive inputs of one output column,
                   scales [I/g, O].
  scale = absmax(block) / qmax, rounded to `scale_dtype` (the stored precision) before use;
  codes = clip(round(w / scale), -qmax, qmax) as int8 (int4 codes use the int8 container).
  An all-zero block gets scale 0 and codes 0.

  Returns (codes_IxO int8, scales in scale_dtype).
  """
  q = qmax(bits)
  w = _check_matrix(w_IxO)
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity: expected one of {GRANULARITIES}, got '{granularity}'")
  g = _check_group_size(group_size, w.shape[0]) if granularity == "group" else None
  return _quantize(w, q, granularity, g, jnp.dtype(scale_dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantize(w_IxO, q, granularity, group_size, scale_dtype):
  w = w_IxO.astype(jnp.float32)
  n_rows, n_cols = w.shape
  if granularity == "per_tensor":
    absmax = jnp.max(jnp.abs(w))
  elif granularity == "per_channel":
    absmax = jnp.max(jnp.abs(w), axis=0)
  else:
    absmax = jnp.max(jnp.abs(w.reshape(n_rows // group_size, group_size, n_cols)), axis=1)
  scales = (absmax / q).astype(scale_dtype)
  scale_IxO = broadcast_scales(scales.astype(jnp.float32), (n_rows, n_cols))
  safe = jnp.where(scale_IxO > 0, scale_IxO, 1.0)
  codes = jnp.clip(jnp.round(w / safe), -q, q)
  return codes.astype(jnp.int8), scales


def dequantize(codes_IxO: jax.Array, scales: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """w_hat = codes * scale, the block layout read from the scales' shape ([], [O] or [I/g, O])."""
  codes = _check_matrix(codes_IxO)
  scales = jnp.asarray(scales)
  _check_scales_shape(tuple(scales.shape), tuple(codes.shape))
  return _dequantize(codes, scales, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=2)
def _dequantize(codes_IxO, scales, dtype):
  scale_IxO = broadcast_scales(scales.astype(jnp.float32), codes_IxO.shape)
  return (codes_IxO.astype(jnp.float32) * scale_IxO).astype(dtype)


def quantize_dequantize(w_IxO: jax.Array, bits: int = 8, granularity: str = "per_channel",
                        group_size: int | None = None, scale_dtype: Any = jnp.float32) -> jax.Array:
  """dequantize(quantize(W)) in W's dtype: the matrix a "dequantize on load" model computes with."""
  codes, scales = quantize(w_IxO, bits, granularity, group_size, scale_dtype)
  return dequantize(codes, scales, dtype=jnp.asarray(w_IxO).dtype)


def quantized_size(n_rows: int, n_cols: int, bits: int, n_scales: int,
                   scale_dtype: Any = jnp.float32) -> dict[str, float]:
  """Storage of an [in, out] matrix: codes packed at `bits` each plus `n_scales` scales.

  bits_per_param = bits + scale_bits * n_scales / (in * out); bytes = ceil(in*out*bits / 8) +
  n_scales * scale_bytes. E.g. int4, groups of 128, fp16 scales: 4 + 16/128 = 4.125 bits/param.
  """
  n = n_rows * n_cols
  scale_bytes = jnp.dtype(scale_dtype).itemsize
  return {
      "bits_per_param": bits + 8.0 * scale_bytes * n_scales / n,
      "bytes": math.ceil(n * bits / 8) + n_scales * scale_bytes,
  }


def quantize_tree(
    params: Params,
    bits: int = 8,
    granularity: str = "per_channel",
    group_size: int | None = None,
    scale_dtype: Any = jnp.float32,
    pattern: str = DEFAULT_PATTERN,
    input_axes: InputAxesRules = DEFAULT_INPUT_AXES,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Quantize-dequantize the matrices matching `pattern` ("dequantize on load" for evaluation).

  Each selected kernel is viewed as [prod(input axes), prod(output axes)], so per-channel means per
  output unit (for 'attn/out' [H, Dh, D]: D scales; groups run over the H*Dh inputs).
  Returns (new_params, report), report = {'matrices': {path: record}, 'total': record}; a record has
  shape, matrix_shape, n_params, n_scales, bits_per_param (codes + scales), bytes (packed codes +
  scales), bytes_dense (the original dtype), max_abs_error and relative_error
  (||W - W_hat||_F / ||W||_F).
  Leaves outside the selection are returned as the same objects.
  """
  flat = flatten_tree(params)
  updates, records = {}, {}
  for path, n_in in select_matrices(params, pattern, input_axes).items():
    kernel = jnp.asarray(flat[path])
    w = kernel_to_matrix(kernel, n_in)
    codes, scales = quantize(w, bits, granularity, group_size, scale_dtype)
    w_hat = dequantize(codes, scales)
    updates[path] = matrix_to_kernel(w_hat, kernel.shape).astype(kernel.dtype)
    w32 = w.astype(jnp.float32)
    norm = float(jnp.linalg.norm(w32))
    size = quantized_size(w.shape[0], w.shape[1], bits, int(np.size(scales)), scale_dtype)
    records[path] = {
        "shape": tuple(kernel.shape),
        "matrix_shape": tuple(w.shape),
        "n_params": int(w.size),
        "n_scales": int(np.size(scales)),
        "bits_per_param": size["bits_per_param"],
        "bytes": size["bytes"],
        "bytes_dense": int(w.size) * kernel.dtype.itemsize,
        "max_abs_error": float(jnp.max(jnp.abs(w32 - w_hat))),
        "relative_error": float(jnp.linalg.norm(w32 - w_hat)) / norm if norm > 0 else 0.0,
    }
  n_params = sum(r["n_params"] for r in records.values())
  n_bytes = sum(r["bytes"] for r in records.values())
  total = {
      "n_params": n_params,
      "bytes": n_bytes,
      "bytes_dense": sum(r["bytes_dense"] for r in records.values()),
      "bits_per_param": 8.0 * n_bytes / n_params,
  }
  return replace_leaves(params, updates), {"matrices": records, "total": total}


def _check_matrix(w: jax.Array) -> jax.Array:
  w = jnp.asarray(w)
  if w.ndim != 2:
    raise ValueError(f"w_IxO: expected a 2-D matrix [in, out], got shape {w.shape}")
  return w


def _check_group_size(group_size: int | None, n_rows: int) -> int:
  if group_size is None or int(group_size) != group_size or group_size < 1 or n_rows % group_size:
    raise ValueError(f"group_size: expected a positive divisor of in = {n_rows}, got {group_size}")
  return int(group_size)


def _check_scales_shape(scales_shape: tuple[int, ...], shape: tuple[int, int]) -> None:
  n_rows, n_cols = shape
  ok = (len(scales_shape) == 0 or scales_shape == (n_cols,) or
        (len(scales_shape) == 2 and scales_shape[1] == n_cols and scales_shape[0] > 0 and
         n_rows % scales_shape[0] == 0))
  if not ok:
    raise ValueError(
        f"scales: expected shape [], [{n_cols}] or [in/g, {n_cols}], got {scales_shape}")


def broadcast_scales(scales: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """Scales of shape [] (per tensor), [O] (per channel) or [I/g, O] (groups) -> [I, O]."""
  _check_scales_shape(tuple(scales.shape), shape)
  if scales.ndim == 0:
    return jnp.full(shape, scales)
  if scales.ndim == 1:
    return jnp.broadcast_to(scales[None, :], shape)
  return jnp.repeat(scales, shape[0] // scales.shape[0], axis=0)


# ------------------------------------------------------------------------------------------------
# Sweeps: the model scored after each compression setting.


def nll_record(nll: float, reference_nll: float | None = None) -> dict[str, float]:
  """val_nll (nats/token), val_ppl, bits_per_token and, against `reference_nll` (the uncompressed
  model), ppl_change_pct = 100 (exp(nll - reference) - 1)."""
  record = {"val_nll": float(nll), "val_ppl": information.perplexity(nll),
            "bits_per_token": information.nats_to_bits(nll)}
  if reference_nll is not None:
    record["ppl_change_pct"] = 100.0 * (information.perplexity(nll - reference_nll) - 1.0)
  return record


def parse_scheme(name: str) -> dict[str, Any]:
  """'int8-per_channel' -> {name, bits, granularity, group_size}; 'int4-group32' has group_size 32.

  Raises ValueError for anything but int<bits 2-8>-per_tensor | -per_channel | -group<g>.
  """
  m = _SCHEME.match(name.strip())
  if not m or not 2 <= int(m.group(1)) <= 8 or (m.group(3) and int(m.group(3)) < 1):
    raise ValueError(f"scheme: {name.strip()!r} is not int<bits 2-8>-per_tensor, "
                     "int<bits>-per_channel or int<bits>-group<g>")
  group = int(m.group(3)) if m.group(3) else None
  return {"name": name.strip(), "bits": int(m.group(1)),
          "granularity": "group" if group else m.group(2), "group_size": group}


def svd_sweep(
    params: Params,
    score: Callable[[Params], float],
    reference_nll: float,
    *,
    rank_fractions: Sequence[float] = (),
    energies: Sequence[float] = (),
    pattern: str = DEFAULT_PATTERN,
    input_axes: InputAxesRules = DEFAULT_INPUT_AXES,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
  """Perplexity vs rank: each rank fraction kept in every matrix ('uniform', r = max(1,
  round(fraction * min(in, out)))), then each energy budget over all matrices ('global energy').

  Returns {pattern, records, spectra {path: singular values}, matrix_shapes {path: [in, out]}}. A
  record has method, setting, ranks {path: r}, singular_values_kept = sum r / sum min(in, out),
  energy_kept, relative_error = sqrt(sum_m ||W_m - W_m,r||_F^2 / sum_m ||W_m||_F^2),
  params_dense, params_factored (sum r (in + out)) and the `nll_record` of score(truncated params).
  """
  flat = flatten_tree(params)
  spectra = {path: np.asarray(svd(kernel_to_matrix(jnp.asarray(flat[path]), n_in))[1], np.float64)
             for path, n_in in select_matrices(params, pattern, input_axes).items()}
  total_s2 = sum(float(np.sum(s**2)) for s in spectra.values())
  records = []
  for method, key, values in (("uniform", "rank_fraction", rank_fractions),
                              ("global energy", "energy", energies)):
    for value in values:
      compressed, report = svd_compress_tree(params, pattern=pattern, input_axes=input_axes,
                                             **{key: value})
      ranks = {path: m["rank"] for path, m in report["matrices"].items()}
      total = report["total"]
      records.append({
          "method": method, "setting": float(value), "ranks": ranks,
          "singular_values_kept": sum(ranks.values()) / sum(s.size for s in spectra.values()),
          "energy_kept": total["energy_kept"],
          "relative_error": total["frobenius_error"] / math.sqrt(total_s2),
          "params_dense": total["params_dense"], "params_factored": total["params_factored"],
          **nll_record(score(compressed), reference_nll)})
      if log:
        r = records[-1]
        log(f"  svd {method:14s} {value:6.3f}: {r['singular_values_kept']:.3f} of singular values, "
            f"ppl {r['val_ppl']:.3f} ({r['ppl_change_pct']:+.2f}%)")
  return {"pattern": pattern, "records": records,
          "spectra": {path: s.tolist() for path, s in spectra.items()},
          "matrix_shapes": {path: list(shape) for path, shape in
                            matrix_shapes(params, pattern, input_axes).items()}}


def quant_sweep(
    params: Params,
    score: Callable[[Params], float],
    reference_nll: float,
    schemes: Sequence[str],
    *,
    scale_dtype: str = "float16",
    pattern: str = DEFAULT_PATTERN,
    input_axes: InputAxesRules = DEFAULT_INPUT_AXES,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
  """Perplexity and storage per quantization scheme ('int4-group32', see `parse_scheme`), after a
  float32 record (the reference itself), with scales stored as `scale_dtype`.

  Returns {pattern, scale_dtype, params_quantized, params_total, records}. A record has scheme,
  bits, granularity, group_size, bits_per_param (codes + scales), bytes (of the quantized
  matrices), model_bytes (+ the other parameters in float32), relative_error
  (||W - W_hat||_F / ||W||_F over all quantized matrices), max_relative_error (the worst matrix)
  and the `nll_record` of score(dequantized params).
  """
  if scale_dtype not in SCALE_DTYPES:
    raise ValueError(f"scale_dtype: expected one of {', '.join(SCALE_DTYPES)}, got {scale_dtype!r}")
  flat = flatten_tree(params)
  selected = select_matrices(params, pattern, input_axes)
  n_quantized = sum(int(np.size(flat[path])) for path in selected)
  n_total = sum(int(np.size(leaf)) for leaf in flat.values())
  norms2 = {path: float(jnp.sum(jnp.asarray(flat[path], jnp.float32)**2)) for path in selected}
  records = [{"scheme": "float32", "bits": 32, "granularity": "-", "group_size": None,
              "bits_per_param": 32.0, "bytes": 4 * n_quantized, "model_bytes": 4 * n_total,
              "relative_error": 0.0, "max_relative_error": 0.0,
              **nll_record(reference_nll, reference_nll)}]
  for scheme in map(parse_scheme, schemes):
    quantized, report = quantize_tree(
        params, bits=scheme["bits"], granularity=scheme["granularity"],
        group_size=scheme["group_size"], scale_dtype=SCALE_DTYPES[scale_dtype], pattern=pattern,
        input_axes=input_axes)
    mats = report["matrices"]
    err2 = sum(m["relative_error"]**2 * norms2[path] for path, m in mats.items())
    records.append({
        "scheme": scheme["name"], "bits": scheme["bits"], "granularity": scheme["granularity"],
        "group_size": scheme["group_size"], "bits_per_param": report["total"]["bits_per_param"],
        "bytes": report["total"]["bytes"],
        "model_bytes": report["total"]["bytes"] + 4 * (n_total - n_quantized),
        "relative_error": math.sqrt(err2 / sum(norms2.values())),
        "max_relative_error": max(m["relative_error"] for m in mats.values()),
        **nll_record(score(quantized), reference_nll)})
    if log:
      r = records[-1]
      log(f"  quant {r['scheme']:16s}: {r['bits_per_param']:.3f} bits/param, "
          f"ppl {r['val_ppl']:.3f} ({r['ppl_change_pct']:+.2f}%)")
  return {"pattern": pattern, "scale_dtype": scale_dtype, "params_quantized": n_quantized,
          "params_total": n_total, "records": records}
