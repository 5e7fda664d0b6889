"""Test-wide settings: catch silent broadcasting, keep runs on CPU and deterministic."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from llm_math import xla_cpu  # noqa: E402

xla_cpu.tune()

jax.config.update("jax_numpy_rank_promotion", "raise")
