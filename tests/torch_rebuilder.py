"""An independent PyTorch Rebuilder written from the facts of uda_reference.md §7.2b (not from
the release's code), with the release's state_dict names, for the parity and converter tests.

The keep mask is an input (1 = visible) so both implementations can be driven with one mask.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


def sincos_table(dim: int, g: int) -> torch.Tensor:
  """[g*g, dim]: token (r, c) → sin(r w_k) | cos(r w_k) | sin(c w_k) | cos(c w_k)."""
  quarter = dim // 4
  table = torch.zeros(g * g, dim, dtype=torch.float64)
  for r in range(g):
    for c in range(g):
      for k in range(quarter):
        w = 1.0 / (10000.0 ** (k / quarter))
        t = r * g + c
        table[t, k] = math.sin(r * w)
        table[t, quarter + k] = math.cos(r * w)
        table[t, 2 * quarter + k] = math.sin(c * w)
        table[t, 3 * quarter + k] = math.cos(c * w)
  return table.float()


class ChannelNorm(nn.Module):
  """LayerNorm over the channels of an NCHW map (timm LayerNorm2d), eps 1e-6."""

  def __init__(self, c):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(c))
    self.bias = nn.Parameter(torch.zeros(c))

  def forward(self, x):
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).mean(1, keepdim=True)
    x = (x - mean) / torch.sqrt(var + 1e-6)
    return x * self.weight[:, None, None] + self.bias[:, None, None]


class Attn(nn.Module):

  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, d = x.shape
    h = self.heads
    q, k, v = self.qkv(x).view(b, n, 3, h, d // h).unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, h, n, d/h]
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
    return self.proj((a @ v).transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):

  def __init__(self, dim, heads):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-5)
    self.attn = Attn(dim, heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-5)
    self.mlp = FeedForward(dim, 4 * dim)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class TokenEmbed(nn.Module):

  def __init__(self, c, dim, g):
    super().__init__()
    self.linear_embed = nn.Linear(c, dim)
    self.g = g

  def forward(self, x):  # NCHW → N, dim, g, g
    y = self.linear_embed(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    if y.shape[-2:] != (self.g, self.g):
      y = F.interpolate(y, size=(self.g, self.g), mode="bilinear", align_corners=False)
    return y


class Context(nn.Module):

  def __init__(self, dim, heads, depth, g):
    super().__init__()
    self.mask_token = nn.Parameter(torch.randn(1, dim, 1, 1) * 0.02)
    self.blocks = nn.ModuleList([ViTBlock(dim, heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-5)
    self.pos_embed = nn.Parameter(sincos_table(dim, g)[None], requires_grad=False)

  def forward(self, x, keep):
    b, d, g, _ = x.shape
    k = keep[:, None]
    x = x * k + (1 - k) * self.mask_token
    x = x.flatten(2).transpose(1, 2) + self.pos_embed
    for blk in self.blocks:
      x = blk(x)
    return self.norm(x).transpose(1, 2).reshape(b, d, g, g)


def projector_layers(dim: int, c_out: int, scale: int) -> nn.Sequential:
  """×1: 1×1 conv; ×2^n: n transposed convs (dim → dim/2 → dim/4 → dim/4) with LN2d + GELU
  between them, then a 1×1 conv."""
  layers, c = [], dim
  steps = int(round(math.log2(scale)))
  for s in range(steps):
    if s:
      layers += [ChannelNorm(c), nn.GELU()]
    out = dim // 2 if s == 0 else dim // 4
    layers.append(nn.ConvTranspose2d(c, out, 4, 2, 1))
    c = out
  layers.append(nn.Conv2d(c, c_out, 1))
  return nn.Sequential(*layers)


class LevelProjector(nn.Module):

  def __init__(self, dim, c_out, scale):
    super().__init__()
    self.fpn = projector_layers(dim, c_out, scale)
    self.norm = ChannelNorm(c_out)

  def forward(self, tokens, feature, keep):
    k = F.interpolate(keep[:, None], size=feature.shape[-2:], mode="nearest")
    offset = self.norm(self.fpn(tokens))
    return feature * k + offset * (1 - k)


class TorchRebuilder(nn.Module):
  """DAFormer variant (``channels`` of 4 levels, sizes / g = scales) or DeepLabV2 variant
  (``dlv2=True``: one ×scale projector to the last level, returned for every level)."""

  def __init__(self, channels, sizes, g=16, dim=512, heads=16, depth=2, dlv2=False):
    super().__init__()
    self.dlv2 = dlv2
    self.embedding = TokenEmbed(channels[-1], dim, g)
    self.transformer = Context(dim, heads, depth, g)
    if dlv2:
      self.projector = LevelProjector(dim, channels[-1], sizes[-1] // g)
    else:
      self.projector = nn.ModuleDict({
          f"projector{i + 1}": LevelProjector(dim, c, s // g)
          for i, (c, s) in enumerate(zip(channels, sizes))})

  def forward(self, feats, keep):
    tokens = self.transformer(self.embedding(feats[-1]), keep)
    if self.dlv2:
      return [self.projector(tokens, feats[-1], keep)] * len(feats)
    return [self.projector[f"projector{i + 1}"](tokens, f, keep) for i, f in enumerate(feats)]
