#!/usr/bin/env bash
# One GPU. Edit the block below, then: bash launch/single_gpu.sh
# Exit codes (mfm_jax/errors.py): 0 done, 1 user error, 3 non-finite loss, 4 checkpoint save
# failed, 75 stopped by SIGTERM/SIGINT with a checkpoint: run this script again to resume.
set -euo pipefail
# ---- edit here -------------------------------------------------------------------------
CONFIG="configs/mic_mfm.py"            # add ":preset" for variants, e.g. ":bf16"
WORKDIR="$HOME/mfm_runs/mic_mfm_gta2cs"
DATA_DIR="$HOME/tensorflow_datasets"   # prepared with python -m mfm_jax.data.prepare
EXTRA_FLAGS=()                         # e.g. (--config.seed=1 --config.init_from=/ckpt/mit_b5)
# -----------------------------------------------------------------------------------------
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
cd "$(dirname "$0")/.."
exec python -m mfm_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
  --config.data.data_dir="$DATA_DIR" "${EXTRA_FLAGS[@]}"
