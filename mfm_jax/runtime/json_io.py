"""Strict JSON output: NaN/Inf become ``null`` (bare ``NaN`` is not JSON), files written atomically.

An absent class has no IoU (NaN in the numbers); strict parsers (``jq``, browsers, Go, Rust)
reject Python's default ``NaN`` token, so every JSON file this project writes goes through here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import contextlib
import json
import math
import os
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


@contextlib.contextmanager
def atomic_path(path: str, hidden: bool = False) -> Iterator[str]:
  """Yields a temporary path beside ``path``; after the block it is renamed to ``path``
  (readers never see a half-written file). On an error it is removed and ``path`` is left as it
  was. ``hidden`` names the temporary file with a leading dot (folders users browse)."""
  folder, name = os.path.split(path)
  tmp = os.path.join(folder, f"{'.' if hidden else ''}{name}.tmp-{os.getpid()}")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_atomic(path: str, obj: Any) -> None:
  """Writes ``obj`` as strict, indented JSON via a temporary file and a rename."""
  with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write(dumps(obj, indent=2, sort_keys=True))
