"""Input-pipeline throughput: PNG decode + the training augmentation, per grain worker count.

    python -m mfm_jax.data.benchmark [--workers=0,1,2] [--num_batches=20] \
        [--image_size=1914x1052] [--data_dir=DIR]

Without ``--data_dir`` a small fake GTA-size dataset (``--num_images`` smooth random scenes with
Cityscapes label ids) is written and prepared in a temporary folder. With ``--data_dir`` the
prepared 'gta5' dataset there is used (``python -m mfm_jax.data.prepare``).

Two figures per worker count, both after the first batch (worker start-up is shown apart):

* source images/s: decode + the full source pipeline (RCS, keep-ratio resize to
  ``--source_scale``, RandomCrop 512 with cat_max_ratio 0.75, flip, normalise, pad; §3.2);
* train steps/s: ``pipeline.make_train_iterator`` batches (``--batch_size`` source + target
  examples, the target drawn from the same data at ``--target_scale``).
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import grain
import numpy as np
import PIL.Image

from mfm_jax.config import base
from mfm_jax.data import builders
from mfm_jax.data import pipeline

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when it runs, so modules can be imported together)."""
  flags.DEFINE_list("workers", ["0", "1", "2"], "grain worker counts to compare.")
  flags.DEFINE_integer("num_batches", 20, "Timed batches per configuration.")
  flags.DEFINE_string("image_size", "1914x1052", "Fake image size WxH.")
  flags.DEFINE_integer("num_images", 8, "Fake images to write.")
  flags.DEFINE_string("data_dir", "", "Prepared TFDS data dir with 'gta5' (optional).")
  flags.DEFINE_integer("batch_size", 2, "Examples per domain per batch.")
  flags.DEFINE_integer("crop", 512, "Square crop size.")
  flags.DEFINE_string("source_scale", "1280x720", "Source keep-ratio scale WxH.")
  flags.DEFINE_string("target_scale", "1280x720", "Target keep-ratio scale WxH.")


# A few Cityscapes label ids (road, sidewalk, building, pole, vegetation, sky, person, car, ...).
_LABEL_IDS = np.array([7, 8, 11, 17, 20, 21, 23, 24, 26, 33], np.uint8)


def _parse_size(text: str, name: str) -> tuple[int, int]:
  try:
    w, h = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise app.UsageError(f"--{name} must look like 1914x1052, got {text!r}.") from None
  if w <= 0 or h <= 0:
    raise app.UsageError(f"--{name} must be positive, got {text!r}.")
  return w, h


def write_fake_gta(raw_dir: str, num_images: int, size: tuple[int, int], seed: int = 0) -> None:
  """Writes ``images/*.png`` + ``labels/*.png`` (GTA layout) of smooth random scenes."""
  w, h = size
  rng = np.random.default_rng(seed)
  palette = rng.integers(0, 256, (len(_LABEL_IDS), 3))
  os.makedirs(os.path.join(raw_dir, "images"), exist_ok=True)
  os.makedirs(os.path.join(raw_dir, "labels"), exist_ok=True)
  for i in range(num_images):
    cells = rng.integers(0, len(_LABEL_IDS), (h // 64 + 1, w // 64 + 1))
    cls = cells.repeat(64, 0).repeat(64, 1)[:h, :w]
    shade = np.linspace(0.7, 1.3, w, dtype=np.float32)[None, :, None]
    image = palette[cls] * shade + rng.normal(0, 8, (h, w, 3))
    PIL.Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
        os.path.join(raw_dir, "images", f"{i:05d}.png"))
    PIL.Image.fromarray(_LABEL_IDS[cls]).save(os.path.join(raw_dir, "labels", f"{i:05d}.png"))


class _SourceExamples:
  """grain map: step index → a batch of source examples (picklable, opens lazily)."""

  def __init__(self, maker):
    self.maker = maker

  def __call__(self, step: int):
    src = self.maker._sources()[0]  # pylint: disable=protected-access
    first = step * self.maker.local_batch
    return np.stack([self.maker.source_example(g, src)["image"]
                     for g in range(first, first + self.maker.local_batch)])


def _time(iterator, num_batches: int) -> tuple[float, float]:
  t0 = time.perf_counter()
  next(iterator)
  t1 = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  return t1 - t0, time.perf_counter() - t1


def benchmark(data_dir: str, workers: int, num_batches: int, *, batch_size: int = 2,
              crop: int = 512, source_scale: tuple[int, int] = (1280, 720),
              target_scale: tuple[int, int] = (1280, 720),
              rcs_min_pixels: int = 3000) -> dict[str, float]:
  """Start-up seconds and steady-state rates of one worker count on ``data_dir``'s gta5."""
  cfg = base.base_config().data
  cfg.data_dir = data_dir
  cfg.source = cfg.target = "gta5"
  cfg.source_scale, cfg.target_scale = tuple(source_scale), tuple(target_scale)
  cfg.crop_size = (crop, crop)
  cfg.batch_size = batch_size
  cfg.num_workers = workers
  cfg.rcs.min_pixels = rcs_min_pixels
  it = pipeline.make_train_iterator(cfg, seed=0)
  ds = grain.MapDataset.range(0, num_batches + 1).map(_SourceExamples(it._maker))  # pylint: disable=protected-access
  if workers:
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=cfg.prefetch))
  else:
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.prefetch,
                                              prefetch_buffer_size=cfg.prefetch))
  src_it = iter(ds)
  src_start, src_s = _time(src_it, num_batches)
  src_it.close()
  train_start, train_s = _time(it, num_batches)
  it.close()
  return {"workers": workers, "source_startup_s": src_start,
          "source_images_per_s": num_batches * cfg.batch_size / src_s,
          "train_startup_s": train_start, "train_steps_per_s": num_batches / train_s}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # keep the table readable (TFDS logs at INFO)
  workers = [int(w) for w in FLAGS.workers]
  if any(w < 0 for w in workers) or FLAGS.num_batches < 1:
    raise app.UsageError("--workers must be >= 0 and --num_batches >= 1.")
  with tempfile.TemporaryDirectory(prefix="mfm_data_bench_") as tmp:
    data_dir = FLAGS.data_dir
    if not data_dir:
      size = _parse_size(FLAGS.image_size, "image_size")
      print(f"Writing {FLAGS.num_images} fake {size[0]}x{size[1]} GTA images to {tmp} ...",
            flush=True)
      write_fake_gta(os.path.join(tmp, "raw"), FLAGS.num_images, size)
      data_dir = os.path.join(tmp, "tfds")
      builders.prepare("gta5", os.path.join(tmp, "raw"), data_dir)
    scales = dict(source_scale=_parse_size(FLAGS.source_scale, "source_scale"),
                  target_scale=_parse_size(FLAGS.target_scale, "target_scale"))
    rows = [benchmark(data_dir, w, FLAGS.num_batches, batch_size=FLAGS.batch_size, crop=FLAGS.crop,
                      **scales) for w in workers]
  print(f"\nbatch {FLAGS.batch_size} per domain, crop {FLAGS.crop}, source scale "
        f"{FLAGS.source_scale}, {os.cpu_count()} CPUs, {FLAGS.num_batches} timed batches")
  print(f"{'workers':>7} | {'source img/s':>12} | {'start s':>7} | {'train steps/s':>13} | "
        f"{'start s':>7}")
  for r in rows:
    print(f"{r['workers']:>7} | {r['source_images_per_s']:>12.1f} | {r['source_startup_s']:>7.2f}"
          f" | {r['train_steps_per_s']:>13.2f} | {r['train_startup_s']:>7.2f}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
