"""Tests for the MiT encoder, the DAFormer head, the MFM Rebuilder and the segmentor builders.

Large variants are only traced with ``jax.eval_shape`` (no B5 compute on CPU); forward tests use
``mit_tiny`` at 64x64.
"""

import math
import os

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mfm_jax.config import base
from mfm_jax.config import validation
from mfm_jax.models import daformer_head
from mfm_jax.models import mit
from mfm_jax.models import segmentor

from reference_data import STATEDICTS as _STATEDICTS  # noqa: E402

_X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)


def _cfg(**kw):
  """``config.model`` of the schema with a tiny network and ``kw`` overrides."""
  model = base.base_config().model
  model.update(dict(backbone="mit_tiny", head="daformer_sepaspp", head_embed_dim=32))
  model.update(kw)
  return model


def _abstract_init(model, shape=(1, 64, 64, 3)):
  return jax.eval_shape(lambda: model.init({"params": jax.random.key(0)},
                                           jnp.zeros(shape), train=False))


@pytest.fixture(scope="module")
def tiny():
  """mit_tiny + sepaspp head (embed 32), initialised once."""
  model = segmentor.build_segmentor(_cfg())
  variables = jax.jit(lambda: model.init(jax.random.key(0), _X, train=False))()
  return model, variables


# ---------------------------------------------------------------- parameter counts (eval_shape)

# uda_reference.md §1.1 table (executed PyTorch counts, backbone only).
@pytest.mark.parametrize("variant,expected", [
    ("mit_b0", 3_319_392), ("mit_b1", 13_151_424), ("mit_b2", 24_196_288),
    ("mit_b3", 44_072_128), ("mit_b4", 60_842_688)])
def test_mit_variant_param_counts(variant, expected):
  assert segmentor.count_params(_abstract_init(mit.mit(variant))["params"]) == expected


@pytest.fixture(scope="module")
def daformer_b5_abstract():
  return _abstract_init(segmentor.build_segmentor(_cfg(backbone="mit_b5", head_embed_dim=256)))


def test_daformer_mitb5_param_counts(daformer_b5_abstract):
  params = daformer_b5_abstract["params"]
  assert set(params) == {"backbone", "decode_head"}
  assert segmentor.count_params(params["backbone"]) == 81_443_008
  assert segmentor.count_params(params["decode_head"]) == 3_712_275
  # 85,155,283 = trainable parameters only: the tsv sums to 85,163,995 with BN buffers; the
  # 8,712 extra are running_mean/var (8,704) + 8 scalar num_batches_tracked.
  assert segmentor.count_params(params) == 85_155_283
  assert segmentor.count_params(daformer_b5_abstract["batch_stats"]) == 8_704


def _torch_to_flax(name, shape):
  """Maps a reference state_dict entry to (flax path, flax shape); None for skipped buffers."""
  parts = []
  for p in name.split("."):
    if p.isdigit():  # block1.0 → block1_0, embed_layers.0 → embed_layers_0
      parts[-1] = f"{parts[-1]}_{p}"
    else:
      parts.append(p)
  if parts[-3:-1] == ["dwconv", "dwconv"]:  # mlp.dwconv.dwconv → mlp/dwconv
    del parts[-2]
  leaf, path = parts[-1], parts[:-1]
  if leaf == "num_batches_tracked":
    return None
  if leaf in ("running_mean", "running_var"):
    return "/".join(["batch_stats"] + path + [leaf[len("running_"):]]), tuple(shape)
  if leaf == "weight" and len(shape) == 1:  # LayerNorm / BN
    leaf = "scale"
  elif leaf == "weight":
    leaf = "kernel"
    # Linear [out, in] → [in, out]; conv OIHW → HWIO.
    shape = shape[::-1] if len(shape) == 2 else [shape[2], shape[3], shape[1], shape[0]]
  return "/".join(["params"] + path + [leaf]), tuple(shape)


