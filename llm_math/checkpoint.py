"""Atomic, resumable, self-checking checkpoints with orbax.

A checkpoint step holds two items: `state`, the whole `TrainState` (parameters, optimizer state,
step), and `fingerprint`, two position-aware checksums of every leaf, computed on device when the
step was saved (see `fingerprint`). Orbax writes each step to a temporary directory and publishes it
when complete, so an interrupted save never leaves a half checkpoint that a later run would pick up.
The data position needs no saving: training batches are a pure function of (seed, step). Restoring
goes straight into the target sharding (the abstract state carries it); readers of a finished run
(`load_params`) restore into their own devices, whatever mesh wrote the step.

What a failed restore means decides what happens to the step (`classify`):
- **damage** (the step's bytes are not what was saved): no commit marker, values that disagree with
  their fingerprint (corrupt bytes in a compressed chunk can decode "successfully" into other
  numbers), chunks that do not decode, files missing from a committed step. Training moves such a
  step aside to `<step>.corrupt`, says so in one line and tries the next older step; a reader skips
  it and never renames anything.
- **trouble** (everything else: memory, storage access, a transient error, a layout this process
  cannot hold): a one-line UsageError, and nothing is renamed or rewritten, so the run is intact
  when the cause is fixed.
A checkpoint that is intact but written by another model (other shapes or structure) is a one-line
UsageError too. A step without its `fingerprint` item restores with a warning.
"""

import dataclasses
import errno
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from llm_math import data as data_lib
from llm_math import files
from llm_math import model as model_lib
from llm_math import sharding
from llm_math import tokenizers
from llm_math import train_config
from llm_math.errors import UsageError

COMMIT_MARKER = "commit_success.txt"
FINGERPRINT_SCHEME = "index-mixed-v2"


class IntegrityError(RuntimeError):
  """A checkpoint step's stored bytes are not what was saved."""


# Where a run's checkpoints live: the rolling ones a run resumes from, and the log-spaced snapshots
# (config.checkpoint_schedule='log', `log_spaced`) that analyses over training read; same format.
ROLLING, SNAPSHOTS = "checkpoints", "snapshots"


def log_spaced(step: int, every: int) -> bool:
  """Whether `step` is a snapshot of the 'log' schedule: 0, 1, 2, 4, 8, ... below `every`, then
  every `every` steps (Pythia's: 0, 1, 2, 4, ..., 512, then every 1000)."""
  if step < every:
    return step == 0 or step & (step - 1) == 0
  return step % every == 0


def manager(workdir, max_to_keep: int | None = 2, read_only: bool = False,
            directory: str = ROLLING) -> ocp.CheckpointManager:
  """The run's checkpoint manager (`directory`: ROLLING or SNAPSHOTS, whose max_to_keep is None:
  all kept); `read_only` for readers, which never save, delete or create."""
  return ocp.CheckpointManager(
      files.path(workdir) / directory,
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "fingerprint": ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(
          max_to_keep=None if read_only else max_to_keep, create=not read_only,
          read_only=read_only, **({"save_interval_steps": 0} if read_only else {})))


class _QuietReaders(logging.Filter):
  """Drops orbax's notice that a reader's directory is read-only: every read says it, and
  analyses over training read one checkpoint per step."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_QuietReaders())


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


def _mix(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer: a bijection of uint32 that spreads every input bit."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _flat_index(shape: tuple) -> jax.Array:
  """uint32 [*shape]: each element's row-major index in the whole (global) array, modulo 2^32.

  Built from one iota per axis, so a sharded array computes its shards' global indices in place."""
  index = jnp.zeros(shape, jnp.uint32)
  for axis, size in enumerate(shape):
    index = index * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
  return index


_SALTS = (0x9E3779B9, 0x7F4A7C15)  # One per checksum: two independent 32-bit hashes.


@jax.jit
def _checksums(leaves: list) -> jax.Array:
  """[num_leaves, 2] uint32: for each leaf, sum_i mix(word_i ^ mix(i + salt)) modulo 2^32, twice.

  Each word is hashed with its global index, so a value moved to another position (swapped chunks,
  a shard written at the wrong offset) changes the sum, and so does any change of a word's bits;
  two changes cancel only by a 2^-32 coincidence per checksum. Integer sums do not depend on the
  order of the reduction, so any mesh, sharding or process count reproduces them exactly."""
  def leaf(x):
    w = _words(x)
    index = _flat_index(w.shape)
    return jnp.stack([jnp.sum(_mix(w ^ _mix(index + jnp.uint32(salt))), dtype=jnp.uint32)
                      for salt in _SALTS])
  return jnp.stack([leaf(x) for x in leaves])


