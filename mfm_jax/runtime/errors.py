"""User errors, exit codes and the command-line wrapper that reports them in one line.

A *user error* is something the person running the command can fix (a config value, missing or
bad data, an unreadable checkpoint, a permission, a full disk, a locked work directory). The
entry points (``main``, ``evaluate``, ``data.prepare``, ``convert``) run through ``run``: such
an error prints one line naming the problem and exits non-zero; ``--verbose`` or
``MFM_JAX_VERBOSE=1`` also prints the traceback. Anything else is a bug and keeps its traceback.

Exit codes (README, "Failure behaviour"; ``launch/slurm.sbatch`` requeues on ``PREEMPTED``):
0 done, 1 user error (also bad flags, from absl), 3 non-finite loss, 4 checkpoint save failed,
75 stopped by SIGTERM/SIGINT (checkpoint written; run the same command again to resume).
"""

from __future__ import annotations

from collections.abc import Callable
import os
import sys
from typing import Any

from absl import app
from absl import flags

OK = 0
USER_ERROR = 1  # config, data, checkpoint, permission, workdir lock
NON_FINITE = 3  # NaN/Inf loss: the run stopped, the last good checkpoint is kept
CHECKPOINT_SAVE_FAILED = 4  # a save failed (disk full, read-only): the last good one is kept
PREEMPTED = 75  # SIGTERM/SIGINT: checkpoint written (if a step ran); rerun to resume (EX_TEMPFAIL)

class UserError(Exception):
  """Base (mixin) of errors a user can fix; the message alone must say what and where."""

  exit_code = USER_ERROR


# OS errors on files the user named (missing, permission, disk full, read-only filesystem)
# are user errors too; their message names the path.
_OS_USER_ERRORS = (OSError,)


def exit_code(error: BaseException) -> int | None:
  """The exit code for a user error, None for anything else (a bug)."""
  if isinstance(error, UserError):
    return error.exit_code
  if isinstance(error, _OS_USER_ERRORS):
    return USER_ERROR
  return None


def verbose() -> bool:
  if os.environ.get("MFM_JAX_VERBOSE", "") not in ("", "0"):
    return True
  if "verbose" not in flags.FLAGS or not flags.FLAGS.is_parsed():
    return False
  return bool(flags.FLAGS["verbose"].value)


def message(error: BaseException) -> str:
  """One line (or a few, when the error's own message has several) without a traceback."""
  text = str(error).strip() or type(error).__name__
  if isinstance(error, OSError) and not isinstance(error, UserError):
    text = f"{type(error).__name__}: {text}"
  return text


def guard(main: Callable[[list[str]], Any], argv: list[str]) -> Any:
  """Calls ``main(argv)``; a user error becomes one message on stderr and ``SystemExit``."""
  try:
    return main(argv)
  except Exception as e:  # pylint: disable=broad-except
    code = exit_code(e)
    if code is None:
      raise
    if verbose():
      import traceback  # pylint: disable=g-import-not-at-top
      traceback.print_exc()
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "mfm_jax"
    hint = "" if verbose() else " (--verbose or MFM_JAX_VERBOSE=1 shows the traceback)"
    print(f"{prog}: error: {message(e)}{hint}", file=sys.stderr, flush=True)
    raise SystemExit(code) from None


def run(main: Callable[[list[str]], Any]) -> None:
  """``absl.app.run(main)`` with user errors reported by ``guard`` and a ``--verbose`` flag.

  Call it under ``if __name__ == "__main__":`` after defining the program's own flags.
  """
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, "Print tracebacks of user errors too "
                      "(also: MFM_JAX_VERBOSE=1).")
  app.run(lambda argv: guard(main, argv))
