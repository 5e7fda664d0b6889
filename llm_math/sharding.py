"""Device meshes and logical-axis sharding rules.

The mesh has three named axes: 'data' (replicas, each on its slice of the batch), 'fsdp' (the batch is
split too, and parameters are sharded along their 'embed' axis) and 'tensor' (heads / MLP width / vocab
split across devices). Model code names logical axes only ('batch', 'embed', 'heads', ...); the rules
below, which live in the config, map them to mesh axes.
"""

import math
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llm_math.errors import UsageError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or axes, or None = replicated). First match wins.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("length", None),
)


def parse_mesh(spec: str) -> dict[str, int]:
  """'data:-1,fsdp:2,tensor:1' -> {'data': -1, 'fsdp': 2, 'tensor': 1} (missing axes are 1)."""
  shape = {axis: 1 for axis in MESH_AXES}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    name, _, size = item.partition(":")
    if name not in MESH_AXES or not size.lstrip("-").isdigit():
      raise UsageError(f"--mesh={spec!r}: expected 'data:N,fsdp:N,tensor:N' with axes {MESH_AXES}")
    shape[name] = int(size)
  return shape


def mesh_fits(mesh_spec: str, batch_size: int, grad_accum_steps: int, devices: int) -> bool:
  """Whether `devices` devices can hold the mesh `mesh_spec` and split its micro-batches over the
  batch axes (data, fsdp)."""
  try:
    shape = parse_mesh(mesh_spec)
  except UsageError:
    return devices == 1
  known = math.prod(v for v in shape.values() if v != -1)
  if -1 not in shape.values():
    return devices == known
  if devices % known:
    return False
  shape = {k: devices // known if v == -1 else v for k, v in shape.items()}
  micro = batch_size // max(grad_accum_steps, 1)
  return micro % (shape["data"] * shape["fsdp"]) == 0


def make_mesh(shape: dict[str, int] | str = "data:-1", devices=None) -> Mesh:
  """A mesh over `devices` (default: all) with axes (data, fsdp, tensor); one size may be -1 (the rest)."""
  if isinstance(shape, str):
    shape = parse_mesh(shape)
  devices = jax.devices() if devices is None else devices
  sizes = [shape.get(axis, 1) for axis in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise UsageError(f"mesh {shape}: sizes must be positive, with at most one -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise UsageError(f"mesh {shape}: {len(devices)} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise UsageError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"have {len(devices)}")
  return Mesh(_device_grid(sizes, devices), MESH_AXES)


def _device_grid(sizes: list[int], devices) -> np.ndarray:
  """Devices arranged as `sizes`, in the order of the physical topology on TPUs and GPUs.

  mesh_utils.create_device_mesh (what jax.make_mesh uses) places neighbouring mesh coordinates on
  neighbouring chips, so the innermost axis ('tensor') talks over the fastest links. CPU devices have
  no topology, and for a subset of devices it may refuse a shape: there the given order is kept.
  """
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  if devices[0].platform != "cpu":
    try:
      return mesh_utils.create_device_mesh(sizes, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
      pass
  return np.asarray(devices).reshape(sizes)


def from_config(config) -> tuple[Mesh, tuple]:
  """(mesh, logical axis rules) of a config's `mesh` and `logical_axis_rules` fields."""
  return make_mesh(config.mesh), tuple(tuple(r) for r in config.logical_axis_rules)


def use_mesh(mesh: Mesh):
  """Makes `mesh` the context mesh (for logical sharding constraints), on old and new JAX."""
  return jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else mesh


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """Sharding of a [batch, length] array: batch over the axes the 'batch' rule names."""
  batch_axes = dict(rules).get("batch")
  return NamedSharding(mesh, P(batch_axes, None))


def data_parallel_size(mesh: Mesh, rules=DEFAULT_RULES) -> int:
  axes = dict(rules).get("batch") or ()
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def is_primary() -> bool:
  """Process 0 writes every file other than checkpoints (results, metrics, figures, tokenizers)."""
  return jax.process_index() == 0


def process_rows(global_batch: int, offset: int = 0) -> slice:
  """The rows of a global batch that this process feeds (contiguous, in process order)."""
  n = jax.process_count()
  if global_batch % n:
    raise UsageError(f"global batch {global_batch} is not divisible by {n} processes")
  per_process = global_batch // n
  start = offset + jax.process_index() * per_process
  return slice(start, start + per_process)


def global_batch(local_rows: np.ndarray, sharding_: NamedSharding) -> jax.Array:
  """A global jax.Array from this process's rows (one process: a plain device_put)."""
  if jax.process_count() == 1:
    return jax.device_put(local_rows, sharding_)
  return jax.make_array_from_process_local_data(sharding_, local_rows)


def initialize_distributed():
  """jax.distributed.initialize() when this is one of several processes, else nothing.

  Cloud TPU VMs and SLURM/Open MPI clusters are detected by JAX itself; elsewhere (e.g. several
  processes on localhost) set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  CPU processes exchange collectives through gloo.
  """
  env = os.environ
  if "JAX_COORDINATOR_ADDRESS" in env:
    if env.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
  elif env.get("TPU_WORKER_HOSTNAMES") or env.get("SLURM_NTASKS", "1") != "1":
    jax.distributed.initialize()
