"""Tests for mfm_jax.runtime.metric_writers: JSONL, and event files read back by TensorBoard's reader.

The event files are written by tensorboardX and read with TensorBoard's own loaders
(``event_file_loader`` for raw events, ``EventAccumulator`` as the TensorBoard UI does), both
of which work without TensorFlow.
"""

import io
import json
import os

import numpy as np
import PIL.Image
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.util import tensor_util

from mfm_jax.runtime import metric_writers as mw


def _events(path):
  return list(event_file_loader.EventFileLoader(path).Load())


def _accumulator(logdir):
  acc = event_accumulator.EventAccumulator(
      str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
  acc.Reload()
  return acc


def test_writer_jsonl_and_event_file(tmp_path):
  with mw.MetricWriter(tmp_path / "logs") as writer:
    writer.write_scalars(10, {"loss": 1.5, "lr": np.float32(6e-5), "miou": np.array(42.25)})
    writer.write_scalars(20, {"loss": 0.75, "count": 3, "eval/IoU/traffic light": 12.5})
    writer.write_scalars(2**40, {"loss": -2.0})
    events_path = writer.events_path
  files = sorted(os.listdir(tmp_path / "logs"))
  assert files[0].startswith("events.out.tfevents.") and files[1] == "metrics.jsonl"
  assert os.path.join(tmp_path, "logs", files[0]) == events_path

  lines = [json.loads(l) for l in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
  assert lines[0] == {"step": 10, "loss": 1.5, "lr": pytest.approx(6e-5), "miou": 42.25}
  assert lines[1] == {"step": 20, "loss": 0.75, "count": 3, "eval/IoU/traffic light": 12.5}
  assert lines[2]["step"] == 2**40

  events = _events(events_path)
  assert events[0].file_version == "brain.Event:2"
  acc = _accumulator(tmp_path / "logs")
  loss = [(e.step, e.value) for e in acc.Scalars("loss")]
  assert loss == [(10, 1.5), (20, 0.75), (2**40, -2.0)]
  assert acc.Scalars("lr")[0].value == pytest.approx(6e-5)
  assert acc.Scalars("miou")[0].value == 42.25
  assert acc.Scalars("count")[0].value == 3.0
  # TensorBoard tags cannot hold spaces: tensorboardX writes '_' instead.
  assert acc.Scalars("eval/IoU/traffic_light")[0].value == 12.5
  assert all(e.wall_time > 1.6e9 for e in acc.Scalars("loss"))


def test_text_and_images(tmp_path):
  table = "| class | IoU |\n|---|---|\n| road | 97.10 |"
  image = np.zeros((6, 10, 3), np.uint8)
  image[:, :5] = (128, 64, 128)
  with mw.MetricWriter(tmp_path) as w:
    w.write_texts(500, {"eval/iou_table": table})
    w.write_images(500, {"val/0": image, "val/gray": np.full((4, 4), 7, np.uint8)})
  acc = _accumulator(tmp_path)
  texts = acc.Tensors("eval/iou_table/text_summary")
  assert texts[0].step == 500
  assert tensor_util.make_ndarray(texts[0].tensor_proto).item().decode() == table
  img = acc.Images("val/0")[0]
  assert (img.step, img.width, img.height) == (500, 10, 6)
  decoded = np.asarray(PIL.Image.open(io.BytesIO(img.encoded_image_string)).convert("RGB"))
  np.testing.assert_array_equal(decoded, image)
  assert acc.Images("val/gray")[0].width == 4
  with mw.MetricWriter(tmp_path / "bad") as w, pytest.raises(ValueError, match="'x' must be uint8"):
    w.write_images(1, {"x": np.zeros((4, 4, 3), np.float32)})


def test_negative_step_and_appending(tmp_path):
  with mw.MetricWriter(tmp_path) as w:
    w.write_scalars(-1, {"x": 1.0})
    first = w.events_path
  with mw.MetricWriter(tmp_path) as w:  # Same second: a second event file, JSONL appended.
    w.write_scalars(5, {"x": 2.0})
    second = w.events_path
  assert first != second and os.path.isfile(first) and os.path.isfile(second)
  steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert steps == [-1, 5]
  assert [e.step for e in _events(first) if e.summary.value] == [-1]
  assert sorted(e.step for e in _accumulator(tmp_path).Scalars("x")) == [-1, 5]


def test_disabled_writer_and_errors(tmp_path):
  w = mw.MetricWriter(tmp_path / "off", enabled=False)
  w.write_scalars(1, {"a": 1.0})
  w.write_texts(1, {"a": "b"})
  w.write_images(1, {"a": np.zeros((2, 2, 3), np.uint8)})
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
