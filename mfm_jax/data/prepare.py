r"""Prepares raw datasets as TFDS ArrayRecord datasets (no TensorFlow needed).

  python -m mfm_jax.data.prepare --dataset=gta5 --raw_dir=data/gta --data_dir=~/tfds
  python -m mfm_jax.data.prepare --dataset=cityscapes --raw_dir=data/cityscapes \
      --data_dir=~/tfds --scale=1024x512
  python -m mfm_jax.data.prepare --dataset=folder --raw_dir=my_data --data_dir=~/tfds \
      --label_map=my_data/label_map.json
  python -m mfm_jax.data.prepare --dataset=synthetic --data_dir=~/tfds [--raw_dir=DIR]

Raw layouts are listed in ``mfm_jax/data/raw_files.py``. ``--scale=WxH`` stores a keep-ratio
pre-resized copy next to the full-resolution one (smaller, faster to load, fixed scale).
``synthetic`` generates the procedural benchmark (``--synthetic_*`` flags) and prepares its
gta5 and cityscapes datasets under ``<data_dir>/synthetic/<key>``, exactly as training's
``data.source=synthetic_source`` does.

Rejected, naming the file (exit 1, one line; ``--verbose`` adds the traceback): missing
folders, empty splits, images without labels, corrupt files, labels of the wrong size or with
unknown ids, JPEG data in a label file (lossy: class ids change along edges) and colour labels
(``--rgb_labels=first_channel`` reads the class id from the R channel instead). TFDS
``incomplete.*`` folders left by a killed prepare are deleted by the next one.
"""

from __future__ import annotations

import os
import time

from absl import app
from absl import flags

from mfm_jax.runtime import errors

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when it runs, so modules can be imported together)."""
  flags.DEFINE_enum("dataset", None,
                    ["gta5", "synthia", "cityscapes", "folder", "synthetic"],
                    "Raw dataset layout to prepare.")
  flags.DEFINE_string("raw_dir", "", "Folder holding the raw layout (for synthetic: "
                      "where raw files are generated; default <data_dir>/raw).")
  flags.DEFINE_string("data_dir", None, "TFDS data dir to write to.")
  flags.DEFINE_string("scale", "", "Optional WxH keep-ratio pre-resize, e.g. 1280x720.")
  flags.DEFINE_string("label_map", "", "folder only: JSON {label id: train id}.")
  flags.DEFINE_enum(
      "rgb_labels", "reject", ["reject", "first_channel"],
      "Colour (RGB/RGBA) label files: 'reject' them (default; grey images stored as RGB pass) or "
      "read the class id from the 'first_channel' (R). SYNTHIA labels are always read from R.")
  flags.DEFINE_integer("num_workers", os.cpu_count() or 1,
                       "Processes decoding and validating raw files.")
  flags.DEFINE_integer("synthetic_seed", None,
                       "synthetic: seed (default: config.data.synthetic.seed).")
  flags.DEFINE_list("synthetic_counts", None,
                    "synthetic: num_source,num_target,num_val (default: "
                    "config.data.synthetic.num_*).")
  flags.DEFINE_string("synthetic_size", None, "synthetic: WxH (default: "
                      "config.data.synthetic.width x height).")
  flags.DEFINE_float("synthetic_shift", None, "synthetic: domain-shift strength "
                     "(default: config.data.synthetic.shift).")


def parse_scale(text: str, flag: str = "scale") -> tuple[int, int] | None:
  """'1280x720' → (1280, 720); '' → None. Errors name ``--<flag>``."""
  if not text:
    return None
  try:
    w, h = (int(v) for v in text.lower().split("x"))
  except ValueError as e:
    raise app.UsageError(f"--{flag} must look like 1280x720, got {text!r}.") from e
  if w <= 0 or h <= 0:
    raise app.UsageError(f"--{flag} must be positive, got {text!r}.")
  return w, h


def _summary(dataset: str, path: str) -> str:
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(path, "dataset_info.json")) as f:
    info = json.load(f)
  counts = ", ".join(f"{s['name']}: {sum(int(n) for n in s.get('shardLengths', []))}"
                     for s in info.get("splits", []))
  return f"{dataset}: {counts} images → {path}"


def main(argv):
  del argv
  # Imported here, not at the top: spawned prepare workers re-import this module as
  # __mp_main__ and should load only raw_files (no TFDS, no JAX; tested).
  from mfm_jax.data import builders  # pylint: disable=g-import-not-at-top
  data_dir = os.path.abspath(os.path.expanduser(FLAGS.data_dir))
  start = time.time()
  if FLAGS.dataset == "synthetic":
    from mfm_jax.config import base  # pylint: disable=g-import-not-at-top
    from mfm_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    cfg = base.base_config().data
    cfg.data_dir, cfg.raw_dir = data_dir, FLAGS.raw_dir
    s = cfg.synthetic
    if FLAGS.synthetic_seed is not None:
      s.seed = FLAGS.synthetic_seed
    if FLAGS.synthetic_counts is not None:
      counts = FLAGS.synthetic_counts
      try:
        s.num_source, s.num_target, s.num_val = (int(v) for v in counts)
      except ValueError as e:
        raise app.UsageError("--synthetic_counts must be three ints num_source,num_target,"
                             f"num_val, got {','.join(counts)!r}.") from e
    if FLAGS.synthetic_size is not None:
      s.width, s.height = parse_scale(FLAGS.synthetic_size, "synthetic_size")
    if FLAGS.synthetic_shift is not None:
      s.shift = FLAGS.synthetic_shift
    out = synthetic.ensure_synthetic(cfg)
    lines = [_summary(d, builders.dataset_path(d, out)) for d in ("gta5", "cityscapes")]
  else:
    if not FLAGS.raw_dir:
      raise app.UsageError(f"--raw_dir is required for --dataset={FLAGS.dataset}.")
    path = builders.prepare(FLAGS.dataset, os.path.expanduser(FLAGS.raw_dir), data_dir,
                            scale=parse_scale(FLAGS.scale), label_map=FLAGS.label_map or None,
                            num_workers=FLAGS.num_workers, rgb_labels=FLAGS.rgb_labels)
    lines = [_summary(FLAGS.dataset, path)]
  for line in lines:
    print(line)
  print(f"done in {time.time() - start:.1f} s")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["dataset", "data_dir"])
  errors.run(main)
