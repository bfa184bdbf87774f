"""The train state, and building the network, the MFM task, the optimizer and the state.

Parameters are created directly with their target sharding (``jit(init, out_shardings=...)``);
pretrained weights (``config.init_from``) are merged strictly: a missing, unexpected or
wrongly-shaped tensor is an error that lists the offending names.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mfm_jax.models import mit
from mfm_jax.models import segmentor as segmentor_lib
from mfm_jax.models.network import SegmentationNetwork
from mfm_jax.trainer import optim
from mfm_jax.uda.mfm import MFMTask


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue; ``None`` fields are unused by the config."""

  step: jax.Array
  params: Any  # {'model': segmentor params, 'rebuilder': {...}} (rebuilder only with MFM)
  batch_stats: Any  # student BatchNorm statistics
  opt_state: Any
  ema_params: Any  # EMA teacher (segmentor params only)
  ema_batch_stats: Any  # teacher BN statistics (its own, not averaged: §2.2)
  imnet_params: Any  # frozen ImageNet encoder copy for the feature distance
  imnet_batch_stats: Any
  # Sticky flag, OR-ed every step: a loss or the gradient norm was NaN/Inf at some step. The
  # loop reads it with the logged metrics and before every save (no host sync per step).
  nonfinite: jax.Array


def needs_teacher(config: ml_collections.ConfigDict) -> bool:
  return bool(config.uda.enabled) or (
      bool(config.mfm.enabled) and config.mfm.objective == "feature")


def needs_imnet(config: ml_collections.ConfigDict) -> bool:
  return bool(config.uda.fd.enabled) and config.uda.fd.weight > 0


def build_network(config: ml_collections.ConfigDict) -> SegmentationNetwork:
  """The segmentation network behind the UDA step (HRDA when ``config.model.hrda`` is on)."""
  hrda_cfg = config.model.get("hrda")
  if hrda_cfg is not None and hrda_cfg.enabled:
    from mfm_jax.models import hrda  # pylint: disable=g-import-not-at-top
    return hrda.build_network(config)
  return SegmentationNetwork(segmentor_lib.build_segmentor(config.model),
                             per_image_encoder=config.model.backbone in mit.MIT_VARIANTS)


def mfm_image_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """Spatial size of the images whose features MFM masks."""
  hrda_cfg = config.model.get("hrda")
  if hrda_cfg is not None and hrda_cfg.enabled:
    from mfm_jax.models import hrda  # pylint: disable=g-import-not-at-top
    return hrda.mfm_image_size(hrda_cfg, config.data.crop_size)
  return tuple(config.data.crop_size)


def build_mfm_task(config: ml_collections.ConfigDict) -> MFMTask | None:
  if not config.mfm.enabled:
    return None
  size = mfm_image_size(config)
  return MFMTask(cfg=config.mfm, channels=tuple(segmentor_lib.feature_channels(config.model)),
                 level_sizes=tuple(segmentor_lib.level_sizes(config.model, size)),
                 image_size=size, single_projector=config.model.head.startswith("dlv2"),
                 compute_dtype=segmentor_lib.parse_compute_dtype(config.model.compute_dtype))


def _example_images(config: ml_collections.ConfigDict, batch: int = 1) -> jax.ShapeDtypeStruct:
  h, w = config.data.crop_size
  return jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32)


def init_variables(config: ml_collections.ConfigDict, net: SegmentationNetwork,
                   mfm_task: MFMTask | None, rng: jax.Array) -> dict[str, Any]:
  """Initial ``params`` ({'model', 'rebuilder'?}) and ``batch_stats`` of the student."""
  k_model, k_reb = jax.random.split(rng)
  h, w = config.data.crop_size
  images = jnp.zeros((1, h, w, 3), jnp.float32)
  variables = net.model.init({"params": k_model, "dropout": k_model}, images, train=False)
  params = {"model": variables["params"]}
  if mfm_task is not None and mfm_task.has_params:
    # The same image size the train step passes to net.mfm_encode (HRDA halves it internally).
    feats, _ = net.mfm_encode(variables, images, train=False)
    params["rebuilder"] = mfm_task.init(k_reb, feats)
  return {"params": params, "batch_stats": variables.get("batch_stats", {})}


