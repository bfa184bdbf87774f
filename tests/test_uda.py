"""Tests of the pure UDA helpers: EMA, CE, pseudo-labels, ClassMix, block masks, FD, MFM."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mfm_jax.data.labels import THING_CLASSES
from mfm_jax.uda import augment
from mfm_jax.uda import classmix
from mfm_jax.uda import ema
from mfm_jax.uda import feature_distance
from mfm_jax.uda import losses
from mfm_jax.uda import masking
from mfm_jax.uda import mfm
from mfm_jax.uda import pseudo_labels

# The reference feature-distance settings (config.uda.fd: thing classes, scale_min_ratio 0.75).
_FD = dict(classes=THING_CLASSES, scale_min_ratio=0.75, num_classes=19)


def _to_torch_nchw(x):
  return torch.from_numpy(np.asarray(x, np.float32)).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------- EMA
def test_ema_alpha_schedule():
  got = [float(ema.ema_alpha(t, 0.999)) for t in (0, 1, 10, 998, 999, 5000)]
  np.testing.assert_allclose(got, [0.0, 0.5, 1 - 1 / 11, 1 - 1 / 999, 0.999, 0.999], rtol=1e-6)
  assert float(ema.ema_alpha(1, alpha_max=0.3)) == pytest.approx(0.3)
  assert float(jax.jit(ema.ema_alpha)(jnp.int32(10), 0.999)) == pytest.approx(10 / 11, rel=1e-6)


def test_ema_update_values_and_step0_copy():
  e = {"a": jnp.full((3,), 2.0), "b": {"c": jnp.zeros((2, 2), jnp.bfloat16)}}
  p = {"a": jnp.full((3,), 4.0), "b": {"c": jnp.ones((2, 2), jnp.bfloat16)}}
  out = jax.jit(ema.ema_update)(e, p, jnp.int32(1), 0.999)
  np.testing.assert_allclose(out["a"], 3.0)
  assert out["b"]["c"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out["b"]["c"], np.float32), 0.5)
  copy = ema.ema_update(e, p, 0, 0.999)
  np.testing.assert_array_equal(copy["a"], p["a"])
  late = ema.ema_update(e, p, 10_000, 0.99)
  np.testing.assert_allclose(late["a"], 0.99 * 2 + 0.01 * 4, rtol=1e-6)
  with pytest.raises(ValueError, match="ema.py"):
    ema.ema_update(e, {"a": p["a"]}, 1, 0.999)


# ------------------------------------------------------------------------------------------ CE
@pytest.mark.parametrize("use_weight", [False, True])
def test_cross_entropy_matches_torch(use_weight):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 5, 6)).astype(np.float32) * 3
  labels = rng.integers(0, 6, size=(2, 8, 10)).astype(np.int32)
  labels[0, :3] = 255
  weight = rng.uniform(size=(2, 8, 10)).astype(np.float32) if use_weight else None
  got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                             None if weight is None else jnp.asarray(weight))
  t_logits = F.interpolate(_to_torch_nchw(logits), size=(8, 10), mode="bilinear",
                           align_corners=False)
  ref = F.cross_entropy(t_logits, torch.from_numpy(labels).long(), ignore_index=255,
                        reduction="none")
  if weight is not None:
    ref = ref * torch.from_numpy(weight)
  np.testing.assert_allclose(float(got), float(ref.mean()), rtol=1e-5)


def test_cross_entropy_bf16_and_ignored_pixels_count():
  logits = jnp.zeros((1, 2, 2, 4), jnp.bfloat16)
  labels = jnp.array([[[0, 255], [255, 255]]], jnp.int32)
  # Uniform logits: CE = log 4 on the single valid pixel, divided by all 4 pixels.
  got = losses.cross_entropy(logits, labels)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), math.log(4) / 4, rtol=1e-6)


# ------------------------------------------------------------------------------- pseudo-labels
def test_pseudo_labels_fraction_rows_and_mask():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
  logits[0, :2, :, 1] += 20.0  # confident pixels in sample 0 only
  size = (8, 8)
  valid = np.ones((2, 8, 8), np.float32)
  valid[1, :, :2] = 0
  labels, weights = pseudo_labels.pseudo_labels(
      jnp.asarray(logits), size, threshold=0.968, valid_mask=jnp.asarray(valid), ignore_top=1,
      ignore_bottom=2)
  probs = torch.softmax(F.interpolate(_to_torch_nchw(logits), size=size, mode="bilinear",
                                      align_corners=False), dim=1)
  max_p, arg = probs.max(dim=1)
  np.testing.assert_array_equal(labels, arg.numpy())
  fraction = float((max_p >= 0.968).float().mean())
  assert 0.0 < fraction < 1.0
  expected = np.full((2, 8, 8), fraction, np.float32)
  expected[:, :1] = 0
  expected[:, -2:] = 0
  expected *= valid
  np.testing.assert_allclose(weights, expected, rtol=1e-6)
  assert labels.dtype == jnp.int32 and weights.dtype == jnp.float32


def test_pseudo_labels_no_threshold_and_bad_rows():
  logits = jnp.zeros((1, 2, 2, 3))
  _, w = pseudo_labels.pseudo_labels(logits, (4, 4), threshold=None, ignore_bottom=1)
  np.testing.assert_array_equal(w[0, :3], 1.0)
  np.testing.assert_array_equal(w[0, 3], 0.0)
  with pytest.raises(ValueError, match="pseudo_labels.py"):
    pseudo_labels.pseudo_labels(logits, (4, 4), 0.968, ignore_top=3, ignore_bottom=3)


# ------------------------------------------------------------------------------------ ClassMix
def _mix_labels():
  lab = np.zeros((2, 6, 6), np.int32)
  lab[0, :2] = 3
  lab[0, 2:4] = 7
  lab[0, 4:] = 255
  lab[1, :3] = 3
  lab[1, 3:] = 5
  return jnp.asarray(lab)  # whole-batch classes {3, 5, 7, 255} -> n = 4


def test_class_mix_chosen_count_and_masks():
  labels = _mix_labels()
  present = classmix.class_presence(labels)
  assert set(np.flatnonzero(np.asarray(present))) == {3, 5, 7, 255}
  seen_255 = False
  for seed in range(20):
    key = jax.random.key(seed)
    chosen = np.asarray(classmix.chosen_classes(key, present, 2))
    assert (chosen.sum(1) == 2).all()  # ceil(4 / 2)
    assert not (chosen & ~np.asarray(present)[None]).any()
    mask = np.asarray(jax.jit(classmix.class_mix_masks)(key, labels))
    np.testing.assert_array_equal(mask, chosen[np.arange(2)[:, None, None], np.asarray(labels)])
    seen_255 |= bool(mask[0, 4:].any())
  assert seen_255  # the 255 quirk: ignore pixels can be pasted as a "class"


def test_class_mix_odd_count_and_whole_batch_candidates():
  lab = np.zeros((2, 4, 4), np.int32)
  lab[0, :, :2] = 1
  lab[1] = 2  # sample 1 alone has one class, but the candidates are the batch's {0, 1, 2}
  present = classmix.class_presence(jnp.asarray(lab))
  counts = set()
  for seed in range(10):
    chosen = np.asarray(classmix.chosen_classes(jax.random.key(seed), present, 2))
    assert (chosen.sum(1) == 2).all()  # ceil(3 / 2)
    counts.add(bool(chosen[1, 2]))
  assert counts == {True, False}  # sample 1's class is sometimes not chosen -> empty mask


def test_mix_images_and_labels():
  mask = jnp.array([[[1.0, 0.0]]])
  a = jnp.ones((1, 1, 2, 3))
  b = jnp.zeros((1, 1, 2, 3))
  np.testing.assert_array_equal(classmix.mix(mask, a, b)[0, 0], [[1, 1, 1], [0, 0, 0]])
  la = jnp.array([[[4, 4]]], jnp.int32)
  lb = jnp.array([[[9, 255]]], jnp.int32)
  out = classmix.mix(mask, la, lb)
  assert out.dtype == jnp.int32
  np.testing.assert_array_equal(out, [[[4, 255]]])
  np.testing.assert_allclose(classmix.mix(mask, jnp.ones((1, 1, 2)), jnp.full((1, 1, 2), 0.3)),
                             [[[1.0, 0.3]]])


# ---------------------------------------------------------------------------------- block mask
def test_block_mask_ratio_and_blocks():
  m = np.asarray(jax.jit(masking.block_mask, static_argnums=(1, 2, 3, 4, 5))(
      jax.random.key(0), 4, 64, 64, 4, 0.7))
  assert m.shape == (4, 64, 64, 1) and set(np.unique(m)) <= {0.0, 1.0}
  assert abs(m.mean() - 0.3) < 0.05
  blocks = m[..., 0].reshape(4, 16, 4, 16, 4)
  assert (blocks == blocks[:, :, :1, :, :1]).all()  # constant inside each 4x4 block
  assert not (m[0] == m[1]).all()  # independent per sample
  assert masking.block_mask(jax.random.key(1), 1, 8, 8, 4, 0.0).min() == 1.0


def test_block_mask_grid_rounding():
  # round(72 / 16) = round(4.5) = 4 (Python rounding, like the reference) -> 4x4 grid.
  m = np.asarray(masking.block_mask(jax.random.key(3), 2, 72, 40, 16, 0.5))[..., 0]
  idx_h = np.floor(np.arange(72) * 4 / 72).astype(int)
  idx_w = np.floor(np.arange(40) * 2 / 40).astype(int)  # round(2.5) = 2
  grid = m[:, [list(idx_h).index(i) for i in range(4)]][:, :, [list(idx_w).index(j)
                                                               for j in range(2)]]
  np.testing.assert_array_equal(m, grid[:, idx_h][:, :, idx_w])


# ---------------------------------------------------------------------------- feature distance
def test_downscale_label_ratio_hand_example():
  lab = np.array([[
      [11, 11, 6, 6, 0, 1],
      [11, 255, 6, 6, 0, 1],
      [255, 255, 2, 2, 3, 3],
      [255, 255, 2, 255, 3, 3],
  ]], np.int32)
  got = feature_distance.downscale_label_ratio(jnp.asarray(lab), 2, 0.75, 19)
  np.testing.assert_array_equal(got, [[[11, 6, 255], [255, 2, 3]]])


def test_feature_distance_value_and_safe_grads():
  rng = np.random.default_rng(2)
  s = rng.normal(size=(2, 2, 3, 4)).astype(np.float32)
  i = rng.normal(size=(2, 2, 3, 4)).astype(np.float32)
  lab = np.full((2, 8, 12), 0, np.int32)
  lab[0, :4, :4] = 13  # one thing cell (car) in sample 0
  lab[1, 4:, 8:] = 18  # one in sample 1
  got = feature_distance.feature_distance(jnp.asarray(s), jnp.asarray(i), jnp.asarray(lab),
                                         **_FD)
  d = np.linalg.norm(s - i, axis=-1)
  np.testing.assert_allclose(float(got), (d[0, 0, 0] + d[1, 1, 2]) / 2, rtol=1e-6)
  # Equal features: value 0, gradient 0 (not NaN) at the zero difference.
  fd = lambda x: feature_distance.feature_distance(x, jnp.asarray(s), jnp.asarray(lab), **_FD)
  val, grad = jax.value_and_grad(fd)(jnp.asarray(s))
  assert float(val) == 0.0 and np.isfinite(grad).all() and not np.asarray(grad).any()
  # Empty thing mask: 0 with a zero gradient.
  no_things = jnp.zeros_like(jnp.asarray(lab))
  val, grad = jax.value_and_grad(
      lambda x: feature_distance.feature_distance(x, jnp.asarray(i), no_things, **_FD))(
          jnp.asarray(s))
  assert float(val) == 0.0 and np.isfinite(grad).all() and not np.asarray(grad).any()
  # classes=None averages every pixel.
  allpix = feature_distance.feature_distance(jnp.asarray(s), jnp.asarray(i), no_things,
                                             **{**_FD, "classes": None})
  np.testing.assert_allclose(float(allpix), d.mean(), rtol=1e-6)


# ----------------------------------------------------------------------------------------- MFM
def test_level_mask_and_mask_features():
  keep = jnp.array([[[0.0, 1.0], [1.0, 0.0]]])
  lm = mfm.level_mask(keep, (4, 4))  # 1 = masked, nearest (PyTorch rule)
  np.testing.assert_array_equal(lm[0, :, :, 0], [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1],
                                                 [0, 0, 1, 1]])
  np.testing.assert_array_equal(mfm.level_mask(keep, (3, 3))[0, :, :, 0],
                                [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
  rng = np.random.default_rng(3)
  feat = jnp.asarray(rng.normal(size=(1, 4, 4, 5)).astype(np.float32))
  vis = np.asarray(lm[..., 0]) == 0
  zeroed = np.asarray(mfm.mask_features(feat, lm))
  assert not zeroed[~vis].any()
  np.testing.assert_array_equal(zeroed[vis], np.asarray(feat)[vis])
  with pytest.raises(ValueError, match="mfm.py"):
    mfm.mask_features(feat, lm[:, :2])


def test_feature_regression_loss():
  rng = np.random.default_rng(4)
  r = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
  t = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
  m = (rng.uniform(size=(2, 3, 3, 1)) > 0.5).astype(np.float32)
  got = mfm.feature_regression_loss(jnp.asarray(r), jnp.asarray(t), jnp.asarray(m))
  per = ((r - t) ** 2).mean(-1)
  np.testing.assert_allclose(float(got), per[m[..., 0] > 0].mean(), rtol=1e-6)
  zero = jnp.zeros((2, 3, 3, 1))
  val, g = jax.value_and_grad(mfm.feature_regression_loss)(jnp.asarray(r), jnp.asarray(t), zero)
  assert float(val) == 0.0 and not np.asarray(g).any()


def test_patchify_targets_and_pixel_loss():
  rng = np.random.default_rng(5)
  img = rng.normal(size=(2, 8, 12, 3)).astype(np.float32)
  tgt = np.asarray(mfm.patchify_targets(jnp.asarray(img), 4))
  assert tgt.shape == (2, 4, 4, 2 * 3 * 3)
  cell = img[1, 2:4, 6:9].reshape(-1)  # cell (1, 2) of sample 1, (row, col, channel) order
  ref = (cell - cell.mean()) / np.sqrt(cell.var(ddof=1) + 1e-6)
  np.testing.assert_allclose(tgt[1, 1, 2], ref, rtol=1e-5, atol=1e-6)
  pred = rng.normal(size=tgt.shape).astype(np.float32)
  cells = rng.uniform(size=(2, 4, 4)) > 0.5
  got = mfm.pixel_regression_loss(jnp.asarray(pred), jnp.asarray(tgt), jnp.asarray(cells))
  np.testing.assert_allclose(float(got), ((pred - tgt) ** 2).mean(-1)[cells].mean(), rtol=1e-5)
  none = mfm.pixel_regression_loss(jnp.asarray(pred), jnp.asarray(tgt), jnp.zeros((2, 4, 4), bool))
  assert float(none) == 0.0
  with pytest.raises(ValueError, match="patchify_targets"):
    mfm.patchify_targets(jnp.asarray(img), 5)


# -------------------------------------------------------------------------- sharded batch / jit
def test_helpers_under_jit_with_sharded_batch():
  devices = np.array(jax.devices())
  assert devices.size == 4
  mesh = jax.sharding.Mesh(devices, ("data",))
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rng = np.random.default_rng(6)
  labels = rng.integers(0, 19, size=(4, 32, 32)).astype(np.int32)
  labels[:, :4] = 255
  logits = rng.normal(size=(4, 8, 8, 19)).astype(np.float32)
  feats = rng.normal(size=(4, 2, 2, 8)).astype(np.float32)
  images = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)

  def step(key, labels, logits, feats, images):
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    pl, pw = pseudo_labels.pseudo_labels(logits, (32, 32), 0.968, ignore_top=2)
    cm = classmix.class_mix_masks(k1, labels)
    mixed_lab = classmix.mix(cm, labels, pl)
    ce = losses.cross_entropy(logits, mixed_lab, classmix.mix(cm, jnp.ones_like(pw), pw))
    bm = masking.block_mask(k2, 4, 32, 32, 8, 0.7)
    keep = mfm.keep_mask(k3, 4, (2, 2), 0.4)
    fused = mfm.mask_features(feats, mfm.level_mask(keep, (2, 2)))
    fd = feature_distance.feature_distance(fused, feats, labels, **_FD)
    # p = -1: the jitter draw always passes; blur = True with p(0.5) per key.
    aug1 = augment.strong_transform(k4, images, color_jitter_probability=-1.0)
    aug2 = augment.strong_transform(k5, images * bm, color_jitter_probability=-1.0,
                                    per_sample=False)
    return ce, fd, cm, bm, pw, aug1, aug2

  key = jax.random.key(0)
  args = (labels, logits, feats, images)
  ref = jax.jit(step)(key, *args)
  sharded = [jax.device_put(a, shard) for a in args]
  got = jax.jit(step)(key, *sharded)
  for r, g in zip(ref, got):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone,scan", [("mit_b0", True), ("resnet_tiny_v1c", False)])
def test_bf16_frozen_imagenet_encoder_gives_identical_features(backbone, scan):
  """compute_dtype=bfloat16 stores the frozen ImageNet encoder's kernels in bfloat16 (half the
  memory); its feature-distance features are bit-identical to those of the float32 copy."""
  from mfm_jax.config import fragments  # pylint: disable=g-import-not-at-top
  from mfm_jax.models import mit  # pylint: disable=g-import-not-at-top
  from mfm_jax.trainer import state as state_lib  # pylint: disable=g-import-not-at-top
  c = fragments.compose(fragments.daformer, presets="synthetic,bf16")
  c.model.backbone, c.model.scan_blocks = backbone, scan
  if backbone.startswith("resnet"):
    fragments.deeplabv2(c)
  net = state_lib.build_network(c)
  abstract = state_lib.abstract_train_state(c, net, None, state_lib.build_optimizer(c, net, None))
  kernels = [a for a in jax.tree.leaves(mit.unstack_blocks(abstract.imnet_params)) if a.ndim >= 2]
  assert kernels and all(a.dtype == jnp.bfloat16 for a in kernels)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(abstract.params))
  v = jax.jit(lambda: state_lib.init_variables(c, net, None, jax.random.key(0)))()
  stored = state_lib.state_layout(c, state_lib.frozen_encoder(c, v["params"]["model"]["backbone"]))
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))

  @jax.jit
  def features(backbone_params):
    p = {**v["params"]["model"], "backbone": backbone_params}
    return net.fd_features(net.fd_encode({"params": p, "batch_stats": v["batch_stats"]}, x)[0])

  got = features(stored)
  want = features(state_lib.state_layout(c, v["params"]["model"]["backbone"]))
  assert got.dtype == want.dtype and bool((got == want).all())
