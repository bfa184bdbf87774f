"""Tests for mfm_jax.convert: safe .pth reading, strict torch ⇄ Flax mapping, the CLI.

Key-set checks use the reference state_dict listings (statedicts/*.tsv) with zero-stride
(memory-free) tensors of the real shapes; value round trips use tiny variants.
"""

import os
import subprocess
import sys

from flax import traverse_util
import jax
import numpy as np
import pytest

from mfm_jax.config import base
from mfm_jax.convert import cli
from mfm_jax.convert import hf_segformer
from mfm_jax.convert import mapping
from mfm_jax.convert import torch_io
from mfm_jax.models import daformer_head
from mfm_jax.models import mit
from mfm_jax.models import segmentor
from mfm_jax.trainer import checkpoint

torch = pytest.importorskip("torch")

from reference_data import STATEDICTS as _STATEDICTS  # noqa: E402

_IMAGE = jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)


def _tsv(name):
  path = os.path.join(_STATEDICTS, name)
  if not os.path.exists(path):
    pytest.skip(f"reference state_dict listing not found at {path}")
  sd = {}
  for line in open(path):
    key, shape, dtype = line.rstrip("\n").split("\t")
    shape = [int(s) for s in shape.strip("[]").split(",") if s.strip()]
    # Zero-stride views: real shapes without allocating B5-sized memory.
    sd[key] = torch.zeros((), dtype=torch.int64 if "int64" in dtype else torch.int8).expand(shape)
  return sd


def _shapes(tree):
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


def _random_like(abstract, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), abstract)


def _abstract(module, *args):
  v = jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a, train=False), *args)
  return {"params": v["params"], "batch_stats": v.get("batch_stats", {})}


def _tiny_daformer(fusion="sepaspp"):
  return segmentor.EncoderDecoder(backbone=mit.mit("mit_tiny"), decode_head=daformer_head.DAFormerHead(
      num_classes=5, embed_dim=16, fusion=fusion))


def _tiny_hrda_abstract():
  """HRDA param tree from its parts: shared MiT, decode_head/{head, scale_attention} (§1.4)."""
  enc = _abstract(mit.mit("mit_tiny"), _IMAGE)
  feats = jax.eval_shape(lambda x: mit.mit("mit_tiny").init_with_output(
      jax.random.key(0), x, train=False)[0], _IMAGE)
  head = _abstract(daformer_head.DAFormerHead(5, 16, "sepaspp"), feats)
  att = _abstract(daformer_head.DAFormerHead(5, 16, "conv1"), feats)
  return {"params": {"backbone": enc["params"], "decode_head": {
              "head": head["params"], "scale_attention": att["params"]}},
          "batch_stats": {"decode_head": {"head": head["batch_stats"],
                                          "scale_attention": att["batch_stats"]}}}


def _tiny_variables(arch):
  if arch == "hrda":
    return _random_like(_tiny_hrda_abstract())
  if arch == "mit_tiny":
    return _random_like(_abstract(mit.mit("mit_tiny"), _IMAGE))
  return _random_like(_abstract(_tiny_daformer(), _IMAGE))


def _equal(a, b):
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert set(fa) == set(fb)
  for k in fa:
    assert np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype, k
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


# ---------------------------------------------------------------- reference key sets (B5 / R101)

def test_daformer_mitb5_tree_matches_flax_model_and_back():
  sd = _tsv("statedict_daformer_mitb5.tsv")
  assert mapping.detect_arch(sd) == "daformer"
  variables = mapping.torch_to_flax(sd)
  model = segmentor.build_segmentor(base.base_config().model)  # MiT-B5 + DAFormer head
  assert _shapes(variables) == _shapes(_abstract(model, _IMAGE))
  back = mapping.flax_to_torch(variables, "daformer", check=False)
  assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in sd.items()}
  assert all(back[k].dtype == np.int64 and back[k] == 0 for k in back if "num_batches" in k)


def test_hrda_key_set_round_trip():
  sd = _tsv("statedict_hrda_daformer_mitb5.tsv")
  assert mapping.detect_arch(sd) == "hrda"
  variables = mapping.torch_to_flax(sd, "hrda")
  assert set(variables["params"]["decode_head"]) == {"head", "scale_attention"}
  assert segmentor.count_params(variables["params"]) == 85_685_990  # §1.4 (executed)
  back = mapping.flax_to_torch(variables, "hrda", check=False)
  assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in sd.items()}


