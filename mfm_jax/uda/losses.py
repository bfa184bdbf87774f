"""Pixel-wise cross-entropy exactly as the reference decode head computes it (§2.6b).

mmseg 0.16 ``CrossEntropyLoss`` with ``ignore_index=255`` and ``reduction='none'``, times the
pixel weight map, then a plain mean over ALL B*H*W pixels (ignored pixels contribute 0 but still
count in the denominator: no ``avg_factor``). Logits are first resized to the label size with
bilinear, align_corners=False interpolation (``decode_head.losses``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mfm_jax import ops


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-pixel CE ``[B, H, W]`` (0 at ignore pixels), logits already at label size.

  The log-softmax is computed in float32 whatever the logits dtype.
  """
  num_classes = logits.shape[-1]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  valid = labels != ops.IGNORE_INDEX
  # Clip so that gather indices stay in range; those pixels are zeroed below.
  safe = jnp.clip(labels, 0, num_classes - 1).astype(jnp.int32)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return jnp.where(valid, nll, 0.0)


def cross_entropy(logits: jax.Array, labels: jax.Array, weight: jax.Array | None = None
                  ) -> jax.Array:
  """Mean pixel CE of ``logits [B,h,w,K]`` against ``labels [B,H,W]`` (int, 255 = ignore).

  Args:
    logits: class scores at any resolution; bilinearly resized to the label size first.
    labels: int train ids; 255 pixels contribute 0 but are counted in the mean.
    weight: optional ``[B, H, W]`` pixel weight map (pseudo-label confidence), applied to the
      per-pixel loss before the mean.

  Returns:
    float32 scalar loss.
  """
  if logits.ndim != 4 or labels.ndim != 3 or logits.shape[0] != labels.shape[0]:
    raise ValueError(
        f"mfm_jax/uda/losses.py: expected logits [B,h,w,K] and labels [B,H,W], got "
        f"{logits.shape} and {labels.shape}.")
  logits = ops.resize_bilinear(logits.astype(jnp.float32), labels.shape[1:3])
  loss = pixel_cross_entropy(logits, labels)
  if weight is not None:
    if weight.shape != labels.shape:
      raise ValueError(
          f"mfm_jax/uda/losses.py: weight shape {weight.shape} != label shape {labels.shape}.")
    loss = loss * weight.astype(jnp.float32)
  return jnp.mean(loss)
