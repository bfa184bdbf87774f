"""Per-example training and test transforms on numpy arrays (uda_reference.md §3.2–3.3).

The reference (mmseg 0.16 / mmcv 1.3.7) runs Resize (keep ratio) → RandomCrop (cat_max_ratio)
→ RandomFlip → Normalize → Pad on every image. The same steps are implemented here in numpy so
they can run in grain worker processes without JAX, except Normalize: images leave the host as
uint8 (4× fewer bytes to the device) and are normalised on the device with ``MEAN`` / ``STD``
by ``mfm_jax.ops.normalize_images``, which also zeroes the padding (= Pad after Normalize; the
unpadded size travels with the image). Randomness always comes from an explicit
``np.random.Generator``.

Resizing follows cv2 (what mmcv ``imrescale`` calls): bilinear images use the half-pixel rule of
``cv2.INTER_LINEAR`` / ``torch F.interpolate(align_corners=False)`` (no antialiasing) in float,
rounded back to uint8 (cv2's fixed-point arithmetic can differ by 1 grey level); labels and masks
use the nearest rule ``src = floor(dst * in / out)`` in exact integer arithmetic (identical to
``mfm_jax.ops.resize_nearest`` and torch for the dataset sizes). These are numpy twins of the
JAX ops in ``mfm_jax.ops`` (tested against them): the host pipeline must not put work on the
accelerator nor start JAX in grain workers.

Crops are applied *before* the bilinear image resize where possible: only the output window of
the resized image is computed, which is exactly the crop of the full resize (tested).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mfm_jax.data import labels

# Normalize (RGB): mean/std of the reference's img_norm_cfg (uda_reference.md §3.2), applied on
# the device (mfm_jax.ops.normalize_images).
MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)
CAT_MAX_RETRIES = 10  # mmseg RandomCrop: up to 10 re-draws
Window = tuple[int, int, int, int]  # (y0, x0, height, width) in the resized frame


def keep_ratio_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
  """Output ``(h, w)`` of mmcv ``imrescale(img, scale)`` for ``scale = (w, h)``-like pairs.

  factor f = min(max(scale) / max(h, w), min(scale) / min(h, w)); size = int(x * f + 0.5).
  GTA 1914x1052 at (1280, 720) → 1280x704; Cityscapes 2048x1024 at (1024, 512) → 1024x512.
  """
  if len(scale) != 2 or min(scale) <= 0:
    raise ValueError(f"scale must be two positive ints (w, h), got {tuple(scale)!r}.")
  f = min(max(scale) / max(height, width), min(scale) / min(height, width))
  return int(height * f + 0.5), int(width * f + 0.5)


def _full_window(size: Sequence[int]) -> Window:
  return (0, 0, int(size[0]), int(size[1]))


def _linear_coords(in_size: int, out_size: int, start: int, count: int):
  """Source indices i0, i1 and weight of i1 for outputs start..start+count (half-pixel rule)."""
  dst = np.arange(start, start + count, dtype=np.float64)
  src = np.maximum((dst + 0.5) * (in_size / out_size) - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  return i0, i1, (src - i0).astype(np.float32)


def resize_bilinear(image: np.ndarray, size: Sequence[int],
                    window: Window | None = None) -> np.ndarray:
  """Bilinear resize of ``[H, W, C]`` to ``size = (h, w)`` (cv2 INTER_LINEAR / torch rule).

  ``window = (y0, x0, wh, ww)`` returns only that window of the resized image. uint8 input gives
  rounded uint8 output, float input float32 output.
  """
  h_in, w_in = image.shape[:2]
  y0, x0, wh, ww = window or _full_window(size)
  if (h_in, w_in) == tuple(size):
    return image[y0:y0 + wh, x0:x0 + ww]
  r0, r1, wy = _linear_coords(h_in, size[0], y0, wh)
  c0, c1, wx = _linear_coords(w_in, size[1], x0, ww)
  lo, hi = int(c0.min()), int(c1.max()) + 1  # only the columns the window reads
  rows0 = image[r0, lo:hi].astype(np.float32)
  rows1 = image[r1, lo:hi].astype(np.float32)
  shape = (-1,) + (1,) * (image.ndim - 1)
  tmp = rows0 + (rows1 - rows0) * wy.reshape(shape)
  a, b = tmp[:, c0 - lo], tmp[:, c1 - lo]
  out = a + (b - a) * wx.reshape((1, -1) + (1,) * (image.ndim - 2))
  if image.dtype == np.uint8:
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
  return out


def nearest_index(in_size: int, out_size: int, start: int = 0, count: int | None = None):
  """Nearest source indices ``floor(dst * in / out)`` (torch / cv2 INTER_NEAREST rule)."""
  count = out_size - start if count is None else count
  return (np.arange(start, start + count, dtype=np.int64) * in_size) // out_size


def resize_nearest(array: np.ndarray, size: Sequence[int],
                   window: Window | None = None) -> np.ndarray:
  """Nearest resize of an array whose first two axes are H, W (labels, masks)."""
  y0, x0, wh, ww = window or _full_window(size)
  if array.shape[:2] == tuple(size):
    return array[y0:y0 + wh, x0:x0 + ww]
  rows = nearest_index(array.shape[0], size[0], y0, wh)
  cols = nearest_index(array.shape[1], size[1], x0, ww)
  return array[rows[:, None], cols[None, :]]


def crop_window(height: int, width: int, crop_size: Sequence[int],
                rng: np.random.Generator) -> Window:
  """mmseg ``RandomCrop.get_crop_bbox``: offsets uniform in [0, H−ch] × [0, W−cw].

  Returns the window clipped to the image (smaller than the crop when the image is).
  """
  ch, cw = crop_size
  y0 = int(rng.integers(0, max(height - ch, 0) + 1))
  x0 = int(rng.integers(0, max(width - cw, 0) + 1))
  return (y0, x0, min(ch, height - y0), min(cw, width - x0))


def crop(array: np.ndarray, window: Window) -> np.ndarray:
  """``array[y0:y0+h, x0:x0+w]``."""
  y0, x0, h, w = window
  return array[y0:y0 + h, x0:x0 + w]


def cat_max_ok(label: np.ndarray, cat_max_ratio: float) -> bool:
  """mmseg RandomCrop test: ≥ 2 non-ignore classes and the largest one < ratio of them."""
  counts = np.bincount(label.ravel(), minlength=256)[:labels.IGNORE_INDEX]
  counts = counts[counts > 0]
  return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def random_crop_window(label: np.ndarray, crop_size: Sequence[int], cat_max_ratio: float,
                       rng: np.random.Generator) -> Window:
  """Random crop window of ``label`` (already resized), with mmseg's cat_max_ratio re-draws.

  With ``cat_max_ratio < 1`` a window is re-drawn up to 10 times while the crop fails
  ``cat_max_ok``; the last draw is kept (cat_max_ratio 0.75 for the source, §3.2).
  """
  h, w = label.shape[:2]
  window = crop_window(h, w, crop_size, rng)
  if cat_max_ratio < 1.0:
    for _ in range(CAT_MAX_RETRIES):
      if cat_max_ok(crop(label, window), cat_max_ratio):
        break
      window = crop_window(h, w, crop_size, rng)
  return window


def hflip(array: np.ndarray) -> np.ndarray:
  """Horizontal flip (axis 1)."""
  return array[:, ::-1]


def pad_to(array: np.ndarray, size: Sequence[int], value: float) -> np.ndarray:
  """Pads H, W at the bottom/right up to ``size`` with ``value`` (mmseg Pad)."""
  h, w = array.shape[:2]
  if h > size[0] or w > size[1]:
    raise ValueError(f"Cannot pad a {h}x{w} array to the smaller size {size[0]}x{size[1]}.")
  if (h, w) == tuple(size):
    return array
  out = np.full(tuple(size) + array.shape[2:], value, array.dtype)
  out[:h, :w] = array
  return out


def valid_pseudo_mask(height: int, width: int, margins: Sequence[int]) -> np.ndarray:
  """HRDA/MIC plcrop v2 mask at the ORIGINAL target size: 1 inside, 0 in the margins.

  ``margins = (top, bottom, left, right)`` pixels, e.g. (30, 240, 30, 30) for Cityscapes
  (uda_reference.md §2.3).
  """
  if len(margins) != 4 or min(margins) < 0:
    raise ValueError("pseudo_margins must be four non-negative ints (top, bottom, left, right), "
                     f"got {tuple(margins)!r}.")
  top, bottom, left, right = (int(m) for m in margins)
  mask = np.zeros((height, width), np.uint8)
  mask[top:max(height - bottom, top), left:max(width - right, left)] = 1
  return mask


def train_transform(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, *,
                    scale: Sequence[int], crop_size: Sequence[int], cat_max_ratio: float = 1.0,
                    flip_prob: float = 0.5,
                    margins: Sequence[int] = ()) -> dict[str, Any]:
  """Resize → RandomCrop → RandomFlip → Pad of one example (§3.2; Normalize: on the device).

  Args:
    image: uint8 ``[H, W, 3]`` RGB at original resolution.
    label: uint8 ``[H, W]`` train ids (255 = ignore).
    rng: the example's generator (draws: crop offsets with re-draws, then the flip).
    scale: keep-ratio resize target ``(w, h)`` as in the configs (``None`` = no resize).
    crop_size: ``(h, w)``.
    cat_max_ratio: RandomCrop cat_max_ratio (1.0 = off).
    flip_prob: horizontal flip probability.
    margins: plcrop v2 ``(top, bottom, left, right)`` at the original size, or () (no mask).

  Returns:
    ``image`` uint8 RGB ``[ch, cw, 3]`` (pad 0), ``size`` int32 ``[2]`` = its ``(h, w)`` before
    the pad (``ops.normalize_images`` sets the pad to the normalised 0), ``label`` i32
    ``[ch, cw]`` (pad 255), ``valid`` f32 ``[ch, cw]`` (pad 0; all ones when ``margins`` is
    empty).
  """
  if image.shape[:2] != label.shape[:2]:
    raise ValueError(f"Image {image.shape} and label {label.shape} sizes differ.")
  h0, w0 = label.shape[:2]
  size = keep_ratio_size(h0, w0, scale) if scale is not None else (h0, w0)
  if cat_max_ratio < 1.0:
    window = random_crop_window(resize_nearest(label, size), crop_size, cat_max_ratio, rng)
  else:
    window = crop_window(size[0], size[1], crop_size, rng)
  flip = rng.random() < flip_prob
  img = resize_bilinear(image, size, window)
  lab = resize_nearest(label, size, window)
  valid = None
  if margins:
    valid = resize_nearest(valid_pseudo_mask(h0, w0, margins), size, window)
  if flip:
    img, lab = hflip(img), hflip(lab)
    valid = None if valid is None else hflip(valid)
  out = {"image": pad_to(img, crop_size, 0),
         "size": np.asarray(img.shape[:2], np.int32),
         "label": pad_to(lab.astype(np.int32), crop_size, labels.IGNORE_INDEX)}
  if valid is None:
    out["valid"] = np.ones(tuple(crop_size), np.float32)
  else:
    out["valid"] = pad_to(valid.astype(np.float32), crop_size, 0.0)
  return out


def eval_transform(image: np.ndarray, scale: Sequence[int]) -> np.ndarray:
  """Test pipeline (§3.3): keep-ratio resize to ``scale``; uint8 ``[h, w, 3]`` (Normalize is
  ``ops.normalize_images``, on the device)."""
  size = keep_ratio_size(image.shape[0], image.shape[1], scale)
  return resize_bilinear(image, size)
