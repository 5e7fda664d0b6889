"""LoRA (low-rank adaptation) as a pure transform of a flax params tree.

A target kernel, viewed as the matrix W [in, out] with y = x @ W (see
`compression.kernel_to_matrix`; 'attn/out/kernel' [H, Dh, D] has 2 input axes), is adapted as

  W' = W + (alpha / r) * a @ b,     a [in, r] ~ N(0, 1/in),  b [r, out] = 0 at init,

and W' is reshaped back to the kernel's shape. This is the paper's W' = W + (alpha/r) B A with
h = W x, written in flax's transposed layout: a = A^T, b = B^T. Since b = 0 at init the adapted
model starts equal to the base model, and alpha/r keeps the update's size roughly independent of r.

Parameter count per adapted matrix: r * (in + out) instead of in * out. For a square d = 4096 matrix
and r = 8: 8 * 8192 = 65,536 versus 16,777,216, i.e. 256x fewer.

Training design: the LoRA factors live in their own pytree (`LoraParams`, a flax struct whose
leaves are only the factors; alpha and the kernel layouts are static fields). The loss is
differentiated with respect to that tree alone,
`lambda lora: loss_fn(apply_lora(frozen_params, lora), batch)` (see `lora_loss` /
`make_lora_train_step`), so the base parameters are an input that receives no gradient, carries no
optimizer state, and is never written. `merge_lora` folds the factors into the kernels for inference
(one dense matmul per layer, no extra latency).
"""
from collections.abc import Callable, Mapping
import math
from typing import Any

from flax import struct
import jax
import jax.numpy as jnp
import optax

from llm_math.analysis import compression

Params = Mapping[str, Any]
DEFAULT_TARGETS = r"attn/(query|value)/kernel$"


@struct.dataclass
class LoraParams:
  """LoRA factors {path: {'a': [in, r], 'b': [r, out]}} plus static alpha and input-axis counts.

  Only `factors` are pytree leaves (what jax.grad and optax see); `alpha` and `input_axes`
  (a tuple of (path, n_in) pairs) are static metadata.
  """
  factors: dict[str, dict[str, jax.Array]]
  alpha: float = struct.field(pytree_node=False)
  input_axes: tuple[tuple[str, int], ...] = struct.field(pytree_node=False)


def init_lora(
    key: jax.Array,
    params: Params,
    rank: int,
    alpha: float,
    targets: str = DEFAULT_TARGETS,
    input_axes: compression.InputAxesRules = compression.DEFAULT_INPUT_AXES,
    dtype: Any = jnp.float32,
) -> LoraParams:
  """Factors for every kernel whose key path matches `targets` (default: attention query and value).

  a [in, r] ~ N(0, 1/in) (one independent key per matrix), b [r, out] = 0, scaling alpha / r.
  """
  if int(rank) != rank or rank < 1:
    raise ValueError(f"rank: expected a positive integer, got {rank}")
  if not alpha > 0:
    raise ValueError(f"alpha: expected a positive scale, got {alpha}")
  flat = compression.flatten_tree(params)
  selected = compression.select_matrices(params, targets, input_axes)
  keys = jax.random.split(key, len(selected))
  factors = {}
  for k, (path, n_in) in zip(keys, selected.items()):
    shape = jnp.shape(flat[path])
    d_in, d_out = math.prod(shape[:n_in]), math.prod(shape[n_in:])
    if rank > min(d_in, d_out):
      raise ValueError(
          f"rank: expected at most min(in, out) = {min(d_in, d_out)} for '{path}', got {rank}")
    factors[path] = {
        "a": (jax.random.normal(k, (d_in, rank), jnp.float32) / math.sqrt(d_in)).astype(dtype),
        "b": jnp.zeros((rank, d_out), dtype),
    }
  return LoraParams(factors=factors, alpha=float(alpha), input_axes=tuple(selected.items()))


def lora_scaling(lora: LoraParams, path: str) -> float:
  """alpha / r for the matrix at `path` (r read from its factor shapes)."""
  return lora.alpha / lora.factors[path]["a"].shape[1]


