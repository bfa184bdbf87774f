"""The config schema: every key, its default and the source of that default.

A config file in ``configs/`` starts from ``base_config()``, applies named fragments
(``mfm_jax.config.fragments``: the host method, HRDA, DeepLabV2, MFM) and then the command
line's presets (``configs/x.py:synthetic,steps=200``). Defaults come from the PyTorch reference
(uda_reference.md sections in the comments), the MFM paper (PAPER) or the authors' released
Rebuilder (OFFICIAL, mfm_method.md); OURS marks choices of this implementation.
"""

from __future__ import annotations

import ml_collections

from mfm_jax.data import labels


def base_config() -> ml_collections.ConfigDict:
  """Every key of the schema with its default: the one place a default lives.

  Method keys default to DAFormer (self-training with ClassMix, FD and RCS; MIC and MFM off);
  the fragments of ``mfm_jax.config.fragments`` switch methods, HRDA and MFM on.
  """
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
  # OURS: MiT stages as one lax.scan over their blocks (compiled once per stage, not per block;
  # same parameters and function, other stochastic-depth draws). README "Scaling".
  c.model.scan_blocks = False
  # OURS: where the encoder treats every image on its own (MiT; not the ResNet's train-mode
  # BatchNorm), batches share one encoder call: the student's train-mode passes (source,
  # ClassMix, MIC, MFM target) of the plain encoder-decoder, and HRDA's context image and
  # detail crop of a training pass. Same FLOPs and per-image features, other drop-path draws;
  # the compiled step holds fewer encoders (TPU compile time, README "Compile time").
  # False: one encoder call per pass and scale, as the reference.
  c.model.joint_encoder = True
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
  c.uda.mic.enabled = False  # masked image consistency (§2.6); fragments.mic switches it on
  c.uda.mic.block_size = 32  # 32 px at 512 crops, 64 px at 1024
  c.uda.mic.ratio = 0.7
  c.uda.mic.weight = 1.0
  c.uda.mic.color_aug = True  # 'separatetrgaug'

  c.mfm = ml_collections.ConfigDict()
  c.mfm.enabled = False  # masked feature modeling (mfm_method.md); fragments.mfm switches it on
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
  # The projectors' ×2 upsampling: 'transpose' (kernel-4/stride-2 ConvTranspose, as released) or
  # 'subpixel' (the same kernel as a 3×3 conv + depth-to-space; equal values and parameters,
  # 13–23× faster fwd+bwd on CPU, and it avoids XLA's slow transposed-conv backward on GPU).
  c.mfm.upsample_impl = "transpose"
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
