"""Scalar logging without TensorFlow: a JSONL file plus a hand-encoded TensorBoard event file.

``metrics.jsonl`` holds one JSON object per ``write_scalars`` call (``{"step": s, **scalars}``,
non-finite values as ``null``), easy to read back with pandas or ``json``. The TensorBoard file
``events.out.tfevents.<unix time>.<hostname>`` is a TFRecord stream of ``Event`` protobufs:

  record  = uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)
  masked  = ((crc >> 15) | (crc << 17)) + 0xa282ead8  (mod 2^32)
  Event   = wall_time (1, double) | step (2, int64) | file_version (3, string) | summary (5)
  Summary = repeated value (1); Value = tag (1, string) | simple_value (2, float)

Only process 0 should write (``enabled=False`` elsewhere). ``Progress`` formats the console
progress line (step, it/s, ETA).
"""

from __future__ import annotations

import collections
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mfm_jax import json_io

# --- CRC-32C (Castagnoli), reflected polynomial 0x82F63B78, table driven. ---


def _crc32c_table() -> tuple[int, ...]:
  crc = np.arange(256, dtype=np.uint32)
  for _ in range(8):
    crc = np.where(crc & 1, (crc >> 1) ^ np.uint32(0x82F63B78), crc >> 1).astype(np.uint32)
  return tuple(int(c) for c in crc)


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C of ``data`` (crc32c(b"123456789") == 0xE3069283)."""
  crc = 0xFFFFFFFF
  table = _CRC_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The TFRecord masked CRC: rotate right by 15 and add 0xa282ead8 (mod 2^32)."""
  crc = crc32c(data)
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_frame(data: bytes) -> bytes:
  """One TFRecord: length, CRC of the length, payload, CRC of the payload (little endian)."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc32c(length)) + data
          + struct.pack("<I", masked_crc32c(data)))


# --- Minimal protobuf encoding of tensorflow.Event / Summary. ---


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # int64 negatives are sent as 10-byte two's complement.
  out = bytearray()
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
  return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, *, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None) -> bytes:
  """Serialises an ``Event`` with either ``file_version`` or a summary of simple values."""
  out = bytearray(_varint(1 << 3 | 1) + struct.pack("<d", wall_time))
  if step:
    out += _varint(2 << 3 | 0) + _varint(int(step))
  if file_version is not None:
    out += _len_field(3, file_version.encode("utf-8"))
  if scalars:
    summary = bytearray()
    for tag, value in scalars.items():
      val = _len_field(1, tag.encode("utf-8")) + _varint(2 << 3 | 5) + struct.pack("<f", value)
      summary += _len_field(1, val)
    out += _len_field(5, bytes(summary))
  return bytes(out)


def _to_scalar(key: str, value: Any) -> int | float | bool:
  arr = np.asarray(value)
  if arr.size != 1:
    raise ValueError(f"write_scalars: metric {key!r} is not a scalar (shape {arr.shape})")
  item = arr.reshape(()).item()
  if not isinstance(item, (int, float, bool)):
    raise ValueError(f"write_scalars: metric {key!r} has non-numeric value {value!r}")
  return item


class MetricWriter:
  """Writes scalars to ``<logdir>/metrics.jsonl`` and a TensorBoard event file.

  Args:
    logdir: output directory (created when enabled).
    enabled: False on non-zero process indices: every method is then a no-op.
  """

  def __init__(self, logdir: str | os.PathLike, *, enabled: bool = True):
    self.logdir = os.fspath(logdir)
    self.enabled = enabled
    self._jsonl = self._events = None
    self.events_path = None
    if not enabled:
      return
    os.makedirs(self.logdir, exist_ok=True)
    self._jsonl = open(os.path.join(self.logdir, "metrics.jsonl"), "a", encoding="utf-8")
    base = os.path.join(self.logdir,
                        f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
    path, n = base, 0
    while os.path.exists(path):  # Two writers started within the same second.
      n += 1
      path = f"{base}.{n}"
    self.events_path = path
    self._events = open(path, "wb")
    self._events.write(tfrecord_frame(encode_event(time.time(), 0, file_version="brain.Event:2")))
    self._events.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs ``scalars`` (name → number, numpy/jax 0-d arrays accepted) at ``step``."""
    if not self.enabled:
      return
    if self._jsonl is None:
      raise RuntimeError(f"MetricWriter({self.logdir}) is closed")
    values = {str(k): _to_scalar(str(k), v) for k, v in scalars.items()}
    if "step" in values:
      raise ValueError("write_scalars: 'step' is reserved for the step number")
    # Strict JSON: NaN/Inf (e.g. the IoU of a class absent from the split) are written as null.
    self._jsonl.write(json_io.dumps({"step": int(step), **values}) + "\n")
    floats = {k: float(v) for k, v in values.items()}
    self._events.write(tfrecord_frame(encode_event(time.time(), int(step), scalars=floats)))
    # Logging happens every few dozen steps; flushing each time keeps the files usable after a
    # crash or preemption at negligible cost.
    self.flush()

  def flush(self) -> None:
    """Flushes both files to the OS."""
    if self._jsonl is not None:
      self._jsonl.flush()
      self._events.flush()

  def close(self) -> None:
    """Flushes and closes; further writes raise. Safe to call twice."""
    if self._jsonl is not None:
      self.flush()
      self._jsonl.close()
      self._events.close()
      self._jsonl = self._events = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def format_duration(seconds: float) -> str:
  """Seconds → ``h:mm:ss``."""
  seconds = max(int(round(seconds)), 0)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}"


class Progress:
  """Console progress line: ``step s/total (p%) | r it/s | ETA h:mm:ss``.

  The rate is measured over the last ``window`` calls of ``line`` (the first measurement
  includes compilation, so it drops out once the window has moved on).
  """

  def __init__(self, total_steps: int, start_step: int = 0, *, window: int = 10,
               clock: Callable[[], float] = time.monotonic):
    if total_steps <= 0:
      raise ValueError(f"Progress: total_steps must be positive, got {total_steps}")
    self.total_steps = int(total_steps)
    self._clock = clock
    self._marks = collections.deque([(clock(), int(start_step))], maxlen=max(window, 1) + 1)

  def rate(self) -> float | None:
    """Steps per second over the recent window, or None before any progress."""
    (t0, s0), (t1, s1) = self._marks[0], self._marks[-1]
    if t1 <= t0 or s1 <= s0:
      return None
    return (s1 - s0) / (t1 - t0)

  def line(self, step: int) -> str:
    """Records that ``step`` was reached now and returns the progress line."""
    self._marks.append((self._clock(), int(step)))
    rate = self.rate()
    pct = 100.0 * step / self.total_steps
    text = f"step {step}/{self.total_steps} ({pct:.1f}%)"
    if rate is None:
      return text + " | -- it/s | ETA --:--:--"
    eta = format_duration(max(self.total_steps - step, 0) / rate)
    return text + f" | {rate:.2f} it/s | ETA {eta}"
