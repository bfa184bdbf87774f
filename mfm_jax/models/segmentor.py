"""Encoder-decoder segmentor and the builders that turn a model config into modules.

``EncoderDecoder`` is the deployable network (param tree ``{'backbone', 'decode_head'}``,
docs/architecture.md "Model contract"). The MFM ``Rebuilder`` is built separately (by
``mfm_jax.uda.mfm_task``) so that the deployed segmentor is exactly the host model.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mfm_jax.models import daformer_head
from mfm_jax.models import deeplab
from mfm_jax.models import mit
from mfm_jax.models import resnet

BACKBONES = tuple(mit.MIT_VARIANTS) + (
    "resnet50_v1c", "resnet101_v1c", "resnet50", "resnet101", "resnet_tiny_v1c")
HEADS = ("daformer_sepaspp", "daformer_aspp", "daformer_conv1", "dlv2", "dlv2red", "dlv3p")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# ResNet name → (depth, width, deep_stem, dilated). '_v1c' = mmseg ResNetV1c with deep stem and
# dilation (os 8, uda_reference.md §1.3); plain names = torchvision-style stem, os 32.
# 'resnet_tiny_v1c' (OURS): one Bottleneck per stage, width 16 (channels 64/128/256/512), the
# DeepLabV2 configs' network in the synthetic CPU benchmark.
_RESNETS = {
    "resnet50_v1c": (50, 64, True, True), "resnet101_v1c": (101, 64, True, True),
    "resnet50": (50, 64, False, False), "resnet101": (101, 64, False, False),
    "resnet_tiny_v1c": (14, 16, True, True),
}


class EncoderDecoder(nn.Module):
  """Backbone → decode head. ``train`` drives BN; ``deterministic`` (default ``not train``)
  drives Dropout/DropPath."""
  backbone: nn.Module
  decode_head: nn.Module

  def __call__(self, x: jax.Array, *, train: bool,
               deterministic: bool | None = None) -> jax.Array:
    """Image ``[B,H,W,3]`` → logits (``[B,H/4,W/4,K]`` for DAFormer)."""
    features = self.encode(x, train=train, deterministic=deterministic)
    return self.decode(features, train=train, deterministic=deterministic)

  def encode(self, x: jax.Array, *, train: bool,
             deterministic: bool | None = None) -> list[jax.Array]:
    """Image → list of 4 multi-scale NHWC feature maps."""
    return list(self.backbone(x, train=train, deterministic=deterministic))

  def decode(self, features: Sequence[jax.Array], *, train: bool,
             deterministic: bool | None = None) -> jax.Array:
    """Feature list → logits."""
    return self.decode_head(list(features), train=train, deterministic=deterministic)


def parse_compute_dtype(name: str) -> Any:
  """'float32' | 'bfloat16' (validated config value) → jnp dtype."""
  return COMPUTE_DTYPES[name]


def feature_channels(model_cfg: Any) -> tuple[int, ...]:
  """Channels of the 4 encoder levels for ``model_cfg.backbone`` (no params are built)."""
  name = model_cfg.backbone
  if name in mit.MIT_VARIANTS:
    return tuple(mit.MIT_VARIANTS[name]["embed_dims"])
  width = _RESNETS[name][1]
  return tuple(resnet.EXPANSION * width * 2**s for s in range(4))  # Bottleneck expansion 4


def output_stride(backbone: str) -> int:
  """Stride of the encoder's last level: 8 for the dilated ResNet-V1c, else 32 (MiT, ResNet)."""
  return 8 if _RESNETS.get(backbone, (0, 0, False, False))[3] else 32


def _depthwise_impl(model_cfg: Any) -> str:
  """'auto' → 'shift' on CPU, where XLA's grouped depthwise conv is 9-28x slower (measured,
  README), else 'xla' (the reference's grouped-conv formulation; measure with
  ``mfm_jax.benchmark --depthwise``)."""
  impl = model_cfg.depthwise_impl
  if impl == "auto":
    impl = "shift" if jax.default_backend() == "cpu" else "xla"
  return impl


def build_backbone(model_cfg: Any) -> nn.Module:
  """The encoder named by ``model_cfg.backbone``."""
  name = model_cfg.backbone
  dtype = parse_compute_dtype(model_cfg.compute_dtype)
  if name in mit.MIT_VARIANTS:
    return mit.mit(name, drop_path_rate=float(model_cfg.drop_path_rate), dtype=dtype,
                   remat=bool(model_cfg.remat), depthwise_impl=_depthwise_impl(model_cfg),
                   scan_blocks=bool(model_cfg.scan_blocks))
  depth, width, deep_stem, dilated = _RESNETS[name]
  return resnet.ResNetV1c(depth=depth, width=width, deep_stem=deep_stem, dilated=dilated,
                          dtype=dtype, remat=bool(model_cfg.remat))


def build_head(model_cfg: Any, num_classes: int | None = None) -> nn.Module:
  """The decode head named by ``model_cfg.head`` (``num_classes`` overrides the config)."""
  name = model_cfg.head
  dtype = parse_compute_dtype(model_cfg.compute_dtype)
  k = int(num_classes if num_classes is not None else model_cfg.num_classes)
  dropout = float(model_cfg.head_dropout)
  if name.startswith("daformer_"):
    return daformer_head.DAFormerHead(
        num_classes=k, embed_dim=int(model_cfg.head_embed_dim),
        fusion=name[len("daformer_"):], dropout=dropout, dtype=dtype,
        depthwise_impl=_depthwise_impl(model_cfg))
  if name == "dlv3p":
    return deeplab.DeepLabV3PlusHead(num_classes=k, dtype=dtype, dropout=dropout)
  # 'dlv2red' (what DAFormer/HRDA/MIC run) keeps only dilations (6, 12) (§1.3).
  dilations = (6, 12) if name == "dlv2red" else (6, 12, 18, 24)
  return deeplab.DLV2Head(num_classes=k, dilations=dilations, dtype=dtype)


def build_segmentor(model_cfg: Any) -> EncoderDecoder:
  """``EncoderDecoder`` from a validated ``config.model`` (keys and defaults:
  ``mfm_jax/config/base.py``; every key is read, none has a default here)."""
  return EncoderDecoder(backbone=build_backbone(model_cfg), decode_head=build_head(model_cfg))


def level_sizes(model_cfg: Any, image_size: Sequence[int]) -> list[tuple[int, int]]:
  """Spatial sizes of the 4 encoder levels for an input of ``image_size`` (no params built).

  Every strided layer of both encoders (MiT's 7/4 and 3/2 patch embeddings; ResNet's 3/2
  convs, 3/2 max-pool and 1×1/2 shortcuts, all padded k // 2) gives ceil(size / stride).
  """
  name = model_cfg.backbone
  if name in mit.MIT_VARIANTS:
    strides = (4, 2, 2, 2)
  else:
    strides = (4, 2, 1, 1) if _RESNETS[name][3] else (4, 2, 2, 2)  # stem + pool = 4
  sizes, (h, w) = [], (int(image_size[0]), int(image_size[1]))
  for s in strides:
    h, w = -(-h // s), -(-w // s)
    sizes.append((h, w))
  return sizes


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree of arrays or ``jax.ShapeDtypeStruct``s."""
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))
