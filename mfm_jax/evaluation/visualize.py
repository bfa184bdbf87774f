"""Pictures of predictions: Cityscapes colours, overlays, side-by-side panels, IoU tables.

Used by ``predict`` (colour map and overlay per image), by training's evaluation hook (a few
validation predictions and the per-class IoU table in TensorBoard) and by the README figure.
Pure numpy + Pillow, no JAX.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
from typing import Any

import numpy as np

from mfm_jax.data import labels as labels_lib

# Train id → RGB, the Cityscapes palette; 255 (ignore) and anything unknown are black.
_LUT = np.zeros((256, 3), np.uint8)
_LUT[:len(labels_lib.PALETTE)] = np.asarray(labels_lib.PALETTE, np.uint8)


def colorize(label: np.ndarray) -> np.ndarray:
  """Train ids ``[H, W]`` (any int dtype) → uint8 ``[H, W, 3]`` Cityscapes colours."""
  label = np.asarray(label)
  return _LUT[np.where((label >= 0) & (label < 256), label, 255).astype(np.uint8)]


def overlay(image: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """``(1 − alpha)·image + alpha·color`` as uint8 (both ``[H, W, 3]``, same size)."""
  if image.shape != color.shape:
    raise ValueError(f"overlay: image {image.shape} and colours {color.shape} differ in size")
  mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * color.astype(np.float32)
  return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def resize(image: np.ndarray, size: Sequence[int], *, nearest: bool = False) -> np.ndarray:
  """uint8 ``[h, w, C]`` or ``[h, w]`` → ``size = (H, W)`` with Pillow (bilinear or nearest)."""
  import PIL.Image  # pylint: disable=g-import-not-at-top
  h, w = int(size[0]), int(size[1])
  if image.shape[:2] == (h, w):
    return image
  resample = PIL.Image.NEAREST if nearest else PIL.Image.BILINEAR
  return np.asarray(PIL.Image.fromarray(image).resize((w, h), resample))


def panel(images: Sequence[np.ndarray], gap: int = 2) -> np.ndarray:
  """uint8 RGB images side by side (resized to the first one's height), white gaps."""
  h = images[0].shape[0]
  cols = []
  for i, img in enumerate(images):
    if img.ndim == 2:
      img = np.repeat(img[..., None], 3, axis=-1)
    if img.shape[0] != h:
      img = resize(img, (h, max(1, round(img.shape[1] * h / img.shape[0]))))
    if i:
      cols.append(np.full((h, gap, 3), 255, np.uint8))
    cols.append(img[..., :3])
  return np.concatenate(cols, axis=1)


def validation_panel(image: np.ndarray, pred: np.ndarray, label: np.ndarray) -> np.ndarray:
  """Evaluation sample → ``image | prediction | ground truth`` at the label's size.

  ``image`` is the uint8 RGB network input (test scale, before the device's Normalize),
  ``pred`` and ``label`` are train ids at the label size.
  """
  size = label.shape[:2]
  rgb = resize(np.asarray(image, np.uint8), size)
  return panel([rgb, colorize(pred), colorize(label)])


def iou_markdown(report: Mapping[str, Any]) -> str:
  """The per-class IoU / accuracy table of a ``miou_report`` as Markdown (TensorBoard Text)."""
  fmt = lambda v: "n/a" if math.isnan(v) else f"{v:.2f}"
  lines = ["| class | IoU | Acc |", "|---|---:|---:|"]
  for name, iou in report["per_class"].items():
    lines.append(f"| {name} | {fmt(iou)} | {fmt(report['per_class_acc'][name])} |")
  summary = [f"**mIoU {fmt(report['mIoU'])}**"]
  summary += [f"{k} {fmt(report[k])}" for k in ("mIoU16", "mIoU13", "aAcc") if k in report]
  return "\n".join(lines) + "\n\n" + " · ".join(summary)
