"""DAFormer decode head in Flax linen, NHWC (uda_reference.md §1.2).

Per-level Linear embedding (C_i → C_e, no norm/act) → bilinear upsampling to the stride-4 map →
concatenation in level order 0..3 → fusion → Dropout2d(0.1) → 1x1 ``conv_seg``. Fusion is one of

* ``'sepaspp'``: final DAFormer ("context-aware fusion"): a 1x1 ConvModule branch plus
  depthwise-separable 3x3 branches with dilations (1, 6, 12, 18) (d=1 is the 1x1 branch), no
  image-pool branch, then a 3x3 ConvModule bottleneck;
* ``'aspp'``: the same with ordinary dilated 3x3 convs ("w/o DSC");
* ``'conv1'``: one 1x1 ConvModule C_e·4 → C_e (SegFormer-like; also HRDA's scale-attention head).

A ConvModule is conv (no bias) → BatchNorm(eps 1e-5, torch momentum 0.1) → ReLU. Names mirror
the PyTorch state_dict (``fuse_layer.aspp_modules.1.depthwise_conv.bn`` →
``fuse_layer/aspp_modules_1/depthwise_conv/bn``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mfm_jax import ops
from mfm_jax.models import layers

Dtype = Any

FUSIONS = ("sepaspp", "aspp", "conv1")

# ConvModule convs: mmcv kaiming_init(mode='fan_out', nonlinearity='relu', distribution='normal')
# → N(0, sqrt(2 / fan_out)) with torch fan_out = out_channels·kh·kw (also for depthwise convs,
# whose torch weight is [C, 1, k, k]); Flax computes the same fan_out from (kh, kw, in/g, out).
# jax's "normal" distribution is untruncated, like torch's kaiming_normal_.
_kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# conv_seg: Normal(0, 0.01), bias 0 (BaseDecodeHead init_cfg).
_conv_seg_init = nn.initializers.normal(stddev=0.01)


def _torch_linear_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch nn.Linear default bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# PyTorch nn.Linear default weight init (kaiming_uniform a=sqrt(5)) = U(-1/sqrt(fan_in), ...).
_torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class MLPEmbed(nn.Module):
  """mmseg ``MLP`` embed layer: one Linear ``proj`` per token (no norm, no act)."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Dense(self.features, dtype=self.dtype, kernel_init=_torch_linear_kernel_init,
                    bias_init=_torch_linear_bias_init(x.shape[-1]), name="proj")(x)


class ConvModule(nn.Module):
  """conv (no bias) → BN → ReLU, as mmcv ConvModule with BN + ReLU."""
  features: int
  kernel_size: int = 1
  dilation: int = 1
  groups: int = 1
  dtype: Dtype = jnp.float32
  depthwise_impl: str = "xla"  # formulation when groups == in == out channels (ops.py)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    pad = self.dilation * (self.kernel_size // 2)  # padding = dilation for 3x3, 0 for 1x1
    if self.groups > 1 and self.groups == self.features == x.shape[-1]:
      x = layers.DepthwiseConv(self.kernel_size, self.dilation, use_bias=False,
                               kernel_init=_kaiming_fan_out, impl=self.depthwise_impl,
                               dtype=self.dtype, name="conv")(x)
    else:
      x = nn.Conv(self.features, (self.kernel_size, self.kernel_size),
                  padding=((pad, pad), (pad, pad)), kernel_dilation=self.dilation,
                  feature_group_count=self.groups, use_bias=False, dtype=self.dtype,
                  kernel_init=_kaiming_fan_out, name="conv")(x)
    # torch BN momentum 0.1 ↔ Flax momentum 0.9; eps 1e-5 (§1.2 "norm").
    x = layers.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         dtype=self.dtype, name="bn")(x)
    return nn.relu(x)


