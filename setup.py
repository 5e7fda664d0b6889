"""Installs llm_math: measured mathematics of large language models in JAX/Flax."""
import setuptools

setuptools.setup(
    name="llm-math",
    version="0.1.0",
    description="Train decoder-only Transformers in JAX/Flax and measure the mathematics of LLMs.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["llm_math", "llm_math.*", "experiments", "experiments.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10.0",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.11.0",
        "tensorflow-datasets>=4.9.6",
        # tensorflow-datasets reads prepared array_record datasets without TensorFlow, but then
        # needs these at run time without declaring them.
        "importlib_resources",
        "array_record>=0.5; platform_system=='Linux'",
        "sentencepiece>=0.2.0",
        # Run files through the path layer orbax uses (local disk, gs://); TensorBoard's own event
        # writer for scalars (no TensorFlow).
        "etils[epath]>=1.5",
        "tensorboard>=2.14",
        "absl-py>=1.4",
        "ml-collections>=0.1.1",
        "matplotlib>=3.7",
        "numpy>=1.26",
    ],
    extras_require={
        "gcs": ["gcsfs"],  # --workdir=gs://... without TensorFlow
        "torch": ["torch>=2.1"],  # benchmarks/pytorch_reference.py only
        # libtpu, the TPU compiler: jax's own extra pins the libtpu built for the installed jax.
        # experiments.compile compiles for TPU topologies with it, on any machine (no TPU needed).
        "tpu": ["jax[tpu]"],
        # The remote-workdir test serves gs:// from a local emulator.
        "test": ["pytest>=7.4", "pytest-xdist>=3.3", "gcsfs", "gcp-storage-emulator"],
    },
)
