"""Checkpoint integrity and restore policy: a position-aware fingerprint, damage told apart from other
failures, readers that never rename, only finite states saved, and unwritable or full disks that end
in one line. (Damaged steps falling back, and kill -9 mid-save: tests/test_faults.py.)"""
import contextlib
import errno
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm_math import checkpoint
from llm_math import train as train_lib
from llm_math.errors import UsageError
from tests import helpers

_CONFIG = dict(num_steps=12, checkpoint_every=4, keep_checkpoints=3, eval_every=6, log_every=2)


def _fingerprint(x) -> list:
  return checkpoint.fingerprint({"w": jnp.asarray(x)})["leaves"]["w"]


def test_fingerprint_sees_positions_as_well_as_bits():
  w = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)
  base = _fingerprint(w)
  assert _fingerprint(w.copy()) == base
  swapped = np.concatenate([w[32:], w[:32]])  # Rows 0-31 and 32-63 exchanged.
  assert _fingerprint(swapped) != base
  misplaced = w.copy()
  misplaced[16:32] = w[:16]  # A shard written at the next shard's offset as well.
  assert _fingerprint(misplaced) != base
  assert _fingerprint(np.roll(w, 1, axis=1)) != base

  # Paired sign flips: (w + 2^31)^2 = w^2 mod 2^32 and two flips cancel in a plain sum, so sums of
  # words and of their squares miss every such pair. Each pair here must change the fingerprint.
  rng = np.random.default_rng(1)
  for _ in range(300):
    i, j = rng.choice(w.size, 2, replace=False)
    flipped = w.copy().ravel()
    flipped[[i, j]] *= -1
    assert _fingerprint(flipped.reshape(w.shape)) != base


def test_fingerprint_covers_every_dtype_and_keys_leaves_by_path():
  tree = {"a": {"b": jnp.arange(6, dtype=jnp.int32)}, "c": jnp.ones((2, 3), jnp.bfloat16),
          "d": jnp.array(True), "e": None}
  fp = checkpoint.fingerprint(tree)
  assert fp["scheme"] == checkpoint.FINGERPRINT_SCHEME
  assert set(fp["leaves"]) == {"a/b", "c", "d"}
  assert all(len(v) == 2 and all(0 <= x < 2**32 for x in v) for v in fp["leaves"].values())
  other = checkpoint.fingerprint({**tree, "c": tree["c"].at[1, 2].set(2.0)})
  assert other["leaves"]["c"] != fp["leaves"]["c"] and other["leaves"]["a/b"] == fp["leaves"]["a/b"]


_ANY_MESH = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from llm_math import checkpoint
    assert jax.device_count() == 4
    w = np.random.default_rng(0).normal(size=(8, 12)).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("x", "y"))
    prints = set()
    for spec in (P(), P("x"), P("y"), P("x", "y"), P(("x", "y"))):
      array = jax.device_put(w, NamedSharding(mesh, spec))
      prints.add(tuple(checkpoint.fingerprint({{"w": array}})["leaves"]["w"]))
    prints.add(tuple(checkpoint.fingerprint({{"w": jax.device_put(w, jax.devices()[0])}})["leaves"]["w"]))
    print(len(prints))
