"""When llm_math.xla_cpu adds its XLA:CPU flag, and that it reaches the backend without leaking."""
import os
import subprocess
import sys

import pytest

from llm_math import xla_cpu
from tests import helpers

verified = pytest.mark.skipif(xla_cpu._jaxlib_minor() not in xla_cpu.VERIFIED_JAXLIB,
                              reason="the flag is only applied on verified jaxlib versions")


@verified
@pytest.mark.parametrize("environ, expected", [
    ({}, True),
    ({"JAX_PLATFORMS": "cpu"}, True),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}, True),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, False),  # Measured slower there.
    ({"JAX_PLATFORMS": "cuda"}, False),
    ({"LLM_MATH_XLA_CPU_TUNING": "0"}, False),
    ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise"}, False),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"}, False),
    ({"SLURM_NTASKS": "4"}, False),
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, False),
])
def test_should_tune(environ, expected):
  assert xla_cpu.should_tune(environ) is expected


@verified
@pytest.mark.parametrize("environ, devices, expected", [
    ({}, 1, True),
    ({}, 2, False),  # XLA's own fusions are faster on a CPU split into several devices.
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}, 2, True),  # XLA_FLAGS' count wins.
])
def test_should_tune_only_a_single_cpu_device(environ, devices, expected):
  assert xla_cpu.should_tune(environ, devices) is expected


def test_unverified_jaxlib_is_left_alone(monkeypatch):
  monkeypatch.setattr(xla_cpu, "_jaxlib_minor", lambda: (99, 0))
  assert not xla_cpu.should_tune({})


@verified
def test_tune_starts_the_backend_with_the_flag_and_restores_the_environment():
  code = ("import os, jax; from llm_math import xla_cpu; "
          "print(xla_cpu.tune(), repr(os.environ.get('XLA_FLAGS')), "
          "jax.numpy.ones(3).sum().item(), xla_cpu.tune())")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "LLM_MATH_XLA_CPU_TUNING")}
  out = subprocess.run([sys.executable, "-c", code], cwd=helpers.REPO, env=env, check=True,
                       capture_output=True, text=True).stdout.split()
  # Applied once, XLA_FLAGS back to unset, the backend works, and a second call is a no-op.
  assert out == ["True", "None", "3.0", "False"]


@pytest.mark.parametrize("environ, cores, fits, expected", [
    ({}, 4, lambda n: True, 4),  # One device per core.
    ({}, 4, lambda n: n in (1, 2), 2),  # The most devices the mesh and batch allow.
    ({}, 1, lambda n: True, 1),
    ({"LLM_MATH_CPU_DEVICES": "3"}, 4, lambda n: True, 3),  # Chosen by the user.
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, 4, lambda n: True, 1),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"}, 4, lambda n: True, 1),
])
def test_host_devices(monkeypatch, environ, cores, fits, expected):
  monkeypatch.setattr(xla_cpu, "cpu_cores", lambda: cores)
  assert xla_cpu.host_devices(fits, environ) == expected


@pytest.mark.parametrize("mesh, batch, accum, devices, expected", [
    ("data:-1", 12, 1, 2, True), ("data:-1", 12, 1, 5, False), ("data:-1", 12, 4, 2, False),
    ("data:-1,tensor:2", 12, 1, 4, True), ("data:-1,tensor:2", 12, 1, 3, False),
    ("data:2,fsdp:2,tensor:2", 16, 1, 8, True), ("data:2,fsdp:2,tensor:2", 16, 1, 2, False),
    ("nonsense", 12, 1, 2, False),
])
def test_mesh_fits(mesh, batch, accum, devices, expected):
  from llm_math import sharding  # pylint: disable=g-import-not-at-top
  assert sharding.mesh_fits(mesh, batch, accum, devices) is expected


def test_experiments_split_the_cpu_into_one_device_per_core(tmp_path):
  """Without LLM_MATH_CPU_DEVICES, a run gets min(cores, what the batch divides) devices."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "LLM_MATH_CPU_DEVICES")}
  code = ("from llm_math import xla_cpu; import jax; from llm_math import sharding; "
          "n = xla_cpu.host_devices(lambda n: sharding.mesh_fits('data:-1', 12, 1, n)); "
          "xla_cpu.tune(n); print(n, jax.device_count(), xla_cpu.cpu_cores())")
  out = subprocess.run([sys.executable, "-c", code], cwd=helpers.REPO, env=env, check=True,
                       capture_output=True, text=True).stdout.split()
  n, count, cores = map(int, out)
  assert n == count == max(d for d in range(1, cores + 1) if 12 % d == 0 and d <= cores)
