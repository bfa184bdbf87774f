"""Raw dataset layouts and the per-image prepare step (numpy + PIL only: no TFDS, no JAX).

``list_pairs`` finds the (image, label) files of a raw layout; ``load_example`` turns one pair
into what a prepared record holds. ``load_example`` runs in the prepare worker processes
(``builders.prepare(num_workers > 1)`` spawns them), so this module must not import JAX or
TFDS: on a GPU machine every worker would otherwise start CUDA (tested).

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

import io
import os
from typing import Mapping

import numpy as np
import PIL.Image

from mfm_jax.data import labels
from mfm_jax.data import transforms
from mfm_jax.runtime import errors

DATASETS = ("gta5", "synthia", "cityscapes", "folder")
_IMAGE_EXTS = (".png", ".jpg", ".jpeg")

LAYOUT_HELP = {
    "gta5": "<raw_dir>/images/*.png and <raw_dir>/labels/<same name>.png",
    "synthia": "<raw_dir>/RGB/*.png and <raw_dir>/GT/LABELS/<same name>.png",
    "cityscapes": ("<raw_dir>/leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png and "
                   "<raw_dir>/gtFine/{train,val}/<city>/<stem>_gtFine_labelIds.png"),
    "folder": ("<raw_dir>/images/{train,val}/**/<stem>.{png,jpg,jpeg} and "
               "<raw_dir>/labels/{train,val}/**/<stem>.png (val optional)"),
}

# Label id → train id map and the accepted label ids of each fixed layout ('folder' reads its
# map from a JSON file, Cityscapes ids by default).
ID_MAPS = {
    "gta5": (labels.CITYSCAPES_ID_TO_TRAIN_ID, labels.CITYSCAPES_KNOWN_IDS),
    "cityscapes": (labels.CITYSCAPES_ID_TO_TRAIN_ID, labels.CITYSCAPES_KNOWN_IDS),
    "synthia": (labels.SYNTHIA_ID_TO_TRAIN_ID, labels.SYNTHIA_KNOWN_IDS),
}


class PrepareError(errors.UserError, ValueError):
  """Raw data that cannot be prepared; the message names the file or folder."""


def check_dataset(dataset: str) -> None:
  if dataset not in DATASETS:
    raise ValueError(f"Unknown dataset {dataset!r}; expected one of {DATASETS}.")


def _require_dir(path: str, dataset: str) -> None:
  if not os.path.isdir(path):
    raise PrepareError(f"Missing folder {path} for dataset {dataset!r}; expected layout: "
                       f"{LAYOUT_HELP[dataset]}.")


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
  check_dataset(dataset)
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
                         f"images under {img_root} (layout: {LAYOUT_HELP[dataset]}).")
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


def load_example(raw_dir: str, image_rel: str, label_rel: str, dataset: str,
                 id_map: Mapping[int, int], known: frozenset[int],
                 scale: tuple[int, int] | None,
                 rgb_labels: str = "reject") -> tuple[bytes, bytes, np.ndarray]:
  """Returns ``(image_png, label_png, class_pixels)`` for one raw pair (module-level: picklable).

  ``scale = (w, h)`` resizes with the mmcv keep-ratio rule (``transforms.keep_ratio_size``);
  ``class_pixels`` is counted before, at the original resolution (RCS, uda_reference.md §2.5).
  """
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
    size = transforms.keep_ratio_size(image.shape[0], image.shape[1], scale)
    if size != image.shape[:2]:
      # The numpy twins of mfm_jax.ops' torch-rule resizes, as the training pipeline uses:
      # bilinear (rounded to uint8) for the image, nearest for the train ids.
      image = transforms.resize_bilinear(image, size)
      train_ids = transforms.resize_nearest(train_ids, size)
      keep_bytes = False
  return (data if keep_bytes else _encode_png(image)), _encode_png(train_ids), counts


def load_packed(args):
  """``load_example(*args)``: the function the prepare workers map over."""
  return load_example(*args)
