"""Small array ops shared by models, UDA helpers and evaluation (NHWC layout).

All bilinear resizes follow PyTorch's ``F.interpolate(mode='bilinear', align_corners=False)``
without antialiasing, which is what the reference (mmseg ``resize``) uses everywhere
(uda_reference.md §2.6b). ``jax.image.resize`` antialiases when downsampling by default, so
it is called with ``antialias=False``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = 255


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of an NHWC array to spatial ``size`` (align_corners=False, no antialias)."""
  n, h, w, c = x.shape
  if (h, w) == tuple(size):
    return x
  return jax.image.resize(x, (n, size[0], size[1], c), method="bilinear", antialias=False)


def _nearest_index(in_size: int, out_size: int) -> jax.Array:
  # PyTorch 'nearest': src = floor(dst * in / out).
  return jnp.floor(jnp.arange(out_size) * (in_size / out_size)).astype(jnp.int32)


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Nearest resize of an array whose axes 1, 2 are H, W, with PyTorch's index rule.

  Works for labels ``[B, H, W]`` and maps ``[B, H, W, C]``.
  """
  h, w = x.shape[1], x.shape[2]
  if (h, w) == tuple(size):
    return x
  x = jnp.take(x, _nearest_index(h, size[0]), axis=1)
  return jnp.take(x, _nearest_index(w, size[1]), axis=2)
