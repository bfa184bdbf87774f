"""MFM Rebuilder: the authors' released design (uda_reference.md §7.2b, mfm_method.md OFFICIAL).

Only the last encoder level is embedded (per-pixel Linear C_last → 512, bilinear resize to the
token grid when the sizes differ) → masked tokens replaced by one learnable mask token → fixed
2-D sin-cos positions → 2 pre-norm ViT blocks (16 heads, MLP ×4, qkv bias, LayerNorm eps 1e-5,
exact GELU) → final LayerNorm → one projector per rebuilt level (kernel-4/stride-2 transposed
convs with LayerNorm2d + GELU between them, a 1×1 conv to the level's channels, a final
LayerNorm2d with eps 1e-6) → residual fusion at every level:
``out_i = f_i ⊙ keep_i + offset_i ⊙ (1 − keep_i)``, keep_i the token-grid keep mask
nearest-resized to level i. All rebuilt levels are masked at the same cells and their masked
cells are predicted from the masked last-level tokens alone.

Differences from the release, all deliberate:

* the keep mask ``[B, gh, gw]`` (1 = visible, 0 = masked) is an input, drawn by the caller from
  the train step's RNG stream (``mfm_jax.uda.mfm``), so a run replays exactly and the same
  module can be driven with a given mask;
* crop sizes other than 512 (the release hard-codes 16×16 tokens and level sizes 128/64/32/16):
  the token grid is ``min(grid_size, last level size)`` per axis and level i's projector has
  ``ceil(log2(level size / grid))`` transposed convs; when that does not land exactly on the
  level size (a non-power-of-two ratio) the offset is bilinearly resized to it (no antialias).
  At 512 crops (and at 256 crops, grid 8) this gives exactly the release's ×8/×4/×2/×1 stacks;
* ``pixel_dim > 0`` adds a Dense head on the tokens for the MAE-style pixel-regression ablation
  (not part of the release; never built for the default objective).

Parameter names mirror the released module's state_dict (``embedding.linear_embed``,
``transformer.blocks.0.attn.qkv``, ``projector.projector1.fpn.0`` …; Flax joins a numeric part
to its parent: ``blocks_0``, ``fpn_0``), so ``mfm_jax.convert`` maps them by rule. The
positional table is a constant, not a parameter (the release registers it with
``requires_grad=False``): trainable parameters 14,545,280 for MiT channels [64, 128, 320, 512]
and 10,246,016 for the DeepLabV2 variant (2048 channels), as the release.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mfm_jax import ops

Dtype = Any

# LayerNorm eps: the transformer's 1e-5 (release: partial(nn.LayerNorm, eps=1e-5)); the
# projectors' LayerNorm2d 1e-6 (timm LayerNorm2d default).
TRANSFORMER_LN_EPS = 1e-5
PROJECTOR_LN_EPS = 1e-6

# Release init: every Linear xavier-uniform with zero bias, mask token N(0, 0.02); convolutions
# and transposed convolutions keep PyTorch's default (kaiming-uniform a=√5 → U(±1/√fan_in) for
# weight and bias; a ConvTranspose2d's fan_in is out_channels · k · k).
_xavier = nn.initializers.xavier_uniform()
_torch_conv_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_conv_bias(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def sincos_pos_embed(embed_dim: int, grid: tuple[int, int]) -> np.ndarray:
  """Fixed 2-D sin-cos table ``[gh * gw, embed_dim]`` (MAE style, as the release).

  Token (i, j) (row-major) gets ``[sin(i·ω), cos(i·ω), sin(j·ω), cos(j·ω)]``: the row half
  first, each half sin then cos, ω_k = 1 / 10000^(k / (D/4)) for k < D/4.
  """
  if embed_dim % 4:
    raise ValueError(f"rebuilder.py: embed_dim {embed_dim} must be divisible by 4 for the 2-D "
                     "sin-cos positional embedding.")
  gh, gw = grid
  omega = 1.0 / 10000.0 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4.0))
  rows, cols = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64),
                           indexing="ij")

  def half(pos):
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  return np.concatenate([half(rows), half(cols)], axis=1).astype(np.float32)


def upsample_steps(level_size: Sequence[int], grid: Sequence[int]) -> int:
  """Number of ×2 transposed convs of a level's projector: ceil(log2(level / grid)), ≥ 0."""
  ratio = max(level_size[0] / grid[0], level_size[1] / grid[1])
  return max(0, math.ceil(math.log2(ratio) - 1e-9))


