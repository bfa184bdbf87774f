"""PyTorch twin of our MiT + DAFormer segmentor, for parity tests and ``benchmark --torch``.

Written from uda_reference.md §1.1–1.2 (not copied from the reference code), NCHW, with the
reference state_dict names (``backbone.block1.0.attn.kv``, ``decode_head.fuse_layer.
aspp_modules.1.depthwise_conv.bn`` …), so ``load_flax`` fills it from our Flax variables through
``convert.mapping.flax_to_torch(variables, arch='daformer')`` with a strict ``load_state_dict``.
Same numerics as ``models/mit.py`` + ``models/daformer_head.py``: LayerNorm eps 1e-5 in patch
embeds and the attention's spatial reduction, 1e-6 elsewhere; exact GELU; ConvModule = conv (no
bias) → BN(eps 1e-5, momentum 0.1) → ReLU; bilinear resizes with align_corners=False.

Needs the optional ``torch`` extra; only the benchmark's ``--torch`` path and the tests import it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from mfm_jax.convert import mapping
from mfm_jax.models import mit as flax_mit

_LN_EPS_TORCH_DEFAULT, _LN_EPS_BLOCK = 1e-5, 1e-6


class DropPath(nn.Module):
  """Stochastic depth per sample (train mode only)."""

  def __init__(self, rate: float):
    super().__init__()
    self.rate = rate

  def forward(self, x):
    if not self.training or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class OverlapPatchEmbed(nn.Module):

  def __init__(self, cin: int, dim: int, patch: int, stride: int):
    super().__init__()
    self.proj = nn.Conv2d(cin, dim, patch, stride, patch // 2)
    self.norm = nn.LayerNorm(dim, eps=_LN_EPS_TORCH_DEFAULT)

  def forward(self, x):
    x = self.proj(x)
    _, _, h, w = x.shape
    return self.norm(x.flatten(2).transpose(1, 2)), h, w


class Attention(nn.Module):
  """Efficient self-attention: keys/values from a spatially reduced grid (sr_ratio > 1)."""

  def __init__(self, dim: int, heads: int, sr: int):
    super().__init__()
    self.heads, self.sr_ratio, self.scale = heads, sr, (dim // heads) ** -0.5
    self.q = nn.Linear(dim, dim)
    self.kv = nn.Linear(dim, 2 * dim)
    self.proj = nn.Linear(dim, dim)
    if sr > 1:
      self.sr = nn.Conv2d(dim, dim, sr, sr)
      self.norm = nn.LayerNorm(dim, eps=_LN_EPS_TORCH_DEFAULT)

  def forward(self, x, h, w):
    b, n, c = x.shape
    hd = c // self.heads
    q = self.q(x).reshape(b, n, self.heads, hd).transpose(1, 2)
    r = x
    if self.sr_ratio > 1:
      r = self.sr(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
      r = self.norm(r)
    kv = self.kv(r).reshape(b, -1, 2, self.heads, hd).permute(2, 0, 3, 1, 4)  # [k | v]
    attn = (q @ kv[0].transpose(-2, -1)) * self.scale
    out = attn.softmax(dim=-1) @ kv[1]
    return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DWConv(nn.Module):

  def __init__(self, dim: int):
    super().__init__()
    self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

  def forward(self, x, h, w):
    b, n, c = x.shape
    return self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1, self.dwconv, self.fc2 = nn.Linear(dim, hidden), DWConv(hidden), nn.Linear(hidden, dim)

  def forward(self, x, h, w):
    return self.fc2(F.gelu(self.dwconv(self.fc1(x), h, w)))  # exact (erf) GELU


class Block(nn.Module):

  def __init__(self, dim: int, heads: int, mlp_ratio: float, sr: int, drop_path: float):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS_BLOCK)
    self.attn = Attention(dim, heads, sr)
    self.drop_path = DropPath(drop_path)
    self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS_BLOCK)
    self.mlp = MixFFN(dim, int(dim * mlp_ratio))

  def forward(self, x, h, w):
    x = x + self.drop_path(self.attn(self.norm1(x), h, w))
    return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MixVisionTransformer(nn.Module):
  """MiT encoder: NCHW image → 4 NCHW maps (strides 4, 8, 16, 32)."""

  def __init__(self, embed_dims, num_heads, depths, sr_ratios, mlp_ratios,
               drop_path_rate: float = 0.1):
    super().__init__()
    dpr = np.linspace(0.0, drop_path_rate, sum(depths))
    cin, cur = 3, 0
    for i in range(4):
      patch, stride = (7, 4) if i == 0 else (3, 2)
      setattr(self, f"patch_embed{i + 1}", OverlapPatchEmbed(cin, embed_dims[i], patch, stride))
      setattr(self, f"block{i + 1}", nn.ModuleList(
          Block(embed_dims[i], num_heads[i], mlp_ratios[i], sr_ratios[i], float(dpr[cur + j]))
          for j in range(depths[i])))
      setattr(self, f"norm{i + 1}", nn.LayerNorm(embed_dims[i], eps=_LN_EPS_BLOCK))
      cin, cur = embed_dims[i], cur + depths[i]

  def forward(self, x):
    outs = []
    for i in range(1, 5):
      x, h, w = getattr(self, f"patch_embed{i}")(x)
      for blk in getattr(self, f"block{i}"):
        x = blk(x, h, w)
      x = getattr(self, f"norm{i}")(x)
      x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
      outs.append(x)
    return outs


class MLP(nn.Module):
  """mmseg embed layer: a per-token Linear ``proj``."""

  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.proj = nn.Linear(cin, cout)

  def forward(self, x):
    b, _, h, w = x.shape
    return self.proj(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)


class ConvModule(nn.Module):
  """conv (no bias) → BN → ReLU."""

  def __init__(self, cin: int, cout: int, k: int = 1, dilation: int = 1, groups: int = 1):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, k, 1, dilation * (k // 2), dilation, groups, bias=False)
    self.bn = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class DepthwiseSeparableConvModule(nn.Module):

  def __init__(self, cin: int, cout: int, dilation: int):
    super().__init__()
    self.depthwise_conv = ConvModule(cin, cin, 3, dilation, groups=cin)
    self.pointwise_conv = ConvModule(cin, cout, 1)

  def forward(self, x):
    return self.pointwise_conv(self.depthwise_conv(x))


class ASPPFusion(nn.Module):

  def __init__(self, cin: int, cout: int, dilations: Sequence[int], separable: bool):
    super().__init__()
    self.aspp_modules = nn.ModuleList(
        ConvModule(cin, cout, 1) if d == 1 else
        DepthwiseSeparableConvModule(cin, cout, d) if separable else ConvModule(cin, cout, 3, d)
        for d in dilations)
    self.bottleneck = ConvModule(len(dilations) * cout, cout, 3)

  def forward(self, x):
    return self.bottleneck(torch.cat([m(x) for m in self.aspp_modules], dim=1))


class DAFormerHead(nn.Module):
  """Per-level Linear embed → upsample to stride 4 → concat (level 0..3) → fusion →
  Dropout2d → conv_seg."""

  def __init__(self, in_channels: Sequence[int], num_classes: int, embed_dim: int = 256,
               fusion: str = "sepaspp", dilations: Sequence[int] = (1, 6, 12, 18),
               dropout: float = 0.1):
    super().__init__()
    self.embed_layers = nn.ModuleList(MLP(c, embed_dim) for c in in_channels)
    cat = len(in_channels) * embed_dim
    if fusion == "conv1":
      self.fuse_layer = ConvModule(cat, embed_dim, 1)
    elif fusion in ("sepaspp", "aspp"):
      self.fuse_layer = ASPPFusion(cat, embed_dim, dilations, fusion == "sepaspp")
    else:
      raise ValueError(f"torch_reference.py: unknown fusion {fusion!r}.")
    self.dropout = nn.Dropout2d(dropout)
    self.conv_seg = nn.Conv2d(embed_dim, num_classes, 1)

  def forward(self, feats):
    size = feats[0].shape[2:]
    x = torch.cat([F.interpolate(m(f), size=size, mode="bilinear", align_corners=False)
                   if f.shape[2:] != size else m(f)
                   for m, f in zip(self.embed_layers, feats)], dim=1)
    return self.conv_seg(self.dropout(self.fuse_layer(x)))


class EncoderDecoder(nn.Module):
  """Image NCHW → logits NCHW at stride 4."""

  def __init__(self, backbone: nn.Module, decode_head: nn.Module):
    super().__init__()
    self.backbone, self.decode_head = backbone, decode_head

  def forward(self, x):
    return self.decode_head(self.backbone(x))


def build(backbone: str, num_classes: int, embed_dim: int = 256, fusion: str = "sepaspp",
          drop_path_rate: float = 0.1, dropout: float = 0.1) -> EncoderDecoder:
  """The torch twin of ``segmentor.EncoderDecoder(mit(backbone), DAFormerHead(...))``."""
  if backbone not in flax_mit.MIT_VARIANTS:
    raise ValueError(f"torch_reference.py: the torch twin is MiT-only, got {backbone!r}.")
  v = flax_mit.MIT_VARIANTS[backbone]
  enc = MixVisionTransformer(v["embed_dims"], v["num_heads"], v["depths"], v["sr_ratios"],
                             v["mlp_ratios"], drop_path_rate)
  head = DAFormerHead(v["embed_dims"], num_classes, embed_dim, fusion, dropout=dropout)
  return EncoderDecoder(enc, head)


def load_flax(model: nn.Module, variables: dict[str, Any]) -> nn.Module:
  """Loads Flax ``{'params', 'batch_stats'}`` of the DAFormer segmentor (strict)."""
  sd = mapping.flax_to_torch(variables, arch="daformer")
  model.load_state_dict({k: torch.from_numpy(np.array(a)) for k, a in sd.items()}, strict=True)
  return model


def model_from_config(model_cfg: Any, variables: dict[str, Any] | None = None) -> EncoderDecoder:
  """Torch twin of ``segmentor.build_segmentor(model_cfg)`` (MiT + DAFormer heads, float32)."""
  if not model_cfg.head.startswith("daformer_"):
    raise ValueError(f"torch_reference.py: the torch twin has DAFormer heads only, got "
                     f"{model_cfg.head!r}.")
  model = build(model_cfg.backbone, int(model_cfg.num_classes), int(model_cfg.head_embed_dim),
                model_cfg.head[len("daformer_"):], float(model_cfg.drop_path_rate),
                float(model_cfg.head_dropout))
  return load_flax(model, variables) if variables is not None else model


def cross_entropy(logits, labels):
  """Our ``losses.cross_entropy``: logits upsampled to the labels, ignored pixels count 0 in the
  mean."""
  logits = F.interpolate(logits, size=labels.shape[1:], mode="bilinear", align_corners=False)
  return F.cross_entropy(logits, labels, ignore_index=255, reduction="none").mean()


def make_optimizer(model: EncoderDecoder, optim_cfg: Any) -> torch.optim.Optimizer:
  """AdamW with the reference groups (head lr ×10; no decay on norms) — the work of our step."""
  head, norm, rest = [], [], []
  for name, p in model.named_parameters():
    (head if name.startswith("decode_head.") else norm if "norm" in name else rest).append(p)
  lr = float(optim_cfg.lr)
  return torch.optim.AdamW(
      [dict(params=rest), dict(params=norm, weight_decay=0.0), dict(params=head, lr=10 * lr)],
      lr=lr, betas=(float(optim_cfg.b1), float(optim_cfg.b2)), eps=float(optim_cfg.eps),
      weight_decay=float(optim_cfg.weight_decay))


def train_step(config: Any, variables: dict[str, Any], batch: dict[str, np.ndarray],
               threads: int = 0) -> tuple[Callable[[], None], dict[str, Any]]:
  """A supervised torch step (forward + CE + backward + AdamW) of the twin of ``config.model``
  loaded with ``variables``, on the source half of ``batch`` (NHWC numpy): (step, info).
  ``model.compute_dtype='bfloat16'`` runs the forward under ``torch.autocast`` (parameters and
  optimizer stay float32, like ours). ``threads`` > 0 sets ``torch.set_num_threads`` (process
  wide)."""
  if threads > 0:
    torch.set_num_threads(threads)
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  model = model_from_config(config.model, variables).to(dev).train()
  opt = make_optimizer(model, config.optim)
  # The pipeline's uint8 images, normalised like ops.normalize_images (outside the timed step,
  # as JAX's is inside it: a negligible part of either).
  from mfm_jax.data import transforms  # pylint: disable=g-import-not-at-top
  image = (batch["source_image"].astype(np.float32) - transforms.MEAN) / transforms.STD
  x = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 1, 2))).to(dev)
  y = torch.from_numpy(batch["source_label"].astype(np.int64)).to(dev)

  bf16 = config.model.compute_dtype == "bfloat16"

  def step():
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
      logits = model(x)
    cross_entropy(logits.float(), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)  # gradients do not outlive the step (as in the JAX step)
    if dev == "cuda":
      torch.cuda.synchronize()

  return step, {"torch_device": dev, "torch_threads": torch.get_num_threads(),
                "torch_version": torch.__version__,
                "torch_params": sum(p.numel() for p in model.parameters())}