def test_hrda_module_tree_matches_converter():
  """mfm_jax.models.hrda's segmentor init tree equals the converter's HRDA tree (reference names)."""
  from mfm_jax.models import hrda  # pylint: disable=g-import-not-at-top
  config = base.base_config()
  config.model.backbone, config.model.head = "mit_b5", "daformer_sepaspp"
  config.model.hrda.enabled = True
  model = hrda.build_segmentor(config)
  target = jax.eval_shape(lambda x: model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(0)}, x, train=False),
      jax.ShapeDtypeStruct((1, 128, 128, 3), np.float32))
  variables = mapping.torch_to_flax(_tsv("statedict_hrda_daformer_mitb5.tsv"), "hrda")
  assert _shapes(variables) == _shapes(dict(target))


def test_dlv2red_resnet101_key_set_round_trip():
  pytest.importorskip("mfm_jax.models.resnet")
  pytest.importorskip("mfm_jax.models.deeplab")
  sd = _tsv("statedict_dlv2red_r101v1c.tsv")
  assert mapping.detect_arch(sd) == "dlv2"
  variables = mapping.torch_to_flax(sd, "dlv2")
  assert segmentor.count_params(variables["params"]) == 43_219_846  # §1.3 (executed)
  back = mapping.flax_to_torch(variables, "dlv2", check=False)
  assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in sd.items()}


def test_uda_wrapper_selects_student_teacher_imnet():
  sd = _tsv("statedict_mic_hrda_uda_wrapper.tsv")
  for which in ("student", "teacher", "imnet"):
    sel, notes = torch_io.select_state_dict({"state_dict": sd, "meta": {"iter": 40000}}, which)
    assert len(sel) == 1126 and mapping.detect_arch(sel) == "hrda"
    assert torch_io.WHICH_PREFIX[which] in notes[-1]
  bb = {k[len("model.backbone."):]: v for k, v in sd.items() if k.startswith("model.backbone.")}
  assert mapping.detect_arch(bb) == "mit_b5"
  assert mapping.detect_arch({f"backbone.{k}": v for k, v in bb.items()}) == "mit_b5"


# ---------------------------------------------------------------- value round trips (tiny)

@pytest.mark.parametrize("arch", ["daformer", "hrda", "mit_tiny"])
def test_round_trip_is_bitwise(arch, tmp_path):
  variables = _tiny_variables(arch)
  sd = mapping.flax_to_torch(variables, arch, prefix="model.", as_torch=True)
  assert all(isinstance(v, torch.Tensor) for v in sd.values())
  path = str(tmp_path / "w.pth")
  torch_io.save_state_dict({**sd, "ema_model.x": torch.ones(1)}, path)
  loaded = torch_io.load_state_dict(path)  # student: 'model.' stripped
  assert mapping.detect_arch(loaded) == arch
  _equal(mapping.torch_to_flax(loaded, arch), variables)
  again = mapping.flax_to_torch(mapping.torch_to_flax(loaded, arch), arch)
  assert set(again) == set(loaded)
  for k in loaded:
    np.testing.assert_array_equal(again[k], loaded[k], err_msg=k)


def test_layouts():
  assert mapping.torch_name_to_flax("block1.0.mlp.dwconv.dwconv.weight") == (
      "params", "block1_0", "mlp", "dwconv", "weight")
  assert mapping.flax_path_to_torch(("params", "block1_0", "mlp", "dwconv", "kernel")) == \
      "block1.0.mlp.dwconv.dwconv.weight"
  assert mapping.torch_name_to_flax("decode_head.fuse_layer.bn.running_var") == (
      "batch_stats", "decode_head", "fuse_layer", "bn", "var")
  assert mapping.torch_name_to_flax("stem.1.num_batches_tracked") is None
  lin = np.arange(6, dtype=np.float32).reshape(3, 2)  # [out, in]
  np.testing.assert_array_equal(mapping.torch_to_flax_layout(lin, True), lin.T)
  dw = np.arange(36, dtype=np.float32).reshape(4, 1, 3, 3)  # depthwise [C, 1, 3, 3]
  hwio = mapping.torch_to_flax_layout(dw, True)
  assert hwio.shape == (3, 3, 1, 4) and hwio[1, 2, 0, 3] == dw[3, 0, 1, 2]
  np.testing.assert_array_equal(mapping.flax_to_torch_layout(hwio, True), dw)


