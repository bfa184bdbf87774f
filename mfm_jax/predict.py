r"""Segment your own images: label maps, colour maps and overlays for a folder of pictures.

  python -m mfm_jax.predict --config=configs/mic_mfm.py --checkpoint=CKPT \
      --input=photos/ --output=out/ [--mode=whole|slide] [--which=student|teacher] \
      [--batch_size=4]

``CKPT`` is an Orbax checkpoint (a training workdir's ``checkpoints/``, a step, or ``convert``'s
output), a PyTorch ``.pth`` or a ``.safetensors`` file (strictly loaded, load report printed,
as ``evaluate`` and ``convert`` do). ``--input`` is one image, a folder (searched recursively) or
a glob (``'photos/**/*.jpg'``). For every image ``a/b.jpg`` under the input root it writes

  out/a/b_trainIds.png  label map, Cityscapes train ids 0..18 (uint8, the image's own size)
  out/a/b_color.png     the label map in the Cityscapes colours
  out/a/b_overlay.png   the image blended 50/50 with the colours

and ``out/predict_summary.json``. Images of any size and aspect ratio are resized (keep ratio)
to ``config.data.test_scale`` as in evaluation, segmented in ``--mode`` (default
``config.eval.mode``; 'slide' = overlapping ``config.eval.crop_size`` windows as the reference
evaluates HRDA), and the prediction is resized back to the image. Images of one size are
batched (one compilation per size). A file that cannot be read is named, skipped and counted;
outputs are written under a temporary name and renamed, so no half-written file is left. The
exit status is 1 if any input was skipped.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import os
import sys
import time
from typing import Any

import numpy as np

from mfm_jax.runtime import json_io

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
OUTPUTS = ("trainIds", "color", "overlay")
SUMMARY_FILE = "predict_summary.json"
# HRDA's detail windows must start on the head's output stride at both scales; padding the input
# to a multiple of the MiT's total stride (32) satisfies every window layout.
HRDA_PAD_MULTIPLE = 32


class PredictError(ValueError):
  """A user error (flag, path, checkpoint); the message names it."""


@dataclasses.dataclass(frozen=True)
class Item:
  path: str  # the input file
  stem: str  # output path without suffix, relative to the output folder


# ---------------------------------------------------------------------------------- inputs

def _has_magic(text: str) -> bool:
  return any(c in text for c in "*?[")


def _glob_root(pattern: str) -> str:
  """The folder part of ``pattern`` before its first wildcard."""
  parts = pattern.split(os.sep)
  fixed = []
  for part in parts[:-1]:
    if _has_magic(part):
      break
    fixed.append(part)
  return os.sep.join(fixed) or os.sep


def _inside(path: str, folder: str | None) -> bool:
  return folder is not None and (path == folder or path.startswith(folder + os.sep))


def _stems(files: list[str], root: str) -> list[Item]:
  """Output stems mirroring ``files`` under ``root``; twins a.jpg, a.png → a_jpg, a_png."""
  rel = [os.path.relpath(f, root) for f in files]
  counts = collections.Counter(os.path.splitext(r)[0] for r in rel)
  items = []
  for f, r in zip(files, rel):
    stem, ext = os.path.splitext(r)
    items.append(Item(f, f"{stem}_{ext.lstrip('.')}" if counts[stem] > 1 else stem))
  return items


def find_inputs(spec: str, exclude: str | None = None) -> list[Item]:
  """Images named by ``--input`` (file, folder searched recursively, or glob), sorted.

  ``exclude`` (the output folder) is skipped when it lies inside the input folder. In a folder
  only files with an image suffix are taken; a file or glob match is taken as given (a
  non-image is then reported as unreadable).
  """
  path = os.path.abspath(os.path.expanduser(spec))
  exclude = os.path.abspath(exclude) if exclude else None
  if os.path.isfile(path):
    return [Item(path, os.path.splitext(os.path.basename(path))[0])]
  if os.path.isdir(path):
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                           and not _inside(os.path.join(dirpath, d), exclude))
      files += [os.path.join(dirpath, f) for f in sorted(filenames)
                if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
    root = path
  elif _has_magic(spec):
    files = sorted(os.path.abspath(f) for f in glob.glob(path, recursive=True)
                   if os.path.isfile(f) and not _inside(os.path.abspath(f), exclude))
    root = _glob_root(path)
  else:
    raise PredictError(f"--input={spec}: no such file or folder.")
  if not files:
    raise PredictError(f"--input={spec}: no images found (looked for "
                       f"{', '.join(IMAGE_SUFFIXES)}).")
  return _stems(files, root)


def read_image(path: str) -> np.ndarray:
  """RGB uint8 ``[H, W, 3]`` of ``path``, EXIF orientation applied; ValueError if unreadable."""
  import PIL.Image  # pylint: disable=g-import-not-at-top
  import PIL.ImageOps  # pylint: disable=g-import-not-at-top
  try:
    with PIL.Image.open(path) as im:
      im = PIL.ImageOps.exif_transpose(im)
      rgb = np.asarray(im.convert("RGB"))
  except Exception as e:  # pylint: disable=broad-except  (Pillow raises many types)
    raise ValueError(f"{type(e).__name__}: {e}") from None
  if rgb.ndim != 3 or min(rgb.shape[:2]) < 1:
    raise ValueError(f"empty image of shape {rgb.shape}")
  return rgb


# --------------------------------------------------------------------------------- outputs

def output_paths(output_dir: str, item: Item) -> dict[str, str]:
  """``{'trainIds'|'color'|'overlay': path}`` of ``item``'s three PNGs."""
  return {k: os.path.join(output_dir, f"{item.stem}_{k}.png") for k in OUTPUTS}


