"""Atomic, resumable checkpoints with orbax.

A checkpoint is the whole `TrainState` (parameters, optimizer state, step). Orbax writes each one to a
temporary directory and renames it when complete, so an interrupted save never leaves a half checkpoint
that a later run would pick up. The data position needs no saving: training batches are a pure function
of (seed, step). Restoring goes straight into the target sharding (the abstract state carries it).
"""

import os

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
  """Restores `step` into the shapes, dtypes and shardings of `abstract_state` (ShapeDtypeStructs).

  A checkpoint written by a model of another shape or structure is a UsageError naming the mismatch.
  """
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except (ValueError, KeyError, TypeError) as e:
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UsageError(
        f"checkpoint step {step} in {mngr.directory} was written by a different model ({detail}); "
        "use a new --workdir or the config that wrote it") from None


def load_params(workdir: str, step: int | None = None):
  """(params, step) of a training run's checkpoint (default: the latest), as host arrays."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise UsageError(f"--workdir={workdir}: no checkpoints/ directory (train a model there first)")
  mngr = manager(workdir)
  step = mngr.latest_step() if step is None else step
  if step is None or step not in mngr.all_steps():
    raise UsageError(f"--workdir={workdir}: no checkpoint at step {step}; have {mngr.all_steps()}")
  restored = mngr.restore(step, args=ocp.args.StandardRestore())
  mngr.close()
  return restored["params"], step
