#!/usr/bin/env bash
# Run an llm_math experiment on a Cloud TPU VM or pod slice: create it, install on every worker, run
# the same command on every worker (jax.distributed discovers the pod by itself), tear it down.
#
#   TPU_NAME=llm-math ZONE=us-central2-b ACCELERATOR=v4-32 BUCKET=gs://my-bucket \
#     launch/cloud_tpu.sh perplexity --config=experiments/configs/tinyshakespeare_cpu.py \
#       --data=tfds:tiny_shakespeare --tfds_data_dir=gs://my-bucket/tfds
#
# The bucket is mounted with gcsfuse at ~/bucket on every worker, so the workdir
# ~/bucket/llm_math/$TPU_NAME/$experiment is one directory all workers see (orbax coordinates the
# multi-host checkpoints in it; only process 0 writes metrics, tables and figures). tfds data prepared
# once into the bucket is read with --tfds_data_dir=gs://... directly. Steps:
#   create | install | run | delete   (STEPS="install run" to reuse an existing VM; default: all four)
# Spot/preemptible VMs (SPOT=1): a preemption sends SIGTERM, the run saves a checkpoint and exits;
# running this script again with STEPS="create install run" resumes from the bucket.
set -euo pipefail
experiment="${1:?usage: launch/cloud_tpu.sh EXPERIMENT [flags...]}"
shift
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${ACCELERATOR:?set ACCELERATOR (e.g. v4-8)}"
: "${BUCKET:?set BUCKET (gs://...)}"
version="${TPU_SOFTWARE_VERSION:-tpu-ubuntu2204-base}"
repo="${REPO_URL:-$(git config --get remote.origin.url || true)}"
bucket_name="${BUCKET#gs://}"
bucket_name="${bucket_name%%/*}"
workdir="bucket/llm_math/${TPU_NAME}/${experiment}"
steps="${STEPS:-create install run delete}"
ssh_all() { gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all --command="$1"; }

for step in ${steps}; do
  case "${step}" in
    create)
      gcloud compute tpus tpu-vm create "${TPU_NAME}" --zone="${ZONE}" \
        --accelerator-type="${ACCELERATOR}" --version="${version}" ${SPOT:+--spot}
      ;;
    install)
      ssh_all "set -e; if [ ! -d llm_math ]; then git clone ${repo} llm_math; fi; cd llm_math && git pull -q;
        python3 -m pip install -q -U 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html;
        python3 -m pip install -q -e . gcsfs"
      ;;
    run)
      ssh_all "cd llm_math && python3 -m experiments.${experiment} --workdir=\$HOME/${workdir} $*"
      ;;
    delete)
      gcloud compute tpus tpu-vm delete "${TPU_NAME}" --zone="${ZONE}" --quiet
      ;;
    *) echo "error: unknown step '${step}' (expected create, install, run, delete)" >&2; exit 2 ;;
  esac
done
