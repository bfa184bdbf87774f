"""TFDS ArrayRecord builders for GTA5, SYNTHIA, Cityscapes and image folders, and ``prepare``.

One ``tfds.core.GeneratorBasedBuilder`` per raw layout (uda_reference.md §3.1; the layouts and
the per-image step are in ``raw_files.py``). Labels are mapped to train ids (255 = ignore) at
prepare time, so every record already holds what training reads:

* ``image``: PNG-encoded uint8 RGB (original PNG bytes are kept when no re-encoding is needed);
* ``label``: PNG-encoded uint8 train ids, shape ``(H, W, 1)``;
* ``image_id``: the image path relative to the raw folder;
* ``class_pixels``: int64 ``[19]`` pixels per class at the ORIGINAL label resolution (RCS).

Records are written in sorted file order (shuffling disabled) and the per-image class pixel
matrix is also stored in the dataset's ``metadata.json``, so ``splits.load_class_stats`` reads
it without decoding images. TFDS writes into ``incomplete.*`` and renames on success, so a
failed or killed prepare never leaves a directory that ``splits.open_split`` accepts (it
requires ``dataset_info.json`` in the final version folder); the next ``prepare`` of that
dataset deletes such leftovers.

Also here: where prepared data lives (``dataset_path``, ``data_root``, ``raw_root``) and the
inter-process ``file_lock``. Reading prepared splits and mapping config dataset names to them
is ``splits.py``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from typing import Any

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from mfm_jax.data import labels
from mfm_jax.data import raw_files
from mfm_jax.runtime import progress as progress_lib

# The "mfm_" prefix avoids clashes with the TFDS catalog.
BUILDER_NAMES = {d: f"mfm_{d}" for d in raw_files.DATASETS}
VERSION = "1.0.0"


# ---------------------------------------------------------------------------------------------
# Where prepared data lives.

def scale_tag(scale: tuple[int, int] | None) -> str:
  """Builder config name: 'full' or 'WxH' (pre-resized data never mixes with full-res)."""
  if scale is None:
    return "full"
  w, h = (int(v) for v in scale)
  if w <= 0 or h <= 0:
    raise ValueError(f"scale must be two positive ints (w, h), got {scale!r}.")
  return f"{w}x{h}"


def dataset_path(dataset: str, data_dir: str, scale: tuple[int, int] | None = None) -> str:
  """Folder of a prepared dataset: ``<data_dir>/mfm_<dataset>/<full|WxH>/<version>``."""
  raw_files.check_dataset(dataset)
  return os.path.join(data_dir, BUILDER_NAMES[dataset], scale_tag(scale), VERSION)


def data_root(data_cfg) -> str:
  """``config.data.data_dir``, else ``$MFM_JAX_DATA``, else ``~/tensorflow_datasets``."""
  root = data_cfg.data_dir or os.environ.get("MFM_JAX_DATA") or "~/tensorflow_datasets"
  return os.path.abspath(os.path.expanduser(root))


def raw_root(data_cfg) -> str:
  """``config.data.raw_dir``, else ``<data_root>/raw`` (where synthetic raw files go)."""
  return os.path.abspath(os.path.expanduser(data_cfg.raw_dir or
                                            os.path.join(data_root(data_cfg), "raw")))


def prepare_command(dataset: str, data_dir: str, scale=None, raw_dir: str = "<RAW_DIR>") -> str:
  """The CLI command that prepares ``dataset`` into ``data_dir``."""
  cmd = (f"python -m mfm_jax.data.prepare --dataset={dataset} --raw_dir={raw_dir} "
         f"--data_dir={data_dir}")
  return cmd + (f" --scale={scale_tag(scale)}" if scale is not None else "")


def read_metadata(path: str) -> dict[str, Any]:
  """The ``metadata.json`` of a prepared dataset folder (``dataset_path``)."""
  with open(os.path.join(path, "metadata.json")) as f:
    return json.load(f)


def source_key(raw_dir: str, label_map: str | None, rgb_labels: str = "reject") -> str:
  """Identifies what a dataset was prepared from (raw folder, label-map content, RGB mode)."""
  h = hashlib.sha1(os.path.abspath(raw_dir).encode())
  if label_map:
    with open(label_map, "rb") as f:
      h.update(f.read())
  if rgb_labels != "reject":
    h.update(f"rgb_labels={rgb_labels}".encode())
  return h.hexdigest()[:12]


@contextlib.contextmanager
def file_lock(path: str):
  """Exclusive inter-process lock (several training processes may prepare at once)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# Builders.