class Attention(nn.Module):
  """timm ``Attention``: one qkv Linear (bias), softmax(q kᵀ / √d_head) v, output proj."""
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    hd = d // self.num_heads
    qkv = nn.Dense(3 * d, dtype=self.dtype, kernel_init=_xavier, name="qkv")(x)
    qkv = qkv.reshape(b, n, 3, self.num_heads, hd).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) * (hd ** -0.5)
    attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", attn, v).transpose(0, 2, 1, 3).reshape(b, n, d)
    return nn.Dense(d, dtype=self.dtype, kernel_init=_xavier, name="proj")(out)


class Mlp(nn.Module):
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=_xavier, name="fc1")(x)
    x = ops.gelu_exact(x)  # nn.GELU() in the release: exact
    return nn.Dense(d, dtype=self.dtype, kernel_init=_xavier, name="fc2")(x)


class Block(nn.Module):
  """Pre-norm ViT block (timm ``Block``, no dropout / drop-path / layer-scale)."""
  num_heads: int
  mlp_ratio: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ln = lambda name: nn.LayerNorm(epsilon=TRANSFORMER_LN_EPS, dtype=self.dtype, name=name)  # noqa: E731
    x = x + Attention(self.num_heads, dtype=self.dtype, name="attn")(ln("norm1")(x))
    return x + Mlp(int(x.shape[-1] * self.mlp_ratio), dtype=self.dtype,
                   name="mlp")(ln("norm2")(x))


class Embedding(nn.Module):
  """Per-pixel Linear C → D, then a bilinear resize to the token grid (align_corners=False,
  no antialias, like mmseg ``resize``) when the sizes differ."""
  embed_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, grid: tuple[int, int]) -> jax.Array:
    x = nn.Dense(self.embed_dim, dtype=self.dtype, kernel_init=_xavier,
                 name="linear_embed")(x.astype(self.dtype))
    return ops.resize_bilinear(x, tuple(grid))


class Transformer(nn.Module):
  """Mask filling, fixed positions, ``depth`` blocks and a final LayerNorm."""
  embed_dim: int
  depth: int
  num_heads: int
  mlp_ratio: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, keep: jax.Array) -> jax.Array:
    b, gh, gw, d = x.shape
    mask_token = self.param("mask_token", nn.initializers.normal(0.02), (d,), jnp.float32)
    keep = keep[..., None].astype(x.dtype)
    # The release's formula (x · keep + (1 − keep) · token); keep is exactly 0 or 1.
    x = x * keep + (1 - keep) * mask_token.astype(x.dtype)
    x = x.reshape(b, gh * gw, d) + jnp.asarray(sincos_pos_embed(d, (gh, gw)), x.dtype)
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_ratio, dtype=self.dtype, name=f"blocks_{i}")(x)
    x = nn.LayerNorm(epsilon=TRANSFORMER_LN_EPS, dtype=self.dtype, name="norm")(x)
    return x.reshape(b, gh, gw, d)


