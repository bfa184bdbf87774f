"""Class names, palette and label-id → train-id maps of the reference (uda_reference.md §3.1).

Train ids 0..18 follow ``CityscapesDataset.CLASSES``; everything unmapped becomes 255 (ignore).
"""

from __future__ import annotations

import numpy as np

from mfm_jax.runtime import errors

# The ignore train id. Its one definition: mfm_jax.ops re-exports it for the JAX code; the
# host data code (grain and prepare workers) reads it here without importing JAX.
IGNORE_INDEX = 255
NUM_CLASSES = 19

CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)

PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

# GTA5 and Cityscapes `*_labelIds.png` ids → train ids (cityscapesScripts labels.py, gta.py).
CITYSCAPES_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}

# SYNTHIA-RAND-CITYSCAPES GT/LABELS ids → train ids (synthia.py converter). Terrain (9),
# truck (14) and train (16) do not occur in SYNTHIA.
SYNTHIA_ID_TO_TRAIN_ID = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10,
    10: 11, 17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}

# Evaluation protocols for SYNTHIA→Cityscapes (uda_reference.md §4): 16 classes drop terrain,
# truck, train; 13 classes additionally drop wall, fence, pole.
SYNTHIA16_CLASSES = tuple(c for c in range(NUM_CLASSES) if c not in (9, 14, 16))
SYNTHIA13_CLASSES = tuple(c for c in SYNTHIA16_CLASSES if c not in (3, 4, 5))

# "Thing" classes used by the ImageNet feature distance (dacs_a999_fdthings.py).
THING_CLASSES = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)


def lookup_table(id_to_train_id: dict[int, int], size: int = 65536) -> np.ndarray:
  """Dense uint8 lookup table ``lut[label_id] = train_id`` (255 for unknown ids)."""
  lut = np.full((size,), IGNORE_INDEX, dtype=np.uint8)
  for k, v in id_to_train_id.items():
    lut[k] = v
  return lut


# ---------------------------------------------------------------------------------------------
# Raw label files → train ids, with validation (used at prepare time by `raw_files.py`).

# cityscapesScripts labels.py defines ids 0..33 plus -1 (license plate), which a uint8
# `*_labelIds.png` cannot hold; 255 is accepted as "already ignored". GTA5 uses the same ids.
CITYSCAPES_KNOWN_IDS = frozenset(range(34)) | {IGNORE_INDEX}
# SYNTHIA-RAND-CITYSCAPES class ids are 0..22 (synthia.py converter).
SYNTHIA_KNOWN_IDS = frozenset(range(23))


class LabelError(errors.UserError, ValueError):
  """A raw label file that cannot be converted to train ids (message names the file)."""


# How multi-channel label files are read (`prepare --rgb_labels`): 'reject' accepts only
# grey images stored as RGB(A) (all colour channels equal); 'first_channel' takes the class id
# from the first (R) channel, as SYNTHIA's layout defines (its converter reads the last cv2 BGR
# channel).
RGB_LABEL_MODES = ("reject", "first_channel")


