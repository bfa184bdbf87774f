"""Small array ops shared by models, UDA helpers and evaluation (NHWC layout).

All bilinear resizes follow PyTorch's ``F.interpolate(mode='bilinear', align_corners=False)``
without antialiasing, which is what the reference (mmseg ``resize``) uses everywhere
(uda_reference.md §2.6b). ``jax.image.resize`` antialiases when downsampling by default, so
it is called with ``antialias=False``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from mfm_jax.data.labels import IGNORE_INDEX  # re-exported; defined JAX-free for the host data code
from mfm_jax.data.transforms import MEAN
from mfm_jax.data.transforms import STD


def normalize_images(images: jax.Array, sizes: jax.Array | None = None) -> jax.Array:
  """Normalize on the device: uint8 RGB ``[B, H, W, 3]`` → float32 ``(x − MEAN) / STD``.

  The input pipeline ships uint8 images (4× fewer bytes to the device than float32) and every
  consumer (train step, evaluation, prediction, benchmark) calls this at its start. ``sizes``
  int32 ``[B, 2]`` are each image's ``(h, w)`` before the pipeline padded it at the bottom/right
  (mmseg Pad after Normalize): pixels outside are 0, i.e. the mean colour, as the reference.
  """
  if images.dtype != jnp.uint8:
    raise TypeError(f"normalize_images expects uint8 RGB images, got {images.dtype}.")
  x = (images.astype(jnp.float32) - jnp.asarray(MEAN)) / jnp.asarray(STD)
  if sizes is not None:
    h, w = images.shape[1:3]
    rows = jnp.arange(h)[None, :, None] < sizes[:, 0, None, None]
    cols = jnp.arange(w)[None, None, :] < sizes[:, 1, None, None]
    x = jnp.where((rows & cols)[..., None], x, 0.0)
  return x


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of an NHWC array to spatial ``size`` (align_corners=False, no antialias).

  Separable: H, then W. An axis enlarged by an integer factor (DAFormer's ×2/×4/×8 feature
  and ×4 logit upsampling) takes ``_upsample_axis``; any other size ``jax.image.resize``
  (same function, tested equal: its matrix form transposes whole feature maps, which made
  the head's upsampling and its gradient ~1.7 s of a 17 s MiT-B5 CPU step at 256²).
  """
  for axis, out in ((1, size[0]), (2, size[1])):
    n_in = x.shape[axis]
    if out == n_in:
      continue
    if out % n_in == 0:
      x = _upsample_axis(x, axis, out // n_in)
    else:
      shape = list(x.shape)
      shape[axis] = out
      x = jax.image.resize(x, tuple(shape), method="bilinear", antialias=False)
  return x


def _upsample_axis(x: jax.Array, axis: int, factor: int) -> jax.Array:
  """Bilinear ×``factor`` along ``axis`` as shifted slices (PyTorch align_corners=False).

  Output ``factor·i + r`` samples the input at ``i + t_r``, ``t_r = (r + ½)/factor − ½`` in
  (−½, ½): a blend of inputs ``i − 1`` and ``i`` (t_r < 0) or ``i`` and ``i + 1``, with
  the edge sample repeated past either end (PyTorch clamps the source index). Each phase is
  two slices of the edge-padded input; the phases interleave by a reshape.
  """
  n = x.shape[axis]
  pad = [(0, 0)] * x.ndim
  pad[axis] = (1, 1)
  xp = jnp.pad(x, pad, mode="edge")
  shifted = lambda o: jax.lax.slice_in_dim(xp, 1 + o, 1 + o + n, axis=axis)  # noqa: E731  x[i+o]
  phases = []
  for r in range(factor):
    t = (r + 0.5) / factor - 0.5
    if t < 0:
      phases.append(shifted(-1) * (-t) + shifted(0) * (1 + t))
    else:
      phases.append(shifted(0) * (1 - t) + shifted(1) * t)
  y = jnp.stack(phases, axis=axis + 1)
  return y.reshape(*x.shape[:axis], n * factor, *x.shape[axis + 1:])


def interleave_batches(batches: list[jax.Array]) -> jax.Array:
  """Same-shape batches ``[B, ...]`` → one ``[B·n, ...]`` batch, interleaved image by image.

  Row ``n·i + j`` is image ``i`` of batch ``j``, so under data sharding every device's rows of
  the joint batch are its own rows of each batch: no image moves between devices (a
  concatenation would move them). ``split_interleaved`` is the inverse.
  """
  return jnp.stack(batches, axis=1).reshape(-1, *batches[0].shape[1:])


def split_interleaved(x: jax.Array, n: int) -> list[jax.Array]:
  """Inverse of ``interleave_batches``: ``[B·n, ...]`` → the ``n`` batches ``[B, ...]``."""
  y = x.reshape(x.shape[0] // n, n, *x.shape[1:])
  return [y[:, j] for j in range(n)]


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


@jax.custom_vjp
def gelu_exact(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, ``x · Φ(x)`` (PyTorch's ``nn.GELU()``), whose backward keeps only ``x``.

  Same values as ``jax.nn.gelu(x, approximate=False)``; its gradient ``Φ(x) + x · φ(x)`` is
  recomputed from ``x`` where autodiff of the erf form keeps intermediate arrays of the
  activation's size (MiT's Mix-FFN runs it on the 4×-wide hidden map of every block; XLA
  temporaries of 40 stage-3 Mix-FFNs at 256², CPU: 529 → 414 MiB)."""
  return jax.nn.gelu(x, approximate=False)


def _gelu_exact_fwd(x):
  return jax.nn.gelu(x, approximate=False), x


def _gelu_exact_bwd(x, g):
  x32 = x.astype(jnp.float32)
  cdf = 0.5 * (1.0 + jax.lax.erf(x32 * (1.0 / math.sqrt(2.0))))
  pdf = jnp.exp(-0.5 * x32 * x32) * (1.0 / math.sqrt(2.0 * math.pi))
  return ((g.astype(jnp.float32) * (cdf + x32 * pdf)).astype(g.dtype),)


gelu_exact.defvjp(_gelu_exact_fwd, _gelu_exact_bwd)


def _batch_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and biased variance over all but the last axis, in float32 (Flax
  ``nn.BatchNorm``'s fast variance: E[x²] − E[x]², clamped at 0)."""
  x32 = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x32, axis=axes)
  return mean, jnp.maximum(0.0, jnp.mean(jnp.square(x32), axis=axes) - jnp.square(mean))


def batch_norm_apply(x, mean, var, scale, bias, epsilon: float) -> jax.Array:
  """``(x − mean) · rsqrt(var + ε) · scale + bias`` per channel, in float32 (Flax
  ``nn.BatchNorm``'s order of operations); train mode passes the batch's statistics, eval mode
  the running ones."""
  return (x.astype(jnp.float32) - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, epsilon: float):
  """Train-mode batch normalisation → (float32 output, batch mean, batch variance), with the
  values of Flax ``nn.BatchNorm`` and a backward that keeps only ``x`` and per-channel vectors.

  Autodiff of the normalisation keeps the centred and the normalised input as well (two more
  arrays of the input's size per BatchNorm): in the DAFormer head, whose separable ASPP
  normalises three 1024-channel maps, that was 689 → 553 MiB of the head's XLA temporaries
  (MiT-B5 features at 256², batch 2, CPU). The gradient is the textbook one
  (d x = scale·rstd/n · (n·g − Σg − x̂·Σg·x̂)) plus the mean's and variance's own cotangents."""
  mean, var = _batch_moments(x)
  return batch_norm_apply(x, mean, var, scale, bias, epsilon), mean, var


def _batch_norm_train_fwd(x, scale, bias, epsilon):
  out = batch_norm_train(x, scale, bias, epsilon)
  _, mean, var = out
  return out, (x, mean, var, scale)


def _batch_norm_train_bwd(epsilon, res, cotangents):
  x, mean, var, scale = res
  g, g_mean, g_var = cotangents
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  rstd = jax.lax.rsqrt(var + epsilon)
  centred = x.astype(jnp.float32) - mean
  xhat = centred * rstd
  g = g.astype(jnp.float32)
  d_bias = jnp.sum(g, axis=axes)
  d_scale = jnp.sum(g * xhat, axis=axes)
  dx = (scale * rstd / n) * (n * g - d_bias - xhat * d_scale)
  dx = dx + g_mean / n + g_var * (2.0 / n) * centred
  return dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(scale.dtype)


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


# ---------------------------------------------------------------------------------------------
# Depthwise convolution in two formulations. XLA lowers a grouped convolution with one channel
# per group (feature_group_count = C), dilated or not, to a dedicated kernel whose speed varies
# by backend (a known slow path on GPUs); 'shift' writes the same stride-1 convolution as
# k·k shifted multiply-adds, which XLA fuses into one elementwise loop. Same parameters, same
# function (tested); `config.model.depthwise_impl` picks one, `mfm_jax.benchmark` times both.

DEPTHWISE_IMPLS = ("xla", "shift")


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, *, dilation: int = 1, padding: int = 0,
                     impl: str = "xla") -> jax.Array:
  """Stride-1 depthwise conv: ``x [B, H, W, C]``, ``kernel [kh, kw, 1, C]`` (Flax layout)."""
  _, _, one, c = kernel.shape
  if one != 1 or x.shape[-1] != c:
    raise ValueError(f"depthwise_conv2d: kernel {kernel.shape} does not match input {x.shape}.")
  if impl == "xla":
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((padding, padding), (padding, padding)),
        rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c)
  if impl != "shift":
    raise ValueError(f"depthwise_conv2d: impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}.")
  return _depthwise_shift(x, kernel, dilation, (padding, padding))


