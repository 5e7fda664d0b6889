#!/usr/bin/env bash
# Run an experiment on this machine's CPU (all cores as one JAX device).
#   launch/local.sh [experiment] [flags...]      e.g. launch/local.sh perplexity --workdir=/tmp/ppl
# Set DEVICES=N to split the CPU into N JAX devices (to exercise the data-parallel mesh).
set -euo pipefail
cd "$(dirname "$0")/.."
experiment="${1:-perplexity}"
shift || true
export JAX_PLATFORMS=cpu
if [[ -n "${DEVICES:-}" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES}"
fi
exec python -m "experiments.${experiment}" "$@"
