"""The CPU a benchmark runs on, as one line: model name, core count, AVX-512 and AMX support.

Shared by the JAX and PyTorch benchmarks (imports neither framework), so their outputs name the
machine the same way. The core count is `os.cpu_count()`: logical CPUs, hyperthreads included.
"""

import os
import platform

CPUINFO = "/proc/cpuinfo"


def read_cpuinfo(path: str = CPUINFO) -> tuple[str, set[str] | None]:
  """(model name, feature flags) of the first processor in `path`; ("", None) where unreadable."""
  model, flags = "", None
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
          model = value.strip()
        elif key == "flags" and flags is None:
          flags = set(value.split())
        if model and flags is not None:
          break
  except OSError:
    pass
  return model, flags


def describe(path: str = CPUINFO) -> str:
  """E.g. 'AMD EPYC 7B13 (2 cores; avx512f no, amx no)'; 'unknown' flags without /proc/cpuinfo."""
  model, flags = read_cpuinfo(path)
  model = model or platform.processor() or platform.machine() or "unknown CPU"
  has = lambda flag: "unknown" if flags is None else ("yes" if flag in flags else "no")
  return f"{model} ({os.cpu_count()} cores; avx512f {has('avx512f')}, amx {has('amx_tile')})"
