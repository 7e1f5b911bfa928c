#!/usr/bin/env bash
# N training processes on this machine, talking over 127.0.0.1 with CPU collectives (gloo): the
# multi-host code path (jax.distributed, per-process data shards, orbax saving from every process,
# summaries from process 0 only) on one box.
#
#   launch/local.sh NUM_PROCESSES CONFIG WORKDIR [grasp_jax.main flags...]
#   launch/local.sh 2 configs/demo.py:smoke /tmp/demo2
#
# Each process gets GRASP_LOCAL_DEVICES CPU devices (default 1), so the job's mesh has
# NUM_PROCESSES * GRASP_LOCAL_DEVICES devices. Logs: WORKDIR/logs/process_<i>.log; process 0's log
# is also shown here. If one process fails, the others are stopped and the exit code is non-zero.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,11p' "$0" >&2
  exit 2
fi
NUM_PROCESSES=$1 CONFIG=$2 WORKDIR=$3
shift 3
if ! [[ $NUM_PROCESSES =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: NUM_PROCESSES must be a positive integer, got '$NUM_PROCESSES'" >&2
  exit 2
fi
PYTHON=${PYTHON:-python}
LOCAL_DEVICES=${GRASP_LOCAL_DEVICES:-1}
PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
mkdir -p "$WORKDIR/logs"

pids=()
stop_all() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap stop_all EXIT INT TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$LOCAL_DEVICES" \
  GRASP_COORDINATOR="127.0.0.1:$PORT" GRASP_NUM_PROCESSES="$NUM_PROCESSES" GRASP_PROCESS_ID=$i \
    "$PYTHON" -m grasp_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@" \
    > "$WORKDIR/logs/process_$i.log" 2>&1 &
  pids+=($!)
done
echo "local.sh: $NUM_PROCESSES processes (pids ${pids[*]}), coordinator 127.0.0.1:$PORT," \
     "logs in $WORKDIR/logs/"
tail -n +1 -f "$WORKDIR/logs/process_0.log" --pid="${pids[0]}" &
pids+=($!)

status=0
for ((i = 0; i < NUM_PROCESSES; i++)); do
  if ! wait "${pids[$i]}"; then
    echo "local.sh: process $i failed; see $WORKDIR/logs/process_$i.log" >&2
    status=1
    stop_all
  fi
done
exit $status
