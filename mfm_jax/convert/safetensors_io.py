"""Reading and atomic writing of ``.safetensors`` weight files (numpy API, no pickle, no torch).

A safetensors file is a JSON header (names, dtypes, shapes, offsets) followed by raw tensor
bytes, so reading it can never execute code. Hugging Face hub repositories mostly ship
``model.safetensors`` now; ``torch_io.load_checkpoint`` reads them through ``read`` and applies
the same selection (``model.`` / ``ema_model.`` prefixes, SegFormer renames) and the same strict
mapping as for ``.pth`` files. bfloat16 tensors arrive as ``ml_dtypes.bfloat16`` arrays and are
upcast to float32 with a note, as for ``.pth``.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
from typing import Any

import numpy as np

from mfm_jax.runtime import json_io

SUFFIX = ".safetensors"


def is_safetensors(path: str) -> bool:
  """Whether ``path`` names a safetensors file (by its suffix)."""
  return os.fspath(path).lower().endswith(SUFFIX)


def read(path: str) -> dict[str, np.ndarray]:
  """All tensors of ``path`` as numpy arrays; errors are ``TorchCheckpointError`` naming it."""
  from mfm_jax.convert import torch_io  # pylint: disable=g-import-not-at-top  (cycle)
  if not os.path.isfile(path):
    raise torch_io.TorchCheckpointError(f"safetensors file {path} does not exist or is not a "
                                        "file.")
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  try:
    tensors = st_numpy.load_file(path)
  except Exception as e:  # SafetensorError (header, offsets), OSError, unsupported dtype...
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise torch_io.TorchCheckpointError(
        f"Cannot read safetensors file {path} (truncated or corrupt file?): "
        f"{type(e).__name__}: {first}") from None
  if not tensors:
    raise torch_io.TorchCheckpointError(f"{path}: the safetensors file holds no tensors.")
  return dict(tensors)


def save(state_dict: Mapping[str, Any], path: str) -> None:
  """Writes ``state_dict`` (numpy arrays or CPU tensors) to ``path`` atomically.

  Written under a temporary name next to ``path`` and renamed when complete. The metadata
  ``{"format": "pt"}`` lets ``safetensors.torch`` / transformers read the file as PyTorch
  weights.
  """
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top

  from mfm_jax.convert import torch_io  # pylint: disable=g-import-not-at-top
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise torch_io.TorchCheckpointError(f"Output directory {directory} of {path} does not exist.")
  arrays = {k: np.ascontiguousarray(v.numpy() if hasattr(v, "numpy") else v)
            for k, v in state_dict.items()}
  with json_io.atomic_path(path) as tmp:
    st_numpy.save_file(arrays, tmp, metadata={"format": "pt"})
