"""EMA-teacher pseudo-labels and their confidence weights (uda_reference.md §2.3).

The reference (DACS) weight is ONE scalar per iteration: the fraction of pixels of the whole
target batch whose max softmax probability reaches tau = 0.968, broadcast to every pixel. Region
filters then zero the weight: DAFormer's ``pseudo_weight_ignore_top/bottom`` rows (15 / 120 for a
512 crop, "plcrop v1") and HRDA/MIC's ``valid_pseudo_mask`` (plcrop v2, built by the loader).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mfm_jax import ops


def pseudo_labels(teacher_logits: jax.Array, size: tuple[int, int],
                  threshold: float | None, valid_mask: jax.Array | None = None,
                  ignore_top: int = 0, ignore_bottom: int = 0) -> tuple[jax.Array, jax.Array]:
  """Hard pseudo-labels and pixel weights from teacher logits.

  Args:
    teacher_logits: ``[B, h, w, K]`` EMA-teacher logits; bilinearly upsampled to ``size``
      (align_corners=False) before the softmax, like ``encode_decode`` in the reference.
    size: ``(H, W)`` of the target crop.
    threshold: confidence threshold τ (``config.uda.pseudo_threshold``, 0.968 in the reference); ``None`` gives weight 1 everywhere (MIC ablation
      "w/o confidence weight").
    valid_mask: optional ``[B, H, W]`` plcrop-v2 mask multiplied into the weight.
    ignore_top: number of top rows whose weight is zeroed (DAFormer: 15).
    ignore_bottom: number of bottom rows whose weight is zeroed (DAFormer: 120).

  Returns:
    ``(labels int32 [B, H, W], weights float32 [B, H, W])``; gradients are stopped.
  """
  if teacher_logits.ndim != 4:
    raise ValueError(
        f"mfm_jax/uda/pseudo_labels.py: teacher_logits must be [B,h,w,K], got "
        f"{teacher_logits.shape}.")
  height, width = int(size[0]), int(size[1])
  if ignore_top < 0 or ignore_bottom < 0 or ignore_top + ignore_bottom > height:
    raise ValueError(
        f"mfm_jax/uda/pseudo_labels.py: ignore_top={ignore_top} / ignore_bottom={ignore_bottom} "
        f"do not fit a crop of height {height}.")
  logits = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  logits = ops.resize_bilinear(logits, (height, width))
  probs = jax.nn.softmax(logits, axis=-1)
  max_prob = jnp.max(probs, axis=-1)
  labels = jnp.argmax(probs, axis=-1).astype(jnp.int32)
  if threshold is None:
    weights = jnp.ones_like(max_prob)
  else:
    # One scalar for the WHOLE batch: fraction of confident pixels (ps_large_p.sum() / size).
    fraction = jnp.mean((max_prob >= threshold).astype(jnp.float32))
    weights = jnp.broadcast_to(fraction, max_prob.shape)
  rows = jnp.arange(height)
  keep_rows = (rows >= ignore_top) & (rows < height - ignore_bottom)
  weights = weights * keep_rows[None, :, None].astype(jnp.float32)
  if valid_mask is not None:
    if valid_mask.shape != weights.shape:
      raise ValueError(
          f"mfm_jax/uda/pseudo_labels.py: valid_mask shape {valid_mask.shape} != "
          f"{weights.shape}.")
    weights = weights * valid_mask.astype(jnp.float32)
  return labels, weights
