"""Masked Feature Modeling as an auxiliary task of the UDA step: the one home of the MFM loss.

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
exactly the host model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mfm_jax import ops
from mfm_jax.models.network import SegmentationHost
from mfm_jax.models.rebuilder import Rebuilder
from mfm_jax.uda import mfm


def _vars(params, batch_stats) -> dict[str, Any]:
  return {"params": params, "batch_stats": batch_stats if batch_stats is not None else {}}


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
    return mfm.token_grid(self.level_sizes[-1], int(self.cfg.grid_size))

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
                     dtype=self.compute_dtype)

  def init(self, rng: jax.Array, features: list[jax.Array]) -> dict[str, Any]:
    """Rebuilder parameters from example features."""
    keep = jnp.ones((features[0].shape[0], *self.grid), jnp.float32)
    return self.module().init(rng, features, keep)["params"]

  def draw_keep(self, rng: jax.Array, batch: int, teacher_logits=None) -> jax.Array:
    """The step's keep mask ``[B, gh, gw]`` (1 = visible) under ``mfm.mask_strategy``."""
    if self.cfg.mask_strategy == "uncertainty":
      scores = mfm.cell_uncertainty(jax.nn.softmax(teacher_logits.astype(jnp.float32)),
                                    self.grid)
      return mfm.guided_keep_mask(rng, scores, self.cfg.mask_ratio, self.cfg.mask_guidance)
    return mfm.keep_mask(rng, batch, self.grid, self.cfg.mask_ratio)

  def rebuild(self, rebuilder_params, features, keep):
    """Masked + rebuilt features (every level in ``self.levels``) → (features, pixels|None)."""
    features = list(features)
    got = tuple(tuple(f.shape[1:3]) for f in features)
    if got != tuple(self.level_sizes):
      raise ValueError(f"mfm_task.py: encoder levels {got} differ from the sizes the MFM task "
                       f"was built for {self.level_sizes} (image size {self.image_size}).")
    if self.cfg.rebuild:
      return self.module().apply({"params": rebuilder_params}, features, keep)
    for lvl in self.levels:  # 'rebuild off': masked cells zeroed, no Rebuilder
      features[lvl] = mfm.mask_features(features[lvl], mfm.level_mask(keep, got[lvl]))
    return features, None

  def loss(self, rebuilder_params, host: SegmentationHost, variables, features, *, rng,
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
      return host.decode_loss(variables, recon, labels, weights, rng=k_dec)
    if objective == "feature":
      # Regress the EMA teacher's features at the masked positions of every masked level.
      per_level = [mfm.feature_regression_loss(
          recon[lvl].astype(jnp.float32), teacher_features[lvl].astype(jnp.float32),
          mfm.level_mask(keep, recon[lvl].shape[1:3])) for lvl in self.levels]
      return jnp.mean(jnp.stack(per_level)), bs
    # 'pixel': per masked token, the normalised pixels of its cell of the encoder's image
    # (HRDA context: the ×0.5 crop; else the crop itself).
    target = mfm.patchify_targets(ops.resize_bilinear(images, self.image_size), self.grid)
    return mfm.pixel_regression_loss(pixels.astype(jnp.float32), target, keep < 0.5), bs

  def terms(self, params, host: SegmentationHost, batch_stats, *, keys, target, source
            ) -> tuple[dict[str, jax.Array], Any]:
    """The MFM loss terms of one step → ({'mfm_target'?, 'mfm_source'?}, batch_stats).

    Args:
      params: the differentiated ``{'model', 'rebuilder'?}`` parameters.
      host: the segmentation host.
      batch_stats: the student's BatchNorm statistics so far in this step.
      keys: the step's named RNG streams (``mfm_tgt_enc``, ``mfm_tgt``, ``mfm_src``).
      target: dict(images, labels, weights, teacher_features, teacher_logits) of the target
        batch (pseudo-labels and the EMA teacher's outputs; ``None`` where unused).
      source: dict(images, labels, features, teacher_features) of the source batch
        (``features`` from the source CE forward).
    """
    c = self.cfg
    model_p = _freeze(params["model"], "decode_head") if c.freeze == "decoder" else params["model"]
    rb = params.get("rebuilder")
    out, bs = {}, batch_stats
    if c.domain in ("target", "both"):
      feats, bs = host.encode(_vars(params["model"], bs), target["images"], train=True,
                              rng=keys["mfm_tgt_enc"])
      if c.freeze == "encoder":
        feats = jax.lax.stop_gradient(feats)
      loss, bs = self.loss(rb, host, _vars(model_p, bs), feats, rng=keys["mfm_tgt"],
                           labels=target["labels"], weights=target["weights"],
                           teacher_features=target["teacher_features"],
                           images=target["images"], teacher_logits=target["teacher_logits"])
      out["mfm_target"] = c.weight * loss
    if c.domain in ("source", "both"):
      feats = source["features"]
      if c.freeze == "encoder":
        feats = jax.lax.stop_gradient(feats)
      loss, bs = self.loss(rb, host, _vars(model_p, bs), feats, rng=keys["mfm_src"],
                           labels=source["labels"], weights=None,
                           teacher_features=source["teacher_features"], images=source["images"])
      out["mfm_source"] = c.weight * loss
    return out, bs