def test_names_and_shapes_mirror_reference_statedict(daformer_b5_abstract):
  path = os.path.join(_STATEDICTS, "statedict_daformer_mitb5.tsv")
  if not os.path.exists(path):
    pytest.skip(f"reference state_dict listing not found at {path}")
  expected = {}
  for line in open(path):
    name, shape, _ = line.rstrip("\n").split("\t")
    mapped = _torch_to_flax(name, [int(s) for s in shape.strip("[]").split(",") if s.strip()])
    if mapped:
      expected[mapped[0]] = mapped[1]
  flat = traverse_util.flatten_dict(daformer_b5_abstract, sep="/")
  got = {k: tuple(v.shape) for k, v in flat.items()}
  assert got == expected


# ---------------------------------------------------------------- forward shapes, flags

def _forward(module, x, *, train, deterministic):
  feats = module.encode(x, train=train, deterministic=deterministic)
  return feats, module.decode(feats, train=train, deterministic=deterministic)


@pytest.fixture(scope="module")
def run(tiny):
  """Jitted tiny forward → (features, logits, batch_stats after the call); one compile per mode."""
  model, _ = tiny

  @jax.jit(static_argnames=("train", "deterministic"))
  def fn(variables, x, key, *, train, deterministic):
    (feats, logits), updates = model.apply(
        variables, x, train=train, deterministic=deterministic, rngs={"dropout": key},
        mutable=["batch_stats"], method=_forward)
    return feats, logits, updates["batch_stats"]

  return fn


def test_tiny_forward_shapes(tiny, run):
  _, variables = tiny
  assert set(variables["params"]) == {"backbone", "decode_head"}
  feats, logits, _ = run(variables, _X, jax.random.key(0), train=False, deterministic=None)
  assert [f.shape for f in feats] == [(2, 16, 16, 16), (2, 8, 8, 32), (2, 4, 4, 64),
                                      (2, 2, 2, 128)]
  assert segmentor.feature_channels(_cfg()) == (16, 32, 64, 128)
  assert logits.shape == (2, 16, 16, 19) and logits.dtype == jnp.float32


def test_exact_gelu_and_layernorm_eps():
  model = mit.mit("mit_tiny")
  variables = _abstract_init(model)
  jaxpr = str(jax.make_jaxpr(lambda v: model.apply(v, _X, train=False))(variables))
  assert "erf" in jaxpr and "tanh" not in jaxpr
  eps = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.LayerNorm):
      eps["/".join(context.module.path)] = context.module.epsilon
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v: model.apply(v, _X, train=False), variables)
  expected = {}
  for s in range(1, 5):
    expected[f"patch_embed{s}/norm"] = 1e-5
    expected[f"block{s}_0/norm1"] = expected[f"block{s}_0/norm2"] = 1e-6
    expected[f"norm{s}"] = 1e-6
    if s < 4:  # stage 4 has sr_ratio 1: no attn.sr / attn.norm
      expected[f"block{s}_0/attn/norm"] = 1e-5
  assert eps == expected


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gelu_exact_values_and_gradient_equal_autodiff(dtype):
  from mfm_jax import ops
  x = jnp.linspace(-6.0, 6.0, 1001, dtype=jnp.float32).astype(dtype)
  np.testing.assert_array_equal(ops.gelu_exact(x), jax.nn.gelu(x, approximate=False))
  mine = jax.grad(lambda v: jnp.sum(ops.gelu_exact(v).astype(jnp.float32) ** 2))(x)
  ref = jax.grad(lambda v: jnp.sum(jax.nn.gelu(v, approximate=False).astype(jnp.float32) ** 2))(x)
  assert mine.dtype == dtype
  tol = 1e-6 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(mine, np.float32), np.asarray(ref, np.float32),
                             rtol=tol, atol=tol)


