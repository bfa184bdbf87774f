"""Tests of the DACS strong augmentation (kornia-0.5.8 colour jitter, Gaussian blur)."""

import colorsys
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mfm_jax.uda import augment

TWO_PI = 2 * math.pi


def _image(seed=0, shape=(2, 6, 7, 3)):
  img = np.random.default_rng(seed).uniform(size=shape).astype(np.float32)
  img[:, 0, 0] = 0.5  # grey pixels (delta = 0)
  img[:, 0, 1] = [0.9, 0.9, 0.2]  # ties between channels
  img[:, 0, 2] = [0.1, 0.7, 0.7]
  return img


# Independent per-pixel reference: Python's colorsys with H scaled to radians.
def _np_rgb_to_hsv(img):
  flat = img.reshape(-1, 3).astype(np.float64)
  hsv = np.array([colorsys.rgb_to_hsv(*p) for p in flat])
  hsv[:, 0] *= TWO_PI
  return hsv.reshape(img.shape)


def _np_hsv_to_rgb(hsv):
  flat = hsv.reshape(-1, 3).astype(np.float64)
  rgb = np.array([colorsys.hsv_to_rgb((h / TWO_PI) % 1.0, s, v) for h, s, v in flat])
  return rgb.reshape(hsv.shape)


def _np_op(img, op, f):
  """kornia 0.5.8 formulas: 0 brightness, 1 contrast, 2 saturation, 3 hue."""
  if op == 0:
    return np.clip(img + (f - 1.0), 0, 1)
  if op == 1:
    return np.clip(img * f, 0, 1)
  hsv = _np_rgb_to_hsv(img)
  if op == 2:
    hsv[..., 1] = np.clip(hsv[..., 1] * f, 0, 1)
  else:
    hsv[..., 0] = np.fmod(hsv[..., 0] + f * TWO_PI, TWO_PI)
  return _np_hsv_to_rgb(hsv)


def test_hsv_conversions_match_colorsys():
  img = _image()
  hsv = np.asarray(augment.rgb_to_hsv(jnp.asarray(img)))
  np.testing.assert_allclose(hsv, _np_rgb_to_hsv(img), atol=2e-5)
  back = np.asarray(augment.hsv_to_rgb(jnp.asarray(hsv)))
  np.testing.assert_allclose(back, img, atol=2e-6)
  shifted = hsv.copy()
  shifted[..., 0] -= 4.0  # negative hue, as fmod can produce
  np.testing.assert_allclose(augment.hsv_to_rgb(jnp.asarray(shifted)),
                             _np_hsv_to_rgb(shifted), atol=2e-6)


@pytest.mark.parametrize("op,factor", [(0, 1.17), (0, 0.85), (1, 1.2), (1, 0.8), (2, 1.2),
                                       (2, 0.8), (3, 0.17), (3, -0.2)])
def test_single_ops_match_numpy(op, factor):
  img = _image(1)
  fns = (lambda x: augment.adjust_brightness(x, factor - 1.0),
         lambda x: augment.adjust_contrast(x, factor),
         lambda x: augment.adjust_saturation(x, factor),
         lambda x: augment.adjust_hue(x, factor * TWO_PI))
  np.testing.assert_allclose(fns[op](jnp.asarray(img)), _np_op(img, op, factor), atol=1e-5)


def test_apply_color_jitter_orders_match_numpy():
  img = _image(2, (3, 5, 6, 3))
  factors = np.array([[1.1, 0.9, 1.15, 0.1], [0.85, 1.2, 0.8, -0.15], [1.0, 1.05, 1.1, 0.2]],
                     np.float32)
  orders = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]], np.int32)
  got = np.asarray(jax.jit(augment.apply_color_jitter)(jnp.asarray(img), jnp.asarray(factors),
                                                       jnp.asarray(orders)))
  for b in range(3):
    ref = img[b]
    for op in orders[b]:
      ref = _np_op(ref, op, factors[b, op])
    np.testing.assert_allclose(got[b], ref, atol=2e-5)


def test_draw_jitter_params_ranges_and_order_sharing():
  f, o = augment.draw_jitter_params(jax.random.key(0), 64, 0.2, shared_order=False)
  f = np.asarray(f)
  assert (f[:, :3] >= 0.8).all() and (f[:, :3] <= 1.2).all()
  assert (np.abs(f[:, 3]) <= 0.2).all() and f[:, 3].std() > 0.05
  assert (np.sort(np.asarray(o), 1) == np.arange(4)).all()
  assert len({tuple(r) for r in np.asarray(o)}) > 1  # per-sample orders
  f2, o2 = augment.draw_jitter_params(jax.random.key(0), 8, 0.2, shared_order=True)
  assert (np.asarray(o2) == np.asarray(o2)[:1]).all()  # one permutation for the batch
  assert len(set(np.asarray(f2)[:, 0])) == 8  # but per-sample factors
  img = jnp.asarray(_image(3))
  key = jax.random.key(5)
  np.testing.assert_array_equal(
      augment.color_jitter(key, img, 0.2),
      augment.apply_color_jitter(img, *augment.draw_jitter_params(key, 2, 0.2)))
  with pytest.raises(ValueError, match="augment.py"):
    augment.jitter_factors(key, 2, 0.6)