def _flat(state) -> dict:
  return {"/".join(k): v for k, v in ocp.tree.to_flat_dict(state).items() if v is not None}


def fingerprint(state) -> dict:
  """{"scheme": FINGERPRINT_SCHEME, "leaves": {leaf path: [checksum, checksum]}}: keyed by path, so
  any tree type with the same leaves agrees (see `_checksums`)."""
  flat = _flat(state)
  sums = np.asarray(jax.device_get(_checksums(list(flat.values())))).astype(np.int64)
  return {"scheme": FINGERPRINT_SCHEME, "leaves": dict(zip(flat, sums.tolist()))}


def compile_fingerprint(abstract_state):
  """Compiles `fingerprint` for states like `abstract_state` (jax.ShapeDtypeStructs with their
  shardings) ahead of the first save: the later call finds the executable in JAX's cache."""
  _checksums.lower(list(_flat(abstract_state).values())).compile()


def check_writable(mngr: ocp.CheckpointManager):
  """A one-line UsageError unless this process can create files in the checkpoint directory (a
  read-only disk or directory would otherwise surface minutes later, inside orbax's barriers)."""
  try:
    files.check_writable(mngr.directory)
  except OSError as e:
    raise UsageError(f"{mngr.directory}: checkpoints cannot be written there "
                     f"({e.strerror or _first_line(e)}); make it writable, or train in another "
                     "--workdir") from None


def check_room(mngr: ocp.CheckpointManager, state, last_saved: int | None):
  """A one-line UsageError, before a save begins, when the checkpoint directory's disk has less free
  space than the state's bytes (an upper bound: orbax compresses). Local disks only."""
  directory = files.path(mngr.directory)
  if not files.is_local(directory):
    return
  need = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
  free = shutil.disk_usage(directory).free
  if free < need:
    raise UsageError(f"{directory}: the disk has {free / 2**20:.1f} MiB free and a checkpoint needs "
                     f"up to {need / 2**20:.1f} MiB; stopped before writing (the last saved step, "
                     f"{last_saved}, is intact): free space and rerun to resume")


def _write_failed(e: Exception, last_saved: int | None) -> UsageError:
  return UsageError(f"a checkpoint could not be written ({_first_line(e)}); the last complete "
                    f"step ({last_saved}) is intact: fix the cause (disk space, permissions) and "
                    "rerun to resume")


def save(mngr: ocp.CheckpointManager, step: int, state, wait: bool = False,
         last_saved: int | None = None):
  """Saves `state` as `step` (asynchronously unless `wait`). A failed write (of this save, or of the
  previous asynchronous one) is a one-line UsageError naming the last complete step."""
  try:
    mngr.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), fingerprint=ocp.args.JsonSave(fingerprint(state))))
    if wait:
      mngr.wait_until_finished()
  except (OSError, ValueError, RuntimeError) as e:
    raise _write_failed(e, last_saved) from None


def finish(mngr: ocp.CheckpointManager, last_saved: int | None = None):
  """Waits for the asynchronous saves, then closes the manager; a failed write is a UsageError."""
  try:
    mngr.wait_until_finished()
  except (OSError, ValueError, RuntimeError) as e:
    raise _write_failed(e, last_saved) from None
  finally:
    mngr.close()


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


def _has_item(mngr, step: int, item: str) -> bool:
  return (files.path(mngr.directory) / str(step) / item).exists()


def _load(mngr, step: int, abstract_state, log=print):
  """The restored state of `step`, checked against its fingerprint; raises IntegrityError for
  damage we can see ourselves, and whatever orbax or tensorstore raise for the rest (`classify`)."""
  if not _has_item(mngr, step, COMMIT_MARKER):
    raise IntegrityError(f"no {COMMIT_MARKER}: the save never finished")
  if not _has_item(mngr, step, "fingerprint"):
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    log(f"warning: checkpoint step {step} has no fingerprint item; restored without checking it")
    return restored.state
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), fingerprint=ocp.args.JsonRestore()))
  saved = restored.fingerprint
  if saved.get("scheme") != FINGERPRINT_SCHEME:
    log(f"warning: checkpoint step {step} has a fingerprint of another scheme "
        f"({saved.get('scheme', 'sums of words, before index-mixed-v2')}); restored without "
        "checking it")
    return restored.state
  saved, now = saved["leaves"], fingerprint(restored.state)["leaves"]
  bad = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
  if bad:
    raise IntegrityError(f"{len(bad)} arrays differ from the values that were saved "
                         f"({bad[0]}, ...)")
  return restored.state


