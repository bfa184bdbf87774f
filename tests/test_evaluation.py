"""Tests for mfm_jax.evaluation.metrics: confusion/IoU, SYNTHIA protocols, whole/slide inference, Evaluator."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mfm_jax.data import labels
from mfm_jax.evaluation import metrics as ev
from mfm_jax.evaluation import sliding
from mfm_jax.ops import resize_bilinear


def test_confusion_and_iou_hand_example():
  # K = 4. Class 2 is predicted once but never labelled (IoU 0); class 3 only appears as a
  # prediction on an ignored pixel, so its union is 0 (NaN, skipped by the mean).
  label = np.array([[[0, 0, 1, 1], [255, 1, 0, 0]]], np.int32)
  pred = np.array([[[0, 1, 1, 2], [3, 1, 0, 0]]], np.int32)
  conf = np.asarray(jax.jit(ev.confusion_matrix, static_argnums=2)(pred, label, 4))
  expected = np.zeros((4, 4), np.int32)
  expected[0, 0], expected[0, 1], expected[1, 1], expected[1, 2] = 3, 1, 2, 1
  np.testing.assert_array_equal(conf, expected)
  assert conf.dtype == np.int32
  iou = ev.iou_from_confusion(conf)
  np.testing.assert_allclose(iou[:3], [3 / 4, 2 / 4, 0.0])
  assert math.isnan(iou[3])
  report = ev.miou_report(conf, ("a", "b", "c", "d"))
  assert report["mIoU"] == pytest.approx(100 * (0.75 + 0.5 + 0.0) / 3)
  assert report["per_class"]["a"] == pytest.approx(75.0)
  assert math.isnan(report["per_class"]["d"])
  assert report["aAcc"] == pytest.approx(100 * 5 / 7)
  assert report["per_class_acc"]["b"] == pytest.approx(100 * 2 / 3)
  assert report["num_pixels"] == 7
  assert "mIoU16" not in report  # Protocols only exist for the 19 Cityscapes classes.


def test_confusion_matches_bruteforce():
  rng = np.random.default_rng(0)
  label = rng.integers(0, 19, (2, 9, 13)).astype(np.int32)
  label[rng.random(label.shape) < 0.2] = 255
  pred = rng.integers(0, 19, label.shape).astype(np.int32)
  expected = np.zeros((19, 19), np.int64)
  for l, p in zip(label.ravel(), pred.ravel()):
    if l != 255:
      expected[l, p] += 1
  np.testing.assert_array_equal(np.asarray(ev.confusion_matrix(pred, label)), expected)
  with pytest.raises(ValueError, match="pred shape"):
    ev.confusion_matrix(pred[:, :-1], label)


def test_synthia_protocols():
  assert len(labels.SYNTHIA16_CLASSES) == 16 and len(labels.SYNTHIA13_CLASSES) == 13
  # Every class perfect, except: terrain/truck/train labelled but never predicted right
  # (IoU 0, the SYNTHIA case), and wall at IoU 0.5 (half predicted as terrain).
  conf = np.diag(np.full(19, 100)).astype(np.int64)
  terrain, wall, truck, train = 9, 3, 14, 16
  conf[terrain, terrain] = conf[truck, truck] = conf[train, train] = 0
  conf[truck, terrain] = conf[train, terrain] = conf[terrain, truck] = 50
  conf[wall, wall], conf[wall, terrain] = 50, 50
  report = ev.miou_report(conf, labels.CLASSES)
  assert report["per_class"]["wall"] == pytest.approx(50.0)
  assert report["mIoU"] == pytest.approx(100 * 15.5 / 19)
  assert report["mIoU16"] == pytest.approx(100 * 15.5 / 16)
  # Reference identity: mIoU16 = mIoU19 · 19/16 when the three dropped IoUs are 0.
  assert report["mIoU16"] == pytest.approx(report["mIoU"] * 19 / 16)
  assert report["mIoU13"] == pytest.approx(100.0)  # wall/fence/pole are not in the 13.
  text = ev.format_report(report)
  assert "traffic light" in text and "mIoU19 81.58" in text and "mIoU16 96.88" in text
  assert "mIoU13 100.00" in text
  scalars = ev.report_scalars(report)
  assert scalars["eval/IoU/wall"] == pytest.approx(50.0) and "eval/mIoU16" in scalars
  nan_report = ev.miou_report(np.zeros((19, 19), np.int64))
  assert math.isnan(nan_report["mIoU"]) and "n/a" in ev.format_report(nan_report)


def test_slide_windows_cityscapes_and_coverage():
  # HRDA/MIC test_cfg: crop 1024, stride 512 on the full 1024x2048 image → 3 windows.
  windows = sliding.slide_windows(1024, 2048, 1024, 512)
  assert windows == [(0, 1024, 0, 1024), (0, 1024, 512, 1536), (0, 1024, 1024, 2048)]
  for h, w, crop, stride in [(37, 53, (16, 20), (7, 9)), (10, 50, 16, (8, 16)),
                             (64, 64, 64, 32), (100, 31, (33, 30), (33, 1))]:
    count = sliding.slide_count_map(h, w, crop, stride)
    assert count.min() >= 1, (h, w, crop, stride)
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    for y1, y2, x1, x2 in sliding.slide_windows(h, w, crop, stride):
      assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
      assert (y2 - y1, x2 - x1) == (min(ch, h), min(cw, w))
  assert sliding.slide_windows(64, 64, 64, 32) == [(0, 64, 0, 64)]


def _pixel_logits(k):
  # Translation-equivariant per-pixel function (a 1x1 "conv" with a non-linearity).
  w = jnp.asarray(np.random.default_rng(1).normal(size=(3, k)), jnp.float32)
  return lambda x: jnp.tanh(x @ w) + 0.1 * (x @ w)


def test_slide_equals_whole_for_per_pixel_function():
  k = 5
  fn = _pixel_logits(k)
  images = jnp.asarray(np.random.default_rng(2).normal(size=(2, 40, 56, 3)), jnp.float32)
  whole = sliding.whole_inference(fn, images, (40, 56))
  for batched in (True, False):
    slide = sliding.slide_inference(fn, images, (16, 24), (8, 12), k, batch_windows=batched)
    np.testing.assert_allclose(np.asarray(slide), np.asarray(whole), rtol=1e-5, atol=1e-5)
  up = sliding.slide_inference(fn, images, 32, 16, k, out_size=(80, 112))
  np.testing.assert_allclose(np.asarray(up), np.asarray(resize_bilinear(whole, (80, 112))),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="num_classes=4"):
    sliding.slide_inference(fn, images, 32, 16, 4)


def test_strided_logits_are_resized():
  # A stride-4 "model": every window's logits come back at 1/4 and must be resized.
  def fn(x):
    return jnp.repeat(x[:, ::4, ::4, :1], 3, axis=-1) * jnp.array([1.0, -1.0, 0.5])
  images = jnp.full((1, 32, 48, 3), 2.0)
  slide = sliding.slide_inference(fn, images, 16, 8, 3)
  assert slide.shape == (1, 32, 48, 3)
  np.testing.assert_allclose(np.asarray(slide[0, 5, 7]), [2.0, -2.0, 1.0], rtol=1e-6)
  whole = sliding.whole_inference(fn, images, (64, 96))
  assert whole.shape == (1, 64, 96, 3)
  # mmseg: resize to the input size first, then to the label size.
  ref = resize_bilinear(resize_bilinear(fn(images), (32, 48)), (64, 96))
  np.testing.assert_allclose(np.asarray(whole), np.asarray(ref), rtol=1e-6)


def test_evaluator_accumulates_over_batches():
  k = 19
  fn = _pixel_logits(k)

  @jax.jit
  def predict(image):
    return jnp.argmax(sliding.whole_inference(fn, image, (24, 32)), axis=-1)

  rng = np.random.default_rng(3)
  batches = []
  for _ in range(3):
    image = rng.normal(size=(2, 12, 16, 3)).astype(np.float32)
    label = rng.integers(0, k, (2, 24, 32)).astype(np.int32)
    label[:, :3] = 255
    batches.append({"image": image, "label": label})
  evaluator = ev.Evaluator(predict, k, labels.CLASSES)
  report = evaluator.run(iter(batches))
  preds = np.concatenate([np.asarray(predict(b["image"])) for b in batches])
  all_labels = np.concatenate([b["label"] for b in batches])
  conf = np.asarray(ev.confusion_matrix(preds, all_labels, k))
  np.testing.assert_array_equal(evaluator.confusion, conf)
  assert evaluator.confusion.dtype == np.int64
  assert report["num_images"] == 6 and report["num_pixels"] == 6 * 21 * 32
  assert report["mIoU"] == pytest.approx(ev.miou_report(conf)["mIoU"])

  with pytest.raises(ValueError, match=r"shape \(2, 12, 16\).*label size"):
    ev.Evaluator(lambda x: jnp.zeros(x.shape[:3], jnp.int32), k).run(batches[:1])
  with pytest.raises(KeyError, match="'image' and 'label'"):
    evaluator.run([{"image": batches[0]["image"]}])
  with pytest.raises(ValueError, match="class names"):
    ev.Evaluator(predict, 5, labels.CLASSES)


class _PixelNet:
  """Fake network: logits = per-pixel linear map of the normalised image (19 classes)."""

  def predict(self, variables, x, train=False):
    del train
    return jnp.einsum("bhwc,ck->bhwk", x, variables["w"]) + variables["b"], None, None


def test_mesh_evaluation_equals_a_numpy_reference():
  """inference.evaluate (prediction + confusion matrix jitted over 4 devices, batches regrouped
  to 4 rows or padded) gives the report of the one-device prediction counted in numpy."""
  from mfm_jax.config import fragments  # pylint: disable=g-import-not-at-top
  from mfm_jax.evaluation import inference
  from mfm_jax.trainer import parallel
  k = 19
  config = fragments.compose(fragments.source_only, presets="synthetic")
  config.data.eval_batch_size = 3  # → 4 rows on 4 devices: every full batch has a padding row
  rng = np.random.default_rng(0)
  variables = {"w": rng.normal(size=(3, k)).astype(np.float32),
               "b": rng.normal(size=(k,)).astype(np.float32)}
  batches = []
  # Rows per call: 1+1+2 (regrouped, no padding) | 3 | 2 | 1 (another size), padded to 4.
  for b, size in ((1, (12, 16)), (1, (12, 16)), (2, (12, 16)), (3, (12, 16)), (2, (12, 16)),
                  (1, (10, 14))):
    label = rng.integers(0, k, (b, 2 * size[0], 2 * size[1])).astype(np.int32)
    label[:, :2] = 255
    batches.append({"image": rng.integers(0, 256, (b, *size, 3), dtype=np.uint8),
                    "label": label})
  mesh = parallel.make_mesh(4)
  mesh_eval = inference.MeshEvaluation(config, _PixelNet(), mesh)
  assert mesh_eval.rows == 4
  seen = []
  report = inference.evaluate(config, _PixelNet(), variables, batches, mesh_eval,
                              on_batch=lambda batch, pred: seen.append(np.asarray(pred)),
                              show_progress=False)
  assert [len(p) for p in seen] == [4, 3, 2, 1]
  seen = [p for group in seen for p in group]
  predict = inference.make_predict_fn(config, _PixelNet())
  conf = np.zeros((k, k), np.int64)
  refs = []
  for batch in batches:
    ref = np.asarray(predict(variables, batch["image"], batch["label"].shape[1:]))
    refs.extend(ref)
    keep = batch["label"] != 255
    conf += np.bincount(batch["label"][keep] * k + ref[keep], minlength=k * k).reshape(k, k)
  expected = ev.miou_report(conf)
  for pred, ref in zip(seen, refs, strict=True):
    np.testing.assert_array_equal(pred, ref)
  expected["num_images"] = 10
  assert report == expected
  assert report["num_pixels"] == sum(int((b["label"] != 255).sum()) for b in batches)


def test_evaluator_flushes_device_counts_before_int32_could_overflow(monkeypatch):
  """With a (patched) tiny int32 limit the device counts are added to the int64 total every
  batch; the total is the same."""
  k = 5
  rng = np.random.default_rng(1)
  batches = [{"image": rng.integers(0, k, (2, 4, 6)), "label": rng.integers(0, k, (2, 4, 6))}
             for _ in range(3)]
  reference = ev.Evaluator(lambda x: jnp.asarray(x), k, labels.CLASSES[:k]).run(batches)
  monkeypatch.setattr(ev, "_INT32_MAX", 60)  # 48 label pixels per batch: flush every batch
  evaluator = ev.Evaluator(lambda x: jnp.asarray(x), k, labels.CLASSES[:k])
  assert evaluator.run(batches) == reference
  assert evaluator.confusion.sum() == 3 * 48
