"""Masked Feature Modeling helpers: latent cell masks, residual fusion and ablation losses.

See mfm_method.md. PAPER: a random 40 % of the cells of a 16x16 grid are masked in feature space,
the Rebuilder predicts an "offset" and the reconstructed feature is f_r = M * f_o + (1 - M) * f_t
(M = 1 on masked positions), which the ordinary decoder classifies against target pseudo-labels.
OURS (the paper is silent, all configurable by the caller): exactly round(ratio * g^2) masked
cells per sample drawn as a random permutation (like MAE), the same cell mask nearest-resized to
every feature level that is masked, and the ablation objectives "rebuild off" (masked features
zeroed), teacher-feature regression and MAE-style normalised-pixel regression.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mfm_jax import ops

# Mask ratio 40 % and a 16x16 grid (mfm_method.md, "Forward pass" 2-3).
DEFAULT_RATIO = 0.4
DEFAULT_GRID = 16


def num_masked_cells(grid_size: int, ratio: float) -> int:
  """round(ratio * g^2): the exact number of masked cells per sample."""
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"mfm_jax/uda/mfm.py: mask ratio must be in [0, 1], got {ratio}.")
  return int(round(ratio * grid_size * grid_size))


def cell_mask(rng: jax.Array, batch: int, grid_size: int = DEFAULT_GRID,
              ratio: float = DEFAULT_RATIO) -> jax.Array:
  """bool ``[B, g, g]`` (True = masked) with exactly round(ratio * g^2) True cells per sample.

  Each sample ranks its g^2 cells by independent uniforms (a random permutation, as MAE's
  ``argsort(noise)``) and masks the first round(ratio * g^2).
  """
  if grid_size <= 0:
    raise ValueError(f"mfm_jax/uda/mfm.py: grid_size must be > 0, got {grid_size}.")
  n_mask = num_masked_cells(grid_size, ratio)
  noise = jax.random.uniform(rng, (batch, grid_size * grid_size))
  rank = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)
  return (rank < n_mask).reshape(batch, grid_size, grid_size)


def level_mask(cells: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Nearest-resizes a ``[B, g, g]`` cell mask to a feature level: f32 ``[B, h, w, 1]``."""
  return ops.resize_nearest(cells.astype(jnp.float32)[..., None], tuple(size))


def _check_mask(features: jax.Array, mask: jax.Array, fn: str) -> None:
  if mask.ndim != 4 or mask.shape[:3] != features.shape[:3] or mask.shape[3] not in (
      1, features.shape[3]):
    raise ValueError(
        f"mfm_jax/uda/mfm.py:{fn}: mask {mask.shape} does not fit features {features.shape}; "
        f"build it with level_mask(cells, features.shape[1:3]).")


def fuse(features: jax.Array, offset: jax.Array, mask: jax.Array) -> jax.Array:
  """Residual fusion f_r = M * f_o + (1 - M) * f_t for a binary mask ``[B, h, w, 1]``.

  Implemented as a select so visible positions are bit-exact copies of ``features`` (and get
  exactly the features' gradient), while masked positions take ``offset``.
  """
  if offset.shape != features.shape:
    raise ValueError(
        f"mfm_jax/uda/mfm.py:fuse: offset {offset.shape} != features {features.shape}.")
  _check_mask(features, mask, "fuse")
  return jnp.where(mask > 0.5, offset.astype(features.dtype), features)


def mask_features(features: jax.Array, mask: jax.Array) -> jax.Array:
  """"Rebuild off" ablation: masked positions of ``features`` set to 0, the rest unchanged."""
  _check_mask(features, mask, "mask_features")
  return jnp.where(mask > 0.5, jnp.zeros_like(features), features)


def feature_regression_loss(recon: jax.Array, teacher_feat: jax.Array, mask: jax.Array
                            ) -> jax.Array:
  """Teacher-feature regression ablation: MSE at masked positions.

  Mean over channels of (recon - teacher)^2, averaged over the masked positions of ``mask``
  ``[B, h, w, 1]``; 0 (with zero gradient) when nothing is masked. The teacher features are a
  target: their gradient is stopped.
  """
  if recon.shape != teacher_feat.shape:
    raise ValueError(
        f"mfm_jax/uda/mfm.py:feature_regression_loss: recon {recon.shape} != teacher "
        f"{teacher_feat.shape}.")
  _check_mask(recon, mask, "feature_regression_loss")
  target = jax.lax.stop_gradient(teacher_feat).astype(jnp.float32)
  per_pos = jnp.mean(jnp.square(recon.astype(jnp.float32) - target), axis=-1)
  m = (mask[..., 0] > 0.5).astype(jnp.float32)
  return jnp.sum(per_pos * m) / jnp.maximum(jnp.sum(m), 1.0)


def patchify_targets(images: jax.Array, grid_size: int = DEFAULT_GRID, eps: float = 1e-6
                     ) -> jax.Array:
  """MAE-style per-cell normalised pixel targets ``[B, g, g, ph * pw * 3]``.

  The image ``[B, H, W, 3]`` is split into a g x g grid of ph x pw cells (H, W divisible by g),
  flattened (row, column, channel) per cell, and each cell is normalised by its own mean and
  (unbiased, as torch's ``var``) variance: (x - mean) / sqrt(var + eps), eps = 1e-6 as in MAE.
  """
  batch, height, width, chans = images.shape
  if height % grid_size or width % grid_size:
    raise ValueError(
        f"mfm_jax/uda/mfm.py:patchify_targets: image {height}x{width} is not divisible by the "
        f"grid size {grid_size}.")
  ph, pw = height // grid_size, width // grid_size
  x = images.astype(jnp.float32).reshape(batch, grid_size, ph, grid_size, pw, chans)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, grid_size, grid_size, ph * pw * chans)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.var(x, axis=-1, keepdims=True, ddof=1)
  return jax.lax.stop_gradient((x - mean) / jnp.sqrt(var + eps))


def pixel_regression_loss(pred: jax.Array, target: jax.Array, cells: jax.Array) -> jax.Array:
  """MSE over masked cells: mean over the target vector, then over cells where ``cells`` is True.

  ``pred`` and ``target`` are ``[B, g, g, D]``, ``cells`` bool ``[B, g, g]``; 0 if none masked.
  """
  if pred.shape != target.shape or cells.shape != pred.shape[:3]:
    raise ValueError(
        f"mfm_jax/uda/mfm.py:pixel_regression_loss: pred {pred.shape}, target {target.shape} "
        f"and cell mask {cells.shape} do not match.")
  per_cell = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
  m = cells.astype(jnp.float32)
  return jnp.sum(per_cell * m) / jnp.maximum(jnp.sum(m), 1.0)
