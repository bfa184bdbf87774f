"""Tests for the ResNetV1c backbones and the DeepLab heads (uda_reference.md §1.3).

ResNet-101 is only traced with ``jax.eval_shape``; the one real backbone forward is a ResNet-50
on a 32x32 batch (BN statistics), the head forwards use tiny channel counts.
"""

import json
import math
import os

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mfm_jax.models import deeplab
from mfm_jax.models import resnet

from reference_data import STATEDICTS as _STATEDICTS  # noqa: E402

_TSV = os.path.join(_STATEDICTS, "statedict_dlv2red_r101v1c.tsv")


def _count(tree):
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def _abstract(module, *args, **kwargs):
  """(variables, output) of ``module.init`` as ShapeDtypeStructs."""
  out, variables = jax.eval_shape(
      lambda *a: module.init_with_output(jax.random.key(0), *a, train=False, **kwargs), *args)
  return variables, out


def _image(shape=(1, 64, 64, 3)):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


# ---------------------------------------------------------------- DeepLabV2-R101 vs the tsv

def _tsv_as_flax():
  """Reference state_dict → {flax path: shape}; num_batches_tracked dropped (no Flax twin)."""
  want, n_tracked = {}, 0
  with open(_TSV) as f:
    for line in f:
      name, shape, _ = line.rstrip("\n").split("\t")
      shape = tuple(json.loads(shape))
      parts = []
      for p in name.split("."):  # 'layer1.0.conv1' → 'layer1_0/conv1', 'stem.3' → 'stem_3'
        if p.isdigit():
          parts[-1] += f"_{p}"
        else:
          parts.append(p)
      *path, leaf = parts
      if leaf == "num_batches_tracked":
        n_tracked += 1
        continue
      if leaf in ("running_mean", "running_var"):
        want[("batch_stats", *path, leaf[len("running_"):])] = shape
      elif leaf == "weight" and len(shape) == 4:  # conv OIHW → kernel HWIO
        want[("params", *path, "kernel")] = (shape[2], shape[3], shape[1], shape[0])
      else:
        want[("params", *path, "scale" if leaf == "weight" else leaf)] = shape
  return want, n_tracked


@pytest.fixture(scope="module")
def dlv2red_r101():
  backbone = resnet.ResNetV1c(depth=101, deep_stem=True, dilated=True)
  bb_vars, feats = _abstract(backbone, _image())
  head_vars, logits = _abstract(deeplab.DLV2Head(num_classes=19, dilations=(6, 12)), feats)
  variables = {col: {"backbone": bb_vars[col], "decode_head": head_vars.get(col, {})}
               for col in ("params", "batch_stats")}
  return variables, feats, logits


def test_dlv2red_r101_matches_statedict_tsv(dlv2red_r101):
  variables, _, logits = dlv2red_r101
  params, stats = variables["params"], variables["batch_stats"]
  # §1.3 (executed): 43,219,846 total, head 700,454. These are trainable parameters only: the
  # tsv sums to 43,325,424 = 43,219,846 + 105,472 BN running mean/var + 106 num_batches_tracked.
  assert _count(params) == 43_219_846
  assert _count(params["decode_head"]) == 700_454
  assert _count(stats) == 105_472
  assert not stats["decode_head"]  # DLV2 has no BN
  assert logits.shape == (1, 8, 8, 19) and logits.dtype == jnp.float32

  got = {k: v.shape for k, v in traverse_util.flatten_dict(variables).items()}
  want, n_tracked = _tsv_as_flax()  # names carry the 'backbone.'/'decode_head.' prefixes
  assert n_tracked == 106
  # Every reference tensor has a Flax twin of the same (re-laid-out) shape and vice versa.
  assert set(got) - set(want) == set()
  assert set(want) - set(got) == set()
  assert got == want
  n_bn = sum(1 for k in got if k[0] == "batch_stats" and k[-1] == "mean")
  n_conv = sum(1 for k, s in got.items() if k[-1] == "kernel" and len(s) == 4)
  assert (n_bn, n_conv) == (106, 108)  # 3 stem + 33·3 block + 4 downsample convs, 2 head convs


def test_dlv2red_r101_bfloat16_keeps_float32_params():
  backbone = resnet.ResNetV1c(depth=101, dtype=jnp.bfloat16)
  variables, feats = _abstract(backbone, _image())
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert {f.dtype for f in feats} == {jnp.dtype(jnp.bfloat16)}
  _, logits = _abstract(deeplab.DLV2Head(num_classes=19, dtype=jnp.bfloat16), feats)
  assert logits.dtype == jnp.float32


