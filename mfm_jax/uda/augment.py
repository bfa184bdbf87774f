"""DACS strong augmentation: kornia-0.5.8 colour jitter and Gaussian blur (uda_reference.md §2.4).

Images are NHWC float, normalised with the reference mean/std (RGB). ``strong_transform``
de-normalises to [0, 1], applies ``ColorJitter(0.2, 0.2, 0.2, 0.2)`` (one uniform draw per call,
applied if draw > p = 0.2), re-normalises, then applies ``GaussianBlur2d`` (one draw per call,
applied if draw > 0.5; sigma ~ U(0.15, 1.15); odd kernel ~10 % of each side; reflect padding).

kornia 0.5.8 semantics reproduced here (``augmentation.ColorJitter``, ``enhance/adjust.py``,
``color/hsv.py``): brightness adds (U(1-s, 1+s) - 1) then clamps to [0, 1]; contrast multiplies
by U(1-s, 1+s) then clamps; saturation multiplies HSV's S by U(1-s, 1+s) and clamps S to [0, 1];
hue adds U(-s, s)*2*pi radians to H with ``fmod(., 2*pi)``. The four ops run in the order of one
``randperm(4)`` per call; factors are drawn per sample. DACS calls it once per mixed sample
(``per_sample=True``: own factors, own order, own sigma); MIC calls it once on the whole masked
batch (``per_sample=False``: per-sample factors, one shared order and one shared sigma).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mfm_jax.data.transforms import MEAN  # img_norm_cfg of the reference (RGB order)
from mfm_jax.data.transforms import STD

_TWO_PI = 2.0 * math.pi


def denormalize(images: jax.Array) -> jax.Array:
  """Normalised images -> [0, 1] RGB (DACS ``denorm_``: x*std + mean, /255)."""
  return (images * jnp.asarray(STD, images.dtype) + jnp.asarray(MEAN, images.dtype)) / 255.0


def normalize(images: jax.Array) -> jax.Array:
  """[0, 1] RGB -> normalised images (DACS ``renorm_``: x*255 - mean, /std)."""
  return (images * 255.0 - jnp.asarray(MEAN, images.dtype)) / jnp.asarray(STD, images.dtype)


def rgb_to_hsv(image: jax.Array, eps: float = 1e-6) -> jax.Array:
  """RGB in [0, 1] (channels last) -> HSV with H in [0, 2*pi), like kornia 0.5.8."""
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  maxc = jnp.max(image, axis=-1)
  minc = jnp.min(image, axis=-1)
  v = maxc
  delta = maxc - minc
  s = delta / (v + eps)
  delta = jnp.where(delta == 0, jnp.ones_like(delta), delta)
  rc, gc, bc = maxc - r, maxc - g, maxc - b
  # First channel attaining the max wins (R, then G, then B), as kornia's cumsum trick.
  h = jnp.where(r == maxc, bc - gc,
                jnp.where(g == maxc, 2.0 * delta + rc - bc, 4.0 * delta + gc - rc))
  h = jnp.remainder(h / delta / 6.0, 1.0)
  return jnp.stack([_TWO_PI * h, s, v], axis=-1)


def hsv_to_rgb(image: jax.Array) -> jax.Array:
  """HSV (H in radians) -> RGB, like kornia 0.5.8 (sector table gathered by floor(6h) mod 6)."""
  h = image[..., 0] / _TWO_PI
  s, v = image[..., 1], image[..., 2]
  hi = jnp.remainder(jnp.floor(h * 6), 6)
  f = jnp.remainder(h * 6, 6) - hi
  p = v * (1.0 - s)
  q = v * (1.0 - f * s)
  t = v * (1.0 - (1.0 - f) * s)
  hi = hi.astype(jnp.int32)[..., None]
  red = jnp.stack([v, q, p, p, t, v], axis=-1)
  green = jnp.stack([t, v, v, q, p, p], axis=-1)
  blue = jnp.stack([p, p, t, v, v, q], axis=-1)
  pick = lambda table: jnp.take_along_axis(table, hi, axis=-1)[..., 0]
  return jnp.stack([pick(red), pick(green), pick(blue)], axis=-1)


def adjust_brightness(image: jax.Array, delta) -> jax.Array:
  """kornia ``adjust_brightness``: add ``delta`` then clamp to [0, 1]."""
  return jnp.clip(image + delta, 0.0, 1.0)


def adjust_contrast(image: jax.Array, factor) -> jax.Array:
  """kornia 0.5.8 ``adjust_contrast``: multiply by ``factor`` then clamp to [0, 1]."""
  return jnp.clip(image * factor, 0.0, 1.0)


def adjust_saturation(image: jax.Array, factor) -> jax.Array:
  """kornia ``adjust_saturation``: S *= factor, clamped to [0, 1], in HSV space."""
  hsv = rgb_to_hsv(image)
  hsv = hsv.at[..., 1].set(jnp.clip(hsv[..., 1] * factor, 0.0, 1.0))
  return hsv_to_rgb(hsv)


def adjust_hue(image: jax.Array, radians) -> jax.Array:
  """kornia ``adjust_hue``: H = fmod(H + radians, 2*pi) in HSV space."""
  hsv = rgb_to_hsv(image)
  hsv = hsv.at[..., 0].set(jnp.fmod(hsv[..., 0] + radians, _TWO_PI))
  return hsv_to_rgb(hsv)


def _jitter_one(image, factors, order):
  """Applies the four ops to one ``[H, W, 3]`` image in ``order`` (kornia op indices 0..3)."""
  brightness, contrast, saturation, hue = factors
  ops = (lambda x: adjust_brightness(x, brightness - 1.0),
         lambda x: adjust_contrast(x, contrast),
         lambda x: adjust_saturation(x, saturation),
         lambda x: adjust_hue(x, hue * _TWO_PI))
  for i in range(4):
    image = jax.lax.switch(order[i], ops, image)
  return image


def jitter_factors(rng: jax.Array, batch: int, strength: float) -> jax.Array:
  """``[B, 4]`` kornia factors (brightness, contrast, saturation in U(1-s, 1+s); hue U(-s, s))."""
  if not 0.0 <= strength <= 0.5:
    raise ValueError(
        f"mfm_jax/uda/augment.py: color_jitter_strength must be in [0, 0.5] (kornia hue bound), "
        f"got {strength}.")
  low = max(0.0, 1.0 - strength)
  keys = jax.random.split(rng, 4)
  brightness = jax.random.uniform(keys[0], (batch,), minval=low, maxval=min(2.0, 1.0 + strength))
  contrast = jax.random.uniform(keys[1], (batch,), minval=low, maxval=1.0 + strength)
  saturation = jax.random.uniform(keys[2], (batch,), minval=low, maxval=1.0 + strength)
  hue = jax.random.uniform(keys[3], (batch,), minval=-strength, maxval=strength)
  return jnp.stack([brightness, contrast, saturation, hue], axis=-1)


def draw_jitter_params(rng: jax.Array, batch: int, strength: float = 0.2,
                       shared_order: bool = False) -> tuple[jax.Array, jax.Array]:
  """Random kornia jitter parameters: factors ``[B, 4]`` and op orders ``int32 [B, 4]``.

  The order is a random permutation of (brightness, contrast, saturation, hue) per sample, or one
  permutation repeated over the batch when ``shared_order`` (a single kornia call on the batch).
  """
  factor_key, order_key = jax.random.split(rng)
  factors = jitter_factors(factor_key, batch, strength)
  if shared_order:
    orders = jnp.broadcast_to(jax.random.permutation(order_key, 4), (batch, 4))
  else:
    orders = jax.vmap(lambda k: jax.random.permutation(k, 4))(jax.random.split(order_key, batch))
  return factors, orders.astype(jnp.int32)


def apply_color_jitter(images: jax.Array, factors: jax.Array, orders: jax.Array) -> jax.Array:
  """Applies the four kornia ops with per-sample ``factors [B, 4]`` in ``orders [B, 4]``."""
  return jax.vmap(_jitter_one)(images, factors.astype(images.dtype), orders)


def color_jitter(rng: jax.Array, images: jax.Array, strength: float = 0.2,
                 shared_order: bool = False) -> jax.Array:
  """kornia-0.5.8 ``ColorJitter(s, s, s, s)`` on ``[B, H, W, 3]`` images in [0, 1]."""
  factors, orders = draw_jitter_params(rng, images.shape[0], strength, shared_order)
  return apply_color_jitter(images, factors, orders)


def blur_kernel_size(n: int) -> int:
  """Odd kernel size ~10 % of a side: floor(ceil(0.1 n) - 0.5 + ceil(0.1 n) mod 2) (51 @ 512)."""
  c = float(np.ceil(0.1 * n))
  return int(np.floor(c - 0.5 + c % 2))


def gaussian_kernel1d(size: int, sigma: jax.Array) -> jax.Array:
  """Normalised 1-D Gaussian taps ``[..., size]`` for (batched) ``sigma`` (kornia ``gaussian``)."""
  x = jnp.arange(size, dtype=jnp.float32) - size // 2
  if size % 2 == 0:
    x = x + 0.5
  sigma = jnp.asarray(sigma, jnp.float32)[..., None]
  g = jnp.exp(-(x ** 2) / (2.0 * sigma ** 2))
  return g / jnp.sum(g, axis=-1, keepdims=True)


def _blur_axis(images: jax.Array, taps: jax.Array, axis: int) -> jax.Array:
  """Correlates ``[B, H, W, C]`` with per-sample ``taps [B, k]`` along ``axis`` (reflect pad)."""
  k = taps.shape[-1]
  n = images.shape[axis]
  pad = (k - 1) // 2
  if pad >= n:
    raise ValueError(f"mfm_jax/uda/augment.py: blur kernel {k} too large for a side of {n}.")
  widths = [(0, 0)] * images.ndim
  widths[axis] = (pad, k - 1 - pad)
  padded = jnp.pad(images, widths, mode="reflect")
  taps = taps.astype(images.dtype).reshape((taps.shape[0],) + (1,) * (images.ndim - 1) + (k,))
  out = jnp.zeros_like(images)
  # Static tap loop: element-wise ops only, so the sharded batch axis is never reshaped.
  for j in range(k):
    out = out + taps[..., j] * jax.lax.slice_in_dim(padded, j, j + n, axis=axis)
  return out


def gaussian_blur(images: jax.Array, sigma: jax.Array) -> jax.Array:
  """kornia ``GaussianBlur2d`` (reflect) on ``[B, H, W, C]`` with sigma scalar or ``[B]``.

  The kernel size per side is ``blur_kernel_size`` (51 for 512 px, 103 for 1024 px); the 2-D
  kernel is the outer product of two normalised 1-D kernels, applied separably.
  """
  batch, height, width = images.shape[:3]
  sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (batch,))
  out = _blur_axis(images, gaussian_kernel1d(blur_kernel_size(height), sigma), axis=1)
  return _blur_axis(out, gaussian_kernel1d(blur_kernel_size(width), sigma), axis=2)


def strong_transform(rng: jax.Array, images: jax.Array, *, color_jitter_probability: float = 0.2,
                     color_jitter_strength: float = 0.2, blur: bool = True,
                     per_sample: bool = True) -> jax.Array:
  """DACS ``strong_transform`` (without the mixing) on normalised ``[B, H, W, 3]`` images.

  Args:
    rng: PRNG key.
    images: normalised float images.
    color_jitter_probability: p; jitter is applied when one U(0, 1) draw per call is > p.
    color_jitter_strength: s of ``ColorJitter(s, s, s, s)`` (0.2 in the reference).
    blur: whether the Gaussian blur may be applied (draw > 0.5).
    per_sample: True = each sample its own jitter order and sigma (DACS ClassMix loop); False =
      one shared order and one shared sigma (MIC's single call on the masked batch).

  Returns:
    Augmented normalised images, same shape and dtype.
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"mfm_jax/uda/augment.py: images must be [B,H,W,3], got {images.shape}.")
  dtype = images.dtype
  batch = images.shape[0]
  cj_draw_key, cj_key, blur_draw_key, sigma_key = jax.random.split(rng, 4)
  x = images.astype(jnp.float32)

  def _jitter(x):
    x01 = color_jitter(cj_key, denormalize(x), color_jitter_strength, shared_order=not per_sample)
    return normalize(x01)

  x = jax.lax.cond(jax.random.uniform(cj_draw_key) > color_jitter_probability,
                   _jitter, lambda x: x, x)
  if blur:
    # sigma ~ U(0.15, 1.15) per kornia call (np.random.uniform in gaussian_blur).
    sigma_shape = (batch,) if per_sample else ()
    sigma = jax.random.uniform(sigma_key, sigma_shape, minval=0.15, maxval=1.15)
    x = jax.lax.cond(jax.random.uniform(blur_draw_key) > 0.5,
                     lambda x: gaussian_blur(x, sigma), lambda x: x, x)
  return x.astype(dtype)
