"""The MFM Rebuilder is the authors' released design (uda_reference.md §7.2b): parameter counts,
parity with an independent PyTorch module through the converter, the crop-size rule, the mask as
an input, init, and weights in/out with the released names."""

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mfm_jax.config import base
from mfm_jax.config import fragments
from mfm_jax.convert import mapping
from mfm_jax.convert import rebuilder_mapping
from mfm_jax.models import rebuilder
from mfm_jax.models import segmentor
from mfm_jax.trainer import checkpoint
from mfm_jax.trainer import state as state_lib
from mfm_jax.uda import mfm

torch = pytest.importorskip("torch")
from tests import torch_rebuilder  # noqa: E402  pylint: disable=g-import-not-at-top

MIT = (64, 128, 320, 512)
MIT_SIZES = (128, 64, 32, 16)  # 512 crop
R101 = (256, 512, 1024, 2048)


def _count(tree):
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def _abstract(channels, sizes, levels, single=False, grid=16, **kw):
  feats = [jax.ShapeDtypeStruct((1, s, s, c), jnp.float32) for s, c in zip(sizes, channels)]
  keep = jax.ShapeDtypeStruct((1, grid, grid), jnp.float32)
  module = rebuilder.Rebuilder(channels=channels, levels=levels, single_projector=single, **kw)
  return jax.eval_shape(module.init, jax.random.key(0), feats, keep)["params"]


def test_parameter_counts_equal_the_release():
  assert _count(_abstract(MIT, MIT_SIZES, (0, 1, 2, 3))) == 14_545_280
  assert _count(_abstract(R101, (128, 64, 64, 64), (3,), single=True)) == 10_246_016


def test_sincos_table_row_half_first_sin_then_cos():
  d, g = 16, 5
  ours = rebuilder.sincos_pos_embed(d, (g, g))
  np.testing.assert_allclose(ours, torch_rebuilder.sincos_table(d, g).numpy(), atol=1e-6)
  # Token (row 2, col 3): first quarter sin(2ω), then cos(2ω), sin(3ω), cos(3ω).
  w = 1.0 / 10000 ** (np.arange(4) / 4)
  np.testing.assert_allclose(ours[2 * g + 3], np.concatenate(
      [np.sin(2 * w), np.cos(2 * w), np.sin(3 * w), np.cos(3 * w)]), atol=1e-6)


@pytest.mark.parametrize("crop,levels,grid,steps", [
    (512, (128, 64, 32, 16), (16, 16), (3, 2, 1, 0)),  # the release's ×8/×4/×2/×1
    (256, (64, 32, 16, 8), (8, 8), (3, 2, 1, 0)),  # study preset: grid 8
    (64, (16, 8, 4, 2), (2, 2), (3, 2, 1, 0)),  # synthetic 64² crops
    (48, (12, 6, 3, 2), (2, 2), (3, 2, 1, 0)),  # HRDA synthetic context: resize fallback
    (1024, (256, 128, 64, 32), (16, 16), (4, 3, 2, 1)),  # non-HRDA 1024 crop
])
def test_crop_size_rule(crop, levels, grid, steps):
  cfg = base.base_config().model
  cfg.backbone = "mit_b5"
  sizes = segmentor.level_sizes(cfg, (crop, crop))
  assert [s[0] for s in sizes] == list(levels)
  assert mfm.token_grid(sizes[-1], 16) == grid
  assert tuple(rebuilder.upsample_steps(s, grid) for s in sizes) == steps
  # The module's outputs have every level's exact size.
  module = rebuilder.Rebuilder(channels=(4, 8, 8, 16), levels=(0, 1, 2, 3), embed_dim=16,
                               num_heads=2, depth=1)
  feats = [jax.ShapeDtypeStruct((1, *s, c), jnp.float32) for s, c in zip(sizes, (4, 8, 8, 16))]
  keep = jax.ShapeDtypeStruct((1, *grid), jnp.float32)
  (out, _), _ = jax.eval_shape(lambda f, k: module.init_with_output(jax.random.key(0), f, k),
                               feats, keep)
  assert [o.shape for o in out] == [f.shape for f in feats]


