#!/usr/bin/env bash
# Runs one training process on every worker of a Cloud TPU VM slice (multi-host, e.g. v4-32,
# v5p-64); jax.distributed finds the other workers itself (GRASP_DISTRIBUTED=auto).
#
#   launch/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [grasp_jax.main flags...]
#   launch/tpu_vm.sh my-v4-32 us-central2-b configs/sharding.py:model=sd3_medium,fsdp=16 \
#       /mnt/shared/sd3 --config.model.pretrained=/mnt/shared/sd3-medium-diffusers
#
# Before the first run (once per slice):
#   gcloud compute tpus tpu-vm scp --recurse --worker=all --zone=$ZONE . $TPU_NAME:~/grasp_jax
#   gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all \
#     --command='cd ~/grasp_jax && pip install -r requirements.txt "jax[tpu]"'
# WORKDIR must be one directory that every worker sees (Filestore/NFS mount or gcsfuse): orbax
# writes each checkpoint from all workers into it and process 0 writes the summaries.
# Set REPO_DIR if the code is not in ~/grasp_jax on the workers. Not runnable on this box.
set -euo pipefail

if [[ $# -lt 4 ]]; then
  sed -n '2,17p' "$0" >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
shift 4
REPO_DIR=${REPO_DIR:-'~/grasp_jax'}
printf -v FLAGS ' %q' "$@"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="\
cd $REPO_DIR && GRASP_DISTRIBUTED=auto python -m grasp_jax.main \
--config=$(printf %q "$CONFIG") --workdir=$(printf %q "$WORKDIR")$FLAGS"