def lora_deltas(lora: LoraParams, params: Params) -> dict[str, jax.Array]:
  """{path: (alpha/r) * a @ b reshaped to the kernel's shape} for every adapted kernel."""
  flat = compression.flatten_tree(params)
  deltas = {}
  for path, _ in lora.input_axes:
    if path not in flat:
      raise ValueError(f"params: expected a leaf at '{path}' (the LoRA was built for another tree)")
    f = lora.factors[path]
    delta_IxO = lora_scaling(lora, path) * (f["a"] @ f["b"])
    deltas[path] = compression.matrix_to_kernel(delta_IxO, jnp.shape(flat[path]))
  return deltas


def apply_lora(params: Params, lora: LoraParams) -> dict[str, Any]:
  """params' with W' = W + (alpha/r) a @ b at the adapted kernels (in W's dtype), others as is.

  Differentiable in `lora`; the base `params` enter only as constants of the sum.
  """
  flat = compression.flatten_tree(params)
  updates = {path: (flat[path] + delta).astype(jnp.asarray(flat[path]).dtype)
             for path, delta in lora_deltas(lora, params).items()}
  return compression.replace_leaves(params, updates)


def merge_lora(params: Params, lora: LoraParams) -> dict[str, Any]:
  """Inference weights: the factors folded into the kernels, W + (alpha/r) a @ b (= `apply_lora`).

  The merged model has the base model's architecture and cost; to detach the adapter again subtract
  the same delta (exact up to float rounding).
  """
  return apply_lora(params, lora)


def lora_dense(x_NxI: jax.Array, w_IxO: jax.Array, a_IxR: jax.Array, b_RxO: jax.Array,
               scaling: float) -> jax.Array:
  """Unmerged LoRA matmul x @ W + scaling * (x @ a) @ b = x @ (W + scaling * a @ b).

  The base weight is shared and the adapter applied on the side (as when serving several adapters
  on one base model).
  """
  return x_NxI @ w_IxO + scaling * ((x_NxI @ a_IxR) @ b_RxO)


def lora_param_count(lora: LoraParams) -> int:
  """Total LoRA parameters: sum over adapted matrices of r * (in + out)."""
  return sum(f["a"].size + f["b"].size for f in lora.factors.values())


def adapted_param_count(lora: LoraParams) -> int:
  """Parameters of the adapted matrices themselves: sum of in * out."""
  return sum(f["a"].shape[0] * f["b"].shape[1] for f in lora.factors.values())


def lora_reduction(d_in: int, d_out: int, rank: int) -> float:
  """in * out / (r * (in + out)): how many times fewer trainable parameters than full fine-tuning of
  one matrix; d_in = d_out = 4096, r = 8 gives 4096^2 / (8 * 8192) = 256."""
  if min(d_in, d_out, rank) < 1:
    raise ValueError(f"d_in/d_out/rank: expected positive sizes, got {(d_in, d_out, rank)}")
  return d_in * d_out / (rank * (d_in + d_out))


def lora_loss(loss_fn: Callable[..., jax.Array], frozen_params: Params) -> Callable[..., jax.Array]:
  """lora, *args -> loss_fn(apply_lora(frozen_params, lora), *args): a loss of the factors only.

  jax.grad of the result gives gradients for the factors and nothing for `frozen_params`.
  """
  return lambda lora, *args: loss_fn(apply_lora(frozen_params, lora), *args)


def make_lora_train_step(
    loss_fn: Callable[[Params, Any], jax.Array],
    optimizer: optax.GradientTransformation,
) -> Callable[..., tuple[LoraParams, Any, jax.Array]]:
  """A jitted step (lora, opt_state, frozen_params, batch) -> (lora, opt_state, loss).

  `loss_fn(params, batch)` is the ordinary loss of the full model; the step differentiates
  loss_fn(apply_lora(frozen_params, lora), batch) with respect to `lora` only, and `opt_state` is
  `optimizer.init(lora)`. `frozen_params` is an argument (not a closure) so it is not baked into the
  compiled program as a constant.
  """

  @jax.jit
  def step(lora, opt_state, frozen_params, batch):
    loss, grads = jax.value_and_grad(lora_loss(loss_fn, frozen_params))(lora, batch)
    updates, opt_state = optimizer.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss

  return step
