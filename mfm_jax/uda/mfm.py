"""Masked Feature Modeling (MFM): the one home of the MFM loss, its masks and its ablations.

Forward (mfm_method.md, OFFICIAL = the authors' released ``rebuilder.py``): encoder features of
the clean target crop → a Bernoulli keep mask on the token grid (p = ``mfm.mask_ratio``, drawn
from the step's RNG stream) → ``Rebuilder`` (last level embedded, masked tokens replaced by
the mask token, 2 blocks, per-level projectors, fusion at every level) → the ordinary decoder →
cross-entropy against the host method's pseudo-labels with their weights, × λ = ``mfm.weight``.

Ablations (config switches, mfm_method.md "Ablations"): ``mask_ratio``; ``rebuild=False``
(masked cells zeroed at every masked level, no Rebuilder); ``objective`` classification |
feature (regress the EMA teacher's features at masked positions) | pixel (MAE-style normalised
pixels per masked token); ``domain`` target | source | both; ``freeze`` none | encoder |
decoder (for the MFM term only); ``levels`` all (release) | last (mask only the last level, the
pre-release behaviour); ``mask_strategy`` random (release) | uncertainty (OURS, see
``mfm_jax.uda.mfm.guided_keep_mask``).

The Rebuilder is a separate Flax module (``params['rebuilder']``), so the deployed segmentor is
exactly the net model.

Masks (OFFICIAL, the authors' released ``rebuilder.py``, uda_reference.md §7.2b): every token
of the grid is kept when an independent uniform draw exceeds the mask ratio (``keep = U(0, 1) >
0.4``, 1 = visible, 0 = masked: ≈40 % masked, not an exact count), drawn anew for every sample;
the keep mask is nearest-resized to every masked feature level. Here the draw comes from the
train step's RNG stream, so a run replays exactly. OURS (configurable): the token grid at crop
sizes other than 512 (``token_grid``), the "uncertainty" strategy (``guided_keep_mask``) and the
ablation objectives.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mfm_jax import ops
from mfm_jax.models.network import SegmentationNetwork
from mfm_jax.models.network import variables
from mfm_jax.models.rebuilder import Rebuilder


def token_grid(last_level_size: tuple[int, int], grid_size: int
               ) -> tuple[int, int]:
  """The token grid (gh, gw) for a last encoder level of ``last_level_size``.

  OURS, the rule for crops other than 512: ``min(grid_size, level size)`` per axis. At a 512
  crop the MiT's last level is 16×16 and DeepLabV2's 64×64 → 16×16 as released; at 256, 8×8.
  """
  if grid_size <= 0:
    raise ValueError(f"mfm_jax/uda/mfm.py: grid_size must be > 0, got {grid_size}.")
  return (min(grid_size, int(last_level_size[0])), min(grid_size, int(last_level_size[1])))


def keep_mask(rng: jax.Array, batch: int, grid: tuple[int, int],
              ratio: float) -> jax.Array:
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


def guided_keep_mask(rng: jax.Array, scores: jax.Array, ratio: float,
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


def patchify_targets(images: jax.Array, grid: int | tuple[int, int],
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


# ---------------------------------------------------------------------------------------------
# The task: Rebuilder + loss terms of one train step

def _freeze(model_params, part: str):
  """Stops gradients into one part of the segmentor (MFM freeze ablation)."""
  return {k: (jax.lax.stop_gradient(v) if k == part else v) for k, v in model_params.items()}


@dataclasses.dataclass(frozen=True)
class MFMTask:
  """Builds the Rebuilder and computes the MFM loss terms of one train step."""

  cfg: ml_collections.ConfigDict  # config.mfm
  channels: tuple[int, ...]  # encoder channels per level
  level_sizes: tuple[tuple[int, int], ...]  # encoder level sizes of the MFM images
  image_size: tuple[int, int]  # (h, w) of the images fed to the encoder
  single_projector: bool = False  # DeepLabV2 head: one projector for the last level (release)
  compute_dtype: Any = jnp.float32

  @property
  def grid(self) -> tuple[int, int]:
    return token_grid(self.level_sizes[-1], int(self.cfg.grid_size))

  @property
  def levels(self) -> tuple[int, ...]:
    last = len(self.channels) - 1
    if self.single_projector or self.cfg.levels == "last":
      return (last,)
    return tuple(range(len(self.channels)))

  @property
  def pixel_dim(self) -> int:
    if self.cfg.objective != "pixel":
      return 0
    (h, w), (gh, gw) = self.image_size, self.grid
    return (h // gh) * (w // gw) * 3

  @property
  def has_params(self) -> bool:
    return bool(self.cfg.rebuild)

  def module(self) -> Rebuilder:
    c = self.cfg
    return Rebuilder(channels=tuple(self.channels), levels=self.levels,
                     single_projector=self.single_projector, embed_dim=int(c.embed_dim),
                     depth=int(c.depth), num_heads=int(c.num_heads),
                     mlp_ratio=float(c.mlp_ratio), pixel_dim=self.pixel_dim,
                     upsample_impl=str(c.upsample_impl), dtype=self.compute_dtype)

  def init(self, rng: jax.Array, features: list[jax.Array]) -> dict[str, Any]:
    """Rebuilder parameters from example features."""
    keep = jnp.ones((features[0].shape[0], *self.grid), jnp.float32)
    return self.module().init(rng, features, keep)["params"]

  def draw_keep(self, rng: jax.Array, batch: int, teacher_logits=None) -> jax.Array:
    """The step's keep mask ``[B, gh, gw]`` (1 = visible) under ``mfm.mask_strategy``."""
    if self.cfg.mask_strategy == "uncertainty":
      scores = cell_uncertainty(jax.nn.softmax(teacher_logits.astype(jnp.float32)),
                                    self.grid)
      return guided_keep_mask(rng, scores, self.cfg.mask_ratio, self.cfg.mask_guidance)
    return keep_mask(rng, batch, self.grid, self.cfg.mask_ratio)

  def rebuild(self, rebuilder_params, features, keep):
    """Masked + rebuilt features (every level in ``self.levels``) → (features, pixels|None)."""
    features = list(features)
    got = tuple(tuple(f.shape[1:3]) for f in features)
    if got != tuple(self.level_sizes):
      raise ValueError(f"mfm_jax/uda/mfm.py: encoder levels {got} differ from the sizes the MFM "
                       f"task was built for {self.level_sizes} (image size {self.image_size}).")
    if self.cfg.rebuild:
      return self.module().apply({"params": rebuilder_params}, features, keep)
    for lvl in self.levels:  # 'rebuild off': masked cells zeroed, no Rebuilder
      features[lvl] = mask_features(features[lvl], level_mask(keep, got[lvl]))
    return features, None

  def loss(self, rebuilder_params, net: SegmentationNetwork, variables, features, *, rng,
           labels=None, weights=None, teacher_features=None, images=None, teacher_logits=None):
    """MFM loss for one batch → (loss, batch_stats).

    ``variables`` are the student's (their ``params`` may already be gradient-stopped for the
    freeze ablations). ``labels``/``weights``: pseudo-labels (target) or ground truth (source)
    for the classification objective; ``teacher_features`` feed the feature objective,
    ``images`` the pixel objective, ``teacher_logits`` the 'uncertainty' mask strategy.
    """
    k_mask, k_dec = jax.random.split(rng)
    keep = self.draw_keep(k_mask, features[0].shape[0], teacher_logits)
    recon, pixels = self.rebuild(rebuilder_params, features, keep)
    bs = variables.get("batch_stats")
    objective = self.cfg.objective
    if objective == "classification":
      return net.mfm_decode_loss(variables, recon, labels, weights, rng=k_dec)
    if objective == "feature":
      # Regress the EMA teacher's features at the masked positions of every masked level.
      per_level = [feature_regression_loss(
          recon[lvl].astype(jnp.float32), teacher_features[lvl].astype(jnp.float32),
          level_mask(keep, recon[lvl].shape[1:3])) for lvl in self.levels]
      return jnp.mean(jnp.stack(per_level)), bs
    # 'pixel': per masked token, the normalised pixels of its cell of the encoder's image
    # (HRDA context: the ×0.5 crop; else the crop itself).
    target = patchify_targets(ops.resize_bilinear(images, self.image_size), self.grid)
    return pixel_regression_loss(pixels.astype(jnp.float32), target, keep < 0.5), bs

  def terms(self, params, net: SegmentationNetwork, batch_stats, *, keys, target, source
            ) -> tuple[dict[str, jax.Array], Any]:
    """The MFM loss terms of one step → ({'mfm_target'?, 'mfm_source'?}, batch_stats).

    Args:
      params: the differentiated ``{'model', 'rebuilder'?}`` parameters.
      net: the segmentation network.
      batch_stats: the student's BatchNorm statistics so far in this step.
      keys: the step's named RNG streams (``mfm_tgt_enc``, ``mfm_tgt``, ``mfm_src``).
      target: dict(images, labels, weights, teacher_features, teacher_logits, features?) of the
        target batch (pseudo-labels and the EMA teacher's outputs; ``None`` where unused);
        ``features``, when given, are the student's train-mode encoder features of ``images``
        (the step's joint encoder call), else MFM encodes them itself.
      source: dict(images, labels, features, teacher_features) of the source batch
        (``features`` from the source CE forward).
    """
    c = self.cfg
    model_p = _freeze(params["model"], "decode_head") if c.freeze == "decoder" else params["model"]
    out, bs = {}, batch_stats
    for name, batch, key in (("target", target, "mfm_tgt"), ("source", source, "mfm_src")):
      if c.domain not in (name, "both"):
        continue
      if name == "target" and batch.get("features") is not None:
        feats = batch["features"]  # the step's joint encoder call (model.joint_encoder)
      elif name == "target":  # a fresh train-mode pass over the clean target crop
        feats, bs = net.mfm_encode(variables(params["model"], bs), batch["images"],
                                   train=True, rng=keys["mfm_tgt_enc"])
      else:  # the source CE forward's features
        feats = batch["features"]
      if c.freeze == "encoder":
        feats = jax.lax.stop_gradient(feats)
      loss, bs = self.loss(params.get("rebuilder"), net, variables(model_p, bs), feats,
                           rng=keys[key], labels=batch["labels"], weights=batch.get("weights"),
                           teacher_features=batch["teacher_features"], images=batch["images"],
                           teacher_logits=batch.get("teacher_logits"))
      out[f"mfm_{name}"] = c.weight * loss
    return out, bs
