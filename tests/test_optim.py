"""Tests of the optimiser: mmcv poly+warmup schedule, param groups, AdamW parity with torch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from mfm_jax.config import base
from mfm_jax.config import validation
from mfm_jax.trainer import optim

REFERENCE_KEYS = {"head": (10, 1), "pos_block": (1, 0), "norm": (1, 0)}


@pytest.mark.parametrize("t,lr", [(0, 6.0e-11), (750, 2.94e-5), (1500, 5.775e-5),
                                  (20000, 3.0e-5), (39999, 1.5e-9)])
def test_lr_schedule_reference_values(t, lr):
  sched = optim.lr_schedule(6e-5, 40000, warmup_steps=1500, warmup_ratio=1e-6, power=1.0,
                            min_lr=0.0)
  got = float(jax.jit(sched)(jnp.int32(t)))
  # uda_reference.md §2.5 quotes 3-4 significant digits (2.94e-5 is 2.94375e-5) ...
  np.testing.assert_allclose(got, lr, rtol=2e-3)
  # ... and the exact float64 mmcv formula agrees to float32 precision (no cancellation).
  exact = 6e-5 * (1 - t / 40000)
  if t < 1500:
    exact *= 1 - (1 - t / 1500) * (1 - 1e-6)
  np.testing.assert_allclose(got, exact, rtol=1e-5)


def test_lr_schedule_formula_min_lr_power():
  sched = optim.lr_schedule(1.0, 100, warmup_steps=10, warmup_ratio=0.1, power=2.0, min_lr=0.2)
  for t in (0, 3, 10, 57, 99, 100, 150):
    tt = min(t, 100)
    regular = (1.0 - 0.2) * (1 - tt / 100) ** 2 + 0.2
    if tt < 10:
      regular *= 1 - (1 - tt / 10) * (1 - 0.1)
    np.testing.assert_allclose(float(sched(t)), regular, rtol=1e-6)
  assert float(optim.lr_schedule(1.0, 10, warmup_steps=0, warmup_ratio=1e-6, power=1.0,
                                 min_lr=0.0)(0)) == 1.0
  with pytest.raises(ValueError, match="optim.py"):
    optim.lr_schedule(1.0, 0, warmup_steps=0, warmup_ratio=1e-6, power=1.0, min_lr=0.0)


def _fake_params():
  z = lambda *s: jnp.zeros(s)
  return {
      "model": {
          "backbone": {
              "block1_0": {"norm1": {"scale": z(4), "bias": z(4)},
                           "attn": {"q": {"kernel": z(4, 4), "bias": z(4)}}},
              "pos_block": {"kernel": z(2)},
              "norm4": {"scale": z(4)},
          },
          "decode_head": {"fuse_layer": {"bn": {"scale": z(3)}, "conv": {"kernel": z(3, 3)}},
                          "conv_seg": {"kernel": z(3, 2)}},
      },
      "rebuilder": {"blocks_0": {"norm1": {"scale": z(5)}}, "mask_token": z(5)},
  }


def test_param_group_labels_mmcv_semantics():
  keys = dict(REFERENCE_KEYS, rebuilder=(10, 1))
  labels = optim.param_group_labels(_fake_params(), keys)
  bb = labels["model"]["backbone"]
  assert bb["block1_0"]["norm1"] == {"scale": "norm", "bias": "norm"}
  assert bb["block1_0"]["attn"]["q"] == {"kernel": "default", "bias": "default"}
  assert bb["pos_block"]["kernel"] == "pos_block"
  assert bb["norm4"]["scale"] == "norm"
  head = labels["model"]["decode_head"]
  # 'head' and 'norm' tie on length: alphabetical order tries 'head' first.
  assert head["fuse_layer"]["bn"]["scale"] == "head"
  assert head["conv_seg"]["kernel"] == "head"
  # 'pos_block' and 'rebuilder' (9 chars) come before 'norm': the Rebuilder's norms get decay.
  assert labels["rebuilder"]["blocks_0"]["norm1"]["scale"] == "rebuilder"
  assert labels["rebuilder"]["mask_token"] == "rebuilder"
  # Longest key first: 'norm1' beats 'norm' when both are keys.
  assert optim.param_group_labels({"a": {"norm1": 0}}, {"norm": (1, 0), "norm1": (2, 1)}) == {
      "a": {"norm1": "norm1"}}


def test_optim_config_errors_name_the_key():
  """Optimizer settings are checked by config validation, before anything is built."""
  c = base.base_config()
  c.lock()  # as the command line's --config (lock_config=True): unknown keys are refused
  with pytest.raises(AttributeError, match="learning_rate"):
    c.optim.learning_rate = 1e-3
  c.optim.custom_keys = {"head": 10}
  with pytest.raises(validation.ConfigError, match=r"custom_keys\['head'\]"):
    validation.validate(c)


def test_adamw_parity_with_torch_two_groups():
  rng = np.random.default_rng(0)
  w0 = {"backbone": {"layer": {"kernel": rng.normal(size=(3, 4)).astype(np.float32)},
                     "norm": {"scale": rng.normal(size=(4,)).astype(np.float32)}},
        "decode_head": {"kernel": rng.normal(size=(4, 2)).astype(np.float32)}}
  cfg = base.base_config().optim
  cfg.update({"lr": 1e-2, "weight_decay": 0.1, "warmup_steps": 3, "warmup_ratio": 0.1,
              "custom_keys": {"head": [10.0, 1.0], "norm": [1.0, 0.0]}})
  total = 8
  tx = optim.make_optimizer(cfg, w0, total)
  params = jax.tree_util.tree_map(jnp.asarray, w0)
  state = tx.init(params)
  update = jax.jit(tx.update)

  tp = {n: torch.tensor(v, requires_grad=True) for n, v in
        (("bb", w0["backbone"]["layer"]["kernel"]), ("norm", w0["backbone"]["norm"]["scale"]),
         ("head", w0["decode_head"]["kernel"]))}
  groups = [{"params": [tp["bb"]], "lr": 1e-2, "weight_decay": 0.1},
            {"params": [tp["norm"]], "lr": 1e-2, "weight_decay": 0.0},
            {"params": [tp["head"]], "lr": 1e-1, "weight_decay": 0.1}]
  topt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
  base_lrs = [g["lr"] for g in groups]
  for t in range(6):
    grads_np = jax.tree_util.tree_map(
        lambda x: rng.normal(size=x.shape).astype(np.float32), w0)
    upd, state = update(jax.tree_util.tree_map(jnp.asarray, grads_np), state, params)
    params = optax.apply_updates(params, upd)
    # mmcv: set each group's lr from its own base before the step.
    factor = (1 - t / total) * (1 - (1 - t / 3) * (1 - 0.1) if t < 3 else 1.0)
    for g, b in zip(topt.param_groups, base_lrs):
      g["lr"] = b * factor
    tp["bb"].grad = torch.from_numpy(grads_np["backbone"]["layer"]["kernel"])
    tp["norm"].grad = torch.from_numpy(grads_np["backbone"]["norm"]["scale"])
    tp["head"].grad = torch.from_numpy(grads_np["decode_head"]["kernel"])
    topt.step()
  np.testing.assert_allclose(params["backbone"]["layer"]["kernel"], tp["bb"].detach().numpy(),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(params["backbone"]["norm"]["scale"], tp["norm"].detach().numpy(),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(params["decode_head"]["kernel"], tp["head"].detach().numpy(),
                             rtol=1e-5, atol=1e-6)
  # The groups really differ: the head moved ~10x more than the backbone in total.
  moved = lambda a, b: np.abs(np.asarray(a) - b).mean()
  assert moved(params["decode_head"]["kernel"], w0["decode_head"]["kernel"]) > 5 * moved(
      params["backbone"]["layer"]["kernel"], w0["backbone"]["layer"]["kernel"])


def test_make_optimizer_reference_config():
  cfg = base.base_config().optim  # the reference: lr 6e-5, head ×10, rebuilder ×10
  params = _fake_params()
  for c in (cfg, dict(cfg.to_dict())):
    tx = optim.make_optimizer(c, params, 40000)
    state = jax.eval_shape(tx.init, params)  # works on abstract shapes (sharded init)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    upd, _ = tx.update(grads, tx.init(params), params)
    # First step (t = 0): |update| = lr(0) * lr_mult for Adam with g = 1 (m_hat/sqrt(v_hat) = 1).
    np.testing.assert_allclose(upd["model"]["decode_head"]["conv_seg"]["kernel"], -6e-10, rtol=1e-3)
    np.testing.assert_allclose(upd["model"]["backbone"]["norm4"]["scale"], -6e-11, rtol=1e-3)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(state))


def test_stacked_blocks_get_the_groups_and_updates_of_their_blocks():
  """model.scan_blocks keeps a stage's blocks stacked in the state: each stacked array is in
  the group of the arrays it stacks, and AdamW's update is the per-block update, stacked."""
  from mfm_jax.models import mit  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  block = lambda: {"norm1": {"scale": rng.normal(size=(4,)).astype(np.float32)},  # noqa: E731
                   "attn": {"q": {"kernel": rng.normal(size=(4, 4)).astype(np.float32)}}}
  params = {"model": {"backbone": {"block2_0": block(), "block2_1": block(), "block2_2": block(),
                                   "norm2": {"scale": np.ones(4, np.float32)}},
                      "decode_head": {"conv_seg": {"kernel": np.ones((4, 3), np.float32)}}}}
  stacked = mit.stack_blocks(params)
  labels = optim.param_group_labels(stacked, REFERENCE_KEYS)
  per_block = optim.param_group_labels(params, REFERENCE_KEYS)["model"]["backbone"]
  assert {per_block[f"block2_{j}"]["norm1"]["scale"] for j in range(3)} == {"norm"}
  assert labels["model"]["backbone"]["blocks2"]["norm1"]["scale"] == "norm"
  assert labels["model"]["backbone"]["blocks2"]["attn"]["q"]["kernel"] == optim.DEFAULT_GROUP
  cfg = base.base_config().optim
  grads = jax.tree.map(lambda p: np.asarray(rng.normal(size=p.shape), np.float32), params)
  updates, states = {}, {}
  for name, tree, g in (("blocks", params, grads),
                        ("stacked", stacked, mit.stack_blocks(grads))):
    tx = optim.make_optimizer(cfg, tree, 100)
    state = tx.init(tree)
    for _ in range(3):
      upd, state = tx.update(g, state, tree)
    updates[name], states[name] = upd, state
  # The optimizer state converts both ways too, masked (array-less) group entries included.
  unstacked = mit.unstack_blocks(states["stacked"])
  assert jax.tree.structure(unstacked) == jax.tree.structure(states["blocks"])
  for a, b in zip(jax.tree.leaves(unstacked), jax.tree.leaves(states["blocks"])):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(mit.stack_blocks(updates["blocks"])),
                  jax.tree.leaves(updates["stacked"])):
    np.testing.assert_allclose(a, b, rtol=1e-6)
