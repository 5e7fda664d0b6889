"""LoRA (low-rank adaptation) as a pure transform of a flax params tree.

A target kernel, viewed as the matrix W [in, out] with y = x @ W (see
`compression.kernel_to_matrix`; 'attn/out/kernel' [H, Dh, D] has 2 input axes), is adapted as

  W' = W + (alpha / r) * a @ b,     a [in, r] ~ N(0, 1/in),  b [r, out] = 0 at init,

and W' is reshaped back to the kernel's shape (a kernel lists its input axes first, so the reshape
needs no axis bookkeeping). This is the paper's W' = W + (alpha/r) B A with h = W x, written in
flax's transposed layout: a = A^T, b = B^T. Since b = 0 at init the adapted model starts equal to the
base model, and alpha/r keeps the update's size roughly independent of r.

Parameter count per adapted matrix: r * (in + out) instead of in * out. For a square d = 4096 matrix
and r = 8: 8 * 8192 = 65,536 versus 16,777,216, i.e. 256x fewer.

The factors are a plain nested dict that mirrors the params tree down to each adapted kernel, whose
leaf is {'a': [in, r], 'b': [r, out]}: a pytree that optax, jit and checkpoints take as it is.
Training holds {"base": params, "lora": factors}: `lora_loss` differentiates through the factors
only (a stop_gradient on the base) and `compression.train_only(tx, "lora")` gives the base zero
updates and no optimizer state. `apply_lora` folds the factors into the kernels (one dense matmul
per layer at inference, no extra latency).
"""
from collections.abc import Callable, Mapping
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from llm_math.analysis import compression

Params = Mapping[str, Any]
DEFAULT_TARGETS = r"attn/(query|value)/kernel$"


def init_lora(
    key: jax.Array,
    params: Params,
    rank: int,
    targets: str = DEFAULT_TARGETS,
    input_axes: compression.InputAxesRules = compression.DEFAULT_INPUT_AXES,
    dtype: Any = jnp.float32,
) -> dict[str, Any]:
  """Factors for every kernel whose key path matches `targets` (default: attention query and value):
  a [in, r] ~ N(0, 1/in) (one independent key per matrix), b [r, out] = 0.

  `params` may be abstract (shapes only): nothing of it is read but its shapes.
  """
  if int(rank) != rank or rank < 1:
    raise ValueError(f"rank: expected a positive integer, got {rank}")
  shapes = compression.matrix_shapes(params, targets, input_axes)
  keys = jax.random.split(key, len(shapes))
  factors = {}
  for k, (path, (d_in, d_out)) in zip(keys, shapes.items()):
    if rank > min(d_in, d_out):
      raise ValueError(
          f"rank: expected at most min(in, out) = {min(d_in, d_out)} for '{path}', got {rank}")
    factors[path] = {
        "a": (jax.random.normal(k, (d_in, rank), jnp.float32) / math.sqrt(d_in)).astype(dtype),
        "b": jnp.zeros((rank, d_out), dtype),
    }
  return compression.unflatten_tree(factors)


def factor_pairs(factors: Params) -> dict[str, tuple[jax.Array, jax.Array]]:
  """{kernel path: (a, b)} of a factors tree."""
  flat = compression.flatten_tree(factors)
  return {path[:-2]: (flat[path], flat[path[:-1] + "b"]) for path in flat if path.endswith("/a")}


def lora_deltas(params: Params, factors: Params, alpha: float) -> dict[str, jax.Array]:
  """{path: (alpha/r) * a @ b reshaped to the kernel's shape} for every adapted kernel."""
  if not alpha > 0:
    raise ValueError(f"alpha: expected a positive scale, got {alpha}")
  flat = compression.flatten_tree(params)
  deltas = {}
  for path, (a_IxR, b_RxO) in factor_pairs(factors).items():
    if path not in flat:
      raise ValueError(f"params: expected a leaf at '{path}' (the LoRA was built for another tree)")
    deltas[path] = compression.matrix_to_kernel(alpha / a_IxR.shape[1] * (a_IxR @ b_RxO),
                                                jnp.shape(flat[path]))
  return deltas


