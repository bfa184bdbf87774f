"""TFDS ArrayRecord builders for GTA5, SYNTHIA, Cityscapes and image folders (no TensorFlow).

One ``tfds.core.GeneratorBasedBuilder`` per raw layout (uda_reference.md §3.1). Labels are mapped
to train ids (255 = ignore) at prepare time, so every record already holds what training reads:

* ``image``: PNG-encoded uint8 RGB (original PNG bytes are kept when no re-encoding is needed);
* ``label``: PNG-encoded uint8 train ids, shape ``(H, W, 1)``;
* ``image_id``: the image path relative to the raw folder;
* ``class_pixels``: int64 ``[19]`` pixels per class at the ORIGINAL label resolution (RCS).

Records are written in sorted file order (shuffling disabled) and the per-image class pixel
matrix is also stored in the dataset's ``metadata.json``, so ``load_class_stats`` reads it
without decoding images. TFDS writes into ``incomplete.*`` and renames on success, so a failed
or killed prepare never leaves a directory that ``open_split`` accepts (it requires
``dataset_info.json`` in the final version folder); the next ``prepare`` of that dataset deletes
such leftovers.

Labels must be lossless and unambiguous: JPEG data in a label file and colour (RGB/RGBA)
labels are rejected naming the file, unless ``rgb_labels='first_channel'`` says the class id is
the first channel (SYNTHIA's layout, always read that way).

Raw layouts (``raw_dir`` is the folder that holds the named sub-folders):

* gta5: ``images/*.png`` + ``labels/<same name>.png`` (Cityscapes label ids, 'P' or 'L').
* synthia: ``RGB/*.png`` + ``GT/LABELS/<same name>.png`` (16-bit multi-channel, id = channel 0).
* cityscapes: ``leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png`` +
  ``gtFine/{train,val}/<city>/<stem>_gtFine_labelIds.png``.
* folder: ``images/{train,val}/**/<stem>.{png,jpg,jpeg}`` + ``labels/{train,val}/**/<stem>.png``
  and a JSON ``{"label id": train id}`` map (default: Cityscapes label ids); ``val`` is optional.
  This is the way to train on your own data without writing a builder.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import tempfile
from typing import Any, Mapping

from absl import logging
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from mfm_jax.runtime import errors
from mfm_jax.runtime import progress as progress_lib
from mfm_jax.data import labels

DATASETS = ("gta5", "synthia", "cityscapes", "folder")
BUILDER_NAMES = {d: f"mfm_{d}" for d in DATASETS}  # prefix: no clash with the TFDS catalog
VERSION = "1.0.0"
_IMAGE_EXTS = (".png", ".jpg", ".jpeg")


class PrepareError(errors.UserError, ValueError):
  """Raw data that cannot be prepared; the message names the file or folder."""


class DatasetNotPreparedError(errors.UserError, FileNotFoundError):
  """``open_split``/``load_class_stats`` on a dataset that was not (completely) prepared."""


def rescale_size(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
  """Keep-ratio output size ``(w, h)`` of mmcv ``imrescale`` for ``scale = (w, h)``.

  factor = min(long_edge / long_side, short_edge / short_side); size = int(x * f + 0.5).
  E.g. GTA 1914x1052 at (1280, 720) → 1280x704 (uda_reference.md §3.2).
  """
  long_edge, short_edge = max(scale), min(scale)
  f = min(long_edge / max(width, height), short_edge / min(width, height))
  return int(width * f + 0.5), int(height * f + 0.5)


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
  _check_dataset(dataset)
  return os.path.join(data_dir, BUILDER_NAMES[dataset], scale_tag(scale), VERSION)


def _check_dataset(dataset: str) -> None:
  if dataset not in DATASETS:
    raise ValueError(f"Unknown dataset {dataset!r}; expected one of {DATASETS}.")


# ---------------------------------------------------------------------------------------------
# Raw layouts.

_LAYOUT_HELP = {
    "gta5": "<raw_dir>/images/*.png and <raw_dir>/labels/<same name>.png",
    "synthia": "<raw_dir>/RGB/*.png and <raw_dir>/GT/LABELS/<same name>.png",
    "cityscapes": ("<raw_dir>/leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png and "
                   "<raw_dir>/gtFine/{train,val}/<city>/<stem>_gtFine_labelIds.png"),
    "folder": ("<raw_dir>/images/{train,val}/**/<stem>.{png,jpg,jpeg} and "
               "<raw_dir>/labels/{train,val}/**/<stem>.png (val optional)"),
}


def _require_dir(path: str, dataset: str) -> None:
  if not os.path.isdir(path):
    raise PrepareError(f"Missing folder {path} for dataset {dataset!r}; expected layout: "
                       f"{_LAYOUT_HELP[dataset]}.")


def _walk(root: str, suffixes: tuple[str, ...]) -> list[str]:
  out = []
  for dirpath, _, files in os.walk(root):
    out += [os.path.join(dirpath, f) for f in files
            if f.lower().endswith(tuple(s.lower() for s in suffixes))]
  return sorted(out)


def list_pairs(dataset: str, raw_dir: str) -> dict[str, list[tuple[str, str]]]:
  """``{split: [(image_rel, label_rel), ...]}`` in sorted order, paths relative to ``raw_dir``.

  Raises ``PrepareError`` for a missing folder, an empty split or an image without label.
  """
  _check_dataset(dataset)
  _require_dir(raw_dir, dataset)
  if dataset in ("gta5", "synthia"):
    img_sub, lab_sub = ("images", "labels") if dataset == "gta5" else ("RGB", "GT/LABELS")
    layout = {"train": (img_sub, lab_sub, ".png", ".png")}
  elif dataset == "cityscapes":
    layout = {s: (f"leftImg8bit/{s}", f"gtFine/{s}", "_leftImg8bit.png", "_gtFine_labelIds.png")
              for s in ("train", "val")}
  else:
    layout = {s: (f"images/{s}", f"labels/{s}", None, ".png") for s in ("train", "val")
              if s == "train" or os.path.isdir(os.path.join(raw_dir, "images", s))}
  pairs = {}
  for split, (img_sub, lab_sub, img_suffix, lab_suffix) in layout.items():
    img_root, lab_root = os.path.join(raw_dir, img_sub), os.path.join(raw_dir, lab_sub)
    _require_dir(img_root, dataset)
    _require_dir(lab_root, dataset)
    images = _walk(img_root, (img_suffix,) if img_suffix else _IMAGE_EXTS)
    if not images:
      raise PrepareError(f"Empty split {split!r}: no {img_suffix or '/'.join(_IMAGE_EXTS)} "
                         f"images under {img_root} (layout: {_LAYOUT_HELP[dataset]}).")
    items = []
    for image in images:
      rel = os.path.relpath(image, img_root)
      stem = rel[:-len(img_suffix)] if img_suffix else os.path.splitext(rel)[0]
      label = os.path.join(lab_root, stem + lab_suffix)
      if not os.path.isfile(label):
        raise PrepareError(f"Image {image} has no label: expected {label}.")
      items.append((os.path.relpath(image, raw_dir), os.path.relpath(label, raw_dir)))
    pairs[split] = items
  return pairs


# ---------------------------------------------------------------------------------------------
# One example: decode, validate, map, count, optionally resize, encode.

def _encode_png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  PIL.Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def _resize_pair(image: np.ndarray, label: np.ndarray, size_wh: tuple[int, int]):
  """Bilinear image / nearest label resize with the reference's torch rules (mfm_jax.ops)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mfm_jax import ops  # pylint: disable=g-import-not-at-top
  w, h = size_wh
  img = ops.resize_bilinear(jnp.asarray(image, jnp.float32)[None], (h, w))[0]
  img = np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8)
  lab = np.asarray(ops.resize_nearest(jnp.asarray(label)[None], (h, w))[0])
  return img, lab


