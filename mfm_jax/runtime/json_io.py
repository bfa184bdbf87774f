"""Strict JSON output: NaN/Inf become ``null`` (bare ``NaN`` is not JSON), files written atomically.

An absent class has no IoU (NaN in the numbers); strict parsers (``jq``, browsers, Go, Rust)
reject Python's default ``NaN`` token, so every JSON file this project writes goes through here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np


def to_strict(obj: Any) -> Any:
  """Copies ``obj`` with non-finite floats replaced by None and numpy scalars made Python."""
  if isinstance(obj, Mapping):
    return {str(k): to_strict(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_strict(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return to_strict(obj.tolist())
  if isinstance(obj, np.generic):
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def dumps(obj: Any, **kwargs) -> str:
  """``json.dumps`` of ``to_strict(obj)`` with ``allow_nan=False``."""
  return json.dumps(to_strict(obj), allow_nan=False, **kwargs)


def write_atomic(path: str, obj: Any) -> None:
  """Writes ``obj`` as strict, indented JSON via a temporary file and a rename."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      f.write(dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