def _tap_plan(n_in: int, k: int, dilation: int, padding: int):
  """One axis of the 'shift' conv → (output size, each tap's start in the padded input, the
  taps whose window meets the input, the zero padding those taps need).

  Output pixel y reads input y + o, o = i·dilation − padding. A tap whose window never
  overlaps the input (|o| ≥ size, e.g. dilation 18 on a 16² map) adds only zeros and is left
  out, and the input is padded only as far as the remaining taps reach: padding it by the full
  18 there would make every tap, and its gradient, a 52² buffer (10.6× the map). A negative
  ``padding`` crops (the backward of an over-padded conv needs that).
  """
  n_out = n_in + 2 * padding - dilation * (k - 1)
  offs = [i * dilation - padding for i in range(k)]
  used = [i for i, o in enumerate(offs) if max(0, -o) < min(n_out, n_in - o)]
  pad = (max(0, -offs[used[0]]), max(0, offs[used[-1]] + n_out - n_in)) if used else (0, 0)
  return n_out, [o + pad[0] for o in offs], used, pad


def _shift_taps(x, kernel_shape, dilation: int, padding: tuple[int, int]):
  """The padded input and, per tap (i, j) whose window meets it, that window → (windows dict,
  output shape)."""
  hout, sy, used_y, pad_y = _tap_plan(x.shape[1], kernel_shape[0], dilation, padding[0])
  wout, sx, used_x, pad_x = _tap_plan(x.shape[2], kernel_shape[1], dilation, padding[1])
  windows = {}
  if used_y and used_x:
    xp = jnp.pad(x, ((0, 0), pad_y, pad_x, (0, 0)))
    windows = {(i, j): xp[:, sy[i]:sy[i] + hout, sx[j]:sx[j] + wout]
               for i in used_y for j in used_x}
  return windows, (x.shape[0], hout, wout, x.shape[3])


