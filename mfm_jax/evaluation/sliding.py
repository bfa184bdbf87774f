"""Whole-image and sliding-window inference (mmseg ``EncoderDecoder`` semantics).

``whole`` resizes the logits to the input size and then to the label size (bilinear,
align_corners=False) before the argmax (DAFormer); ``slide`` runs overlapping windows
(HRDA/MIC: crop 1024, stride 512 on 2048×1024), resizes each window's logits to the window and
averages them with a count map. HRDA's detail windows (``mfm_jax.models.hrda``) use the same
window grid and averaging.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mfm_jax.ops import resize_bilinear

LogitsFn = Callable[[jax.Array], jax.Array]
Window = tuple[int, int, int, int]  # (y1, y2, x1, x2)


def whole_inference(logits_fn: LogitsFn, images: jax.Array,
                    out_size: tuple[int, int]) -> jax.Array:
  """Logits ``[B, *out_size, K]`` of the whole image (mmseg 'whole' mode).

  ``logits_fn(images)`` may return any stride; as in mmseg the logits are first resized to
  the input size (``encode_decode``) and then to ``out_size`` (the label size).
  """
  logits = logits_fn(images).astype(jnp.float32)
  logits = resize_bilinear(logits, tuple(images.shape[1:3]))
  return resize_bilinear(logits, tuple(out_size))


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
  h, w = (v, v) if isinstance(v, int) else tuple(v)
  if h <= 0 or w <= 0:
    raise ValueError(f"slide inference: {name} must be positive, got {v}")
  return int(h), int(w)


def slide_windows(height: int, width: int, crop: int | Sequence[int],
                  stride: int | Sequence[int]) -> list[tuple[int, int, int, int]]:
  """mmseg ``slide_inference`` windows ``(y1, y2, x1, x2)``, clamped inside the image.

  ``h_grids = max(H − crop_h + stride_h − 1, 0) // stride_h + 1``; the last window is moved
  back so that it ends at the border, so every window has size ``min(crop, image)``.
  """
  (ch, cw), (sh, sw) = _pair(crop, "crop"), _pair(stride, "stride")
  h_grids = max(height - ch + sh - 1, 0) // sh + 1
  w_grids = max(width - cw + sw - 1, 0) // sw + 1
  windows = []
  for i in range(h_grids):
    for j in range(w_grids):
      y1 = max(min(i * sh, height - ch), 0)
      x1 = max(min(j * sw, width - cw), 0)
      windows.append((y1, min(y1 + ch, height), x1, min(x1 + cw, width)))
  return windows


def window_count_map(boxes: Sequence[Window], size: Sequence[int]) -> np.ndarray:
  """How many of ``boxes`` cover each cell of a ``size`` map (``float32 [h, w]``)."""
  count = np.zeros(tuple(size), np.float32)
  for y1, y2, x1, x2 in boxes:
    count[y1:y2, x1:x2] += 1
  return count


def slide_count_map(height: int, width: int, crop: int | Sequence[int],
                    stride: int | Sequence[int]) -> np.ndarray:
  """How many sliding windows cover each pixel (``float32 [H, W]``)."""
  return window_count_map(slide_windows(height, width, crop, stride), (height, width))


def average_windows(window_logits: Sequence[jax.Array], boxes: Sequence[Window], batch: int,
                    size: Sequence[int]) -> jax.Array:
  """Sums per-window logits (each already the size of its box) into a ``[batch, *size, K]``
  map and divides by the count map (every cell must be covered)."""
  count = window_count_map(boxes, size)
  if count.min() < 1:
    raise ValueError(f"Windows {list(boxes)} leave cells of the {tuple(size)} map uncovered "
                     "(window stride larger than the window?).")
  k = window_logits[0].shape[-1]
  preds = jnp.zeros((batch, size[0], size[1], k), jnp.float32)
  for (y1, y2, x1, x2), win in zip(boxes, window_logits):
    preds = preds.at[:, y1:y2, x1:x2].add(win.astype(jnp.float32))
  return preds / jnp.asarray(count)[None, :, :, None]


def slide_inference(logits_fn: LogitsFn, images: jax.Array, crop: int | Sequence[int],
                    stride: int | Sequence[int], num_classes: int, *,
                    out_size: tuple[int, int] | None = None,
                    batch_windows: bool = True) -> jax.Array:
  """Window-averaged logits ``[B, H, W, K]`` (or ``out_size``) — mmseg 'slide' mode.

  Each window's logits (any stride) are bilinearly resized to the window and accumulated;
  the sum is divided by the count map. ``batch_windows`` stacks all windows on the batch axis
  for one ``logits_fn`` call (HRDA's ``batched_slide``); otherwise windows run one at a time.
  """
  b, h, w, _ = images.shape
  windows = slide_windows(h, w, crop, stride)
  crops = [images[:, y1:y2, x1:x2] for y1, y2, x1, x2 in windows]
  if batch_windows:
    outs = jnp.split(logits_fn(jnp.concatenate(crops, axis=0)), len(windows), axis=0)
  else:
    outs = [logits_fn(c) for c in crops]
  resized = []
  for (y1, y2, x1, x2), out in zip(windows, outs):
    if out.shape[-1] != num_classes:
      raise ValueError(f"slide_inference: logits_fn returned {out.shape[-1]} channels, "
                       f"expected num_classes={num_classes}")
    resized.append(resize_bilinear(out.astype(jnp.float32), (y2 - y1, x2 - x1)))
  preds = average_windows(resized, windows, b, (h, w))
  return preds if out_size is None else resize_bilinear(preds, tuple(out_size))
