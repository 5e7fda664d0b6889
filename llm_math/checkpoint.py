"""Atomic, resumable checkpoints with orbax.

A checkpoint is the whole `TrainState` (parameters, optimizer state, step). Orbax writes each one to a
temporary directory and renames it when complete, so an interrupted save never leaves a half checkpoint
that a later run would pick up. The data position needs no saving: training batches are a pure function
of (seed, step). Restoring goes straight into the target sharding (the abstract state carries it).
"""

import os

import jax
import orbax.checkpoint as ocp

from llm_math.errors import UsageError


def manager(workdir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save(mngr: ocp.CheckpointManager, step: int, state, wait: bool = False):
  mngr.save(step, args=ocp.args.StandardSave(state), force=True)
  if wait:
    mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state):
  """Restores `step` into the shapes, dtypes and shardings of `abstract_state` (ShapeDtypeStructs)."""
  saved = mngr.item_metadata(step)
  saved_params = saved.get("params") if hasattr(saved, "get") else getattr(saved, "params", None)
  saved_shapes = _shapes(saved_params)
  wanted_shapes = _shapes(abstract_state.params)
  if saved_shapes is not None and saved_shapes != wanted_shapes:
    diff = next((k for k in sorted(set(saved_shapes) | set(wanted_shapes))
                 if saved_shapes.get(k) != wanted_shapes.get(k)), "?")
    raise UsageError(
        f"checkpoint step {step} in {mngr.directory} was written by a different model: {diff} has "
        f"shape {saved_shapes.get(diff)} there, {wanted_shapes.get(diff)} in this config; use a new "
        "--workdir or the config that wrote it")
  return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))


def _shapes(tree):
  """{'/'-joined path: shape} of the array leaves of a state or of its saved metadata."""
  if tree is None:
    return None
  try:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  except Exception:  # pylint: disable=broad-except
    return None
  out = {}
  for path, leaf in flat:
    shape = getattr(leaf, "shape", None)
    if shape is not None:
      key = "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)
      out[key] = tuple(shape)
  return out