def _shift_forward(x, kernel, dilation: int, padding: tuple[int, int]):
  """The 'shift' multiply-adds: one slice of the (minimally) padded input per tap."""
  windows, shape = _shift_taps(x, kernel.shape, dilation, padding)
  out = None
  for (i, j), window in windows.items():
    out = window * kernel[i, j, 0] if out is None else out + window * kernel[i, j, 0]
  return jnp.zeros(shape, jnp.result_type(x, kernel)) if out is None else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_shift(x, kernel, dilation: int, padding: tuple[int, int]):
  """'shift' depthwise conv with its backward in the same form. Autodiff transposes each tap's
  slice into a pad of the whole padded input and XLA keeps those apart: for the separable
  ASPP at 256² (dilations 6/12/18, 1024 channels) that was 25 buffers of 45–78 MiB, most of
  the 4.8 GiB of temporaries of the MiT-B5 CPU step. Here the input gradient is the same conv
  of the output gradient with the kernel flipped (padding dilation·(k − 1) − padding per axis,
  negative = crop): one padded copy, one fused sum."""
  return _shift_forward(x, kernel, dilation, padding)


def _depthwise_shift_fwd(x, kernel, dilation, padding):
  return _shift_forward(x, kernel, dilation, padding), (x, kernel)


def _depthwise_shift_bwd(dilation, padding, res, g):
  x, kernel = res
  kh, kw = kernel.shape[:2]
  dx = _shift_forward(g, kernel[::-1, ::-1], dilation,
                      (dilation * (kh - 1) - padding[0], dilation * (kw - 1) - padding[1]))
  # Kernel gradient: per tap, the output gradient against the input window the tap read (the
  # forward's tap plan; taps that read only padding get 0).
  windows, _ = _shift_taps(x, kernel.shape, dilation, padding)
  g32 = g.astype(jnp.float32)
  zero = jnp.zeros((kernel.shape[-1],), jnp.float32)
  dk = jnp.stack([jnp.sum(g32 * windows[i, j].astype(jnp.float32), axis=(0, 1, 2))
                  if (i, j) in windows else zero for i in range(kh) for j in range(kw)])
  return dx.astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


