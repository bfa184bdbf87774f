"""Masked Feature Modeling helpers: latent keep masks, level masks and ablation losses.

See mfm_method.md. OFFICIAL (the authors' released ``rebuilder.py``, uda_reference.md §7.2b):
every token of the grid is kept when an independent uniform draw exceeds the mask ratio
(``keep = U(0, 1) > 0.4``, 1 = visible, 0 = masked: ≈40 % masked, not an exact count), drawn
anew for every sample; the keep mask is nearest-resized to every masked feature level. Here the
draw comes from the train step's RNG stream, so a run replays exactly.

OURS (configurable): the token grid at crop sizes other than 512 (``token_grid``), the
"uncertainty" mask strategy (``guided_keep_mask``, beyond the paper, its stated future work)
and the ablation objectives "rebuild off" (masked features zeroed), teacher-feature regression
and MAE-style normalised-pixel regression.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mfm_jax import ops

# Mask ratio 40 % and a 16×16 token grid (mfm_method.md "Forward pass" 2-3, OFFICIAL).
DEFAULT_RATIO = 0.4
DEFAULT_GRID = 16
MASK_STRATEGIES = ("random", "uncertainty")


def token_grid(last_level_size: tuple[int, int], grid_size: int = DEFAULT_GRID
               ) -> tuple[int, int]:
  """The token grid (gh, gw) for a last encoder level of ``last_level_size``.

  OURS, the rule for crops other than 512: ``min(grid_size, level size)`` per axis. At a 512
  crop the MiT's last level is 16×16 and DeepLabV2's 64×64 → 16×16 as released; at 256, 8×8.
  """
  if grid_size <= 0:
    raise ValueError(f"mfm_jax/uda/mfm.py: grid_size must be > 0, got {grid_size}.")
  return (min(grid_size, int(last_level_size[0])), min(grid_size, int(last_level_size[1])))


def keep_mask(rng: jax.Array, batch: int, grid: tuple[int, int],
              ratio: float = DEFAULT_RATIO) -> jax.Array:
  """f32 ``[B, gh, gw]`` keep mask: 1 where an independent U(0, 1) draw exceeds ``ratio``."""
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"mfm_jax/uda/mfm.py: mask ratio must be in [0, 1], got {ratio}.")
  return (jax.random.uniform(rng, (batch, *grid)) > ratio).astype(jnp.float32)


def cell_uncertainty(probs: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """Per-token teacher uncertainty ``[B, gh, gw]``: 1 − max softmax probability, averaged over
  each cell's pixels (area-averaging resize of the ``[B, H, W, K]`` probabilities' margin)."""
  u = 1.0 - jnp.max(probs.astype(jnp.float32), axis=-1, keepdims=True)
  b = u.shape[0]
  u = jax.image.resize(u, (b, *grid, 1), method="linear", antialias=True)
  return jax.lax.stop_gradient(u[..., 0])


def guided_keep_mask(rng: jax.Array, scores: jax.Array, ratio: float = DEFAULT_RATIO,
                     guidance: float = 1.0) -> jax.Array:
  """Keep mask whose per-token mask probability follows ``scores`` ``[B, gh, gw]`` (≥ 0).

  OURS ("uncertainty" strategy): p_i = ratio · ((1 − γ) + γ · s_i / mean_b(s)), clipped to
  [0, 1], so the expected masked fraction stays ≈ ratio (exactly, unless clipping binds) while
  tokens the teacher is unsure about are masked more often; γ = ``guidance`` ∈ [0, 1]
  (0 = the released uniform law).
  """
  s = jnp.maximum(scores.astype(jnp.float32), 0.0)
  mean = jnp.mean(s, axis=(1, 2), keepdims=True)
  rel = jnp.where(mean > 0, s / jnp.maximum(mean, 1e-12), 1.0)
  p = jnp.clip(ratio * ((1.0 - guidance) + guidance * rel), 0.0, 1.0)
  return (jax.random.uniform(rng, s.shape) >= p).astype(jnp.float32)


def level_mask(keep: jax.Array, size: tuple[int, int]) -> jax.Array:
  """The MASKED indicator of a level: 1 − keep nearest-resized (PyTorch rule), ``[B, h, w, 1]``."""
  return 1.0 - ops.resize_nearest(keep.astype(jnp.float32)[..., None], tuple(size))


def _check_mask(features: jax.Array, mask: jax.Array, fn: str) -> None:
  if mask.ndim != 4 or mask.shape[:3] != features.shape[:3] or mask.shape[3] not in (
      1, features.shape[3]):
    raise ValueError(
        f"mfm_jax/uda/mfm.py:{fn}: mask {mask.shape} does not fit features {features.shape}; "
        f"build it with level_mask(cells, features.shape[1:3]).")


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


def patchify_targets(images: jax.Array, grid: int | tuple[int, int] = DEFAULT_GRID,
                     eps: float = 1e-6) -> jax.Array:
  """MAE-style per-cell normalised pixel targets ``[B, gh, gw, ph * pw * 3]``.

  The image ``[B, H, W, 3]`` is split into a gh x gw grid of ph x pw cells (H, W divisible),
  flattened (row, column, channel) per cell, and each cell is normalised by its own mean and
  (unbiased, as torch's ``var``) variance: (x - mean) / sqrt(var + eps), eps = 1e-6 as in MAE.
  """
  gh, gw = (grid, grid) if isinstance(grid, int) else tuple(grid)
  batch, height, width, chans = images.shape
  if height % gh or width % gw:
    raise ValueError(
        f"mfm_jax/uda/mfm.py:patchify_targets: image {height}x{width} is not divisible by the "
        f"token grid {gh}x{gw}.")
  ph, pw = height // gh, width // gw
  x = images.astype(jnp.float32).reshape(batch, gh, ph, gw, pw, chans)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, gh, gw, ph * pw * chans)
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
