"""Config validation: every check of a config value, run before anything is built or written.

``validate(config)`` raises ``ConfigError`` naming the first invalid key: choices, ranges, sizes,
model and dataset names, crop sizes the network cannot divide, the HRDA crop/stride rules, MIC
block sizes, the optimizer's parameter groups and which MFM ablation combinations are meaningful
(mfm_method.md "Ablations"). Builders (models, data, optimizer) trust a validated config.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from mfm_jax.runtime import errors

_CHOICES = {
    "model.compute_dtype": ("float32", "bfloat16"),
    "model.depthwise_impl": ("auto", "xla", "shift"),
    "uda.mix": ("class", "none"),
    "mfm.objective": ("classification", "feature", "pixel"),
    "mfm.domain": ("target", "source", "both"),
    "mfm.freeze": ("none", "encoder", "decoder"),
    "mfm.levels": ("last", "all"),
    "mfm.mask_strategy": ("random", "uncertainty"),
    "mfm.upsample_impl": ("transpose", "subpixel"),
    "eval.mode": ("whole", "slide"),
    "eval.which": ("student", "teacher"),
    "init_scope": ("model", "backbone"),
    "model.hrda.mfm_features": ("context", "detail"),
    "data.folder.rgb_labels": ("reject", "first_channel"),
}

_RANGES = {  # key: (low, high, low inclusive, high inclusive)
    "mfm.mask_ratio": (0.0, 1.0, True, False),
    "mfm.mask_guidance": (0.0, 1.0, True, True),
    "mfm.grid_size": (1, 64, True, True),
    "uda.mic.ratio": (0.0, 1.0, True, False),
    "uda.ema_alpha": (0.0, 1.0, True, True),
    "uda.pseudo_threshold": (0.0, 1.0, True, True),
    "uda.color_jitter_probability": (0.0, 1.0, True, True),
    "uda.color_jitter_strength": (0.0, 1.0, True, True),
    "data.flip_prob": (0.0, 1.0, True, True),
    "data.cat_max_ratio": (0.0, 1.0, False, True),
    "data.synthetic.shift": (0.0, 2.5, True, True),  # the renderer's range (data/synthetic.py)
    "optim.b1": (0.0, 1.0, True, False),
    "optim.b2": (0.0, 1.0, True, False),
}

_POSITIVE = ("data.synthetic.num_source", "data.synthetic.num_target", "data.synthetic.num_val",
             "num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
             "data.batch_size", "data.eval_batch_size", "mfm.grid_size", "mfm.embed_dim",
             "mfm.depth", "mfm.num_heads", "uda.mic.block_size", "optim.lr", "model.num_classes",
             "data.rcs.temperature")
_NON_NEGATIVE = ("seed", "data.prefetch", "optim.weight_decay", "optim.warmup_steps", "mfm.weight", "uda.mic.weight",
                 "uda.fd.weight", "data.num_workers", "uda.pseudo_ignore_top",
                 "uda.pseudo_ignore_bottom", "data.max_eval_images", "model.drop_path_rate",
                 "eval.num_logged_images")


def _get(c: ml_collections.ConfigDict, key: str) -> Any:
  for part in key.split("."):
    c = c[part]
  return c


class ConfigError(errors.UserError, ValueError):
  """A config value is invalid; the message names the key."""


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ``ConfigError`` naming the first invalid key."""
  for key, choices in _CHOICES.items():
    if _get(c, key) not in choices:
      raise ConfigError(f"config.{key}={_get(c, key)!r} is invalid; choose one of {choices}.")
  for key, (lo, hi, lo_in, hi_in) in _RANGES.items():
    v = _get(c, key)
    ok = (lo <= v if lo_in else lo < v) and (v <= hi if hi_in else v < hi)
    if not ok:
      lb, rb = "[" if lo_in else "(", "]" if hi_in else ")"
      raise ConfigError(f"config.{key}={v!r} is out of range {lb}{lo}, {hi}{rb}.")
  for key in _POSITIVE:
    if not _get(c, key) > 0:
      raise ConfigError(f"config.{key}={_get(c, key)!r} must be > 0.")
  for key in _NON_NEGATIVE:
    if not _get(c, key) >= 0:
      raise ConfigError(f"config.{key}={_get(c, key)!r} must be >= 0.")
  for key in ("data.crop_size", "data.source_scale", "data.target_scale", "data.test_scale",
              "eval.crop_size", "eval.stride"):
    v = tuple(_get(c, key))
    if len(v) != 2 or not all(isinstance(x, int) and x > 0 for x in v):
      raise ConfigError(f"config.{key}={v!r} must be two positive integers.")
  if min(c.data.synthetic.width, c.data.synthetic.height) < 16:
    raise ConfigError(f"config.data.synthetic.width/height = {c.data.synthetic.width}x"
                      f"{c.data.synthetic.height} must be at least 16 pixels each.")
  bad = [k for k in c.uda.fd.classes if not 0 <= k < c.model.num_classes]
  if bad:
    raise ConfigError(f"config.uda.fd.classes has ids outside [0, {c.model.num_classes}): {bad}.")
  if len(tuple(c.data.pseudo_margins)) not in (0, 4):
    raise ConfigError("config.data.pseudo_margins must be () or (top, bottom, left, right).")
  for key, value in dict(c.optim.custom_keys).items():
    try:
      lr_mult, decay_mult = (float(v) for v in value)
    except (TypeError, ValueError):
      raise ConfigError(f"config.optim.custom_keys[{key!r}] must be (lr_mult, decay_mult), got "
                        f"{value!r}.") from None
    if lr_mult < 0 or decay_mult < 0:
      raise ConfigError(f"config.optim.custom_keys[{key!r}] multipliers must be >= 0.")
  try:
    _check_names(c)
    _check_crop(c)
    _check_blocks(c)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if c.mfm.enabled:  # after the names: the token grid needs a known backbone
    validate_mfm(c)
  rows = int(c.uda.pseudo_ignore_top) + int(c.uda.pseudo_ignore_bottom)
  if c.uda.enabled and rows > int(c.data.crop_size[0]):
    raise ConfigError(f"config.uda.pseudo_ignore_top={c.uda.pseudo_ignore_top} + "
                      f"config.uda.pseudo_ignore_bottom={c.uda.pseudo_ignore_bottom} rows exceed "
                      f"the crop height config.data.crop_size[0]={c.data.crop_size[0]}.")


