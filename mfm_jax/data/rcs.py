"""Rare Class Sampling (DAFormer, uda_reference.md §2.5).

Class frequencies come from the per-image class pixel counts of the whole source set (at the
ORIGINAL label resolution): f_c = n_c / Σ n over the classes that occur, and

    P(c) = softmax((1 − f_c) / T),   T = 0.01 (``config.data.rcs.temperature``).

A sample is drawn as: class c ~ P, then a file uniformly among those with more than
``min_pixels`` (3000) pixels of c. The pipeline then re-draws the source crop up to 10 times
until it holds more than ``min_pixels · min_crop_ratio`` pixels of c (``crop_has_class``).

Deviation: the reference asserts that every occurring class has at least one file above
``min_pixels``; here such classes get probability 0 (the others are renormalised) and a warning
is logged, so small custom data sets still train.
"""

from __future__ import annotations

from absl import logging
import numpy as np

from mfm_jax.data.labels import NUM_CLASSES

RETRIES = 10  # the reference re-loads the source sample up to 10 times


def class_probabilities(class_stats: np.ndarray, temperature: float) -> np.ndarray:
  """``P(c) = softmax((1 − f_c) / T)`` over occurring classes; 0 for absent classes. [19]."""
  totals = np.asarray(class_stats, np.int64).sum(axis=0).astype(np.float64)
  present = totals > 0
  if not present.any():
    raise ValueError("Rare Class Sampling: the source set has no labelled pixels at all "
                     "(class_pixels are all 0); disable config.data.rcs.enabled.")
  freq = totals[present] / totals[present].sum()
  logits = (1.0 - freq) / temperature
  p = np.exp(logits - logits.max())
  probs = np.zeros(totals.shape, np.float64)
  probs[present] = p / p.sum()
  return probs


class RareClassSampler:
  """Draws ``(source index, class)`` pairs with DAFormer's Rare Class Sampling.

  Attributes:
    probs: float64 ``[19]`` sampling probability of each class (0 for classes that never occur
      or have no file with more than ``min_pixels`` pixels).
    files: per class, int64 indices of the files with more than ``min_pixels`` pixels of it.
  """

  def __init__(self, class_stats: np.ndarray, temperature: float, min_pixels: int):
    """``class_stats``: int64 ``[N, 19]`` pixels per class per source image (record order)."""
    stats = np.asarray(class_stats)
    if stats.ndim != 2 or stats.shape[1] != NUM_CLASSES or len(stats) == 0:
      raise ValueError(f"class_stats must be [N>0, {NUM_CLASSES}], got shape {stats.shape}.")
    if temperature <= 0:
      raise ValueError(f"config.data.rcs.temperature must be > 0, got {temperature}.")
    probs = class_probabilities(stats, temperature)
    self.files = [np.flatnonzero(stats[:, c] > min_pixels) for c in range(NUM_CLASSES)]
    dropped = [c for c in range(NUM_CLASSES) if probs[c] > 0 and not len(self.files[c])]
    if dropped:
      logging.warning("Rare Class Sampling: classes %s occur but no source image has more than "
                      "%d pixels of them; they are never sampled.", dropped, min_pixels)
      probs[dropped] = 0.0
      if probs.sum() == 0:
        raise ValueError(f"Rare Class Sampling: no source image has more than {min_pixels} "
                         "pixels of any class; lower config.data.rcs.min_pixels.")
      probs /= probs.sum()
    self.probs = probs
    self.min_pixels = int(min_pixels)

  def sample(self, rng: np.random.Generator) -> tuple[int, int]:
    """Returns ``(index, class)``: c ~ probs, index uniform among ``files[c]``."""
    c = int(rng.choice(NUM_CLASSES, p=self.probs))
    files = self.files[c]
    return int(files[rng.integers(len(files))]), c


def crop_has_class(label: np.ndarray, cls: int, min_pixels: int, min_crop_ratio: float) -> bool:
  """The RCS crop test: more than ``min_pixels · min_crop_ratio`` pixels of ``cls``."""
  return int(np.count_nonzero(label == cls)) > min_pixels * min_crop_ratio