@dataclasses.dataclass(eq=False)
class PrepConfig(tfds.core.BuilderConfig):
  """Builder config: ``scale = (w, h)`` pre-resize or None (full resolution)."""
  scale: tuple[int, int] | None = None


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared builder; subclasses set ``name`` and ``DATASET``."""

  RELEASE_NOTES = {VERSION: "Train-id labels and per-image class pixel counts."}
  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = [PrepConfig(name="full")]  # pre-resized configs are made on demand
  DATASET = ""

  def __init__(self, *, raw_dir: str | None = None, label_map: str | None = None,
               num_workers: int = 0, rgb_labels: str = "reject", **kwargs):
    self._raw_dir, self._label_map, self._num_workers = raw_dir, label_map, num_workers
    self._rgb_labels = rgb_labels
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{self.DATASET} with Cityscapes train ids (mfm_jax.data.builders).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "image_id": tfds.features.Text(),
            "class_pixels": tfds.features.Tensor(shape=(labels.NUM_CLASSES,), dtype=np.int64),
        }),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,  # record order = sorted file order = class-stats order
    )

  def _id_map(self):
    if self.DATASET != "folder":
      return raw_files.ID_MAPS[self.DATASET]
    if not self._label_map:
      return raw_files.ID_MAPS["cityscapes"]
    id_map = labels.load_label_map(self._label_map)
    return id_map, frozenset(id_map) | {labels.IGNORE_INDEX}

  def _split_generators(self, dl_manager):
    del dl_manager
    pairs = raw_files.list_pairs(self.DATASET, self._raw_dir)
    id_map, known = self._id_map()
    self.info.metadata.update(source=source_key(self._raw_dir, self._label_map,
                                                self._rgb_labels),
                              scale=list(self.builder_config.scale or ()))
    return {split: self._generate_examples(split, items, id_map, known)
            for split, items in pairs.items()}

  def _generate_examples(self, split, items, id_map, known):
    stats = self.info.metadata.setdefault(f"class_pixels/{split}", [])
    jobs = [(self._raw_dir, img, lab, self.DATASET, id_map, known, self.builder_config.scale,
             self._rgb_labels) for img, lab in items]
    with contextlib.ExitStack() as stack:
      if self._num_workers > 1:
        pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(
            self._num_workers, mp_context=multiprocessing.get_context("spawn")))
        results = pool.map(raw_files.load_packed, jobs, chunksize=8)
      else:
        results = map(raw_files.load_packed, jobs)
      progress = progress_lib.Progress(
          max(len(items), 1), desc=f"prepare {self.DATASET}/{split}", unit="img",
          every=max(len(items) // 10, 1), log=logging.info)
      for i, ((img, _), (image, label, counts)) in enumerate(zip(items, results)):
        stats.append(counts.tolist())
        yield i, {"image": image, "label": label, "image_id": img, "class_pixels": counts}
        progress.update(i + 1)
      progress.close()


class Gta5(_Builder, skip_registration=True):
  name, DATASET = BUILDER_NAMES["gta5"], "gta5"


class Synthia(_Builder, skip_registration=True):
  name, DATASET = BUILDER_NAMES["synthia"], "synthia"


class Cityscapes(_Builder, skip_registration=True):
  name, DATASET = BUILDER_NAMES["cityscapes"], "cityscapes"


class Folder(_Builder, skip_registration=True):
  name, DATASET = BUILDER_NAMES["folder"], "folder"


_BUILDERS = {"gta5": Gta5, "synthia": Synthia, "cityscapes": Cityscapes, "folder": Folder}


def _remove_incomplete(path: str) -> None:
  """Deletes TFDS ``incomplete.*`` folders a killed prepare left next to ``path`` (call with the
  dataset's lock held, so no running prepare owns them)."""
  parent = os.path.dirname(path)
  if not os.path.isdir(parent):
    return
  for name in sorted(os.listdir(parent)):
    if name.startswith("incomplete."):
      logging.warning("Removing %s, left by an interrupted prepare.", os.path.join(parent, name))
      shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def make_builder(dataset, data_dir, scale, **kwargs) -> _Builder:
  """The TFDS builder of ``dataset`` in ``data_dir`` at ``scale`` (None = full resolution)."""
  raw_files.check_dataset(dataset)
  scale = None if scale is None else tuple(int(v) for v in scale)
  config = "full" if scale is None else PrepConfig(name=scale_tag(scale), scale=scale)
  return _BUILDERS[dataset](data_dir=data_dir, config=config, **kwargs)


def prepare(dataset: str, raw_dir: str, data_dir: str, *,
            scale: tuple[int, int] | None = None, label_map: str | None = None,
            num_workers: int = 0, rgb_labels: str = "reject") -> str:
  """Prepares ``dataset`` from ``raw_dir`` into ``data_dir``; returns the dataset folder.

  Args:
    dataset: 'gta5' | 'synthia' | 'cityscapes' | 'folder' (layouts: ``raw_files.py``).
    raw_dir: folder holding the raw layout; ``image_id`` is relative to it.
    data_dir: TFDS data dir; the dataset goes to ``<data_dir>/mfm_<dataset>/<full|WxH>/1.0.0``.
    scale: optional ``(w, h)``: pre-resize with the mmcv keep-ratio rule (bilinear image,
      nearest label). Stored as its own builder config. Trade-off: the records get much
      smaller (GTA 1914x1052 → 1280x704 is ~2.2x fewer pixels) and loading skips a full-res
      decode + resize per sample, but the data is fixed to that scale; ``class_pixels`` is
      still counted at the original resolution.
    label_map: folder only: JSON ``{"label id": train id}`` (default: Cityscapes label ids).
    num_workers: decode/validate in this many spawned processes (0/1 = in-process).
    rgb_labels: 'reject' (colour labels are an error) or 'first_channel' (the class id is the
      R channel); see ``labels.RGB_LABEL_MODES``.

  An existing complete dataset is reused (a folder dataset only if prepared from the same
  raw folder and label map). Bad input raises ``raw_files.PrepareError`` naming the file and
  leaves no dataset behind.
  """
  if label_map and dataset != "folder":
    raise raw_files.PrepareError(
        f"label_map is only used by the 'folder' dataset, not {dataset!r}.")
  if rgb_labels not in labels.RGB_LABEL_MODES:
    raise raw_files.PrepareError(
        f"rgb_labels={rgb_labels!r}; choose one of {labels.RGB_LABEL_MODES}.")
  builder = make_builder(dataset, data_dir, scale, raw_dir=raw_dir, label_map=label_map,
                         num_workers=num_workers, rgb_labels=rgb_labels)
  path = os.fspath(builder.data_path)
  with file_lock(os.path.join(data_dir, f".{BUILDER_NAMES[dataset]}.lock")):
    _remove_incomplete(path)
    if os.path.isfile(os.path.join(path, "dataset_info.json")):
      if dataset == "folder":
        prepared = read_metadata(path).get("source")
        if prepared != source_key(raw_dir, label_map, rgb_labels):
          raise raw_files.PrepareError(
              f"{path} already holds a folder dataset prepared from other raw data or another "
              "label map; use a different data_dir.")
      logging.info("%s is already prepared at %s.", dataset, path)
      return path
    tfds.disable_progress_bar()  # our own progress line (rate, ETA) replaces TFDS's bars
    with tempfile.TemporaryDirectory() as downloads:  # TFDS wants a download dir; keep it out
      builder.download_and_prepare(
          download_dir=downloads, file_format="array_record",
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return path
