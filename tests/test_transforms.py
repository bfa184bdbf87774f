"""Tests for mfm_jax.data.transforms (numpy Resize / RandomCrop / Flip / Normalize / Pad)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mfm_jax import ops
from mfm_jax.data import transforms as T


@pytest.mark.parametrize("hw, scale, expected", [
    ((1052, 1914), (1280, 720), (704, 1280)),    # GTA, DAFormer (uda_reference.md §3.2)
    ((1052, 1914), (2560, 1440), (1407, 2560)),  # GTA, HRDA
    ((1024, 2048), (1024, 512), (512, 1024)),    # Cityscapes, DAFormer
    ((1024, 2048), (2048, 1024), (1024, 2048)),  # Cityscapes, HRDA: unchanged
    ((760, 1280), (1280, 760), (760, 1280)),     # SYNTHIA: unchanged
    ((760, 1280), (2560, 1520), (1520, 2560)),   # SYNTHIA, HRDA (x2)
])
def test_keep_ratio_size_matches_mmcv(hw, scale, expected):
  assert T.keep_ratio_size(*hw, scale) == expected


def test_keep_ratio_size_rejects_bad_scale():
  with pytest.raises(ValueError, match="scale"):
    T.keep_ratio_size(10, 10, (0, 5))


def _torch_bilinear(image, size):
  x = torch.from_numpy(np.asarray(image, np.float32)).permute(2, 0, 1)[None]
  return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0].permute(
      1, 2, 0).numpy()


@pytest.mark.parametrize("in_hw, out_hw", [((105, 191), (70, 128)), ((48, 96), (64, 128)),
                                           ((53, 96), (36, 64))])
def test_resize_bilinear_matches_torch_and_ops(in_hw, out_hw):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, in_hw + (3,), dtype=np.uint8)
  ref = _torch_bilinear(image, out_hw)
  got = T.resize_bilinear(image.astype(np.float32), out_hw)
  np.testing.assert_allclose(got, ref, atol=0.05)  # torch computes coordinates in float32
  jax_out = np.asarray(ops.resize_bilinear(image[None].astype(np.float32), out_hw))[0]
  np.testing.assert_allclose(got, jax_out, atol=0.05)
  # uint8 in → rounded uint8 out (cv2 returns uint8; its fixed point differs by ≤ 1 level).
  got8 = T.resize_bilinear(image, out_hw)
  assert got8.dtype == np.uint8
  assert np.abs(got8.astype(np.float32) - ref).max() <= 0.55


def test_resize_window_is_the_crop_of_the_full_resize():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (105, 191, 3), dtype=np.uint8)
  label = rng.integers(0, 19, (105, 191), dtype=np.uint8)
  size, window = (70, 128), (13, 40, 32, 50)
  full_img, full_lab = T.resize_bilinear(image, size), T.resize_nearest(label, size)
  np.testing.assert_array_equal(T.resize_bilinear(image, size, window), T.crop(full_img, window))
  np.testing.assert_array_equal(T.resize_nearest(label, size, window), T.crop(full_lab, window))


@pytest.mark.parametrize("in_hw, out_hw", [((1052, 1914), (704, 1280)), ((53, 96), (36, 64)),
                                           ((48, 96), (100, 150))])
def test_resize_nearest_matches_torch_and_ops(in_hw, out_hw):
  label = np.random.default_rng(2).integers(0, 256, in_hw, dtype=np.uint8)
  got = T.resize_nearest(label, out_hw)
  ref = F.interpolate(torch.from_numpy(label.astype(np.float32))[None, None], size=out_hw,
                      mode="nearest")[0, 0].numpy().astype(np.uint8)
  np.testing.assert_array_equal(got, ref)
  np.testing.assert_array_equal(got, np.asarray(ops.resize_nearest(label[None], out_hw))[0])


@pytest.mark.parametrize("in_hw, out_hw", [
    ((1052, 1914), (704, 1280)),  # GTA at (1280, 720): prepare --scale=1280x720
    ((1024, 2048), (512, 1024)),  # Cityscapes halved
    ((53, 96), (27, 48)), ((37, 23), (11, 7)),  # odd ratios, downsampling
    ((31, 259), (11, 217)), ((86, 245), (269, 4)),  # one axis up, the other down
    ((16, 16), (64, 48)),  # upsampling
])
def test_numpy_twins_match_the_jax_ops_on_random_arrays(in_hw, out_hw):
  """The numpy resizes prepare and the pipeline use agree with mfm_jax.ops (JAX).

  Bilinear: JAX computes source coordinates in float32, numpy in float64, so floats agree to
  0.05 grey levels; rounded to uint8 (what prepare stores) they differ by at most one level on
  a small fraction of pixels. Nearest: identical.
  """
  rng = np.random.default_rng(sum(in_hw + out_hw))
  image = rng.integers(0, 256, in_hw + (3,), dtype=np.uint8)
  label = rng.integers(0, 256, in_hw, dtype=np.uint8)
  jax_float = np.asarray(ops.resize_bilinear(image[None].astype(np.float32), out_hw))[0]
  np.testing.assert_allclose(T.resize_bilinear(image.astype(np.float32), out_hw), jax_float,
                             atol=0.05)
  jax_u8 = np.clip(np.rint(jax_float), 0, 255).astype(np.uint8)
  diff = np.abs(T.resize_bilinear(image, out_hw).astype(np.int16) - jax_u8)
  assert diff.max() <= 1 and np.mean(diff > 0) < 0.02, (diff.max(), np.mean(diff > 0))
  np.testing.assert_array_equal(T.resize_nearest(label, out_hw),
                                np.asarray(ops.resize_nearest(label[None], out_hw))[0])


def test_crop_window_offsets_cover_the_whole_range():
  rng = np.random.default_rng(3)
  windows = np.array([T.crop_window(20, 30, (8, 10), rng) for _ in range(2000)])
  assert windows[:, 0].min() == 0 and windows[:, 0].max() == 12
  assert windows[:, 1].min() == 0 and windows[:, 1].max() == 20
  assert (windows[:, 2:] == (8, 10)).all()
  # An image smaller than the crop: offset 0, window clipped to the image.
  assert T.crop_window(5, 30, (8, 10), rng)[::2] == (0, 5)


def test_cat_max_ratio_redraws_until_two_classes_and_below_ratio():
  label = np.zeros((40, 40), np.uint8)
  label[:, 30:] = 1  # only crops that reach x >= 30 hold 2 classes
  label[:5] = 255
  crop = (10, 10)
  for seed in range(20):
    window = T.random_crop_window(label, crop, 0.75, np.random.default_rng(seed))
    # The draw sequence: the first window passing the test is kept.
    rng = np.random.default_rng(seed)
    draws = [T.crop_window(40, 40, crop, rng) for _ in range(11)]
    ok = [T.cat_max_ok(T.crop(label, w), 0.75) for w in draws]
    expected = draws[ok.index(True)] if True in ok[:10] else draws[10]
    assert window == expected
  # Ignore pixels do not count: 2 classes at 50/50 among non-ignore pixels pass.
  assert T.cat_max_ok(np.array([[0, 1, 255, 255]], np.uint8), 0.75)
  assert not T.cat_max_ok(np.array([[0, 0, 0, 1]], np.uint8), 0.75)  # 75 % is not < 75 %
  assert not T.cat_max_ok(np.full((3, 3), 4, np.uint8), 0.75)  # one class


def test_cat_max_ratio_gives_up_after_ten_redraws():
  label = np.full((30, 30), 3, np.uint8)  # no crop can pass: the 11th draw is kept
  window = T.random_crop_window(label, (10, 10), 0.75, np.random.default_rng(7))
  rng = np.random.default_rng(7)
  assert window == [T.crop_window(30, 30, (10, 10), rng) for _ in range(11)][-1]


def _host_normalize(image):
  """The host Normalize the pipeline ran before it moved to the device (the reference's)."""
  return (image.astype(np.float32) - T.MEAN) / T.STD


def test_flip_pad_and_device_normalize():
  image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
  np.testing.assert_array_equal(T.hflip(image)[:, 0], image[:, 2])
  norm = ops.normalize_images(np.array([[[[182, 116, 46]]]], np.uint8))
  np.testing.assert_allclose(norm[0, 0, 0], (np.array([182, 116, 46]) - T.MEAN) / T.STD,
                             atol=1e-6)
  assert norm.dtype == np.float32
  with pytest.raises(TypeError, match="uint8"):
    ops.normalize_images(np.zeros((1, 2, 2, 3), np.float32))
  padded = T.pad_to(np.ones((2, 3), np.int32), (4, 5), 255)
  assert padded.shape == (4, 5) and (padded[:2, :3] == 1).all()
  assert (padded[2:] == 255).all() and (padded[:, 3:] == 255).all()
  with pytest.raises(ValueError, match="pad"):
    T.pad_to(np.ones((6, 3)), (4, 5), 0)


def test_train_transform_pads_small_images():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
  label = rng.integers(0, 19, (20, 30), dtype=np.uint8)
  out = T.train_transform(image, label, rng, scale=(30, 20), crop_size=(24, 32),
                          margins=(0, 0, 0, 0), flip_prob=0.0)
  assert out["image"].shape == (24, 32, 3) and out["image"].dtype == np.uint8
  assert out["label"].dtype == np.int32 and out["valid"].dtype == np.float32
  assert out["size"].tolist() == [20, 30] and out["size"].dtype == np.int32
  assert (out["image"][20:] == 0).all() and (out["image"][:, 30:] == 0).all()
  assert (out["label"][20:] == 255).all() and (out["label"][:, 30:] == 255).all()
  assert (out["valid"][:20, :30] == 1).all() and (out["valid"][20:] == 0).all()
  np.testing.assert_array_equal(out["label"][:20, :30], label)
  np.testing.assert_array_equal(out["image"][:20, :30], image)
  # On the device: the host's Normalize → Pad of before (pad = 0 = the mean colour), up to
  # float rounding (XLA may divide by STD as a multiplication by 1 / STD: ≤ 1 ulp).
  x = np.asarray(ops.normalize_images(out["image"][None], out["size"][None]))[0]
  expected = T.pad_to(_host_normalize(image), (24, 32), 0.0)
  np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-6)
  assert (x[20:] == 0).all() and (x[:, 30:] == 0).all()