def _flat(tree) -> dict[str, Any]:
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def merge_strict(target: Any, loaded: Any, what: str) -> Any:
  """Returns ``loaded`` cast to ``target``'s dtypes; names/shapes must match exactly."""
  t, l = _flat(target), _flat(loaded)
  missing = sorted(set(t) - set(l))
  unexpected = sorted(set(l) - set(t))
  shapes = sorted(f"{k}: expected {tuple(t[k].shape)}, got {tuple(np.shape(l[k]))}"
                  for k in set(t) & set(l) if tuple(t[k].shape) != tuple(np.shape(l[k])))
  if missing or unexpected or shapes:
    from mfm_jax.trainer.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
    def show(xs):
      return ", ".join(xs[:12]) + (f", … ({len(xs)} in all)" if len(xs) > 12 else "")
    raise CheckpointError(
        f"Cannot load {what}: missing {len(missing)} [{show(missing)}]; unexpected "
        f"{len(unexpected)} [{show(unexpected)}]; shape mismatches {len(shapes)} [{show(shapes)}].")
  out = {tuple(k.split("/")): np.asarray(l[k]).astype(t[k].dtype) for k in t}
  return flax.traverse_util.unflatten_dict(out)


def load_init(config: ml_collections.ConfigDict, variables: dict[str, Any]) -> dict[str, Any]:
  """Merges ``config.init_from`` into freshly initialised variables (host numpy)."""
  from mfm_jax.trainer import checkpoint  # pylint: disable=g-import-not-at-top
  path = config.init_from
  variables = jax.tree_util.tree_map(np.asarray, variables)
  model = checkpoint.load_params(path, subtree=("params", "model"))
  params = dict(variables["params"])
  if config.init_scope == "backbone":
    if "backbone" not in model:
      raise checkpoint.CheckpointError(
          f"config.init_from={path!r} has no 'backbone' parameters.")
    params["model"] = {**params["model"],
                       "backbone": merge_strict(params["model"]["backbone"], model["backbone"],
                                                f"backbone weights from {path}")}
    return {"params": params, "batch_stats": variables["batch_stats"]}
  params["model"] = merge_strict(params["model"], model, f"model weights from {path}")
  bstats = variables["batch_stats"]
  if bstats:
    bstats = merge_strict(bstats, checkpoint.load_params(path, subtree=("batch_stats",)),
                          f"BatchNorm statistics from {path}")
  return {"params": params, "batch_stats": bstats}


def load_rebuilder_init(config: ml_collections.ConfigDict, variables: dict[str, Any]
                        ) -> dict[str, Any]:
  """Merges ``config.mfm.init_from`` (e.g. the released Rebuilder, converted with
  ``python -m mfm_jax.convert --arch=rebuilder_daformer``) into ``params['rebuilder']``."""
  from mfm_jax.trainer import checkpoint  # pylint: disable=g-import-not-at-top
  path = config.mfm.init_from
  variables = jax.tree_util.tree_map(np.asarray, variables)
  loaded = checkpoint.load_params(path, subtree=("params", "rebuilder"))
  params = dict(variables["params"])
  params["rebuilder"] = merge_strict(params["rebuilder"], loaded,
                                     f"Rebuilder weights from config.mfm.init_from={path}")
  return {"params": params, "batch_stats": variables["batch_stats"]}


def _initial_state(config: ml_collections.ConfigDict, variables: dict[str, Any], tx,
                   copy=lambda t: t) -> TrainState:
  """The step-0 state from the student's variables; ``copy`` duplicates the teacher's and the
  ImageNet copy's arrays (identity for abstract shapes).

  With ``model.scan_blocks`` the MiT blocks of each stage are kept stacked (``state_layout``).
  """
  per_block, bstats = variables["params"], variables["batch_stats"]
  params = state_layout(config, per_block)
  teacher, imnet = needs_teacher(config), needs_imnet(config)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=bstats,
      opt_state=tx.init(params),
      ema_params=copy(params["model"]) if teacher else None,
      ema_batch_stats=copy(bstats) if teacher else None,
      imnet_params=state_layout(config, frozen_encoder(config, per_block["model"]["backbone"],
                                                       copy)) if imnet else None,
      imnet_batch_stats=copy(bstats.get("backbone", {})) if imnet else None,
      nonfinite=jnp.zeros((), jnp.bool_))


