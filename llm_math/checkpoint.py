"""Atomic, resumable, self-checking checkpoints with orbax.

A checkpoint step holds two items: `state`, the whole `TrainState` (parameters, optimizer state,
step), and `fingerprint`, two checksums of every leaf's bits (sums of the raw words and of their
squares, modulo 2^32), computed on device when the step was saved. Integer sums do not depend on the
order of the reduction, so a restore into another mesh reproduces them exactly. Orbax writes each step to a temporary directory and publishes it when complete, so an
interrupted save never leaves a half checkpoint that a later run would pick up. The data position
needs no saving: training batches are a pure function of (seed, step). Restoring goes straight into
the target sharding (the abstract state carries it).

Damage after the fact (a flipped or truncated data file, deleted files, a step without its commit
marker) is found on restore: by orbax or tensorstore failing, or by the restored values disagreeing
with their fingerprint (corrupt bytes in a compressed chunk can decode "successfully" into other
numbers). `restore_latest` then moves the step aside to `<step>.corrupt`, says so in one line and
tries the next older step. A checkpoint that is intact but written by another model (other shapes
or structure) is a one-line UsageError and never a fallback.
"""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from llm_math import files
from llm_math import sharding
from llm_math.errors import UsageError

COMMIT_MARKER = "commit_success.txt"


def manager(workdir, max_to_keep: int = 2) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      files.path(workdir) / "checkpoints",
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "fingerprint": ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def _words(x: jax.Array) -> jax.Array:
  """The raw bits of `x` as uint32 words (narrower types widened, 64-bit types split in two)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # A trailing axis of two words.
  narrow = {1: jnp.uint8, 2: jnp.uint16}[size]
  return jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)


@jax.jit
def _checksums(leaves: list) -> jax.Array:
  """[num_leaves, 2] uint32: sum of each leaf's words and of their squares, modulo 2^32."""
  def leaf(x):
    w = _words(x)
    return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * w, dtype=jnp.uint32)])
  return jnp.stack([leaf(x) for x in leaves])


def _flat(state) -> dict:
  return {"/".join(k): v for k, v in ocp.tree.to_flat_dict(state).items() if v is not None}


def fingerprint(state) -> dict[str, list[int]]:
  """{leaf path: [checksum, checksum]}: keyed by path, so any tree type with the same leaves agrees."""
  flat = _flat(state)
  sums = np.asarray(jax.device_get(_checksums(list(flat.values())))).astype(np.int64)
  return dict(zip(flat, sums.tolist()))


def compile_fingerprint(abstract_state):
  """Compiles `fingerprint` for states like `abstract_state` (jax.ShapeDtypeStructs with their
  shardings) ahead of the first save: the later call finds the executable in JAX's cache."""
  _checksums.lower(list(_flat(abstract_state).values())).compile()


def save(mngr: ocp.CheckpointManager, step: int, state, wait: bool = False):
  """Saves `state` as `step` (asynchronously unless `wait`)."""
  mngr.save(step, force=True, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), fingerprint=ocp.args.JsonSave(fingerprint(state))))
  if wait:
    mngr.wait_until_finished()


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _structure_mismatch(mngr, step: int, abstract_state) -> str | None:
  """What differs between the checkpoint's tree (from its metadata) and `abstract_state`, or None."""
  saved = ocp.tree.to_flat_dict(mngr.item_metadata(step)["state"])
  wanted = ocp.tree.to_flat_dict(abstract_state)
  for key in sorted(set(saved) | set(wanted), key=lambda k: (k[0] != "params", k)):
    name = "/".join(key)
    if key not in saved or key not in wanted:
      return f"{name} is only in the {'checkpoint' if key in saved else 'model'}"
    a, b = saved[key], wanted[key]
    if tuple(a.shape) != tuple(b.shape) or np.dtype(a.dtype) != np.dtype(b.dtype):
      return (f"{name} is {np.dtype(a.dtype).name}{list(a.shape)} there, "
              f"{np.dtype(b.dtype).name}{list(b.shape)} now")
  return None


def _load(mngr, step: int, abstract_state):
  """The restored state of `step` if it is intact; raises on any damage."""
  if not (files.path(mngr.directory) / str(step) / COMMIT_MARKER).exists():
    raise RuntimeError(f"no {COMMIT_MARKER}: the save never finished")
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), fingerprint=ocp.args.JsonRestore()))
  saved, now = restored.fingerprint, fingerprint(restored.state)
  bad = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
  if bad:
    raise RuntimeError(f"{len(bad)} arrays differ from the values that were saved ({bad[0]}, ...)")
  return restored.state


def move_aside(mngr, step: int) -> str:
  """Renames step directory `<step>` to `<step>.corrupt` (or `.corrupt.N`); returns the new path."""
  source = files.path(mngr.directory) / str(step)
  target = source.with_name(f"{step}.corrupt")
  n = 1
  while target.exists():
    target, n = source.with_name(f"{step}.corrupt.{n}"), n + 1
  source.rename(target)
  mngr.reload()
  return str(target)


def _all_agree(ok: bool) -> bool:
  """True when every process restored its part of the step (one process: `ok`)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def restore_latest(mngr: ocp.CheckpointManager, abstract_state=None, log=print):
  """(state, step) of the newest intact checkpoint, or (None, None) when there is none.

  `abstract_state` (ShapeDtypeStructs with shardings) gives shapes, dtypes and layout; None restores
  host-default arrays. A damaged step is moved aside with a one-line message and the next older one
  is tried; a step written by a different model is a UsageError.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    state, problem = None, None
    try:
      if abstract_state is not None:
        mismatch = _structure_mismatch(mngr, step, abstract_state)
        if mismatch:
          raise UsageError(
              f"checkpoint step {step} in {mngr.directory} was written by a different model "
              f"({mismatch}); use a new --workdir or the config that wrote it")
      state = _load(mngr, step, abstract_state)
    except UsageError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      problem = _first_line(e)
    if _all_agree(problem is None):
      return state, step
    moved = move_aside(mngr, step) if sharding.is_primary() else f"{step}.corrupt"
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"checkpoint step {step} moved aside")
      mngr.reload()
    log(f"checkpoint step {step} is damaged ({problem or 'on another process'}); "
        f"kept it as {moved} and trying the previous step")
  return None, None


def load_params(workdir, step: int | None = None, log=print):
  """(params, step) of a training run's checkpoint (default: the newest intact one), on the host."""
  directory = files.path(workdir) / "checkpoints"
  if not directory.is_dir():
    raise UsageError(f"--workdir={workdir}: no checkpoints/ directory (train a model there first)")
  mngr = manager(workdir)
  try:
    if step is None:
      state, step = restore_latest(mngr, log=log)
      if state is None:
        raise UsageError(f"--workdir={workdir}: no intact checkpoint in {directory}")
    elif step not in mngr.all_steps():
      raise UsageError(f"--workdir={workdir}: no checkpoint at step {step}; have {mngr.all_steps()}")
    else:
      try:
        state = _load(mngr, step, None)
      except Exception as e:  # pylint: disable=broad-except
        raise UsageError(f"--workdir={workdir}: checkpoint step {step} is damaged "
                         f"({_first_line(e)})") from None
  finally:
    mngr.close()
  return state["params"], step
