"""SIGTERM/SIGINT → stop at the next step boundary (all processes at the same step).

``StopRequest`` turns the signals into a request that the training loop polls once per step
with ``should_stop(step)``; a step is never interrupted. A second signal stops at once
(``KeyboardInterrupt``, no checkpoint).

* One process: a Python signal handler sets the flag; ``should_stop`` reads it (no device
  sync). ``compile_interruptibly`` compiles the step in a helper thread and polls the flag, so a
  signal during compilation (minutes for the full model) is acted on at once, before any step.
* Several processes: JAX's preemption service (``jax.distributed``) catches SIGTERM on any
  process and agrees on a step at which every process stops (``reached_preemption_sync_point``,
  usually the next step); SIGINT is forwarded to it as SIGTERM. A signal during compilation is
  acted on at the first step.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from absl import logging
import jax

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _preemption_service() -> bool:
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return (jax.process_count() > 1
          and distributed.global_state.preemption_sync_manager is not None)


class StopRequest:
  """Context manager installing the handlers (main thread only; elsewhere it never fires)."""

  def __init__(self):
    self.name: str | None = None  # the signal received, e.g. 'SIGTERM'
    self._old: dict[int, Any] = {}
    self._synced = False

  def __enter__(self) -> StopRequest:
    self._synced = _preemption_service()
    for sig in _SIGNALS:
      if self._synced and sig == signal.SIGTERM:
        continue  # JAX's preemption notifier owns SIGTERM
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def __exit__(self, *exc) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old.clear()

  def _handle(self, signum: int, frame) -> None:  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if self.name is not None:
      raise KeyboardInterrupt(f"second signal ({name}) while stopping: exiting without a "
                              "checkpoint")
    self.name = name
    logging.warning("%s received: stopping after the current step with a checkpoint "
                    "(send it again to exit at once).", name)
    if self._synced:
      signal.raise_signal(signal.SIGTERM)  # hand it to JAX's preemption service

  @property
  def requested(self) -> bool:
    """Whether this process received a signal (no agreement; for before the first step)."""
    return self.name is not None and not self._synced

  def should_stop(self, step: int) -> bool:
    """Call after every step, on every process: True on all of them at the same step."""
    if self._synced:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.reached_preemption_sync_point(step):
        self.name = self.name or "SIGTERM"
        return True
      return False
    return self.name is not None


def compile_interruptibly(jitted, args: tuple, stop: StopRequest, poll_s: float = 0.2):
  """``jitted.lower(*args).compile()``, or None when ``stop`` is requested meanwhile.

  In one process the compilation runs in a daemon thread while this (main) thread polls the
  stop flag (Python signal handlers only run in the main thread, and not while it is inside
  XLA). With several processes every process must reach the same step, so it compiles inline.
  """
  if stop.requested:
    return None
  if jax.process_count() > 1:
    return jitted.lower(*args).compile()
  out: dict[str, Any] = {}

  def work():
    try:
      out["fn"] = jitted.lower(*args).compile()
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the main thread)
      out["error"] = e

  thread = threading.Thread(target=work, name="mfm_jax_compile", daemon=True)
  t0 = time.time()
  thread.start()
  while thread.is_alive():
    thread.join(poll_s)
    if stop.requested:
      logging.warning("Stopped during compilation (%.0fs in); no step ran, nothing saved.",
                      time.time() - t0)
      return None
  if "error" in out:
    raise out["error"]
  return out["fn"]