_depthwise_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


# ---------------------------------------------------------------------------------------------
# The Rebuilder's ×2 upsampling, PyTorch ConvTranspose2d(k=4, stride=2, padding=1), in two
# formulations with the same kernel [4, 4, cout, cin]: 'transpose' (jax.lax.conv_transpose,
# lowered with an input dilated by zeros; its backward is a known slow path on GPUs) and
# 'subpixel': one stride-1 3x3 convolution to 4·cout channels (one output phase per channel
# block; each phase uses 2x2 of the 3x3 taps) followed by depth-to-space. Output pixel 2t + a
# of a dimension takes input t - 1 + d with torch tap k = a + 3 - 2d (0 <= k <= 3).

CONV_TRANSPOSE_IMPLS = ("transpose", "subpixel")


def _subpixel_kernel(kernel: jax.Array) -> jax.Array:
  """[4, 4, cout, cin] transposed-conv kernel → [3, 3, cin, 4·cout] (phases (a, b) major)."""
  _, _, cout, cin = kernel.shape
  k = jnp.pad(jnp.transpose(kernel, (0, 1, 3, 2)), ((0, 1), (0, 1), (0, 0), (0, 0)))
  taps = [[a + 3 - 2 * d if 0 <= a + 3 - 2 * d <= 3 else 4 for a in (0, 1)] for d in (0, 1, 2)]
  idx = jnp.asarray(taps)  # [d, a]; index 4 is the zero row/column
  sub = k[idx[:, None, :, None], idx[None, :, None, :]]  # [dh, dw, a, b, cin, cout]
  return jnp.transpose(sub, (0, 1, 4, 2, 3, 5)).reshape(3, 3, cin, 4 * cout)


def conv_transpose_2x(x: jax.Array, kernel: jax.Array, impl: str = "transpose") -> jax.Array:
  """``x [B, H, W, cin]`` → ``[B, 2H, 2W, cout]``, torch ConvTranspose2d(4, 2, 1) without bias;
  ``kernel [4, 4, cout, cin]`` (torch ``[cin, cout, 4, 4]`` through OIHW → HWIO)."""
  if kernel.shape[:2] != (4, 4) or kernel.shape[3] != x.shape[-1]:
    raise ValueError(f"conv_transpose_2x: kernel {kernel.shape} does not match input {x.shape}.")
  dn = ("NHWC", "HWIO", "NHWC")
  if impl == "transpose":
    return jax.lax.conv_transpose(x, kernel, (2, 2), ((2, 2), (2, 2)), dimension_numbers=dn,
                                  transpose_kernel=True)
  if impl != "subpixel":
    raise ValueError(f"conv_transpose_2x: impl must be one of {CONV_TRANSPOSE_IMPLS}, "
                     f"got {impl!r}.")
  b, h, w, _ = x.shape
  cout = kernel.shape[2]
  y = jax.lax.conv_general_dilated(x, _subpixel_kernel(kernel).astype(x.dtype), (1, 1),
                                   ((1, 1), (1, 1)), dimension_numbers=dn)
  y = y.reshape(b, h, w, 2, 2, cout).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(b, 2 * h, 2 * w, cout)