def test_gelu_exact_backward_keeps_only_its_input():
  from mfm_jax import ops
  dense = jnp.ones((64, 64)) / 64

  def net(x, gelu):  # gelu between matmuls, as in the Mix-FFN; the matmuls keep their inputs
    for _ in range(6):
      x = gelu(x @ dense) @ dense
    return jnp.sum(x ** 2)

  def temp(gelu):
    fb = jax.jit(jax.grad(lambda x: net(x, gelu)))
    return fb.lower(jnp.zeros((512, 64))).compile().memory_analysis().temp_size_in_bytes

  assert temp(ops.gelu_exact) < temp(lambda v: jax.nn.gelu(v, approximate=False))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lean_batch_norm_equals_flax_batch_norm(dtype):
  from mfm_jax.models import layers
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 5, 6, 8)) * 3 + 1, jnp.float32).astype(dtype)
  kw = dict(momentum=0.9, epsilon=1e-5, dtype=dtype)
  ours, ref = layers.BatchNorm(False, **kw), nn.BatchNorm(use_running_average=False, **kw)
  v = ref.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, v)
  v = {"params": {"scale": jnp.linspace(0.5, 2.0, 8), "bias": jnp.linspace(-1.0, 1.0, 8)},
       "batch_stats": {"mean": jnp.full((8,), 0.3), "var": jnp.full((8,), 2.0)}}
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)

  def run(m, v, x):
    y, new = m.apply(v, x, mutable=["batch_stats"])
    return y, new["batch_stats"]

  (y1, s1), (y2, s2) = run(ours, v, x), run(ref, v, x)
  assert y1.dtype == y2.dtype == dtype
  np.testing.assert_allclose(np.float32(y1), np.float32(y2), **tol)
  for k in ("mean", "var"):
    np.testing.assert_allclose(s1[k], s2[k], rtol=1e-6, atol=1e-6)
  w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

  def loss(m, p, x):  # the output and both batch statistics in the loss: every cotangent
    y, new = m.apply({"params": p, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"])
    st = new["batch_stats"]
    return jnp.sum(jax.nn.relu(y.astype(jnp.float32)) * w) + jnp.sum(st["mean"] * st["var"])

  g1 = jax.grad(lambda p, x: loss(ours, p, x), argnums=(0, 1))(v["params"], x)
  g2 = jax.grad(lambda p, x: loss(ref, p, x), argnums=(0, 1))(v["params"], x)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tol["rtol"] * 10,
                               atol=tol["atol"] * 10)
  y3 = layers.BatchNorm(True, **kw).apply(v, x)  # eval: the running statistics
  np.testing.assert_allclose(np.float32(y3), np.float32(nn.BatchNorm(
      use_running_average=True, **kw).apply(v, x)), **tol)


def test_dropout_droppath_follow_deterministic(tiny, run):
  _, v = tiny
  k1, k2 = jax.random.key(1), jax.random.key(2)
  # Teacher mode (train=True, deterministic=True): no Dropout2d / DropPath.
  f1, l1, _ = run(v, _X, k1, train=True, deterministic=True)
  f2, l2, _ = run(v, _X, k2, train=True, deterministic=True)
  np.testing.assert_array_equal(l1, l2)
  # Student mode: deterministic defaults to not train → both the backbone (DropPath only)
  # and the head (DropPath + Dropout2d) are stochastic.
  f1, l1, _ = run(v, _X, k1, train=True, deterministic=None)
  f2, l2, _ = run(v, _X, k2, train=True, deterministic=None)
  assert not np.allclose(f1[-1], f2[-1])
  assert not np.allclose(l1, l2)


def test_batch_stats_update_only_in_train_mode(tiny, run):
  _, v = tiny
  differs = lambda new: jax.tree.leaves(jax.tree.map(
      lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), v["batch_stats"], new))
  _, _, new = run(v, _X, jax.random.key(0), train=True, deterministic=True)
  assert all(differs(new))
  _, _, new = run(v, _X, jax.random.key(0), train=False, deterministic=None)
  assert not any(differs(new))


def test_remat_same_tree_and_gradients():
  assert (jax.tree.structure(_abstract_init(mit.mit("mit_tiny", remat=True)))
          == jax.tree.structure(_abstract_init(mit.mit("mit_tiny"))))
  x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 4, 4, 16)), jnp.float32)
  blocks = [cls(16, 2, 4, 2, 0.0) for cls in (mit.Block, nn.remat(mit.Block, static_argnums=(2,)))]
  params = jax.jit(lambda: blocks[0].init(jax.random.key(0), x, True))()
  grads = [jax.jit(jax.grad(lambda p, b=b: jnp.sum(b.apply(p, x, True) ** 2)))(params)
           for b in blocks]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *grads)


@pytest.mark.parametrize("dilation,padding,kernel_hw", [
    (1, 1, (3, 3)), (6, 6, (3, 3)), (18, 18, (3, 3)), (2, 0, (3, 3)), (3, 1, (3, 3)),
    (1, 2, (3, 3)), (2, 1, (1, 3)), (1, 0, (5, 2)), (15, 15, (3, 3))])
