"""Progress reporting for every loop a user waits on (train, evaluate, prepare, predict).

``Progress(total, desc='predict', unit='img')`` tracks how far a loop is, its recent rate and
the ETA, plus any current figures (``update(n, loss=0.41)``):

* on a terminal it redraws one live line (``\\r``, at most ``redraw_hz`` times a second) and
  makes the line permanent every ``every`` steps, so the scroll-back keeps a history;
* elsewhere (logs, CI, pipes) it writes nothing in between and emits one line every ``every``
  steps, plus the first and the last, through ``log`` (default: print to the stream).

The line reads ``predict 120/400 (30.0%) | 5.21 img/s | ETA 0:00:53 | skipped=1``. The rate is
measured over the last ``window`` updates, so a slow first step (compilation) drops out of it.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
import shutil
import sys
import time
from typing import Any, TextIO


def format_duration(seconds: float) -> str:
  """Seconds → ``h:mm:ss``."""
  seconds = max(int(round(seconds)), 0)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}"


def _figure(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


class Progress:
  """Rate, ETA and current figures of a loop of ``total`` steps.

  Args:
    total: number of steps at the end (> 0).
    desc: what is counted, first word of the line.
    unit: rate unit (``it``, ``img``, ``batch``).
    start: steps already done (a resumed run).
    every: non-terminal output: one line every ``every`` steps (0: only first and last).
    stream: where the live line goes (default ``sys.stderr``).
    log: how permanent lines are emitted when not on a terminal (default: print to ``stream``);
      e.g. ``absl.logging.info``.
    tty: force terminal / non-terminal behaviour (default: ``stream.isatty()``).
    window: number of recent updates the rate is measured over.
    clock: time source (tests).
  """

  def __init__(self, total: int, *, desc: str = "step", unit: str = "it", start: int = 0,
               every: int = 50, stream: TextIO | None = None,
               log: Callable[[str], Any] | None = None, tty: bool | None = None,
               window: int = 20, redraw_hz: float = 10.0,
               clock: Callable[[], float] = time.monotonic):
    if int(total) <= 0:
      raise ValueError(f"Progress({desc!r}): total must be positive, got {total}")
    self.total, self.desc, self.unit = int(total), desc, unit
    self.every = max(int(every), 0)
    self.stream = stream if stream is not None else sys.stderr
    self._log = log
    if tty is None:
      isatty = getattr(self.stream, "isatty", None)
      tty = bool(isatty and isatty())
    self.tty = tty
    self._clock = clock
    self._marks = collections.deque([(clock(), int(start))], maxlen=max(window, 1) + 1)
    self._min_redraw = 1.0 / redraw_hz if redraw_hz > 0 else 0.0
    self._last_draw = -float("inf")
    self._live = False  # a live line is on screen (terminal only)
    self._emitted_first = False
    self._figures: dict[str, Any] = {}
    self.done = int(start)
    self.start_time = clock()

  # ------------------------------------------------------------------ figures and text

  def rate(self) -> float | None:
    """Steps per second over the recent window, or None before any progress."""
    (t0, s0), (t1, s1) = self._marks[0], self._marks[-1]
    if t1 <= t0 or s1 <= s0:
      return None
    return (s1 - s0) / (t1 - t0)

  def eta(self) -> float | None:
    """Seconds left at the recent rate, or None."""
    rate = self.rate()
    return None if rate is None else max(self.total - self.done, 0) / rate

  def line(self, **figures: Any) -> str:
    """The progress line for the current state (no side effect)."""
    pct = 100.0 * self.done / self.total
    text = f"{self.desc} {self.done}/{self.total} ({pct:.1f}%)"
    rate, eta = self.rate(), self.eta()
    if rate is None:
      text += f" | -- {self.unit}/s | ETA --:--:--"
    else:
      text += f" | {rate:.3g} {self.unit}/s | ETA {format_duration(eta)}"
    if figures:
      text += " | " + " ".join(f"{k}={_figure(v)}" for k, v in figures.items())
    return text

  # ------------------------------------------------------------------ output

  def update(self, done: int | None = None, *, force: bool = False, **figures: Any) -> None:
    """Records that ``done`` steps are finished now (default: one more than before).

    A permanent line is emitted at the first update, whenever a multiple of ``every`` is
    reached or passed, at the last step, and when ``force`` is set; on a terminal the live line
    is redrawn in between. Without ``figures`` the last ones given are shown again.
    """
    before = self.done
    self.done = self.done + 1 if done is None else int(done)
    if figures:
      self._figures = figures
    figures = self._figures
    now = self._clock()
    self._marks.append((now, self.done))
    permanent = (force or not self._emitted_first or self.done >= self.total
                 or (self.every and self.done // self.every > before // self.every))
    if permanent:
      self._emitted_first = True
      self._emit(self.line(**figures))
    elif self.tty and now - self._last_draw >= self._min_redraw:
      self._draw(self.line(**figures))

  def restart_rate(self) -> None:
    """Measures the rate from the latest update on (e.g. once compilation is behind)."""
    last = self._marks[-1]
    self._marks.clear()
    self._marks.append(last)

  def message(self, text: str) -> None:
    """Prints ``text`` as a permanent line without breaking the live line."""
    self._emit(text)

  def close(self) -> None:
    """Ends the live line (terminal); safe to call twice."""
    if self._live:
      self.stream.write("\n")
      self.stream.flush()
      self._live = False

  def elapsed(self) -> float:
    """Seconds since this object was created."""
    return self._clock() - self.start_time

  def _draw(self, text: str) -> None:
    width = shutil.get_terminal_size((120, 20)).columns - 1
    if len(text) > width:
      text = text[:max(width - 1, 1)] + "…"
    self.stream.write("\r\x1b[2K" + text)
    self.stream.flush()
    self._live = True
    self._last_draw = self._clock()

  def _emit(self, text: str) -> None:
    if self.tty:
      if self._live:
        self.stream.write("\r\x1b[2K")
        self._live = False
      self.stream.write(text + "\n")
      self.stream.flush()
      self._last_draw = self._clock()
    elif self._log is not None:
      self._log(text)
    else:
      self.stream.write(text + "\n")
      self.stream.flush()

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