# ---------------------------------------------------------------- strictness

def test_strict_errors_list_names():
  sd = mapping.flax_to_torch(_tiny_variables("daformer"), "daformer")
  broken = dict(sd)
  del broken["decode_head.conv_seg.bias"]
  broken["decode_head.extra.weight"] = np.zeros(3, np.float32)
  broken["backbone.block1.0.attn.q.weight"] = np.zeros((16, 8), np.float32)
  with pytest.raises(mapping.ConversionError) as e:
    mapping.torch_to_flax(broken, "daformer")
  msg = str(e.value)
  assert "1 missing [decode_head.conv_seg.bias]" in msg
  assert "1 unexpected [decode_head.extra.weight]" in msg
  assert "backbone.block1.0.attn.q.weight [16, 8]" in msg and "wants [16, 16]" in msg
  bb = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
  with pytest.raises(mapping.ConversionError, match=r"arch='mit_b0'.*suggest arch='mit_tiny'"):
    mapping.torch_to_flax(bb, "mit_b0")
  with pytest.raises(mapping.ConversionError, match="Cannot detect the architecture"):
    mapping.detect_arch({"foo.weight": np.zeros(2)})
  with pytest.raises(mapping.ConversionError, match="no MiT counterpart"):
    hf_segformer.hf_segformer_to_reference({"decode_head.classifier.weight": np.zeros((2, 2))})


# ---------------------------------------------------------------- safe reading

def test_container_formats(tmp_path):
  bb = mapping.flax_to_torch(_tiny_variables("mit_tiny"), "mit_tiny", as_torch=True)
  cases = {
      "bare": bb,
      "mmcv": {"state_dict": bb, "meta": {"iter": 3, "seed": np.int64(0)}, "optimizer": {}},
      "model": {"model": bb},
      "ddp": {f"module.{k}": v for k, v in bb.items()},
      # SegFormer ImageNet file: MiT names + classifier, which is dropped with a note.
      "segformer": {**bb, "head.weight": torch.ones(3, 128), "head.bias": torch.ones(3)},
      "half": {k: v.to(torch.bfloat16) if k == "norm4.bias" else v for k, v in bb.items()},
  }
  for name, obj in cases.items():
    path = str(tmp_path / f"{name}.pth")
    torch.save(obj, path)
    ckpt = torch_io.load_checkpoint(path)
    assert set(ckpt.state_dict) == set(bb), name
    assert mapping.detect_arch(ckpt.state_dict) == "mit_tiny"
  notes = torch_io.load_checkpoint(str(tmp_path / "segformer.pth")).notes
  assert any("head.bias" in n and "ImageNet classifier" in n for n in notes)
  assert any("bfloat16" in n for n in torch_io.load_checkpoint(str(tmp_path / "half.pth")).notes)
  with pytest.raises(torch_io.TorchCheckpointError, match="which='teacher'.*single network"):
    torch_io.load_checkpoint(str(tmp_path / "bare.pth"), which="teacher")
  torch.save({f"model.{k}": v for k, v in bb.items()}, tmp_path / "uda.pth")
  with pytest.raises(torch_io.TorchCheckpointError, match=r"only has \['model.'\]"):
    torch_io.load_checkpoint(str(tmp_path / "uda.pth"), which="teacher")
  torch.save({"weights": [1, 2]}, tmp_path / "odd.pth")
  with pytest.raises(torch_io.TorchCheckpointError, match="odd.pth: no state_dict found"):
    torch_io.load_checkpoint(str(tmp_path / "odd.pth"))


