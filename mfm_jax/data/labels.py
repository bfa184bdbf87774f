"""Class names, palette and label-id → train-id maps of the reference (uda_reference.md §3.1).

Train ids 0..18 follow ``CityscapesDataset.CLASSES``; everything unmapped becomes 255 (ignore).
"""

from __future__ import annotations

import numpy as np

IGNORE_LABEL = 255
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
  lut = np.full((size,), IGNORE_LABEL, dtype=np.uint8)
  for k, v in id_to_train_id.items():
    lut[k] = v
  return lut
