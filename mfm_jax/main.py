"""Entry point: ``python -m mfm_jax.main --config=configs/mic_mfm.py[:preset] --workdir=DIR``.

Overrides use ml-collections syntax, e.g. ``--config.mfm.mask_ratio=0.5``; unknown keys and
invalid values are rejected with a message naming the key, before the work directory is touched.
User errors (config, data, checkpoint, permission, a locked workdir) print one line and exit
non-zero (``--verbose`` adds the traceback); the exit codes are listed in ``mfm_jax/runtime/errors.py``
and the README ("Failure behaviour"): 75 means "stopped by SIGTERM/SIGINT with a checkpoint,
run the same command again to resume".
"""

import os

# `jax[cuda12]` on a machine without a GPU prints a CUDA traceback unless told otherwise;
# respect an explicit JAX_PLATFORMS from the user.
if os.environ.get("MFM_JAX_CPU") == "1":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mfm_jax.runtime import errors  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:preset].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "",
                                   "host:port of process 0 for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
  del argv
  from mfm_jax.config import lib as config_lib  # pylint: disable=g-import-not-at-top
  from mfm_jax.trainer import parallel
  from mfm_jax.trainer import loop
  config_lib.validate(_CONFIG.value)  # before anything is started or written
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  logging.info("Config:\n%s", _CONFIG.value)
  result = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if result.get("preempted"):
    return errors.PREEMPTED
  return errors.OK


if __name__ == "__main__":
  errors.run(main)