# Status codes (tensorstore's, absl's) that say a committed step's stored bytes are bad: a chunk that
# does not decode, a byte range past the end of a truncated file, a file that is gone.
_DAMAGE_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "FAILED_PRECONDITION")
# Codes of trouble around an intact step: memory, access, availability. They win over the above.
_TROUBLE_CODES = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "PERMISSION_DENIED",
                  "UNAUTHENTICATED", "ABORTED", "CANCELLED", "INTERNAL", "UNKNOWN")


def _chain(e: BaseException):
  """`e` and the exceptions it was raised from or during."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def classify(e: BaseException) -> str:
  """"damage" when a failed restore shows the step's bytes are bad, else "trouble".

  Only our own IntegrityError and the storage layer's data-loss codes are damage. Anything we do not
  recognise is trouble: the cost of a wrong "trouble" is a one-line error and a rerun, the cost of a
  wrong "damage" is a step (and, if every step goes, a run) moved aside."""
  codes = []
  for x in _chain(e):
    if isinstance(x, IntegrityError):
      return "damage"
    if isinstance(x, (MemoryError, PermissionError)) or (
        isinstance(x, OSError) and x.errno not in (None, errno.ENOENT)):
      return "trouble"
    text = str(x)
    codes += [c for c in _DAMAGE_CODES + _TROUBLE_CODES if f"{c}:" in text]
  if any(c in _TROUBLE_CODES for c in codes) or not codes:
    return "trouble"
  return "damage"


def move_aside(mngr, step: int) -> str:
  """Renames step directory `<step>` to `<step>.corrupt` (or `.corrupt.N`); returns the new path."""
  source = files.path(mngr.directory) / str(step)
  target = source.with_name(f"{step}.corrupt")
  n = 1
  while target.exists():
    target, n = source.with_name(f"{step}.corrupt.{n}"), n + 1
  try:
    source.rename(target)
  except OSError as e:
    raise UsageError(f"checkpoint step {step} in {mngr.directory} is damaged, and it cannot be "
                     f"moved aside ({_first_line(e)}); make the directory writable and rerun, "
                     "or remove the step") from None
  mngr.reload()
  return str(target)


_OUTCOMES = ("intact", "damage", "trouble")


def _agreed(outcome: str) -> str:
  """The worst outcome over all processes (one process: its own): trouble > damage > intact."""
  if jax.process_count() == 1:
    return outcome
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  codes = multihost_utils.process_allgather(np.array(_OUTCOMES.index(outcome)))
  return _OUTCOMES[int(np.max(codes))]


def _try_load(mngr, step: int, abstract_state, log) -> tuple:
  """(state or None, outcome, problem text or None) of restoring `step` on this process."""
  try:
    if abstract_state is not None:
      mismatch = _structure_mismatch(mngr, step, abstract_state)
      if mismatch:
        raise UsageError(
            f"checkpoint step {step} in {mngr.directory} was written by a different model "
            f"({mismatch}); use a new --workdir or the config that wrote it")
    return _load(mngr, step, abstract_state, log), "intact", None
  except UsageError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    return None, classify(e), _first_line(e)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state=None, log=print, move_damaged=True,
                   steps=None):
  """(state, step) of the newest intact checkpoint, or (None, None) when there is none.

  `abstract_state` (ShapeDtypeStructs with shardings, or a function step -> those) gives shapes,
  dtypes and layout. A damaged step is moved aside (`move_damaged`, the training loop) or skipped
  (readers), with a one-line message, and the next older one of `steps` (default: all) is tried;
  any other failure, and a step written by a different model, is a UsageError that leaves every
  step in place. All processes take the same decision.
  """
  for step in sorted(mngr.all_steps() if steps is None else steps, reverse=True):
    target = abstract_state(step) if callable(abstract_state) else abstract_state
    state, outcome, problem = _try_load(mngr, step, target, log)
    agreed = _agreed(outcome)
    problem = problem or "on another process"
    if agreed == "intact":
      return state, step
    if agreed == "trouble":
      raise UsageError(f"checkpoint step {step} in {mngr.directory} could not be read ({problem}); "
                       "nothing was changed: fix the cause (memory, storage access) and rerun")
    if not move_damaged:
      log(f"checkpoint step {step} is damaged ({problem}); left in place, trying the previous step")
      continue
    moved = move_aside(mngr, step) if sharding.is_primary() else f"{step}.corrupt"
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"checkpoint step {step} moved aside")
      mngr.reload()
    log(f"checkpoint step {step} is damaged ({problem}); kept it as {moved} and trying the "
        "previous step")
  return None, None


def _replicated_like_saved(mngr, step: int):
  """The saved state's shapes and dtypes (from its metadata), each replicated on this job's own
  devices: what a reader restores into, whatever mesh or process count wrote the step."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("all",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=replicated),
      dict(mngr.item_metadata(step)["state"]))


