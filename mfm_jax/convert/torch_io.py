"""Safe reading and atomic writing of PyTorch ``.pth`` checkpoints (torch is imported lazily).

``load_checkpoint`` also reads ``.safetensors`` files (``safetensors_io``, no torch needed) and
applies the same selection and notes to them.

Files are read with ``torch.load(..., weights_only=True)``: the unpickler only rebuilds tensors,
containers and a short list of data-only numpy types, so a pickle that would run code is refused
before anything executes. Accepted layouts (uda_reference.md §1.5 and §5):

* a bare segmentor state_dict (``backbone.*``, ``decode_head.*``);
* an mmcv checkpoint ``{'meta', 'state_dict', 'optimizer'}`` (only ``state_dict`` is used) or a
  ``{'model': state_dict}`` container;
* the UDA wrapper's keys ``model.*`` (student), ``ema_model.*`` (EMA teacher) and
  ``imnet_model.*`` (frozen ImageNet copy), chosen with ``which``; a leading ``module.``
  (DataParallel) is stripped first;
* a SegFormer ImageNet file (``mit_b5.pth``: MiT keys without ``backbone.``); its ImageNet
  classifier ``head.*``, if present, is dropped with a note;
* a Hugging Face SegFormer file (``pytorch_model.bin`` of e.g. ``nvidia/mit-b5``; transformers
  4.x or 5.x names): the encoder is renamed to the reference MiT names, its ``classifier.*`` /
  ``decode_head.*`` are dropped with a note.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import sys
from typing import Any, Mapping

import numpy as np

from mfm_jax.runtime import errors
from mfm_jax.runtime import json_io

# UDA wrapper prefixes (uda_reference.md §1.5): DACS holds the student, the EMA teacher and the
# frozen ImageNet model (feature distance) side by side.
WHICH_PREFIX = {"student": "model.", "teacher": "ema_model.", "imnet": "imnet_model."}


class TorchCheckpointError(errors.UserError, ValueError):
  """A ``.pth`` file is missing, unreadable, corrupt or does not hold a usable state_dict."""


class UnsafeCheckpointError(TorchCheckpointError):
  """A ``.pth`` file holds pickled objects other than tensors/containers; it was not loaded."""


@dataclasses.dataclass
class TorchCheckpoint:
  """A selected state_dict as host numpy arrays, plus what was done to get it."""
  state_dict: dict[str, np.ndarray]
  notes: list[str]


def _safe_numpy_globals() -> list[Any]:
  # mmcv's ``meta`` / ``optimizer`` entries may hold numpy scalars or arrays. These globals only
  # rebuild plain data (an ndarray or scalar from its bytes), never call user code.
  import numpy._core.multiarray as multiarray  # pylint: disable=g-import-not-at-top
  return [np.ndarray, np.dtype, multiarray.scalar, multiarray._reconstruct,  # pylint: disable=protected-access
          *{type(np.dtype(c)) for c in "?bhilqBHILQefdg"}]


def read_pth(path: str) -> Any:
  """``torch.load(path, map_location='cpu', weights_only=True)`` with errors naming ``path``."""
  import torch  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise TorchCheckpointError(f"PyTorch checkpoint {path} does not exist or is not a file.")
  try:
    with torch.serialization.safe_globals(_safe_numpy_globals()):
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    # torch's restricted unpickler says "Weights only load failed" and names the refused
    # global ("Unsupported global: GLOBAL x.y", or "unsupported GLOBAL posix.system whose
    # module posix is blocked" in zip-format files); surface that reason.
    lines = [line.strip() for line in str(e).splitlines()]
    reason = next((line for line in lines if "nsupported global" in line.lower()
                   or "is blocked" in line), "")
    if reason or "Weights only load failed" in str(e):
      reason = (reason.split(" was not an allowed")[0].replace("WeightsUnpickler error: ", "")
                .replace("Trying to load ", "").rstrip("."))
      raise UnsafeCheckpointError(
          f"Refusing to load {path}: it pickles something other than tensors and plain "
          f"containers ({reason or 'torch: Weights only load failed'}), and unpickling it "
          "could execute code; nothing was executed. If the file comes from a trusted source, "
          "re-save only the weights (torch.save(model.state_dict(), ...))"
          + ("" if reason else "; a truncated legacy-format file can also cause this")
          + ".") from None
    raise TorchCheckpointError(f"Cannot read PyTorch checkpoint {path} (truncated or corrupt "
                               f"file?): {str(e).strip().splitlines()[-1]}") from None
  except Exception as e:  # torch raises RuntimeError/EOFError/KeyError/... for damaged files.
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise TorchCheckpointError(f"Cannot read PyTorch checkpoint {path} (truncated or corrupt "
                               f"file?): {type(e).__name__}: {first}") from None


def _is_array(value: Any) -> bool:
  """A torch tensor (only if torch is loaded: a safetensors read never imports it) or ndarray."""
  if isinstance(value, np.ndarray):
    return True
  torch = sys.modules.get("torch")
  return torch is not None and isinstance(value, torch.Tensor)


def _is_tensor_dict(obj: Any) -> bool:
  return (isinstance(obj, Mapping) and bool(obj)
          and all(isinstance(k, str) and _is_array(v) for k, v in obj.items()))


def _to_numpy(name: str, tensor: Any, path: str, notes: list[str]) -> np.ndarray:
  if isinstance(tensor, np.ndarray):  # from a safetensors file
    if tensor.dtype.name in ("float16", "bfloat16"):
      notes.append(f"{name}: {tensor.dtype} upcast to float32")
      return tensor.astype(np.float32)
    return tensor
  import torch  # pylint: disable=g-import-not-at-top
  tensor = tensor.detach().cpu()
  if tensor.dtype in (torch.bfloat16, torch.float16):
    notes.append(f"{name}: {tensor.dtype} upcast to float32")
    tensor = tensor.float()
  try:
    return tensor.numpy().copy()
  except TypeError as e:
    raise TorchCheckpointError(f"{path}: tensor {name!r} has unsupported dtype "
                               f"{tensor.dtype}: {e}") from None


def select_state_dict(obj: Any, which: str = "student", path: str = "<checkpoint>",
                      ) -> tuple[dict[str, Any], list[str]]:
  """Unwraps a loaded checkpoint object to the state_dict of one network.

  Args:
    obj: what ``torch.load`` returned.
    which: 'student' (``model.``), 'teacher' (``ema_model.``) or 'imnet' (``imnet_model.``) for
      UDA-wrapper checkpoints; a bare segmentor/backbone state_dict is only valid as 'student'.
    path: used in messages.

  Returns:
    (state_dict with the prefix removed, notes about what was ignored).
  """
  if which not in WHICH_PREFIX:
    raise TorchCheckpointError(f"which={which!r}: choose one of {list(WHICH_PREFIX)}.")
  notes = []
  if isinstance(obj, Mapping) and not _is_tensor_dict(obj):
    for container in ("state_dict", "model"):
      if container in obj and _is_tensor_dict(obj[container]):
        ignored = sorted(str(k) for k in obj if k != container)
        notes.append(f"used the '{container}' entry" +
                     (f"; ignored {ignored}" if ignored else ""))
        obj = obj[container]
        break
  if not _is_tensor_dict(obj):
    top = sorted(map(str, obj))[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise TorchCheckpointError(
        f"{path}: no state_dict found: expected a dict of tensors, or a dict with a "
        f"'state_dict' or 'model' entry holding one; top level is {top}.")
  sd = dict(obj)
  if all(k.startswith("module.") for k in sd):  # DataParallel / DistributedDataParallel
    sd = {k[len("module."):]: v for k, v in sd.items()}
    notes.append("stripped the 'module.' prefix")
  present = {w: p for w, p in WHICH_PREFIX.items() if any(k.startswith(p) for k in sd)}
  if present:
    prefix = WHICH_PREFIX[which]
    if which not in present:
      raise TorchCheckpointError(
          f"{path}: which={which!r} needs keys starting with {prefix!r}, but this UDA "
          f"checkpoint only has {[WHICH_PREFIX[w] for w in present]} (choose which from "
          f"{sorted(present)}).")
    others = [k for k in sd if not k.startswith(prefix)]
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    notes.append(f"selected {which} weights ({prefix}*, {len(sd)} tensors); ignored "
                 f"{len(others)} other tensors")
  elif which != "student":
    raise TorchCheckpointError(
        f"{path}: which={which!r} needs a UDA checkpoint with {WHICH_PREFIX[which]!r} keys; "
        "this file holds a single network (use which='student').")
  is_segformer = (any(k.startswith("patch_embed1.") for k in sd)
                  and not any(k.startswith("backbone.") for k in sd))
  head = sorted(k for k in sd if k.startswith("head."))
  if is_segformer and head:
    # SegFormer ImageNet release (mit_b5.pth): the classifier is not part of the encoder.
    for k in head:
      del sd[k]
    notes.append(f"dropped the ImageNet classifier {head} of the SegFormer backbone file")
  return sd, notes


_HF_ENCODER = re.compile(r"(segformer\.)?(encoder\.(block|patch_embeddings|layer_norm)\.|"
                         r"stages\.\d+\.)")


def _from_hf_segformer(sd: dict[str, np.ndarray], notes: list[str]) -> dict[str, np.ndarray]:
  """Hugging Face SegFormer names → reference MiT names (other state_dicts pass through)."""
  encoder = [k for k in sd if _HF_ENCODER.match(k)]
  if not encoder:
    return sd
  from mfm_jax.convert import hf_segformer  # pylint: disable=g-import-not-at-top
  heads = sorted(k for k in sd if k not in encoder
                 and k.startswith(("classifier.", "decode_head.")))
  out = hf_segformer.hf_segformer_to_reference({k: v for k, v in sd.items() if k not in heads})
  notes.append(f"mapped {len(encoder)} Hugging Face SegFormer encoder tensors to reference MiT "
               "names" + (f"; dropped its heads {heads}" if heads else ""))
  return out


def load_checkpoint(path: str, which: str = "student") -> TorchCheckpoint:
  """Reads ``path`` (.pth or .safetensors) safely; returns the selected network's tensors."""
  from mfm_jax.convert import safetensors_io  # pylint: disable=g-import-not-at-top
  obj = safetensors_io.read(path) if safetensors_io.is_safetensors(path) else read_pth(path)
  sd, notes = select_state_dict(obj, which, path)
  arrays = {k: _to_numpy(k, v, path, notes) for k, v in sd.items()}
  arrays = _from_hf_segformer(arrays, notes)  # after _to_numpy: fp16/bf16 files are upcast
  return TorchCheckpoint(arrays, notes)


def load_state_dict(path: str, which: str = "student") -> dict[str, np.ndarray]:
  """Like ``load_checkpoint`` but returns only the state_dict (numpy arrays by torch name)."""
  return load_checkpoint(path, which).state_dict


def save_state_dict(state_dict: Mapping[str, Any], path: str) -> None:
  """Writes ``state_dict`` (numpy arrays or tensors) with ``torch.save``, atomically.

  The file is written next to ``path`` under a temporary name and renamed only when complete,
  so an error never leaves a half-written ``path``.
  """
  import torch  # pylint: disable=g-import-not-at-top
  tensors = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))
             for k, v in state_dict.items()}
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise TorchCheckpointError(f"Output directory {directory} of {path} does not exist.")
  with json_io.atomic_path(path) as tmp:
    torch.save(tensors, tmp)