def test_level_sizes_match_the_encoders():
  cfg = base.base_config().model
  for backbone in ("mit_tiny", "resnet50_v1c", "resnet50"):
    cfg.backbone = backbone
    enc = segmentor.build_backbone(cfg)
    x = jax.ShapeDtypeStruct((1, 70, 45, 3), jnp.float32)
    feats = jax.eval_shape(lambda a, e=enc: e.init_with_output(jax.random.key(0), a,
                                                               train=False)[0], x)
    assert [tuple(f.shape[1:3]) for f in feats] == segmentor.level_sizes(cfg, (70, 45))


def _random_torch(module, seed=0):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("pos_embed"):
        continue
      scale = 0.2 if p.ndim == 1 else 1.0 / math.sqrt(max(1, p[0].numel()))
      base = 1.0 if name.endswith(("norm.weight", "norm1.weight", "norm2.weight")) or (
          p.ndim == 1 and ".fpn." in name and "weight" in name) else 0.0
      p.copy_(base + scale * torch.randn(p.shape, generator=gen))
  return module


def _rel(a, b):
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


@pytest.mark.parametrize("variant", ["daformer", "dlv2"])
def test_parity_with_independent_torch_module(variant):
  """Same weights (through the converter) and the same keep mask: every rebuilt level agrees
  to ≤ 1e-5 relative in fp32 (full size: 512 tokens, 16 heads, 512 crop)."""
  dlv2 = variant == "dlv2"
  channels, sizes = (R101, (64, 64, 64, 64)) if dlv2 else (MIT, MIT_SIZES)
  tm = _random_torch(torch_rebuilder.TorchRebuilder(channels, sizes, dlv2=dlv2)).eval()
  params, notes = rebuilder_mapping.torch_to_flax(tm.state_dict(), f"rebuilder_{variant}")
  assert any("sin-cos" in n for n in notes)
  rng = np.random.default_rng(1)
  feats = [rng.normal(size=(2, c, s, s)).astype(np.float32) for c, s in zip(channels, sizes)]
  keep = (rng.uniform(size=(2, 16, 16)) > 0.4).astype(np.float32)
  with torch.no_grad():
    want = [t.numpy() for t in tm([torch.from_numpy(f) for f in feats], torch.from_numpy(keep))]
  module = rebuilder.Rebuilder(channels=channels, levels=(3,) if dlv2 else (0, 1, 2, 3),
                               single_projector=dlv2)
  got, _ = jax.jit(module.apply)({"params": params}, [jnp.asarray(f.transpose(0, 2, 3, 1))
                                                      for f in feats], jnp.asarray(keep))
  rebuilt = [3] if dlv2 else [0, 1, 2, 3]  # DeepLabV2 reads only its last level
  for lvl in rebuilt:
    err = _rel(np.asarray(got[lvl]).transpose(0, 3, 1, 2), want[lvl])
    assert err <= 1e-5, (variant, lvl, err)
  # Visible cells are the encoder's features exactly; masked cells changed.
  k = np.repeat(np.repeat(keep, sizes[3] // 16, 1), sizes[3] // 16, 2)[..., None] > 0.5
  last, f_last = np.asarray(got[3]), feats[3].transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(np.where(k, last, 0), np.where(k, f_last, 0))
  assert not np.allclose(last[~k[..., 0]], f_last[~k[..., 0]])


def test_mask_is_an_input_and_masked_tokens_ignore_the_features():
  module = rebuilder.Rebuilder(channels=(4, 8, 8, 16), levels=(0, 1, 2, 3), embed_dim=16,
                               num_heads=2, depth=1)
  rng = np.random.default_rng(2)
  feats = [jnp.asarray(rng.normal(size=(1, s, s, c)), jnp.float32)
           for s, c in zip((16, 8, 4, 2), (4, 8, 8, 16))]
  variables = module.init(jax.random.key(0), feats, jnp.ones((1, 2, 2)))
  keep = jnp.asarray([[[1.0, 0.0], [0.0, 1.0]]])
  a, _ = module.apply(variables, feats, keep)
  b, _ = module.apply(variables, feats, keep)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  # Everything masked: the rebuilt maps no longer depend on the features at all.
  none = jnp.zeros((1, 2, 2))
  c1, _ = module.apply(variables, feats, none)
  c2, _ = module.apply(variables, [f * 3 + 1 for f in feats], none)
  for x, y in zip(c1, c2):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="keep mask"):
    module.apply(variables, feats, jnp.ones((1, 3, 3)))


def test_init_follows_the_release():
  module = rebuilder.Rebuilder(channels=(16, 32, 64, 128), levels=(0, 1, 2, 3), embed_dim=64,
                               num_heads=4)
  feats = [jnp.zeros((1, s, s, c)) for s, c in zip((16, 8, 4, 2), (16, 32, 64, 128))]
  p = module.init(jax.random.key(3), feats, jnp.ones((1, 2, 2)))["params"]
  qkv = np.asarray(p["transformer"]["blocks_0"]["attn"]["qkv"]["kernel"])  # xavier-uniform
  bound = math.sqrt(6 / (64 + 192))
  assert np.abs(qkv).max() <= bound and np.std(qkv) == pytest.approx(bound / math.sqrt(3),
                                                                     rel=0.05)
  assert not np.asarray(p["transformer"]["blocks_0"]["attn"]["qkv"]["bias"]).any()
  assert not np.asarray(p["embedding"]["linear_embed"]["bias"]).any()
  tok = np.asarray(p["transformer"]["mask_token"])
  assert tok.shape == (64,) and 0.01 < np.std(tok) < 0.03
  convt = p["projector"]["projector1"]["fpn_0"]  # torch default: U(±1/sqrt(out · 4 · 4))
  b = 1 / math.sqrt(32 * 16)
  assert np.abs(np.asarray(convt["kernel"])).max() <= b
  assert np.std(np.asarray(convt["kernel"])) == pytest.approx(b / math.sqrt(3), rel=0.05)
  assert 0 < np.abs(np.asarray(convt["bias"])).max() <= b
  ln = p["projector"]["projector1"]["norm"]
  assert (np.asarray(ln["scale"]) == 1).all() and not np.asarray(ln["bias"]).any()


def test_keep_mask_is_bernoulli_and_deterministic():
  key = jax.random.key(7)
  k = np.asarray(jax.jit(mfm.keep_mask, static_argnums=(1, 2, 3))(key, 64, (16, 16), 0.4))
  assert k.shape == (64, 16, 16) and set(np.unique(k)) <= {0.0, 1.0}
  per_sample = 1 - k.reshape(64, -1).mean(1)
  assert len(set(per_sample.round(6))) > 5  # not an exact count per sample
  assert abs(per_sample.mean() - 0.4) < 0.02
  np.testing.assert_array_equal(k, np.asarray(mfm.keep_mask(key, 64, (16, 16), 0.4)))
  assert mfm.keep_mask(key, 2, (4, 4), 0.0).all() and not mfm.keep_mask(key, 2, (4, 4),
                                                                            1.0).any()


def test_uncertainty_mask_keeps_the_ratio_and_follows_the_scores():
  scores = jnp.tile(jnp.concatenate([jnp.zeros((1, 8, 4)), jnp.ones((1, 8, 4))], axis=2),
                    (256, 1, 1))
  keep = np.asarray(mfm.guided_keep_mask(jax.random.key(0), scores, 0.4, 1.0))
  masked = 1 - keep
  assert abs(masked.mean() - 0.4) < 0.02
  assert masked[..., :4].mean() == 0.0 and abs(masked[..., 4:].mean() - 0.8) < 0.03
  uniform = 1 - np.asarray(mfm.guided_keep_mask(jax.random.key(0), scores, 0.4, 0.0))
  assert abs(uniform[..., :4].mean() - 0.4) < 0.03


# ------------------------------------------------------------------ weights in / out


def _torch_file(tmp_path, variant="daformer", prefix=""):
  channels, sizes = ((16, 32, 64, 128), (16, 8, 4, 2)) if variant == "daformer" else (
      (8, 8, 16, 64), (8, 8, 8, 8))
  tm = _random_torch(torch_rebuilder.TorchRebuilder(channels, sizes, g=2, dim=32, heads=4,
                                                    dlv2=variant == "dlv2"), seed=5)
  sd = {prefix + k: v for k, v in tm.state_dict().items()}
  if prefix:  # a whole training checkpoint: other networks' tensors beside the Rebuilder
    sd["model.backbone.patch_embed1.proj.weight"] = torch.zeros(4, 3, 7, 7)
    sd = {"state_dict": sd, "meta": {"iter": 10}}
  path = tmp_path / f"rebuilder_{variant}.pth"
  torch.save(sd, path)
  return path, tm.state_dict()


@pytest.mark.parametrize("variant,prefix", [("daformer", ""), ("dlv2", ""),
                                            ("daformer", "rebuilder.")])
def test_convert_round_trip_is_exact(tmp_path, variant, prefix):
  from mfm_jax.convert import cli  # pylint: disable=g-import-not-at-top
  src, want = _torch_file(tmp_path, variant, prefix)
  arch = f"rebuilder_{variant}"
  report = cli.convert_to_orbax(str(src), str(tmp_path / "orbax"), arch)
  assert report["param_count"] == sum(v.numel() for k, v in want.items() if "pos_embed" not in k)
  back = tmp_path / "back.pth"
  cli.export_to_torch(str(tmp_path / "orbax"), str(back), arch, grid=2)
  got = torch.load(back, weights_only=True)
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    assert got[k].shape == v.shape and torch.equal(got[k], v), k
  if variant == "daformer" and not prefix:  # the same through .safetensors
    st = tmp_path / "back.safetensors"
    cli.export_to_torch(str(tmp_path / "orbax"), str(st), arch, grid=2)
    cli.convert_to_orbax(str(st), str(tmp_path / "orbax2"), arch)
    a = checkpoint.load_params(str(tmp_path / "orbax"), subtree=("params", "rebuilder"))
    b = checkpoint.load_params(str(tmp_path / "orbax2"), subtree=("params", "rebuilder"))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_convert_is_strict_and_names_keys(tmp_path):
  _, sd = _torch_file(tmp_path)
  sd = dict(sd)
  del sd["transformer.blocks.0.attn.qkv.bias"]
  sd["projector.projector1.extra.weight"] = torch.zeros(3)
  with pytest.raises(mapping.ConversionError, match=r"attn\.qkv\.bias.*extra\.weight|"
                                                    r"extra\.weight.*attn\.qkv\.bias"):
    rebuilder_mapping.torch_to_flax(sd, "rebuilder_daformer")
  bad = dict(_torch_file(tmp_path)[1])
  bad["transformer.pos_embed"] = bad["transformer.pos_embed"] * 0 + 1
  with pytest.raises(mapping.ConversionError, match="sin-cos"):
    rebuilder_mapping.torch_to_flax(bad, "rebuilder_daformer")


def test_convert_cli_and_init_from(tmp_path):
  """`python -m mfm_jax.convert --arch=rebuilder_daformer`, then a run starts from it."""
  c = fragments.compose(fragments.mic, fragments.mfm, presets="synthetic")
  c.data.crop_size = (64, 64)
  net, task = state_lib.build_network(c), state_lib.build_mfm_task(c)
  # A torch Rebuilder with the synthetic config's sizes (mit_tiny, embed 64, grid 2).
  channels = tuple(segmentor.feature_channels(c.model))
  sizes = [s[0] for s in task.level_sizes]
  tm = _random_torch(torch_rebuilder.TorchRebuilder(channels, sizes, g=task.grid[0],
                                                    dim=c.mfm.embed_dim, heads=c.mfm.num_heads),
                     seed=9)
  pth = tmp_path / "released.pth"
  torch.save(tm.state_dict(), pth)
  out = tmp_path / "rb"
  r = subprocess.run([sys.executable, "-m", "mfm_jax.convert", f"--input={pth}",
                      f"--output={out}", "--arch=rebuilder_daformer"], capture_output=True,
                     text=True, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-2000:]
  assert "parameters:" in r.stdout
  c.mfm.init_from = str(out)
  tx = state_lib.build_optimizer(c, net, task)
  st = state_lib.create_train_state(c, net, task, tx)
  loaded = checkpoint.load_params(str(out), subtree=("params", "rebuilder"))
  for a, b in zip(jax.tree_util.tree_leaves(st.params["rebuilder"]),
                  jax.tree_util.tree_leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  q = st.params["rebuilder"]["transformer"]["blocks_0"]["attn"]["qkv"]["kernel"]
  np.testing.assert_array_equal(np.asarray(q), tm.state_dict()[
      "transformer.blocks.0.attn.qkv.weight"].numpy().T)


@pytest.mark.parametrize("shape", [(2, 4, 4, 16, 8), (1, 3, 5, 8, 12)])
def test_subpixel_upsampling_equals_the_transposed_conv(shape):
  """ops.conv_transpose_2x 'subpixel' (3x3 conv + depth-to-space, same kernel) = 'transpose'
  = torch ConvTranspose2d(4, 2, 1): forward and gradients w.r.t. input and kernel."""
  from mfm_jax import ops  # pylint: disable=g-import-not-at-top
  b, h, w, cin, cout = shape
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(b, h, w, cin)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(4, 4, cout, cin)) / 8, jnp.float32)
  g = jnp.asarray(rng.normal(size=(b, 2 * h, 2 * w, cout)), jnp.float32)
  outs = {}
  for impl in ops.CONV_TRANSPOSE_IMPLS:
    f = lambda x, k, impl=impl: ops.conv_transpose_2x(x, k, impl)  # noqa: E731
    y, vjp = jax.vjp(f, x, k)
    outs[impl] = (y, *vjp(g))
  for a, ref in zip(outs["subpixel"], outs["transpose"]):
    assert a.shape == ref.shape and _rel(np.asarray(a), np.asarray(ref)) < 1e-5
  conv = torch.nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False)
  with torch.no_grad():
    conv.weight.copy_(torch.from_numpy(np.asarray(k).transpose(3, 2, 0, 1).copy()))
    want = conv(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())).numpy()
  assert _rel(np.asarray(outs["subpixel"][0]).transpose(0, 3, 1, 2), want) < 1e-5
  with pytest.raises(ValueError, match="impl"):
    ops.conv_transpose_2x(x, k, "bogus")


