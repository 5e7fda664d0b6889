"""Test-wide settings: catch silent broadcasting, keep runs on CPU and deterministic, cache tokens
in a temporary directory."""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One JAX device unless a test asks for more (experiments default to one device per core).
os.environ.setdefault("LLM_MATH_CPU_DEVICES", "1")
# text: and tfds: sources are tokenized into a cache on first use: one per test process, not ~/.cache.
os.environ.setdefault("LLM_MATH_DATA_CACHE", tempfile.mkdtemp(prefix="llm_math_tokens_"))

import jax  # noqa: E402

from llm_math import xla_cpu  # noqa: E402

xla_cpu.tune()

jax.config.update("jax_numpy_rank_promotion", "raise")
