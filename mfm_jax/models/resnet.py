"""ResNet-50/101/152 backbones in Flax linen, NHWC (uda_reference.md §1.3).

``ResNetV1c(deep_stem=True, dilated=True)`` is mmseg's ResNetV1c as DeepLabV2 uses it in
DAFormer/HRDA/MIC: a deep stem of three 3x3 convs (3→32→32→64, the first with stride 2), a
3x3/2 max-pool, then four stages of Bottleneck blocks ('pytorch' style: the stride sits on the
3x3 conv; the first block of each stage has a 1x1 stride-conv + BN shortcut). Stages 3 and 4
trade stride for dilation (strides (1, 2, 1, 1), dilations (1, 1, 2, 4)) with
``contract_dilation``: the first block of a dilated stage uses half the stage dilation, so the
output stride is 8. ``deep_stem=False`` gives the standard 7x7/2 stem and ``dilated=False`` the
plain strides (1, 2, 2, 2) (output stride 32).

Names mirror the PyTorch state_dict so the converter is rule based: ``stem.3.weight`` →
``stem_3/kernel``, ``layer3.0.downsample.1.running_mean`` → ``batch_stats/layer3_0/
downsample_1/mean``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Blocks per stage (Bottleneck, expansion 4); the converter also maps (3, 8, 36, 3) → 152.
# OURS: 14 = one Bottleneck per stage, for the tiny CPU variant of the synthetic benchmark.
STAGE_BLOCKS = {14: (1, 1, 1, 1), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
EXPANSION = 4
STAGE_CHANNELS = tuple(EXPANSION * 64 * 2**i for i in range(4))  # (256, 512, 1024, 2048)

# mmseg ResNet.init_weights: kaiming_init(mode='fan_out', nonlinearity='relu') on convs, i.e.
# N(0, 2 / (out_channels·kh·kw)); Flax's fan_out for an HWIO kernel is the same product.
_kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features: int, kernel: int, stride: int = 1, dilation: int = 1, *, dtype: Dtype,
          name: str) -> nn.Conv:
  """Bias-free conv with torch padding ``dilation·(k // 2)`` (= dilation for 3x3, 3 for 7x7)."""
  pad = dilation * (kernel // 2)
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                 kernel_dilation=dilation, use_bias=False, dtype=dtype,
                 kernel_init=_kaiming_fan_out, name=name)


def _bn(train: bool, dtype: Dtype, name: str) -> nn.BatchNorm:
  # BN eps 1e-5, torch momentum 0.1 ↔ Flax momentum 0.9; scale 1 / bias 0 (mmcv constant_init).
  # norm_eval False (§1.3): statistics come from the batch whenever train=True.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      name=name)


class Bottleneck(nn.Module):
  """1x1 → 3x3 (stride, dilation) → 1x1 (x4 channels), residual add, ReLU.

  Attributes:
    planes: width of the 1x1/3x3 convs; the block outputs ``4·planes`` channels.
    stride: stride of the 3x3 conv and of the shortcut conv ('pytorch' style).
    dilation: dilation (= padding) of the 3x3 conv.
    downsample: use the 1x1 conv + BN shortcut (``downsample_0``/``downsample_1``).
    dtype: compute dtype.
  """
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    # `train` is positional so nn.remat can mark it static (argument index 2 with self).
    conv = functools.partial(_conv, dtype=self.dtype)
    y = nn.relu(_bn(train, self.dtype, "bn1")(conv(self.planes, 1, name="conv1")(x)))
    y = conv(self.planes, 3, self.stride, self.dilation, name="conv2")(y)
    y = nn.relu(_bn(train, self.dtype, "bn2")(y))
    y = _bn(train, self.dtype, "bn3")(conv(EXPANSION * self.planes, 1, name="conv3")(y))
    shortcut = x
    if self.downsample:  # avg_down=False: 1x1 conv with the block's stride, then BN
      shortcut = conv(EXPANSION * self.planes, 1, self.stride, name="downsample_0")(x)
      shortcut = _bn(train, self.dtype, "downsample_1")(shortcut)
    return nn.relu(y + shortcut)


def stage_layout(dilated: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(strides, dilations) of the 4 stages: os 8 with dilation (§1.3), else os 32."""
  if dilated:
    return (1, 2, 1, 1), (1, 1, 2, 4)
  return (1, 2, 2, 2), (1, 1, 1, 1)


def block_dilation(stage_dilation: int, block: int) -> int:
  """contract_dilation=True: the first block of a dilated stage uses half the dilation."""
  if block == 0 and stage_dilation > 1:
    return stage_dilation // 2
  return stage_dilation


class ResNetV1c(nn.Module):
  """ResNet encoder: image ``[B, H, W, 3]`` → 4 stage outputs (256, 512, 1024, 2048 channels).

  Strides of the outputs: (4, 8, 8, 8) with ``dilated`` (DeepLab, §1.3), else (4, 8, 16, 32).

  Attributes:
    depth: 50 or 101 (blocks (3, 4, 6, 3) / (3, 4, 23, 3)); 152 is accepted for converted files;
      14 (one block per stage) is the tiny CPU variant (OURS).
    width: stem / first-stage width (reference 64); stage s has ``width·2^s`` planes and
      ``4·width·2^s`` output channels.
    deep_stem: mmseg V1c stem (three 3x3 convs) instead of the 7x7 conv.
    dilated: strides (1, 2, 1, 1) + dilations (1, 1, 2, 4) (os 8) instead of strides (1, 2, 2, 2).
    dtype: compute dtype (params and BN statistics stay float32).
    remat: rematerialise every Bottleneck (less activation memory, ~1/3 more compute).
  """
  depth: int = 101
  width: int = 64
  deep_stem: bool = True
  dilated: bool = True
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool,
               deterministic: bool | None = None) -> list[jax.Array]:
    """Returns the 4 stage outputs. ``deterministic`` is accepted for the model contract (this
    network has no dropout)."""
    del deterministic
    if self.depth not in STAGE_BLOCKS:
      raise ValueError(f"resnet.py: depth {self.depth} is not supported; choose one of "
                       f"{sorted(STAGE_BLOCKS)}.")
    if x.ndim != 4:
      raise ValueError(f"resnet.py: expects an NHWC image batch [B, H, W, C], got shape "
                       f"{x.shape}.")
    x = x.astype(self.dtype)
    if self.deep_stem:
      # stem = Sequential(conv, BN, ReLU) x3 → torch indices 0/1 (2 = ReLU), 3/4, 6/7.
      w = self.width
      for i, (features, stride) in enumerate(((w // 2, 2), (w // 2, 1), (w, 1))):
        x = _conv(features, 3, stride, dtype=self.dtype, name=f"stem_{3 * i}")(x)
        x = nn.relu(_bn(train, self.dtype, f"stem_{3 * i + 1}")(x))
    else:
      x = _conv(self.width, 7, 2, dtype=self.dtype, name="conv1")(x)
      x = nn.relu(_bn(train, self.dtype, "bn1")(x))
    # MaxPool2d(3, 2, padding 1): Flax pads with -inf like torch (and the input is ≥ 0 after
    # the ReLU anyway).
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    block_cls = nn.remat(Bottleneck, static_argnums=(2,)) if self.remat else Bottleneck
    strides, dilations = stage_layout(self.dilated)
    outputs = []
    for s, n_blocks in enumerate(STAGE_BLOCKS[self.depth]):
      planes = self.width * 2**s
      for b in range(n_blocks):
        x = block_cls(planes=planes, stride=strides[s] if b == 0 else 1,
                      dilation=block_dilation(dilations[s], b),
                      # The first block always changes the width (64 → 256, 256 → 512, ...).
                      downsample=b == 0, dtype=self.dtype,
                      name=f"layer{s + 1}_{b}")(x, train)
      outputs.append(x)
    return outputs