def test_depthwise_shift_formulation_equals_grouped_conv(dilation, padding, kernel_hw):
  """Values and gradients (input and kernel); dilation 18 on a 13x17 map leaves taps that read
  only padding, (2, 0) and (3, 1) give outputs smaller than the input, (1, 2) an output larger
  than it (the backward crops), non-square kernels pad each axis by its own reach, and dilation
  15 keeps one row of taps on the 13 rows but all three columns on the 17 columns."""
  from mfm_jax import ops  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(dilation + 7 * padding + kernel_hw[1])
  kh, kw = kernel_hw
  x = jnp.asarray(rng.normal(size=(2, 13, 17, 5)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(kh, kw, 1, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(2, 13 + 2 * padding - dilation * (kh - 1),
                                   17 + 2 * padding - dilation * (kw - 1), 5)), jnp.float32)

  def f(impl):
    y = lambda x, k: ops.depthwise_conv2d(x, k, dilation=dilation, padding=padding, impl=impl)  # noqa: E731
    return y(x, k), jax.grad(lambda x, k: jnp.sum(y(x, k) * w), argnums=(0, 1))(x, k)

  (a, ga), (b, gb) = f("xla"), f("shift")
  assert a.shape == b.shape == w.shape
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  for u, v in zip(ga, gb):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-4)
  with pytest.raises(ValueError, match="impl must be one of"):
    ops.depthwise_conv2d(x, k, impl="fft")


def test_interleave_batches_and_split():
  """Rows alternate image by image, so a device's contiguous block of the joint batch holds
  only its own rows of each batch; split_interleaved undoes it."""
  from mfm_jax import ops  # pylint: disable=g-import-not-at-top
  a = jnp.arange(4 * 3, dtype=jnp.float32).reshape(4, 3)
  b, c = a + 100, a + 200
  joint = ops.interleave_batches([a, b, c])
  assert joint.shape == (12, 3)
  np.testing.assert_array_equal(joint[:, 0], [0, 100, 200, 3, 103, 203, 6, 106, 206,
                                              9, 109, 209])
  for got, want in zip(ops.split_interleaved(joint, 3), (a, b, c)):
    np.testing.assert_array_equal(got, want)


def test_depthwise_impl_same_tree_and_outputs():
  """model.depthwise_impl='shift' gives the same parameters and function (MiT + sep. ASPP)."""
  cfgs = [_cfg(depthwise_impl=impl) for impl in ("xla", "shift")]
  models = [segmentor.build_segmentor(c) for c in cfgs]
  x = _X[:, :32, :32]
  variables = jax.jit(lambda: models[0].init(jax.random.key(0), x, train=False))()
  assert (jax.tree.structure(variables)
          == jax.tree.structure(jax.eval_shape(lambda: models[1].init(jax.random.key(0), x,
                                                                      train=False))))
  a, b = (jax.jit(lambda v, m=m: m.apply(v, x, train=False))(variables) for m in models)
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  c = base.base_config()
  c.model.depthwise_impl = "fft"
  with pytest.raises(validation.ConfigError, match="model.depthwise_impl"):
    validation.validate(c)


def test_bfloat16_compute_keeps_float32_params():
  model = segmentor.build_segmentor(_cfg(compute_dtype="bfloat16"))
  out, variables = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), _X, train=False))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
  assert out.dtype == jnp.float32 and out.shape == (2, 16, 16, 19)


# ---------------------------------------------------------------- numerics vs numpy

def _np_layernorm(x, eps):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