class ConvTranspose2x(nn.Module):
  """PyTorch ``ConvTranspose2d(cin, cout, 4, stride=2, padding=1)``: exactly ×2.

  The kernel is stored ``[4, 4, cout, cin]`` (torch's ``[cin, cout, 4, 4]`` through the
  converter's generic OIHW → HWIO rule) and applied with ``transpose_kernel=True`` and padding
  k − 1 − p = 2 on each side. ``impl='subpixel'`` computes the same function with the same
  parameters as a stride-1 3x3 conv + depth-to-space (``ops.conv_transpose_2x``; XLA's backward
  of a transposed conv is a known slow path on GPUs).
  """
  features: int
  dtype: Dtype = jnp.float32
  impl: str = "transpose"  # ops.CONV_TRANSPOSE_IMPLS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, fan_in = 4, 16 * self.features
    kernel = self.param("kernel", _torch_conv_kernel, (k, k, self.features, x.shape[-1]),
                        jnp.float32)
    bias = self.param("bias", _torch_conv_bias(fan_in), (self.features,), jnp.float32)
    y = ops.conv_transpose_2x(x.astype(self.dtype), kernel.astype(self.dtype), self.impl)
    return y + bias.astype(self.dtype)


class Projector(nn.Module):
  """Tokens ``[B, gh, gw, D]`` → offset ``[B, h, w, C]`` of one level (release ``Projector``).

  ``upsample_steps(size, grid)`` ×2 transposed convs (D → D/2 → D/4 → D/4 …, LayerNorm2d +
  GELU between them), a 1×1 conv to ``out_channels``, LayerNorm2d. Module indices follow the release's
  ``nn.Sequential`` (``fpn_0`` …), GELUs included (they hold no parameters).
  """
  out_channels: int
  dtype: Dtype = jnp.float32
  upsample_impl: str = "transpose"  # ConvTranspose2x.impl

  @nn.compact
  def __call__(self, x: jax.Array, size: tuple[int, int]) -> jax.Array:
    d, idx = x.shape[-1], 0
    for s in range(upsample_steps(size, x.shape[1:3])):
      if s:
        x = nn.LayerNorm(epsilon=PROJECTOR_LN_EPS, dtype=self.dtype, name=f"fpn_{idx}")(x)
        x = ops.gelu_exact(x)
        idx += 2
      x = ConvTranspose2x(d // 2 if s == 0 else d // 4, dtype=self.dtype,
                          impl=self.upsample_impl, name=f"fpn_{idx}")(x)
      idx += 1
    x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, kernel_init=_torch_conv_kernel,
                bias_init=_torch_conv_bias(x.shape[-1]), name=f"fpn_{idx}")(x)
    x = nn.LayerNorm(epsilon=PROJECTOR_LN_EPS, dtype=self.dtype, name="norm")(x)
    return ops.resize_bilinear(x, size)  # no-op unless the level/grid ratio is no power of two


class Projectors(nn.Module):
  """The DAFormer variant's per-level projectors ``projector{i+1}`` (a ModuleDict there)."""
  channels: tuple[int, ...]
  levels: tuple[int, ...]
  dtype: Dtype = jnp.float32
  upsample_impl: str = "transpose"

  @nn.compact
  def __call__(self, tokens: jax.Array, sizes: Sequence[tuple[int, int]]) -> list[jax.Array]:
    return [Projector(self.channels[lvl], dtype=self.dtype, upsample_impl=self.upsample_impl,
                      name=f"projector{lvl + 1}")(tokens, sizes[lvl]) for lvl in self.levels]