def test_color_jitter_identity_at_strength_zero():
  img = _image(4)
  out = augment.color_jitter(jax.random.key(1), jnp.asarray(img), 0.0)
  # Not bit-exact: kornia's S = delta / (V + 1e-6) makes the HSV round trip lossy at ~1e-6.
  np.testing.assert_allclose(out, img, atol=1e-5)


def test_blur_kernel_sizes():
  assert augment.blur_kernel_size(512) == 51
  assert augment.blur_kernel_size(1024) == 103
  assert augment.blur_kernel_size(40) == 3 and augment.blur_kernel_size(50) == 5
  taps = np.asarray(augment.gaussian_kernel1d(51, jnp.array([0.15, 1.15])))
  np.testing.assert_allclose(taps.sum(1), 1.0, rtol=1e-6)
  assert taps[0, 25] > 0.99  # sigma 0.15 is almost a delta


def test_gaussian_blur_matches_torch_reflect_conv():
  rng = np.random.default_rng(5)
  img = rng.normal(size=(2, 40, 50, 3)).astype(np.float32)
  sigma = np.array([0.4, 1.1], np.float32)
  got = np.asarray(jax.jit(augment.gaussian_blur)(jnp.asarray(img), jnp.asarray(sigma)))
  for b in range(2):
    kh, kw = 3, 5
    gh = np.exp(-(np.arange(kh) - kh // 2) ** 2 / (2 * float(sigma[b]) ** 2))
    gw = np.exp(-(np.arange(kw) - kw // 2) ** 2 / (2 * float(sigma[b]) ** 2))
    k2 = np.outer(gh / gh.sum(), gw / gw.sum()).astype(np.float32)
    x = torch.from_numpy(img[b:b + 1]).permute(0, 3, 1, 2)
    x = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2), mode="reflect")
    w = torch.from_numpy(k2)[None, None].repeat(3, 1, 1, 1)
    ref = F.conv2d(x, w, groups=3).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got[b:b + 1], ref, atol=1e-5)


def test_blur_preserves_constant_image():
  img = jnp.full((1, 64, 48, 3), 0.37)
  np.testing.assert_allclose(augment.gaussian_blur(img, 1.15), 0.37, rtol=1e-5)


def test_normalisation_round_trip():
  img = jnp.asarray(_image(6))
  np.testing.assert_allclose(augment.denormalize(augment.normalize(img)), img, atol=1e-6)
  # Mean colour <-> 0 in normalised space.
  np.testing.assert_allclose(augment.normalize(jnp.asarray(augment.MEAN) / 255.0), 0, atol=1e-6)


def _changed_fraction(**kw):
  img = augment.normalize(jnp.asarray(_image(7, (2, 24, 24, 3))))
  fn = jax.jit(lambda k: augment.strong_transform(k, img, **kw))
  return np.mean([not np.allclose(fn(jax.random.key(s)), img, atol=1e-4) for s in range(30)])


def test_strong_transform_draw_probabilities():
  assert _changed_fraction(color_jitter_probability=1.0, blur=False) == 0.0
  assert 0.6 <= _changed_fraction(color_jitter_probability=0.2, blur=False) <= 0.97
  assert 0.25 <= _changed_fraction(color_jitter_probability=1.0, blur=True) <= 0.75


def test_strong_transform_sigma_sharing():
  img = augment.normalize(jnp.asarray(np.repeat(_image(8, (1, 24, 24, 3)), 2, axis=0)))
  for per_sample, same in ((False, True), (True, False)):
    fn = jax.jit(lambda k: augment.strong_transform(k, img, color_jitter_probability=1.0,
                                                    per_sample=per_sample))
    outs = [np.asarray(fn(jax.random.key(s))) for s in range(8)]
    blurred = [o for o in outs if not np.allclose(o, img, atol=1e-4)]
    assert blurred
    assert all(np.array_equal(o[0], o[1]) == same for o in blurred)


def test_strong_transform_keeps_shape_dtype_and_validates():
  img = jnp.zeros((2, 16, 16, 3), jnp.float32)
  out = augment.strong_transform(jax.random.key(0), img)
  assert out.shape == img.shape and out.dtype == img.dtype
  with pytest.raises(ValueError, match="augment.py"):
    augment.strong_transform(jax.random.key(0), jnp.zeros((2, 16, 16)))
