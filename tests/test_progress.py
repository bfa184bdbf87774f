"""Tests for mfm_jax.runtime.progress: rate/ETA figures, non-terminal and terminal output."""

import io

import pytest

from mfm_jax.runtime import progress


class _Clock:

  def __init__(self, t=100.0):
    self.t = t

  def __call__(self):
    return self.t


def test_line_rate_and_eta_window():
  clock = _Clock()
  p = progress.Progress(1000, desc="step", start=100, window=3, clock=clock, tty=False,
                        stream=io.StringIO())
  assert p.line() == "step 100/1000 (10.0%) | -- it/s | ETA --:--:--"
  clock.t += 60.0  # Slow first interval (compilation).
  p.update(110)
  for _ in range(3):
    clock.t += 10.0
    p.update(p.done + 50)
  # After the window moved past the slow interval: 150 steps in 30 s = 5 it/s.
  assert p.line(loss=0.123456, n=3) == (
      "step 260/1000 (26.0%) | 5 it/s | ETA 0:02:28 | loss=0.1235 n=3")
  assert progress.format_duration(3 * 3600 + 61) == "3:01:01"
  with pytest.raises(ValueError, match="total must be positive"):
    progress.Progress(0)


def test_not_a_terminal_logs_every_n_steps():
  clock, logged = _Clock(), []
  p = progress.Progress(10, desc="predict", unit="img", every=4, clock=clock, tty=False,
                        log=logged.append)
  for i in range(10):
    clock.t += 0.5
    p.update(skipped=i // 5)
  p.close()
  # First update, every 4th, and the last one; nothing else (no carriage returns).
  assert [l.split(" |")[0] for l in logged] == [
      "predict 1/10 (10.0%)", "predict 4/10 (40.0%)", "predict 8/10 (80.0%)",
      "predict 10/10 (100.0%)"]
  assert logged[-1].endswith("| 2 img/s | ETA 0:00:00 | skipped=1")
  p.message("done")
  assert logged[-1] == "done"


def test_not_a_terminal_default_stream_and_every_zero():
  stream = io.StringIO()  # StringIO.isatty() is False: non-terminal mode is detected.
  p = progress.Progress(5, desc="eval", unit="batch", every=0, stream=stream)
  for _ in range(5):
    p.update()
  p.close()
  lines = stream.getvalue().splitlines()
  assert len(lines) == 2 and "\r" not in stream.getvalue()
  assert lines[0].startswith("eval 1/5") and lines[1].startswith("eval 5/5")


def test_terminal_live_line():
  stream, clock = io.StringIO(), _Clock()
  p = progress.Progress(6, every=3, stream=stream, tty=True, clock=clock, redraw_hz=0)
  for _ in range(6):
    clock.t += 1.0
    p.update(loss=1.0)
  p.close()
  out = stream.getvalue()
  assert out.count("\r\x1b[2K") >= 4  # live redraws between the permanent lines
  permanent = [l.split("\r\x1b[2K")[-1] for l in out.split("\n")]
  assert [l.split(" |")[0] for l in permanent if l] == [
      "step 1/6 (16.7%)", "step 3/6 (50.0%)", "step 6/6 (100.0%)"]


def test_batches_cross_every_and_figures_are_kept():
  logged = []
  p = progress.Progress(20, every=5, tty=False, log=logged.append, clock=_Clock())
  for done in (3, 6, 9, 12, 20):  # batches of 3 never hit a multiple of 5 exactly
    p.update(done, loss=done / 10) if done == 3 else p.update(done)
  assert [l.split(" |")[0].split()[1] for l in logged] == ["3/20", "6/20", "12/20", "20/20"]
  assert all(l.endswith("loss=0.3") for l in logged)


def test_restart_rate_drops_compilation():
  clock = _Clock()
  p = progress.Progress(10, tty=False, log=lambda _: None, clock=clock)
  clock.t += 30.0  # first batch: compilation
  p.update(2)
  p.restart_rate()
  assert p.rate() is None
  clock.t += 2.0
  p.update(6)
  assert p.rate() == 2.0 and p.eta() == 2.0