def saved_steps(workdir, directories=(ROLLING, SNAPSHOTS)) -> list[int]:
  """Every step a run has a checkpoint of in `directories` (default: rolling or snapshot), in
  order; a directory that does not exist holds none."""
  steps = set()
  for directory in directories:
    if (files.path(workdir) / directory).is_dir():
      mngr = manager(workdir, read_only=True, directory=directory)
      steps.update(mngr.all_steps())
      mngr.close()
  return sorted(steps)


def copy_step(source_workdir, step: int, target_workdir) -> str:
  """Copies rolling checkpoint `step` of the run in `source_workdir` into the rolling checkpoints
  of `target_workdir`, where `train.fit` resumes from it as from a step of its own; returns its path.

  The copy is made under a temporary name in `target_workdir` (the same filesystem as its
  checkpoints/) and renamed to checkpoints/<step> once whole, so an interrupted copy is never taken
  for a step; what an earlier interrupted copy of this step left is removed first. The step's
  fingerprint travels with it, so the restore checks the copied bytes. Process 0 copies; with several
  processes, every one returns once the step is in place.
  """
  source = files.path(source_workdir) / ROLLING / str(step)
  target_dir = files.path(target_workdir) / ROLLING
  if sharding.is_primary():
    name = f"copy_of_step_{step}"
    for stale in files.path(target_workdir).iterdir():
      if stale.name.startswith(f".{name}.tmp."):
        stale.rmtree(missing_ok=True)
    tmp = files.temp_path(files.path(target_workdir) / name)
    try:
      files.copy_tree(source, tmp)
      target_dir.mkdir(parents=True, exist_ok=True)
      tmp.rename(target_dir / str(step))
    except BaseException:
      tmp.rmtree(missing_ok=True)
      raise
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"checkpoint step {step} copied to {target_workdir}")
  return str(target_dir / str(step))


def load_params(workdir, step: int | None = None, log=print):
  """(params, step) of a training run's checkpoint (default: the newest intact rolling one; a
  given step is read from the rolling checkpoints or the log-spaced snapshots), as numpy.

  A read: the step is restored into this job's own devices (any mesh may have written it), and
  nothing in the run's directory is renamed or written; damaged steps are skipped with a message."""
  directory = files.path(workdir) / ROLLING
  if not directory.is_dir():
    raise UsageError(f"--workdir={workdir}: no checkpoints/ directory (train a model there first)")
  mngr = manager(workdir, read_only=True)
  snapshots = files.path(workdir) / SNAPSHOTS
  if step is not None and step not in mngr.all_steps() and snapshots.is_dir():
    mngr.close()
    directory, mngr = snapshots, manager(workdir, read_only=True, directory=SNAPSHOTS)
  try:
    if step is not None and step not in mngr.all_steps():
      raise UsageError(f"--workdir={workdir}: no checkpoint at step {step}; "
                       f"have {saved_steps(workdir)}")
    state, found = restore_latest(mngr, lambda s: _replicated_like_saved(mngr, s), log=log,
                                  move_damaged=False, steps=None if step is None else [step])
    if state is None:
      raise UsageError(f"--workdir={workdir}: no intact checkpoint in {directory}"
                       + (f" at step {step}" if step is not None else ""))
  finally:
    mngr.close()
  return jax.device_get(state["params"]), found


@dataclasses.dataclass
class TrainedModel:
  """A finished (or checkpointed) run: its config, model, parameters and tokenizer."""
  config: object  # ml_collections.ConfigDict
  model_config: model_lib.ModelConfig
  params: dict
  tokenizer: object
  step: int

  @property
  def model(self) -> model_lib.Transformer:
      return model_lib.Transformer(self.model_config)


def load_trained(workdir: str, step: int | None = None) -> TrainedModel:
  """Loads the config, tokenizer and checkpointed parameters that a training run left in `workdir`,
  in the unrolled layout (params['block_i']; a run trained with scan_layers is unstacked)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = files.path(workdir) / "config.json"
  if not path.exists():
    raise UsageError(f"--workdir={workdir}: no config.json (not a training run's workdir)")
  config = ml_collections.ConfigDict(files.read_json(path))
  params, step = load_params(workdir, step)
  params = model_lib.unrolled(params)  # Analyses read layer by layer: scanned blocks unstacked.
  vocab_size = params["token_embed"]["embedding"].shape[0]
  if config.data == "synthetic":
    tokenizer = data_lib.SyntheticTokenizer(vocab_size)
  else:
    tokenizer = tokenizers.load(workdir)
  mcfg = dataclasses.replace(train_config.model_config(config, vocab_size), scan_layers=False)
  return TrainedModel(config, mcfg, params, tokenizer, step)
