"""Tests for the HRDA segmentor (models/hrda_head.py) and network wrapper (models/hrda.py), uda_reference.md §1.4.

Fusion/box/window arithmetic is checked on hand-made arrays; forwards use ``mit_tiny`` with a
64² outer crop and a 32² detail crop; the MiT-B5 parameter counts are only traced (eval_shape).
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mfm_jax import ops
from mfm_jax.config import base
from mfm_jax.config import validation
from mfm_jax.evaluation import sliding
from mfm_jax.models import hrda
from mfm_jax.models import hrda_head
from mfm_jax.models import segmentor
from mfm_jax.trainer import state as state_lib
from mfm_jax.uda import losses

from reference_data import STATEDICTS as _STATEDICTS  # noqa: E402

K = 19


def _config(**hrda_overrides):
  c = base.base_config()
  c.model.backbone = "mit_tiny"
  c.model.head_embed_dim = 32
  c.data.crop_size = (64, 64)
  c.uda.pseudo_ignore_top = c.uda.pseudo_ignore_bottom = 0  # 15 + 120 rows exceed a 64 crop
  c.model.hrda = ml_collections.ConfigDict(dict(
      enabled=True, scales=(1.0, 0.5), hr_crop_size=(32, 32), crop_coord_divisible=8,
      hr_loss_weight=0.1, attention_classwise=True, hr_slide_inference=True,
      hr_slide_stride=(16, 16), mfm_features="context"))
  c.model.hrda.update(hrda_overrides)
  return c


def _images(seed=0, b=2, size=64):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(b, size, size, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, K, size=(b, size, size)), jnp.int32)
  return x, y


@pytest.fixture(scope="module")
def tiny():
  net = hrda.build_network(_config())
  x, _ = _images()
  variables = jax.jit(lambda: net.model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, train=False))()
  return net, {"params": variables["params"], "batch_stats": variables["batch_stats"]}


# ------------------------------------------------------------------ fusion math (hand-made)

def test_fuse_zero_attention_is_upsampled_lr():
  rng = np.random.default_rng(1)
  lr = jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32)
  hr = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  out = hrda_head.fuse(lr, jnp.zeros((2, 4, 4, 3)), hr)
  np.testing.assert_allclose(out, ops.resize_bilinear(lr, (8, 8)), atol=1e-6)


def test_fuse_full_attention_inside_box_is_hr_and_masked_outside():
  lr = jnp.full((1, 8, 8, 2), 5.0)
  hr = jnp.zeros((1, 16, 16, 2)).at[:, 4:12, 4:12].set(-3.0)  # detail crop pasted at box/4
  # Attention 1 everywhere, but the LR box (2..6) masks it to 0 outside the crop.
  out = np.asarray(hrda_head.fuse(lr, jnp.ones((1, 8, 8, 2)), hr, lr_box=(2, 6, 2, 6)))
  np.testing.assert_allclose(out[0, 6:10, 6:10], -3.0, atol=1e-6)  # HR only inside
  np.testing.assert_allclose(out[0, :2, :], 5.0, atol=1e-6)  # LR only away from the crop
  np.testing.assert_allclose(out[0, :, 14:], 5.0, atol=1e-6)
  # Without the box the whole map would be HR (zeros outside the pasted crop).
  unmasked = np.asarray(hrda_head.fuse(lr, jnp.ones((1, 8, 8, 2)), hr))
  np.testing.assert_allclose(unmasked[0, :2], 0.0, atol=1e-6)


def test_non_classwise_attention_broadcasts():
  lr = jnp.full((1, 4, 4, 3), 2.0)
  hr = jnp.full((1, 8, 8, 3), 4.0)
  out = hrda_head.fuse(lr, jnp.full((1, 4, 4, 1), 0.25), hr)
  np.testing.assert_allclose(out, 0.25 * 4.0 + 0.75 * 2.0, atol=1e-6)


# ------------------------------------------------------------------ crop-box arithmetic

def test_crop_offsets_multiples_of_8_inside_and_cover_reference_range():
  keys = jax.random.split(jax.random.key(3), 3000)
  ys, xs = jax.jit(jax.vmap(lambda k: hrda.crop_offsets(k, (1024, 1024), (512, 512), 8)))(keys)
  ys, xs = np.asarray(ys), np.asarray(xs)
  for v in (ys, xs):
    assert np.all(v % 8 == 0) and v.min() >= 0 and v.max() + 512 <= 1024
    assert set(v.tolist()) == set(range(0, 505, 8))  # {0, 8, …, 504} (§1.4)
  # Non-square: a crop equal to the image gives offset 0; margin 64 → {0, …, 56} (as the
  # reference, (margin + 1) // 8 choices: the last position is never drawn).
  ys, xs = jax.vmap(lambda k: hrda.crop_offsets(k, (64, 96), (64, 32), 8))(keys[:200])
  assert np.all(np.asarray(ys) == 0) and np.asarray(xs).max() == 56


def test_detail_boxes_lr_box_is_hr_box_over_8():
  for y1, x1 in ((0, 0), (8, 496), (504, 256)):
    b = hrda.detail_boxes(y1, x1, (512, 512), 4, 0.5)
    assert b["pixel"] == (y1, y1 + 512, x1, x1 + 512)
    assert b["hr_out"] == tuple(v // 4 for v in b["pixel"])
    assert b["lr_out"] == tuple(v // 8 for v in b["pixel"])
    assert all(v * 8 == p for v, p in zip(b["lr_out"], b["pixel"]))  # exact, no rounding
    assert b["lr_out"][1] - b["lr_out"][0] == 64  # 512 px crop = 64 cells of the 128² LR map
  assert hrda.centre_offsets((1024, 1024), (512, 512), 8) == (256, 256)
  assert hrda.centre_offsets((64, 96), (32, 32), 8) == (16, 32)


# ------------------------------------------------------------------ sliding windows

def test_hr_slide_windows_cover_every_pixel():
  windows, boxes = hrda.slide_boxes(1024, 1024, (512, 512), (256, 256), 4)
  assert len(windows) == 9  # 3x3 windows of 512 per 1024 window (§1.4 test_cfg)
  count = sliding.window_count_map(boxes, (256, 256))
  assert count.min() >= 1 and count.max() == 4 and count[0, 0] == 1
  # A size that needs a clamped last window: still every pixel, windows inside the image.
  windows, boxes = hrda.slide_boxes(96, 160, (64, 64), (32, 32), 4)
  assert all(y2 <= 96 and x2 <= 160 and y2 - y1 == 64 and x2 - x1 == 64
             for y1, y2, x1, x2 in windows)
  assert sliding.window_count_map(boxes, (24, 40)).min() >= 1
  with pytest.raises(ValueError, match="output stride 4"):
    hrda.slide_boxes(66, 64, (32, 32), (16, 16), 4)


def test_merge_windows_averages_by_count():
  boxes = [(0, 4, 0, 4), (0, 4, 2, 6)]
  logits = jnp.concatenate([jnp.full((1, 4, 4, 1), 1.0), jnp.full((1, 4, 4, 1), 3.0)])
  out = np.asarray(hrda.merge_windows(logits, boxes, 1, (4, 6)))[0, 0, :, 0]
  np.testing.assert_allclose(out, [1, 1, 2, 2, 3, 3])
  with pytest.raises(ValueError, match="uncovered"):
    hrda.merge_windows(logits[:1], boxes[:1], 1, (4, 6))


# ------------------------------------------------------------------ model structure and counts

def test_hrda_mitb5_parameter_count_and_names():
  c = _config(hr_crop_size=(32, 32))
  c.model.backbone, c.model.head_embed_dim = "mit_b5", 256
  model = hrda.build_network(c).model
  shapes = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(0)}, jnp.zeros((1, 64, 64, 3)),
      train=False))
  params = shapes["params"]
  assert set(params) == {"backbone", "decode_head"}
  assert set(params["decode_head"]) == {"head", "scale_attention"}
  assert segmentor.count_params(params) == 85_685_990  # §1.4 "extra params" (executed)
  assert segmentor.count_params(params["decode_head"]["scale_attention"]) == 530_707
  assert set(params["decode_head"]["scale_attention"]["fuse_layer"]) == {"conv", "bn"}
  # Same totals as the torch state_dict dump (weights vs BN running statistics).
  path = os.path.join(_STATEDICTS, "statedict_hrda_daformer_mitb5.tsv")
  if os.path.exists(path):
    n_params = n_stats = 0
    for line in open(path):
      name, shape = line.split("\t")[:2]
      size = int(np.prod(eval(shape))) if shape != "[]" else 1  # pylint: disable=eval-used
      if name.endswith("num_batches_tracked"):
        continue
      if name.endswith(("running_mean", "running_var")):
        n_stats += size
      else:
        n_params += size
    assert n_params == 85_685_990
    assert segmentor.count_params(shapes["batch_stats"]) == n_stats


def test_non_classwise_attention_has_one_channel():
  model = hrda.build_network(_config(attention_classwise=False)).model
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                             train=False))
  assert shapes["params"]["decode_head"]["scale_attention"]["conv_seg"]["kernel"].shape[-1] == 1


# ------------------------------------------------------------------ training forward

def test_training_attention_masked_outside_crop(tiny):
  net, _ = tiny
  # Hand-made branch outputs: LR logits 0, attention 1 everywhere, HR logits 1.
  out = {"lr_logits": jnp.zeros((1, 8, 8, K)), "attention": jnp.ones((1, 8, 8, K)),
         "hr_logits": jnp.ones((1, 8, 8, K))}
  fused = np.asarray(jax.jit(lambda y, x: net.fused_train_logits(out, (y, x), (64, 64)))(
      jnp.int32(8), jnp.int32(24)))
  assert fused.shape == (1, 16, 16, K)
  # HR box in the 16² fused map: rows 2..10, cols 6..14 (pixel box / 4).
  np.testing.assert_allclose(fused[0, 3:9, 7:13], 1.0, atol=1e-6)
  np.testing.assert_allclose(fused[0, 12:, :], 0.0, atol=1e-6)  # attention zeroed outside
  np.testing.assert_allclose(fused[0, :, :4], 0.0, atol=1e-6)


def test_hr_loss_uses_cropped_labels(tiny):
  net, variables = tiny
  x, y = _images(1)
  rng = jax.random.key(7)
  y1, x1 = hrda.crop_offsets(jax.random.split(rng)[0], (64, 64), (32, 32), 8)
  y1, x1 = int(y1), int(x1)
  inside = np.zeros((64, 64), bool)
  inside[y1:y1 + 32, x1:x1 + 32] = True
  y_other = jnp.where(inside[None], y, (y + 5) % K)
  hr_only = dataclasses.replace(net, hr_loss_weight=1.0)
  loss_fn = jax.jit(lambda lbl, w: hr_only.forward_loss(variables, x, lbl, w, rng=rng)[0])
  ones = jnp.ones(y.shape)
  # λ_d = 1: labels/weights outside the detail crop do not matter, inside they do.
  np.testing.assert_allclose(loss_fn(y, ones), loss_fn(y_other, ones), rtol=1e-6)
  assert abs(float(loss_fn(y, ones)) - float(loss_fn((y + 1) % K, ones))) > 1e-4
  outside_only = jnp.broadcast_to(jnp.where(inside[None], 0.0, 1.0), y.shape)
  np.testing.assert_allclose(loss_fn(y, outside_only), 0.0, atol=1e-7)
  # Default λ_d = 0.1: the loss equals 0.9·CE(fused, label) + 0.1·CE(HR, cropped label).
  def both(v):
    k_fwd = jax.random.split(rng)[1]
    out, _ = net.apply(v, ops.resize_bilinear(x, (32, 32)), x[:, y1:y1 + 32, x1:x1 + 32],
                       method="scales_forward", train=True, deterministic=False, rng=k_fwd)
    fused = net.fused_train_logits(out, (y1, x1), (64, 64))
    expected = 0.9 * losses.cross_entropy(fused, y) + 0.1 * losses.cross_entropy(
        out["hr_logits"], y[:, y1:y1 + 32, x1:x1 + 32])
    loss, feats, _ = net.forward_loss(v, x, y, rng=rng)
    return expected, loss, feats

  expected, loss, feats = jax.jit(both)(variables)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert feats[0].shape == (2, 8, 8, 16)  # context features of the 32² LR image


def test_jit_forward_loss_and_grad(tiny):
  net, variables = tiny
  x, y = _images(2)
  w = jnp.full(y.shape, 0.5)

  def loss_fn(params, rng):
    loss, feats, bs = net.forward_loss({"params": params,
                                         "batch_stats": variables["batch_stats"]},
                                        x, y, w, rng=rng)
    return loss, (net.fd_features(feats), bs)

  (loss, (fd, bs)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      variables["params"], jax.random.key(0))
  assert np.isfinite(float(loss)) and fd.shape == (2, 1, 1, 128)
  for part in (("backbone",), ("decode_head", "head"), ("decode_head", "scale_attention")):
    g = grads
    for key in part:
      g = g[key]
    assert float(sum(jnp.abs(v).sum() for v in jax.tree.leaves(g))) > 0, part
  # BatchNorm running statistics were updated by the train-mode forward.
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), bs, variables["batch_stats"])
  assert any(jax.tree.leaves(changed))


def test_joint_encoder_equals_two_encoder_calls(tiny):
  """model.joint_encoder: context image and detail crop (same 32² shape here) in one encoder
  call give the loss and gradients of two calls (drop path off: the one thing it draws
  differently)."""
  _, variables = tiny
  x, y = _images(3)
  w = jnp.full(y.shape, 0.5)
  out = {}
  for joint in (False, True):
    c = _config()
    c.model.drop_path_rate = 0.0
    c.model.joint_encoder = joint
    net = hrda.build_network(c)
    assert net.model.joint_encoder == joint
    loss_fn = lambda p, net=net: net.forward_loss(  # noqa: E731
        {"params": p, "batch_stats": variables["batch_stats"]}, x, y, w,
        rng=jax.random.key(4))[0]
    out[joint] = jax.jit(jax.value_and_grad(loss_fn))(variables["params"])
  assert float(out[True][0]) == pytest.approx(float(out[False][0]), rel=1e-6)
  # Relative per leaf, with a floor of 1e-6 of the largest gradient: the biases in front of the
  # attention head's BatchNorm have a gradient of exactly 0 (~1e-14 of rounding here).
  floor = 1e-6 * max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(out[False][1]))
  rel = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b)) / max(float(jnp.max(jnp.abs(a))),
                                                                      floor)),
                     out[False][1], out[True][1])
  assert max(jax.tree.leaves(rel)) < 1e-4


# ------------------------------------------------------------------ inference

def test_predict_single_window_equals_whole_image_forward(tiny):
  net, variables = tiny
  x, _ = _images(3)
  one_window = dataclasses.replace(net, hr_crop_size=(64, 64))
  logits, feats, _ = jax.jit(lambda v: one_window.predict(v, x, train=False))(variables)
  whole = jax.jit(lambda v: net.model.apply(v, x, train=False))(variables)
  np.testing.assert_allclose(logits, ops.resize_bilinear(whole, (64, 64)), atol=1e-5)
  assert feats[-1].shape == (2, 1, 1, 128)


def test_predict_slide_shapes_and_teacher_mode(tiny):
  net, variables = tiny
  x, _ = _images(4)
  logits, _, bs = jax.jit(lambda v: net.predict(v, x, train=True))(variables)
  assert logits.shape == (2, 64, 64, K) and np.all(np.isfinite(np.asarray(logits)))
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), bs, variables["batch_stats"])
  assert any(jax.tree.leaves(changed))  # teacher: BN with batch statistics (§2.2)
  # 64² input, 32² windows, stride 16 → 3x3 windows; no-slide differs from sliding.
  assert len(hrda.slide_boxes(64, 64, (32, 32), (16, 16), 4)[0]) == 9
  whole = dataclasses.replace(net, hr_slide_inference=False)
  logits_whole, logits_eval = jax.jit(lambda v: (whole.predict(v, x, train=False)[0],
                                                  net.predict(v, x, train=False)[0]))(variables)
  assert logits_whole.shape == logits_eval.shape
  assert not np.allclose(logits_whole, logits_eval)


def test_batched_evaluation_predicts_each_image_as_alone(tiny):
  """eval_batch_size: HRDA slide inference of a batch equals image-by-image inference."""
  from mfm_jax.evaluation import inference  # pylint: disable=g-import-not-at-top
  net, variables = tiny
  config = _config()
  config.eval.mode, config.eval.crop_size, config.eval.stride = "slide", (48, 48), (32, 32)
  predict = inference.make_predict_fn(config, net)
  x = np.random.default_rng(5).integers(0, 256, (3, 80, 80, 3), dtype=np.uint8)  # pipeline's
  batched = np.asarray(predict(variables, x, (100, 100)))
  single = np.concatenate([np.asarray(predict(variables, x[i:i + 1], (100, 100)))
                           for i in range(3)])
  assert batched.shape == (3, 100, 100)
  np.testing.assert_array_equal(batched, single)


# ------------------------------------------------------------------ MFM hooks and builders

def test_mfm_encode_decode_context_and_detail(tiny):
  net, variables = tiny
  x, y = _images(5)
  feats, _ = net.mfm_encode(variables, x, train=False)
  ref = net.model.apply(variables, ops.resize_bilinear(x, (32, 32)), train=False,
                         method="encode")
  np.testing.assert_allclose(feats[-1], ref[-1], atol=1e-6)
  loss, _ = net.mfm_decode_loss(variables, feats, y, rng=jax.random.key(0))
  assert np.isfinite(float(loss))

  detail = dataclasses.replace(net, mfm_features="detail")
  dfeats, _ = detail.mfm_encode(variables, x, train=False)
  ref = net.model.apply(variables, x[:, 16:48, 16:48], train=False, method="encode")
  np.testing.assert_allclose(dfeats[0], ref[0], atol=1e-6)  # centre crop (16, 16)
  # mfm_decode_loss crops the labels with the same centre box: outside labels are irrelevant.
  y_out = y.at[:, :16].set(0).at[:, 48:].set(3)
  dl = jax.jit(lambda lbl: detail.mfm_decode_loss(variables, dfeats, lbl, rng=jax.random.key(0))[0])
  np.testing.assert_allclose(dl(y), dl(y_out), rtol=1e-6)
  # fd_encode always gives the context features.
  fd, _ = detail.fd_encode(variables, x)
  np.testing.assert_allclose(fd[-1], feats[-1], atol=1e-6)


def test_builders_dispatch_and_sizes():
  c = _config()
  assert isinstance(state_lib.build_network(c), hrda.HRDANetwork)
  assert state_lib.mfm_image_size(c) == (32, 32)  # 64 crop × 0.5
  c.model.hrda.mfm_features = "detail"
  c.mfm.enabled = False
  assert state_lib.mfm_image_size(c) == (32, 32)  # hr_crop_size
  full = base.base_config()
  full.model.hrda.enabled = True
  full.data.crop_size = (1024, 1024)
  assert hrda.mfm_image_size(full.model.hrda, full.data.crop_size) == (512, 512)
  net = hrda.build_network(full)
  assert (net.hr_crop_size, net.hr_slide_stride, net.crop_coord_divisible,
          net.hr_loss_weight, net.lr_scale) == ((512, 512), (256, 256), 8, 0.1, 0.5)


@pytest.mark.parametrize("overrides,match", [
    (dict(scales=(1.0, 0.5, 0.25)), "model.hrda.scales"),
    (dict(scales=(0.5, 0.75)), "model.hrda.scales"),
    (dict(hr_crop_size=(128, 32)), "exceeds config.data.crop_size"),
    (dict(hr_crop_size=(36, 32)), "model.hrda.hr_crop_size"),
    (dict(crop_coord_divisible=4), "crop_coord_divisible"),
    (dict(hr_slide_stride=(64, 16)), "hr_slide_stride"),
    (dict(hr_loss_weight=1.5), "hr_loss_weight"),
    (dict(mfm_features="both"), "mfm_features"),
])
def test_config_errors_name_the_key(overrides, match):
  with pytest.raises(validation.ConfigError, match=match):
    validation.validate(_config(**overrides))


def test_config_errors_head_and_detail_domain():
  c = _config()
  c.model.head = "dlv2red"
  with pytest.raises(ValueError, match="config.model.head"):
    validation.validate(c)
  c = _config(mfm_features="detail")
  c.mfm.enabled = True
  validation.validate(c)  # target classification (with the FD on context features) is supported
  c.mfm.domain = "both"
  with pytest.raises(ValueError, match="mfm.domain='target'"):
    validation.validate(c)
