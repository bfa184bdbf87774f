r"""Visual check: target validation images, ground truth and the predictions of finished runs.

``python -m mfm_jax.study.visual --runs=DIR_A,DIR_B --labels="MIC(DAFormer),MIC(DAFormer)+MFM"
--output=predictions.png`` writes a PNG grid: one line per image (the first ``--num_images``
of the target val split), columns image | ground truth | one prediction per run (the student,
as evaluated), colourised with the Cityscapes palette (ignore = black). Each run is rebuilt
from the ``config.json`` in its workdir and read from its newest checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from mfm_jax.data import labels as labels_lib


def colourise(label: np.ndarray) -> np.ndarray:
  """Train ids ``[H, W]`` → uint8 RGB with the Cityscapes palette; 255 (ignore) is black."""
  lut = np.zeros((256, 3), np.uint8)
  lut[:len(labels_lib.PALETTE)] = np.asarray(labels_lib.PALETTE, np.uint8)
  return lut[np.asarray(label).astype(np.uint8)]


def _tuples(obj: Any) -> Any:
  if isinstance(obj, dict):
    return {k: _tuples(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return tuple(_tuples(v) for v in obj)
  return obj


def load_run_config(rdir: str):
  """The ConfigDict a run trained with (its ``config.json``; JSON lists back to tuples)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = os.path.join(rdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: {rdir} is not a training workdir.")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


def predict_images(rdirs: Sequence[str], num_images: int = 4
                   ) -> tuple[list[np.ndarray], list[np.ndarray], list[list[np.ndarray]]]:
  """(images, ground truths, predictions per run) for the first ``num_images`` val images.

  The runs must share the evaluation data (``config.data``'s target, val split, test scale).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from mfm_jax import evaluate  # pylint: disable=g-import-not-at-top
  from mfm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mfm_jax.evaluation import inference
  from mfm_jax.trainer import state as state_lib
  images, gts, preds = [], [], []
  for i, rdir in enumerate(rdirs):
    config = load_run_config(rdir)
    config.data.max_eval_images = num_images
    config.data.eval_batch_size = 1
    net = state_lib.build_network(config)
    variables = evaluate.load_variables(config, net, os.path.join(rdir, "checkpoints"))
    predict = inference.make_predict_fn(config, net)
    run_preds = []
    for batch in pipeline.make_eval_dataset(config.data):
      label = np.asarray(batch["label"])
      pred = predict(variables, jnp.asarray(batch["image"]), tuple(label.shape[1:3]))
      run_preds.append(np.asarray(pred)[0])
      if i == 0:
        images.append(np.asarray(batch["image"])[0])  # uint8 RGB at the test scale
        gts.append(label[0])
    if i and len(run_preds) != len(gts):
      raise ValueError(f"{rdir} evaluates {len(run_preds)} images, {rdirs[0]} {len(gts)}.")
    preds.append(run_preds)
  return images, gts, preds


def prediction_grid(rdirs: Sequence[str], output: str, labels: Sequence[str] | None = None,
                    num_images: int = 4) -> str:
  """Writes the image | ground truth | prediction per run grid to ``output`` (PNG)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  labels = list(labels) if labels else [os.path.basename(os.path.normpath(d)) for d in rdirs]
  if len(labels) != len(rdirs):
    raise ValueError(f"{len(labels)} labels for {len(rdirs)} runs.")
  images, gts, preds = predict_images(rdirs, num_images)
  titles = ["target image", "ground truth"] + [f"prediction: {l}" for l in labels]
  cols = len(titles)
  h, w = images[0].shape[:2]
  fig, axes = plt.subplots(len(images), cols, squeeze=False,
                           figsize=(2.6 * cols, 2.6 * h / w * len(images) + 0.4))
  for r, image in enumerate(images):
    panels = [image, colourise(gts[r])] + [colourise(p[r]) for p in preds]
    for c, panel in enumerate(panels):
      ax = axes[r, c]
      ax.imshow(panel, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(titles[c], fontsize=8)
  return save_figure(fig, output, dpi=110)


def save_figure(fig, output: str, dpi: int) -> str:
  """Lays out, writes (creating the folder) and closes a matplotlib figure; returns ``output``."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  fig.savefig(output, dpi=dpi, bbox_inches="tight")
  plt.close(fig)
  return output


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  labels = f.labels or None
  print(prediction_grid(f.runs, f.output, labels, f.num_images))


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags
  flags.DEFINE_list("runs", None, "Finished training workdirs (e.g. without and with MFM).")
  flags.DEFINE_list("labels", [], "Column names, one per run (default: the folder names).")
  flags.DEFINE_string("output", "predictions.png", "PNG to write.")
  flags.DEFINE_integer("num_images", 4, "First N target val images.")
  flags.mark_flags_as_required(["runs"])
  app.run(main)
