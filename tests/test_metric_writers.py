"""Tests for mfm_jax.metric_writers: CRC-32C, TFRecord framing, Event decoding, JSONL, Progress."""

import json
import os
import struct

import numpy as np
import pytest

from mfm_jax import metric_writers as mw


def _crc32c_bitwise(data: bytes) -> int:
  # Independent reference: bit-at-a-time CRC-32C, no table.
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _read_records(path):
  """Parses TFRecord framing and checks both CRCs of every record."""
  records = []
  with open(path, "rb") as f:
    blob = f.read()
  pos = 0
  while pos < len(blob):
    header = blob[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (len_crc,) = struct.unpack("<I", blob[pos + 8:pos + 12])
    assert len_crc == _masked(_crc32c_bitwise(header))
    data = blob[pos + 12:pos + 12 + length]
    (data_crc,) = struct.unpack("<I", blob[pos + 12 + length:pos + 16 + length])
    assert data_crc == _masked(_crc32c_bitwise(data))
    records.append(data)
    pos += 16 + length
  assert pos == len(blob)
  return records


def test_crc32c_known_vectors():
  assert mw.crc32c(b"123456789") == 0xE3069283
  assert mw.crc32c(b"") == 0
  # RFC 3720 (iSCSI) appendix B.4 vectors.
  assert mw.crc32c(bytes(32)) == 0x8A9136AA
  assert mw.crc32c(b"\xff" * 32) == 0x62A8AB43
  assert mw.crc32c(bytes(range(32))) == 0x46DD794E
  rng = np.random.default_rng(0)
  for n in (1, 7, 100):
    data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    assert mw.crc32c(data) == _crc32c_bitwise(data)
  assert mw.masked_crc32c(b"123456789") == _masked(0xE3069283)


def test_writer_jsonl_and_event_file(tmp_path):
  with mw.MetricWriter(tmp_path / "logs") as writer:
    writer.write_scalars(10, {"loss": 1.5, "lr": np.float32(6e-5), "miou": np.array(42.25)})
    writer.write_scalars(20, {"loss": 0.75, "count": 3})
    writer.write_scalars(2**40, {"loss": -2.0})
    events_path = writer.events_path
  files = sorted(os.listdir(tmp_path / "logs"))
  assert files[0].startswith("events.out.tfevents.") and files[1] == "metrics.jsonl"
  name = files[0].split(".")
  assert name[3].isdigit() and name[4]  # unix time, hostname

  lines = [json.loads(l) for l in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
  assert lines[0] == {"step": 10, "loss": 1.5, "lr": pytest.approx(6e-5), "miou": 42.25}
  assert lines[1] == {"step": 20, "loss": 0.75, "count": 3}
  assert lines[2]["step"] == 2**40

  records = _read_records(events_path)
  assert len(records) == 4
  event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
  events = [event_pb2.Event.FromString(r) for r in records]
  assert events[0].file_version == "brain.Event:2"
  assert events[1].step == 10 and events[1].wall_time > 1.6e9
  got = {v.tag: v.simple_value for v in events[1].summary.value}
  assert got == {"loss": 1.5, "lr": pytest.approx(6e-5), "miou": 42.25}
  assert {v.tag: v.simple_value for v in events[2].summary.value} == {"loss": 0.75, "count": 3.0}
  assert events[3].step == 2**40


def test_negative_step_and_appending(tmp_path):
  with mw.MetricWriter(tmp_path) as w:
    w.write_scalars(-1, {"x": 1.0})
    first = w.events_path
  with mw.MetricWriter(tmp_path) as w:  # Same second: a second event file, JSONL appended.
    w.write_scalars(5, {"x": 2.0})
    second = w.events_path
  assert first != second
  steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert steps == [-1, 5]
  event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
  assert event_pb2.Event.FromString(_read_records(first)[1]).step == -1


def test_disabled_writer_and_errors(tmp_path):
  w = mw.MetricWriter(tmp_path / "off", enabled=False)
  w.write_scalars(1, {"a": 1.0})
  w.flush()
  w.close()
  assert not (tmp_path / "off").exists()
  w = mw.MetricWriter(tmp_path / "on")
  with pytest.raises(ValueError, match="'vec' is not a scalar"):
    w.write_scalars(1, {"vec": np.zeros(3)})
  with pytest.raises(ValueError, match="reserved"):
    w.write_scalars(1, {"step": 3})
  w.close()
  w.close()
  with pytest.raises(RuntimeError, match="closed"):
    w.write_scalars(2, {"a": 1.0})


def test_progress_line():
  now = [100.0]
  p = mw.Progress(total_steps=1000, start_step=100, window=3, clock=lambda: now[0])
  assert p.line(100) == "step 100/1000 (10.0%) | -- it/s | ETA --:--:--"
  now[0] += 60.0  # Slow first interval (compilation).
  p.line(110)
  for _ in range(3):
    now[0] += 10.0
    line = p.line(p._marks[-1][1] + 50)
  # After the window moved past the slow interval: 150 steps in 30 s = 5 it/s.
  assert line == "step 260/1000 (26.0%) | 5.00 it/s | ETA 0:02:28"
  assert mw.format_duration(3 * 3600 + 61) == "3:01:01"
  with pytest.raises(ValueError, match="total_steps"):
    mw.Progress(0, 0)
