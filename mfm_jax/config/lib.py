"""Config schema, shared config fragments and validation.

A config file in ``configs/`` defines ``get_config(arg)`` and composes the plain functions of
this module (no inheritance DSL). ``base_config()`` lists every key with the reference default
and a comment naming its source; ``validate(config)`` turns bad values into clear errors that
name the key.
"""

from __future__ import annotations

import ast
from typing import Any

import ml_collections

from mfm_jax.runtime import errors
from mfm_jax.data import labels

# ---------------------------------------------------------------------------------------------
# Presets ("configs/x.py:synthetic,hrda=False")


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses ``"a,b=1,c=x"`` into a ConfigDict over ``defaults``.

  A bare word sets a boolean default to True. Values are parsed as Python literals when
  possible, else kept as strings. Unknown names raise ``ValueError`` naming the preset.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, has_value, raw = item.partition("=")
    if key not in defaults:
      raise ValueError(
          f"Unknown config preset {key!r}; known presets: {', '.join(sorted(defaults))}.")
    if not has_value:
      value: Any = True
    else:
      try:
        value = ast.literal_eval(raw)
      except (ValueError, SyntaxError):
        value = raw
    out[key] = value
  return out


# ---------------------------------------------------------------------------------------------
# Schema with reference defaults (MIC(DAFormer) + MFM on GTA→Cityscapes, 512 crops)

METHODS = ("source_only", "dacs", "daformer", "mic")