def read_label_ids(path: str, rgb_labels: str = "reject") -> np.ndarray:
  """Reads a raw label PNG as an int32 ``[H, W]`` array of label ids.

  Single-channel files ('L', 'P' palette indices, 'I;16') are returned as they are.
  Multi-channel files follow ``rgb_labels`` (see ``RGB_LABEL_MODES``). Raises ``LabelError``
  for lossy or ambiguous files: JPEG (or any non-PNG) data, whatever the file name (a JPEG
  label renamed .png has its class ids smeared at every edge), and colour labels under
  'reject'. 16-bit RGB(A) PNGs (SYNTHIA), which Pillow would truncate to their high byte, are
  decoded from both bytes (Pillow's own PNG decoder, once per byte order).
  """
  import PIL.Image  # pylint: disable=g-import-not-at-top

  if rgb_labels not in RGB_LABEL_MODES:
    raise ValueError(f"rgb_labels={rgb_labels!r}; choose one of {RGB_LABEL_MODES}.")
  with PIL.Image.open(path) as im:
    fmt, mode, tiles = im.format, im.mode, list(im.tile)
    if fmt != "PNG":
      why = " (JPEG compression changes class ids along every edge)" if fmt == "JPEG" else ""
      raise LabelError(f"{path}: holds {fmt} image data, not PNG; labels must be stored "
                       f"losslessly{why}. Export the label again as PNG from its source.")
    if mode in ("RGB", "RGBA") and tiles and str(tiles[0].args).endswith(";16B"):
      planes = []
      for order in ("16B", "16L"):  # high byte, then low byte of each big-endian sample
        with PIL.Image.open(path) as im16:
          im16.tile = [t._replace(args=f"{mode};{order}") for t in im16.tile]
          im16.load()
          planes.append(np.asarray(im16).astype(np.int32))
      arr = planes[0] * 256 + planes[1]
    else:
      im.load()
      arr = np.asarray(im).astype(np.int32)
  if arr.ndim == 3:
    colour = arr[..., :3] if mode in ("RGB", "RGBA") else arr[..., :1]
    if (rgb_labels == "reject" and colour.shape[-1] == 3
        and not (np.array_equal(colour[..., 0], colour[..., 1])
                 and np.array_equal(colour[..., 0], colour[..., 2]))):
      raise LabelError(
          f"{path}: a colour ({mode}) label; label ids must be one channel ('L', 'P' or 16-bit "
          "grey PNG). If the class id is stored in the first (R) channel, prepare with "
          "--rgb_labels=first_channel (config.data.folder.rgb_labels='first_channel' for "
          "folder datasets prepared by training); colour-coded labels (e.g. Cityscapes "
          "*_color.png) must first be converted to label ids.")
    arr = arr[..., 0]
  return arr


def check_known_ids(ids: np.ndarray, known: frozenset[int], path: str, dataset: str) -> None:
  """Raises ``LabelError`` naming ``path`` if ``ids`` holds a value outside ``known``."""
  values = np.unique(ids)
  unknown = [int(v) for v in values if int(v) not in known]
  if unknown:
    raise LabelError(
        f"{path}: label values {unknown[:10]} are not {dataset} label ids "
        f"(known: {sorted(known)[:5]}..{sorted(known)[-1]}). Is this a label-id file "
        "(not a colour or trainIds image)?")


def to_train_ids(ids: np.ndarray, id_to_train_id: dict[int, int]) -> np.ndarray:
  """Maps label ids (already validated) to uint8 train ids; unmapped ids → 255."""
  lut = lookup_table(id_to_train_id, size=max(65536, int(ids.max(initial=0)) + 1))
  return lut[ids]


def class_pixel_counts(train_ids: np.ndarray) -> np.ndarray:
  """Pixels per train id, int64 ``[19]`` (255 and other ids are not counted)."""
  flat = train_ids.reshape(-1)
  return np.bincount(flat[flat < NUM_CLASSES], minlength=NUM_CLASSES).astype(np.int64)


def load_label_map(path: str) -> dict[int, int]:
  """Reads a JSON ``{"label id": train id}`` map for the folder dataset.

  Train ids must be 0..18 or 255; label ids non-negative integers below 65536. Ids absent
  from the map are rejected at prepare time (map them to 255 explicitly to ignore them).
  """
  import json  # pylint: disable=g-import-not-at-top

  try:
    with open(path) as f:
      raw = json.load(f)
  except (OSError, ValueError) as e:
    raise LabelError(f"{path}: cannot read the JSON label map ({e}).") from e
  if not isinstance(raw, dict) or not raw:
    raise LabelError(f"{path}: the label map must be a non-empty JSON object "
                     '{"label id": train id, ...}.')
  out = {}
  for k, v in raw.items():
    try:
      kid, tid = int(k), int(v)
    except (TypeError, ValueError) as e:
      raise LabelError(f"{path}: entry {k!r}: {v!r} is not integer → integer.") from e
    if not 0 <= kid < 65536 or not (0 <= tid < NUM_CLASSES or tid == IGNORE_INDEX):
      raise LabelError(f"{path}: entry {k!r}: {v!r}: label ids must be in [0, 65535] and "
                       f"train ids in [0, {NUM_CLASSES - 1}] or {IGNORE_INDEX}.")
    out[kid] = tid
  return out