# ---------------------------------------------------------------- ResNet structure (R50, 64x64)

@pytest.mark.parametrize("deep_stem,dilated,spatial", [
    (True, True, (16, 8, 8, 8)),      # os 8 (DeepLab, §1.3)
    (False, False, (16, 8, 4, 2)),    # os 32
    (True, False, (16, 8, 4, 2)),
    (False, True, (16, 8, 8, 8))])
def test_resnet50_output_strides_and_stems(deep_stem, dilated, spatial):
  variables, feats = _abstract(resnet.ResNetV1c(depth=50, deep_stem=deep_stem, dilated=dilated),
                               _image((2, 64, 64, 3)))
  assert [f.shape for f in feats] == [(2, s, s, c) for s, c in zip(spatial, (256, 512, 1024, 2048))]
  top = set(variables["params"])
  stem = {"stem_0", "stem_1", "stem_3", "stem_4", "stem_6", "stem_7"} if deep_stem else {
      "conv1", "bn1"}
  assert top == stem | {f"layer{s + 1}_{b}" for s, n in enumerate((3, 4, 6, 3)) for b in range(n)}
  if deep_stem:
    assert variables["params"]["stem_0"]["kernel"].shape == (3, 3, 3, 32)
    assert variables["params"]["stem_6"]["kernel"].shape == (3, 3, 32, 64)
  else:
    assert variables["params"]["conv1"]["kernel"].shape == (7, 7, 3, 64)
  # Only the first block of each stage has the 1x1 conv + BN shortcut.
  assert set(variables["params"]["layer3_0"]) == {
      "conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample_0", "downsample_1"}
  assert "downsample_0" not in variables["params"]["layer3_1"]


def _conv_settings(dilated):
  """{module path: (strides, kernel_dilation, padding)} of every conv, recorded while tracing."""
  seen = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Conv):
      m = context.module
      pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
      seen["/".join(m.path)] = (pair(m.strides), pair(m.kernel_dilation),
                                tuple(tuple(p) for p in m.padding))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    _abstract(resnet.ResNetV1c(depth=50, dilated=dilated), _image())
  return seen


def test_contract_dilation_and_strides():
  convs = _conv_settings(dilated=True)
  d2 = lambda d: (d, d)  # noqa: E731
  # contract_dilation: the first block of stage 3 uses dilation 1 (rest 2), of stage 4 uses 2
  # (rest 4); padding = dilation; stride only in stage 2 (strides (1, 2, 1, 1)).
  expected = {"layer1_0": (1, 1), "layer2_0": (2, 1), "layer2_3": (1, 1), "layer3_0": (1, 1),
              "layer3_1": (1, 2), "layer3_5": (1, 2), "layer4_0": (1, 2), "layer4_1": (1, 4),
              "layer4_2": (1, 4)}
  for block, (stride, dilation) in expected.items():
    assert convs[f"{block}/conv2"] == (d2(stride), d2(dilation), (d2(dilation), d2(dilation)))
    assert convs[f"{block}/conv1"][:2] == ((1, 1), (1, 1))  # 'pytorch' style: 1x1 convs unstrided
  assert convs["layer2_0/downsample_0"][0] == (2, 2)
  assert convs["layer3_0/downsample_0"][0] == (1, 1)
  assert convs["stem_0"] == ((2, 2), (1, 1), ((1, 1), (1, 1)))
  plain = _conv_settings(dilated=False)
  for s in (2, 3, 4):
    assert plain[f"layer{s}_0/conv2"] == ((2, 2), (1, 1), ((1, 1), (1, 1)))
    assert plain[f"layer{s}_0/downsample_0"][0] == (2, 2)
  assert all(v[1] == (1, 1) for v in plain.values())


def test_max_pool_pads_with_minus_inf():
  # torch MaxPool2d pads with -inf; the stem relies on nn.max_pool doing the same.
  x = -jnp.arange(1.0, 17.0).reshape(1, 4, 4, 1)
  y = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  # Windows touching the border would read 0 with zero padding.
  np.testing.assert_array_equal(y[0, :, :, 0], [[-1.0, -2.0], [-5.0, -6.0]])


def test_bad_depth_and_input_rank():
  with pytest.raises(ValueError, match="resnet.py: depth 34"):
    _abstract(resnet.ResNetV1c(depth=34), _image())
  with pytest.raises(ValueError, match="resnet.py: expects an NHWC"):
    _abstract(resnet.ResNetV1c(depth=50), _image((64, 64, 3)))


