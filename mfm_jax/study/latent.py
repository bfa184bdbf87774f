r"""What the Rebuilder does to one image: latent mask, original vs rebuilt features.

``python -m mfm_jax.study.latent --run=DIR --output=latent.png`` takes a finished MFM run
(its ``config.json`` and newest checkpoint, student + Rebuilder), the first target validation
image cropped to the training crop, draws one keep mask as the train step does
(``MFMTask.draw_keep``), and rebuilds the encoder features (``MFMTask.rebuild``). The figure
has one line per encoder level: the image with the masked cells shaded, the first principal
component of the original features, the same projection of the rebuilt features, and the
masked cells' cosine similarity between the two (also returned, one figure per level). PCA is
fitted on the original features of that level only, so both maps share one colour scale.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def _pc1(original: np.ndarray, rebuilt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Projections of ``[h, w, C]`` maps onto the first principal component of ``original``."""
  x = original.reshape(-1, original.shape[-1]).astype(np.float64)
  mean = x.mean(0)
  _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
  comp = vt[0]
  proj = lambda a: ((a.reshape(-1, a.shape[-1]) - mean) @ comp).reshape(a.shape[:2])  # noqa: E731
  return proj(original), proj(rebuilt)


def masked_cosine(original: np.ndarray, rebuilt: np.ndarray, masked: np.ndarray) -> float:
  """Mean cosine similarity of ``[h, w, C]`` feature vectors where ``masked`` ``[h, w]``."""
  a = original[masked].astype(np.float64)
  b = rebuilt[masked].astype(np.float64)
  if not len(a):
    return float("nan")
  cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
  return float(cos.mean())


def rebuild_one(rdir: str, image_index: int = 0, seed: int = 0) -> dict[str, Any]:
  """(image crop, keep mask, original and rebuilt features per level) of one val image."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from mfm_jax import evaluate  # pylint: disable=g-import-not-at-top
  from mfm_jax import ops  # pylint: disable=g-import-not-at-top
  from mfm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mfm_jax.study import visual  # pylint: disable=g-import-not-at-top
  from mfm_jax.trainer import checkpoint
  from mfm_jax.trainer import state as state_lib
  config = visual.load_run_config(rdir)
  if not (config.mfm.enabled and config.mfm.rebuild):
    raise ValueError(f"{rdir} is not a run with an MFM Rebuilder (config.mfm.enabled/rebuild).")
  config.data.max_eval_images = image_index + 1
  config.data.eval_batch_size = 1
  net, task = state_lib.build_network(config), state_lib.build_mfm_task(config)
  ckpt = os.path.join(rdir, "checkpoints")
  variables = evaluate.load_variables(config, net, ckpt)
  rebuilder_params = checkpoint.load_params(ckpt, subtree=("params", "rebuilder"))
  batch = list(pipeline.make_eval_dataset(config.data))[image_index]
  h, w = task.image_size
  image = np.asarray(batch["image"])[:, :h, :w]  # the training crop size, top-left
  if image.shape[1:3] != (h, w):
    raise ValueError(f"The val image {image.shape[1:3]} is smaller than the crop {(h, w)}.")
  feats, _ = net.encode(variables, ops.normalize_images(jnp.asarray(image)), train=False)
  keep = task.draw_keep(jax.random.key(seed), 1)
  rebuilt, _ = task.rebuild(rebuilder_params, feats, keep)
  return {"image": image[0], "keep": np.asarray(keep[0]),
          "levels": list(task.levels),
          "original": [np.asarray(f[0]) for f in feats],
          "rebuilt": [np.asarray(f[0]) for f in rebuilt]}


def latent_figure(rdir: str, output: str, image_index: int = 0, seed: int = 0
                  ) -> dict[str, float]:
  """Writes the figure (PNG); returns the masked-cell cosine similarity per rebuilt level."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  from mfm_jax.study import visual  # pylint: disable=g-import-not-at-top
  from mfm_jax.uda import mfm  # pylint: disable=g-import-not-at-top
  out = rebuild_one(rdir, image_index, seed)
  image, keep = out["image"], out["keep"]
  levels = out["levels"]
  fig, axes = plt.subplots(len(levels), 3, squeeze=False, figsize=(8.4, 2.8 * len(levels)))
  cosines = {}
  for r, lvl in enumerate(levels):
    orig, reb = out["original"][lvl], out["rebuilt"][lvl]
    size = orig.shape[:2]
    # The level's masked cells exactly as the Rebuilder's fusion sees them.
    masked = np.asarray(mfm.level_mask(keep[None], size))[0, ..., 0] > 0.5
    cosines[f"level_{lvl + 1}"] = masked_cosine(orig, reb, masked)
    p_orig, p_reb = _pc1(orig, reb)
    lo, hi = np.percentile(p_orig, [1, 99])
    big = np.kron(keep < 0.5, np.ones((image.shape[0] // keep.shape[0],
                                       image.shape[1] // keep.shape[1])))
    shaded = image.astype(np.float32)
    shaded[big > 0] = 0.35 * shaded[big > 0]
    panels = [(shaded.astype(np.uint8), f"image, masked tokens dark ({int(masked.mean()*100)} %)"),
              (p_orig, f"level {lvl + 1} {size[0]}×{size[1]}: PC1 original"),
              (p_reb, f"PC1 rebuilt (masked cos {cosines[f'level_{lvl + 1}']:.2f})")]
    for c, (panel, title) in enumerate(panels):
      ax = axes[r, c]
      if c == 0:
        ax.imshow(panel)
      else:
        ax.imshow(panel, cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
      ax.set_title(title, fontsize=7)
      ax.set_xticks([])
      ax.set_yticks([])
  visual.save_figure(fig, output, dpi=100)
  return cosines


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  cos = latent_figure(f.run, f.output, f.image_index, f.seed)
  print(f.output)
  for k, v in cos.items():
    print(f"{k}: masked-cell cosine(original, rebuilt) = {v:.3f}")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags
  flags.DEFINE_string("run", None, "A finished training workdir with MFM (Rebuilder on).")
  flags.DEFINE_string("output", "latent.png", "PNG to write.")
  flags.DEFINE_integer("image_index", 0, "Which target val image.")
  flags.DEFINE_integer("seed", 0, "Seed of the keep mask.")
  flags.mark_flags_as_required(["run"])
  app.run(main)
