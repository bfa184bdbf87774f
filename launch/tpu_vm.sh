#!/usr/bin/env bash
# Cloud TPU VM pod slice: run the same command on every worker; jax.distributed.initialize()
# discovers the slice from the TPU environment. Install with: pip install -e ".[tpu]"
# Edit the block, then from your workstation:
#   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
#     --command "cd mfm_jax && bash launch/tpu_vm.sh"
# Exit codes (mfm_jax/errors.py): 0 done, 1 user error, 3 non-finite loss, 4 checkpoint save
# failed, 75 stopped by SIGTERM/SIGINT with a checkpoint: run this script again to resume.
set -euo pipefail
# ---- edit here -------------------------------------------------------------------------
CONFIG="configs/mic_mfm.py:bf16"
WORKDIR="$HOME/mfm_runs/mic_mfm_tpu"     # local paths are per worker; Orbax writes one tree
DATA_DIR="$HOME/tensorflow_datasets"     # prepared (or copied) on every worker
BATCH_PER_DOMAIN=16                      # global batch, divisible by the number of TPU chips
EXTRA_FLAGS=()
# -----------------------------------------------------------------------------------------
cd "$(dirname "$0")/.."
exec python -m mfm_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
  --config.data.data_dir="$DATA_DIR" --config.data.batch_size="$BATCH_PER_DOMAIN" \
  "${EXTRA_FLAGS[@]}"
