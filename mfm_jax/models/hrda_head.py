"""HRDA multi-resolution segmentor (uda_reference.md §1.4) in Flax linen, NHWC.

One shared encoder (MiT-B5) runs on a low-resolution context image (the crop at scale 0.5) and
on a high-resolution detail image (a 512x512 crop at scale 1, or sliding windows at inference).
The shared DAFormer head turns both into logits; a second DAFormer head with 1x1 fusion (the
"scale attention", classwise 19 channels, sigmoid) on the context features decides per pixel
how much to trust the detail logits:

  fused = up(a) · HR_inserted + up((1 − a) · LR)

with ``up`` a bilinear ×(hr_scale / lr_scale) = ×2 resize (align_corners=False) and HR_inserted
the detail logits pasted into a zero map at their location (§1.4 "fusion").

Param tree ``{'backbone', 'decode_head': {'head', 'scale_attention'}}`` mirrors the PyTorch
names ``decode_head.head.*`` / ``decode_head.scale_attention.*`` (HRDAHead itself has no
conv_seg/dropout). The crop-box bookkeeping and the losses live in ``mfm_jax/models/hrda.py``; this
file holds the modules and the pure fusion math.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mfm_jax import ops


class HRDAHead(nn.Module):
  """Container mirroring torch ``HRDAHead``: shared single-scale head + scale-attention head."""
  head: nn.Module  # DAFormerHead (sepaspp), applied to context AND detail features
  scale_attention: nn.Module  # DAFormerHead(fusion='conv1'), K or 1 output channels

  def __call__(self, features: Sequence[jax.Array], *, train: bool,
               deterministic: bool | None = None) -> jax.Array:
    """Single-scale logits of the shared head."""
    return self.head(list(features), train=train, deterministic=deterministic)

  def attention(self, features: Sequence[jax.Array], *, train: bool,
                deterministic: bool | None = None) -> jax.Array:
    """Scale attention a = sigmoid(scale_attention(features)) in [0, 1], float32."""
    logits = self.scale_attention(list(features), train=train, deterministic=deterministic)
    return jax.nn.sigmoid(logits.astype(jnp.float32))


class HRDASegmentor(nn.Module):
  """Shared encoder + ``HRDAHead``. ``train`` drives BN; ``deterministic`` Dropout/DropPath.

  Attributes:
    backbone: the encoder (4 feature levels).
    decode_head: ``HRDAHead``.
    lr_scale: context scale (0.5, §1.4 "scales"); the detail scale is 1.
    joint_encoder: encode the context image and the detail crop in one encoder call when they
      have the same shape (training: 1024² crop → 512² context and 512² detail); the MiT
      encoder treats images independently, so the features are those of two calls up to the
      drop-path draws (config.model.joint_encoder).
  """
  backbone: nn.Module
  decode_head: HRDAHead
  lr_scale: float = 0.5
  joint_encoder: bool = False

  def encode(self, x: jax.Array, *, train: bool,
             deterministic: bool | None = None) -> list[jax.Array]:
    """Image (already at the wanted scale) → 4 multi-scale NHWC features."""
    return list(self.backbone(x, train=train, deterministic=deterministic))

  def decode_single(self, features: Sequence[jax.Array], *, train: bool,
                    deterministic: bool | None = None) -> jax.Array:
    """Shared single-scale head: features → logits at the features' stride-4 size."""
    return self.decode_head(features, train=train, deterministic=deterministic)

  def attention(self, features: Sequence[jax.Array], *, train: bool,
                deterministic: bool | None = None) -> jax.Array:
    """Sigmoid scale attention from (context) features."""
    return self.decode_head.attention(features, train=train, deterministic=deterministic)

  def scales_forward(self, lr_image: jax.Array, hr_image: jax.Array, *, train: bool,
                     deterministic: bool | None = None) -> dict[str, jax.Array | list]:
    """Both branches in the reference order (encoder LR, encoder HR, head LR, head HR,
    attention on LR), which fixes the order of the BatchNorm running-stat updates.

    ``hr_image`` may hold several detail crops/windows stacked on the batch axis.
    Returns ``{'lr_features', 'lr_logits', 'hr_logits', 'attention'}``.
    """
    if self.joint_encoder and lr_image.shape == hr_image.shape:
      # One call, the two batches interleaved image by image (data-sharded rows stay local).
      joint = ops.interleave_batches([lr_image, hr_image])
      feats = [ops.split_interleaved(f, 2)
               for f in self.encode(joint, train=train, deterministic=deterministic)]
      lr_feats, hr_feats = [f[0] for f in feats], [f[1] for f in feats]
    else:
      lr_feats = self.encode(lr_image, train=train, deterministic=deterministic)
      hr_feats = self.encode(hr_image, train=train, deterministic=deterministic)
    lr_logits = self.decode_single(lr_feats, train=train, deterministic=deterministic)
    hr_logits = self.decode_single(hr_feats, train=train, deterministic=deterministic)
    att = self.attention(lr_feats, train=train, deterministic=deterministic)
    return {"lr_features": lr_feats, "lr_logits": lr_logits, "hr_logits": hr_logits,
            "attention": att}

  def __call__(self, x: jax.Array, *, train: bool,
               deterministic: bool | None = None) -> jax.Array:
    """Whole-image HRDA (HR branch on the entire image, no sliding windows) → fused logits at
    stride 4 of ``x``. Also the ``init`` entry point: it touches every parameter."""
    h, w = x.shape[1:3]
    lr_image = ops.resize_bilinear(x, lr_size((h, w), self.lr_scale))
    out = self.scales_forward(lr_image, x, train=train, deterministic=deterministic)
    return fuse(out["lr_logits"], out["attention"], out["hr_logits"])


