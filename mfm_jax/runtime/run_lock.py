"""One run per work directory: a lock file naming its owner (pid, host, start time).

``hold(workdir)`` creates ``<workdir>/run.lock`` atomically (written under a temporary name and
hard-linked into place, so the file is never seen half-written) and removes it when the run
ends, however it ends (except SIGKILL or a crash of the machine). A second run in the same work
directory is refused with a message naming the owner. A lock left behind by a run that is gone
is *stale* and taken over with a warning when that can be decided safely:

* the owner ran on this host and its pid no longer exists (or now belongs to a process started
  at another time: pid reuse is detected with the process start time from ``/proc``);
* the owner was the same SLURM job (``SLURM_JOB_ID``): a requeued job, possibly on another node.

A lock held by another host is otherwise respected (its pid cannot be checked from here): the
message names the file to delete once that run is known to be gone. In multi-process runs only
process 0 takes the lock and all processes agree on the outcome (one broadcast at start-up).
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import dataclasses
import datetime
import json
import os
import socket
import sys

from absl import logging

from mfm_jax.runtime import errors

LOCK_NAME = "run.lock"


class WorkdirLockedError(errors.UserError, RuntimeError):
  """The work directory is in use by another run; the message names the owner."""


@dataclasses.dataclass(frozen=True)
class Owner:
  """Who holds a lock."""
  pid: int
  host: str
  started: str  # ISO time the lock was taken
  proc_start: str = ""  # /proc/<pid>/stat start time (clock ticks after boot); '' if unknown
  slurm_job: str = ""
  command: str = ""

  def describe(self) -> str:
    job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
    return f"pid {self.pid} on host {self.host}{job}, started {self.started}"


def _proc_start(pid: int) -> str:
  try:
    with open(f"/proc/{pid}/stat") as f:
      # Field 22 (starttime); the command name (field 2) may contain spaces but ends with ')'.
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return ""


def current_owner() -> Owner:
  pid = os.getpid()
  return Owner(pid=pid, host=socket.gethostname(),
               started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               proc_start=_proc_start(pid), slurm_job=os.environ.get("SLURM_JOB_ID", ""),
               command=" ".join(sys.argv)[:500])


def _read(path: str) -> Owner | None:
  try:
    with open(path) as f:
      data = json.load(f)
    return Owner(**{k.name: data[k.name] for k in dataclasses.fields(Owner) if k.name in data})
  except (OSError, ValueError, TypeError):
    return None


def is_stale(owner: Owner, me: Owner) -> bool:
  """Whether ``owner``'s run is certainly gone (see the module docstring)."""
  if owner.slurm_job and owner.slurm_job == me.slurm_job and owner.pid != me.pid:
    return True
  if owner.host != me.host:
    return False
  try:
    os.kill(owner.pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # exists, owned by another user
    pass
  started = _proc_start(owner.pid)
  return bool(owner.proc_start and started and started != owner.proc_start)


def _create(path: str, owner: Owner) -> bool:
  """Creates ``path`` holding ``owner`` if it does not exist; False if it does."""
  tmp = f"{path}.{owner.host}.{owner.pid}.tmp"
  with open(tmp, "w") as f:
    json.dump(dataclasses.asdict(owner), f, indent=2)
  try:
    os.link(tmp, path)  # atomic, fails if the lock exists, content complete when visible
    return True
  except FileExistsError:
    return False
  except OSError:  # a filesystem without hard links: exclusive create instead
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      json.dump(dataclasses.asdict(owner), f, indent=2)
    return True
  finally:
    os.remove(tmp)


def acquire(workdir: str) -> Owner:
  """Takes the lock of ``workdir`` (created if missing) or raises ``WorkdirLockedError``."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_NAME)
  me = current_owner()
  for _ in range(5):
    if _create(path, me):
      return me
    owner = _read(path)
    if owner is None:
      raise WorkdirLockedError(
          f"Work directory {workdir} has a lock file {path} that cannot be read. If no run is "
          "using this directory, delete that file and start again.")
    if not is_stale(owner, me):
      raise WorkdirLockedError(
          f"Work directory {workdir} is in use by another run ({owner.describe()}; command: "
          f"{owner.command or '?'}). Use another --workdir, or wait for that run to end. If it "
          f"is certainly gone (e.g. it ran on another host that died), delete {path}.")
    # Move the stale lock aside under a unique name: of several processes taking over at
    # once, only one rename succeeds; a lock that changed meanwhile is put back.
    aside = f"{path}.stale-{me.host}-{me.pid}"
    try:
      os.rename(path, aside)
    except FileNotFoundError:
      continue
    if _read(aside) != owner:
      with contextlib.suppress(OSError):
        os.link(aside, path)
    os.remove(aside)
    logging.warning("Took over the stale lock of %s (%s): that run is gone.", workdir,
                    owner.describe())
  raise WorkdirLockedError(f"Could not lock work directory {workdir}: {path} keeps changing.")


def release(workdir: str, owner: Owner) -> None:
  """Removes the lock if it is still ``owner``'s."""
  path = os.path.join(workdir, LOCK_NAME)
  if _read(path) == owner:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


def _agree(ok: bool) -> bool:
  """Process 0's ``ok`` on every process (a collective in multi-process runs)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.asarray(multihost_utils.broadcast_one_to_all(np.int32(ok))))


@contextlib.contextmanager
def hold(workdir: str, *, process_index: int | None = None) -> Iterator[None]:
  """Holds the lock of ``workdir`` for the duration of the block (process 0 takes it)."""
  if process_index is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index()
  owner, error = None, None
  if process_index == 0:
    try:
      owner = acquire(workdir)
    except Exception as e:  # pylint: disable=broad-except  (re-raised after the agreement)
      error = e
  if not _agree(error is None):
    raise error or WorkdirLockedError(
        f"Work directory {workdir} is in use by another run (see process 0's message).")
  try:
    yield
  finally:
    if owner is not None:
      release(workdir, owner)