def test_upsample_impl_config_key_reaches_the_rebuilder():
  c = fragments.compose(fragments.mic, fragments.mfm, presets="synthetic")
  assert state_lib.build_mfm_task(c).module().upsample_impl == "transpose"  # as released
  c.mfm.upsample_impl = "subpixel"
  assert state_lib.build_mfm_task(c).module().upsample_impl == "subpixel"


def test_rebuilder_subpixel_option_keeps_parameters_and_outputs():
  """Rebuilder(upsample_impl='subpixel'): the same parameter tree (checkpoints unchanged) and
  the same rebuilt features and parameter gradients as the default."""
  kw = dict(channels=(4, 8, 8, 16), levels=(0, 1, 2, 3), embed_dim=16, num_heads=2)
  sizes = (16, 8, 4, 2)
  rng = np.random.default_rng(0)
  feats = [jnp.asarray(rng.normal(size=(2, s, s, c)), jnp.float32)
           for s, c in zip(sizes, kw["channels"])]
  keep = jnp.asarray(rng.uniform(size=(2, 2, 2)) > 0.5, jnp.float32)
  base = rebuilder.Rebuilder(**kw)
  params = base.init(jax.random.key(0), feats, keep)["params"]
  sub = rebuilder.Rebuilder(**kw, upsample_impl="subpixel")
  assert (jax.tree_util.tree_structure(sub.init(jax.random.key(0), feats, keep)["params"])
          == jax.tree_util.tree_structure(params))

  def loss(p, m):
    out, _ = m.apply({"params": p}, feats, keep)
    return sum(jnp.sum(o ** 2) for o in out), out

  (_, want), g_want = jax.value_and_grad(loss, has_aux=True)(params, base)
  (_, got), g_got = jax.value_and_grad(loss, has_aux=True)(params, sub)
  for a, b in zip(got, want):
    assert _rel(np.asarray(a), np.asarray(b)) < 1e-5
  # Gradients relative to the largest of all: some leaves (e.g. biases right before a
  # LayerNorm) are ~1e-5 of the rest and only float noise.
  flat = lambda g: np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(g)])  # noqa: E731
  assert _rel(flat(g_got), flat(g_want)) < 1e-5
