"""Named config fragments: each changes ``base_config()`` in place for one part of an experiment.

A config file states its experiment by calling them in order, e.g. MIC(HRDA) + MFM::

  c = base.base_config()
  fragments.mic(c)
  fragments.hrda(c)
  fragments.mfm(c)
  fragments.apply_presets(c, arg)  # the ':synthetic,steps=200' part of --config

Method fragments (``source_only``, ``dacs``, ``daformer``, ``mic``) set every method key, so the
last one called decides the method. Presets shrink or vary an experiment from the command line
(``PRESETS``); ``compose`` is the same sequence as one call (tests, the study).
"""

from __future__ import annotations

import ast
from typing import Any, Callable

import ml_collections

from mfm_jax.config import base

Fragment = Callable[[ml_collections.ConfigDict], None]


# ---------------------------------------------------------------------------------------------
# Host methods (uda_reference.md §2; the reference presets under configs/_base_/uda/)


def _method(c: ml_collections.ConfigDict, *, uda: bool, dacs: bool, fd: bool, mic: bool
            ) -> None:
  c.uda.enabled = uda
  # DACS: α 0.99, no FD, no RCS, no pseudo-label region filter (configs/_base_/uda/dacs.py).
  c.uda.ema_alpha = 0.99 if dacs else 0.999
  c.uda.fd.enabled = fd
  c.data.rcs.enabled = fd  # DAFormer's FD and RCS come together
  c.uda.pseudo_ignore_top = 0 if dacs else 15
  c.uda.pseudo_ignore_bottom = 0 if dacs else 120
  c.uda.mic.enabled = mic


def source_only(c: ml_collections.ConfigDict) -> None:
  """Supervised on the source domain only (no teacher, no FD, no RCS)."""
  _method(c, uda=False, dacs=False, fd=False, mic=False)


def dacs(c: ml_collections.ConfigDict) -> None:
  """DACS: EMA teacher pseudo-labels + ClassMix (§2.2-2.4)."""
  _method(c, uda=True, dacs=True, fd=False, mic=False)


def daformer(c: ml_collections.ConfigDict) -> None:
  """DAFormer: DACS + ImageNet feature distance + rare class sampling + plcrop (§2.5)."""
  _method(c, uda=True, dacs=False, fd=True, mic=False)


def mic(c: ml_collections.ConfigDict) -> None:
  """MIC: DAFormer + masked image consistency (§2.6)."""
  _method(c, uda=True, dacs=False, fd=True, mic=True)


# ---------------------------------------------------------------------------------------------
# Network and MFM


def deeplabv2(c: ml_collections.ConfigDict) -> None:
  """ResNet-101-V1c + DeepLabV2 head with dilations (6, 12) (§1.3, what DAFormer/MIC run)."""
  c.model.backbone = "resnet101_v1c"
  c.model.head = "dlv2red"


def hrda(c: ml_collections.ConfigDict) -> None:
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


def mfm(c: ml_collections.ConfigDict) -> None:
  """Masked Feature Modeling with the released Rebuilder (mfm_method.md; keys ``config.mfm``)."""
  c.mfm.enabled = True


# ---------------------------------------------------------------------------------------------
# Presets (the ":synthetic,steps=200" part of --config=configs/x.py:...)

PRESETS = dict(synthetic=False, study=False, synthia=False, oracle=False, steps=0, mfm=None,
               bf16=False)


def parse_presets(arg: str | None) -> ml_collections.ConfigDict:
  """Parses ``"a,b=1,c=x"`` into a ConfigDict over ``PRESETS``.

  A bare word sets a preset to True. Values are parsed as Python literals when possible, else
  kept as strings. Unknown names raise ``ValueError`` naming the preset.
  """
  out = ml_collections.ConfigDict(dict(PRESETS))
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, has_value, raw = item.partition("=")
    if key not in PRESETS:
      raise ValueError(
          f"Unknown config preset {key!r}; known presets: {', '.join(sorted(PRESETS))}.")
    if not has_value:
      value: Any = True
    else:
      try:
        value = ast.literal_eval(raw)
      except (ValueError, SyntaxError):
        value = raw
    out[key] = value
  return out


