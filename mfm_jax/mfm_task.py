"""Masked Feature Modeling as an auxiliary task of the UDA step (mfm_method.md).

Forward (PAPER): encoder features f_t of the full image → random cell mask on a g×g latent grid
(ratio 0.4) → Rebuilder → residual fusion f_r = M⊙f_o + (1−M)⊙f_t → the ordinary decoder →
cross-entropy against the host method's pseudo-labels (λ = 1). Ablations (mask ratio, rebuild
on/off, objective, domain, freeze, levels) are config switches; ``OURS`` marks choices the paper
leaves open.

The Rebuilders are separate Flax modules (``params['rebuilder']``) so the deployed segmentor is
exactly the host model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mfm_jax import ops
from mfm_jax.host import SegmentationHost
from mfm_jax.models.rebuilder import Rebuilder
from mfm_jax.uda import mfm


@dataclasses.dataclass(frozen=True)
class MFMTask:
  """Builds the Rebuilder(s) and computes the MFM loss for one domain's batch."""

  cfg: ml_collections.ConfigDict  # config.mfm
  channels: tuple[int, ...]  # encoder channels per level
  image_size: tuple[int, int]  # (h, w) of the images fed to the encoder
  compute_dtype: Any = jnp.float32

  @property
  def levels(self) -> tuple[int, ...]:
    # OURS: the deepest stage by default; 'all' masks every level the decoder reads.
    return (len(self.channels) - 1,) if self.cfg.levels == "last" else tuple(
        range(len(self.channels)))

  @property
  def pixel_dim(self) -> int:
    g = self.cfg.grid_size
    h, w = self.image_size
    if h % g or w % g:
      raise ValueError(f"config.mfm.objective='pixel' needs the crop {self.image_size} divisible "
                       f"by config.mfm.grid_size={g}.")
    return (h // g) * (w // g) * 3

  def rebuilder(self, level: int):
    pixel = self.cfg.objective == "pixel" and level == self.levels[-1]
    c = self.cfg
    return Rebuilder(out_channels=self.channels[level], embed_dim=c.embed_dim,
                     grid_size=c.grid_size, depth=c.depth, num_heads=c.num_heads,
                     mlp_ratio=c.mlp_ratio, pixel_dim=self.pixel_dim if pixel else 0,
                     dtype=self.compute_dtype)

  @property
  def has_params(self) -> bool:
    return bool(self.cfg.rebuild)

  def init(self, rng: jax.Array, features: list[jax.Array]) -> dict[str, Any]:
    """Initialises one Rebuilder per masked level from example features."""
    out = {}
    cell = jnp.zeros((features[0].shape[0], self.cfg.grid_size, self.cfg.grid_size), bool)
    for lvl in self.levels:
      rng, sub = jax.random.split(rng)
      out[f"level_{lvl}"] = self.rebuilder(lvl).init(sub, features[lvl], cell)["params"]
    return out

  def loss(self, rebuilder_params, host: SegmentationHost, variables, features, *, rng,
           labels=None, weights=None, teacher_features=None, images=None):
    """MFM loss for one batch → (loss, batch_stats).

    ``variables`` are the student's (their ``params`` may already be gradient-stopped by the
    caller for the freeze ablations). ``labels``/``weights`` are pseudo-labels (target) or
    ground truth (source) for the classification objective; ``teacher_features`` feed the
    feature-regression objective and ``images`` the pixel objective.
    """
    k_mask, k_dec = jax.random.split(rng)
    batch = features[0].shape[0]
    g = self.cfg.grid_size
    cell = mfm.cell_mask(k_mask, batch, g, self.cfg.mask_ratio)
    recon = list(features)
    masks = {}
    pixels = None
    for lvl in self.levels:
      f = features[lvl]
      m = mfm.level_mask(cell, f.shape[1:3]).astype(f.dtype)
      masks[lvl] = m
      if self.cfg.rebuild:
        out = self.rebuilder(lvl).apply({"params": rebuilder_params[f"level_{lvl}"]}, f, cell)
        if isinstance(out, tuple):
          out, pixels = out
        recon[lvl] = mfm.fuse(f, out.astype(f.dtype), m)
      else:
        recon[lvl] = mfm.mask_features(f, m)

    bs = variables.get("batch_stats")
    if self.cfg.objective == "classification":
      loss, bs = host.decode_loss(variables, recon, labels, weights, rng=k_dec)
    elif self.cfg.objective == "feature":
      # Teacher-feature reconstruction: regress the EMA teacher's features at masked cells.
      loss = jnp.mean(jnp.stack([
          mfm.feature_regression_loss(recon[l].astype(jnp.float32),
                                      jax.lax.stop_gradient(teacher_features[l]).astype(
                                          jnp.float32), masks[l]) for l in self.levels]))
    else:  # 'pixel': MAE-style regression of per-cell normalised input pixels.
      if pixels is None:
        raise ValueError("config.mfm.objective='pixel' needs config.mfm.rebuild=True.")
      # Cells of the image the encoder saw (HRDA context: the ×0.5 crop; else a no-op).
      target = mfm.patchify_targets(ops.resize_bilinear(images, self.image_size), g)
      loss = mfm.pixel_regression_loss(pixels.astype(jnp.float32), target, cell)
    return loss, bs
