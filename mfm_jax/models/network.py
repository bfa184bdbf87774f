"""The segmentation network as the UDA step sees it: forwards that return losses and features.

The train step never calls Flax modules directly; it calls a ``SegmentationNetwork``. This keeps
the step identical for the plain encoder-decoder (DAFormer, DeepLab) and for HRDA, whose
multi-resolution forward and fused loss live in ``mfm_jax.models.hrda.HRDANetwork`` behind the
same methods.

Variables are Flax variable dicts ``{'params': ..., 'batch_stats': ...}``; every method returns
the updated ``batch_stats`` (BatchNorm in train mode updates running statistics on every
forward, as the reference does, uda_reference.md §2.6b).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from mfm_jax import ops
from mfm_jax.uda import losses

Variables = dict[str, Any]


def variables(params, batch_stats) -> Variables:
  """Flax variables from a parameter tree and BatchNorm statistics (``None`` → none)."""
  return {"params": params, "batch_stats": batch_stats if batch_stats is not None else {}}


@dataclasses.dataclass(frozen=True)
class SegmentationNetwork:
  """Plain encoder-decoder network (DAFormer / DeepLab): logits at stride 4 (or 8), CE at label
  size."""

  model: nn.Module  # models.segmentor.EncoderDecoder (HRDA: models.hrda_head.HRDASegmentor)
  # True when the encoder treats every image on its own (MiT: LayerNorm, per-image attention;
  # not DeepLab's ResNet, whose train-mode BatchNorm takes statistics over the batch): then
  # several batches may share one encoder call (``encode_many``) without changing any image's
  # features.
  per_image_encoder: bool = dataclasses.field(default=False, kw_only=True)
  # The model method that runs the decode head on one scale's features.
  decode_method: ClassVar[str] = "decode"

  def apply(self, variables: Variables, *args, method: str, train: bool, deterministic: bool,
            rng=None):
    """``model.apply(..., method=method)`` → (output, batch_stats); BN statistics are mutable
    in train mode, dropout draws from ``rng`` unless ``deterministic``."""
    rngs = {"dropout": rng} if (rng is not None and not deterministic) else {}
    mutable = ["batch_stats"] if (train and variables.get("batch_stats")) else False
    out = self.model.apply(variables, *args, train=train, deterministic=deterministic,
                           method=method, rngs=rngs, mutable=mutable)
    if mutable:
      out, updates = out
      return out, updates.get("batch_stats", {})
    return out, variables.get("batch_stats")

  def encode(self, variables: Variables, images: jax.Array, *, train: bool = True,
             deterministic: bool | None = None, rng=None):
    """Multi-scale encoder features of ``images`` → (features, batch_stats)."""
    deterministic = (not train) if deterministic is None else deterministic
    return self.apply(variables, images, method="encode", train=train,
                      deterministic=deterministic, rng=rng)

  def decode(self, variables: Variables, features, *, train: bool = True,
             deterministic: bool | None = None, rng=None):
    """Decoder on (possibly rebuilt) features → (logits, batch_stats)."""
    deterministic = (not train) if deterministic is None else deterministic
    return self.apply(variables, list(features), method=self.decode_method, train=train,
                      deterministic=deterministic, rng=rng)

  def forward_loss(self, variables: Variables, images, labels, weights=None, *, rng=None):
    """Student train-mode forward + CE → (loss, features, batch_stats).

    ``features`` are the encoder features used by the ImageNet feature distance and by MFM on
    the source domain.
    """
    r_enc, r_dec = (None, None) if rng is None else jax.random.split(rng)
    feats, bs = self.encode(variables, images, train=True, rng=r_enc)
    variables = {**variables, "batch_stats": bs} if bs is not None else variables
    loss, bs = self.decode_loss(variables, feats, labels, weights, rng=r_dec)
    return loss, feats, bs

  def decode_loss(self, variables: Variables, features, labels, weights=None, *, rng=None):
    """The second half of ``forward_loss``: train-mode decoder + CE on encoder ``features``
    (e.g. from ``encode_many``) → (loss, batch_stats). ``rng`` is the decoder's dropout key."""
    logits, bs = self.decode(variables, features, train=True, rng=rng)
    return losses.cross_entropy(logits, labels, weights), bs

  def encode_many(self, variables: Variables, images: list[jax.Array], *, rng=None):
    """One train-mode encoder call over several same-shape batches → (features of each batch,
    batch_stats). Only for a ``per_image_encoder``: each image's features are those of its own
    pass, up to the drop-path draws (one stream for the call instead of one per batch).

    The batches are interleaved image by image (``stack(axis=1)``) rather than concatenated, so
    under data sharding every device's rows of the joint batch are its own rows of each batch:
    no image moves between devices. The step's FLOPs are unchanged; the compiled program holds
    one encoder (and one encoder backward) instead of one per batch, which is what shortens the
    TPU compile (README, "Compile time").
    """
    if not self.per_image_encoder:
      raise ValueError("SegmentationNetwork.encode_many: this encoder mixes images of a batch "
                       "(train-mode BatchNorm); encode each batch on its own.")
    feats, bs = self.encode(variables, ops.interleave_batches(images), train=True, rng=rng)
    per_level = [ops.split_interleaved(f, len(images)) for f in feats]
    return [list(level_feats) for level_feats in zip(*per_level)], bs

  def fd_encode(self, variables: Variables, images: jax.Array, *, train: bool = False):
    """Encoder features for the ImageNet feature distance (HRDA: always the LR context)."""
    return self.encode(variables, images, train=train, deterministic=True)

  def fd_features(self, features):
    """The encoder level the ImageNet feature distance compares (last stage, §2.5)."""
    return features[-1]

  # MFM's view of the network (mfm_jax/uda/mfm.py): which features are masked and how the
  # decoder's CE is taken on them. HRDA overrides both (context or detail features).

  def mfm_encode(self, variables: Variables, images: jax.Array, *, train: bool = True,
                 deterministic: bool | None = None, rng=None):
    """The encoder features MFM masks and rebuilds → (features, batch_stats)."""
    return self.encode(variables, images, train=train, deterministic=deterministic, rng=rng)

  def mfm_decode_loss(self, variables: Variables, features, labels, weights=None, *, rng=None):
    """Train-mode decoder on rebuilt features + CE (MFM classification objective) →
    (loss, batch_stats)."""
    return self.decode_loss(variables, features, labels, weights, rng=rng)

  def predict(self, variables: Variables, images, *, train: bool = False):
    """Deterministic logits bilinearly resized to the input size → (logits, features,
    batch_stats).

    ``train=True`` is the EMA teacher's mode: BN with batch statistics, dropout off (§2.2).
    """
    feats, bs = self.encode(variables, images, train=train, deterministic=True)
    if bs is not None:
      variables = {**variables, "batch_stats": bs}
    logits, bs = self.decode(variables, feats, train=train, deterministic=True)
    return ops.resize_bilinear(logits.astype(jnp.float32), images.shape[1:3]), feats, bs