def test_efficient_attention_matches_numpy():
  c, heads, sr = 8, 2, 2
  module = mit.EfficientSelfAttention(c, heads, sr)
  x = np.random.default_rng(1).normal(size=(1, 4, 4, c)).astype(np.float32)
  variables = module.init(jax.random.key(3), x)
  p = jax.tree.map(np.asarray, variables["params"])
  got = np.asarray(module.apply(variables, x))[0].reshape(16, c)
  tokens = x[0].reshape(16, c)
  q = tokens @ p["q"]["kernel"] + p["q"]["bias"]
  red = np.zeros((2, 2, c), np.float32)  # sr conv: kernel = stride = 2, valid
  for i in range(2):
    for j in range(2):
      patch = x[0, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
      red[i, j] = np.einsum("abi,abio->o", patch, p["sr"]["kernel"]) + p["sr"]["bias"]
  red = _np_layernorm(red.reshape(4, c), 1e-5) * p["norm"]["scale"] + p["norm"]["bias"]
  kv = red @ p["kv"]["kernel"] + p["kv"]["bias"]
  hd = c // heads
  out = []
  for h in range(heads):  # torch layout: kv channels = [k (heads × hd) | v (heads × hd)]
    k, v = kv[:, h * hd:(h + 1) * hd], kv[:, c + h * hd:c + (h + 1) * hd]
    logits = q[:, h * hd:(h + 1) * hd] @ k.T * hd ** -0.5
    a = np.exp(logits - logits.max(-1, keepdims=True))
    out.append((a / a.sum(-1, keepdims=True)) @ v)
  want = np.concatenate(out, -1) @ p["proj"]["kernel"] + p["proj"]["bias"]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_mix_ffn_matches_numpy_with_erf_gelu():
  c, hidden = 4, 8
  module = mit.MixFFN(c, hidden)
  x = np.random.default_rng(2).normal(size=(1, 3, 3, c)).astype(np.float32)
  variables = module.init(jax.random.key(4), x)
  p = jax.tree.map(np.asarray, variables["params"])
  y = x[0] @ p["fc1"]["kernel"] + p["fc1"]["bias"]
  pad = np.pad(y, ((1, 1), (1, 1), (0, 0)))
  dw = np.zeros_like(y)
  for i in range(3):
    for j in range(3):
      dw[i, j] = (pad[i:i + 3, j:j + 3] * p["dwconv"]["kernel"][:, :, 0]).sum((0, 1))
  dw += p["dwconv"]["bias"]
  gelu = dw * 0.5 * (1 + np.vectorize(math.erf)(dw / math.sqrt(2)))
  want = gelu @ p["fc2"]["kernel"] + p["fc2"]["bias"]
  np.testing.assert_allclose(np.asarray(module.apply(variables, x))[0], want, rtol=1e-4,
                             atol=1e-5)


# ---------------------------------------------------------------- builders

def test_model_config_errors_name_key_and_choices():
  """Bad model names are config errors, raised by validation before anything is built."""
  for key, value, match in (("backbone", "mit_b9", r"model\.backbone='mit_b9'.*mit_b5"),
                            ("head", "segformer", r"model\.head='segformer'.*daformer_sepaspp"),
                            ("compute_dtype", "float16", r"compute_dtype='float16'")):
    c = base.base_config()
    c.model[key] = value
    with pytest.raises(validation.ConfigError, match=match):
      validation.validate(c)
  with pytest.raises(ValueError, match="fusion 'x'"):
    daformer_head.DAFormerHead(19, fusion="x").init(
        jax.random.key(0), [jnp.zeros((1, 2, 2, 4))] * 4, train=False)
  assert segmentor.feature_channels(_cfg(backbone="resnet101_v1c")) == (256, 512, 1024, 2048)


def test_conv1_head_matches_hrda_scale_attention_count():
  # HRDA's scale-attention head = DAFormer head with 1x1 fusion: 530,707 params (§1.4).
  head = daformer_head.DAFormerHead(19, fusion="conv1")
  feats = [jnp.zeros((1, 16 // 2 ** i, 16 // 2 ** i, c)) for i, c in enumerate((64, 128, 320, 512))]
  variables = jax.eval_shape(lambda: head.init(jax.random.key(0), feats, train=False))
  assert segmentor.count_params(variables["params"]) == 530_707
  assert set(variables["params"]["fuse_layer"]) == {"conv", "bn"}


def test_head_concat_order_is_level_0_to_3():
  # §1.2: the fused map is [emb(f1) | up(emb(f2)) | up(emb(f3)) | up(emb(f4))] (stride 4 first).
  head = daformer_head.DAFormerHead(5, embed_dim=4, fusion="conv1")
  rng = np.random.default_rng(6)
  feats = [jnp.asarray(rng.normal(size=(1, 8 // 2 ** i, 8 // 2 ** i, c)), jnp.float32)
           for i, c in enumerate((2, 3, 5, 6))]
  variables = head.init(jax.random.key(0), feats, train=False)
  seen = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    name = context.module.name
    if isinstance(context.module, daformer_head.MLPEmbed):
      seen[name] = out
    elif name == "fuse_layer" and context.method_name == "__call__":
      seen[name] = args[0]
    return out

  with nn.intercept_methods(record):
    head.apply(variables, feats, train=False)
  fused = np.asarray(seen["fuse_layer"])
  assert fused.shape == (1, 8, 8, 16)
  for i in range(4):
    want = jax.image.resize(seen[f"embed_layers_{i}"], (1, 8, 8, 4), "bilinear", antialias=False)
    np.testing.assert_allclose(fused[..., 4 * i:4 * i + 4], want, rtol=1e-5, atol=1e-6)


def test_dlv2red_resnet101_v1c_count():
  """Cross-check with the concurrently written ResNet/DeepLab modules (§1.3: 43,219,846)."""
  pytest.importorskip("mfm_jax.models.resnet")
  pytest.importorskip("mfm_jax.models.deeplab")
  model = segmentor.build_segmentor(_cfg(backbone="resnet101_v1c", head="dlv2red"))
  variables = _abstract_init(model)
  assert segmentor.count_params(variables["params"]) == 43_219_846
  assert segmentor.count_params(variables["params"]["decode_head"]) == 700_454


def test_scan_blocks_same_tree_function_and_gradients():
  """model.scan_blocks: each stage's blocks as one lax.scan over the unrolled parameters."""
  x = _X[:, :32, :32]
  # mit_tiny has one block per stage (nothing to scan): stages of 2, 1, 3, 2 blocks here.
  kw = dict(mit.MIT_VARIANTS["mit_tiny"], depths=(2, 1, 3, 2), drop_path_rate=0.1,
            depthwise_impl="xla")
  plain = mit.MixVisionTransformer(**kw)
  scanned = mit.MixVisionTransformer(**kw, scan_blocks=True, remat=True)
  v = jax.jit(lambda: plain.init(jax.random.key(0), x, train=False))()
  assert jax.tree.structure(v) == jax.tree.structure(
      jax.eval_shape(lambda: scanned.init(jax.random.key(0), x, train=False)))
  loss = lambda m, v: sum(jnp.mean(f ** 2) for f in m.apply(v, x, train=False))  # noqa: E731
  (la, ga), (lb, gb) = (jax.jit(jax.value_and_grad(lambda v, m=m: loss(m, v)))(v)
                        for m in (plain, scanned))
  np.testing.assert_allclose(la, lb, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # Training mode (stochastic depth on) runs and keeps the shapes.
  out = jax.eval_shape(lambda: scanned.apply(v, x, train=True,
                                             rngs={"dropout": jax.random.key(1)}))
  assert [f.shape for f in out] == [f.shape for f in
                                    jax.eval_shape(lambda: plain.apply(v, x, train=False))]
  # The stacked layout of the train state (one `blocks{i}` entry per stage of > 1 block): the
  # same function and, unstacked, the same gradients; stack/unstack are exact inverses.
  vs = mit.stack_blocks(v)
  keys = sorted(vs["params"])
  assert keys[:4] == ["block2_0", "blocks1", "blocks3", "blocks4"]  # stage 2: one block
  assert vs["params"]["blocks3"]["norm1"]["scale"].shape[0] == 3
  lc, gc = jax.jit(jax.value_and_grad(lambda v: loss(scanned, v)))(vs)
  np.testing.assert_allclose(la, lc, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(mit.unstack_blocks(gc))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert jax.tree.structure(mit.unstack_blocks(vs)) == jax.tree.structure(v)
  assert all((a == b).all() for a, b in zip(jax.tree.leaves(mit.unstack_blocks(vs)),
                                            jax.tree.leaves(v)))
  shapes = mit.stack_blocks(jax.eval_shape(lambda: v))  # abstract trees too
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(lambda a: a.shape, vs)
  with pytest.raises(ValueError, match="block1_0..block1_1"):
    mit.stack_blocks({"block1_0": {"w": jnp.ones(1)}, "block1_2": {"w": jnp.ones(1)}})
