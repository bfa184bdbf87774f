"""Prepared splits: random access (``open_split``), class statistics, and config names.

``open_split`` / ``load_class_stats`` read what ``builders.prepare`` wrote and raise
``DatasetNotPreparedError`` with the exact prepare command when it is missing. ``resolve`` maps
a ``config.data.source/target`` name to a prepared dataset, generating (``synthetic``) or
preparing (``folder_*``) it on first use.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import numpy as np

from mfm_jax.data import builders
from mfm_jax.data import labels
from mfm_jax.data import raw_files
from mfm_jax.data import synthetic
from mfm_jax.runtime import errors


class DatasetNotPreparedError(errors.UserError, FileNotFoundError):
  """``open_split``/``load_class_stats`` on a dataset that was not (completely) prepared."""


def _require_prepared(dataset: str, data_dir: str, scale) -> str:
  path = builders.dataset_path(dataset, data_dir, scale)
  if not os.path.isfile(os.path.join(path, "dataset_info.json")):
    raise DatasetNotPreparedError(
        f"Prepared dataset {dataset!r} ({builders.scale_tag(scale)}) not found: {path} is "
        f"missing or incomplete. Prepare it with:\n  "
        f"{builders.prepare_command(dataset, data_dir, scale)}\n"
        f"(raw layout: {raw_files.LAYOUT_HELP[dataset]}).")
  return path


def load_class_stats(dataset: str, split: str, data_dir: str, *,
                     scale: tuple[int, int] | None = None) -> np.ndarray:
  """Per-image class pixel counts, int64 ``[N, 19]`` in record order (no image decoding)."""
  meta = builders.read_metadata(_require_prepared(dataset, data_dir, scale))
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
  builder = builders.make_builder(dataset, data_dir, scale)
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


def resolve(name: str, data_cfg, *, prepare_missing: bool = True,
            scale: tuple[int, int] | None = None) -> ResolvedDataset:
  """Maps a ``config.data.source/target`` name to a prepared dataset.

  * 'gta5' | 'synthia' | 'cityscapes': prepared with the CLI into
    ``builders.data_root(data_cfg)`` (nothing is prepared here: raw locations are not in the
    config).
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
    return ResolvedDataset(name, builders.data_root(data_cfg), {"train": "train"}, scale)
  if name == "cityscapes":
    return ResolvedDataset(name, builders.data_root(data_cfg), train_val, scale)
  if name in ("synthetic_source", "synthetic_target"):
    data_dir = (synthetic.ensure_synthetic(data_cfg) if prepare_missing
                else synthetic.synthetic_data_dir(data_cfg))
    dataset = "gta5" if name == "synthetic_source" else "cityscapes"
    if scale is not None and prepare_missing:
      raw_dir = os.path.join(builders.raw_root(data_cfg), "synthetic",
                             synthetic.synthetic_key(data_cfg))
      builders.prepare(dataset, os.path.join(raw_dir, dataset), data_dir, scale=scale)
    if name == "synthetic_source":
      return ResolvedDataset(dataset, data_dir, {"train": "train"}, scale)
    return ResolvedDataset(dataset, data_dir, train_val, scale)
  if name in ("folder_source", "folder_target"):
    key = "source_dir" if name == "folder_source" else "target_dir"
    raw_dir = data_cfg.folder[key]
    raw_dir = os.path.abspath(os.path.expanduser(raw_dir))
    label_map = data_cfg.folder.label_map or None
    rgb = data_cfg.folder.rgb_labels
    source = builders.source_key(raw_dir, label_map, rgb)
    data_dir = os.path.join(builders.data_root(data_cfg), "folder",
                            f"{os.path.basename(raw_dir)}-{source}")
    if prepare_missing:
      builders.prepare("folder", raw_dir, data_dir, label_map=label_map, rgb_labels=rgb)
      if scale is not None:
        builders.prepare("folder", raw_dir, data_dir, label_map=label_map, scale=scale,
                         rgb_labels=rgb)
    splits = {"train": "train"}
    path = builders.dataset_path("folder", data_dir)
    if os.path.isfile(os.path.join(path, "metadata.json")):
      if "class_pixels/val" in builders.read_metadata(path):
        splits["val"] = "val"
    return ResolvedDataset("folder", data_dir, splits, scale)
  raise ValueError(f"Unknown dataset name {name!r}; expected one of {RESOLVABLE}.")