""")


def test_fingerprint_is_the_same_on_any_mesh():
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  proc = subprocess.run([sys.executable, "-c", _ANY_MESH.format(repo=helpers.REPO)], env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split()[-1] == "1"


def _raised_from(outer: Exception, inner: Exception) -> Exception:
  try:
    try:
      raise inner
    except Exception as e:  # pylint: disable=broad-except
      raise outer from e
  except Exception as e:  # pylint: disable=broad-except
    return e


@pytest.mark.parametrize("error, expected", [
    (checkpoint.IntegrityError("3 arrays differ"), "damage"),
    (_raised_from(Exception("Encountered error while reading array index"),
                  ValueError('OUT_OF_RANGE: Error reading "x/0.0": Requested byte range')), "damage"),
    (ValueError('FAILED_PRECONDITION: Error reading "x/0.0": Truncated Zstd-compressed stream'),
     "damage"),
    (ValueError('NOT_FOUND: Error opening "zarr" driver: Metadata at "x/.zarray" does not exist'),
     "damage"),
    (ValueError("DATA_LOSS: checksum mismatch"), "damage"),
    (MemoryError(), "trouble"),
    (OSError(errno.EIO, "Input/output error"), "trouble"),
    (PermissionError(errno.EACCES, "Permission denied"), "trouble"),
    (RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8.00GiB"), "trouble"),
    (ValueError("UNAVAILABLE: connection reset"), "trouble"),
    (_raised_from(ValueError("NOT_FOUND: x"), OSError(errno.EIO, "Input/output error")), "trouble"),
    (KeyError('Item "fingerprint" was not found in the checkpoint'), "trouble"),
    (ValueError("Topology mismatch detected"), "trouble"),
])
def test_only_integrity_failures_count_as_damage(error, expected):
  assert checkpoint.classify(error) == expected


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """(workdir, final params) of one uninterrupted run with checkpoints at 4, 8, 12."""
  workdir = str(tmp_path_factory.mktemp("finished"))
  config = helpers.tiny_config(**_CONFIG)
  result = train_lib.train(config, helpers.tiny_dataset(config), workdir, log=lambda *_: None)
  return workdir, jax.tree_util.tree_leaves(jax.device_get(result.state.params))


def _copy(finished_run, tmp_path, steps=(4, 8, 12)) -> str:
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run[0], workdir)
  for step in {4, 8, 12} - set(steps):
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
  return workdir


def _snapshot(workdir) -> dict:
  """Every file under `workdir` with its bytes: what must not change."""
  out = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = f.read()
  return out


def _train(workdir, lines=None, **overrides):
  config = helpers.tiny_config(**{**_CONFIG, **overrides})
  log = lines.append if lines is not None else (lambda *_: None)
  return train_lib.train(config, helpers.tiny_dataset(config), workdir, log=log)


def _assert_params(result, params):
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(result.state.params)), params):
    np.testing.assert_array_equal(a, b)


def test_a_step_without_its_fingerprint_restores_with_a_warning(finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path, steps=(4, 8))
  shutil.rmtree(os.path.join(workdir, "checkpoints", "8", "fingerprint"))
  lines = []
  result = _train(workdir, lines)
  assert any("checkpoint step 8 has no fingerprint item" in l for l in lines), lines
  assert any(l.startswith("resumed from the checkpoint at step 8") for l in lines), lines
  _assert_params(result, finished_run[1])
  assert not [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if "corrupt" in n]


class _Injected:
  """Stand-ins for failures around an intact step, raised by orbax's restore."""

  @staticmethod
  def storage():
    return OSError(errno.EIO, "Input/output error")

  @staticmethod
  def out_of_memory():
    return RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")

  @staticmethod
  def transient():
    return ValueError("UNAVAILABLE: Error reading from the object store: connection reset")


@pytest.mark.parametrize("failure", ["storage", "out_of_memory", "transient"])
def test_other_restore_failures_stop_in_one_line_and_change_nothing(finished_run, tmp_path,
                                                                     monkeypatch, failure):
  workdir = _copy(finished_run, tmp_path, steps=(4, 8))  # Unfinished: the run would resume.
  before = _snapshot(workdir)

  def fail(*args, **kwargs):
    raise getattr(_Injected, failure)()
  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "restore", fail)
  with pytest.raises(UsageError, match=r"checkpoint step 8 in .* could not be read .*nothing was "
                                       r"changed") as caught:
    _train(workdir)
  assert "\n" not in str(caught.value)
  assert _snapshot(workdir) == before  # Every step and the whole metrics history, byte for byte.


def test_readers_skip_damage_and_never_rename(finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path)
  data = max((os.path.join(r, n) for r, _, ns in os.walk(os.path.join(workdir, "checkpoints", "12"))
              for n in ns if os.sep + "d" + os.sep in os.path.join(r, n)), key=os.path.getsize)
  with open(data, "r+b") as f:
    f.seek(100)
    f.write(np.random.default_rng(0).bytes(200))
  before = _snapshot(workdir)
  lines = []
  params, step = checkpoint.load_params(workdir, log=lines.append)
  assert step == 8
  assert lines and lines[0].startswith("checkpoint step 12 is damaged") and "left in place" in lines[0]
  assert _snapshot(workdir) == before
  with pytest.raises(UsageError, match="checkpoint step 12 in .* damaged|no intact checkpoint"):
    checkpoint.load_params(workdir, step=12, log=lambda *_: None)
  assert _snapshot(workdir) == before
  assert jax.tree_util.tree_structure(params) is not None


