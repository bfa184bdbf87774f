"""MFM Rebuilder: the light auxiliary network that reconstructs masked encoder features.

mfm_method.md "Forward pass" step 3 (overview figure, uda_reference.md §7.2):
feature embedding (Linear C → 512, bilinear resize to a 16x16 grid) → masked cells replaced by a
learnable mask token → 2 transformer blocks on the g·g tokens → projector = transposed conv back
to C channels at the feature resolution. The output is the "offset" f_o; the residual fusion
f_r = M ⊙ f_o + (1 − M) ⊙ f_t lives in ``mfm_jax/uda/mfm.py``. The Rebuilder is discarded at
inference.

OURS (the paper is silent, mfm_method.md): pre-norm blocks, 8 heads, MLP ratio 4, learned
positional embedding, LayerNorm eps 1e-6, exact GELU, projector kernel = stride = max(1, h // g)
followed by a bilinear resize when the sizes still differ.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mfm_jax import ops

Dtype = Any

_LN_EPS = 1e-6
_init = nn.initializers.normal(stddev=0.02)


class TransformerBlock(nn.Module):
  """Pre-norm block: x + MHSA(LN(x)); x + MLP(LN(x)) with exact GELU."""
  num_heads: int
  mlp_ratio: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    dim = x.shape[-1]
    y = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name="norm1")(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype,
                                        kernel_init=_init, deterministic=deterministic,
                                        name="attn")(y, y)
    x = x + y
    y = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name="norm2")(x)
    y = nn.Dense(int(dim * self.mlp_ratio), dtype=self.dtype, kernel_init=_init, name="fc1")(y)
    y = nn.gelu(y, approximate=False)
    y = nn.Dense(dim, dtype=self.dtype, kernel_init=_init, name="fc2")(y)
    return x + y


class Rebuilder(nn.Module):
  """Reconstructs features from a cell-masked copy.

  Attributes:
    out_channels: C of the masked feature map (the projector's output channels).
    embed_dim: token width (512, PAPER).
    grid_size: g, the token grid side (16, PAPER).
    depth: number of transformer blocks (2, PAPER).
    num_heads: attention heads (8, OURS).
    mlp_ratio: MLP hidden ratio (4, OURS).
    pixel_dim: if > 0, also predict ``pixel_dim`` values per grid cell from the tokens (the
      MAE-style pixel-regression ablation objective, mfm_method.md "objective").
    dtype: compute dtype (params stay float32).
  """
  out_channels: int
  embed_dim: int = 512
  grid_size: int = 16
  depth: int = 2
  num_heads: int = 8
  mlp_ratio: float = 4.0
  pixel_dim: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feature: jax.Array, cell_mask: jax.Array, *,
               deterministic: bool = True) -> jax.Array | tuple[jax.Array, jax.Array]:
    """feature ``[B,h,w,C]``, cell_mask ``[B,g,g]`` bool (True = masked).

    Returns the offset f_o ``[B,h,w,C]``, or ``(offset, pixels [B,g,g,pixel_dim])`` when
    ``pixel_dim > 0``.
    """
    b, h, w, c = feature.shape
    g = self.grid_size
    if c != self.out_channels:
      raise ValueError(f"rebuilder.py: feature has {c} channels, Rebuilder was built for "
                       f"out_channels={self.out_channels}.")
    if cell_mask.shape != (b, g, g):
      raise ValueError(f"rebuilder.py: cell_mask must have shape {(b, g, g)} (grid_size={g}), "
                       f"got {cell_mask.shape}.")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"rebuilder.py: embed_dim {self.embed_dim} is not divisible by "
                       f"num_heads {self.num_heads}.")
    # Feature embedding: Linear C → embed_dim, then interpolate to the g×g grid.
    x = nn.Dense(self.embed_dim, dtype=self.dtype, kernel_init=_init,
                 name="embed")(feature.astype(self.dtype))
    x = ops.resize_bilinear(x, (g, g))
    # Mask filling with the learnable [M] token.
    mask_token = self.param("mask_token", _init, (self.embed_dim,), jnp.float32)
    x = jnp.where(cell_mask[..., None], mask_token.astype(x.dtype), x)
    x = x.reshape(b, g * g, self.embed_dim)
    pos_embed = self.param("pos_embed", _init, (g * g, self.embed_dim), jnp.float32)
    x = x + pos_embed.astype(x.dtype)
    for i in range(self.depth):
      x = TransformerBlock(self.num_heads, self.mlp_ratio, dtype=self.dtype,
                           name=f"blocks_{i}")(x, deterministic=deterministic)
    x = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name="norm")(x)
    tokens = x.reshape(b, g, g, self.embed_dim)
    # Projector: transposed conv with kernel = stride, back to C channels (h//g upsampling).
    kh, kw = max(1, h // g), max(1, w // g)
    offset = nn.ConvTranspose(self.out_channels, (kh, kw), strides=(kh, kw), padding="VALID",
                              dtype=self.dtype, name="projector")(tokens)
    offset = ops.resize_bilinear(offset, (h, w))  # no-op when g·k already equals (h, w)
    if self.pixel_dim > 0:
      pixels = nn.Dense(self.pixel_dim, dtype=self.dtype, kernel_init=_init,
                        name="pixel_head")(tokens)
      return offset, pixels
    return offset