@pytest.mark.parametrize("flip", [False, True])
def test_valid_mask_margins_after_resize_flip_are_pixel_exact(flip):
  # Cityscapes 2048x1024 → 1024x512 with margins (top 30, bottom 240, left 30, right 100):
  # resized row r is valid iff 30 <= 2r < 1024 - 240, i.e. r in [15, 392); columns [15, 974).
  image = np.zeros((1024, 2048, 3), np.uint8)
  label = np.zeros((1024, 2048), np.uint8)
  out = T.train_transform(image, label, np.random.default_rng(0), scale=(1024, 512),
                          crop_size=(512, 1024), flip_prob=float(flip),
                          margins=(30, 240, 30, 100))
  expected = np.zeros((512, 1024), np.float32)
  expected[15:392, 15:974] = 1
  np.testing.assert_array_equal(out["valid"], expected[:, ::-1] if flip else expected)


def test_valid_mask_follows_the_random_crop_and_flip():
  rng = np.random.default_rng(5)
  image = rng.integers(0, 256, (96, 200, 3), dtype=np.uint8)
  label = rng.integers(0, 19, (96, 200), dtype=np.uint8)
  margins, crop = (7, 20, 9, 31), (32, 40)
  for seed in range(8):
    out = T.train_transform(image, label, np.random.default_rng(seed), scale=(100, 48),
                            crop_size=crop, margins=margins)
    # Brute force: full-res mask → torch nearest resize → the same crop → the same flip.
    draw = np.random.default_rng(seed)
    y0, x0, h, w = T.crop_window(48, 100, crop, draw)
    flip = draw.random() < 0.5
    mask = T.valid_pseudo_mask(96, 200, margins).astype(np.float32)
    mask = F.interpolate(torch.from_numpy(mask)[None, None], size=(48, 100),
                         mode="nearest")[0, 0].numpy()[y0:y0 + h, x0:x0 + w]
    lab = T.resize_nearest(label, (48, 100))[y0:y0 + h, x0:x0 + w]
    if flip:
      mask, lab = mask[:, ::-1], lab[:, ::-1]
    np.testing.assert_array_equal(out["valid"], mask)
    np.testing.assert_array_equal(out["label"], lab)


