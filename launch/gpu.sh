#!/usr/bin/env bash
# Run an llm_math experiment on one GPU node (one process drives all its GPUs through one mesh).
#   launch/gpu.sh perplexity --workdir=/tmp/ppl --config=experiments/configs/tinyshakespeare_gpu.py
# Install once: pip install -U "jax[cuda12]" && pip install -e .
# For several nodes, start one process per node with JAX_COORDINATOR_ADDRESS=host0:port,
# JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=i (or under SLURM, where JAX finds them itself).
set -euo pipefail
cd "$(dirname "$0")/.."
experiment="${1:-perplexity}"
shift || true
# Let XLA overlap collectives with compute and use its latency-hiding scheduler.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
exec python -m "experiments.${experiment}" "$@"