def _save_png(array: np.ndarray, path: str) -> None:
  """Writes ``array`` as PNG under a temporary name in the same folder, then renames."""
  import PIL.Image  # pylint: disable=g-import-not-at-top
  with json_io.atomic_path(path, hidden=True) as tmp:
    PIL.Image.fromarray(array).save(tmp, format="PNG")


def write_outputs(output_dir: str, item: Item, rgb: np.ndarray, pred: np.ndarray,
                  alpha: float = 0.5) -> None:
  """The label, colour and overlay PNGs of one image (atomic, folders created)."""
  from mfm_jax.evaluation import visualize  # pylint: disable=g-import-not-at-top
  paths = output_paths(output_dir, item)
  os.makedirs(os.path.dirname(paths["color"]), exist_ok=True)
  color = visualize.colorize(pred)
  _save_png(pred.astype(np.uint8), paths["trainIds"])
  _save_png(color, paths["color"])
  _save_png(visualize.overlay(rgb, color, alpha), paths["overlay"])


# --------------------------------------------------------------------------------- running

def _prefetch(items: list[Item], scale, workers: int):
  """Yields ``(item, rgb, network input, error)`` in order, decoding ahead in threads."""
  from mfm_jax.data import transforms  # pylint: disable=g-import-not-at-top

  def load(item):
    try:
      rgb = read_image(item.path)
    except ValueError as e:
      return item, None, None, str(e)
    return item, rgb, transforms.eval_transform(rgb, scale), None

  with concurrent.futures.ThreadPoolExecutor(max(workers, 1)) as pool:
    pending = collections.deque()
    for item in items:  # keep a bounded window of decodes in flight
      pending.append(pool.submit(load, item))
      if len(pending) > 2 * max(workers, 1) + 2:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


