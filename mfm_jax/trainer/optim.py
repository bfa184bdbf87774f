"""Optimiser of the reference: AdamW + mmcv-1.3.7 poly schedule with linear warmup, param groups.

uda_reference.md §2.5 / §2.7: AdamW(lr 6e-5, betas (0.9, 0.999), eps 1e-8, weight_decay 0.01),
decoupled decay as ``torch.optim.AdamW``; mmcv ``DefaultOptimizerConstructor`` custom keys
``{'head': (10, 1), 'pos_block': (1, 0), 'norm': (1, 0)}`` matched by substring against the full
parameter name, longest key first (ties alphabetical), first match wins; poly decay (power 1,
min_lr 0) per iteration with a 1500-iteration linear warmup from ratio 1e-6.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

DEFAULT_GROUP = "default"

def lr_schedule(base_lr: float, total_steps: int, warmup_steps: int, warmup_ratio: float,
                power: float, min_lr: float):
  """mmcv 1.3.7 ``PolyLrUpdaterHook`` with linear warmup, as an optax schedule ``t -> lr``.

  regular(t) = (base - min_lr) * (1 - t/T)^power + min_lr; for t < W the warmup multiplies it
  by 1 - (1 - t/W)(1 - ratio), evaluated here as ratio + (t/W)(1 - ratio) (same value, no
  float32 cancellation at t = 0). t is the number of completed updates (optax ``count``), which
  is mmcv's ``runner.iter`` at ``before_train_iter``. t is clipped to [0, T].
  """
  if total_steps <= 0:
    raise ValueError(f"mfm_jax/trainer/optim.py: total_steps must be > 0, got {total_steps}.")
  if warmup_steps < 0 or not 0.0 <= warmup_ratio <= 1.0:
    raise ValueError(
        f"mfm_jax/trainer/optim.py: invalid warmup (warmup_steps={warmup_steps}, "
        f"warmup_ratio={warmup_ratio}).")

  def schedule(count):
    t = jnp.clip(jnp.asarray(count, jnp.float32), 0.0, float(total_steps))
    # (T - t) / T rather than 1 - t / T: exact remaining fraction near the end of training.
    coeff = jnp.power((total_steps - t) / total_steps, power)
    lr = (base_lr - min_lr) * coeff + min_lr
    if warmup_steps > 0:
      warm = warmup_ratio + (t / warmup_steps) * (1.0 - warmup_ratio)
      lr = jnp.where(t < warmup_steps, lr * warm, lr)
    return lr

  return schedule


def _path_name(path) -> str:
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    else:
      parts.append(str(k))
  return ".".join(parts)


def _sorted_keys(custom_keys: Mapping[str, Any]) -> list[str]:
  # mmcv: sorted(sorted(keys), key=len, reverse=True) -> longest first, ties alphabetical.
  return sorted(sorted(custom_keys), key=len, reverse=True)


def param_group_labels(params, custom_keys: Mapping[str, Any]):
  """Pytree of group names: the first custom key (longest first) contained in the param path.

  The path is the '.'-joined key path (e.g. 'model.decode_head.fuse_layer.bn.scale'); params
  matching no key get ``DEFAULT_GROUP``.
  """
  if DEFAULT_GROUP in custom_keys:
    raise ValueError(f"mfm_jax/trainer/optim.py: custom key {DEFAULT_GROUP!r} is reserved.")
  keys = _sorted_keys(custom_keys)

  def label(path, _):
    name = _path_name(path)
    for key in keys:
      if key in name:
        return key
    return DEFAULT_GROUP

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(optim_cfg, params, total_steps: int) -> optax.GradientTransformation:
  """AdamW per parameter group (lr = schedule(base * lr_mult), wd = wd * decay_mult).

  Args:
    optim_cfg: ``config.optim`` (validated; keys and defaults in ``mfm_jax/config/base.py``):
      lr, weight_decay, b1, b2, eps, warmup_steps, warmup_ratio, power, min_lr, custom_keys
      (substring → (lr_mult, decay_mult)). A mapping with these keys works too.
    params: the parameter pytree (or its abstract shapes) the optimiser will update; its labels
      are recomputed from the tree passed to ``init``/``update``.
    total_steps: T of the poly decay (40000 in the reference).

  Returns:
    An ``optax.multi_transform`` over the groups.
  """
  cfg = optim_cfg
  custom = {str(k): (float(v[0]), float(v[1])) for k, v in dict(cfg["custom_keys"]).items()}
  labels = param_group_labels(params, custom)
  if not jax.tree_util.tree_leaves(labels):
    raise ValueError("mfm_jax/trainer/optim.py: make_optimizer got an empty parameter tree.")
  mults = dict(custom)
  mults[DEFAULT_GROUP] = (1.0, 1.0)
  transforms = {}
  for group, (lr_mult, decay_mult) in mults.items():
    # mmcv scales the group's base lr; min_lr is not scaled (PolyLrUpdaterHook.get_lr).
    sched = lr_schedule(cfg["lr"] * lr_mult, total_steps, int(cfg["warmup_steps"]),
                        float(cfg["warmup_ratio"]), float(cfg["power"]), float(cfg["min_lr"]))
    # optax.adamw = torch AdamW: eps outside the sqrt, decay decoupled and scaled by the lr.
    transforms[group] = optax.adamw(
        sched, b1=float(cfg["b1"]), b2=float(cfg["b2"]), eps=float(cfg["eps"]),
        weight_decay=float(cfg["weight_decay"]) * decay_mult)
  return optax.multi_transform(transforms, lambda p: param_group_labels(p, custom))
