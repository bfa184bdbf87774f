"""DeepLab decode heads in Flax linen, NHWC (uda_reference.md §1.3).

* ``DLV2Head``: the DeepLabV2 ASPP classifier DAFormer/HRDA/MIC run with a ResNet-101: on the
  last feature map only (2048 channels), parallel 3x3 convs (with bias, dilation = padding = d,
  no norm/act) straight to class logits, outputs summed. 'dlv2red' keeps dilations (6, 12)
  (the AdaptSegNet behaviour the reference reproduces), 'dlv2' uses (6, 12, 18, 24).
* ``DeepLabV3PlusHead``: mmseg's DepthwiseSeparableASPPHead (``deeplabv3plus_r50-d8``): image
  pooling + ASPP (1x1 branch for d=1, depthwise-separable 3x3 branches for d>1) → 3x3
  bottleneck, upsampled to the stride-4 map and concatenated with a 48-channel projection of the
  stage-1 features, two depthwise-separable 3x3 ConvModules, Dropout2d, 1x1 ``conv_seg``.

Names mirror the PyTorch state_dict (``decode_head.aspp_modules.1.conv.bias`` →
``aspp_modules_1/conv/bias``, ``image_pool.1.bn`` → ``image_pool_1/bn``,
``sep_bottleneck.0.depthwise_conv.conv`` → ``sep_bottleneck_0/depthwise_conv/conv``).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mfm_jax import ops
# mmcv ConvModule (conv no bias → BN eps 1e-5, momentum 0.1 → ReLU, kaiming fan_out init) and
# DepthwiseSeparableConvModule ({depthwise_conv, pointwise_conv}), shared with the DAFormer head.
from mfm_jax.models.daformer_head import ConvModule
from mfm_jax.models.daformer_head import DepthwiseSeparableConvModule

Dtype = Any

# Head classifier convs: Normal(0, 0.01), bias 0 (§1.3 "head init"; BaseDecodeHead conv_seg).
_normal_001 = nn.initializers.normal(stddev=0.01)


def _check_features(features: Sequence[jax.Array], head: str) -> None:
  if len(features) != 4:
    raise ValueError(f"deeplab.py: {head} expects the 4 backbone stage outputs, got "
                     f"{len(features)} feature maps.")
  for i, f in enumerate(features):
    if f.ndim != 4:
      raise ValueError(f"deeplab.py: {head} feature {i} must be NHWC, got shape {f.shape}.")


class ASPPConv(nn.Module):
  """One DLV2 branch: mmseg ASPPModule entry with norm/act None → a plain conv named ``conv``."""
  features: int
  dilation: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = self.dilation
    # ConvModule bias='auto' keeps the bias when there is no norm layer.
    return nn.Conv(self.features, (3, 3), padding=((d, d), (d, d)), kernel_dilation=d,
                   use_bias=True, dtype=self.dtype, kernel_init=_normal_001,
                   bias_init=nn.initializers.zeros, name="conv")(x)


class DLV2Head(nn.Module):
  """DeepLabV2 classifier: features[3] ``[B, h, w, 2048]`` → logits ``[B, h, w, K]`` (float32).

  No dropout and no ``conv_seg`` (the reference deletes it); the ASPP convs output classes.

  Attributes:
    num_classes: K (19 for Cityscapes).
    dilations: (6, 12) for 'dlv2red', (6, 12, 18, 24) for 'dlv2'.
    dtype: compute dtype.
  """
  num_classes: int
  dilations: Sequence[int] = (6, 12)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], *, train: bool,
               deterministic: bool | None = None) -> jax.Array:
    """``train``/``deterministic`` are part of the model contract; this head has no BN/dropout."""
    del train, deterministic
    _check_features(features, "DLV2Head")
    if not self.dilations:
      raise ValueError("deeplab.py: DLV2Head needs at least one dilation.")
    x = features[3].astype(self.dtype)  # in_index 3
    out = None
    for i, d in enumerate(self.dilations):
      y = ASPPConv(self.num_classes, int(d), dtype=self.dtype, name=f"aspp_modules_{i}")(x)
      out = y if out is None else out + y  # branches are summed, not concatenated
    return out.astype(jnp.float32)


class DeepLabV3PlusHead(nn.Module):
  """DeepLabV3+ decoder: 4 stage outputs → logits at the stage-1 resolution (stride 4), float32.

  Attributes:
    num_classes: K.
    channels: ASPP / decoder width (512).
    c1_channels: width of the stage-1 skip projection (48).
    dilations: ASPP dilations (1, 12, 24, 36); d=1 is a 1x1 ConvModule.
    dropout: Dropout2d rate before ``conv_seg`` (0.1).
    dtype: compute dtype (params and BN statistics stay float32).
  """
  num_classes: int
  channels: int = 512
  c1_channels: int = 48
  dilations: Sequence[int] = (1, 12, 24, 36)
  dropout: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], *, train: bool,
               deterministic: bool | None = None) -> jax.Array:
    deterministic = (not train) if deterministic is None else deterministic
    _check_features(features, "DeepLabV3PlusHead")
    x = features[3].astype(self.dtype)  # in_index 3 (2048 channels)
    size = x.shape[1:3]
    # Image pooling: AdaptiveAvgPool2d(1) (index 0) → 1x1 ConvModule (index 1) → bilinear
    # upsampling back to the ASPP input size (a 1x1 map upsamples to a constant).
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)
    pooled = ConvModule(self.channels, 1, dtype=self.dtype, name="image_pool_1")(
        pooled, train=train)
    branches = [ops.resize_bilinear(pooled, size)]
    for i, d in enumerate(self.dilations):
      name = f"aspp_modules_{i}"
      if d == 1:
        y = ConvModule(self.channels, 1, dtype=self.dtype, name=name)(x, train=train)
      else:
        y = DepthwiseSeparableConvModule(self.channels, int(d), dtype=self.dtype,
                                         name=name)(x, train=train)
      branches.append(y)
    x = jnp.concatenate(branches, axis=-1)  # order: image pool, then dilations
    x = ConvModule(self.channels, 3, dtype=self.dtype, name="bottleneck")(x, train=train)
    c1 = ConvModule(self.c1_channels, 1, dtype=self.dtype, name="c1_bottleneck")(
        features[0].astype(self.dtype), train=train)
    x = jnp.concatenate([ops.resize_bilinear(x, c1.shape[1:3]), c1], axis=-1)
    for i in range(2):  # sep_bottleneck = 2 depthwise-separable 3x3 ConvModules (padding 1)
      x = DepthwiseSeparableConvModule(self.channels, 1, dtype=self.dtype,
                                       name=f"sep_bottleneck_{i}")(x, train=train)
    # Dropout2d: one Bernoulli draw per (sample, channel), broadcast over H and W.
    x = nn.Dropout(self.dropout, broadcast_dims=(1, 2))(x, deterministic=deterministic)
    x = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, kernel_init=_normal_001,
                name="conv_seg")(x)
    return x.astype(jnp.float32)
