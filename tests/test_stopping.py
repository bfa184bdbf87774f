"""SIGTERM/SIGINT handling: a flag polled per step, a second signal exits at once, a signal during
compilation is acted on before any step, and two processes stop at the same step."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from mfm_jax.runtime import stopping

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_sets_the_flag_and_a_second_one_exits(sig):
  old = signal.getsignal(sig)
  with stopping.StopRequest() as stop:
    assert not stop.should_stop(1) and not stop.requested
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # the handler runs at the next bytecode of the main thread
    assert stop.requested and stop.should_stop(2) and stop.name == sig.name
    with pytest.raises(KeyboardInterrupt, match="second signal"):
      os.kill(os.getpid(), sig)
      time.sleep(0.05)
  assert signal.getsignal(sig) == old  # handlers restored


class _SlowLowered:
  """Stands for ``jax.jit(f).lower(...)``: compiling takes 30 s."""

  def __init__(self, seconds):
    self.seconds = seconds

  def lower(self, *args):
    del args
    return self

  def compile(self):
    time.sleep(self.seconds)
    return "compiled"


def test_signal_during_compilation_is_acted_on_at_once():
  with stopping.StopRequest() as stop:
    assert stopping.compile_interruptibly(_SlowLowered(0.1), (), stop) == "compiled"
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    t0 = time.time()
    assert stopping.compile_interruptibly(_SlowLowered(30), (), stop) is None
    assert time.time() - t0 < 5
    assert stop.name == "SIGTERM"


_WORKER = textwrap.dedent("""
    import os, signal, sys, time
    pid, port, workdir, repo, sig = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                     sys.argv[4], sys.argv[5])
    sys.path.insert(0, repo)
    import jax
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    from mfm_jax.runtime import run_lock
    from mfm_jax.runtime import stopping
    with run_lock.hold(workdir), stopping.StopRequest() as stop:
      if pid == 0:
        with open(os.path.join(workdir, run_lock.LOCK_NAME)) as f:
          assert f'"pid": {os.getpid()}' in f.read()
      for step in range(1, 400):
        time.sleep(0.05)  # one "training step"
        if pid == 1 and step == 5:
          os.kill(os.getpid(), getattr(signal, sig))  # only process 1 is signalled
        if stop.should_stop(step):
          print(f"worker {pid} stopped at step {step}", flush=True)
          break
    assert not os.path.exists(os.path.join(workdir, run_lock.LOCK_NAME)) or pid
""")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_two_processes_stop_at_the_same_step(tmp_path, sig):
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  procs = [subprocess.Popen(
      [sys.executable, str(script), str(pid), str(port), str(tmp_path / "work"), REPO, sig],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for pid in (0, 1)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=120)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  steps = []
  for pid, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, out[-3000:]
    line = next(l for l in out.splitlines() if l.startswith(f"worker {pid} stopped"))
    steps.append(int(line.split()[-1]))
  assert steps[0] == steps[1] and 5 <= steps[0] < 400, steps
