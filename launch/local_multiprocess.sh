#!/usr/bin/env bash
# N JAX processes on this machine (CPU), joined by jax.distributed: the same code path as a TPU pod
# slice or a multi-node GPU job, where each process feeds its slice of the global batch and process 0
# writes the results.
#   NUM_PROCESSES=2 launch/local_multiprocess.sh perplexity --workdir=/tmp/ppl_mp [flags...]
# DEVICES_PER_PROCESS=K splits each process's CPU into K JAX devices.
set -euo pipefail
cd "$(dirname "$0")/.."
experiment="${1:-perplexity}"
shift || true
n="${NUM_PROCESSES:-2}"
port="${PORT:-$((20000 + RANDOM % 20000))}"
export JAX_PLATFORMS=cpu JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}" JAX_NUM_PROCESSES="${n}"
if [[ -n "${DEVICES_PER_PROCESS:-}" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}"
fi
pids=()
for ((i = 0; i < n; i++)); do
  JAX_PROCESS_ID="${i}" python -m "experiments.${experiment}" "$@" &
  pids+=("$!")
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
for pid in "${pids[@]}"; do
  wait "${pid}" || status=$?
done
exit "${status}"