def lr_size(size: Sequence[int], lr_scale: float) -> tuple[int, int]:
  """Context image size: floor(size · lr_scale) as torch ``interpolate(scale_factor=...)``."""
  return int(size[0] * lr_scale), int(size[1] * lr_scale)


def box_mask(shape: tuple[int, int], y1, y2, x1, x2) -> jax.Array:
  """float32 ``[h, w]`` map, 1 inside rows [y1, y2) × cols [x1, x2) (bounds may be traced)."""
  rows = jnp.arange(shape[0])[:, None]
  cols = jnp.arange(shape[1])[None, :]
  inside = (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)
  return inside.astype(jnp.float32)


def fuse(lr_logits: jax.Array, attention: jax.Array, hr_inserted: jax.Array,
         lr_box: tuple | None = None) -> jax.Array:
  """HRDA scale-attention fusion (§1.4), float32.

  Args:
    lr_logits: context logits ``[B, h, w, K]`` (LR output resolution).
    attention: sigmoid attention ``[B, h, w, K]`` (classwise) or ``[B, h, w, 1]``.
    hr_inserted: detail logits at the fused resolution ``[B, H, W, K]`` (zeros outside the
      detail crop during training; window-averaged logits at inference).
    lr_box: ``(y1, y2, x1, x2)`` of the detail crop in LR-output coordinates (training): the
      attention is zeroed outside it. ``None`` = no masking (inference).

  Returns:
    fused = up(a) · hr_inserted + up((1 − a) · lr_logits) at ``hr_inserted``'s size.
  """
  lr_logits = lr_logits.astype(jnp.float32)
  att = attention.astype(jnp.float32)
  if lr_box is not None:
    att = att * box_mask(att.shape[1:3], *lr_box)[None, :, :, None]
  size = hr_inserted.shape[1:3]
  up_lr = ops.resize_bilinear((1.0 - att) * lr_logits, size)
  up_att = ops.resize_bilinear(att, size)
  return up_att * hr_inserted.astype(jnp.float32) + up_lr
