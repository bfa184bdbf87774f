"""ClassMix masks and mixing (DACS, uda_reference.md §2.4).

Reference quirk kept on purpose: the candidate classes of EVERY sample are the unique labels of
the WHOLE source batch (``torch.unique(labels)`` inside the per-sample loop), including 255 when
ignore pixels are present. Each sample independently picks ceil(n/2) of them without
replacement; its mask is the set of its own source pixels whose label was picked.

Under jit the unique set is a fixed-size presence vector over the 256 possible uint8 values, and
"choose k without replacement" is "the k present values with the smallest random keys".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NUM_VALUES = 256  # labels are uint8 train ids 0..18 plus 255 (ignore)


def class_presence(labels: jax.Array) -> jax.Array:
  """bool ``[256]``: which label values occur anywhere in ``labels`` (values clipped to 0..255)."""
  flat = jnp.clip(labels.reshape(-1), 0, _NUM_VALUES - 1).astype(jnp.int32)
  return jnp.zeros((_NUM_VALUES,), jnp.bool_).at[flat].set(True)


def chosen_classes(rng: jax.Array, present: jax.Array, batch: int) -> jax.Array:
  """bool ``[batch, 256]``: per sample, ceil(n/2) of the n present values, uniformly at random.

  n = present.sum(); the count (n + n % 2) / 2 is the reference's ``int((n + n % 2) / 2)``.
  """
  n = jnp.sum(present.astype(jnp.int32))
  k = (n + n % 2) // 2
  keys = jax.random.uniform(rng, (batch, _NUM_VALUES))
  # Absent values get a key above every present one so they are ranked last.
  keys = jnp.where(present[None, :], keys, 2.0)
  rank = jnp.argsort(jnp.argsort(keys, axis=-1), axis=-1)
  return (rank < k) & present[None, :]


def class_mix_masks(rng: jax.Array, source_labels: jax.Array) -> jax.Array:
  """ClassMix masks ``f32 [B, H, W]`` (1 = take the source pixel) from source labels ``[B,H,W]``."""
  if source_labels.ndim != 3:
    raise ValueError(
        f"mfm_jax/uda/classmix.py: source_labels must be [B,H,W], got {source_labels.shape}.")
  batch = source_labels.shape[0]
  present = class_presence(source_labels)
  chosen = chosen_classes(rng, present, batch)
  safe = jnp.clip(source_labels, 0, _NUM_VALUES - 1).astype(jnp.int32)
  mask = jax.vmap(lambda c, lab: c[lab])(chosen, safe)
  return mask.astype(jnp.float32)


def mix(mask: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """``mask * a + (1 - mask) * b`` (DACS ``one_mix``).

  ``mask`` is ``[B, H, W]`` (or already ``[B, H, W, 1]``); it is broadcast over a trailing channel
  axis when ``a`` has one more axis than the mask (images ``[B,H,W,3]``). Integer inputs (labels)
  are selected with ``where`` so they keep their dtype; float inputs follow the formula.
  """
  if a.shape != b.shape:
    raise ValueError(f"mfm_jax/uda/classmix.py: mix operands differ: {a.shape} vs {b.shape}.")
  if mask.ndim == a.ndim - 1:
    mask = mask[..., None]
  if mask.ndim != a.ndim:
    raise ValueError(
        f"mfm_jax/uda/classmix.py: mask shape {mask.shape} cannot broadcast to {a.shape}.")
  if jnp.issubdtype(a.dtype, jnp.integer) or a.dtype == jnp.bool_:
    return jnp.where(mask > 0.5, a, b)
  mask = mask.astype(a.dtype)
  return mask * a + (1 - mask) * b
