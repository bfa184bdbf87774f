"""mfm_jax.predict on a one-step trained synthetic checkpoint: Orbax, .pth and .safetensors.

Several image sizes, a folder tree, a corrupt file, atomic outputs, the summary, the CLI and
its error messages; HRDA on an odd image size (padding to the window grid).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import PIL.Image
import pytest

from mfm_jax import evaluate
from mfm_jax import predict
from mfm_jax.config import fragments
from mfm_jax.convert import cli
from mfm_jax.data import labels
from mfm_jax.data import transforms
from mfm_jax.evaluation import inference
from mfm_jax.trainer import loop
from mfm_jax.trainer import state as state_lib

SIZES = {"a.png": (96, 192), "sub/b.jpg": (50, 70), "sub/deeper/c.png": (120, 90),
         "sub/d.png": (96, 192)}


def _config(data_dir):
  """configs/source_only.py:synthetic (MiT + DAFormer head) on a tiny split, one device."""
  c = fragments.compose(fragments.source_only, presets="synthetic")
  c.data.synthetic.num_source, c.data.synthetic.num_target, c.data.synthetic.num_val = 8, 4, 2
  c.data.data_dir = data_dir
  c.data.crop_size = (32, 32)
  c.mesh.data = 1
  c.eval.crop_size, c.eval.stride = (64, 64), (48, 48)  # real windows in slide mode
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A one-step source-only synthetic run and its .pth / .safetensors exports."""
  root = tmp_path_factory.mktemp("predict")
  config = _config(str(root / "data"))
  workdir = str(root / "run")
  assert loop.train_and_evaluate(config, workdir, stop_at=1) == {"stopped_at": 1}
  ckpt = os.path.join(workdir, "checkpoints")
  pth, st = str(root / "model.pth"), str(root / "model.safetensors")
  cli.export_to_torch(ckpt, pth, arch="daformer")
  cli.export_to_torch(ckpt, st, arch="daformer")
  return {"config": config, "orbax": ckpt, "pth": pth, "safetensors": st, "root": root}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for rel, (h, w) in SIZES.items():
    os.makedirs(os.path.dirname(root / rel), exist_ok=True)
    PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / rel)
  (root / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  (root / "notes.txt").write_text("not an image: ignored in folder mode")
  return root


def _outputs(out):
  return sorted(os.path.relpath(os.path.join(d, f), out)
                for d, _, fs in os.walk(out) for f in fs)


def test_predict_folder_tree_sizes_and_corrupt_file(trained, images, tmp_path):
  out = tmp_path / "out"
  summary = predict.predict(trained["config"], trained["orbax"], str(images), str(out),
                            batch_size=2)
  assert summary["num_inputs"] == 5 and summary["num_written"] == 4
  assert summary["num_skipped"] == 1
  assert summary["skipped"][0]["path"] == str(images / "sub" / "broken.png")
  assert summary["sizes"] == {"192x96": 2, "70x50": 1, "90x120": 1}
  expected = sorted([f"{os.path.splitext(r)[0]}_{k}.png" for r in SIZES
                     for k in predict.OUTPUTS] + [predict.SUMMARY_FILE])
  assert _outputs(out) == expected  # mirrored tree, nothing for broken.png, no temporary files
  assert json.loads((out / predict.SUMMARY_FILE).read_text())["num_skipped"] == 1
  palette = np.asarray(labels.PALETTE, np.uint8)
  for rel, (h, w) in SIZES.items():
    stem = out / os.path.splitext(rel)[0]
    label = np.asarray(PIL.Image.open(f"{stem}_trainIds.png"))
    color = np.asarray(PIL.Image.open(f"{stem}_color.png"))
    over = np.asarray(PIL.Image.open(f"{stem}_overlay.png"))
    assert label.shape == (h, w) and label.dtype == np.uint8 and label.max() < 19
    np.testing.assert_array_equal(color, palette[label])
    image = np.asarray(PIL.Image.open(images / rel).convert("RGB")).astype(np.float32)
    np.testing.assert_allclose(over, (image + color) / 2, atol=1)
  assert "skipped" in predict.format_summary(summary) and "broken.png" in predict.format_summary(
      summary)


def test_pth_and_safetensors_give_the_orbax_prediction(trained, images, tmp_path):
  labels_by = {}
  for kind in ("orbax", "pth", "safetensors"):
    out = tmp_path / kind
    summary = predict.predict(trained["config"], trained[kind], str(images / "a.png"), str(out),
                              batch_size=1)
    assert summary["num_written"] == 1 and _outputs(out) == sorted(
        [f"a_{k}.png" for k in predict.OUTPUTS] + [predict.SUMMARY_FILE])
    labels_by[kind] = np.asarray(PIL.Image.open(out / "a_trainIds.png"))
  np.testing.assert_array_equal(labels_by["pth"], labels_by["orbax"])
  np.testing.assert_array_equal(labels_by["safetensors"], labels_by["orbax"])
  # A glob (its root is sub/) takes broken.png as given; slide mode over 64² windows.
  summary = predict.predict(trained["config"], trained["pth"], str(images / "sub" / "*.*"),
                            str(tmp_path / "glob"), batch_size=1)
  assert summary["num_written"] == 2 and summary["num_skipped"] == 1
  assert os.path.isfile(tmp_path / "glob" / "b_color.png")
  summary = predict.predict(trained["config"], trained["orbax"], str(images / "a.png"),
                            str(tmp_path / "slide"), mode="slide")
  assert summary["mode"] == "slide" and summary["num_written"] == 1


def test_user_errors_name_the_flag_or_file(trained, images, tmp_path):
  config = trained["config"]
  with pytest.raises(predict.PredictError, match=r"--input=.*nowhere: no such file"):
    predict.predict(config, trained["orbax"], str(tmp_path / "nowhere"), str(tmp_path / "o"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(predict.PredictError, match="no images found"):
    predict.predict(config, trained["orbax"], str(tmp_path / "empty"), str(tmp_path / "o"))
  with pytest.raises(predict.PredictError, match=r"--checkpoint=.*missing.pth.*does not exist"):
    predict.predict(config, str(tmp_path / "missing.pth"), str(images), str(tmp_path / "o"))
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"garbage!" * 4)
  with pytest.raises(ValueError, match=r"bad\.safetensors \(truncated or corrupt"):
    predict.predict(config, str(bad), str(images), str(tmp_path / "o"))


def test_outputs_inside_the_input_folder_are_not_inputs(images, tmp_path):
  items = predict.find_inputs(str(images), exclude=str(images / "sub"))
  assert [i.stem for i in items] == ["a"]
  twins = tmp_path / "twins"
  twins.mkdir()
  for name in ("x.png", "x.jpg"):
    PIL.Image.new("RGB", (4, 4)).save(twins / name)
  assert [i.stem for i in predict.find_inputs(str(twins))] == ["x_jpg", "x_png"]


def test_cli_exit_status_and_summary(trained, images, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "")
  run = lambda *a: subprocess.run(  # noqa: E731
      [sys.executable, "-m", "mfm_jax.predict", "--config=configs/source_only.py:synthetic",
       *a], capture_output=True, text=True, env=env, check=False,
      cwd=os.path.dirname(os.path.dirname(__file__)))
  res = run(f"--checkpoint={trained['safetensors']}", f"--input={images / 'sub'}",
            f"--output={tmp_path / 'cli'}")
  assert res.returncode == 1, res.stderr  # one input was skipped
  assert "3 of 4 images segmented" in res.stdout and "broken.png" in res.stdout
  assert "Loaded student weights" in res.stderr and "predict 4/4" in res.stderr
  res = run("--checkpoint=/nonexistent.pth", f"--input={images}", f"--output={tmp_path / 'x'}")
  assert res.returncode != 0 and "--checkpoint=/nonexistent.pth" in res.stderr
  assert res.stderr.strip().splitlines()[-1].startswith("predict: error:")


class _StrideHost:
  """Fake network whose network only takes multiples of 32 (as HRDA's window grid) and whose
  logits at a pixel depend on that pixel only, so padding + cropping must be exact."""

  def predict(self, variables, x, train=False):
    del variables, train
    if x.shape[1] % 32 or x.shape[2] % 32:
      raise ValueError(f"not aligned: {x.shape}")
    return jax.numpy.stack([x[..., 0], x[..., 1], -x[..., 0]], -1), None, None


def test_padding_to_the_window_grid_is_cropped_back():
  config = fragments.compose(fragments.source_only, presets="synthetic")
  config.model.num_classes = 3
  x = np.random.default_rng(0).integers(0, 256, (2, 61, 97, 3), dtype=np.uint8)
  pred = np.asarray(inference.make_predict_fn(config, _StrideHost(), pad_multiple=32)(
      {}, x, (61, 97)))
  z = (x.astype(np.float32) - transforms.MEAN) / transforms.STD  # what the network sees
  np.testing.assert_array_equal(pred, np.argmax(np.stack([z[..., 0], z[..., 1], -z[..., 0]],
                                                         -1), -1))
  with pytest.raises(ValueError, match="not aligned"):
    inference.make_predict_fn(config, _StrideHost())({}, x, (61, 97))


def test_hrda_odd_image_size():
  """The real HRDA network on an odd size (random weights: shapes only)."""
  config = fragments.compose(fragments.mic, fragments.hrda, fragments.mfm, presets="synthetic")
  net = state_lib.build_network(config)
  rng = np.random.default_rng(0)
  shapes = state_lib.abstract_variables(config, net)
  abstract = {"params": shapes["params"]["model"], "batch_stats": shapes["batch_stats"]}
  v = jax.tree.map(lambda s: np.abs(rng.normal(size=s.shape)).astype(np.float32) * 0.1, abstract)
  fn = inference.make_predict_fn(config, net, pad_multiple=predict.HRDA_PAD_MULTIPLE)
  x = rng.integers(0, 256, (1, 61, 97, 3), dtype=np.uint8)
  pred = np.asarray(fn(v, x, (61, 97)))
  assert pred.shape == (1, 61, 97) and 0 <= pred.min() and pred.max() < 19