def base_config() -> ml_collections.ConfigDict:
  """Every key of the schema with the reference (DAFormer-family) default."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_steps = 40_000  # IterBasedRunner max_iters (uda_reference.md §2.7)
  c.log_every = 50
  c.eval_every = 4_000  # iters // 10 (§2.7)
  c.checkpoint_every = 4_000
  c.keep_checkpoints = 2
  # Orbax checkpoint (e.g. written by `python -m mfm_jax.convert`) whose params initialise the
  # student, the EMA teacher and the frozen ImageNet copy. Empty: random init.
  c.init_from = ""
  # Which sub-tree of `init_from` to use: 'model' (whole segmentor) or 'backbone' (encoder only,
  # e.g. ImageNet mit_b5.pth weights).
  c.init_scope = "backbone"

  c.model = ml_collections.ConfigDict()
  c.model.backbone = "mit_b5"  # §1.1
  c.model.head = "daformer_sepaspp"  # §1.2
  c.model.num_classes = labels.NUM_CLASSES
  c.model.head_embed_dim = 256
  c.model.head_dropout = 0.1  # Dropout2d before conv_seg
  c.model.drop_path_rate = 0.1  # MiT class default, linear over all blocks
  c.model.remat = False  # rematerialise encoder blocks (memory switch)
  c.model.compute_dtype = "float32"  # 'float32' | 'bfloat16' (params/optimizer stay fp32)
  # Depthwise convs (MiT Mix-FFN, separable ASPP): 'xla' grouped conv | 'shift' multiply-adds |
  # 'auto' (shift on CPU, where it is 9-28x faster per layer, xla on GPU/TPU). Same parameters
  # and function; `python -m mfm_jax.benchmark --depthwise` times both on your device.
  c.model.depthwise_impl = "auto"
  c.model.hrda = ml_collections.ConfigDict()  # HRDA multi-resolution (§1.4)
  c.model.hrda.enabled = False
  c.model.hrda.scales = (1.0, 0.5)  # HR detail scale, LR context scale
  c.model.hrda.hr_crop_size = (512, 512)
  c.model.hrda.crop_coord_divisible = 8
  c.model.hrda.hr_loss_weight = 0.1  # λ_d; fused loss weight 0.9
  c.model.hrda.attention_classwise = True
  c.model.hrda.hr_slide_inference = True
  c.model.hrda.hr_slide_stride = (256, 256)  # crop / 2
  c.model.hrda.mfm_features = "context"  # OURS: MFM on the LR context features | 'detail'

  c.data = ml_collections.ConfigDict()
  c.data.source = "gta5"  # gta5 | synthia | cityscapes | synthetic_source | synthetic_target | folder_source | folder_target
  c.data.target = "cityscapes"
  c.data.data_dir = ""  # prepared TFDS datasets; '' → $MFM_JAX_DATA or ~/tensorflow_datasets
  c.data.raw_dir = ""  # raw folders (used to generate/prepare the synthetic benchmark)
  c.data.source_scale = (1280, 720)  # (w, h) keep-ratio resize, GTA (§3.2)
  c.data.target_scale = (1024, 512)  # Cityscapes (§3.2)
  c.data.test_scale = (1024, 512)  # §3.3
  # Read the training splits from copies prepared at source_scale / target_scale
  # (`prepare --scale=WxH`): ~2x less decode work per GTA image, data tied to that scale.
  # Evaluation always reads the full-resolution labels.
  c.data.prepared_scale = False
  c.data.crop_size = (512, 512)  # (h, w)
  c.data.cat_max_ratio = 0.75  # source RandomCrop (§3.2)
  c.data.flip_prob = 0.5
  c.data.batch_size = 2  # per domain, global: 2 source + 2 target (§2.7)
  c.data.num_workers = 0  # grain worker processes (0 = in-process)
  c.data.prefetch = 2
  c.data.pseudo_margins = ()  # plcrop v2 (top, bottom, left, right) at full target res; () = off
  c.data.eval_split = "val"
  # Images predicted together (consecutive same-size images are stacked; the reference uses 1).
  c.data.eval_batch_size = 1
  c.data.max_eval_images = 0  # 0 = the whole split
  c.data.rcs = ml_collections.ConfigDict()
  c.data.rcs.enabled = True  # Rare Class Sampling (§2.5)
  c.data.rcs.temperature = 0.01
  c.data.rcs.min_pixels = 3000
  c.data.rcs.min_crop_ratio = 0.5
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.seed = 0
  c.data.synthetic.num_source = 400
  c.data.synthetic.num_target = 200
  c.data.synthetic.num_val = 60
  c.data.synthetic.width = 192
  c.data.synthetic.height = 96
  # Domain-shift strength of the synthetic target (0 = none); 1.25 calibrated so source-only is
  # ≥ 15 mIoU below the target oracle (README, "Synthetic benchmark").
  c.data.synthetic.shift = 1.25
  c.data.folder = ml_collections.ConfigDict()
  c.data.folder.source_dir = ""
  c.data.folder.target_dir = ""
  c.data.folder.label_map = ""  # JSON {label id: train id}; '' = Cityscapes label ids
  # Colour (RGB/RGBA) label files: 'reject' | 'first_channel' (class id in R); see prepare.
  c.data.folder.rgb_labels = "reject"

  c.uda = ml_collections.ConfigDict()
  c.uda.enabled = True  # False = source-only training
  c.uda.ema_alpha = 0.999  # α_t = min(1 − 1/(t+1), 0.999) (§2.2)
  c.uda.pseudo_threshold = 0.968  # τ (§2.3)
  c.uda.pseudo_ignore_top = 15  # DAFormer plcrop v1 (§2.3)
  c.uda.pseudo_ignore_bottom = 120
  c.uda.mix = "class"  # 'class' (DACS ClassMix) | 'none'
  c.uda.color_jitter_strength = 0.2  # (§2.4)
  c.uda.color_jitter_probability = 0.2
  c.uda.blur = True
  c.uda.fd = ml_collections.ConfigDict()
  c.uda.fd.enabled = True  # ImageNet feature distance (§2.5)
  c.uda.fd.weight = 0.005  # λ_FD
  c.uda.fd.classes = labels.THING_CLASSES
  c.uda.fd.scale_min_ratio = 0.75
  c.uda.mic = ml_collections.ConfigDict()
  c.uda.mic.enabled = True  # masked image consistency (§2.6)
  c.uda.mic.block_size = 32  # 32 px at 512 crops, 64 px at 1024
  c.uda.mic.ratio = 0.7
  c.uda.mic.weight = 1.0
  c.uda.mic.color_aug = True  # 'separatetrgaug'

  c.mfm = ml_collections.ConfigDict()
  c.mfm.enabled = True  # masked feature modeling (mfm_method.md)
  c.mfm.weight = 1.0  # λ (PAPER)
  c.mfm.mask_ratio = 0.4  # PAPER + OFFICIAL: Bernoulli(0.4) per token
  # OFFICIAL: 16×16 tokens at 512 crops. OURS for other crops: the grid is min(grid_size, size of
  # the encoder's last level) per axis, projector i upsamples by level size / grid (uda/mfm.py).
  c.mfm.grid_size = 16
  c.mfm.embed_dim = 512  # OFFICIAL: C_last → 512
  c.mfm.depth = 2  # OFFICIAL: 2 pre-norm ViT blocks
  c.mfm.num_heads = 16  # OFFICIAL
  c.mfm.mlp_ratio = 4.0  # OFFICIAL
  c.mfm.rebuild = True  # ablation: False = masking only (masked cells zeroed)
  c.mfm.objective = "classification"  # | 'feature' (teacher-feature regression) | 'pixel'
  c.mfm.domain = "target"  # | 'source' | 'both'
  c.mfm.freeze = "none"  # | 'encoder' | 'decoder' (for the MFM loss only)
  # OFFICIAL 'all': every level the DAFormer head reads is masked at the same cells and rebuilt
  # (DeepLabV2: its one level); 'last': only the last level (the pre-release behaviour).
  c.mfm.levels = "all"
  # 'random' (OFFICIAL) | 'uncertainty' (OURS, beyond the paper: tokens where the EMA teacher is
  # unsure are masked more often, same expected ratio; uda/mfm.py guided_keep_mask).
  c.mfm.mask_strategy = "random"
  c.mfm.mask_guidance = 1.0  # γ of the 'uncertainty' strategy: 0 = uniform, 1 = fully guided
  # Orbax checkpoint with {'params': {'rebuilder'}} (e.g. the authors' released Rebuilder via
  # `python -m mfm_jax.convert --arch=rebuilder_daformer`) whose weights start the Rebuilder.
  c.mfm.init_from = ""

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 6e-5  # AdamW (§2.7)
  c.optim.weight_decay = 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.warmup_steps = 1500  # poly10warm
  c.optim.warmup_ratio = 1e-6
  c.optim.power = 1.0
  c.optim.min_lr = 0.0
  # mmcv paramwise custom_keys: substring → (lr_mult, decay_mult); 'rebuilder' is OURS.
  c.optim.custom_keys = {"head": (10.0, 1.0), "pos_block": (1.0, 0.0), "norm": (1.0, 0.0),
                         "rebuilder": (10.0, 1.0)}

  c.eval = ml_collections.ConfigDict()
  c.eval.mode = "whole"  # 'whole' | 'slide' (§4)
  c.eval.crop_size = (1024, 1024)
  c.eval.stride = (512, 512)
  c.eval.which = "student"  # the reference evaluates the student (§1.5)
  c.eval.num_logged_images = 3  # OURS: validation predictions shown in TensorBoard per eval

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # devices on the 'data' axis; -1 = all
  return c


# ---------------------------------------------------------------------------------------------
# Fragments


def set_method(c: ml_collections.ConfigDict, method: str, mfm: bool) -> None:
  """Switches the host UDA method (reference presets) and MFM on/off in place."""
  if method not in METHODS:
    raise ValueError(f"Unknown method {method!r}; choose one of {METHODS}.")
  c.uda.enabled = method != "source_only"
  # DACS: α 0.99, no FD, no RCS, no region filter (configs/_base_/uda/dacs.py).
  dacs = method == "dacs"
  c.uda.ema_alpha = 0.99 if dacs else 0.999
  c.uda.fd.enabled = method in ("daformer", "mic")
  c.data.rcs.enabled = method in ("daformer", "mic")
  c.uda.pseudo_ignore_top = 0 if dacs else 15
  c.uda.pseudo_ignore_bottom = 0 if dacs else 120
  c.uda.mic.enabled = method == "mic"
  c.mfm.enabled = bool(mfm)
  if method == "source_only":
    c.uda.fd.enabled = False
    c.data.rcs.enabled = False


def set_synthetic(c: ml_collections.ConfigDict) -> None:
  """Shrinks everything to the embedded synthetic benchmark on a 2-core CPU."""
  c.data.source = "synthetic_source"
  c.data.target = "synthetic_target"
  c.data.source_scale = (192, 96)
  c.data.target_scale = (192, 96)
  c.data.test_scale = (192, 96)
  c.data.crop_size = (64, 64)
  c.data.batch_size = 4
  c.data.rcs.min_pixels = 30
  c.model.backbone = "mit_tiny"
  c.model.head_embed_dim = 64
  c.model.drop_path_rate = 0.0
  c.mfm.embed_dim = 64
  c.mfm.num_heads = 4
  c.uda.mic.block_size = 4  # 16 px at 512 → grid of 16 cells per side, scaled to 64-px crops
  c.uda.pseudo_ignore_top = 0
  c.uda.pseudo_ignore_bottom = 0
  c.optim.lr = 6e-4
  c.optim.warmup_steps = 50
  c.num_steps = 1000
  c.log_every = 50
  c.eval_every = 500
  c.checkpoint_every = 500


# ---------------------------------------------------------------------------------------------
# Validation

_CHOICES = {
    "model.compute_dtype": ("float32", "bfloat16"),
    "model.depthwise_impl": ("auto", "xla", "shift"),
    "uda.mix": ("class", "none"),
    "mfm.objective": ("classification", "feature", "pixel"),
    "mfm.domain": ("target", "source", "both"),
    "mfm.freeze": ("none", "encoder", "decoder"),
    "mfm.levels": ("last", "all"),
    "mfm.mask_strategy": ("random", "uncertainty"),
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
    "optim.b1": (0.0, 1.0, True, False),
    "optim.b2": (0.0, 1.0, True, False),
}

_POSITIVE = ("num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
             "data.batch_size", "data.eval_batch_size", "mfm.grid_size", "mfm.embed_dim",
             "mfm.depth", "mfm.num_heads", "uda.mic.block_size", "optim.lr", "model.num_classes",
             "data.rcs.temperature")
_NON_NEGATIVE = ("optim.weight_decay", "optim.warmup_steps", "mfm.weight", "uda.mic.weight",
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
  bad = [k for k in c.uda.fd.classes if not 0 <= k < c.model.num_classes]
  if bad:
    raise ConfigError(f"config.uda.fd.classes has ids outside [0, {c.model.num_classes}): {bad}.")
  if len(tuple(c.data.pseudo_margins)) not in (0, 4):
    raise ConfigError("config.data.pseudo_margins must be () or (top, bottom, left, right).")
  for key, (lr_mult, decay_mult) in dict(c.optim.custom_keys).items():
    if lr_mult < 0 or decay_mult < 0:
      raise ConfigError(f"config.optim.custom_keys[{key!r}] multipliers must be >= 0.")
  from mfm_jax.config import checks as config_checks  # pylint: disable=g-import-not-at-top
  try:
    config_checks.check(c)  # names, crop divisibility, HRDA rules, block sizes
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if c.mfm.enabled:  # after the names: the token grid needs a known backbone
    validate_mfm(c)


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
    size = hrda.mfm_image_size(c)
  levels = segmentor.level_sizes(c.model, size)
  grid = mfm_lib.token_grid(levels[-1], int(m.grid_size))
  if m.objective == "pixel" and (size[0] % grid[0] or size[1] % grid[1]):
    raise ConfigError(f"config.mfm.objective='pixel' needs the encoder's input {size} divisible "
                      f"by the token grid {grid} (config.mfm.grid_size={m.grid_size}, capped at "
                      f"the last feature level {levels[-1]}); change config.data.crop_size.")


# ---------------------------------------------------------------------------------------------
# Experiments (each configs/*.py file is one call of this)

PRESETS = dict(synthetic=False, study=False, synthia=False, oracle=False, steps=0, mfm=None,
               bf16=False)


def set_hrda(c: ml_collections.ConfigDict) -> None:
  """HRDA multi-resolution training at the reference HR scales (uda_reference.md §1.4, §3.2)."""
  c.model.hrda.enabled = True
  c.data.source_scale = (2560, 1440)  # GTA ×2; SYNTHIA (2560, 1520)
  c.data.target_scale = (2048, 1024)
  c.data.test_scale = (2048, 1024)
  c.data.crop_size = (1024, 1024)  # outer crop; LR context = ×0.5, HR detail 512²
  c.data.rcs.min_crop_ratio = 2.0
  c.data.pseudo_margins = (30, 240, 30, 30)  # plcrop v2 at full Cityscapes resolution
  c.uda.pseudo_ignore_top = 0
  c.uda.pseudo_ignore_bottom = 0
  c.uda.mic.block_size = 64  # 1024 crops
  c.eval.mode = "slide"  # crop 1024, stride 512 over 2048×1024
  c.eval.crop_size = (1024, 1024)
  c.eval.stride = (512, 512)


def set_synthetic_hrda(c: ml_collections.ConfigDict) -> None:
  """HRDA on the synthetic benchmark: everything scaled down with the same ratios."""
  c.data.crop_size = (96, 96)
  c.model.hrda.hr_crop_size = (48, 48)
  c.model.hrda.hr_slide_stride = (24, 24)
  c.data.pseudo_margins = ()
  c.uda.mic.block_size = 6  # 64 px at 1024 → 16 cells per side
  c.eval.mode = "whole"  # the 192×96 image is HRDA-slid internally (48-px windows)
  c.data.batch_size = 2
  c.num_steps = 1000
  c.eval_every = 500
  c.checkpoint_every = 500


def set_study(c: ml_collections.ConfigDict) -> None:
  """The MFM study's scale of the synthetic benchmark (call after ``set_synthetic``).

  256² crops make the MiT's last level (stride 32) 8×8, so the MFM token grid is a real grid
  (the paper's 16×16 is 512/32) instead of the 2×2 of the 64² ``synthetic`` crops. The images
  are rendered at 512×256 (the synthetic datasets are keyed by size, so they never collide with
  the 192×96 ones). Calibration (model width, batch, steps) in the README, "Results on the
  synthetic benchmark".
  """
  c.data.synthetic.width, c.data.synthetic.height = 512, 256
  c.data.source_scale = (512, 256)
  c.data.target_scale = (512, 256)
  c.data.test_scale = (512, 256)
  c.data.crop_size = (256, 256)
  c.data.rcs.min_pixels = 480  # 30 px at 192×96, scaled with the image area (×7.1)
  c.mfm.grid_size = 8  # = the last level at 256² crops
  c.uda.mic.block_size = 16  # 32 px at 512 crops → 16 cells per side, as the reference
  # CPU budget: at 256² the 3×3 bottleneck of the separable-ASPP fusion dominates the FLOPs,
  # so the head is 32 wide (64 in `synthetic`) and the batch 2 + 2.
  c.model.head_embed_dim = 32
  c.data.batch_size = 2
  # EMA teacher: α_t = min(1 − 1/(t+1), α) is a plain average of every student so far until
  # t = 1/(1−α); with the reference α = 0.999 the teacher of a 300-step run is that average
  # (pseudo-label weight still 0.003 at step 130, vs 0.21 at step 100 with 0.95). 0.95 keeps
  # the teacher's memory at ~20 steps (1/15 of the run; the reference's ~1000 are 1/40 of 40k).
  c.uda.ema_alpha = 0.95
  c.optim.warmup_steps = 30
  c.num_steps = 300
  c.log_every = 10  # learning curves for the study's plots
  c.eval_every = 100
  c.checkpoint_every = 100


def experiment(method: str, mfm: bool, arg: str | None, *, backbone: str = "mit_b5",
               head: str = "daformer_sepaspp", hrda: bool = False
               ) -> ml_collections.ConfigDict:
  """Builds a full experiment config; ``arg`` selects presets (see ``PRESETS``).

  Presets: ``synthetic`` (embedded CPU benchmark), ``study`` (the MFM study's 256²-crop scale of
  the synthetic benchmark; implies ``synthetic``), ``synthia`` (SYNTHIA→Cityscapes),
  ``oracle`` (supervised on target labels: the upper bound of the synthetic calibration),
  ``steps=N``, ``mfm=True|False`` (override), ``bf16`` (bfloat16 compute).
  """
  p = parse_arg(arg, **PRESETS)
  c = base_config()
  c.model.backbone, c.model.head = backbone, head
  set_method(c, method, mfm if p.mfm is None else p.mfm)
  if hrda:
    set_hrda(c)
  if p.synthia:
    c.data.source = "synthia"
    c.data.source_scale = (2560, 1520) if hrda else (1280, 760)  # §3.2
  if p.synthetic or p.study:
    set_synthetic(c)
    if hrda:
      set_synthetic_hrda(c)
    if p.study:
      if hrda:
        raise ValueError("The 'study' preset is for the DAFormer-family hosts (no HRDA).")
      set_study(c)
  if p.oracle:
    # Train on the target's own labels (no adaptation): the target-oracle reference.
    c.data.source = c.data.target
    c.data.rcs.enabled = False
    set_method(c, "source_only", False)
  if p.steps:
    c.num_steps = int(p.steps)
    c.eval_every = min(c.eval_every, c.num_steps)
    c.checkpoint_every = min(c.checkpoint_every, c.num_steps)
  if p.bf16:
    c.model.compute_dtype = "bfloat16"
  return c
