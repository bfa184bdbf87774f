"""Tests for mfm_jax.data.raw_files / builders / splits / prepare: tiny fake GTA5, SYNTHIA,
Cityscapes and folder datasets in their real layouts, label mapping, class pixels, splits,
pre-resize, bad input, atomicity and JAX-free prepare workers."""

import json
import os
import pickle
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import PIL.Image
import pytest

from mfm_jax.config import base
from mfm_jax.config import validation
from mfm_jax.data import builders
from mfm_jax.data import labels
from mfm_jax.data import raw_files
from mfm_jax.data import splits
from mfm_jax.data import transforms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W = 6, 9


def _save(path, array, mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  PIL.Image.fromarray(array, mode=mode).save(path)


def _png16(array: np.ndarray) -> bytes:
  """16-bit RGBA PNG (Pillow cannot write it): rows alternate filter 0 (None) and 1 (Sub)."""
  h, w, c = array.shape
  rows = []
  for y in range(h):
    raw = np.frombuffer(array[y].astype(">u2").tobytes(), np.uint8)
    if y % 2:
      prev = np.concatenate([np.zeros(2 * c, np.uint8), raw[:-2 * c]])
      rows.append(b"\x01" + (raw - prev).astype(np.uint8).tobytes())
    else:
      rows.append(b"\x00" + raw.tobytes())

  def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(
        ">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
  ihdr = struct.pack(">IIBBBBB", w, h, 16, 6, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
          chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def _ids(rng, valid_ids, shape=(H, W)):
  return rng.choice(np.asarray(sorted(valid_ids)), size=shape)


def _expected(ids, id_map):
  return np.vectorize(lambda v: id_map.get(int(v), 255))(ids).astype(np.uint8)


def make_gta(root, n=3, seed=0):
  """GTA5 layout; labels as palette ('P') PNGs like the real ones. Returns {name: (img, ids)}."""
  rng, out = np.random.default_rng(seed), {}
  known = sorted(labels.CITYSCAPES_KNOWN_IDS)
  for i in range(n):
    img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    ids = _ids(rng, known).astype(np.uint8)
    _save(f"{root}/images/{i:05d}.png", img)
    lab = PIL.Image.fromarray(ids, mode="L").convert("P")
    lab.putpalette(list(range(256)) * 3)
    os.makedirs(f"{root}/labels", exist_ok=True)
    lab.save(f"{root}/labels/{i:05d}.png")
    out[f"images/{i:05d}.png"] = (img, ids)
  return out


def make_synthia(root, n=2, seed=1):
  rng, out = np.random.default_rng(seed), {}
  for i in range(n):
    img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    lab = np.zeros((H, W, 4), np.uint16)
    lab[..., 0] = _ids(rng, labels.SYNTHIA_KNOWN_IDS)
    lab[..., 1] = rng.integers(0, 60000, (H, W))  # instance ids: must not leak into classes
    lab[..., 3] = 65535
    _save(f"{root}/RGB/{i:07d}.png", img)
    os.makedirs(f"{root}/GT/LABELS", exist_ok=True)
    with open(f"{root}/GT/LABELS/{i:07d}.png", "wb") as f:
      f.write(_png16(lab))
    out[f"RGB/{i:07d}.png"] = (img, lab[..., 0])
  return out


def make_cityscapes(root, seed=2, counts=(("train", "aachen", 2), ("train", "bonn", 1),
                                          ("val", "frankfurt", 2))):
  rng, out = np.random.default_rng(seed), {}
  for split, city, n in counts:
    for i in range(n):
      stem = f"{city}_{i:06d}_000019"
      img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
      ids = _ids(rng, labels.CITYSCAPES_KNOWN_IDS).astype(np.uint8)
      _save(f"{root}/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png", img)
      _save(f"{root}/gtFine/{split}/{city}/{stem}_gtFine_labelIds.png", ids)
      _save(f"{root}/gtFine/{split}/{city}/{stem}_gtFine_color.png", img)  # ignored extra
      out[f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"] = (img, ids)
  return out


def _check(dataset, split, data_dir, raw, id_map):
  src = splits.open_split(dataset, split, data_dir)
  ids = sorted(k for k in raw if f"/{split}/" in k or dataset in ("gta5", "synthia"))
  assert len(src) == len(ids)
  stats = splits.load_class_stats(dataset, split, data_dir)
  assert stats.shape == (len(ids), 19) and stats.dtype == np.int64
  for i, image_id in enumerate(ids):  # record order = sorted file order
    rec = src[i]
    img, raw_ids = raw[image_id]
    want = _expected(raw_ids, id_map)
    assert rec["image_id"] == image_id
    np.testing.assert_array_equal(rec["image"], img)
    assert rec["label"].shape == (H, W) and rec["label"].dtype == np.uint8
    np.testing.assert_array_equal(rec["label"], want)
    counts = np.bincount(want[want < 19], minlength=19)
    np.testing.assert_array_equal(rec["class_pixels"], counts)
    np.testing.assert_array_equal(stats[i], counts)


def test_gta5_synthia_cityscapes_mapping(tmp_path):
  data = str(tmp_path / "tfds")
  gta = make_gta(tmp_path / "gta")
  syn = make_synthia(tmp_path / "synthia")
  cs = make_cityscapes(tmp_path / "cityscapes")
  for name, raw in (("gta5", "gta"), ("synthia", "synthia"), ("cityscapes", "cityscapes")):
    path = builders.prepare(name, str(tmp_path / raw), data)
    assert path == builders.dataset_path(name, data)
  _check("gta5", "train", data, gta, labels.CITYSCAPES_ID_TO_TRAIN_ID)
  _check("synthia", "train", data, syn, labels.SYNTHIA_ID_TO_TRAIN_ID)
  _check("cityscapes", "train", data, cs, labels.CITYSCAPES_ID_TO_TRAIN_ID)
  _check("cityscapes", "val", data, cs, labels.CITYSCAPES_ID_TO_TRAIN_ID)
  assert len(splits.open_split("cityscapes", "train", data)) == 3
  with pytest.raises(KeyError, match="no split 'val'"):
    splits.open_split("gta5", "val", data)
  src = pickle.loads(pickle.dumps(splits.open_split("gta5", "train", data)))  # grain workers
  assert src[1]["image_id"] == "images/00001.png"
  # Re-running is a no-op that returns the same dataset.
  path = builders.prepare("gta5", str(tmp_path / "gta"), data)
  assert path == builders.dataset_path("gta5", data)


def test_rescale_rule_and_prescaled_config(tmp_path):
  raw = make_gta(tmp_path / "gta", n=2)
  data = str(tmp_path / "tfds")
  with pytest.raises(splits.DatasetNotPreparedError):
    splits.open_split("gta5", "train", data, scale=(6, 4))
  builders.prepare("gta5", str(tmp_path / "gta"), data, scale=(6, 4))
  with pytest.raises(splits.DatasetNotPreparedError):  # scaled data never stands in for full
    splits.open_split("gta5", "train", data)
  src = splits.open_split("gta5", "train", data, scale=(6, 4))
  h, w = transforms.keep_ratio_size(H, W, (6, 4))
  assert (w, h) == (6, 4)
  rows = np.floor(np.arange(h) * H / h).astype(int)  # nearest, torch index rule
  cols = np.floor(np.arange(w) * W / w).astype(int)
  for i, image_id in enumerate(sorted(raw)):
    rec = src[i]
    img, ids = raw[image_id]
    assert rec["image"].shape == (h, w, 3)
    full = _expected(ids, labels.CITYSCAPES_ID_TO_TRAIN_ID)
    np.testing.assert_array_equal(rec["label"], full[rows][:, cols])
    # class_pixels stay at the original resolution.
    np.testing.assert_array_equal(rec["class_pixels"], np.bincount(full[full < 19], minlength=19))
    # Bilinear with the training pipeline's numpy rule, so a pre-resized copy holds exactly
    # what the online keep-ratio resize would compute.
    np.testing.assert_array_equal(rec["image"], transforms.resize_bilinear(img, (h, w)))


def test_folder_dataset_with_label_map_and_resolve(tmp_path):
  from mfm_jax.config import base  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  root = tmp_path / "mine"
  raw = {}
  for split, n in (("train", 2), ("val", 1)):
    for i in range(n):
      img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
      ids = _ids(rng, (0, 1, 2, 255)).astype(np.uint8)
      _save(f"{root}/images/{split}/sub/{i}.jpg" if i == 0 and split == "train" else
            f"{root}/images/{split}/sub/{i}.png", img)
      _save(f"{root}/labels/{split}/sub/{i}.png", ids)
      raw[f"images/{split}/sub/{i}." + ("jpg" if i == 0 and split == "train" else "png")] = (
          img, ids)
  label_map = tmp_path / "map.json"
  label_map.write_text(json.dumps({"0": 10, "1": 0, "2": 13, "255": 255}))
  cfg = base.base_config().data
  cfg.data_dir = str(tmp_path / "tfds")
  cfg.folder.source_dir, cfg.folder.label_map = str(root), str(label_map)
  res = splits.resolve("folder_source", cfg)
  assert res.dataset == "folder" and dict(res.splits) == {"train": "train", "val": "val"}
  src = splits.open_split("folder", "train", res.data_dir)
  assert [src[i]["image_id"] for i in range(2)] == ["images/train/sub/0.jpg",
                                                    "images/train/sub/1.png"]
  want = _expected(raw["images/train/sub/1.png"][1], {0: 10, 1: 0, 2: 13})
  np.testing.assert_array_equal(src[1]["label"], want)
  assert src[0]["image"].shape == (H, W, 3)  # JPEG re-encoded losslessly as PNG
  # Same data dir, other label map: refused instead of silently reusing.
  other = tmp_path / "map2.json"
  other.write_text(json.dumps({"0": 1, "1": 2, "2": 3, "255": 255}))
  with pytest.raises(raw_files.PrepareError, match="different data_dir"):
    builders.prepare("folder", str(root), res.data_dir, label_map=str(other))
  # A label id absent from the map is rejected with the file name.
  bad = tmp_path / "map3.json"
  bad.write_text(json.dumps({"0": 1}))
  with pytest.raises(raw_files.PrepareError, match=r"labels/train/sub/0\.png"):
    builders.prepare("folder", str(root), str(tmp_path / "other"), label_map=str(bad))
  c = base.base_config()  # an empty folder is a config error, found before any data is read
  c.data.target, c.data.folder.target_dir = "folder_target", ""
  with pytest.raises(validation.ConfigError, match="folder.target_dir"):
    validation.validate(c)


def _corrupt(path):
  with open(path, "r+b") as f:
    f.truncate(60)


BAD_CASES = {
    # name: (dataset, mutate(raw_root) -> the path the message must name)
    "missing_folder": ("gta5", lambda r: (os.rename(f"{r}/labels", f"{r}/lbl"), f"{r}/labels")[1]),
    "corrupt_image": ("gta5", lambda r: (_corrupt(f"{r}/images/00001.png"),
                                         f"{r}/images/00001.png")[1]),
    "corrupt_label": ("gta5", lambda r: (_corrupt(f"{r}/labels/00002.png"),
                                         f"{r}/labels/00002.png")[1]),
    "label_size": ("gta5", lambda r: (_save(f"{r}/labels/00001.png", np.zeros((H, W + 1),
                                                                             np.uint8)),
                                      f"{r}/labels/00001.png")[1]),
    "unknown_gta_id": ("gta5", lambda r: (_save(f"{r}/labels/00002.png",
                                                np.full((H, W), 34, np.uint8)),
                                          f"{r}/labels/00002.png")[1]),
    "image_without_label": ("gta5", lambda r: (os.remove(f"{r}/labels/00001.png"),
                                               f"{r}/images/00001.png")[1]),
    "empty_split": ("gta5", lambda r: ([os.remove(f"{r}/images/{f}")
                                        for f in os.listdir(f"{r}/images")], f"{r}/images")[1]),
    "unknown_synthia_id": ("synthia", None),
    "empty_cityscapes_val": ("cityscapes", None),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_fails_naming_the_file_and_leaves_nothing(tmp_path, case):
  dataset, mutate = BAD_CASES[case]
  root = str(tmp_path / "raw")
  if dataset == "gta5":
    make_gta(root, n=4)
    named = mutate(root)
  elif dataset == "synthia":
    make_synthia(root, n=2)
    lab = np.zeros((H, W, 3), np.uint16)
    lab[2, 3, 0] = 23  # ids > 22 are unknown
    with open(f"{root}/GT/LABELS/0000001.png", "wb") as f:
      f.write(_png16(np.concatenate([lab, lab[..., :1]], -1)))
    named = f"{root}/GT/LABELS/0000001.png"
  else:
    make_cityscapes(root, counts=(("train", "a", 1),))
    os.makedirs(f"{root}/leftImg8bit/val/b")
    os.makedirs(f"{root}/gtFine/val/b")
    named = f"{root}/leftImg8bit/val"
  data = str(tmp_path / "tfds")
  with pytest.raises(raw_files.PrepareError) as err:
    builders.prepare(dataset, root, data)
  assert named in str(err.value)
  with pytest.raises(splits.DatasetNotPreparedError):
    splits.open_split(dataset, "train", data)
  leftovers = [p for p, _, _ in os.walk(data) if "incomplete" in p]
  assert not leftovers


def test_missing_dataset_message_has_the_command(tmp_path):
  data = str(tmp_path / "nothing")
  with pytest.raises(splits.DatasetNotPreparedError) as err:
    splits.open_split("synthia", "train", data, scale=(1280, 760))
  msg = str(err.value)
  assert (f"python -m mfm_jax.data.prepare --dataset=synthia --raw_dir=<RAW_DIR> "
          f"--data_dir={data} --scale=1280x760") in msg
  assert "GT/LABELS" in msg
  with pytest.raises(splits.DatasetNotPreparedError):
    splits.load_class_stats("synthia", "train", data)
  with pytest.raises(ValueError, match="label_map is only used"):
    builders.prepare("gta5", data, data, label_map="x.json")


_KILL_SCRIPT = """
import os, sys
from mfm_jax.data import builders, raw_files
calls = []
orig = raw_files.load_example
def dying(*args):
  calls.append(1)
  if len(calls) == 3:
    os._exit(7)  # like SIGKILL: no cleanup runs
  return orig(*args)
raw_files.load_example = dying
builders.prepare('gta5', sys.argv[1], sys.argv[2])
"""


_WORKER_SCRIPT = """
import sys
import mfm_jax.data.prepare  # what a spawned worker re-imports as __mp_main__ under the CLI
from mfm_jax.data import labels, raw_files
ids, known = labels.CITYSCAPES_ID_TO_TRAIN_ID, labels.CITYSCAPES_KNOWN_IDS
image, label, counts = raw_files.load_packed(
    (sys.argv[1], "images/00000.png", "labels/00000.png", "gta5", ids, known, (6, 4), "reject"))
assert image and label and counts.sum() > 0
heavy = sorted(m for m in ("jax", "jaxlib", "tensorflow_datasets", "mfm_jax.ops")
               if m in sys.modules)
print("HEAVY", heavy)
"""


def test_prepare_worker_does_not_import_jax(tmp_path):
  """The function prepare's spawned workers run (with a resize) never starts JAX or TFDS."""
  make_gta(tmp_path / "gta", n=1)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _WORKER_SCRIPT, str(tmp_path / "gta")], env=env,
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "HEAVY []" in proc.stdout, proc.stdout


def test_killed_prepare_leaves_no_dataset_then_cli_succeeds(tmp_path):
  raw, data = str(tmp_path / "gta"), str(tmp_path / "tfds")
  make_gta(raw, n=4)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, raw, data], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 7, proc.stderr[-2000:]
  incomplete = os.path.join(data, "mfm_gta5", "full")
  assert any(n.startswith("incomplete.") for n in os.listdir(incomplete))  # TFDS leftover
  with pytest.raises(splits.DatasetNotPreparedError):
    splits.open_split("gta5", "train", data)
  with pytest.raises(splits.DatasetNotPreparedError):
    splits.load_class_stats("gta5", "train", data)
  proc = subprocess.run([sys.executable, "-m", "mfm_jax.data.prepare", "--dataset=gta5",
                         f"--raw_dir={raw}", f"--data_dir={data}", "--num_workers=1"],
                        env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "gta5: train: 4 images" in proc.stdout
  assert len(splits.open_split("gta5", "train", data)) == 4
  assert not [n for n in os.listdir(incomplete) if n.startswith("incomplete.")]  # cleaned
  assert "left by an interrupted prepare" in proc.stderr


def test_lossy_and_colour_labels_are_rejected_naming_the_file(tmp_path):
  root, data = str(tmp_path / "gta"), str(tmp_path / "tfds")
  raw = make_gta(root, n=3)
  label = f"{root}/labels/00001.png"
  ids = raw["images/00001.png"][1]
  # JPEG data behind a .png name (the probe: classes silently changed at edges).
  PIL.Image.fromarray(ids, mode="L").save(label, format="JPEG", quality=95)
  with pytest.raises(raw_files.PrepareError, match=re.escape(label) + ".*JPEG"):
    builders.prepare("gta5", root, data)
  # A colour label: refused, pointing at the flag.
  colour = np.stack([ids, np.roll(ids, 1, axis=1), ids // 2], -1).astype(np.uint8)
  _save(label, colour)
  with pytest.raises(raw_files.PrepareError) as err:
    builders.prepare("gta5", root, data)
  assert label in str(err.value) and "--rgb_labels=first_channel" in str(err.value)
  assert not os.path.exists(builders.dataset_path("gta5", data))
  # ...unless the flag says the class id is the R channel.
  builders.prepare("gta5", root, data, rgb_labels="first_channel")
  _check("gta5", "train", data, raw, labels.CITYSCAPES_ID_TO_TRAIN_ID)
  # A grey image stored as RGB is not ambiguous: accepted without the flag.
  _save(label, np.repeat(ids[..., None], 3, -1))
  builders.prepare("gta5", root, str(tmp_path / "tfds2"))
  _check("gta5", "train", str(tmp_path / "tfds2"), raw, labels.CITYSCAPES_ID_TO_TRAIN_ID)
  with pytest.raises(raw_files.PrepareError, match="rgb_labels='second'"):
    builders.prepare("gta5", root, data, rgb_labels="second")


def test_stale_incomplete_folders_are_removed(tmp_path):
  root, data = str(tmp_path / "gta"), str(tmp_path / "tfds")
  make_gta(root, n=2)
  stale = os.path.join(data, "mfm_gta5", "full", "incomplete.AB12CD_1.0.0")
  os.makedirs(os.path.join(stale, "x"))
  builders.prepare("gta5", root, data)
  assert not os.path.exists(stale)
  assert len(splits.open_split("gta5", "train", data)) == 2


def test_synthetic_cli_takes_unset_parameters_from_the_config(tmp_path):
  """--synthetic_* flags override config.data.synthetic.*; unset ones (and generate's shift,
  which has no default of its own) come from the config."""
  from mfm_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  no_shift = dict(seed=0, num_source=1, num_target=1, num_val=1, width=16, height=16)
  with pytest.raises(TypeError, match="shift"):
    synthetic.generate(str(tmp_path / "x"), **no_shift)
  cfg = base.base_config().data
  del cfg.synthetic["shift"]
  with pytest.raises(ValueError, match=r"config\.data\.synthetic\.shift"):
    synthetic.synthetic_key(cfg)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "mfm_jax.data.prepare", "--dataset=synthetic",
         f"--data_dir={tmp_path / 'tfds'}", "--synthetic_counts=2,2,1", "--synthetic_size=32x16"]
  shift = base.base_config().data.synthetic.shift
  for flag, want in (([], shift), (["--synthetic_shift=1.0"], 1.0)):
    proc = subprocess.run(cmd + flag, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"_32x16_shift{want:g}_v{synthetic.GENERATOR_VERSION}" in proc.stdout, proc.stdout
  proc = subprocess.run(cmd[:-1] + ["--synthetic_size=32by16"], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and "--synthetic_size" in proc.stderr, proc.stderr[-2000:]
