r"""Checkpoint evaluation: ``python -m mfm_jax.evaluate --config=CFG --checkpoint=PATH``.

PATH is an Orbax checkpoint (a training workdir's ``checkpoints/`` root → newest step, one step
directory, or the output of ``python -m mfm_jax.convert``), a PyTorch ``.pth`` of the
reference code (DAFormer / HRDA / MIC runs; read without executing pickled code) or the same
state_dict as ``.safetensors``. Prints the
per-class IoU table with mIoU over 19 classes and the SYNTHIA 16/13-class protocols, and writes
it as JSON next to the checkpoint (``<PATH>.eval_<which>_<mode>.json``).

Inference follows ``config.eval`` ('whole' at ``config.data.test_scale`` or 'slide' with
``config.eval.crop_size`` / ``stride``), student (the reference's choice) or EMA teacher.
The JSON is strict (absent classes are ``null``, not ``NaN``). User errors (config, missing
data, an unreadable or mismatching checkpoint) print one line and exit 1 (``--verbose``: with
the traceback).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections

from mfm_jax.config import validation
from mfm_jax.data import pipeline
from mfm_jax.evaluation import inference
from mfm_jax.evaluation.metrics import format_report
from mfm_jax.runtime import errors
from mfm_jax.runtime import json_io
from mfm_jax.trainer import checkpoint
from mfm_jax.trainer import state as state_lib

# PyTorch-layout weight files; anything else must be an Orbax checkpoint directory.
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def torch_arch(config: ml_collections.ConfigDict) -> str:
  """The converter architecture name of ``config``'s segmentor."""
  if config.model.hrda.enabled:
    return "hrda"
  head = config.model.head
  if head.startswith("daformer"):
    return "daformer"
  return "dlv3p" if head == "dlv3p" else "dlv2"


def load_variables(config: ml_collections.ConfigDict, net, path: str,
                   which: str = "student", report: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
  """Segmentor variables from an Orbax directory or a ``.pth`` / ``.safetensors`` file.

  Every parameter must be filled and every tensor used (errors list the names). A ``report``
  dict is filled with what was loaded (format, tensors read, notes, counts, checksum), the
  figures ``convert`` prints.
  """
  shapes = state_lib.abstract_variables(config, net)
  target = {"params": shapes["params"]["model"], "batch_stats": shapes["batch_stats"]}
  info = {"checkpoint": path, "which": which, "notes": []}
  if path.lower().endswith(WEIGHT_FILE_SUFFIXES):
    from mfm_jax.convert import mapping  # pylint: disable=g-import-not-at-top
    from mfm_jax.convert import torch_io
    ckpt = torch_io.load_checkpoint(path, which=which)
    loaded = mapping.torch_to_flax(ckpt.state_dict, torch_arch(config))
    params, bstats = loaded["params"], loaded.get("batch_stats", {})
    info.update(format=os.path.splitext(path)[1].lstrip(".").lower(),
                tensors_read=len(ckpt.state_dict), notes=ckpt.notes)
  else:
    info["format"] = "orbax"
    if which == "teacher":
      params = checkpoint.load_params(path, subtree=("ema_params",))
      bstats = checkpoint.load_params(path, subtree=("ema_batch_stats",))
    else:
      params = checkpoint.load_params(path, subtree=("params", "model"))
      bstats = (checkpoint.load_params(path, subtree=("batch_stats",))
                if target["batch_stats"] else {})
  out = {"params": state_lib.merge_strict(target["params"], params, f"parameters from {path}")}
  out["batch_stats"] = (state_lib.merge_strict(target["batch_stats"], bstats,
                                               f"BatchNorm statistics from {path}")
                        if target["batch_stats"] else {})
  if report is not None:
    from mfm_jax.convert import mapping  # pylint: disable=g-import-not-at-top
    info.update(param_count=mapping.summarize(out["params"])["values"],
                batch_stats_count=mapping.summarize(out["batch_stats"])["values"]
                if out["batch_stats"] else 0, checksum=mapping.summarize(out))
    report.update(info)
  return out


def evaluate_checkpoint(config: ml_collections.ConfigDict, path: str,
                        which: str = "student", output: str | None = None) -> dict[str, Any]:
  """Evaluates ``path`` on ``config.data``'s target evaluation split; returns the report."""
  validation.validate(config)
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise checkpoint.CheckpointError(f"Checkpoint {path} does not exist.")
  net = state_lib.build_network(config)
  batches = pipeline.make_eval_dataset(config.data, process_index=jax.process_index(),
                                       process_count=jax.process_count())
  variables = load_variables(config, net, path, which)
  report = inference.evaluate(config, net, variables, batches)
  report.update(checkpoint=path, which=which, mode=config.eval.mode)
  output = output or f"{path.rstrip(os.sep)}.eval_{which}_{config.eval.mode}.json"
  if jax.process_index() == 0:
    json_io.write_atomic(output, report)
    print(format_report(report), flush=True)
    print(f"Wrote {output}", flush=True)
  return report


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  evaluate_checkpoint(f.config, f.checkpoint, f.which, f.output or None)


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Config file[:preset].", lock_config=True)
  flags.DEFINE_string("checkpoint", None,
                      "Orbax checkpoint directory, or a PyTorch .pth / .safetensors file.")
  flags.DEFINE_enum("which", "student", ["student", "teacher"], "Student or EMA-teacher weights.")
  flags.DEFINE_string("output", "", "JSON output path (default: next to the checkpoint).")
  flags.mark_flags_as_required(["config", "checkpoint"])
  errors.run(main)
