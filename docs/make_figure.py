r"""Draws the README picture: synthetic source scene, target scene, prediction, overlay.

  python -m mfm_jax.main --config=configs/mic_mfm.py:synthetic --workdir=/tmp/mfm_synth
  python docs/make_figure.py --config=configs/mic_mfm.py:synthetic \
      --checkpoint=/tmp/mfm_synth/checkpoints --output=docs/figure.png

The scenes are re-drawn by the synthetic generator with the benchmark's seed (the target
images are the first images of the target validation split, which the run never trained on);
predictions go through ``mfm_jax.predict`` exactly as for a user's own images.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from mfm_jax import predict
from mfm_jax.data import synthetic
from mfm_jax.data import transforms
from mfm_jax.evaluation import visualize

TITLES = ("source: rendered (GTA5 layout)", "target: 'real' (Cityscapes layout)",
          "prediction (MIC(HRDA) + MFM)", "overlay")


def _scenes(config, rows: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
  s = config.data.synthetic
  with tempfile.TemporaryDirectory() as tmp:
    dirs = synthetic.generate(tmp, seed=s.seed, num_source=rows, num_target=1, num_val=rows,
                              width=s.width, height=s.height, shift=s.shift)
    files = lambda root: sorted(os.path.join(d, f) for d, _, fs in os.walk(root)  # noqa: E731
                                for f in fs)
    source = [predict.read_image(f) for f in files(os.path.join(dirs["gta5"], "images"))]
    target = [predict.read_image(f) for f in files(
        os.path.join(dirs["cityscapes"], "leftImg8bit", "val"))]
  return source, target


def make_figure(config, checkpoint: str, output: str, rows: int = 2, zoom: int = 2) -> str:
  """Writes the ``rows`` × 4 picture to ``output`` (PNG); returns its path."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  source, target = _scenes(config, rows)
  config, _, variables, predict_fn, _ = predict.load_model(config, checkpoint)
  h, w = target[0].shape[:2]
  tiles = []
  for src, tgt in zip(source, target):
    x = transforms.eval_transform(tgt, tuple(config.data.test_scale))[None]
    pred = np.asarray(predict_fn(variables, jnp.asarray(x), (h, w)))[0]
    color = visualize.colorize(pred)
    row = [src, tgt, color, visualize.overlay(tgt, color)]
    tiles.append([visualize.resize(t, (h * zoom, w * zoom), nearest=(i == 2))
                  for i, t in enumerate(row)])
  gap, title_h = 4, 22
  width = 4 * w * zoom + 3 * gap
  canvas = PIL.Image.new("RGB", (width, title_h + rows * (h * zoom + gap)), "white")
  draw = PIL.ImageDraw.Draw(canvas)
  font = PIL.ImageFont.load_default(size=14)
  for j, title in enumerate(TITLES):
    draw.text((j * (w * zoom + gap) + 4, 3), title, fill="black", font=font)
  for i, row in enumerate(tiles):
    for j, tile in enumerate(row):
      canvas.paste(PIL.Image.fromarray(tile), (j * (w * zoom + gap),
                                               title_h + i * (h * zoom + gap)))
  canvas = canvas.quantize(colors=256, method=PIL.Image.Quantize.MEDIANCUT,
                           dither=PIL.Image.Dither.NONE)  # a small PNG
  canvas.save(output, format="PNG", optimize=True)
  return output


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  out = make_figure(f.config, f.checkpoint, f.output, f.rows)
  print(f"Wrote {out} ({os.path.getsize(out) / 1024:.0f} KiB)")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Config file[:preset] of the trained run.")
  flags.DEFINE_string("checkpoint", None, "Orbax checkpoint (the run's checkpoints/), .pth or "
                      ".safetensors.")
  flags.DEFINE_string("output", "docs/figure.png", "PNG to write.")
  flags.DEFINE_integer("rows", 2, "Scenes (rows) in the picture.")
  flags.mark_flags_as_required(["config", "checkpoint"])
  app.run(main)
