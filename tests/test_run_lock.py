"""One run per work directory: a second process is refused naming the owner; stale locks (dead
pid on this host, pid reuse, a requeued SLURM job) are taken over; training refuses before it
writes anything."""

import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest

from mfm_jax.runtime import errors
from mfm_jax.runtime import run_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[2])
from mfm_jax.runtime import run_lock
run_lock.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
  """A second process holding the lock of tmp_path/'work' (killed with SIGKILL at the end)."""
  work = str(tmp_path / "work")
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER, work, REPO], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.stdout.readline().strip() == "locked", proc.stderr.read()
  yield work, proc
  if proc.poll() is None:
    proc.kill()
  proc.wait()


def test_second_run_is_refused_naming_the_owner_then_stale_lock_is_taken_over(holder, caplog):
  work, proc = holder
  with pytest.raises(run_lock.WorkdirLockedError) as err:
    run_lock.acquire(work)
  msg = str(err.value)
  assert f"pid {proc.pid} on host {run_lock.current_owner().host}" in msg
  assert work in msg and run_lock.LOCK_NAME in msg
  assert errors.exit_code(err.value) == errors.USER_ERROR
  # Killed without cleanup (SIGKILL): the lock stays behind, its pid is dead → taken over.
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.exists(os.path.join(work, run_lock.LOCK_NAME))
  with caplog.at_level("WARNING"):
    me = run_lock.acquire(work)
  assert "stale lock" in caplog.text and f"pid {proc.pid}" in caplog.text
  with open(os.path.join(work, run_lock.LOCK_NAME)) as f:
    assert json.load(f)["pid"] == os.getpid() == me.pid
  run_lock.release(work, me)
  assert not os.path.exists(os.path.join(work, run_lock.LOCK_NAME))
  assert sorted(os.listdir(work)) == []  # no temporary or moved-aside files remain


def test_training_refuses_a_locked_workdir_before_writing(holder):
  from mfm_jax.config import fragments  # pylint: disable=g-import-not-at-top
  from mfm_jax.trainer import loop
  work, proc = holder
  config = fragments.compose(fragments.source_only, presets="synthetic")
  with pytest.raises(run_lock.WorkdirLockedError, match=f"pid {proc.pid}"):
    loop.train_and_evaluate(config, work)
  assert sorted(os.listdir(work)) == [run_lock.LOCK_NAME]  # no config.json, metrics, data


def _write_lock(work, **fields):
  owner = dataclasses.replace(run_lock.current_owner(), **fields)
  os.makedirs(work, exist_ok=True)
  with open(os.path.join(work, run_lock.LOCK_NAME), "w") as f:
    json.dump(dataclasses.asdict(owner), f)
  return owner


def test_stale_rules(tmp_path, monkeypatch):
  work = str(tmp_path / "w")
  parent = os.getppid()  # alive, not us
  # Alive pid on this host started at another time: the pid was reused → stale.
  _write_lock(work, pid=parent, proc_start="1")
  run_lock.release(work, run_lock.acquire(work))
  # Alive pid, same start time: a live run → refused.
  _write_lock(work, pid=parent, proc_start=run_lock._proc_start(parent))  # pylint: disable=protected-access
  with pytest.raises(run_lock.WorkdirLockedError):
    run_lock.acquire(work)
  # Another host: cannot be checked from here → refused, naming the file to delete.
  _write_lock(work, pid=parent, host="elsewhere", slurm_job="")
  with pytest.raises(run_lock.WorkdirLockedError, match="delete .*run.lock"):
    run_lock.acquire(work)
  # The same SLURM job (requeued, possibly on another node) → its own stale lock.
  _write_lock(work, pid=parent, host="elsewhere", slurm_job="4242")
  monkeypatch.setenv("SLURM_JOB_ID", "4242")
  run_lock.release(work, run_lock.acquire(work))
  # An unreadable lock is not guessed about.
  with open(os.path.join(work, run_lock.LOCK_NAME), "w") as f:
    f.write("{")
  with pytest.raises(run_lock.WorkdirLockedError, match="cannot be read"):
    run_lock.acquire(work)


def test_hold_releases_on_error_and_other_processes_do_not_lock(tmp_path):
  work = str(tmp_path / "w")
  with pytest.raises(RuntimeError, match="boom"):
    with run_lock.hold(work, process_index=0):
      assert os.path.exists(os.path.join(work, run_lock.LOCK_NAME))
      raise RuntimeError("boom")
  assert not os.path.exists(os.path.join(work, run_lock.LOCK_NAME))
  with run_lock.hold(str(tmp_path / "w1"), process_index=1):  # only process 0 takes the lock
    assert not os.path.exists(tmp_path / "w1")
