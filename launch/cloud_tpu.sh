#!/usr/bin/env bash
# Run an llm_math experiment on a Cloud TPU VM or pod slice with its workdir in a GCS bucket: create
# the VM, install on every worker, run the same command on every worker (jax.distributed discovers the
# pod by itself), delete the VM.
#
#   TPU_NAME=llm-math ZONE=us-central2-b ACCELERATOR=v4-32 BUCKET=gs://my-bucket \
#     launch/cloud_tpu.sh perplexity --config=experiments/configs/tinyshakespeare_cpu.py \
#       --data=tfds:tiny_shakespeare --tfds_data_dir=gs://my-bucket/tfds
#
# Environment:
#   TPU_NAME, ZONE        always required
#   ACCELERATOR           required by the create step (e.g. v4-8, v4-32)
#   BUCKET=gs://NAME[/PREFIX]
#                         required by the run step: workdir $BUCKET/llm_math/$TPU_NAME/EXPERIMENT
#   WORKDIR=gs://...      use this workdir instead (BUCKET is then not needed)
#   STEPS                 steps to run, in the order given (default "create install run delete")
#   SPOT=1                create a Spot VM (SPOT=0 or unset: on-demand)
#   TPU_SOFTWARE_VERSION  VM image for create (default tpu-ubuntu2204-base)
#   REPO_URL              repository the workers clone (default: this checkout's origin remote); the
#                         workers run what is pushed there, not local uncommitted changes
# Steps:
#   create   gcloud compute tpus tpu-vm create
#   install  on every worker: git clone REPO_URL ~/llm_math (git pull if it is there), pip install
#            jax[tpu], then pip install -e . gcsfs (gcsfs lets etils.epath read and write gs:// paths)
#   run      on every worker: python3 -m experiments.EXPERIMENT --workdir=WORKDIR [flags...], the
#            flags forwarded exactly as given. No gcsfuse: the code writes the gs:// workdir directly,
#            orbax coordinates the multi-host checkpoints in it and process 0 writes everything else.
#   delete   gcloud compute tpus tpu-vm delete
# The results live in the bucket, so they survive delete. The script stops at the first failing step
# (set -e), so delete runs only after run succeeded: a failed run leaves the VM up for inspection or a
# resume (STEPS="install run"); remove it with STEPS=delete. When run succeeded, the script ends by
# printing the workdir with the gcloud storage ls and tensorboard --logdir commands that show it.
# Spot VMs (SPOT=1): a preemption sends SIGTERM, the run saves a checkpoint to the bucket and exits. A
# preempted VM keeps its name until deleted, so resume with STEPS="delete create install run delete";
# the run restarts from the last checkpoint in the bucket.
# A missing variable, a BUCKET or WORKDIR not starting with gs://, an unknown step or experiment, or
# --workdir among the flags stops the script with one "error: ..." line before any gcloud command.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
error() { echo "error: $*" >&2; exit 2; }
need() { [[ -n "${!1:-}" ]] || error "set $1 ($2)"; }

[[ $# -ge 1 ]] || error "no experiment given (usage: launch/cloud_tpu.sh EXPERIMENT [flags...])"
experiment="$1"
shift
[[ "${experiment}" =~ ^[A-Za-z_][A-Za-z0-9_]*$ && -f "${root}/experiments/${experiment}.py" ]] \
  || error "unknown experiment '${experiment}' (no experiments/${experiment}.py)"
for arg in "$@"; do
  case "${arg}" in
    --workdir | --workdir=* | -workdir | -workdir=*)
      error "do not pass --workdir; set WORKDIR=gs://... or BUCKET=gs://..." ;;
  esac
done

read -r -a steps <<<"${STEPS-create install run delete}"
[[ ${#steps[@]} -gt 0 ]] || error "STEPS is empty (choose from: create install run delete)"
for step in "${steps[@]}"; do
  case "${step}" in
    create | install | run | delete) ;;
    *) error "unknown step '${step}' in STEPS (expected create, install, run, delete)" ;;
  esac
done
has_step() {
  local step
  for step in "${steps[@]}"; do [[ "${step}" == "$1" ]] && return 0; done
  return 1
}

need TPU_NAME "name of the TPU VM, e.g. llm-math"
need ZONE "e.g. us-central2-b"
if has_step create; then
  need ACCELERATOR "e.g. v4-8"
fi
case "${SPOT:-0}" in
  1) spot_flag=--spot ;;
  0) spot_flag="" ;;
  *) error "SPOT must be 1 or 0, not '${SPOT}'" ;;
esac
version="${TPU_SOFTWARE_VERSION:-tpu-ubuntu2204-base}"
repo=""
if has_step install; then
  repo="${REPO_URL:-$(git -C "${root}" config --get remote.origin.url || true)}"
  [[ -n "${repo}" ]] || error "set REPO_URL (this checkout has no origin remote to clone on the workers)"
fi
workdir=""
if has_step run; then
  if [[ -n "${WORKDIR:-}" ]]; then
    [[ "${WORKDIR}" == gs://?* ]] || error "WORKDIR must start with gs://, not '${WORKDIR}'"
    workdir="${WORKDIR%/}"
  else
    need BUCKET "gs://NAME, the bucket that holds the workdir; or set WORKDIR=gs://..."
    [[ "${BUCKET}" == gs://?* ]] || error "BUCKET must start with gs://, not '${BUCKET}'"
    workdir="${BUCKET%/}/llm_math/${TPU_NAME}/${experiment}"
  fi
fi
command -v gcloud >/dev/null || error "gcloud not found on PATH (install the Google Cloud SDK)"

# The remote command is one string that the worker's shell parses again, so every word is quoted.
ssh_all() { gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all --command="$1"; }
install_cmd="set -e
if [ ! -d ~/llm_math/.git ]; then git clone -q $(printf '%q' "${repo}") ~/llm_math; fi
cd ~/llm_math && git pull -q --ff-only
python3 -m pip install -q -U 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
python3 -m pip install -q -e . gcsfs"
run_cmd="cd ~/llm_math && $(printf '%q ' python3 -m "experiments.${experiment}" "--workdir=${workdir}" "$@")"

ran=0
for step in "${steps[@]}"; do
  echo "== ${step} (${TPU_NAME}, ${ZONE})" >&2
  case "${step}" in
    create)
      gcloud compute tpus tpu-vm create "${TPU_NAME}" --zone="${ZONE}" \
        --accelerator-type="${ACCELERATOR}" --version="${version}" ${spot_flag:+"${spot_flag}"}
      ;;
    install)
      ssh_all "${install_cmd}"
      ;;
    run)
      status=0
      ssh_all "${run_cmd}" || status=$?
      if [[ "${status}" -ne 0 ]]; then
        echo "error: run failed (exit ${status}); the TPU VM ${TPU_NAME} is left up and later steps" \
          "are skipped; checkpoints so far are in ${workdir}" >&2
        echo "  resume: STEPS=\"install run\" (after a spot preemption: STEPS=\"delete create install run" \
          "delete\"); remove the VM: STEPS=delete" >&2
        exit "${status}"
      fi
      ran=1
      ;;
    delete)
      gcloud compute tpus tpu-vm delete "${TPU_NAME}" --zone="${ZONE}" --quiet
      ;;
  esac
done

if [[ "${ran}" -eq 1 ]]; then
  echo "results: ${workdir}"
  echo "  list:        gcloud storage ls $(printf '%q' "${workdir}")"
  echo "  TensorBoard: tensorboard --logdir=$(printf '%q' "${workdir}")"
fi
