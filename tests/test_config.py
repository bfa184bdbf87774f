"""Config presets build and validate; bad values and unknown keys are rejected clearly."""

import glob
import os
import subprocess
import sys

import jax
from ml_collections import config_flags  # noqa: F401  (imported for its side effects in main)
import pytest

from mfm_jax.config import fragments
from mfm_jax.config import validation
from mfm_jax.trainer import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL_SIZE = ("mic_mfm.py", "dacs_mfm_dlv2.py", "source_only.py")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def _load(path, arg):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
@pytest.mark.parametrize("arg", ["", "synthetic", "synthia", "synthetic,oracle", "bf16,steps=10"])
def test_every_preset_builds(path, arg):
  c = _load(path, arg)
  validation.validate(c)
  name = os.path.basename(path)
  # Abstract init of the full-size networks is slowish: do it for one config per architecture.
  if arg not in ("synthetic", "") or (arg == "" and name not in FULL_SIZE):
    return
  net = state_lib.build_network(c)
  task = state_lib.build_mfm_task(c)
  # Abstract initialisation: builds every module of the network without allocating it.
  tx = state_lib.build_optimizer(c, net, task)
  abstract = state_lib.abstract_train_state(c, net, task, tx)
  assert abstract.step.shape == ()
  assert ("rebuilder" in abstract.params) == bool(c.mfm.enabled and c.mfm.rebuild)


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_study_preset(path):
  """`study` = `synthetic` at 256² crops: the MiT's last level (stride 32) is 8×8."""
  from mfm_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  if _load(path, "").model.hrda.enabled:
    with pytest.raises(ValueError, match="no HRDA"):
      _load(path, "study")
    return
  c, small = _load(path, "study"), _load(path, "synthetic")
  validation.validate(c)
  assert c.data.source == small.data.source == "synthetic_source"
  assert min(c.data.crop_size) // 32 >= 8 and c.mfm.grid_size == min(c.data.crop_size) // 32
  w, h = c.data.synthetic.width, c.data.synthetic.height
  assert h >= c.data.crop_size[0] and w >= c.data.crop_size[1]
  assert tuple(c.data.target_scale) == tuple(c.data.test_scale) == (w, h)
  # Prepared datasets are keyed by size: the study's never overwrite the 192×96 ones.
  assert synthetic.synthetic_key(c.data) != synthetic.synthetic_key(small.data)
  if os.path.basename(path) == "mic_mfm_daformer.py":
    net = state_lib.build_network(c)
    task = state_lib.build_mfm_task(c)
    abstract = state_lib.abstract_train_state(c, net, task,
                                              state_lib.build_optimizer(c, net, task))
    assert "rebuilder" in abstract.params


def test_parse_arg():
  p = fragments.parse_presets("synthetic,steps=20,mfm=False")
  assert p.synthetic is True and p.steps == 20 and p.mfm is False
  with pytest.raises(ValueError, match="Unknown config preset 'nope'"):
    fragments.parse_presets("nope")


@pytest.mark.parametrize("key,value,match", [
    ("mfm.mask_ratio", 1.5, "mfm.mask_ratio"),
    ("mfm.objective", "mae", "mfm.objective"),
    ("data.batch_size", 0, "data.batch_size"),
    ("data.crop_size", (512,), "data.crop_size"),
    ("optim.lr", -1.0, "optim.lr"),
    # Values that used to pass validation and fail deep inside training (after the workdir).
    ("data.crop_size", (65, 65), r"data.crop_size=\(65, 65\) must be a multiple of 32"),
    ("data.source", "gta6", "data.source='gta6' is unknown"),
    ("data.target", "gta5", "data.target='gta5' has no validation split"),
    ("data.target", "folder_target", "data.folder.target_dir is empty"),
    ("model.backbone", "mit_b9", "model.backbone='mit_b9'"),
    ("uda.mic.block_size", 1000, "uda.mic.block_size=1000"),
    ("eval.stride", (2048, 2048), "eval.stride"),
    ("data.folder.rgb_labels", "blue", "data.folder.rgb_labels"),
    ("mfm.upsample_impl", "pixelshuffle", "mfm.upsample_impl"),
    ("uda.pseudo_ignore_bottom", 120, r"pseudo_ignore_bottom=120 rows exceed .*crop_size\[0\]=64"),
])
def test_validate_names_the_key(key, value, match):
  c = fragments.compose(fragments.mic, fragments.mfm, presets="synthetic")
  node = c
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  if key == "eval.stride":
    c.eval.mode = "slide"
  with pytest.raises(validation.ConfigError, match=match):
    validation.validate(c)


@pytest.mark.parametrize("key,value,match", [
    ("model.hrda.hr_crop_size", (128, 128), "hr_crop_size=.*exceeds"),
    ("model.hrda.hr_slide_stride", (30, 30), "hr_slide_stride"),
    # Context features of a 160 crop at scale 0.5: 80 px → 3 cells, which do not divide 160.
    ("data.crop_size", (160, 160), r"data.crop_size=\(160, 160\).*feature distance"),
])
def test_validate_runs_the_hrda_rules(key, value, match):
  c = fragments.compose(fragments.mic, fragments.hrda, fragments.mfm, presets="synthetic")
  validation.validate(c)
  node = c
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(validation.ConfigError, match=match):
    validation.validate(c)


def _main(*args, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "mfm_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_main_rejects_unknown_key_and_bad_value(tmp_path):
  r = _main("--config=configs/mic_mfm.py:synthetic", "--config.mfm.not_a_key=1",
            f"--workdir={tmp_path}")
  assert r.returncode != 0 and "not_a_key" in r.stderr
  r = _main("--config=configs/mic_mfm.py:synthetic", "--config.mfm.mask_ratio=1.5",
            f"--workdir={tmp_path}")
  assert r.returncode != 0 and "config.mfm.mask_ratio=1.5" in r.stderr


def test_main_without_dataset_says_how_to_prepare(tmp_path):
  r = _main("--config=configs/mic_mfm.py", f"--config.data.data_dir={tmp_path / 'nodata'}",
            f"--workdir={tmp_path / 'w'}")
  assert r.returncode != 0
  assert "mfm_jax.data.prepare" in r.stderr, r.stderr[-2000:]
  assert jax.device_count() >= 1