def load_model(config, checkpoint_path: str, which: str = "student", mode: str = ""):
  """``(config, net, variables, predict_fn, load report)`` for ``checkpoint_path``."""
  import jax  # pylint: disable=g-import-not-at-top

  from mfm_jax import evaluate  # pylint: disable=g-import-not-at-top
  from mfm_jax.config import validation
  from mfm_jax.evaluation import inference
  from mfm_jax.trainer import state as state_lib  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  if mode:
    config.eval.mode = mode
  validation.validate(config)
  path = os.path.abspath(os.path.expanduser(checkpoint_path))
  if not os.path.exists(path):
    raise PredictError(f"--checkpoint={checkpoint_path}: {path} does not exist.")
  if os.path.isfile(path) and not path.lower().endswith(evaluate.WEIGHT_FILE_SUFFIXES):
    raise PredictError(f"--checkpoint={checkpoint_path}: a file must be PyTorch weights "
                       f"({', '.join(evaluate.WEIGHT_FILE_SUFFIXES)}); an Orbax checkpoint is "
                       "a directory.")
  net = state_lib.build_network(config)
  report = {}
  variables = evaluate.load_variables(config, net, path, which, report=report)
  variables = jax.device_put(variables)  # once, not with every batch
  hrda = config.model.get("hrda")
  pad = HRDA_PAD_MULTIPLE if hrda is not None and hrda.enabled else 1
  return config, net, variables, inference.make_predict_fn(config, net, pad_multiple=pad), report


def format_load_report(report: dict[str, Any]) -> str:
  """One or two lines: what was loaded, how much, the checksum ``convert`` prints too."""
  line = (f"Loaded {report['which']} weights from {report['checkpoint']} ({report['format']}"
          + (f", {report['tensors_read']} tensors" if "tensors_read" in report else "")
          + f"): {report['param_count']:,} parameters, {report['batch_stats_count']:,} BatchNorm "
          f"statistics; sha256 {report['checksum']['sha256'][:16]}…")
  return "\n".join([line] + [f"  note: {n}" for n in report.get("notes", [])])