def validate_mfm(c: ml_collections.ConfigDict) -> None:
  """The MFM keys: architecture, token grid vs feature sizes, and which ablation combinations
  are meaningful (mfm_method.md "Ablations"); each error names the key."""
  m = c.mfm
  if m.embed_dim % m.num_heads:
    raise ConfigError(f"config.mfm.embed_dim={m.embed_dim} must be divisible by "
                      f"config.mfm.num_heads={m.num_heads}.")
  if m.embed_dim % 4:
    raise ConfigError(f"config.mfm.embed_dim={m.embed_dim} must be divisible by 4 (2-D sin-cos "
                      "positional embedding).")
  if m.objective == "classification" and m.domain in ("target", "both") and not c.uda.enabled:
    raise ConfigError("config.mfm.domain includes 'target', which needs the EMA teacher's pseudo-"
                      "labels: set config.uda.enabled=True or config.mfm.domain='source'.")
  if not m.rebuild and m.objective != "classification":
    raise ConfigError(f"config.mfm.rebuild=False (masking only) works with "
                      f"config.mfm.objective='classification' only, got {m.objective!r}: the "
                      "feature and pixel objectives regress what the Rebuilder predicts.")
  if m.freeze == "decoder" and m.objective != "classification":
    raise ConfigError(f"config.mfm.freeze='decoder' needs config.mfm.objective="
                      f"'classification' (the {m.objective!r} objective does not use the "
                      "decoder).")
  if m.mask_strategy == "uncertainty" and (m.domain != "target" or not c.uda.enabled):
    raise ConfigError("config.mfm.mask_strategy='uncertainty' uses the EMA teacher's target "
                      "predictions: it needs config.mfm.domain='target' and "
                      "config.uda.enabled=True.")
  # Token grid vs the encoder's feature sizes (lazy imports: models are heavy).
  from mfm_jax.models import segmentor  # pylint: disable=g-import-not-at-top
  from mfm_jax.uda import mfm as mfm_lib  # pylint: disable=g-import-not-at-top
  size = tuple(c.data.crop_size)
  if c.model.hrda.enabled:
    from mfm_jax.models import hrda  # pylint: disable=g-import-not-at-top
    size = hrda.mfm_image_size(c.model.hrda, c.data.crop_size)
  levels = segmentor.level_sizes(c.model, size)
  grid = mfm_lib.token_grid(levels[-1], int(m.grid_size))
  if m.objective == "pixel" and (size[0] % grid[0] or size[1] % grid[1]):
    raise ConfigError(f"config.mfm.objective='pixel' needs the encoder's input {size} divisible "
                      f"by the token grid {grid} (config.mfm.grid_size={m.grid_size}, capped at "
                      f"the last feature level {levels[-1]}); change config.data.crop_size.")


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
    _check_hrda(c)
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


