#!/usr/bin/env bash
# Run an experiment on this machine's CPU (one JAX device per core where the mesh and batch divide).
#   launch/local.sh [experiment] [flags...]      e.g. launch/local.sh perplexity --workdir=/tmp/ppl
# Set DEVICES=N to split the CPU into N JAX devices instead (DEVICES=1: one device on all cores).
set -euo pipefail
cd "$(dirname "$0")/.."
experiment="${1:-perplexity}"
shift || true
export JAX_PLATFORMS=cpu
if [[ -n "${DEVICES:-}" ]]; then
  export LLM_MATH_CPU_DEVICES="${DEVICES}"
fi
exec python -m "experiments.${experiment}" "$@"
