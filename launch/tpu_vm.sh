#!/usr/bin/env bash
# Multi-host training on a Cloud TPU VM slice: the same command on every worker.
#   bash launch/tpu_vm.sh TPU_NAME ZONE configs/crl.py gs://bucket/runs/crl [medjax.main flags...]
# Assumes the repository is cloned at ~/medjax on every worker with `pip install -e .[tpu]`-style
# setup done (jax[tpu]); JAX finds the slice's processes by itself. WORKDIR must be shared
# storage every worker can write (a GCS bucket or an NFS mount).
set -euo pipefail
TPU_NAME=${1:?usage: bash launch/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [flags...]}
ZONE=${2:?zone}
CONFIG=${3:?config}
WORKDIR=${4:?workdir}
shift 4
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command \
  "cd ~/medjax && python3 -m medjax.main --config=$CONFIG --workdir=$WORKDIR $*"
