"""The segmentation network as the UDA step sees it: forwards that return losses and features.

The train step never calls Flax modules directly; it calls a ``SegmentationHost``. This keeps
the step identical for the plain encoder-decoder (DAFormer, DeepLab) and for HRDA, whose
multi-resolution forward and fused loss live in ``mfm_jax.models.hrda`` behind the same methods.

Variables are Flax variable dicts ``{'params': ..., 'batch_stats': ...}``; every method returns
the updated ``batch_stats`` (BatchNorm in train mode updates running statistics on every
forward, as the reference does, uda_reference.md §2.6b).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mfm_jax import ops
from mfm_jax.uda import losses

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class SegmentationHost:
  """Plain encoder-decoder host (DAFormer / DeepLab): logits at stride 4 (or 8), CE at label size."""

  model: nn.Module  # EncoderDecoder

  def _apply(self, variables, x, *, method, train, deterministic, rng):
    rngs = {"dropout": rng} if (rng is not None and not deterministic) else {}
    mutable = ["batch_stats"] if (train and variables.get("batch_stats")) else False
    out = self.model.apply(variables, x, train=train, deterministic=deterministic,
                           method=method, rngs=rngs, mutable=mutable)
    if mutable:
      out, updates = out
      return out, updates.get("batch_stats", {})
    return out, variables.get("batch_stats")

  def encode(self, variables: Variables, images: jax.Array, *, train: bool = True,
             deterministic: bool | None = None, rng=None):
    """Multi-scale encoder features → (features, batch_stats)."""
    deterministic = (not train) if deterministic is None else deterministic
    return self._apply(variables, images, method="encode", train=train,
                       deterministic=deterministic, rng=rng)

  def decode(self, variables: Variables, features, *, train: bool = True,
             deterministic: bool | None = None, rng=None):
    """Decoder on (possibly reconstructed) features → (logits, batch_stats)."""
    deterministic = (not train) if deterministic is None else deterministic
    return self._apply(variables, features, method="decode", train=train,
                       deterministic=deterministic, rng=rng)

  def decode_loss(self, variables: Variables, features, labels, weights=None, *, rng=None):
    """Train-mode decoder + CE (the MFM classification objective) → (loss, batch_stats)."""
    logits, bs = self.decode(variables, features, train=True, rng=rng)
    return losses.cross_entropy(logits, labels, weights), bs

  def forward_loss(self, variables: Variables, images, labels, weights=None, *, rng=None):
    """Student train-mode forward + CE → (loss, features, batch_stats).

    ``features`` are the encoder features used by the ImageNet feature distance.
    """
    r_enc, r_dec = (None, None) if rng is None else jax.random.split(rng)
    feats, bs = self.encode(variables, images, train=True, rng=r_enc)
    variables = {**variables, "batch_stats": bs} if bs is not None else variables
    loss, bs = self.decode_loss(variables, feats, labels, weights, rng=r_dec)
    return loss, feats, bs

  def fd_encode(self, variables: Variables, images: jax.Array, *, train: bool = False):
    """Encoder features for the ImageNet feature distance (HRDA: always the LR context)."""
    return self.encode(variables, images, train=train, deterministic=True)

  def fd_features(self, features):
    """The encoder level the ImageNet feature distance compares (last stage, §2.5)."""
    return features[-1]

  def predict(self, variables: Variables, images, *, train: bool = False):
    """Deterministic logits bilinearly resized to the input size → (logits, batch_stats).

    ``train=True`` is the EMA teacher's mode: BN with batch statistics, dropout off (§2.2).
    """
    feats, bs = self.encode(variables, images, train=train, deterministic=True)
    if bs is not None:
      variables = {**variables, "batch_stats": bs}
    logits, bs = self.decode(variables, feats, train=train, deterministic=True)
    return ops.resize_bilinear(logits.astype(jnp.float32), images.shape[1:3]), feats, bs