def _hrda_scales(hcfg) -> tuple[float, float]:
  scales = tuple(float(s) for s in hcfg.scales)
  if len(scales) != 2 or max(scales) != 1.0 or not 0.0 < min(scales) < 1.0:
    raise ValueError(f"config.model.hrda.scales={tuple(hcfg.scales)!r} must be two scales: the "
                     "detail scale 1.0 and a context scale in (0, 1), e.g. (1.0, 0.5).")
  return 1.0, min(scales)


def _check_hrda(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` naming the key of an HRDA setting this implementation cannot run."""
  from mfm_jax.models.hrda import HEAD_OUTPUT_STRIDE  # pylint: disable=g-import-not-at-top
  from mfm_jax.models.hrda import MFM_FEATURES
  m, hcfg = config.model, config.model.hrda
  if not m.head.startswith("daformer_"):
    raise ValueError(f"config.model.head={m.head!r}: HRDA here needs a DAFormer head (stride-4 "
                     "logits, conv1 scale attention); the DeepLabV2 HRDA variant is not built.")
  _, lr = _hrda_scales(hcfg)
  lr_div = HEAD_OUTPUT_STRIDE / lr
  if lr_div != int(lr_div):
    raise ValueError(f"config.model.hrda.scales: output stride {HEAD_OUTPUT_STRIDE} / context "
                     f"scale {lr} must be an integer.")
  lr_div = int(lr_div)
  crop, hr_crop = tuple(config.data.crop_size), tuple(hcfg.hr_crop_size)
  div = int(hcfg.crop_coord_divisible)
  if div <= 0 or div % lr_div:
    raise ValueError(f"config.model.hrda.crop_coord_divisible={div} must be a positive multiple "
                     f"of output stride / context scale = {lr_div} (reference 8).")
  for key, size in (("model.hrda.hr_crop_size", hr_crop), ("data.crop_size", crop)):
    if len(size) != 2 or any(s <= 0 or s % lr_div for s in size):
      raise ValueError(f"config.{key}={size!r} must be two positive multiples of {lr_div}.")
  if any(hc > c for hc, c in zip(hr_crop, crop)):
    raise ValueError(f"config.model.hrda.hr_crop_size={hr_crop!r} exceeds config.data.crop_size"
                     f"={crop!r}.")
  stride = tuple(hcfg.hr_slide_stride)
  if len(stride) != 2 or any(s <= 0 or s % HEAD_OUTPUT_STRIDE or s > c
                             for s, c in zip(stride, hr_crop)):
    raise ValueError(f"config.model.hrda.hr_slide_stride={stride!r} must be two multiples of "
                     f"{HEAD_OUTPUT_STRIDE} no larger than hr_crop_size {hr_crop!r}.")
  if not 0.0 <= hcfg.hr_loss_weight <= 1.0:
    raise ValueError(f"config.model.hrda.hr_loss_weight={hcfg.hr_loss_weight!r} must be in "
                     "[0, 1].")
  if hcfg.mfm_features not in MFM_FEATURES:
    raise ValueError(f"config.model.hrda.mfm_features={hcfg.mfm_features!r}; choose one of "
                     f"{MFM_FEATURES}.")
  if hcfg.mfm_features == "detail" and config.mfm.enabled:
    # Source features (from forward_loss), teacher features and pixel targets all come from
    # the context branch / whole crop, so only the target
    # classification objective sees matching detail features and labels.
    if config.mfm.domain != "target" or config.mfm.objective != "classification":
      raise ValueError("config.model.hrda.mfm_features='detail' supports only "
                       "config.mfm.domain='target' with config.mfm.objective='classification' "
                       f"(got domain={config.mfm.domain!r}, objective={config.mfm.objective!r}).")
