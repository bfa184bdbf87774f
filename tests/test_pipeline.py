"""Tests for mfm_jax.data.rcs and mfm_jax.data.pipeline on tiny prepared TFDS datasets."""

import json
import os

import numpy as np
import PIL.Image
import pytest

from mfm_jax.config import base
from mfm_jax.config import validation
from mfm_jax.data import builders
from mfm_jax.data import pipeline
from mfm_jax.data import rcs as rcs_lib
from mfm_jax.data import splits

RARE = 18  # bicycle (Cityscapes label id 33): only in one GTA image
_IDS = np.array([7, 8, 11, 21, 23, 26, 0], np.uint8)  # road, sidewalk, building, veg., sky, car, 255


def _write(path: str, array: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  PIL.Image.fromarray(array).save(path)


def _blocky(rng, h, w):
  return _IDS[rng.integers(0, len(_IDS), (h // 8 + 1, w // 8 + 1))].repeat(8, 0).repeat(8, 1)[:h, :w]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline_data")
  rng = np.random.default_rng(0)
  for i in range(6):  # GTA-like source, 96x53 (odd aspect: keep-ratio rounding)
    label = _blocky(rng, 53, 96)
    if i == 2:
      label[20:40, 30:50] = 33
    _write(f"{root}/raw/gta/images/{i:02d}.png", rng.integers(0, 256, (53, 96, 3), np.uint8))
    _write(f"{root}/raw/gta/labels/{i:02d}.png", label)
  for i in range(7):  # Cityscapes-like target: 4 train + 3 val, 96x48
    split = "train" if i < 4 else "val"
    base = f"{root}/raw/cs/%s/{split}/city/city_{i:02d}_%s.png"
    _write(base % ("leftImg8bit", "leftImg8bit"), rng.integers(0, 256, (48, 96, 3), np.uint8))
    _write(base % ("gtFine", "gtFine_labelIds"), _blocky(rng, 48, 96))
  builders.prepare("gta5", f"{root}/raw/gta", f"{root}/tfds")
  builders.prepare("cityscapes", f"{root}/raw/cs", f"{root}/tfds")
  return str(root / "tfds")


def data_config(data_dir, **overrides):
  c = base.base_config().data
  c.data_dir = data_dir
  c.source_scale, c.target_scale, c.test_scale = (64, 36), (64, 32), (64, 32)
  c.crop_size = (24, 24)
  c.batch_size = 4
  c.rcs.min_pixels = 20
  c.prefetch = 1
  for k, v in overrides.items():
    obj = c
    *path, last = k.split(".")
    for p in path:
      obj = obj[p]
    obj[last] = v
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---------------------------------------------------------------------------------------------
# Rare Class Sampling.

def test_rcs_probabilities_by_hand():
  stats = np.zeros((3, 19), np.int64)
  stats[0, 0], stats[1, 0], stats[1, 1], stats[2, 2] = 500, 100, 300, 100
  # f = (0.6, 0.3, 0.1); (1 - f) / T with T = 0.5 → (0.8, 1.4, 1.8); softmax by hand:
  e = np.exp([0.8, 1.4, 1.8])
  expected = np.zeros(19)
  expected[:3] = e / e.sum()  # (0.18049, 0.32888, 0.49063)
  sampler = rcs_lib.RareClassSampler(stats, temperature=0.5, min_pixels=50)
  np.testing.assert_allclose(sampler.probs, expected, rtol=1e-12)
  np.testing.assert_allclose(sampler.probs[:3], [0.18049, 0.32888, 0.49063], atol=1e-5)
  # Files with > min_pixels of each class; sampling frequencies follow the probabilities.
  assert [list(f) for f in sampler.files[:3]] == [[0, 1], [1], [2]]
  rng = np.random.default_rng(0)
  draws = [sampler.sample(rng) for _ in range(20000)]
  classes = np.array([c for _, c in draws])
  np.testing.assert_allclose(np.bincount(classes, minlength=19)[:3] / len(draws),
                             expected[:3], atol=0.015)
  files_of_0 = [i for i, c in draws if c == 0]
  assert abs(np.mean(files_of_0) - 0.5) < 0.03  # uniform over files 0 and 1
  assert all((i, c) in {(0, 0), (1, 0), (1, 1), (2, 2)} for i, c in draws)


def test_rcs_reference_temperature_favours_rare_classes_and_drops_classes_without_files():
  stats = np.zeros((2, 19), np.int64)
  stats[0, 0], stats[1, 5], stats[1, 7] = 90000, 4000, 10
  sampler = rcs_lib.RareClassSampler(stats, temperature=0.01, min_pixels=3000)
  assert sampler.probs[7] == 0  # occurs, but in no file above min_pixels
  assert sampler.probs[5] > 0.99 and np.isclose(sampler.probs.sum(), 1.0)
  with pytest.raises(ValueError, match="min_pixels"):
    rcs_lib.RareClassSampler(stats, temperature=0.01, min_pixels=10**6)
  with pytest.raises(ValueError, match=r"\[N>0, 19\]"):
    rcs_lib.RareClassSampler(np.zeros((4, 18)), temperature=0.01, min_pixels=1)
  assert rcs_lib.crop_has_class(np.array([[3, 3, 1]]), 3, 3, 0.5)  # 2 > 1.5
  assert not rcs_lib.crop_has_class(np.array([[3, 1, 1]]), 3, 3, 0.5)


# ---------------------------------------------------------------------------------------------
# Training iterator.

def test_train_batches_shapes_values_and_determinism(data_dir):
  cfg = data_config(data_dir, pseudo_margins=(2, 8, 2, 2))
  batches = _take(pipeline.make_train_iterator(cfg, seed=3), 3)
  b = batches[0]
  for d in ("source", "target"):
    assert b[f"{d}_image"].shape == (4, 24, 24, 3) and b[f"{d}_image"].dtype == np.uint8
    assert b[f"{d}_size"].dtype == np.int32 and (b[f"{d}_size"] == 24).all()  # no padding
  for key in ("source_label", "target_label"):
    assert b[key].shape == (4, 24, 24) and b[key].dtype == np.int32
    assert set(np.unique(b[key])) <= {0, 1, 2, 8, 10, 13, RARE, 255}
  valid = np.stack([x["target_valid"] for x in batches])
  assert valid.dtype == np.float32 and set(np.unique(valid)) == {0.0, 1.0}
  _assert_same(batches, _take(pipeline.make_train_iterator(cfg, seed=3), 3))
  other = next(pipeline.make_train_iterator(cfg, seed=4))
  assert not np.array_equal(other["source_image"], b["source_image"])
  no_margin = next(pipeline.make_train_iterator(data_config(data_dir), seed=3))
  assert (no_margin["target_valid"] == 1).all()
  np.testing.assert_array_equal(no_margin["target_image"], b["target_image"])


# Weighted and plain float64 sums of the float32 images the pipeline yielded when it normalised
# on the host (commit 40ab4c1), for the first batch of the config below and the first eval image.
_HOST_NORMALISED = {"source_image": (1725.6089205654707, 3608.111395167187),
                    "target_image": (1652.2647794450854, 3301.310410078615),
                    "image": (610.1396229444085, 1240.4061532877386)}


def _sums(x):
  x = np.asarray(x, np.float64)
  return float((x * np.random.default_rng(0).random(x.shape)).sum()), float(x.sum())


def test_device_normalisation_gives_the_images_of_host_normalisation(data_dir):
  """uint8 batches normalised on the device (ops.normalize_images, padding included: the 40²
  crop pads every image) equal the float images the host pipeline made before: same crops,
  flips and pad, values up to float rounding."""
  from mfm_jax import ops  # pylint: disable=g-import-not-at-top
  cfg = data_config(data_dir, crop_size=(40, 40), pseudo_margins=(2, 8, 2, 2))
  it = pipeline.make_train_iterator(cfg, seed=3)
  b = next(it)
  it.close()
  assert (b["source_size"] == [35, 40]).all() and (b["target_size"] == [32, 40]).all()
  for d in ("source", "target"):
    x = ops.normalize_images(b[f"{d}_image"], b[f"{d}_size"])
    assert x.dtype == np.float32
    np.testing.assert_allclose(_sums(x), _HOST_NORMALISED[f"{d}_image"], rtol=0, atol=1e-3)
  ev = next(iter(pipeline.make_eval_dataset(cfg)))
  np.testing.assert_allclose(_sums(ops.normalize_images(ev["image"])),
                             _HOST_NORMALISED["image"], rtol=0, atol=1e-3)


def test_rcs_oversamples_the_rare_class(data_dir):
  def rare_fraction(enabled):
    it = pipeline.make_train_iterator(data_config(data_dir, **{"rcs.enabled": enabled}), seed=0)
    labels = np.concatenate([x["source_label"] for x in _take(it, 10)])
    return np.mean([(lab == RARE).sum() > 10 for lab in labels])  # > min_pixels · 0.5

  assert rare_fraction(True) > 0.9
  assert rare_fraction(False) < 0.4


def test_process_shards_concatenate_to_the_global_batch(data_dir):
  cfg = data_config(data_dir)
  whole = _take(pipeline.make_train_iterator(cfg, seed=1), 2)
  shards = [_take(pipeline.make_train_iterator(cfg, seed=1, process_index=p, process_count=2), 2)
            for p in range(2)]
  joined = [{k: np.concatenate([s[i][k] for s in shards]) for k in whole[i]} for i in range(2)]
  _assert_same(whole, joined)
  assert shards[0][0]["source_image"].shape[0] == 2
  with pytest.raises(ValueError, match="batch_size=4 must be a positive multiple"):
    pipeline.make_train_iterator(cfg, seed=1, process_index=0, process_count=3)


def test_resumed_iterator_continues_the_same_stream(data_dir):
  cfg = data_config(data_dir)
  full = _take(pipeline.make_train_iterator(cfg, seed=2), 5)
  first = pipeline.make_train_iterator(cfg, seed=2)
  head = _take(first, 2)
  state = json.loads(json.dumps(first.get_state()))
  first.close()
  resumed = pipeline.make_train_iterator(cfg, seed=2)
  resumed.set_state(state)
  _assert_same(head + _take(resumed, 3), full)
  with pytest.raises(ValueError, match="seed"):
    pipeline.make_train_iterator(cfg, seed=9).set_state(state)
  bounded = pipeline.make_train_iterator(cfg, seed=2, num_steps=3)
  bounded.set_state(state)
  assert len(list(bounded)) == 1


def test_worker_processes_give_the_same_batches(data_dir):
  cfg = data_config(data_dir, **{"rcs.enabled": True})
  inline = list(pipeline.make_train_iterator(cfg, seed=5, num_steps=3))
  cfg.num_workers = 2
  it = pipeline.make_train_iterator(cfg, seed=5, num_steps=3)
  try:
    _assert_same(inline, list(it))
  finally:
    it.close()


def test_prepared_scale_reads_pre_resized_copies_with_the_same_stream(data_dir):
  cfg = data_config(data_dir, prepared_scale=True, **{"rcs.enabled": True})
  with pytest.raises(splits.DatasetNotPreparedError, match="--scale=64x36"):
    pipeline.make_train_iterator(cfg, seed=7)
  root = os.path.dirname(data_dir)
  builders.prepare("gta5", f"{root}/raw/gta", data_dir, scale=(64, 36))
  builders.prepare("cityscapes", f"{root}/raw/cs", data_dir, scale=(64, 32))
  full = _take(pipeline.make_train_iterator(data_config(data_dir, **{"rcs.enabled": True}),
                                            seed=7), 3)
  pre = _take(pipeline.make_train_iterator(cfg, seed=7), 3)
  # Same files, crops and flips (RCS statistics are the original-resolution counts), and the
  # same pixels: prepare resizes with the pipeline's own numpy rule (crop of the full resize).
  _assert_same(full, pre)


def test_config_errors_are_clear(data_dir):
  c = base.base_config()
  c.data.crop_size = (24,)  # sizes are checked by config validation, before any data is read
  with pytest.raises(validation.ConfigError, match="crop_size"):
    validation.validate(c)
  with pytest.raises(ValueError, match="Unknown dataset name 'gta6'"):
    pipeline.make_train_iterator(data_config(data_dir, source="gta6"), seed=0)
  with pytest.raises(splits.DatasetNotPreparedError, match="mfm_jax.data.prepare"):
    pipeline.make_train_iterator(data_config(data_dir, source="synthia"), seed=0)
  with pytest.raises(ValueError, match="eval_split='test'"):
    pipeline.make_eval_dataset(data_config(data_dir, eval_split="test"))


# ---------------------------------------------------------------------------------------------
# Evaluation split.

def test_eval_dataset_resizes_images_keeps_labels_and_shards(data_dir):
  cfg = data_config(data_dir)
  items = list(pipeline.make_eval_dataset(cfg))
  assert len(items) == 3
  for x in items:
    assert x["image"].shape == (1, 32, 64, 3) and x["image"].dtype == np.uint8
    assert x["label"].shape == (1, 48, 96) and x["label"].dtype == np.int32
  shards = [list(pipeline.make_eval_dataset(cfg, process_index=p, process_count=2))
            for p in range(2)]
  assert [len(s) for s in shards] == [2, 1]
  _assert_same([shards[0][0], shards[1][0], shards[0][1]], items)
  limited = pipeline.make_eval_dataset(data_config(data_dir, max_eval_images=2))
  assert len(limited) == 2
  _assert_same(list(limited), items[:2])
  _assert_same(list(limited), items[:2])  # re-iterable
  batched = list(pipeline.make_eval_dataset(data_config(data_dir, eval_batch_size=2)))
  assert [b["image"].shape[0] for b in batched] == [2, 1]  # every image exactly once
  for k in ("image", "label"):
    np.testing.assert_array_equal(np.concatenate([b[k] for b in batched]),
                                  np.concatenate([x[k] for x in items]))


def test_benchmark_runs_on_a_tiny_fake_dataset(tmp_path):
  from mfm_jax.data import benchmark  # pylint: disable=g-import-not-at-top
  benchmark.write_fake_gta(str(tmp_path / "raw"), 3, (80, 44))
  builders.prepare("gta5", str(tmp_path / "raw"), str(tmp_path / "tfds"))
  row = benchmark.benchmark(str(tmp_path / "tfds"), 0, 2, crop=16, source_scale=(64, 36),
                            target_scale=(64, 36), rcs_min_pixels=20)
  assert row["workers"] == 0
  assert row["source_images_per_s"] > 0 and row["train_steps_per_s"] > 0
