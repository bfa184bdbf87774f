"""Regenerates the module map of docs/architecture.md from the package tree.

``python docs/make_architecture.py`` rewrites the part of docs/architecture.md between the
``modules:begin`` / ``modules:end`` markers: one table per package, one row per module with the
first line of its docstring. tests/test_layout.py fails when the file is not what this script
writes (a module added, removed, renamed or re-described without regenerating).
"""

from __future__ import annotations

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "architecture.md")
BEGIN, END = "<!-- modules:begin -->", "<!-- modules:end -->"

# What each part of the package is for (the order is the order of the map).
PARTS = {
    "mfm_jax": "Commands (`python -m mfm_jax.<name>`) and the shared numeric ops",
    "mfm_jax/config": "Config: the schema with every default, named fragments, validation",
    "mfm_jax/trainer": "Trainer core: train state, the jitted step, the loop, optimizer, "
                       "checkpoints, device mesh",
    "mfm_jax/models": "Networks (MiT, DAFormer head, ResNet/DeepLab, HRDA, the MFM Rebuilder) "
                      "and the network wrappers the step calls",
    "mfm_jax/uda": "UDA terms: EMA teacher, pseudo-labels, ClassMix, augmentation, MIC masks, "
                   "feature distance, CE, and MFM (mask, Rebuilder call, loss)",
    "mfm_jax/evaluation": "Evaluation: metrics, whole/slide inference, colours and panels",
    "mfm_jax/data": "Data: label maps, dataset preparation (TFDS ArrayRecord), the grain "
                    "pipeline, RCS, the synthetic benchmark",
    "mfm_jax/runtime": "Run-time services: user errors and exit codes, the workdir lock, "
                       "signals, progress, metric files, strict JSON",
    "mfm_jax/convert": "Interop: PyTorch .pth/.safetensors ⇄ Orbax weight conversion",
    "mfm_jax/study": "The MFM study: grids of runs, the resumable runner, tables and figures",
}


def package_modules(root: str = ROOT) -> list[str]:
  """Every module file of the package, relative to the repository root, sorted."""
  out = []
  for dirpath, dirnames, filenames in os.walk(os.path.join(root, "mfm_jax")):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
    for name in sorted(filenames):
      if name.endswith(".py"):
        out.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
  return sorted(out)


def summary(path: str, root: str = ROOT) -> str:
  """First line of a module's docstring (``—`` when it has none)."""
  with open(os.path.join(root, path), encoding="utf-8") as f:
    doc = ast.get_docstring(ast.parse(f.read()))
  return doc.strip().splitlines()[0].replace("|", "\\|") if doc else "—"


def module_map(root: str = ROOT) -> str:
  """The generated Markdown between the markers."""
  modules = package_modules(root)
  unknown = sorted({os.path.dirname(m) for m in modules} - set(PARTS))
  if unknown:
    raise ValueError(f"Packages without a description in PARTS: {unknown}")
  lines = []
  for part, what in PARTS.items():
    rows = [m for m in modules if os.path.dirname(m) == part]
    if not rows:
      continue
    lines += [f"### `{part}/` — {what}", "", "| module | what it holds |", "|---|---|"]
    lines += [f"| `{m}` | {summary(m, root)} |" for m in rows]
    lines.append("")
  return "\n".join(lines).rstrip() + "\n"


def render(text: str, root: str = ROOT) -> str:
  """``text`` (the document) with its module map replaced by the generated one."""
  head, sep, rest = text.partition(BEGIN)
  _, sep2, tail = rest.partition(END)
  if not sep or not sep2:
    raise ValueError(f"{DOC} lacks the {BEGIN} / {END} markers.")
  return f"{head}{BEGIN}\n{module_map(root)}{END}{tail}"


def main() -> int:
  with open(DOC, encoding="utf-8") as f:
    text = f.read()
  new = render(text)
  if new != text:
    with open(DOC, "w", encoding="utf-8") as f:
      f.write(new)
    print(f"Rewrote the module map of {DOC}.")
  else:
    print(f"{DOC} is up to date.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
