"""Tests for mfm_jax.data.synthetic: determinism, layouts, label ids, domain shift, and
ensure_synthetic through the real builders."""

import glob
import os

import numpy as np
import PIL.Image
import pytest

from mfm_jax.config import base
from mfm_jax.data import builders
from mfm_jax.data import labels
from mfm_jax.data import splits
from mfm_jax.data import synthetic

SIZE = dict(width=96, height=48)


def _files(root):
  return sorted(os.path.relpath(p, root) for p in glob.glob(f"{root}/**/*.png", recursive=True))


def _read_all(root):
  out = {}
  for rel in _files(root):
    with open(os.path.join(root, rel), "rb") as f:
      out[rel] = f.read()
  return out


def test_deterministic_layout_and_known_ids(tmp_path):
  kw = dict(num_source=4, num_target=3, num_val=2, shift=1.0, **SIZE)
  synthetic.generate(str(tmp_path / "a"), seed=5, **kw)
  synthetic.generate(str(tmp_path / "b"), seed=5, **kw)
  synthetic.generate(str(tmp_path / "c"), seed=6, **kw)
  a, b, c = (_read_all(tmp_path / k) for k in "abc")
  assert a == b  # bit-identical files for the same seed
  assert a.keys() == c.keys()
  assert sum(a[k] != c[k] for k in a) == len(a)  # every file differs for another seed
  expected = (
      [f"gta5/images/{i:05d}.png" for i in range(4)] +
      [f"gta5/labels/{i:05d}.png" for i in range(4)])
  for split, n, cities in (("train", 3, synthetic._TRAIN_CITIES),
                           ("val", 2, synthetic._VAL_CITIES)):
    for i in range(n):
      stem = f"{cities[i % len(cities)]}_{i:06d}_000019"
      city = cities[i % len(cities)]
      expected += [f"cityscapes/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png",
                   f"cityscapes/gtFine/{split}/{city}/{stem}_gtFine_labelIds.png"]
  assert sorted(a) == sorted(expected)
  used_ids = {lid for lid, tid in labels.CITYSCAPES_ID_TO_TRAIN_ID.items()
              if tid in synthetic.USED_CLASSES}
  seen = set()
  for rel in a:
    im = PIL.Image.open(tmp_path / "a" / rel)
    assert im.size == (96, 48)
    if "labels" in rel or "gtFine" in rel:
      assert im.mode == "L"
      values = set(np.unique(np.asarray(im)).tolist())
      allowed = used_ids | ({1} if "gtFine" in rel else set())  # 1 = ego vehicle (bonnet)
      assert values <= allowed, (rel, values - allowed)
      seen |= values
    else:
      assert im.mode == "RGB"
  assert {7, 8, 11, 23} <= seen  # road, sidewalk, building, sky always present


def _pixels(root, domain, n):
  if domain == "source":
    imgs = sorted(glob.glob(f"{root}/gta5/images/*.png"))[:n]
    labs = [p.replace("/images/", "/labels/") for p in imgs]
  else:
    imgs = sorted(glob.glob(f"{root}/cityscapes/leftImg8bit/train/*/*.png"))[:n]
    labs = [p.replace("leftImg8bit", "gtFine").replace("gtFine.png", "gtFine_labelIds.png")
            for p in imgs]
  x = np.concatenate([np.asarray(PIL.Image.open(p)).reshape(-1, 3) for p in imgs]) / 255.0
  lut = labels.lookup_table(labels.CITYSCAPES_ID_TO_TRAIN_ID, 256)
  y = np.concatenate([lut[np.asarray(PIL.Image.open(p))].reshape(-1) for p in labs])
  return x, y


def _nearest_mean_accuracy(train, test, classes):
  means = np.stack([train[0][train[1] == c].mean(0) for c in classes])
  x, y = test
  keep = y != 255
  pred = np.asarray(classes)[np.argmin(((x[keep, None] - means[None]) ** 2).sum(-1), 1)]
  return float((pred == y[keep]).mean()), means


# shift → (min per-class mean-colour distance, min accuracy drop of a colour-only classifier).
_SHIFT_BOUNDS = {1.0: (0.06, 0.05), 2.5: (0.15, 0.25)}