def frozen_encoder(config: ml_collections.ConfigDict, backbone: Any, copy=lambda t: t) -> Any:
  """The frozen ImageNet encoder's parameters as the state keeps them (per-block layout in).

  With ``model.compute_dtype='bfloat16'`` its kernels (arrays of 2 or more dimensions) are
  stored in bfloat16: Flax casts them to the compute dtype at every use anyway, so its
  features are bit-identical (tested) at half the memory (MiT-B5: 0.16 of 0.33 GB per
  device). Norm scales and biases (1-D, used in float32 by the norms) stay as they are. It is
  never updated, so nothing accumulates in the lower precision.
  """
  if config.model.compute_dtype != "bfloat16":
    return copy(backbone)
  return jax.tree_util.tree_map(
      lambda a: a.astype(jnp.bfloat16) if a.ndim >= 2 else a, copy(backbone))


def state_layout(config: ml_collections.ConfigDict, tree: Any) -> Any:
  """``tree`` (per-block MiT layout) in the train state's layout for ``config``.

  With ``model.scan_blocks`` a stage's blocks live in the state as one stacked entry
  (``mit.stack_blocks``): the step then updates, averages and clips a few hundred arrays
  instead of ~1,150 (MiT-B5) and no encoder pass stacks them, which shrinks the compiled
  program by about half. Checkpoints hold whichever layout the run used; ``checkpoint``
  converts on restore, and ``checkpoint.load_params`` always returns the per-block layout.
  """
  return mit.stack_blocks(tree) if config.model.scan_blocks else tree


def other_layout(config: ml_collections.ConfigDict, abstract_state: Any):
  """``(abstract state in the other layout, function converting such a state to this
  config's layout)``: lets a run resume a checkpoint written with the other
  ``model.scan_blocks`` setting."""
  if config.model.scan_blocks:
    return mit.unstack_blocks(abstract_state), mit.stack_blocks
  return mit.stack_blocks(abstract_state), mit.unstack_blocks


def create_train_state(config: ml_collections.ConfigDict, net: SegmentationNetwork,
                       mfm_task: MFMTask | None, tx, sharding=None) -> TrainState:
  """Initial state (placed with ``sharding``, e.g. replicated over the mesh)."""
  copy = lambda t: jax.tree_util.tree_map(jnp.array, t)  # noqa: E731
  from_variables = lambda v: _initial_state(config, v, tx, copy)  # noqa: E731
  rng = jax.random.key(config.seed)
  mfm_init = bool(config.mfm.enabled and config.mfm.rebuild and config.mfm.init_from)
  if config.init_from or mfm_init:
    variables = init_variables(config, net, mfm_task, rng)
    if config.init_from:
      variables = load_init(config, variables)
    if mfm_init:
      variables = load_rebuilder_init(config, variables)
    return jax.jit(from_variables, out_shardings=sharding)(variables)
  return jax.jit(lambda r: from_variables(init_variables(config, net, mfm_task, r)),
                 out_shardings=sharding)(rng)


def abstract_variables(config: ml_collections.ConfigDict, net: SegmentationNetwork,
                       mfm_task: MFMTask | None = None) -> dict[str, Any]:
  """Shapes/dtypes of the student's ``{'params', 'batch_stats'}`` (nothing allocated)."""
  return jax.eval_shape(lambda: init_variables(config, net, mfm_task, jax.random.key(0)))


def abstract_train_state(config, net, mfm_task, tx, sharding=None) -> TrainState:
  """Shapes/dtypes (with shardings) of the train state, without allocating it."""
  shapes = jax.eval_shape(
      lambda: _initial_state(config, init_variables(config, net, mfm_task,
                                                    jax.random.key(config.seed)), tx))
  if sharding is None:
    return shapes
  return jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def build_optimizer(config: ml_collections.ConfigDict, net, mfm_task):
  """AdamW with the reference param groups, built from the abstract parameter tree."""
  params = abstract_variables(config, net, mfm_task)["params"]
  return optim.make_optimizer(config.optim, params, config.num_steps)


def deployed_params(state: TrainState, which: str = "student") -> dict[str, Any]:
  """The inference network's variables: the segmentor alone (no Rebuilder)."""
  if which == "teacher":
    if state.ema_params is None:
      raise ValueError("This run has no EMA teacher (config.uda.enabled=False).")
    return {"params": state.ema_params, "batch_stats": state.ema_batch_stats}
  return {"params": state.params["model"], "batch_stats": state.batch_stats}
