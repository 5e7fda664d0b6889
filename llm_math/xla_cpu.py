"""XLA:CPU settings for small Transformer steps, applied before JAX starts its CPU backend.

Measured on a 2-core x86 machine with jaxlib 0.10: by default XLA:CPU hands YNNPACK fusions of dots
together with their elementwise neighbours. In the backward pass each MLP's GELU gradient then reached
its weight-gradient dot through a transposed copy of the [B*T, 4d] activation (a strided loop fusion,
~2.7 ms per layer with the erfc form of GELU that jax.nn.gelu uses). Restricting YNNPACK to plain dots
(`--xla_cpu_experimental_ynn_fusion_type=dot`) removes those copies, with the same float32 arithmetic up
to summation order. With `llm_math.model.gelu` (erf form) the gain is smaller: median step time
38.6 -> 37.8 ms on the nanoGPT CPU shape (4 layers, d_model 128, batch 12 x 64) and 25.3 -> 14.7 ms
on the synthetic default shape (`python -m benchmarks.throughput --xla_cpu_tuning=false` to compare).

Splitting the CPU into one JAX device per core (`--xla_force_host_platform_device_count`) and
training data-parallel over them helps further on the same machine, because XLA:CPU parallelizes these
small ops poorly within one device. The experiments and benchmarks do this by default (`host_devices`:
one device per core where the mesh and batch divide; LLM_MATH_CPU_DEVICES=N chooses N, 1 keeps one
device).

The fusion flag pays only on a single CPU device. On a 2-core AMD EPYC without AVX-512 (jaxlib
0.10.2, three interleaved rounds, synthetic default shape): one device, 46.8 ms per step with the
flag and 68.5 ms without; two devices, 36.3 ms with and 35.3 ms without, and one evaluation of the
65,535 validation tokens 1.17 s with and 0.85 s without (the nanoGPT CPU shape: 66.5 and 64.7 ms).
So the flag is applied where the process runs one CPU device, and XLA's own fusions are kept when the
CPU is split into several.

The flag is applied only where it was verified: jaxlib versions in `VERIFIED_JAXLIB`, a single process
with a single CPU device, and XLA_FLAGS not already choosing. An unknown flag aborts XLA at start-up,
so newer jaxlibs are left alone until someone measures them. Set LLM_MATH_XLA_CPU_TUNING=0 to switch
it off.

With several host devices, XLA:CPU can stall a cross-device all-reduce when many steps are queued at
once (seen on 2 cores with or without the flag: a rendezvous timeout after 40 s aborts the process), so
loops await each step there (`await_each_step`).
"""

import os
import re

import jaxlib

FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot"
VERIFIED_JAXLIB = ((0, 10),)  # (major, minor) versions where FLAG was measured.
_DEVICE_COUNT_FLAG = "xla_force_host_platform_device_count"


def _jaxlib_minor() -> tuple[int, int]:
  major, minor = (int(p) for p in jaxlib.__version__.split(".")[:2])
  return major, minor


def should_tune(environ=os.environ, devices: int = 1) -> bool:
  """Whether FLAG applies to a process that splits the CPU into `devices` JAX devices (XLA_FLAGS'
  device count, when it sets one, wins); see the module docstring for the conditions."""
  xla_flags = environ.get("XLA_FLAGS", "")
  forced = re.search(rf"--{_DEVICE_COUNT_FLAG}=(\d+)", xla_flags)
  devices = int(forced.group(1)) if forced else devices
  platforms = environ.get("JAX_PLATFORMS", "")
  return (environ.get("LLM_MATH_XLA_CPU_TUNING", "1") != "0"
          and _jaxlib_minor() in VERIFIED_JAXLIB
          and "xla_cpu_experimental_ynn_fusion_type" not in xla_flags
          and devices == 1
          and not _multi_process(environ)
          and (not platforms or "cpu" in platforms.split(",")))


DEVICES_ENV = "LLM_MATH_CPU_DEVICES"


def cpu_cores() -> int:
  """Cores this process may run on."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def host_devices(fits=lambda n: True, environ=os.environ) -> int:
  """How many JAX devices to split the CPU into: $LLM_MATH_CPU_DEVICES if set, else the most devices,
  up to one per core, for which `fits(n)` holds (the run's mesh and batch divide), else 1.

  One device per core trains data-parallel across the cores, which is faster than one device whose
  small ops XLA:CPU parallelizes poorly (see the module docstring). Left to XLA_FLAGS when it already
  sets the count, and to jax.distributed (1) when several processes run.
  """
  if environ.get(DEVICES_ENV):
    return max(int(environ[DEVICES_ENV]), 1)
  if _DEVICE_COUNT_FLAG in environ.get("XLA_FLAGS", "") or _multi_process(environ):
    return 1
  return next((n for n in range(cpu_cores(), 1, -1) if fits(n)), 1)


def _multi_process(environ) -> bool:
  return bool("JAX_COORDINATOR_ADDRESS" in environ or environ.get("TPU_WORKER_HOSTNAMES")
              or environ.get("SLURM_NTASKS", "1") != "1")


def tune(devices: int = 1, fusion_flag: bool = True) -> bool:
  """Starts JAX's backends with the CPU split into `devices` JAX devices when devices > 1 (and
  XLA_FLAGS does not set the count), and with FLAG added when `fusion_flag` and
  `should_tune(devices=devices)`; returns whether any flag was added.

  Must run before anything touches a device. XLA reads XLA_FLAGS once, when the backend starts, so the
  backend is started here and XLA_FLAGS restored: subprocesses (which may use several devices) do not
  inherit the flags.
  """
  previous = os.environ.get("XLA_FLAGS")
  added = [FLAG] if fusion_flag and should_tune(devices=devices) else []
  if devices > 1 and _DEVICE_COUNT_FLAG not in (previous or ""):
    added.append(f"--{_DEVICE_COUNT_FLAG}={devices}")
  if not added:
    return False
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

  if xla_bridge.backends_are_initialized():
    return False
  os.environ["XLA_FLAGS"] = " ".join([previous or ""] + added).strip()
  try:
    jax.devices()
  finally:
    if previous is None:
      del os.environ["XLA_FLAGS"]
    else:
      os.environ["XLA_FLAGS"] = previous
  return True


def await_each_step() -> bool:
  """Whether a training loop should wait for each step: several devices of the CPU platform."""
  import jax  # pylint: disable=g-import-not-at-top

  return jax.default_backend() == "cpu" and jax.local_device_count() > 1