class DepthwiseSeparableConvModule(nn.Module):
  """Depthwise 3x3 ConvModule (dilated) → pointwise 1x1 ConvModule."""
  features: int
  dilation: int
  dtype: Dtype = jnp.float32
  depthwise_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    c = x.shape[-1]
    x = ConvModule(c, 3, self.dilation, groups=c, dtype=self.dtype,
                   depthwise_impl=self.depthwise_impl, name="depthwise_conv")(x, train=train)
    return ConvModule(self.features, 1, dtype=self.dtype, name="pointwise_conv")(x, train=train)


class ASPPFusion(nn.Module):
  """ASPP without image pooling: parallel branches → concat → 3x3 bottleneck ConvModule."""
  features: int
  dilations: Sequence[int]
  separable: bool
  dtype: Dtype = jnp.float32
  depthwise_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    branches = []
    for i, d in enumerate(self.dilations):
      name = f"aspp_modules_{i}"
      if d == 1:
        y = ConvModule(self.features, 1, dtype=self.dtype, name=name)(x, train=train)
      elif self.separable:
        y = DepthwiseSeparableConvModule(self.features, d, dtype=self.dtype,
                                         depthwise_impl=self.depthwise_impl,
                                         name=name)(x, train=train)
      else:
        y = ConvModule(self.features, 3, d, dtype=self.dtype, name=name)(x, train=train)
      branches.append(y)
    x = jnp.concatenate(branches, axis=-1)
    return ConvModule(self.features, 3, dtype=self.dtype, name="bottleneck")(x, train=train)


class DAFormerHead(nn.Module):
  """DAFormer decoder: list of 4 NHWC maps → logits ``[B, H/4, W/4, num_classes]`` (float32).

  Attributes:
    num_classes: output channels of ``conv_seg`` (19 for Cityscapes).
    embed_dim: C_e = 256 (§1.2).
    fusion: 'sepaspp' (final DAFormer), 'aspp' or 'conv1'.
    dilations: ASPP dilations (1, 6, 12, 18); the d=1 branch is a 1x1 ConvModule.
    dropout: Dropout2d rate before conv_seg (0.1).
    dtype: compute dtype (params and BN statistics stay float32).
    depthwise_impl: formulation of the separable ASPP's depthwise convs (``ops.py``).
  """
  num_classes: int
  embed_dim: int = 256
  fusion: str = "sepaspp"
  dilations: Sequence[int] = (1, 6, 12, 18)
  dropout: float = 0.1
  dtype: Dtype = jnp.float32
  depthwise_impl: str = "xla"

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], *, train: bool,
               deterministic: bool | None = None) -> jax.Array:
    deterministic = (not train) if deterministic is None else deterministic
    if self.fusion not in FUSIONS:
      raise ValueError(f"daformer_head.py: unknown fusion {self.fusion!r}; choose one of "
                       f"{list(FUSIONS)}.")
    if len(features) != 4:
      raise ValueError(f"daformer_head.py: expects 4 feature levels, got {len(features)}.")
    size = features[0].shape[1:3]  # stride-4 map
    embedded = []
    for i, f in enumerate(features):
      # embed_layers.i: Linear C_i → C_e with PyTorch's default init (not re-initialised).
      y = MLPEmbed(self.embed_dim, dtype=self.dtype, name=f"embed_layers_{i}")(f)
      embedded.append(ops.resize_bilinear(y, size))
    x = jnp.concatenate(embedded, axis=-1)  # level 0..3 order (opposite of SegFormer, §1.2)
    if self.fusion == "conv1":
      x = ConvModule(self.embed_dim, 1, dtype=self.dtype, name="fuse_layer")(x, train=train)
    else:
      x = ASPPFusion(self.embed_dim, tuple(self.dilations), self.fusion == "sepaspp",
                     dtype=self.dtype, depthwise_impl=self.depthwise_impl,
                     name="fuse_layer")(x, train=train)
    # Dropout2d: one Bernoulli draw per (sample, channel), broadcast over H and W.
    x = nn.Dropout(self.dropout, broadcast_dims=(1, 2))(x, deterministic=deterministic)
    x = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, kernel_init=_conv_seg_init,
                name="conv_seg")(x)
    return x.astype(jnp.float32)
