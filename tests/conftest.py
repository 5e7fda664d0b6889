"""Test-wide settings: catch silent broadcasting, keep runs on CPU and deterministic, cache tokens
in a temporary directory."""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (installed for the TPU compile tests) locks the machine for one process unless told not
# to; the tests compile for topologies only, on several xdist workers and subprocesses at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# One JAX device unless a test asks for more (experiments default to one device per core).
os.environ.setdefault("LLM_MATH_CPU_DEVICES", "1")
# text: and tfds: sources are tokenized into a cache on first use: one per test process, not ~/.cache.
os.environ.setdefault("LLM_MATH_DATA_CACHE", tempfile.mkdtemp(prefix="llm_math_tokens_"))

# Compiled programs are shared by every test process of one pytest run (xdist workers and the
# subprocesses they start inherit this): the many runs of the same tiny model compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), "llm_math_jax_cache_" + os.environ.get("PYTEST_XDIST_TESTRUNUID",
                                                                 str(os.getpid()))))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402

from llm_math import xla_cpu  # noqa: E402

xla_cpu.tune()

jax.config.update("jax_numpy_rank_promotion", "raise")