def test_train_transform_without_margins_gives_ones_and_checks_shapes():
  rng = np.random.default_rng(0)
  out = T.train_transform(np.zeros((40, 60, 3), np.uint8), np.zeros((40, 60), np.uint8), rng,
                          scale=(60, 40), crop_size=(16, 16))
  assert (out["valid"] == 1).all()
  with pytest.raises(ValueError, match="sizes differ"):
    T.train_transform(np.zeros((40, 60, 3), np.uint8), np.zeros((40, 61), np.uint8), rng,
                      scale=(60, 40), crop_size=(16, 16))
  with pytest.raises(ValueError, match="pseudo_margins"):
    T.valid_pseudo_mask(10, 10, (1, 2, 3))


def test_eval_transform_resizes_keep_ratio_to_uint8():
  image = np.full((1024, 2048, 3), 128, np.uint8)
  out = T.eval_transform(image, (1024, 512))
  assert out.shape == (512, 1024, 3) and out.dtype == np.uint8 and (out == 128).all()


@pytest.mark.parametrize("in_hw, out_hw", [((16, 16), (64, 64)), ((8, 8), (64, 64)),
                                           ((32, 32), (64, 64)), ((1, 5), (4, 15)),
                                           ((12, 10), (48, 25))])
def test_integer_upsampling_equals_jax_resize_and_torch(in_hw, out_hw):
  """ops.resize_bilinear's shifted-slice path (integer factors; (12, 10)→(48, 25) mixes it
  with jax.image.resize on W): values and gradients."""
  rng = np.random.default_rng(sum(out_hw))
  x = jnp.asarray(rng.normal(size=(2, *in_hw, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(2, *out_hw, 3)), jnp.float32)
  ref = lambda x: jax.image.resize(x, (2, *out_hw, 3), "bilinear", antialias=False)  # noqa: E731
  got = ops.resize_bilinear(x, out_hw)
  np.testing.assert_allclose(got, ref(x), rtol=1e-6, atol=1e-6)
  torch_out = np.stack([_torch_bilinear(np.asarray(x[i]), out_hw) for i in range(2)])
  np.testing.assert_allclose(got, torch_out, rtol=1e-5, atol=1e-5)
  grads = [jax.grad(lambda x, f=f: jnp.sum(f(x) * w))(x)
           for f in (ref, lambda x: ops.resize_bilinear(x, out_hw))]
  np.testing.assert_allclose(grads[1], grads[0], rtol=1e-5, atol=1e-5)
  bf16 = ops.resize_bilinear(x.astype(jnp.bfloat16), out_hw)
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf16, np.float32), got, atol=0.05)