def test_remat_keeps_the_parameter_tree():
  plain, _ = _abstract(resnet.ResNetV1c(depth=50), _image())
  remat, _ = _abstract(resnet.ResNetV1c(depth=50, remat=True), _image())
  assert jax.tree.map(lambda a: a.shape, plain) == jax.tree.map(lambda a: a.shape, remat)


# ---------------------------------------------------------------- BN statistics (real R50 forward)

def test_batch_stats_update_only_when_training():
  model = resnet.ResNetV1c(depth=50)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
  # Values drawn on the host (compiling R50's init on CPU costs more than its forward);
  # running statistics start as BN's init: mean 0, var 1.
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  variables = {
      "params": jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.1, jnp.float32),
                             shapes["params"]),
      "batch_stats": jax.tree_util.tree_map_with_path(
          lambda path, a: (jnp.ones if path[-1].key == "var" else jnp.zeros)(a.shape),
          shapes["batch_stats"])}
  stem_out = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.module.name == "stem_0":
      stem_out["x"] = out
    return out

  @jax.jit
  def run(variables, x):
    _, eval_upd = model.apply(variables, x, train=False, mutable=["batch_stats"])
    with nn.intercept_methods(record):
      _, train_upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return eval_upd["batch_stats"], train_upd["batch_stats"], stem_out["x"]

  after_eval, after_train, conv0 = run(variables, x)
  jax.tree.map(np.testing.assert_array_equal, after_eval, variables["batch_stats"])
  flat_init = traverse_util.flatten_dict(variables["batch_stats"])
  flat_train = traverse_util.flatten_dict(after_train)
  assert len(flat_init) == 2 * 55  # R50: 3 stem + 16·3 block + 4 downsample BNs
  for key, value in flat_train.items():
    assert not np.allclose(value, flat_init[key]), key
  # torch momentum 0.1: running_mean ← 0.9·0 + 0.1·batch mean (per channel).
  np.testing.assert_allclose(after_train["stem_1"]["mean"],
                             0.1 * np.asarray(conv0).mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)


def test_bottleneck_init():
  block = resnet.Bottleneck(planes=32, stride=2, downsample=True)
  x = jnp.zeros((1, 8, 8, 64))
  variables = jax.jit(lambda: block.init(jax.random.key(0), x, False))()
  params, stats = variables["params"], variables["batch_stats"]
  for bn in ("bn1", "bn2", "bn3", "downsample_1"):  # mmcv constant_init(1, bias=0)
    np.testing.assert_array_equal(params[bn]["scale"], 1.0)
    np.testing.assert_array_equal(params[bn]["bias"], 0.0)
    np.testing.assert_array_equal(stats[bn]["mean"], 0.0)
    np.testing.assert_array_equal(stats[bn]["var"], 1.0)
  # kaiming normal, fan_out = out_channels·kh·kw (conv2: 32·9; conv3, downsample_0: 128).
  for conv, fan_out in (("conv2", 32 * 9), ("conv3", 128), ("downsample_0", 128)):
    std = float(np.std(params[conv]["kernel"]))
    assert abs(std / math.sqrt(2.0 / fan_out) - 1.0) < 0.1, (conv, std)
  assert "bias" not in params["conv2"]


# ---------------------------------------------------------------- heads

def _features(rng, c1=12, c4=8, b=2):
  shapes = [(b, 16, 16, c1), (b, 8, 8, 4), (b, 8, 8, 4), (b, 8, 8, c4)]
  return [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]


def test_dlv2_sums_dilated_branches_with_hand_set_weights():
  rng = np.random.default_rng(1)
  feats = _features(rng, c4=4)
  head = deeplab.DLV2Head(num_classes=3, dilations=(1, 2))
  a, b = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
  b0, b1 = rng.normal(size=3), rng.normal(size=3)
  k0, k1 = np.zeros((3, 3, 4, 3)), np.zeros((3, 3, 4, 3))
  k0[1, 1], k1[0, 0] = a, b  # branch 0: centre tap; branch 1: top-left tap at dilation 2
  params = {"aspp_modules_0": {"conv": {"kernel": k0, "bias": b0}},
            "aspp_modules_1": {"conv": {"kernel": k1, "bias": b1}}}
  params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
  init = jax.eval_shape(lambda: head.init(jax.random.key(0), feats, train=False))
  assert jax.tree.map(lambda v: v.shape, init["params"]) == jax.tree.map(lambda v: v.shape, params)
  out = head.apply({"params": params}, feats, train=True)
  x = np.asarray(feats[3])
  shifted = np.zeros_like(x)  # x(p − 2) with zero padding (padding = dilation)
  shifted[:, 2:, 2:] = x[:, :-2, :-2]
  want = x @ a + b0 + shifted @ b + b1
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  # Only the last map is used.
  other = [f + 1.0 for f in feats[:3]] + [feats[3]]
  np.testing.assert_array_equal(head.apply({"params": params}, other, train=False), out)


