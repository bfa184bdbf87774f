"""The study's figures (matplotlib, PNG, Agg backend: no display needed).

* ``methods.png``: mIoU per row, mean ± std over seeds, every seed as a dot;
* ``sweep.png``: mIoU vs the swept value (mask ratio), mean ± std, with the host without MFM
  as a band;
* ``curves.png``: learning curves from each run's ``metrics.jsonl`` (``train.py``'s format: one
  JSON object per logging step), target mIoU, every ``loss/*`` term and the pseudo-label
  weight, one colour per row, mean over seeds (each seed thin).
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

from mfm_jax.study import grids  # noqa: E402  pylint: disable=g-import-not-at-top
from mfm_jax.study import results
from mfm_jax.study import runner

MIOU_KEY = "eval/mIoU"
PSEUDO_KEY = "pseudo_weight"


def _colours(n: int):
  cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
  return [cmap(i % cmap.N) for i in range(n)]


def plot_methods(records: Sequence[dict[str, Any]], path: str, title: str = "") -> str:
  """Horizontal mean ± std bars per row; dots are the single seeds."""
  rows = results.summarize(records)
  fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
  for i, (row, colour) in enumerate(zip(rows, _colours(len(rows)))):
    y = len(rows) - 1 - i
    if row["n"]:
      std = 0.0 if math.isnan(row["std"]) else row["std"]
      ax.barh(y, row["mean"], xerr=std, color=colour, alpha=0.55, capsize=3)
      ax.plot(list(row["by_seed"].values()), [y] * row["n"], "o", color="black", ms=3)
      ax.text(row["mean"] + std + 0.5, y, f"{row['mean']:.1f}", va="center", fontsize=8)
  ax.set_yticks(range(len(rows)))
  ax.set_yticklabels([f"{r['method']} (n={r['n']})" for r in reversed(rows)], fontsize=8)
  ax.set_xlabel("target val mIoU (%)")
  ax.set_title(title or "mIoU, mean ± std over seeds", fontsize=10)
  ax.grid(axis="x", alpha=0.3)
  return _save(fig, path)


def plot_sweep(records: Sequence[dict[str, Any]], runs: Sequence[grids.Run], path: str
               ) -> str | None:
  """mIoU vs the swept value (rows with ``sweep``); None if the study has no sweep."""
  swept = [r.row for r in runs if r.row.sweep is not None]
  if not swept:
    return None
  axis = swept[0].sweep[0]
  by_label = {row["method"]: row for row in results.summarize(records)}
  xs, means, stds = [], [], []
  for row in dict.fromkeys(swept):  # unique, in order
    s = by_label.get(row.label)
    if s and s["n"]:
      xs.append(row.sweep[1])
      means.append(s["mean"])
      stds.append(0.0 if math.isnan(s["std"]) else s["std"])
  fig, ax = plt.subplots(figsize=(5, 3.5))
  order = np.argsort(xs)
  x, m, sd = (np.asarray(a, np.float64)[order] for a in (xs, means, stds))
  baseline = next((row.baseline for row in swept if row.baseline), None)
  ax.errorbar(x, m, yerr=sd, marker="o", capsize=3,
              label=f"{baseline}+MFM" if baseline else "mIoU")
  base = by_label.get(baseline)
  if base and base["n"]:
    bstd = 0.0 if math.isnan(base["std"]) else base["std"]
    ax.axhline(base["mean"], color="grey", ls="--", label=f"{baseline} (no MFM)")
    ax.axhspan(base["mean"] - bstd, base["mean"] + bstd, color="grey", alpha=0.15)
  ax.set_xlabel(axis)
  ax.set_ylabel("target val mIoU (%)")
  ax.set_title(f"mIoU vs {axis} (mean ± std over seeds)", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def curves(rdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{metric: (steps, values)} of one run's ``metrics.jsonl``."""
  by_step = runner.read_metrics(os.path.join(rdir, "metrics.jsonl"))
  out: dict[str, tuple[list[int], list[float]]] = {}
  for step in sorted(by_step):
    for key, value in by_step[step].items():
      if value is None:  # a non-finite value (strict JSON null)
        continue
      xs, ys = out.setdefault(key, ([], []))
      xs.append(step)
      ys.append(float(value))
  return {k: (np.asarray(x), np.asarray(y)) for k, (x, y) in out.items()}


def curve_keys(all_curves: Sequence[dict[str, Any]]) -> list[str]:
  """Target mIoU first, then every loss term (``loss/*``, the total last), then the
  pseudo-label weight (it scales the target losses, MFM's included)."""
  keys = sorted({k for c in all_curves for k in c if k.startswith("loss/")})
  keys.sort(key=lambda k: k == "loss/total")
  first = [MIOU_KEY] if any(MIOU_KEY in c for c in all_curves) else []
  last = [PSEUDO_KEY] if any(PSEUDO_KEY in c for c in all_curves) else []
  return first + keys + last


def plot_curves(runs: Sequence[grids.Run], workdir: str, path: str, smooth: int = 5
                ) -> str | None:
  """One panel per metric; per row the mean over its seeds (thick) and every seed (thin).

  Loss terms are smoothed with a running mean over ``smooth`` logged points.
  """
  data = [(run, curves(runner.run_dir(workdir, run))) for run in runs]
  data = [(run, c) for run, c in data if c]
  if not data:
    return None
  keys = curve_keys([c for _, c in data])
  labels = list(dict.fromkeys(run.row.label for run, _ in data))
  colour = dict(zip(labels, _colours(len(labels))))
  cols = min(3, len(keys))
  nrows = math.ceil(len(keys) / cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
  for ax, key in zip(axes.flat, keys):
    for label in labels:
      series = [c[key] for run, c in data if run.row.label == label and key in c]
      if not series:
        continue
      k = 1 if key == MIOU_KEY else smooth
      for x, y in series:
        ax.plot(*_smoothed(x, y, k), color=colour[label], lw=0.6, alpha=0.35)
      x, y = _mean_on_common_steps(series)
      if x.size:
        ax.plot(*_smoothed(x, y, k), color=colour[label], lw=1.6, label=label,
                marker="o" if key == MIOU_KEY else None, ms=3)
    ax.set_title(key, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(keys):]:
    ax.axis("off")
  handles, names = axes.flat[0].get_legend_handles_labels()
  fig.legend(handles, names, loc="lower center", ncol=min(4, len(names)), fontsize=8)
  fig.tight_layout(rect=(0, 0.04 + 0.03 * math.ceil(len(names) / 4), 1, 1))
  return _save(fig, path)


def _smoothed(x: np.ndarray, y: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Running mean over ``k`` points (fewer for short series), at the window's last step."""
  k = max(1, min(k, y.size))
  return x[k - 1:], np.convolve(y, np.ones(k) / k, mode="valid")


def _mean_on_common_steps(series):
  common = set(series[0][0].tolist())
  for x, _ in series[1:]:
    common &= set(x.tolist())
  steps = np.asarray(sorted(common))
  ys = [np.interp(steps, x, y) for x, y in series]  # exact at the common steps
  return steps, (np.mean(ys, axis=0) if ys else steps.astype(float))


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return path