def predict(config, checkpoint_path: str, input_spec: str, output_dir: str, *,
            mode: str = "", which: str = "student", batch_size: int = 4,
            num_workers: int = 2, alpha: float = 0.5, stream=None) -> dict[str, Any]:
  """Segments every image of ``input_spec`` into ``output_dir``; returns the summary dict."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from mfm_jax.runtime import progress as progress_lib  # pylint: disable=g-import-not-at-top
  if batch_size < 1:
    raise PredictError(f"--batch_size={batch_size} must be >= 1.")
  output_dir = os.path.abspath(os.path.expanduser(output_dir))
  if os.path.isfile(output_dir):
    raise PredictError(f"--output={output_dir} is a file; give a folder.")
  items = find_inputs(input_spec, exclude=output_dir)
  t0 = time.time()
  config, _, variables, predict_fn, load_report = load_model(config, checkpoint_path, which, mode)
  load_seconds = time.time() - t0
  stream = stream or sys.stderr
  print(format_load_report(load_report), file=stream, flush=True)
  os.makedirs(output_dir, exist_ok=True)
  scale = tuple(config.data.test_scale)
  progress = progress_lib.Progress(len(items), desc="predict", unit="img", stream=stream,
                                   every=max(len(items) // 10, 1))
  buckets: dict[tuple[int, int], list] = collections.defaultdict(list)
  compiled_full: set[tuple[int, int]] = set()
  skipped, sizes, written = [], collections.Counter(), 0
  first_batch = None  # (time, images written) after the first batch, i.e. its compilation

  def run(size, group):
    nonlocal written, first_batch
    x = np.stack([g[2] for g in group])
    if len(group) < batch_size and size in compiled_full:  # reuse the full batch's compilation
      x = np.concatenate([x, np.repeat(x[:1], batch_size - len(group), axis=0)])
    if len(group) == batch_size:
      compiled_full.add(size)
    pred = np.asarray(predict_fn(variables, jnp.asarray(x), size))
    for (item, rgb, _), p in zip(group, pred):
      write_outputs(output_dir, item, rgb, p, alpha)
      written += 1
      sizes[f"{size[1]}x{size[0]}"] += 1
    progress.update(written + len(skipped), skipped=len(skipped))
    if first_batch is None:
      first_batch = (time.time(), written)
      progress.restart_rate()  # the first batch's time is mostly compilation

  for item, rgb, x, error in _prefetch(items, scale, num_workers):
    if error is not None:
      skipped.append({"path": item.path, "error": error})
      progress.message(f"skipped {item.path}: {error}")
      progress.update(written + len(skipped), skipped=len(skipped))
      continue
    size = rgb.shape[:2]
    buckets[size].append((item, rgb, x))
    if len(buckets[size]) == batch_size:
      run(size, buckets.pop(size))
  for size, group in list(buckets.items()):
    run(size, group)
  progress.close()
  t_end = time.time()
  seconds = t_end - t0
  steady = None
  if first_batch is not None and written > first_batch[1] and t_end > first_batch[0]:
    steady = round((written - first_batch[1]) / (t_end - first_batch[0]), 3)
  summary = {
      "input": input_spec, "output": output_dir, "checkpoint": load_report["checkpoint"],
      "which": which, "mode": config.eval.mode, "test_scale": list(scale),
      "num_inputs": len(items), "num_written": written, "num_skipped": len(skipped),
      "skipped": skipped, "sizes": dict(sizes), "seconds": round(seconds, 3),
      "load_seconds": round(load_seconds, 3),
      "images_per_s": round(written / seconds, 3) if seconds > 0 else None,
      "images_per_s_after_first_batch": steady,
  }
  json_io.write_atomic(os.path.join(output_dir, SUMMARY_FILE), summary)
  return summary


def format_summary(summary: dict[str, Any]) -> str:
  """The end-of-run summary: counts, time, rate, and every skipped file with its reason."""
  lines = [f"predict: {summary['num_written']} of {summary['num_inputs']} images segmented "
           f"→ {summary['output']} in {summary['seconds']:.1f} s "
           f"({summary['images_per_s'] or 0:.2f} img/s overall, {summary['load_seconds']:.1f} s "
           "of it loading the model"
           + (f"; {summary['images_per_s_after_first_batch']:.2f} img/s after the first batch, "
              "which compiles"
              if summary["images_per_s_after_first_batch"] else "")
           + f"; sizes {summary['sizes']}); {summary['num_skipped']} skipped"]
  lines += [f"  skipped {s['path']}: {s['error']}" for s in summary["skipped"]]
  return "\n".join(lines)


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    sys.exit(f"predict: unexpected arguments {argv[1:]}")
  from absl import logging  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if not f["verbosity"].present:
    logging.set_verbosity(logging.ERROR)  # keep Orbax's INFO/WARNING lines off the console
  try:
    summary = predict(f.config, f.checkpoint, f.input, f.output, mode=f.mode, which=f.which,
                      batch_size=f.batch_size, num_workers=f.num_workers, alpha=f.alpha)
  except (ValueError, OSError) as e:  # user errors: one message naming the flag or file
    sys.exit(f"predict: error: {e}")
  print(format_summary(summary), flush=True)
  if summary["num_skipped"]:
    sys.exit(1)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Config file[:preset] of the network.",
                                  lock_config=False)
  flags.DEFINE_string("checkpoint", None, "Orbax checkpoint directory, or a PyTorch .pth or "
                      ".safetensors file.")
  flags.DEFINE_string("input", None, "An image, a folder (recursive) or a quoted glob.")
  flags.DEFINE_string("output", None, "Output folder (mirrors the input tree).")
  flags.DEFINE_enum("mode", "", ["", "whole", "slide"], "Inference mode (default: "
                    "config.eval.mode); slide = config.eval.crop_size/stride windows.")
  flags.DEFINE_enum("which", "student", ["student", "teacher"], "Student or EMA-teacher weights.")
  flags.DEFINE_integer("batch_size", 4, "Images of one size segmented together.")
  flags.DEFINE_integer("num_workers", 2, "Threads decoding images ahead.")
  flags.DEFINE_float("alpha", 0.5, "Weight of the colours in the overlay.")
  flags.mark_flags_as_required(["config", "checkpoint", "input", "output"])
  app.run(main)