class _Evil:
  """Unpickling this would create a marker file (stands for arbitrary code)."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_without_running(tmp_path):
  marker = tmp_path / "EXECUTED"
  path = str(tmp_path / "evil.pth")
  torch.save({"state_dict": {"w": torch.zeros(2)}, "meta": _Evil(str(marker))}, path)
  assert not marker.exists()
  with pytest.raises(torch_io.UnsafeCheckpointError, match=r"evil\.pth.*nothing was executed"):
    torch_io.load_state_dict(path)
  assert not marker.exists()


class _EvilSystem:
  """A blocked-module global (os.system): torch words this refusal differently."""

  def __reduce__(self):
    return (os.system, ("touch EXECUTED",))


def test_malicious_zip_pickle_with_blocked_module_names_it(tmp_path):
  path = str(tmp_path / "evil_zip.pth")
  torch.save({"state_dict": {"w": torch.zeros(2)}, "meta": _EvilSystem()}, path)  # zip format
  with pytest.raises(torch_io.UnsafeCheckpointError) as err:
    torch_io.load_state_dict(path)
  msg = str(err.value)
  assert "evil_zip.pth" in msg and "nothing was executed" in msg
  assert "system" in msg and "blocked" in msg and "truncated" not in msg
  assert not os.path.exists("EXECUTED")


def test_truncated_and_missing_files(tmp_path):
  path = tmp_path / "w.pth"
  torch.save({"w": torch.zeros(100)}, path)
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(torch_io.TorchCheckpointError, match=r"w\.pth \(truncated or corrupt"):
    torch_io.load_state_dict(str(path))
  with pytest.raises(torch_io.TorchCheckpointError, match=r"nope\.pth does not exist"):
    torch_io.load_state_dict(str(tmp_path / "nope.pth"))


# ---------------------------------------------------------------- CLI / Orbax

def test_convert_and_export_daformer(tmp_path):
  variables = _tiny_variables("daformer")
  sd = mapping.flax_to_torch(variables, "daformer", prefix="ema_model.", as_torch=True)
  src = str(tmp_path / "in.pth")
  torch.save({"state_dict": sd, "meta": {}}, src)
  out = str(tmp_path / "orbax")
  report = cli.convert_to_orbax(src, out, which="teacher")
  assert report["arch"] == "daformer" and report["tensors_read"] == len(sd)
  assert report["param_count"] == segmentor.count_params(variables["params"])
  _equal(checkpoint.load_params(out, ("params", "model")), variables["params"])
  _equal(checkpoint.load_params(out, ("batch_stats",)), variables["batch_stats"])
  assert "sha256" in cli.format_report(report)
  with pytest.raises(FileExistsError, match="already exists"):
    cli.convert_to_orbax(src, out, which="teacher")
  back = str(tmp_path / "back.pth")
  report2 = cli.export_to_torch(out, back, prefix="ema_model.")
  assert report2["checksum"] == report["checksum"]
  exported = torch.load(back, weights_only=True)
  assert set(exported) == set(sd)
  for k, v in sd.items():
    assert torch.equal(exported[k], v), k


def test_failed_conversion_leaves_no_output(tmp_path):
  bb = mapping.flax_to_torch(_tiny_variables("mit_tiny"), "mit_tiny", as_torch=True)
  src = str(tmp_path / "mit.pth")
  torch.save(bb, src)
  with pytest.raises(mapping.ConversionError):
    cli.convert_to_orbax(src, str(tmp_path / "out"), arch="mit_b0")
  assert os.listdir(tmp_path) == ["mit.pth"]


def test_cli_backbone_round_trip(tmp_path):
  variables = _tiny_variables("mit_tiny")
  bb = mapping.flax_to_torch(variables, "mit_tiny", as_torch=True)
  src, out, back = str(tmp_path / "mit.pth"), str(tmp_path / "ck"), str(tmp_path / "back.pth")
  torch.save({**bb, "head.weight": torch.zeros(3, 128), "head.bias": torch.zeros(3)}, src)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = lambda *a: subprocess.run([sys.executable, "-m", "mfm_jax.convert", *a],  # noqa: E731
                                  capture_output=True, text=True, env=env, check=True).stdout
  stdout = run(f"--input={src}", f"--output={out}")
  assert "arch=mit_tiny" in stdout and "ImageNet classifier" in stdout and "sha256" in stdout
  params = checkpoint.load_params(out, ("params", "model"))
  assert set(params) == {"backbone"}  # for config.init_scope='backbone'
  _equal(params["backbone"], variables["params"])
  run("--to_torch", f"--input={out}", f"--output={back}")
  exported = torch.load(back, weights_only=True)
  assert set(exported) == set(bb) and all(torch.equal(exported[k], bb[k]) for k in bb)
