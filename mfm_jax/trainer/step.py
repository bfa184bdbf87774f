"""The one pure UDA update function (and its jitted, data-parallel form).

The batch's images arrive as uint8 and are normalised first (``ops.normalize_images``: the
pipeline's Normalize + Pad, moved to the device). One iteration (uda_reference.md §2.1; the
reference back-propagates each term separately and accumulates gradients, which equals one
``value_and_grad`` over their sum):

1. EMA teacher update, α_t = min(1 − 1/(t+1), α) (§2.2; t = 0 copies the student).
2. Source forward + CE; ImageNet feature distance on the source features (λ_FD = 0.005).
3. Teacher forward on the clean target → pseudo-labels + confidence weight (τ = 0.968).
4. ClassMix of source/target + colour jitter + blur → weighted CE.
5. MIC: colour-augmented, block-masked target → weighted CE vs the same pseudo-labels.
6. MFM (mfm_method.md, ``mfm_jax/uda/mfm.py: MFMTask.terms``): target encoder features → latent keep
   mask → Rebuilder → decoder → CE against the pseudo-labels.
7. AdamW step.

With ``model.joint_encoder`` (MiT, plain encoder-decoder) the encoder runs once for steps 2, 4, 5
and 6's target pass together (``SegmentationNetwork.encode_many``); the decoder still runs
once per pass, so the head's BatchNorm statistics are those of each pass, as in the reference.

Randomness: every stream is ``fold_in(key(seed), step)`` split by name, so no key lives in the
state and a resumed run replays exactly.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mfm_jax import ops
from mfm_jax.models.network import SegmentationNetwork
from mfm_jax.models.network import variables
from mfm_jax.trainer import parallel
from mfm_jax.trainer.state import needs_imnet
from mfm_jax.trainer.state import needs_teacher
from mfm_jax.trainer.state import TrainState
from mfm_jax.uda import augment
from mfm_jax.uda import classmix
from mfm_jax.uda import ema
from mfm_jax.uda import feature_distance
from mfm_jax.uda import masking
from mfm_jax.uda import pseudo_labels
from mfm_jax.uda.mfm import MFMTask

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

_STREAMS = ("src", "mix_select", "mix_aug", "mix_fwd", "mic_aug", "mic_mask", "mic_fwd",
            "mfm_tgt_enc", "mfm_tgt", "mfm_src")


def make_update_fn(config: ml_collections.ConfigDict, net: SegmentationNetwork,
                   mfm_task: MFMTask | None, tx: optax.GradientTransformation,
                   *, with_grads: bool = False
                   ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """Returns the pure ``update_fn(state, batch) -> (state, metrics)`` for ``config``.

  ``with_grads=True`` adds the raw gradient pytree to the metrics as ``'grads'`` (used by the
  multi-device equality tests, which compare gradients rather than Adam-updated parameters).
  """
  uda, mfm_cfg = config.uda, config.mfm
  use_teacher = needs_teacher(config)
  use_fd = needs_imnet(config)
  use_mfm = bool(mfm_cfg.enabled) and mfm_task is not None

  def update_fn(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
    keys = dict(zip(_STREAMS, jax.random.split(rng, len(_STREAMS))))
    src_img = ops.normalize_images(batch["source_image"], batch["source_size"])
    tgt_img = ops.normalize_images(batch["target_image"], batch["target_size"])
    src_lbl = batch["source_label"]
    bsz, h, w = src_lbl.shape
    metrics: Metrics = {}

    # 1 + 3. EMA teacher and pseudo-labels (outside the gradient).
    ema_params, ema_bs = state.ema_params, state.ema_batch_stats
    pl = pw = t_feats = t_logits = t_src_feats = None
    if use_teacher:
      ema_params = ema.ema_update(ema_params, state.params["model"], state.step, uda.ema_alpha)
      t_logits, t_feats, ema_bs = net.predict(variables(ema_params, ema_bs), tgt_img, train=True)
      pl, pw = pseudo_labels.pseudo_labels(
          t_logits, (h, w), threshold=uda.pseudo_threshold, valid_mask=batch["target_valid"],
          ignore_top=uda.pseudo_ignore_top, ignore_bottom=uda.pseudo_ignore_bottom)
      metrics["ema_alpha"] = ema.ema_alpha(state.step, uda.ema_alpha)
      metrics["pseudo_weight"] = jnp.mean(pw)
      if use_mfm and mfm_cfg.objective == "feature" and mfm_cfg.domain in ("source", "both"):
        # Teacher features of the source crop for the feature-regression objective (its BN
        # statistics are not kept: this pass only provides regression targets).
        t_src_feats, _ = net.mfm_encode(variables(ema_params, ema_bs), src_img, train=True,
                                         deterministic=True)
    imnet_feats = None
    if use_fd:
      imnet_feats, _ = net.fd_encode(
          variables({"backbone": state.imnet_params}, state.imnet_batch_stats), src_img, train=False)
      imnet_feats = jax.lax.stop_gradient(net.fd_features(imnet_feats))

    # The student's train-mode batches: (images, labels, weights, rng). None of them depends on
    # the parameters, so they are built before the gradient.
    student = {"src": (src_img, src_lbl, None, keys["src"])}
    if uda.enabled:
      # 4. ClassMix + strong augmentation, weighted CE on the mixed batch.
      if uda.mix == "class":
        m = classmix.class_mix_masks(keys["mix_select"], src_lbl)
        mix_img = classmix.mix(m, src_img, tgt_img)
        mix_lbl = jnp.where(m > 0, src_lbl, pl)
        mix_w = classmix.mix(m, jnp.ones_like(pw), pw)
      else:
        mix_img, mix_lbl, mix_w = tgt_img, pl, pw
      mix_img = augment.strong_transform(
          keys["mix_aug"], mix_img, color_jitter_probability=uda.color_jitter_probability,
          color_jitter_strength=uda.color_jitter_strength, blur=uda.blur, per_sample=True)
      student["mix"] = (mix_img, mix_lbl, mix_w, keys["mix_fwd"])
      # 5. MIC masked image consistency.
      if uda.mic.enabled:
        mic_img = tgt_img
        if uda.mic.color_aug:
          mic_img = augment.strong_transform(
              keys["mic_aug"], mic_img, color_jitter_probability=uda.color_jitter_probability,
              color_jitter_strength=uda.color_jitter_strength, blur=uda.blur, per_sample=False)
        bm = masking.block_mask(keys["mic_mask"], bsz, h, w, uda.mic.block_size, uda.mic.ratio)
        student["mic"] = (mic_img * bm.astype(mic_img.dtype), pl, pw, keys["mic_fwd"])
    mfm_target = use_mfm and mfm_cfg.domain in ("target", "both")
    # model.joint_encoder: one encoder call for all of them (and MFM's clean target pass).
    joint = (config.model.joint_encoder and net.per_image_encoder
             and len(student) + int(mfm_target) > 1)

    def loss_fn(params):
      terms: dict[str, jax.Array] = {}
      bs = state.batch_stats
      feats = {}
      if joint:
        names = list(student) + (["mfm_target"] if mfm_target else [])
        images = [student[n][0] for n in student] + ([tgt_img] if mfm_target else [])
        r_enc = jax.random.split(keys["src"])[0]  # forward_loss's encoder half of the src key
        joint_feats, bs = net.encode_many(variables(params["model"], bs), images, rng=r_enc)
        feats = dict(zip(names, joint_feats))
      for name, (images, labels, weights, key) in student.items():
        v = variables(params["model"], bs)
        if joint:  # the decoder draws from the same key half as in forward_loss
          loss, bs = net.decode_loss(v, feats[name], labels, weights,
                                     rng=jax.random.split(key)[1])
        else:
          loss, feats[name], bs = net.forward_loss(v, images, labels, weights, rng=key)
        terms[f"{name}_ce"] = uda.mic.weight * loss if name == "mic" else loss
        if name == "src" and use_fd:  # 2. ImageNet feature distance on the source features
          terms["fd"] = uda.fd.weight * feature_distance.feature_distance(
              net.fd_features(feats["src"]), imnet_feats, src_lbl, classes=tuple(uda.fd.classes),
              scale_min_ratio=uda.fd.scale_min_ratio, num_classes=config.model.num_classes)
      # 6. Masked Feature Modeling (mfm_jax/uda/mfm.py owns the loss).
      if use_mfm:
        mfm_terms, bs = mfm_task.terms(
            params, net, bs, keys=keys,
            target=dict(images=tgt_img, labels=pl, weights=pw, teacher_features=t_feats,
                        teacher_logits=t_logits, features=feats.get("mfm_target")),
            source=dict(images=src_img, labels=src_lbl, features=feats["src"],
                        teacher_features=t_src_feats))
        terms.update(mfm_terms)
      total = sum(terms.values())
      return total, (terms, bs)

    (total, (terms, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics.update({f"loss/{k}": v for k, v in terms.items()})
    metrics["loss/total"] = total
    metrics["grad_norm"] = optax.tree.norm(grads)
    if with_grads:
      metrics["grads"] = grads
    finite = jnp.isfinite(total) & jnp.isfinite(metrics["grad_norm"])
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_bs,
                              opt_state=opt_state, ema_params=ema_params, ema_batch_stats=ema_bs,
                              nonfinite=state.nonfinite | ~finite)
    return new_state, metrics

  return update_fn


def jit_update_fn(config: ml_collections.ConfigDict, net: SegmentationNetwork,
                  mfm_task: MFMTask | None, tx: optax.GradientTransformation, mesh, *,
                  donate: bool = True, with_grads: bool = False
                  ) -> tuple[Callable[[TrainState, Batch], tuple[TrainState, Metrics]],
                             Callable[[], int]]:
  """``make_update_fn`` jitted for data parallelism over ``mesh`` → (step, traces).

  The state is replicated and every batch array sharded on its leading axis; ``donate`` lets
  XLA reuse the old state's buffers. ``traces()`` is how often JAX has traced the step: 1 in a
  healthy run (the train loop logs it as ``perf/step_traces``); more means a shape, dtype or
  sharding changed between calls and the step was compiled again.
  """
  update_fn = make_update_fn(config, net, mfm_task, tx, with_grads=with_grads)
  count = [0]

  def counted(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    count[0] += 1  # runs only while JAX traces
    return update_fn(state, batch)

  repl = parallel.replicated(mesh)
  step = jax.jit(counted, donate_argnums=(0,) if donate else (),
                 in_shardings=(repl, parallel.data_sharded(mesh)), out_shardings=(repl, repl))
  return step, lambda: count[0]
