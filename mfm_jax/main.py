"""Entry point: ``python -m mfm_jax.main --config=configs/mic_mfm.py[:preset] --workdir=DIR``.

Overrides use ml-collections syntax, e.g. ``--config.mfm.mask_ratio=0.5``; unknown keys and
invalid values are rejected with a message naming the key, before the work directory is touched.
``--print_config`` prints the resolved config (after presets and overrides) and exits.
User errors (config, data, checkpoint, permission, a locked workdir) print one line and exit
non-zero (``--verbose`` adds the traceback); the exit codes are listed in
``mfm_jax/runtime/errors.py`` and the README ("Failure behaviour"): 75 means "stopped by
SIGTERM/SIGINT with a checkpoint, run the same command again to resume".
"""

from absl import flags
from absl import logging
from ml_collections import config_flags

from mfm_jax.runtime import errors

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when it runs, so modules can be imported together)."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file[:preset].",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
  flags.DEFINE_bool("print_config", False, "Print the resolved config and exit.")
  flags.DEFINE_string("coordinator_address", "", "host:port of process 0 for multi-process runs.")
  flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-host).")
  flags.DEFINE_integer("process_id", -1, "This process's index (multi-host).")
  flags.mark_flag_as_required("config")


def main(argv) -> int:
  del argv
  from mfm_jax.config import validation  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  validation.validate(config)  # before anything is started or written
  if FLAGS.print_config:
    print(config, end="", flush=True)
    return errors.OK
  if not FLAGS.workdir:
    raise validation.ConfigError("--workdir is required (the directory for checkpoints, logs "
                                 "and results).")
  from mfm_jax.trainer import loop  # pylint: disable=g-import-not-at-top
  from mfm_jax.trainer import parallel
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id)
  logging.info("Config:\n%s", config)
  result = loop.train_and_evaluate(config, FLAGS.workdir)
  if result.get("preempted"):
    return errors.PREEMPTED
  return errors.OK


if __name__ == "__main__":
  define_flags()
  errors.run(main)
