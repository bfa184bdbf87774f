"""Model-agnostic semantic-segmentation metrics: confusion matrices, mIoU tables, Evaluator.

Metric as mmseg ``eval_metrics`` (uda_reference.md §4): intersection and union per class are
accumulated over the whole validation set (255 = ignore), IoU_c = I_c / U_c, mIoU = nanmean
over the 19 classes. Synthia→Cityscapes is also reported on the 16- and 13-class protocols.
Whole-image and sliding-window inference are in ``mfm_jax.evaluation.sliding``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
import math
from typing import Any
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from mfm_jax.data.labels import CLASSES
from mfm_jax.data.labels import NUM_CLASSES
from mfm_jax.data.labels import SYNTHIA13_CLASSES
from mfm_jax.data.labels import SYNTHIA16_CLASSES
from mfm_jax.ops import IGNORE_INDEX


def confusion_matrix(pred: jax.Array, label: jax.Array,
                     num_classes: int = NUM_CLASSES) -> jax.Array:
  """``int32 [K, K]`` counts, rows = ground truth, columns = prediction (jittable).

  Pixels whose label is 255 (or otherwise outside ``[0, K)``) are not counted, like mmseg.
  """
  if pred.shape != label.shape:
    raise ValueError(f"confusion_matrix: pred shape {pred.shape} != label shape {label.shape}")
  k = num_classes
  pred = jnp.asarray(pred).astype(jnp.int32).reshape(-1)
  label = jnp.asarray(label).astype(jnp.int32).reshape(-1)
  valid = (label != IGNORE_INDEX) & (label >= 0) & (label < k) & (pred >= 0) & (pred < k)
  index = jnp.where(valid, label * k + pred, 0)
  counts = jnp.zeros((k * k,), jnp.int32).at[index].add(valid.astype(jnp.int32))
  return counts.reshape(k, k)


_confusion_jit = jax.jit(confusion_matrix, static_argnames="num_classes")


def iou_from_confusion(conf: Any) -> np.ndarray:
  """Per-class IoU = I / (GT + pred − I) as float64; NaN where the union is 0."""
  conf = np.asarray(conf, np.float64)
  inter = np.diag(conf)
  union = conf.sum(0) + conf.sum(1) - inter
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), np.nan)


def _nanmean_pct(values: np.ndarray) -> float:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # All-NaN → NaN, as mmseg.
    return float(100.0 * np.nanmean(values)) if values.size else math.nan


def miou_report(conf: Any, class_names: Sequence[str] = CLASSES) -> dict[str, Any]:
  """Named metrics from a summed confusion matrix (all values in %).

  Keys: ``per_class`` (class name → IoU %), ``per_class_acc`` (class name → pixel accuracy %), ``mIoU`` (nanmean over all K classes), ``aAcc``,
  ``num_pixels`` and, for the 19 Cityscapes classes, ``mIoU16`` / ``mIoU13`` (SYNTHIA protocols:
  without terrain/truck/train, and additionally without wall/fence/pole).
  """
  conf = np.asarray(conf, np.int64)
  k = conf.shape[0]
  if conf.shape != (k, k) or len(class_names) != k:
    raise ValueError(f"miou_report: confusion shape {conf.shape} does not match "
                     f"{len(class_names)} class names")
  iou = iou_from_confusion(conf)
  gt = conf.sum(1)
  with np.errstate(divide="ignore", invalid="ignore"):
    acc = np.where(gt > 0, np.diag(conf) / np.maximum(gt, 1), np.nan)
  total = int(conf.sum())
  report = {
      "per_class": {name: float(100.0 * v) for name, v in zip(class_names, iou)},
      "per_class_acc": {name: float(100.0 * v) for name, v in zip(class_names, acc)},
      "mIoU": _nanmean_pct(iou),
      "aAcc": float(100.0 * np.trace(conf) / total) if total else math.nan,
      "num_pixels": total,
  }
  if k == NUM_CLASSES:
    report["mIoU16"] = _nanmean_pct(iou[list(SYNTHIA16_CLASSES)])
    report["mIoU13"] = _nanmean_pct(iou[list(SYNTHIA13_CLASSES)])
  return report


def report_scalars(report: Mapping[str, Any], prefix: str = "eval/") -> dict[str, float]:
  """Flattens a report for a metric writer: ``{prefix}mIoU``, ``{prefix}IoU/road``, ..."""
  names = {"per_class": "IoU", "per_class_acc": "Acc"}
  out = {}
  for key, value in report.items():
    if isinstance(value, Mapping):
      out.update({f"{prefix}{names.get(key, key)}/{n}": float(v) for n, v in value.items()})
    else:
      out[f"{prefix}{key}"] = float(value)
  return out


def format_report(report: Mapping[str, Any]) -> str:
  """A fixed-width table: one row per class (IoU, Acc), then the summary numbers."""
  fmt = lambda v: "   n/a" if math.isnan(v) else f"{v:6.2f}"
  names = list(report["per_class"])
  width = max([len(n) for n in names] + [5])
  lines = [f"{'class':<{width}}    IoU    Acc", "-" * (width + 14)]
  for name in names:
    lines.append(f"{name:<{width}} {fmt(report['per_class'][name])} {fmt(report['per_class_acc'][name])}")
  lines.append("-" * (width + 14))
  summary = [f"mIoU{len(names)} {fmt(report['mIoU']).strip()}"]
  for key in ("mIoU16", "mIoU13"):
    if key in report:
      summary.append(f"{key} {fmt(report[key]).strip()}")
  summary.append(f"aAcc {fmt(report['aAcc']).strip()}")
  summary.append(f"pixels {report['num_pixels']}")
  lines.append(" | ".join(summary))
  return "\n".join(lines)


_INT32_MAX = 2**31 - 1


class Evaluator:
  """Accumulates a confusion matrix over ``{'image', 'label'}`` batches → ``miou_report``.

  The one accumulation loop of the package: ``inference.evaluate`` runs it with the jitted
  mesh computation of ``inference.MeshEvaluation`` as ``count_fn``.

  Args:
    predict_fn: ``image [B, H, W, 3] -> int prediction [B, h, w]`` at the label size (e.g. a
      jitted argmax of ``whole_inference``/``slide_inference``); counted with the jitted
      ``confusion_matrix``. Not needed with ``count_fn``.
    num_classes: K.
    class_names: names for the report rows.
    count_fn: ``(image, label) -> (int32 [K, K] counts, prediction)`` of one batch, e.g.
      prediction and confusion matrix in one device computation.

  Counts stay on the device (int32) between batches and are added to the int64 host total
  (``confusion``) before they could overflow (at most 2^31 − 1 label pixels pending), so the
  loop does not wait for the device after every batch. Padding examples (e.g. to fill the
  last batch) must carry label 255 everywhere.
  """

  def __init__(self, predict_fn: Callable[[Any], Any] | None = None,
               num_classes: int = NUM_CLASSES, class_names: Sequence[str] = CLASSES, *,
               count_fn: Callable[[Any, Any], tuple[Any, Any]] | None = None):
    if len(class_names) != num_classes:
      raise ValueError(f"Evaluator: {len(class_names)} class names for {num_classes} classes")
    if (predict_fn is None) == (count_fn is None):
      raise ValueError("Evaluator: give exactly one of predict_fn and count_fn")
    self.predict_fn = predict_fn
    self.count_fn = count_fn or self._predict_and_count
    self.num_classes = num_classes
    self.class_names = tuple(class_names)
    self.reset()

  def reset(self) -> None:
    self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)
    self.num_images = 0
    self._pending, self._pending_pixels = None, 0

  def _predict_and_count(self, image: Any, label: Any) -> tuple[Any, Any]:
    pred = self.predict_fn(image)
    if tuple(pred.shape) != tuple(label.shape):
      raise ValueError(f"Evaluator: predict_fn returned shape {tuple(pred.shape)} but the labels "
                       f"have shape {tuple(label.shape)} (predict at label size)")
    return _confusion_jit(pred, label, num_classes=self.num_classes), pred

  def _flush(self) -> None:
    if self._pending is not None:
      self.confusion += np.asarray(jax.device_get(self._pending), np.int64)
    self._pending, self._pending_pixels = None, 0

  def add(self, batch: Mapping[str, Any], index: int = 0) -> Any:
    """Counts one batch (``index`` names it in errors); returns its prediction."""
    if "image" not in batch or "label" not in batch:
      raise KeyError(f"Evaluator: batch {index} needs keys 'image' and 'label', has "
                     f"{sorted(batch)}")
    label = batch["label"]
    pixels = math.prod(label.shape)
    if pixels > _INT32_MAX:
      raise ValueError(f"Evaluator: batch {index} has {pixels} label pixels; int32 counts hold "
                       f"{_INT32_MAX}. Use smaller batches.")
    try:
      counts, pred = self.count_fn(batch["image"], label)
    except ValueError as e:
      raise ValueError(f"batch {index}: {e}") from e
    if self._pending_pixels + pixels > _INT32_MAX:
      self._flush()
    self._pending = counts if self._pending is None else self._pending + counts
    self._pending_pixels += pixels
    self.num_images += label.shape[0]
    return pred

  def report(self) -> dict[str, Any]:
    """``miou_report`` of everything counted (``confusion`` is then the int64 total)."""
    self._flush()
    report = miou_report(self.confusion, self.class_names)
    report["num_images"] = self.num_images
    return report

  def run(self, batches: Iterable[Mapping[str, Any]],
          on_batch: Callable[[Mapping[str, Any], Any], Any] | None = None) -> dict[str, Any]:
    """Evaluates every batch from zero; ``on_batch(batch, prediction)`` sees each one."""
    self.reset()
    for i, batch in enumerate(batches):
      pred = self.add(batch, i)
      if on_batch is not None:
        on_batch(batch, pred)
    return self.report()
