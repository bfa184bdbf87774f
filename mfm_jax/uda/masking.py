"""MIC block masks (uda_reference.md §2.6, ``BlockMaskGenerator``).

A grid of round(H/b) x round(W/b) uniforms per sample; a cell is kept (mask 1) when its draw
exceeds the mask ratio (0.7 in MIC), then the grid is nearest-upsampled to H x W and multiplied
into the normalised image (masked pixels become 0, i.e. the mean colour).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mfm_jax import ops


def block_mask(rng: jax.Array, batch: int, height: int, width: int, block_size: int,
               ratio: float) -> jax.Array:
  """Keep-mask ``f32 [B, H, W, 1]`` (1 = visible, 0 = masked), independent per sample.

  Args:
    rng: PRNG key.
    batch, height, width: static output shape.
    block_size: b in pixels (MIC: 64 for 1024 crops, 32 for 512 crops).
    ratio: mask ratio r; a cell is kept when U(0, 1) > r (MIC: 0.7; 0 disables masking).
  """
  if block_size <= 0:
    raise ValueError(f"mfm_jax/uda/masking.py: block_size must be > 0, got {block_size}.")
  # Python round() = the reference's round(H / b) (banker's rounding on .5).
  grid_h = max(1, round(height / block_size))
  grid_w = max(1, round(width / block_size))
  draws = jax.random.uniform(rng, (batch, grid_h, grid_w, 1))
  keep = (draws > ratio).astype(jnp.float32)
  return ops.resize_nearest(keep, (height, width))
