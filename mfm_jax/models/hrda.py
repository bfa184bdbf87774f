"""HRDA network: multi-resolution training loss and inference behind the ``SegmentationNetwork`` API.

Reference: ``MIC:seg/mmseg/models/segmentors/hrda_encoder_decoder.py`` and
``decode_heads/hrda_head.py`` (uda_reference.md §1.4, §2.2, §2.6b).

Training (``forward_loss``), for an outer crop ``[B, H, W, 3]`` (1024² in the reference):

* context: the whole crop bilinearly resized by lr_scale = 0.5 (no antialias, like torch);
* detail: an hr_crop_size = 512² crop at one random offset per batch, offsets multiples of
  crop_coord_divisible = 8 (reference ``get_crop_bbox``: offsets ∈ {0, 8, …, 504});
* both through the shared encoder and head; the scale attention (on the context features) is
  zeroed outside the detail box, which in LR-output coordinates is the HR-pixel box / (os 4 /
  lr_scale 0.5) = / 8; fusion as ``hrda_head.fuse`` with the detail logits pasted at box / 4;
* loss = (1 − λ_d)·CE(fused, label) + λ_d·CE(detail logits, label cropped with the same box),
  λ_d = hr_loss_weight = 0.1 (lr_loss_weight is 0 in the reference, so there is no LR term).

Inference (``predict``): context = whole input at 0.5; detail = 512² sliding windows with stride
256 (hr_slide_inference) over the full-resolution input, stacked on the batch axis for one
forward (the reference's batched windows: the teacher's train-mode BatchNorm sees all windows
together), window logits averaged by a count map; fusion without masking; logits bilinearly
resized to the input size.

MFM (OURS, the paper is silent on HRDA): ``mfm_encode`` / ``mfm_decode_loss`` work on the context
features by default (``model.hrda.mfm_features='context'``): ``mfm_encode(images)`` encodes the
×0.5 image and ``mfm_decode_loss`` decodes them with the shared head and takes the CE against the
full-size labels (the CE helper resizes the logits). With ``'detail'`` both use the
deterministic centre detail crop (offset ⌊margin/2⌋ rounded down to a multiple of
crop_coord_divisible), so features and labels agree without sharing a key between the two calls.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from mfm_jax import ops
from mfm_jax.evaluation import sliding
from mfm_jax.models import daformer_head
from mfm_jax.models import segmentor as segmentor_lib
from mfm_jax.models.hrda_head import fuse
from mfm_jax.models.hrda_head import HRDAHead
from mfm_jax.models.hrda_head import HRDASegmentor
from mfm_jax.models.hrda_head import lr_size
from mfm_jax.models.network import SegmentationNetwork
from mfm_jax.uda import losses

Variables = dict[str, Any]
Window = sliding.Window

# Output stride of the DAFormer head (stride-4 logits, §1.2); HRDA's LR box divisor is
# os / lr_scale = 8 (§1.4 "attention masking").
HEAD_OUTPUT_STRIDE = 4
MFM_FEATURES = ("context", "detail")


def crop_offsets(rng: jax.Array, image_size: Sequence[int], crop_size: Sequence[int],
                 divisible: int) -> tuple[jax.Array, jax.Array]:
  """Random top-left corner (y1, x1) of the detail crop, int32 scalars (jittable).

  Reference ``get_crop_bbox``: offset = randint(0, (margin + 1) // divisible) · divisible with
  margin = image − crop, so every offset is a multiple of ``divisible`` and the crop stays inside.
  """
  k_y, k_x = jax.random.split(rng)
  offs = []
  for key, size, crop in ((k_y, image_size[0], crop_size[0]), (k_x, image_size[1], crop_size[1])):
    n = max((max(size - crop, 0) + 1) // divisible, 1)
    offs.append(jax.random.randint(key, (), 0, n, dtype=jnp.int32) * divisible)
  return offs[0], offs[1]


def centre_offsets(image_size: Sequence[int], crop_size: Sequence[int],
                   divisible: int) -> tuple[int, int]:
  """Deterministic (y1, x1) of the centre detail crop used by MFM 'detail' (OURS)."""
  return tuple((max(s - c, 0) // 2) // divisible * divisible
               for s, c in zip(image_size, crop_size))


def detail_boxes(y1, x1, crop_size: Sequence[int], output_stride: int, lr_scale: float
                 ) -> dict[str, tuple]:
  """Boxes ``(y1, y2, x1, x2)`` of the detail crop in three coordinate systems.

  ``'pixel'``: full-resolution input pixels; ``'hr_out'``: the fused/HR logit map (/ os = 4);
  ``'lr_out'``: the LR logit/attention map (/ (os / lr_scale) = 8). Integer division, exact
  when the offsets and the crop are multiples of 8 (crop_coord_divisible).
  """
  hc, wc = crop_size
  pixel = (y1, y1 + hc, x1, x1 + wc)
  lr_div = int(round(output_stride / lr_scale))
  return {"pixel": pixel,
          "hr_out": tuple(v // output_stride for v in pixel),
          "lr_out": tuple(v // lr_div for v in pixel)}


def slide_boxes(height: int, width: int, crop: Sequence[int], stride: Sequence[int],
                output_stride: int) -> tuple[list[Window], list[Window]]:
  """HR sliding windows in pixels (mmseg slide grid, clamped) and in logit coordinates."""
  windows = sliding.slide_windows(height, width, tuple(crop), tuple(stride))
  out = []
  for win in windows:
    if any(v % output_stride for v in win):
      raise ValueError(
          f"mfm_jax/models/hrda.py: HR slide window {win} of a {height}x{width} image is not aligned "
          f"to the head's output stride {output_stride}; use image sizes and "
          f"model.hrda.hr_slide_stride / hr_crop_size that are multiples of {output_stride}.")
    out.append(tuple(v // output_stride for v in win))
  return windows, out


def merge_windows(window_logits: jax.Array, boxes: Sequence[Window], batch: int,
                  size: Sequence[int]) -> jax.Array:
  """Averages window logits (window-major on axis 0) into a ``[batch, *size, K]`` map."""
  wins = []
  for i, (y1, y2, x1, x2) in enumerate(boxes):
    win = window_logits[i * batch:(i + 1) * batch]
    if win.shape[1:3] != (y2 - y1, x2 - x1):
      raise ValueError(f"mfm_jax/models/hrda.py: window logits {win.shape[1:3]} do not fill the "
                       f"box {(y1, y2, x1, x2)} (encoder/head output stride is not "
                       f"{HEAD_OUTPUT_STRIDE}?).")
    wins.append(win)
  return sliding.average_windows(wins, boxes, batch, size)


def _crop(x: jax.Array | None, y1, x1, size: Sequence[int]) -> jax.Array | None:
  """``x[:, y1:y1+h, x1:x1+w]`` for [B, H, W(, C)] arrays with (possibly traced) offsets."""
  if x is None:
    return None
  start = (0, y1, x1) + (0,) * (x.ndim - 3)
  shape = (x.shape[0], size[0], size[1]) + x.shape[3:]
  return jax.lax.dynamic_slice(x, start, shape)


@dataclasses.dataclass(frozen=True)
class HRDANetwork(SegmentationNetwork):
  """``SegmentationNetwork`` for ``HRDASegmentor`` (see the module docstring)."""

  # Values come from config.model.hrda (defaults and sources in mfm_jax/config/base.py).
  model: HRDASegmentor
  hr_crop_size: tuple[int, int]
  crop_coord_divisible: int
  hr_loss_weight: float  # λ_d; fused loss weight 1 − λ_d
  hr_slide_inference: bool
  hr_slide_stride: tuple[int, int]
  mfm_features: str  # 'context' | 'detail'
  decode_method: ClassVar[str] = "decode_single"  # the shared single-scale head

  @property
  def lr_scale(self) -> float:
    return self.model.lr_scale

  def _check_image(self, images: jax.Array) -> tuple[int, int]:
    h, w = images.shape[1:3]
    hc, wc = self.hr_crop_size
    if hc > h or wc > w:
      raise ValueError(f"mfm_jax/models/hrda.py: model.hrda.hr_crop_size {self.hr_crop_size} is larger "
                       f"than the input {h}x{w} (config.data.crop_size).")
    return h, w

  def _lr_image(self, images: jax.Array) -> jax.Array:
    return ops.resize_bilinear(images, lr_size(images.shape[1:3], self.lr_scale))

  def _centre(self, images_or_labels: jax.Array) -> tuple[int, int]:
    return centre_offsets(images_or_labels.shape[1:3], self.hr_crop_size,
                          self.crop_coord_divisible)

  # ---------------------------------------------------------------- SegmentationNetwork API

  def mfm_encode(self, variables: Variables, images: jax.Array, *, train: bool = True,
                 deterministic: bool | None = None, rng=None):
    """MFM features → (features, batch_stats): the ×0.5 context image's features, or (with
    mfm_features='detail') the centre detail crop's (the crop ``mfm_decode_loss`` labels use)."""
    deterministic = (not train) if deterministic is None else deterministic
    if self.mfm_features == "detail":
      self._check_image(images)
      x = _crop(images, *self._centre(images), self.hr_crop_size)
    else:
      x = self._lr_image(images)
    return self.apply(variables, x, method="encode", train=train, deterministic=deterministic,
                     rng=rng)

  def fd_encode(self, variables: Variables, images: jax.Array, *, train: bool = False):
    """Context (LR) features for the ImageNet feature distance (feature_scale 0.5, §1.4),
    whatever ``mfm_features`` is."""
    return self.apply(variables, self._lr_image(images), method="encode", train=train,
                     deterministic=True, rng=None)

  def mfm_decode_loss(self, variables: Variables, features, labels, weights=None, *,
                      rng=None):
    """Train-mode shared head + CE (MFM objective); labels/weights are the full outer crop's
    and are centre-cropped to the detail box when mfm_features='detail'."""
    logits, bs = self.decode(variables, features, train=True, rng=rng)
    if self.mfm_features == "detail":
      y1, x1 = self._centre(labels)
      labels = _crop(labels, y1, x1, self.hr_crop_size)
      weights = _crop(weights, y1, x1, self.hr_crop_size)
    return losses.cross_entropy(logits, labels, weights), bs

  def fused_train_logits(self, out: dict[str, Any], offsets, image_size: Sequence[int]
                         ) -> jax.Array:
    """Fused logits ``[B, H/4, W/4, K]`` of a training forward whose detail crop starts at
    ``offsets`` (attention zeroed outside the crop, detail logits pasted at box / 4)."""
    hr_logits = out["hr_logits"]
    os_ = self.hr_crop_size[0] // hr_logits.shape[1]
    boxes = detail_boxes(offsets[0], offsets[1], self.hr_crop_size, os_, self.lr_scale)
    b, k = hr_logits.shape[0], hr_logits.shape[-1]
    canvas = jnp.zeros((b, image_size[0] // os_, image_size[1] // os_, k), jnp.float32)
    y1, _, x1, _ = boxes["hr_out"]
    inserted = jax.lax.dynamic_update_slice(canvas, hr_logits.astype(jnp.float32),
                                            (0, y1, x1, 0))
    return fuse(out["lr_logits"], out["attention"], inserted, lr_box=boxes["lr_out"])

  def forward_loss(self, variables: Variables, images, labels, weights=None, *, rng=None):
    """HRDA train forward + 0.9·fused CE + 0.1·detail CE → (loss, context features, bs)."""
    if rng is None:
      raise ValueError("mfm_jax/models/hrda.py: HRDANetwork.forward_loss needs `rng` (detail-crop "
                       "offset and dropout).")
    k_crop, k_fwd = jax.random.split(rng)
    h, w = self._check_image(images)
    y1, x1 = crop_offsets(k_crop, (h, w), self.hr_crop_size, self.crop_coord_divisible)
    hr_image = _crop(images, y1, x1, self.hr_crop_size)
    out, bs = self.apply(variables, self._lr_image(images), hr_image, method="scales_forward",
                        train=True, deterministic=False, rng=k_fwd)
    fused = self.fused_train_logits(out, (y1, x1), (h, w))
    loss_fused = losses.cross_entropy(fused, labels, weights)
    # HR loss on the label/weight map cropped with the same box (§2.6b).
    loss_hr = losses.cross_entropy(out["hr_logits"], _crop(labels, y1, x1, self.hr_crop_size),
                                   _crop(weights, y1, x1, self.hr_crop_size))
    loss = (1.0 - self.hr_loss_weight) * loss_fused + self.hr_loss_weight * loss_hr
    return loss, out["lr_features"], bs

  def predict(self, variables: Variables, images, *, train: bool = False):
    """HRDA inference → (logits at the input size, context features, batch_stats).

    ``train=True`` is the EMA teacher's mode (BN batch statistics, dropout off, §2.2).
    """
    b, h, w, _ = images.shape
    if self.hr_slide_inference:
      crop = (min(self.hr_crop_size[0], h), min(self.hr_crop_size[1], w))
      windows, boxes = slide_boxes(h, w, crop, self.hr_slide_stride, HEAD_OUTPUT_STRIDE)
      hr_image = jnp.concatenate([images[:, y1:y2, x1:x2] for y1, y2, x1, x2 in windows], 0)
    else:
      _, boxes = slide_boxes(h, w, (h, w), (h, w), HEAD_OUTPUT_STRIDE)
      hr_image = images
    out, bs = self.apply(variables, self._lr_image(images), hr_image, method="scales_forward",
                        train=train, deterministic=True, rng=None)
    hr_map = merge_windows(out["hr_logits"], boxes, b,
                           (h // HEAD_OUTPUT_STRIDE, w // HEAD_OUTPUT_STRIDE))
    fused = fuse(out["lr_logits"], out["attention"], hr_map)
    return ops.resize_bilinear(fused, (h, w)), out["lr_features"], bs


# ------------------------------------------------------------------------------- builders

def build_segmentor(config: ml_collections.ConfigDict) -> HRDASegmentor:
  """``HRDASegmentor`` from ``config.model`` (+ ``config.model.hrda``)."""
  m = config.model
  lr = min(float(s) for s in m.hrda.scales)  # context scale; detail scale 1.0 (validated)
  k = int(m.num_classes)
  attention = daformer_head.DAFormerHead(
      # Classwise attention: one channel per class (§1.4), else a single map.
      num_classes=k if m.hrda.attention_classwise else 1, embed_dim=int(m.head_embed_dim),
      fusion="conv1", dropout=float(m.head_dropout),
      dtype=segmentor_lib.parse_compute_dtype(m.compute_dtype))
  return HRDASegmentor(
      backbone=segmentor_lib.build_backbone(m),
      decode_head=HRDAHead(head=segmentor_lib.build_head(m), scale_attention=attention),
      lr_scale=lr, joint_encoder=bool(m.joint_encoder))


def build_network(config: ml_collections.ConfigDict) -> HRDANetwork:
  """``HRDANetwork`` for a validated config with ``config.model.hrda.enabled``."""
  h = config.model.hrda
  return HRDANetwork(model=build_segmentor(config), hr_crop_size=tuple(h.hr_crop_size),
                  crop_coord_divisible=int(h.crop_coord_divisible),
                  hr_loss_weight=float(h.hr_loss_weight),
                  hr_slide_inference=bool(h.hr_slide_inference),
                  hr_slide_stride=tuple(h.hr_slide_stride), mfm_features=str(h.mfm_features))


def mfm_image_size(hrda_cfg: ml_collections.ConfigDict, crop_size) -> tuple[int, int]:
  """Size of the images whose features MFM masks: crop × context scale ('context') or
  hr_crop_size ('detail')."""
  if hrda_cfg.mfm_features == "detail":
    return tuple(hrda_cfg.hr_crop_size)
  return lr_size(tuple(crop_size), min(float(s) for s in hrda_cfg.scales))