def synthia(c: ml_collections.ConfigDict) -> None:
  """SYNTHIA → Cityscapes (§3.2 source scales)."""
  c.data.source = "synthia"
  c.data.source_scale = (2560, 1520) if c.model.hrda.enabled else (1280, 760)


def synthetic(c: ml_collections.ConfigDict) -> None:
  """Shrinks everything to the embedded synthetic benchmark on a 2-core CPU (README,
  "Synthetic benchmark"); the network family is kept (tiny MiT or tiny ResNet)."""
  c.data.source = "synthetic_source"
  c.data.target = "synthetic_target"
  c.data.source_scale = (192, 96)
  c.data.target_scale = (192, 96)
  c.data.test_scale = (192, 96)
  c.data.crop_size = (64, 64)
  c.data.batch_size = 4
  c.data.rcs.min_pixels = 30
  c.model.backbone = "resnet_tiny_v1c" if c.model.backbone.startswith("resnet") else "mit_tiny"
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
  if c.model.hrda.enabled:  # HRDA: everything scaled down with the same ratios
    c.data.crop_size = (96, 96)
    c.model.hrda.hr_crop_size = (48, 48)
    c.model.hrda.hr_slide_stride = (24, 24)
    c.data.pseudo_margins = ()
    c.uda.mic.block_size = 6  # 64 px at 1024 → 16 cells per side
    c.eval.mode = "whole"  # the 192×96 image is HRDA-slid internally (48-px windows)
    c.data.batch_size = 2


def study(c: ml_collections.ConfigDict) -> None:
  """The MFM study's scale of the synthetic benchmark (after ``synthetic``; not for HRDA).

  256² crops make the MiT's last level (stride 32) 8×8, so the MFM token grid is a real grid
  (the paper's 16×16 is 512/32) instead of the 2×2 of the 64² ``synthetic`` crops. The images
  are rendered at 512×256 (the synthetic datasets are keyed by size, so they never collide with
  the 192×96 ones). Calibration (model width, batch, steps) in the README, "Results on the
  synthetic benchmark".
  """
  if c.model.hrda.enabled:
    raise ValueError("The 'study' preset is for the DAFormer-family hosts (no HRDA).")
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


def oracle(c: ml_collections.ConfigDict) -> None:
  """Supervised on the target's own labels (no adaptation): the target-oracle upper bound."""
  c.data.source = c.data.target
  source_only(c)
  c.data.rcs.enabled = False
  c.mfm.enabled = False


def steps(c: ml_collections.ConfigDict, n: int) -> None:
  """Trains ``n`` steps (evaluation and checkpoint intervals capped at ``n``)."""
  c.num_steps = int(n)
  c.eval_every = min(c.eval_every, c.num_steps)
  c.checkpoint_every = min(c.checkpoint_every, c.num_steps)


def bf16(c: ml_collections.ConfigDict) -> None:
  """bfloat16 compute (parameters and optimizer state stay float32)."""
  c.model.compute_dtype = "bfloat16"


def apply_presets(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies the presets named in ``arg`` (see ``PRESETS``) in a fixed order; returns ``c``.

  ``synthetic`` (embedded CPU benchmark), ``study`` (the MFM study's 256²-crop scale; implies
  ``synthetic``), ``synthia`` (SYNTHIA→Cityscapes), ``oracle`` (supervised on target labels),
  ``steps=N``, ``mfm=True|False`` (MFM on/off), ``bf16`` (bfloat16 compute).
  """
  p = parse_presets(arg)
  if p.mfm is not None:
    c.mfm.enabled = bool(p.mfm)
  if p.synthia:
    synthia(c)
  if p.synthetic or p.study:
    synthetic(c)
    if p.study:
      study(c)
  if p.oracle:
    oracle(c)
  if p.steps:
    steps(c, p.steps)
  if p.bf16:
    bf16(c)
  return c


def compose(*parts: Fragment, presets: str | None = None) -> ml_collections.ConfigDict:
  """``base_config()`` with ``parts`` applied in order, then ``presets``."""
  c = base.base_config()
  for part in parts:
    part(c)
  return apply_presets(c, presets)
