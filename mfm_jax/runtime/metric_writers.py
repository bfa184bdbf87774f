"""Metric logging without TensorFlow: a JSONL file plus TensorBoard event files (tensorboardX).

``metrics.jsonl`` holds one JSON object per ``write_scalars`` call (``{"step": s, **scalars}``,
non-finite values as ``null``), easy to read back with pandas or ``json`` (``python -m
mfm_jax.plot`` draws it). The TensorBoard
file ``events.out.tfevents.<unix time>.<hostname>.<pid>.<n>`` is written by ``tensorboardX`` (a
maintained writer that needs no TensorFlow): scalars, text (e.g. the per-class IoU table, as
Markdown) and images (uint8 ``[H, W, 3]``). Watch it with ``tensorboard --logdir=WORKDIR``.

TensorBoard tag names may only hold ``[A-Za-z0-9_./-]``: tensorboardX replaces other
characters by ``_`` (``eval/IoU/traffic light`` → ``eval/IoU/traffic_light``); the JSONL keeps
the original names. Only process 0 should write (``enabled=False`` elsewhere).
"""

from __future__ import annotations

from collections.abc import Mapping
import itertools
import os
from typing import Any

import numpy as np

from mfm_jax.runtime import json_io

_WRITER_IDS = itertools.count()


def _to_scalar(key: str, value: Any) -> int | float | bool:
  arr = np.asarray(value)
  if arr.size != 1:
    raise ValueError(f"write_scalars: metric {key!r} is not a scalar (shape {arr.shape})")
  item = arr.reshape(()).item()
  if not isinstance(item, (int, float, bool)):
    raise ValueError(f"write_scalars: metric {key!r} has non-numeric value {value!r}")
  return item


def _to_image(key: str, value: Any) -> np.ndarray:
  arr = np.asarray(value)
  if arr.ndim == 2:
    arr = np.repeat(arr[..., None], 3, axis=-1)
  if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or arr.dtype != np.uint8:
    raise ValueError(f"write_images: image {key!r} must be uint8 [H, W, 1|3|4], got "
                     f"{arr.dtype} {arr.shape}")
  return arr


class MetricWriter:
  """Writes ``<logdir>/metrics.jsonl`` and a TensorBoard event file in ``logdir``.

  Args:
    logdir: output directory (created when enabled).
    enabled: False on non-zero process indices: every method is then a no-op.
  """

  def __init__(self, logdir: str | os.PathLike, *, enabled: bool = True):
    self.logdir = os.fspath(logdir)
    self.enabled = enabled
    self._jsonl = self._tb = None
    self.events_path = None
    if not enabled:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    os.makedirs(self.logdir, exist_ok=True)
    self._jsonl = open(os.path.join(self.logdir, "metrics.jsonl"), "a", encoding="utf-8")
    # tensorboardX names the file by the second and truncates an existing one: the pid and a
    # per-process counter keep two writers started within one second (a resumed run, a
    # separate evaluation) apart.
    self._tb = SummaryWriter(self.logdir, flush_secs=30,
                             filename_suffix=f".{os.getpid()}.{next(_WRITER_IDS)}")
    # pylint: disable=protected-access
    self.events_path = self._tb._get_file_writer().event_writer._ev_writer._file_name
    # pylint: enable=protected-access

  def _check_open(self) -> None:
    if self._jsonl is None:
      raise RuntimeError(f"MetricWriter({self.logdir}) is closed")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs ``scalars`` (name → number, numpy/jax 0-d arrays accepted) at ``step``."""
    if not self.enabled:
      return
    self._check_open()
    values = {str(k): _to_scalar(str(k), v) for k, v in scalars.items()}
    if "step" in values:
      raise ValueError("write_scalars: 'step' is reserved for the step number")
    # Strict JSON: NaN/Inf (e.g. the IoU of a class absent from the split) are written as null.
    self._jsonl.write(json_io.dumps({"step": int(step), **values}) + "\n")
    for tag, value in values.items():
      self._tb.add_scalar(tag, float(value), int(step))
    # Logging happens every few dozen steps; flushing each time keeps the files usable after a
    # crash or preemption at negligible cost.
    self.flush()

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """Logs Markdown ``texts`` (tag → text) at ``step`` (TensorBoard's Text tab)."""
    self._write_each(step, texts, lambda tag, text, st: self._tb.add_text(tag, str(text), st))

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """Logs uint8 ``[H, W, 3]`` (or ``[H, W]``) ``images`` (tag → array) at ``step``."""
    self._write_each(step, images, lambda tag, image, st: self._tb.add_image(
        tag, _to_image(tag, image), st, dataformats="HWC"))

  def _write_each(self, step: int, items: Mapping[str, Any], add) -> None:
    """``add(tag, value, step)`` for every item, then a flush (TensorBoard only)."""
    if not self.enabled:
      return
    self._check_open()
    for tag, value in items.items():
      add(str(tag), value, int(step))
    self.flush()

  def flush(self) -> None:
    """Flushes both files to the OS."""
    if self._jsonl is not None:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes; further writes raise. Safe to call twice."""
    if self._jsonl is not None:
      self.flush()
      self._jsonl.close()
      self._tb.close()
      self._jsonl = self._tb = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