@pytest.mark.parametrize("shift", [2.5, 1.0, 0.0])
def test_domain_shift(tmp_path, shift):
  synthetic.generate(str(tmp_path), seed=0, num_source=24, num_target=24, num_val=1,
                     shift=shift, **SIZE)
  src, tgt = _pixels(tmp_path, "source", 24), _pixels(tmp_path, "target", 24)
  classes = (0, 1, 2, 8, 9, 10)  # stuff classes with many pixels in both domains
  src_acc, src_means = _nearest_mean_accuracy(src, tgt, classes)
  tgt_acc, tgt_means = _nearest_mean_accuracy(tgt, tgt, classes)
  per_class = np.linalg.norm(src_means - tgt_means, axis=1)
  if shift:
    # Every class colour moves, and differently per class (not one global cast), so a
    # colour-only classifier fit on the source does worse on the target than one fit on it.
    min_dist, min_drop = _SHIFT_BOUNDS[shift]
    assert per_class.min() > min_dist, per_class
    assert np.ptp(src_means - tgt_means, axis=0).max() > 0.2
    assert src_acc < tgt_acc - min_drop, (src_acc, tgt_acc)
  else:
    assert per_class.max() < 0.03, per_class
    assert abs(src_acc - tgt_acc) < 0.02, (src_acc, tgt_acc)


def test_generation_at_benchmark_size(tmp_path):
  """The synthetic preset's size (192×96): every requested image and label is written, at
  that size, with the target split over its cities."""
  synthetic.generate(str(tmp_path), seed=0, num_source=60, num_target=30, num_val=10,
                     width=192, height=96, shift=1.25)
  files = _files(tmp_path)
  count = lambda part: sum(part in f for f in files)  # noqa: E731
  assert len(files) == 2 * (60 + 30 + 10)
  assert count("gta5/images/") == count("gta5/labels/") == 60
  assert count("leftImg8bit/train/") == count("gtFine/train/") == 30
  assert count("leftImg8bit/val/") == count("gtFine/val/") == 10
  assert {f.split("/")[3] for f in files if "/train/" in f} == set(synthetic._TRAIN_CITIES)
  for rel in (files[0], files[-1]):
    assert PIL.Image.open(tmp_path / rel).size == (192, 96)


def test_ensure_synthetic_prepares_through_builders(tmp_path):
  cfg = base.base_config().data
  cfg.data_dir = str(tmp_path / "tfds")
  s = cfg.synthetic
  s.num_source, s.num_target, s.num_val, s.width, s.height = 5, 4, 3, 64, 32
  data_dir = synthetic.ensure_synthetic(cfg)
  assert data_dir.startswith(cfg.data_dir) and synthetic.synthetic_key(cfg) in data_dir
  src, tgt = splits.resolve("synthetic_source", cfg), splits.resolve("synthetic_target", cfg)
  assert (src.dataset, src.data_dir, dict(src.splits)) == ("gta5", data_dir, {"train": "train"})
  assert (tgt.dataset, dict(tgt.splits)) == ("cityscapes", {"train": "train", "val": "val"})
  sizes, total = {}, np.zeros(19, np.int64)
  for ds, split in (("gta5", "train"), ("cityscapes", "train"), ("cityscapes", "val")):
    source = splits.open_split(ds, split, data_dir)
    sizes[(ds, split)] = len(source)
    stats = splits.load_class_stats(ds, split, data_dir)
    total += stats.sum(0)
    for i in range(len(source)):
      rec = source[i]
      assert rec["image"].shape == (32, 64, 3) and rec["label"].shape == (32, 64)
      assert set(np.unique(rec["label"])) <= set(synthetic.USED_CLASSES) | {255}
      np.testing.assert_array_equal(stats[i], rec["class_pixels"])
  assert sizes == {("gta5", "train"): 5, ("cityscapes", "train"): 4, ("cityscapes", "val"): 3}
  assert (total[list(synthetic.USED_CLASSES)] > 0).all(), total
  assert total[[c for c in range(19) if c not in synthetic.USED_CLASSES]].sum() == 0
  # A second call reuses everything; a changed parameter gets its own folder.
  info = os.path.join(builders.dataset_path("gta5", data_dir), "dataset_info.json")
  mtime = os.path.getmtime(info)
  assert synthetic.ensure_synthetic(cfg) == data_dir and os.path.getmtime(info) == mtime
  s.seed = 1
  assert synthetic.synthetic_data_dir(cfg) != data_dir
  assert splits.resolve("synthetic_source", cfg, prepare_missing=False).data_dir != data_dir
