"""Converter entry points: PyTorch ``.pth`` / ``.safetensors`` ⇄ Orbax checkpoint.

The Orbax checkpoint holds ``{'params': {'model': <segmentor params>}, 'batch_stats': <BN
statistics>}``, the same sub-trees as a training state, so ``config.init_from`` reads it through
``mfm_jax.trainer.checkpoint.load_params(path, ('params', 'model'))`` (``config.init_scope='backbone'``
for ImageNet encoders, which are stored as ``{'model': {'backbone': ...}}``).
Both directions write atomically: Orbax finalises its directory by a rename, and ``.pth`` /
``.safetensors`` files go through a temporary name, so a failed run leaves no partial output.
Both file formats go through the same selection, strict mapping and load report.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from mfm_jax.convert import mapping
from mfm_jax.convert import rebuilder_mapping
from mfm_jax.convert import safetensors_io
from mfm_jax.convert import torch_io


def _count(tree: Any) -> int:
  return mapping.summarize(tree)["values"] if tree else 0


def _check_output(path: str, overwrite: bool) -> None:
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"Output {path} already exists; pass --overwrite to replace it.")


def convert_to_orbax(input_path: str, output_dir: str, arch: str = "auto",
                     which: str = "student", overwrite: bool = False) -> dict[str, Any]:
  """Reads ``input_path`` (.pth or .safetensors), converts strictly, saves an Orbax checkpoint.

  Returns a report dict: arch, tensors read, arrays/values written, checksum, notes.
  """
  output_dir = os.path.abspath(output_dir)
  _check_output(output_dir, overwrite)
  if arch in rebuilder_mapping.ARCHS:
    return _rebuilder_to_orbax(input_path, output_dir, arch, overwrite)
  ckpt = torch_io.load_checkpoint(input_path, which)
  arch = mapping.detect_arch(ckpt.state_dict) if arch == "auto" else arch
  variables = mapping.torch_to_flax(ckpt.state_dict, arch)
  params, bstats = variables["params"], variables["batch_stats"]
  if arch in mapping.BACKBONE_ARCHS:  # An ImageNet encoder: load with init_scope='backbone'.
    params, bstats = {"backbone": params}, ({"backbone": bstats} if bstats else {})
  tree = {"params": {"model": params}, "batch_stats": bstats}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(output_dir, tree, force=overwrite)
  return {"input": input_path, "output": output_dir, "arch": arch, "which": which,
          "tensors_read": len(ckpt.state_dict),
          "buffers_dropped": sum(k.endswith("num_batches_tracked") for k in ckpt.state_dict),
          "param_arrays": mapping.summarize(params)["arrays"], "param_count": _count(params),
          "batch_stats_count": _count(bstats), "checksum": mapping.summarize(variables),
          "notes": ckpt.notes}


def _rebuilder_to_orbax(input_path: str, output_dir: str, arch: str, overwrite: bool
                        ) -> dict[str, Any]:
  """The released MFM Rebuilder (bare, or inside a whole training checkpoint) → Orbax."""
  if safetensors_io.is_safetensors(input_path):
    sd = safetensors_io.read(input_path)
  else:
    sd = rebuilder_mapping.unwrap(torch_io.read_pth(input_path), input_path)
  out = rebuilder_mapping.convert_to_orbax(sd, output_dir, arch, overwrite)
  params = out["params"]
  return {"input": input_path, "output": output_dir, "arch": arch, "which": "rebuilder",
          "tensors_read": len(sd), "buffers_dropped": 0,
          "param_arrays": mapping.summarize(params)["arrays"], "param_count": _count(params),
          "batch_stats_count": 0, "checksum": mapping.summarize({"params": params}),
          "notes": out["notes"]}


def export_to_torch(input_dir: str, output_path: str, arch: str = "auto",
                    which: str = "student", prefix: str = "",
                    overwrite: bool = False, grid: int = 16) -> dict[str, Any]:
  """Orbax checkpoint (converted, or a training checkpoint) → reference-named ``.pth``.

  An ``output_path`` ending in ``.safetensors`` is written in that format instead.

  ``which='teacher'`` exports a training checkpoint's EMA weights. A backbone ``arch``
  ('mit_b5', 'resnet', ...) exports only the encoder, with SegFormer/mmcv-native names.
  """
  from mfm_jax.trainer import checkpoint  # pylint: disable=g-import-not-at-top
  _check_output(output_path, overwrite)
  if arch in rebuilder_mapping.ARCHS:
    params = checkpoint.load_params(input_dir, subtree=("params", "rebuilder"))
    sd = {prefix + k: v for k, v in rebuilder_mapping.flax_to_torch(params, arch, grid).items()}
    if safetensors_io.is_safetensors(output_path):
      safetensors_io.save(sd, output_path)
    else:
      torch_io.save_state_dict(sd, output_path)
    return {"input": input_dir, "output": output_path, "arch": arch, "which": "rebuilder",
            "tensors_written": len(sd), "param_count": _count(params), "batch_stats_count": 0,
            "checksum": mapping.summarize({"params": params}),
            "notes": [f"{rebuilder_mapping._POS_EMBED} written for a {grid}x{grid} grid"]}  # pylint: disable=protected-access
  if which not in ("student", "teacher"):
    raise ValueError(f"which={which!r}: an Orbax checkpoint holds 'student' or 'teacher' weights.")
  subtrees = ((("params", "model"), ("batch_stats",)) if which == "student"
              else (("ema_params",), ("ema_batch_stats",)))
  params = checkpoint.load_params(input_dir, subtree=subtrees[0])
  try:
    bstats = checkpoint.load_params(input_dir, subtree=subtrees[1])
  except checkpoint.CheckpointError:
    bstats = {}  # MiT encoders have no BatchNorm; a missing tree is caught by the strict check.
  notes = []
  names = mapping.flax_to_torch({"params": params, "batch_stats": bstats}, check=False)
  guess = mapping.detect_arch(names) if arch == "auto" else arch
  if guess in mapping.BACKBONE_ARCHS and "backbone" in params:
    if set(params) != {"backbone"}:
      notes.append(f"exported only the backbone; ignored {sorted(set(params) - {'backbone'})}")
    params, bstats = params["backbone"], (bstats or {}).get("backbone", {})
  sd = mapping.flax_to_torch({"params": params, "batch_stats": bstats}, guess, prefix=prefix)
  if safetensors_io.is_safetensors(output_path):
    safetensors_io.save(sd, output_path)
  else:
    torch_io.save_state_dict(sd, output_path)
  return {"input": input_dir, "output": output_path, "arch": guess, "which": which,
          "tensors_written": len(sd), "param_count": _count(params),
          "batch_stats_count": _count(bstats),
          "checksum": mapping.summarize({"params": params, "batch_stats": bstats}),
          "notes": notes}


def format_report(report: dict[str, Any]) -> str:
  """Human-readable multi-line load report."""
  lines = [f"{report['input']} → {report['output']} (arch={report['arch']}, "
           f"which={report['which']})"]
  if "tensors_read" in report:
    lines.append(f"  tensors read: {report['tensors_read']} "
                 f"({report['buffers_dropped']} num_batches_tracked dropped); parameter arrays "
                 f"written: {report['param_arrays']}")
  else:
    lines.append(f"  tensors written: {report['tensors_written']} "
                 "(incl. num_batches_tracked = 0 per BatchNorm)")
  lines.append(f"  parameters: {report['param_count']:,}; BatchNorm statistics: "
               f"{report['batch_stats_count']:,}")
  c = report["checksum"]
  lines.append(f"  checksum: sum|x| = {c['sum_abs']:.6e}, sha256 = {c['sha256']}")
  lines += [f"  note: {n}" for n in report["notes"]]
  return "\n".join(lines)