def test_dlv2_rejects_wrong_feature_count():
  with pytest.raises(ValueError, match="deeplab.py: DLV2Head expects the 4"):
    _abstract(deeplab.DLV2Head(num_classes=3), [_image((1, 8, 8, 4))] * 3)


def test_dlv3p_full_size_shape_names_and_count(dlv2red_r101):
  _, feats, _ = dlv2red_r101
  variables, logits = _abstract(deeplab.DeepLabV3PlusHead(num_classes=19), feats)
  assert logits.shape == (1, 16, 16, 19) and logits.dtype == jnp.float32  # stride 4
  params = variables["params"]
  assert set(params) == {"image_pool_1", "bottleneck", "c1_bottleneck", "conv_seg",
                         "sep_bottleneck_0", "sep_bottleneck_1"} | {
                             f"aspp_modules_{i}" for i in range(4)}
  assert set(params["aspp_modules_0"]) == {"conv", "bn"}
  for name in ("aspp_modules_1", "sep_bottleneck_0"):
    assert set(params[name]) == {"depthwise_conv", "pointwise_conv"}
    assert set(params[name]["depthwise_conv"]) == {"conv", "bn"}
  assert params["aspp_modules_3"]["depthwise_conv"]["conv"]["kernel"].shape == (3, 3, 1, 2048)
  assert params["sep_bottleneck_0"]["depthwise_conv"]["conv"]["kernel"].shape == (3, 3, 1, 560)
  assert "bias" not in params["bottleneck"]["conv"]
  # Hand count (ConvModule = conv without bias + BN scale/bias), channels 512, c1 48, K 19.
  cm = lambda cin, cout, k=1: k * k * cin * cout + 2 * cout  # noqa: E731
  dsep = lambda cin, cout: cm(1, cin, 3) + cm(cin, cout)  # noqa: E731
  expected = (cm(2048, 512) + cm(2048, 512) + 3 * dsep(2048, 512) + cm(5 * 512, 512, 3)
              + cm(256, 48) + dsep(560, 512) + dsep(512, 512) + 512 * 19 + 19)
  assert _count(params) == expected == 17_697_923


def test_dlv3p_forward_dropout2d_and_bn():
  rng = np.random.default_rng(2)
  feats = _features(rng)
  head = deeplab.DeepLabV3PlusHead(num_classes=5, channels=16, c1_channels=8,
                                   dilations=(1, 2, 3, 4), dropout=0.5)
  dropped = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.Dropout):
      dropped["in"], dropped["out"] = args[0], out
    return out

  @jax.jit
  def run(feats):
    variables = head.init(jax.random.key(0), feats, train=False)
    rngs = {"dropout": jax.random.key(3)}
    eval_out = head.apply(variables, feats, train=False)
    eval_with_rng = head.apply(variables, feats, train=False, rngs=rngs)
    with nn.intercept_methods(record):
      out, upd = head.apply(variables, feats, train=True, rngs=rngs, mutable=["batch_stats"])
    # Teacher mode (train=True, deterministic=True): BN on batch statistics, no dropout.
    teacher, _ = head.apply(variables, feats, train=True, deterministic=True,
                            mutable=["batch_stats"])
    return (variables["batch_stats"], eval_out, eval_with_rng, out, upd["batch_stats"], teacher,
            dropped["in"], dropped["out"])

  stats, eval_out, eval_with_rng, out, new_stats, teacher, x_in, x_out = run(feats)
  assert eval_out.shape == out.shape == (2, 16, 16, 5)  # stage-1 resolution (stride 4)
  np.testing.assert_array_equal(eval_with_rng, eval_out)
  # Dropout2d: each (sample, channel) map is either all zero or all scaled by 1/(1 − p).
  x_in, x_out = np.asarray(x_in), np.asarray(x_out)
  zero = np.all(x_out == 0, axis=(1, 2))
  assert 0 < zero.sum() < zero.size
  np.testing.assert_allclose(x_out, np.where(zero[:, None, None, :], 0.0, 2.0 * x_in), rtol=1e-6)
  assert not np.allclose(teacher, eval_out)
  assert not np.allclose(teacher, out)
  assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new_stats),
                                                    jax.tree.leaves(stats)))
