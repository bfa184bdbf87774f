"""Config checks that need the model or data tables (called by ``config_lib.validate``).

Each of these values used to pass validation, create workdir files, and only then fail deep
inside the data pipeline or the traced step with a message that did not name the key: model
and dataset names, crop sizes the network cannot divide, the HRDA crop/stride rules, and MIC
block sizes. ``check`` raises ``ValueError`` naming the key (``validate`` turns it into a
``ConfigError``).
"""

from __future__ import annotations

import math

import ml_collections

# Datasets without a validation split cannot be evaluated on (config.data.target).
_TRAIN_ONLY = ("gta5", "synthia", "synthetic_source")


def _check_names(c: ml_collections.ConfigDict) -> None:
  from mfm_jax.data import splits  # pylint: disable=g-import-not-at-top
  from mfm_jax.models import segmentor  # pylint: disable=g-import-not-at-top
  for key, value, known in (("model.backbone", c.model.backbone, segmentor.BACKBONES),
                            ("model.head", c.model.head, segmentor.HEADS),
                            ("data.source", c.data.source, splits.RESOLVABLE),
                            ("data.target", c.data.target, splits.RESOLVABLE)):
    if value not in known:
      raise ValueError(f"config.{key}={value!r} is unknown; choose one of {tuple(known)}.")
  if c.data.target in _TRAIN_ONLY:
    raise ValueError(f"config.data.target={c.data.target!r} has no validation split to "
                     "evaluate on; use a target domain such as 'cityscapes'.")
  for name in {c.data.source, c.data.target}:
    if name.startswith("folder_"):
      key = "source_dir" if name == "folder_source" else "target_dir"
      if not c.data.folder[key]:
        raise ValueError(f"config.data.folder.{key} is empty but the config uses {name!r}.")


def _check_crop(c: ml_collections.ConfigDict) -> None:
  from mfm_jax.models import segmentor  # pylint: disable=g-import-not-at-top
  crop = tuple(c.data.crop_size)
  stride = segmentor.output_stride(c.model.backbone)
  if c.model.hrda.enabled:
    from mfm_jax.models import hrda  # pylint: disable=g-import-not-at-top
    hrda.check_config(c)  # ValueErrors naming config.model.hrda.* / config.data.crop_size
    if c.uda.fd.enabled and c.uda.fd.weight > 0:
      # The feature distance pools the crop's labels onto the context features' grid, which
      # must divide the crop (uda/feature_distance.py).
      context = tuple(hrda.lr_size(crop, min(c.model.hrda.scales)))
      cells = tuple(math.ceil(s / stride) for s in context)
      if any(s % n for s, n in zip(crop, cells)):
        raise ValueError(
            f"config.data.crop_size={crop!r}: the context features ({context} px at stride "
            f"{stride}) are {cells} cells, which must divide the crop (feature distance); "
            f"use a crop that is a multiple of {int(stride / min(c.model.hrda.scales))}.")
  elif any(s % stride for s in crop):
    raise ValueError(
        f"config.data.crop_size={crop!r} must be a multiple of {stride}, the output stride of "
        f"config.model.backbone={c.model.backbone!r}; e.g. "
        f"{tuple(max(stride, s // stride * stride) for s in crop)}.")


def _check_blocks(c: ml_collections.ConfigDict) -> None:
  crop = tuple(c.data.crop_size)
  if c.uda.enabled and c.uda.mic.enabled and c.uda.mic.block_size > min(crop):
    raise ValueError(f"config.uda.mic.block_size={c.uda.mic.block_size} is larger than the "
                     f"crop {crop}: MIC would mask whole images (reference: crop / 16).")
  if c.eval.mode == "slide" and any(s > k for s, k in zip(c.eval.stride, c.eval.crop_size)):
    raise ValueError(f"config.eval.stride={tuple(c.eval.stride)!r} exceeds "
                     f"config.eval.crop_size={tuple(c.eval.crop_size)!r}: windows would leave "
                     "pixels unpredicted.")


def check(c: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` naming the first key whose value would fail later."""
  _check_names(c)
  _check_crop(c)
  _check_blocks(c)
