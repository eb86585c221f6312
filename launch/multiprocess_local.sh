#!/usr/bin/env bash
# Usage: bash launch/multiprocess_local.sh N CONFIG WORKDIR [medjax.main flags...]
# Starts N medjax.main processes on this machine (127.0.0.1, CPU, gloo collectives), each with
# DEVICES_PER_PROCESS virtual CPU devices (default 1): a multi-host job in miniature. Exits
# with the first failing process's status after stopping the others.
#   bash launch/multiprocess_local.sh 2 configs/crl.py:smoke runs/crl_2proc
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,6p' "$0"; exit 2
fi
N=$1; CONFIG=$2; WORKDIR=$3; shift 3
PORT=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1} ${XLA_FLAGS:-}"
export JAX_PLATFORMS=cpu
PYTHON=${PYTHON:-python}
pids=()
for ((i = 0; i < N; i++)); do
  "$PYTHON" -m medjax.main --config="$CONFIG" --workdir="$WORKDIR" \
    --coordinator_address="127.0.0.1:$PORT" --num_processes="$N" --process_id="$i" "$@" &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
# Wait for whichever process ends first; a failure stops the rest.
for ((i = 0; i < N; i++)); do
  code=0
  wait -n "${pids[@]}" || code=$?
  if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$code
    echo "A process exited with status $code: stopping the others." >&2
    kill "${pids[@]}" 2>/dev/null || true
  fi
done
exit $status
