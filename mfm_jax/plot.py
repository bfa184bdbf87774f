r"""Learning curves of one or several runs from their ``metrics.jsonl``, as one PNG.

  python -m mfm_jax.plot --workdir=runs/a [runs/b ...] [--output=curves.png] [--labels=a,b]

One panel per figure: target mIoU (``eval/mIoU``) first, then every loss term (``loss/*``),
then the pseudo-label weight, EMA α and the learning rate when logged; one line per run.
Needs matplotlib (``pip install -e ".[plot]"``); the Agg backend is used through a
``Figure`` object (no pyplot, no display, no global backend switch), so ``plot_runs`` can be
called from other programs, e.g. a study runner. The default output is
``<first workdir>/curves.png``.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import math
import os

from mfm_jax.runtime import json_io

METRICS_FILE = "metrics.jsonl"
MIOU_KEY = "eval/mIoU"
EXTRA_KEYS = ("pseudo_weight", "ema_alpha", "lr")
_TITLES = {MIOU_KEY: "target mIoU (%)", "pseudo_weight": "pseudo-label weight",
           "ema_alpha": "EMA α", "lr": "learning rate"}

Series = dict[str, list[tuple[int, float]]]


def read_metrics(workdir: str) -> Series:
  """``{metric: [(step, value), ...]}`` from ``workdir/metrics.jsonl``, sorted by step.

  A step logged twice (a resumed run re-logs from its checkpoint) keeps the later value. A
  truncated last line (a run killed while writing) is ignored; any other bad line raises
  ``ValueError`` naming the file and line.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--workdir={workdir}: {path} does not exist (is it a training "
                            "workdir?).")
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  series: dict[str, dict[int, float]] = {}
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      step = int(record.pop("step"))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
      if i == len(lines) - 1:
        continue
      raise ValueError(f"{path}:{i + 1}: not a metrics record ({e}).") from None
    for key, value in record.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        series.setdefault(key, {})[step] = float(value)
  return {k: sorted(v.items()) for k, v in series.items()}


def panel_keys(runs: Sequence[Series]) -> list[str]:
  """The metrics to draw, in panel order: mIoU, loss terms (sorted), extras."""
  present = set().union(*(r.keys() for r in runs)) if runs else set()
  keys = [MIOU_KEY] if MIOU_KEY in present else []
  keys += sorted(k for k in present if k.startswith("loss/"))
  keys += [k for k in EXTRA_KEYS if k in present]
  return keys


def plot_runs(workdirs: Sequence[str], output_path: str,
              labels: Sequence[str] | None = None) -> str:
  """Draws the learning curves of ``workdirs`` into the PNG ``output_path``; returns its path.

  Args:
    workdirs: training workdirs holding ``metrics.jsonl``.
    output_path: PNG to write (atomically: temporary name, then rename); folders are created.
    labels: legend names, one per workdir (default: the workdirs' base names).
  """
  if not workdirs:
    raise ValueError("plot_runs: give at least one workdir.")
  labels = list(labels) if labels else [os.path.basename(os.path.normpath(w)) for w in workdirs]
  if len(labels) != len(workdirs):
    raise ValueError(f"--labels: {len(labels)} labels for {len(workdirs)} workdirs.")
  runs = [read_metrics(w) for w in workdirs]
  keys = panel_keys(runs)
  if not keys:
    raise ValueError(f"--workdir: no mIoU or loss metrics in {', '.join(workdirs)}.")
  try:
    # pylint: disable=g-import-not-at-top
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # pylint: enable=g-import-not-at-top
  except ImportError:
    raise ImportError("mfm_jax.plot needs matplotlib: pip install -e \".[plot]\"") from None

  ncols = min(3, len(keys))
  nrows = math.ceil(len(keys) / ncols)
  fig = Figure(figsize=(4.6 * ncols, 3.2 * nrows), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  for ax, key in zip(axes, keys):
    for run, label in zip(runs, labels):
      if key in run:
        steps, values = zip(*run[key])
        marker = "o" if key == MIOU_KEY else None
        ax.plot(steps, values, label=label, marker=marker, markersize=3, linewidth=1.2)
    ax.set_title(_TITLES.get(key, key), fontsize=10)
    ax.set_xlabel("iteration", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
  for ax in axes[len(keys):]:
    ax.set_visible(False)
  axes[0].legend(fontsize=8)
  output_path = os.path.abspath(os.path.expanduser(output_path))
  os.makedirs(os.path.dirname(output_path), exist_ok=True)
  with json_io.atomic_path(output_path) as tmp:
    fig.savefig(tmp, format="png", dpi=90)
  return output_path


def main(argv):
  import sys  # pylint: disable=g-import-not-at-top

  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  workdirs = list(f.workdir or []) + list(argv[1:])  # --workdir=a b c and --workdir=a --workdir=b
  try:
    out = plot_runs(workdirs, f.output or os.path.join(workdirs[0], "curves.png"),
                    f.labels or None)
  except (ValueError, OSError, ImportError) as e:
    sys.exit(f"plot: error: {e}")
  print(f"Wrote {out}")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags
  flags.DEFINE_multi_string("workdir", None, "Training workdir(s) with metrics.jsonl; more "
                            "may follow as arguments.")
  flags.DEFINE_string("output", "", "PNG path (default: <first workdir>/curves.png).")
  flags.DEFINE_list("labels", [], "Legend names, one per workdir.")
  flags.mark_flag_as_required("workdir")
  app.run(main)
