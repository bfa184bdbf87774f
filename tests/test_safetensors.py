"""``.safetensors`` weight files: reading (no torch, no pickle), strictness, convert, export."""

import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from mfm_jax.convert import cli
from mfm_jax.convert import mapping
from mfm_jax.convert import safetensors_io
from mfm_jax.convert import torch_io
from mfm_jax.models import daformer_head
from mfm_jax.models import mit
from mfm_jax.models import segmentor
from mfm_jax.trainer import checkpoint

_IMAGE = jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)


def _random_variables(module, seed=0):
  v = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), _IMAGE)
  v = {"params": v["params"], "batch_stats": v.get("batch_stats", {})}
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), v)


def _daformer():
  return _random_variables(segmentor.EncoderDecoder(
      backbone=mit.mit("mit_tiny"),
      decode_head=daformer_head.DAFormerHead(num_classes=5, embed_dim=16, fusion="sepaspp")))


def _equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_convert_uda_safetensors_like_pth(tmp_path):
  variables = _daformer()
  sd = mapping.flax_to_torch(variables, "daformer", prefix="ema_model.")
  src = str(tmp_path / "uda.safetensors")
  st_numpy.save_file({**sd, "model.x": np.ones(1, np.float32)}, src)
  report = cli.convert_to_orbax(src, str(tmp_path / "orbax"), which="teacher")
  assert report["arch"] == "daformer" and report["tensors_read"] == len(sd)
  assert report["param_count"] == segmentor.count_params(variables["params"])
  assert report["checksum"] == mapping.summarize(variables)
  assert any("selected teacher weights" in n for n in report["notes"])
  assert "sha256" in cli.format_report(report)
  _equal(checkpoint.load_params(str(tmp_path / "orbax"), ("params", "model")),
         variables["params"])
  # Export back to .safetensors (atomic, PyTorch names) and to the same numbers.
  back = str(tmp_path / "back.safetensors")
  report2 = cli.export_to_torch(str(tmp_path / "orbax"), back)
  assert report2["checksum"] == report["checksum"]
  exported = st_numpy.load_file(back)
  assert set(exported) == {k[len("ema_model."):] for k in sd}
  for k, v in sd.items():
    np.testing.assert_array_equal(exported[k[len("ema_model."):]], v, err_msg=k)
  assert sorted(os.listdir(tmp_path)) == ["back.safetensors", "orbax", "uda.safetensors"]


def test_half_precision_is_upcast_with_a_note(tmp_path):
  variables = _random_variables(mit.mit("mit_tiny"))
  sd = mapping.flax_to_torch(variables, "mit_tiny")
  half = {k: v.astype(ml_dtypes.bfloat16) if k == "norm4.bias" else
          v.astype(np.float16) if k == "norm4.weight" else v for k, v in sd.items()}
  path = str(tmp_path / "half.safetensors")
  st_numpy.save_file(half, path)
  ckpt = torch_io.load_checkpoint(path)
  assert ckpt.state_dict["norm4.bias"].dtype == np.float32
  assert any("bfloat16 upcast" in n for n in ckpt.notes)
  assert any("float16 upcast" in n for n in ckpt.notes)
  np.testing.assert_array_equal(ckpt.state_dict["norm4.bias"],
                                sd["norm4.bias"].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_strict_and_broken_files_name_the_file(tmp_path):
  sd = mapping.flax_to_torch(_daformer(), "daformer")
  del sd["decode_head.conv_seg.bias"]
  path = str(tmp_path / "w.safetensors")
  safetensors_io.save(sd, path)
  with pytest.raises(mapping.ConversionError, match=r"1 missing \[decode_head.conv_seg.bias\]"):
    cli.convert_to_orbax(path, str(tmp_path / "out"), arch="daformer")
  assert not os.path.exists(tmp_path / "out")
  data = open(path, "rb").read()
  open(path, "wb").write(data[: len(data) // 2])
  with pytest.raises(torch_io.TorchCheckpointError, match=r"w\.safetensors \(truncated or corrupt"):
    torch_io.load_checkpoint(path)
  (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
  with pytest.raises(torch_io.TorchCheckpointError, match=r"junk\.safetensors \(truncated"):
    torch_io.load_checkpoint(str(tmp_path / "junk.safetensors"))
  with pytest.raises(torch_io.TorchCheckpointError, match=r"nope\.safetensors does not exist"):
    torch_io.load_checkpoint(str(tmp_path / "nope.safetensors"))
  with pytest.raises(torch_io.TorchCheckpointError, match="which='teacher'.*single network"):
    safetensors_io.save({"a": np.zeros(2, np.float32)}, str(tmp_path / "one.safetensors"))
    torch_io.load_checkpoint(str(tmp_path / "one.safetensors"), which="teacher")


def test_cli_reads_safetensors_without_torch(tmp_path):
  variables = _random_variables(mit.mit("mit_tiny"))
  src, out = str(tmp_path / "model.safetensors"), str(tmp_path / "ck")
  safetensors_io.save(mapping.flax_to_torch(variables, "mit_tiny"), src)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  code = ("import sys\nfrom mfm_jax.convert import torch_io\n"
          f"torch_io.load_checkpoint({src!r})\nassert 'torch' not in sys.modules\n")
  subprocess.run([sys.executable, "-c", code], env=env, check=True)
  stdout = subprocess.run([sys.executable, "-m", "mfm_jax.convert", f"--input={src}",
                           f"--output={out}"], capture_output=True, text=True, env=env,
                          check=True).stdout
  assert "model.safetensors" in stdout and "arch=mit_tiny" in stdout and "sha256" in stdout
  _equal(checkpoint.load_params(out, ("params", "model"))["backbone"], variables["params"])