def level_keep(keep: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Keep mask ``[B, gh, gw]`` nearest-resized (PyTorch rule) to a level: ``[B, h, w, 1]``."""
  return ops.resize_nearest(keep.astype(jnp.float32)[..., None], tuple(size))


class Rebuilder(nn.Module):
  """Rebuilds masked cells of the encoder features (see the module docstring).

  Attributes:
    channels: C_i of every encoder level (MiT-B5: 64, 128, 320, 512; ResNet: …, 2048).
    levels: indices of the levels masked and rebuilt: all four for the DAFormer head (release),
      ``(last,)`` for the 'last' ablation and for the DeepLabV2 variant.
    single_projector: the DeepLabV2 variant: one projector named ``projector`` for the last
      level (the release returns the same map for every level; DeepLabV2 reads only that one).
    embed_dim, depth, num_heads, mlp_ratio: 512, 2, 16, 4 (release).
    pixel_dim: > 0 adds the pixel-regression ablation's Dense head on the tokens.
    upsample_impl: the projectors' ×2 upsampling, 'transpose' or 'subpixel' (same parameters,
      same function: ``ops.conv_transpose_2x``).
  """
  channels: tuple[int, ...]
  levels: tuple[int, ...]
  single_projector: bool = False
  embed_dim: int = 512
  depth: int = 2
  num_heads: int = 16
  mlp_ratio: float = 4.0
  pixel_dim: int = 0
  dtype: Dtype = jnp.float32
  upsample_impl: str = "transpose"

  def setup(self):
    if self.embed_dim % self.num_heads:
      raise ValueError(f"rebuilder.py: embed_dim {self.embed_dim} is not divisible by "
                       f"num_heads {self.num_heads}.")
    if self.single_projector and tuple(self.levels) != (len(self.channels) - 1,):
      raise ValueError("rebuilder.py: the single-projector (DeepLabV2) variant rebuilds only the "
                       f"last level, got levels={self.levels}.")
    self.embedding = Embedding(self.embed_dim, dtype=self.dtype)
    self.transformer = Transformer(self.embed_dim, self.depth, self.num_heads, self.mlp_ratio,
                                   dtype=self.dtype)
    if self.single_projector:
      self.projector = Projector(self.channels[-1], dtype=self.dtype,
                                 upsample_impl=self.upsample_impl)
    else:
      self.projector = Projectors(tuple(self.channels), tuple(self.levels), dtype=self.dtype,
                                  upsample_impl=self.upsample_impl)
    if self.pixel_dim > 0:
      self.pixel_head = nn.Dense(self.pixel_dim, dtype=self.dtype, kernel_init=_xavier)

  def encode(self, last_feature: jax.Array, keep: jax.Array) -> jax.Array:
    """Last level ``[B, h, w, C]`` + keep ``[B, gh, gw]`` → context tokens ``[B, gh, gw, D]``."""
    return self.transformer(self.embedding(last_feature, tuple(keep.shape[1:3])), keep)

  def offsets(self, tokens: jax.Array, sizes: Sequence[tuple[int, int]]) -> list[jax.Array]:
    """The projectors' offsets f_o,i for ``self.levels`` (in that order)."""
    if self.single_projector:
      return [self.projector(tokens, sizes[-1])]
    return self.projector(tokens, sizes)

  def __call__(self, features: Sequence[jax.Array], keep: jax.Array
               ) -> tuple[list[jax.Array], jax.Array | None]:
    """features: the encoder levels ``[B, h_i, w_i, C_i]``; keep ``[B, gh, gw]`` (1 = visible).

    Returns (the rebuilt feature list — levels not in ``self.levels`` unchanged —, per-cell
    pixel predictions ``[B, gh, gw, pixel_dim]`` or None).
    """
    features = list(features)
    if len(features) != len(self.channels):
      raise ValueError(f"rebuilder.py: got {len(features)} feature levels, built for "
                       f"{len(self.channels)}.")
    for i, (f, c) in enumerate(zip(features, self.channels)):
      if f.shape[-1] != c:
        raise ValueError(f"rebuilder.py: level {i} has {f.shape[-1]} channels, expected {c}.")
    last = features[-1]
    if keep.ndim != 3 or keep.shape[0] != last.shape[0] or (
        keep.shape[1] > last.shape[1] or keep.shape[2] > last.shape[2]):
      raise ValueError(f"rebuilder.py: keep mask {keep.shape} must be [B, gh, gw] with the grid "
                       f"no larger than the last level {last.shape[1:3]}.")
    tokens = self.encode(last, keep)
    sizes = [tuple(f.shape[1:3]) for f in features]
    out = list(features)
    for lvl, offset in zip(self.levels, self.offsets(tokens, sizes)):
      f = features[lvl]
      k = level_keep(keep, sizes[lvl]).astype(f.dtype)
      out[lvl] = f * k + offset.astype(f.dtype) * (1 - k)
    pixels = self.pixel_head(tokens) if self.pixel_dim > 0 else None
    return out, pixels