def _nan_gradient_task(nan_at: int) -> train_lib.Task:
  """Least squares on w [4] whose gradient is NaN at step `nan_at` while the loss stays finite (what
  clipping then turns into NaN parameters)."""

  @jax.custom_vjp
  def poison(w, flag):
    return w

  def forward(w, flag):
    return w, flag

  def backward(flag, g):
    return jnp.where(flag > 0, jnp.nan, g), jnp.zeros_like(flag)

  poison.defvjp(forward, backward)

  def loss(params, batch, rng):
    del rng
    x_BxD, flag_Bx1 = batch
    w = poison(params["w"], flag_Bx1[0, 0])
    return jnp.sum(jnp.square(x_BxD - w[None])), jnp.asarray(x_BxD.size, jnp.float32)

  def batch(step, rows):
    x = np.random.default_rng(step).normal(size=(8, 4)).astype(np.float32)[rows]
    return x, np.full((x.shape[0], 1), float(step == nan_at), np.float32)

  return train_lib.Task(init=lambda rng: {"w": jnp.zeros((4,), jnp.float32)}, loss=loss,
                        batch=batch, tx=optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1)))


@pytest.mark.parametrize("on_divergence", ["raise", "stop"])
def test_nan_gradients_at_a_save_step_never_become_a_checkpoint(tmp_path, on_divergence):
  # Steps 0..7; the update of step index 5 (saved as step 6, a save step and not a log step) is NaN.
  config = helpers.tiny_config(num_steps=8, checkpoint_every=2, keep_checkpoints=10, log_every=4,
                               batch_size=8, seq_len=4)
  task = _nan_gradient_task(nan_at=5)
  lines = []
  if on_divergence == "raise":
    with pytest.raises(train_lib.DivergenceError, match="not finite at step 6"):
      train_lib.fit(config, task, str(tmp_path), on_divergence="raise", log=lines.append)
  else:
    result = train_lib.fit(config, task, str(tmp_path), on_divergence="stop", log=lines.append)
    assert result.stopped == "diverged"
  mngr = checkpoint.manager(str(tmp_path))
  assert mngr.all_steps() == [2, 4]
  state, step = checkpoint.restore_latest(mngr, log=pytest.fail)
  assert step == 4 and np.all(np.isfinite(jax.device_get(state["params"]["w"])))


@contextlib.contextmanager
def _tmpfs(path, size: str):
  """A small RAM disk at `path` (root only); the test is skipped where it cannot be mounted."""
  os.makedirs(path, exist_ok=True)
  if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                          str(path)], capture_output=True).returncode:
    pytest.skip("needs to mount a tmpfs (root)")
  try:
    yield
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_read_only_checkpoint_directory_is_one_line_within_seconds(finished_run, tmp_path):
  workdir = _copy(finished_run, tmp_path, steps=(4, 8))
  saved = tmp_path / "saved"
  shutil.move(os.path.join(workdir, "checkpoints"), saved)
  target = os.path.join(workdir, "checkpoints")
  with _tmpfs(target, "16m"):
    for name in os.listdir(saved):
      shutil.copytree(saved / name, os.path.join(target, name))
    subprocess.run(["mount", "-o", "remount,ro", target], check=True)
    before = _snapshot(workdir)
    with pytest.raises(UsageError, match="checkpoints cannot be written there"):
      _train(workdir)
    assert _snapshot(workdir) == before


def test_a_full_disk_is_one_line_and_the_run_resumes(finished_run, tmp_path):
  workdir = tmp_path / "disk"
  with _tmpfs(workdir, "4m"):
    _copy(finished_run, workdir, steps=(4,))
    run = str(workdir / "run")
    # Leave room for the metrics (64 KiB) but not for a checkpoint (the state is ~160 KiB).
    free = shutil.disk_usage(run).free
    with open(workdir / "filler", "wb") as f:
      f.write(b"\0" * (free - 64 * 1024))
    with pytest.raises(UsageError, match=r"the disk has .* free and a checkpoint needs .*the last "
                                         r"saved step, 4, is intact"):
      _train(run)
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["4"]
    os.remove(workdir / "filler")
    _assert_params(_train(run), finished_run[1])
