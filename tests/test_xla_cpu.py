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
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, True),
    ({"JAX_PLATFORMS": "cuda"}, False),
    ({"LLM_MATH_XLA_CPU_TUNING": "0"}, False),
    ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise"}, False),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"}, False),
    ({"SLURM_NTASKS": "4"}, False),
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, False),
])
def test_should_tune(environ, expected):
  assert xla_cpu.should_tune(environ) is expected


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
