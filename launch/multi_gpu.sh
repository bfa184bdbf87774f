#!/usr/bin/env bash
# Several GPUs on one node: one process drives all local GPUs; the global batch is split over
# them (data parallelism over the mesh's `data` axis). Edit the block, then: bash launch/multi_gpu.sh
# Exit codes (mfm_jax/errors.py): 0 done, 1 user error, 3 non-finite loss, 4 checkpoint save
# failed, 75 stopped by SIGTERM/SIGINT with a checkpoint: run this script again to resume.
set -euo pipefail
# ---- edit here -------------------------------------------------------------------------
CONFIG="configs/mic_mfm.py"
WORKDIR="$HOME/mfm_runs/mic_mfm_gta2cs_4gpu"
DATA_DIR="$HOME/tensorflow_datasets"
GPUS="0,1,2,3"
BATCH_PER_DOMAIN=8        # global: must be divisible by the number of GPUs (reference: 2)
EXTRA_FLAGS=()            # e.g. (--config.optim.lr=1.2e-4) if you scale the learning rate
# -----------------------------------------------------------------------------------------
export CUDA_VISIBLE_DEVICES="$GPUS"
cd "$(dirname "$0")/.."
exec python -m mfm_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
  --config.data.data_dir="$DATA_DIR" --config.data.batch_size="$BATCH_PER_DOMAIN" \
  "${EXTRA_FLAGS[@]}"
