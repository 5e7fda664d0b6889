"""XLA:CPU settings for small Transformer steps, applied before JAX starts its CPU backend.

Measured on a 2-core x86 machine with jaxlib 0.10: by default XLA:CPU hands YNNPACK fusions of dots
together with their elementwise neighbours. In the backward pass each MLP's GELU gradient then reached
its weight-gradient dot through a transposed copy of the [B*T, 4d] activation (a strided loop fusion,
~2.7 ms per layer with the erfc form of GELU that jax.nn.gelu uses). Restricting YNNPACK to plain dots
(`--xla_cpu_experimental_ynn_fusion_type=dot`) removes those copies, with the same float32 arithmetic up
to summation order. With `llm_math.model.gelu` (erf form) the gain is smaller: median step time
38.6 -> 37.8 ms on the nanoGPT CPU shape (4 layers, d_model 128, batch 12 x 64) and 25.3 -> 14.7 ms
on the synthetic default shape (`python -m benchmarks.throughput --xla_cpu_tuning=false` to compare).

Splitting the CPU into one JAX device per core (`--xla_force_host_platform_device_count`, or
`DEVICES=2 launch/local.sh`) and training data-parallel over them helps further on the same machine,
because XLA:CPU parallelizes these small ops poorly within one device: 26.7 ms per step with both.

The flag is applied only where it was verified: jaxlib versions in `VERIFIED_JAXLIB`, a single process
(several host devices included), and XLA_FLAGS not already choosing. An unknown flag aborts XLA at
start-up, so newer jaxlibs are left alone until someone measures them. Set LLM_MATH_XLA_CPU_TUNING=0 to
switch it off.

With several host devices, XLA:CPU can stall a cross-device all-reduce when many steps are queued at
once (seen on 2 cores with or without the flag: a rendezvous timeout after 40 s aborts the process), so
loops await each step there (`await_each_step`).
"""

import os

import jaxlib

FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot"
VERIFIED_JAXLIB = ((0, 10),)  # (major, minor) versions where FLAG was measured.


def _jaxlib_minor() -> tuple[int, int]:
  major, minor = (int(p) for p in jaxlib.__version__.split(".")[:2])
  return major, minor


def should_tune(environ=os.environ) -> bool:
  """Whether FLAG applies to this process (see the module docstring for the conditions)."""
  xla_flags = environ.get("XLA_FLAGS", "")
  multi_process = ("JAX_COORDINATOR_ADDRESS" in environ or environ.get("TPU_WORKER_HOSTNAMES")
                   or environ.get("SLURM_NTASKS", "1") != "1")
  platforms = environ.get("JAX_PLATFORMS", "")
  return (environ.get("LLM_MATH_XLA_CPU_TUNING", "1") != "0"
          and _jaxlib_minor() in VERIFIED_JAXLIB
          and "xla_cpu_experimental_ynn_fusion_type" not in xla_flags
          and not multi_process
          and (not platforms or "cpu" in platforms.split(",")))


def tune() -> bool:
  """Starts JAX's backends with FLAG added when `should_tune()`; returns whether it was added.

  Must run before anything touches a device. XLA reads XLA_FLAGS once, when the backend starts, so the
  backend is started here and XLA_FLAGS restored: subprocesses (which may use several devices) do not
  inherit the flag.
  """
  if not should_tune():
    return False
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

  if xla_bridge.backends_are_initialized():
    return False

  previous = os.environ.get("XLA_FLAGS")
  os.environ["XLA_FLAGS"] = f"{previous or ''} {FLAG}".strip()
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