def apply_lora(params: Params, factors: Params, alpha: float) -> dict[str, Any]:
  """params with W' = W + (alpha/r) a @ b at the adapted kernels (in W's dtype), others as they are:
  the merged inference weights, with the base model's architecture and cost.

  Differentiable in `factors`; subtracting the same deltas detaches the adapter again (up to float
  rounding).
  """
  flat = compression.flatten_tree(params)
  updates = {path: (flat[path] + delta).astype(jnp.asarray(flat[path]).dtype)
             for path, delta in lora_deltas(params, factors, alpha).items()}
  return compression.replace_leaves(params, updates)


def lora_loss(loss_fn: Callable, alpha: float) -> Callable:
  """tree, *args -> loss_fn(apply_lora(stop_gradient(tree["base"]), tree["lora"], alpha), *args):
  a loss of {"base": params, "lora": factors} whose gradient reaches the factors only."""
  return lambda tree, *args: loss_fn(
      apply_lora(jax.lax.stop_gradient(tree["base"]), tree["lora"], alpha), *args)


def lora_task(task, base_init: Callable, base_params: Params, rank: int, alpha: float,
              targets: str = DEFAULT_TARGETS):
  """`task` (a train.Task of the model `base_params` belong to) as LoRA fine-tuning: params
  {"base": base_init(rng) (the base, boxed to shard like the model), "lora": init_lora(rng,
  base_params, rank, targets)}, the task's loss on the adapted model (`lora_loss`), and the task's
  optimizer on the factors only (`compression.train_only`)."""
  init = lambda rng: {"base": base_init(rng), "lora": init_lora(rng, base_params, rank, targets)}
  return dataclasses.replace(task, init=init, loss=lora_loss(task.loss, alpha),
                             tx=compression.train_only(task.tx, "lora"))


def lora_dense(x_NxI: jax.Array, w_IxO: jax.Array, a_IxR: jax.Array, b_RxO: jax.Array,
               scaling: float) -> jax.Array:
  """Unmerged LoRA matmul x @ W + scaling * (x @ a) @ b = x @ (W + scaling * a @ b).

  The base weight is shared and the adapter applied on the side (as when serving several adapters
  on one base model).
  """
  return x_NxI @ w_IxO + scaling * ((x_NxI @ a_IxR) @ b_RxO)


def lora_param_count(factors: Params) -> int:
  """Total LoRA parameters: sum over adapted matrices of r * (in + out)."""
  return sum(math.prod(a.shape) + math.prod(b.shape) for a, b in factor_pairs(factors).values())


def adapted_param_count(factors: Params) -> int:
  """Parameters of the adapted matrices themselves: sum of in * out."""
  return sum(a.shape[0] * b.shape[1] for a, b in factor_pairs(factors).values())


def lora_reduction(d_in: int, d_out: int, rank: int) -> float:
  """in * out / (r * (in + out)): how many times fewer trainable parameters than full fine-tuning of
  one matrix; d_in = d_out = 4096, r = 8 gives 4096^2 / (8 * 8192) = 256."""
  if min(d_in, d_out, rank) < 1:
    raise ValueError(f"d_in/d_out/rank: expected positive sizes, got {(d_in, d_out, rank)}")
  return d_in * d_out / (rank * (d_in + d_out))


def share_of_gain(no_tuning_nll: float, full_nll: float, adapted_nll: float) -> float:
  """(no_tuning - adapted) / (no_tuning - full): the share of full fine-tuning's NLL gain an
  adapter recovers (1 = as good as full fine-tuning; NaN when full fine-tuning gained nothing)."""
  gain = no_tuning_nll - full_nll
  return (no_tuning_nll - adapted_nll) / gain if gain > 0 else math.nan