def load_example(raw_dir: str, image_rel: str, label_rel: str, dataset: str,
                 id_map: Mapping[int, int], known: frozenset[int],
                 scale: tuple[int, int] | None,
                 rgb_labels: str = "reject") -> tuple[bytes, bytes, np.ndarray]:
  """Returns ``(image_png, label_png, class_pixels)`` for one raw pair (module-level: picklable)."""
  image_path, label_path = os.path.join(raw_dir, image_rel), os.path.join(raw_dir, label_rel)
  try:
    with open(image_path, "rb") as f:
      data = f.read()
    with PIL.Image.open(io.BytesIO(data)) as im:
      im.load()
      keep_bytes = im.format == "PNG" and im.mode == "RGB"
      image = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
  except (OSError, ValueError, SyntaxError) as e:
    raise PrepareError(f"{image_path}: unreadable or corrupt image ({e}).") from e
  try:
    ids = labels.read_label_ids(label_path,
                                "first_channel" if dataset == "synthia" else rgb_labels)
  except labels.LabelError as e:
    raise PrepareError(str(e)) from e
  except (OSError, ValueError, SyntaxError) as e:
    raise PrepareError(f"{label_path}: unreadable or corrupt label image ({e}).") from e
  if ids.shape != image.shape[:2]:
    raise PrepareError(f"{label_path}: label size {ids.shape[1]}x{ids.shape[0]} differs from "
                       f"its image {image_path} ({image.shape[1]}x{image.shape[0]}).")
  try:
    labels.check_known_ids(ids, known, label_path, dataset)
  except labels.LabelError as e:
    raise PrepareError(str(e)) from e
  train_ids = labels.to_train_ids(ids, dict(id_map))
  counts = labels.class_pixel_counts(train_ids)  # at original resolution (RCS, §2.5)
  if scale is not None:
    size = rescale_size(image.shape[1], image.shape[0], scale)
    if size != (image.shape[1], image.shape[0]):
      image, train_ids = _resize_pair(image, train_ids, size)
      keep_bytes = False
  return (data if keep_bytes else _encode_png(image)), _encode_png(train_ids), counts


