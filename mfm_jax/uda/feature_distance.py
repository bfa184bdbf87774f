"""DAFormer ImageNet feature distance (uda_reference.md §2.5, ``calc_feat_dist``).

FD = mean over the pixels of the last encoder stage whose down-scaled source label is a "thing"
class of the per-pixel L2 norm of (student - ImageNet) features; lambda_FD = 0.005 is applied by
the caller. Two guards the reference lacks: an empty thing-mask gives 0 (not NaN) with zero
gradient, and the norm's gradient at a zero difference (step 0, student == ImageNet copy) is 0
(torch's ``norm`` backward also returns 0 there) instead of NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mfm_jax import ops


def downscale_label_ratio(labels: jax.Array, scale_factor: int,
                          min_ratio: float, num_classes: int) -> jax.Array:
  """Down-scales ``labels [B, H, W]`` by an integer factor (mmseg-uda ``downscale_label_ratio``).

  One-hot with ignore (255) as an extra class, average pool with kernel = stride =
  ``scale_factor`` (floor of the output size, like ``avg_pool2d``), argmax; the result is 255
  where the winning class is ignore or covers less than ``min_ratio`` of its window.

  Returns:
    int32 ``[B, H // s, W // s]``.
  """
  if int(scale_factor) != scale_factor or scale_factor < 1:
    raise ValueError(
        f"mfm_jax/uda/feature_distance.py: scale_factor must be a positive integer, got "
        f"{scale_factor}.")
  s = int(scale_factor)
  batch, height, width = labels.shape
  out_h, out_w = height // s, width // s
  labels = labels[:, :out_h * s, :out_w * s]
  # Ignore (and any out-of-range id) becomes the extra class ``num_classes``.
  valid = (labels >= 0) & (labels < num_classes)
  labels = jnp.where(valid, labels, num_classes).astype(jnp.int32)
  onehot = jax.nn.one_hot(labels, num_classes + 1, dtype=jnp.float32)
  ratios = onehot.reshape(batch, out_h, s, out_w, s, num_classes + 1).mean(axis=(2, 4))
  winner = jnp.argmax(ratios, axis=-1).astype(jnp.int32)
  best = jnp.max(ratios, axis=-1)
  bad = (winner == num_classes) | (best < min_ratio)
  return jnp.where(bad, ops.IGNORE_INDEX, winner)


def safe_l2_norm(x: jax.Array, axis: int = -1) -> jax.Array:
  """L2 norm over ``axis`` whose gradient at 0 is 0 (not NaN)."""
  sq = jnp.sum(jnp.square(x), axis=axis)
  nonzero = sq > 0
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def feature_distance(student_feat: jax.Array, imnet_feat: jax.Array, labels: jax.Array,
                     classes: Sequence[int] | None, scale_min_ratio: float, num_classes: int
                     ) -> jax.Array:
  """Masked mean feature distance (without lambda_FD).

  Args:
    student_feat: ``[B, h, w, C]`` last-stage student features.
    imnet_feat: same shape, frozen ImageNet-model features (gradient stopped here).
    labels: ``[B, H, W]`` source labels; H / h gives the down-scaling factor (32 for DAFormer,
      64 for HRDA's LR features at a 1024 crop).
    classes: train ids that count (``config.uda.fd.classes``: the reference's thing classes);
      None = every pixel.
    scale_min_ratio: minimum fraction of the winning class in a down-scaled cell.
    num_classes: number of train ids.

  Returns:
    float32 scalar; 0 with zero gradient when no pixel qualifies.
  """
  if student_feat.shape != imnet_feat.shape or student_feat.ndim != 4:
    raise ValueError(
        f"mfm_jax/uda/feature_distance.py: feature shapes must match and be [B,h,w,C], got "
        f"{student_feat.shape} and {imnet_feat.shape}.")
  diff = student_feat.astype(jnp.float32) - jax.lax.stop_gradient(imnet_feat).astype(jnp.float32)
  dist = safe_l2_norm(diff, axis=-1)
  if classes is None:
    return jnp.mean(dist)
  if labels.shape[2] % student_feat.shape[2]:
    raise ValueError(
        f"mfm_jax/uda/feature_distance.py: label width {labels.shape[2]} is not a multiple of "
        f"the feature width {student_feat.shape[2]}.")
  # Reference: scale_factor = gt.shape[-1] // feat.shape[-1] (width ratio).
  scale = labels.shape[2] // student_feat.shape[2]
  small = downscale_label_ratio(labels, scale, scale_min_ratio, num_classes)
  if small.shape != dist.shape:
    raise ValueError(
        f"mfm_jax/uda/feature_distance.py: down-scaled labels {small.shape} do not match "
        f"features {dist.shape[:3]}.")
  mask = jnp.isin(small, jnp.asarray(tuple(classes), jnp.int32)).astype(jnp.float32)
  count = jnp.sum(mask)
  return jnp.sum(dist * mask) / jnp.maximum(count, 1.0)