def _load_packed(args):
  return load_example(*args)


# ---------------------------------------------------------------------------------------------
# Builders.

_ID_MAPS = {
    "gta5": (labels.CITYSCAPES_ID_TO_TRAIN_ID, labels.CITYSCAPES_KNOWN_IDS),
    "cityscapes": (labels.CITYSCAPES_ID_TO_TRAIN_ID, labels.CITYSCAPES_KNOWN_IDS),
    "synthia": (labels.SYNTHIA_ID_TO_TRAIN_ID, labels.SYNTHIA_KNOWN_IDS),
}


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
      return _ID_MAPS[self.DATASET]
    if not self._label_map:
      return _ID_MAPS["cityscapes"]
    id_map = labels.load_label_map(self._label_map)
    return id_map, frozenset(id_map) | {labels.IGNORE_LABEL}

  def _split_generators(self, dl_manager):
    del dl_manager
    pairs = list_pairs(self.DATASET, self._raw_dir)
    id_map, known = self._id_map()
    self.info.metadata.update(source=_source_key(self._raw_dir, self._label_map,
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
        results = pool.map(_load_packed, jobs, chunksize=8)
      else:
        results = map(_load_packed, jobs)
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


def _source_key(raw_dir: str, label_map: str | None, rgb_labels: str = "reject") -> str:
  """Identifies what a dataset was prepared from (raw folder, label-map content, RGB mode)."""
  h = hashlib.sha1(os.path.abspath(raw_dir).encode())
  if label_map:
    with open(label_map, "rb") as f:
      h.update(f.read())
  if rgb_labels != "reject":
    h.update(f"rgb_labels={rgb_labels}".encode())
  return h.hexdigest()[:12]


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


def _make_builder(dataset, data_dir, scale, **kwargs) -> _Builder:
  _check_dataset(dataset)
  scale = None if scale is None else tuple(int(v) for v in scale)
  config = "full" if scale is None else PrepConfig(name=scale_tag(scale), scale=scale)
  return _BUILDERS[dataset](data_dir=data_dir, config=config, **kwargs)


def prepare_command(dataset: str, data_dir: str, scale=None, raw_dir: str = "<RAW_DIR>") -> str:
  """The CLI command that prepares ``dataset`` into ``data_dir``."""
  cmd = (f"python -m mfm_jax.data.prepare --dataset={dataset} --raw_dir={raw_dir} "
         f"--data_dir={data_dir}")
  return cmd + (f" --scale={scale_tag(scale)}" if scale is not None else "")


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


def prepare(dataset: str, raw_dir: str, data_dir: str, *,
            scale: tuple[int, int] | None = None, label_map: str | None = None,
            num_workers: int = 0, rgb_labels: str = "reject") -> str:
  """Prepares ``dataset`` from ``raw_dir`` into ``data_dir``; returns the dataset folder.

  Args:
    dataset: 'gta5' | 'synthia' | 'cityscapes' | 'folder' (layouts in the module docstring).
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
  raw folder and label map). Bad input raises ``PrepareError`` naming the file and leaves no
  dataset behind.
  """
  if label_map and dataset != "folder":
    raise PrepareError(f"label_map is only used by the 'folder' dataset, not {dataset!r}.")
  if rgb_labels not in labels.RGB_LABEL_MODES:
    raise PrepareError(f"rgb_labels={rgb_labels!r}; choose one of {labels.RGB_LABEL_MODES}.")
  builder = _make_builder(dataset, data_dir, scale, raw_dir=raw_dir, label_map=label_map,
                          num_workers=num_workers, rgb_labels=rgb_labels)
  path = os.fspath(builder.data_path)
  with file_lock(os.path.join(data_dir, f".{BUILDER_NAMES[dataset]}.lock")):
    _remove_incomplete(path)
    if os.path.isfile(os.path.join(path, "dataset_info.json")):
      if dataset == "folder":
        prepared = _read_metadata(path).get("source")
        if prepared != _source_key(raw_dir, label_map, rgb_labels):
          raise PrepareError(f"{path} already holds a folder dataset prepared from other raw "
                             "data or another label map; use a different data_dir.")
      logging.info("%s is already prepared at %s.", dataset, path)
      return path
    tfds.disable_progress_bar()  # our own progress line (rate, ETA) replaces TFDS's bars
    with tempfile.TemporaryDirectory() as downloads:  # TFDS wants a download dir; keep it out
      builder.download_and_prepare(
          download_dir=downloads, file_format="array_record",
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return path


# ---------------------------------------------------------------------------------------------
# Reading.

def _read_metadata(path: str) -> dict[str, Any]:
  with open(os.path.join(path, "metadata.json")) as f:
    return json.load(f)


def _require_prepared(dataset: str, data_dir: str, scale) -> str:
  path = dataset_path(dataset, data_dir, scale)
  if not os.path.isfile(os.path.join(path, "dataset_info.json")):
    raise DatasetNotPreparedError(
        f"Prepared dataset {dataset!r} ({scale_tag(scale)}) not found: {path} is missing or "
        f"incomplete. Prepare it with:\n  {prepare_command(dataset, data_dir, scale)}\n"
        f"(raw layout: {_LAYOUT_HELP[dataset]}).")
  return path


def load_class_stats(dataset: str, split: str, data_dir: str, *,
                     scale: tuple[int, int] | None = None) -> np.ndarray:
  """Per-image class pixel counts, int64 ``[N, 19]`` in record order (no image decoding)."""
  meta = _read_metadata(_require_prepared(dataset, data_dir, scale))
  key = f"class_pixels/{split}"
  if key not in meta:
    splits = sorted(k.split("/", 1)[1] for k in meta if k.startswith("class_pixels/"))
    raise KeyError(f"Dataset {dataset!r} in {data_dir} has no split {split!r}; splits: {splits}.")
  return np.asarray(meta[key], dtype=np.int64).reshape(-1, labels.NUM_CLASSES)


class SplitSource:
  """Random-access source over one prepared split (grain ``RandomAccessDataSource``).

  ``source[i]`` → ``{'image': uint8 [H, W, 3], 'label': uint8 [H, W] train ids,
  'image_id': str, 'class_pixels': int64 [19]}``. Images are decoded with PIL (no TF).
  """

  def __init__(self, data_source, name: str):
    self._source, self._name = data_source, name

  def __len__(self) -> int:
    return len(self._source)

  def _convert(self, rec) -> dict[str, Any]:
    image_id = rec["image_id"]
    return {"image": rec["image"], "label": rec["label"][..., 0],
            "image_id": image_id.decode() if isinstance(image_id, bytes) else str(image_id),
            "class_pixels": np.asarray(rec["class_pixels"], np.int64)}

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._convert(self._source[int(index)])

  def __getitems__(self, indices) -> list[dict[str, Any]]:
    return [self._convert(r) for r in self._source.__getitems__([int(i) for i in indices])]

  def __repr__(self) -> str:
    return f"SplitSource({self._name}, {len(self)} records)"


def open_split(dataset: str, split: str, data_dir: str, *,
               scale: tuple[int, int] | None = None) -> SplitSource:
  """Opens a prepared split for random access; raises ``DatasetNotPreparedError`` with the
  exact prepare command when it is missing."""
  _require_prepared(dataset, data_dir, scale)
  builder = _make_builder(dataset, data_dir, scale)
  if split not in builder.info.splits:
    raise KeyError(f"Dataset {dataset!r} in {data_dir} has no split {split!r}; "
                   f"splits: {sorted(builder.info.splits)}.")
  return SplitSource(builder.as_data_source(split=split), f"{dataset}/{split}")


# ---------------------------------------------------------------------------------------------
# Config dataset names → prepared datasets.

RESOLVABLE = ("gta5", "synthia", "cityscapes", "synthetic_source", "synthetic_target",
              "folder_source", "folder_target")


@dataclasses.dataclass(frozen=True)
class ResolvedDataset:
  """Where a config dataset name lives: pass ``dataset``/``data_dir`` to ``open_split`` and
  ``load_class_stats``; ``splits`` maps a role ('train', and 'val' when the data has one) to
  the split name."""
  dataset: str
  data_dir: str
  splits: Mapping[str, str]
  scale: tuple[int, int] | None = None  # the pre-resized copy to read (None = full resolution)


def data_root(data_cfg) -> str:
  """``config.data.data_dir``, else ``$MFM_JAX_DATA``, else ``~/tensorflow_datasets``."""
  root = data_cfg.data_dir or os.environ.get("MFM_JAX_DATA") or "~/tensorflow_datasets"
  return os.path.abspath(os.path.expanduser(root))


def raw_root(data_cfg) -> str:
  """``config.data.raw_dir``, else ``<data_root>/raw`` (where synthetic raw files go)."""
  return os.path.abspath(os.path.expanduser(data_cfg.raw_dir or
                                            os.path.join(data_root(data_cfg), "raw")))


def resolve(name: str, data_cfg, *, prepare_missing: bool = True,
            scale: tuple[int, int] | None = None) -> ResolvedDataset:
  """Maps a ``config.data.source/target`` name to a prepared dataset.

  * 'gta5' | 'synthia' | 'cityscapes': prepared with the CLI into ``data_root(data_cfg)``
    (nothing is prepared here: raw locations are not in the config).
  * 'synthetic_source' | 'synthetic_target': the synthetic benchmark's gta5 / cityscapes
    datasets, generated and prepared on first use (``synthetic.ensure_synthetic``).
  * 'folder_source' | 'folder_target': ``config.data.folder.{source,target}_dir`` prepared
    with ``config.data.folder.label_map`` into ``<data_root>/folder/<name>-<hash>`` on first use.

  ``scale = (w, h)`` selects the copy pre-resized to that scale (``prepare --scale``); the
  generated/folder datasets get it prepared on first use as well.
  With ``prepare_missing=False`` nothing is generated or prepared (paths only).
  """
  scale = None if scale is None else tuple(int(v) for v in scale)
  train_val = {"train": "train", "val": "val"}
  if name in ("gta5", "synthia"):
    return ResolvedDataset(name, data_root(data_cfg), {"train": "train"}, scale)
  if name == "cityscapes":
    return ResolvedDataset(name, data_root(data_cfg), train_val, scale)
  if name in ("synthetic_source", "synthetic_target"):
    from mfm_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    data_dir = (synthetic.ensure_synthetic(data_cfg) if prepare_missing
                else synthetic.synthetic_data_dir(data_cfg))
    dataset = "gta5" if name == "synthetic_source" else "cityscapes"
    if scale is not None and prepare_missing:
      raw = os.path.join(raw_root(data_cfg), "synthetic", synthetic.synthetic_key(data_cfg))
      prepare(dataset, os.path.join(raw, dataset), data_dir, scale=scale)
    if name == "synthetic_source":
      return ResolvedDataset(dataset, data_dir, {"train": "train"}, scale)
    return ResolvedDataset(dataset, data_dir, train_val, scale)
  if name in ("folder_source", "folder_target"):
    key = "source_dir" if name == "folder_source" else "target_dir"
    raw = data_cfg.folder[key]
    if not raw:
      raise ValueError(f"config.data.folder.{key} is empty but config uses {name!r}.")
    raw = os.path.abspath(os.path.expanduser(raw))
    label_map = data_cfg.folder.label_map or None
    rgb = data_cfg.folder.get("rgb_labels", "reject")
    data_dir = os.path.join(data_root(data_cfg), "folder",
                            f"{os.path.basename(raw)}-{_source_key(raw, label_map, rgb)}")
    if prepare_missing:
      prepare("folder", raw, data_dir, label_map=label_map, rgb_labels=rgb)
      if scale is not None:
        prepare("folder", raw, data_dir, label_map=label_map, scale=scale, rgb_labels=rgb)
    splits = {"train": "train"}
    path = dataset_path("folder", data_dir)
    if os.path.isfile(os.path.join(path, "metadata.json")):
      if "class_pixels/val" in _read_metadata(path):
        splits["val"] = "val"
    return ResolvedDataset("folder", data_dir, splits, scale)
  raise ValueError(f"Unknown dataset name {name!r}; expected one of {RESOLVABLE}.")
