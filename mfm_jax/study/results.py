"""Collects finished runs into records, aggregates them over seeds, writes CSV / JSON / Markdown.

Aggregates are over the seeds a row has finished: mean and sample standard deviation (ddof 1;
undefined for one seed). The paired difference of a row with a ``baseline`` (host + MFM − host)
is taken per seed, over the seeds where both finished, so seed-to-seed variation shared by the
pair cancels.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Sequence

import numpy as np

from mfm_jax.study import grids
from mfm_jax.study import runner


def collect(runs: Sequence[grids.Run], workdir: str, common=()) -> list[dict[str, Any]]:
  """One record per run: spec, status, mIoU and per-class IoU (finished runs), wall time."""
  records = []
  for run in runs:
    rdir = runner.run_dir(workdir, run)
    spec = runner.read_spec(rdir) or {}
    attempts = spec.get("attempts", [])
    rec: dict[str, Any] = {
        "source": "",
        "run": run.name, "method": run.row.label, "slug": run.row.slug,
        "config": run.row.config,
        "overrides": ";".join(f"{k}={v}" for k, v in runner.all_overrides(run, common)
                              if k != "seed"),
        "seed": run.seed, "status": "pending", "mIoU": math.nan, "per_class": {},
        "wall_s": round(sum(a.get("wall_s") or 0.0 for a in attempts), 1) if attempts
                  else math.nan,
        "attempts": len(attempts),
        "loadavg": _mean_load(attempts),
    }
    num_steps = spec.get("num_steps")
    path = os.path.join(rdir, "eval_results.json")
    if spec and not runner.spec_matches(spec, run, common):
      rec["status"] = "other settings"  # made with other overrides: never counted as this run
    elif num_steps is not None and runner.is_finished(rdir, num_steps):
      with open(path, encoding="utf-8") as f:
        report = json.load(f)
      # Strict JSON: a class absent from the val split has IoU null.
      num = lambda v: math.nan if v is None else float(v)  # noqa: E731
      rec.update(status="finished", mIoU=num(report["mIoU"]),
                 per_class={k: num(v) for k, v in report["per_class"].items()})
    elif os.path.isdir(rdir) and runner.last_logged_step(rdir):
      rec["status"] = f"partial (step {runner.last_logged_step(rdir)})"
    records.append(rec)
  return records


def read_csv(path: str) -> list[dict[str, Any]]:
  """The records of a ``results.csv`` written by :func:`write` (another machine or session)."""
  def num(text):
    return math.nan if text in ("", None) else float(text)
  try:
    with open(path, newline="", encoding="utf-8") as f:
      rows = list(csv.DictReader(f))
  except OSError as e:
    raise ValueError(f"Cannot read study results {path!r}: {e}") from e
  needed = {"run", "config", "overrides", "seed", "status", "mIoU"}
  if not rows or not needed <= set(rows[0]):
    raise ValueError(f"{path!r} is not a study results.csv: it needs the columns "
                     f"{sorted(needed)}.")
  out = []
  for row in rows:
    try:
      out.append({
          "source": path, "run": row["run"], "method": row.get("method", ""),
          "config": row["config"], "overrides": row["overrides"], "seed": int(row["seed"]),
          "status": row["status"], "mIoU": num(row["mIoU"]),
          "per_class": {k[len("IoU "):]: num(v) for k, v in row.items()
                        if k.startswith("IoU ")},
          "wall_s": num(row.get("wall_s")), "attempts": int(row.get("attempts") or 0),
          "loadavg": num(row.get("loadavg"))})
    except ValueError as e:
      raise ValueError(f"{path!r}, run {row.get('run')!r}: {e}") from e
  return out


def merge(records: Sequence[dict[str, Any]], earlier: Sequence[dict[str, Any]],
          log=print) -> list[dict[str, Any]]:
  """Fills the runs that have not finished here with finished runs of earlier results.

  A run of ``earlier`` (:func:`read_csv`) counts only if its name, config, overrides and seed
  are those of the run in ``records``; a run that finished here is always kept. So a study
  split over machines or sessions is reported as one, and each merged record keeps the path
  it came from in ``source``.
  """
  by_name = {}
  for rec in earlier:
    if rec["status"] == "finished":
      by_name.setdefault(rec["run"], rec)
  out = []
  for rec in records:
    old = by_name.get(rec["run"])
    if rec["status"] != "finished" and old is not None:
      same = all(old[k] == rec[k] for k in ("config", "overrides", "seed"))
      if same:
        rec = {**old, "method": rec["method"], "slug": rec.get("slug")}
      else:
        log(f"Not merged: {rec['run']} in {old['source']} has other settings "
            f"({old['config']} {old['overrides']!r}).")
    out.append(rec)
  return out


def _mean_load(attempts) -> float:
  loads = [a[k][0] for a in attempts for k in ("loadavg_start", "loadavg_end") if a.get(k)]
  return round(float(np.mean(loads)), 2) if loads else math.nan


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (NaN std for fewer than two values)."""
  v = np.asarray(values, np.float64)
  if v.size == 0:
    return math.nan, math.nan
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per row (in study order): seeds finished, mean ± std mIoU, and the values by seed."""
  rows: dict[str, dict[str, Any]] = {}
  for rec in records:
    row = rows.setdefault(rec["method"], {"method": rec["method"], "by_seed": {}, "planned": 0})
    row["planned"] += 1
    if rec["status"] == "finished":
      row["by_seed"][rec["seed"]] = rec["mIoU"]
  for row in rows.values():
    row["n"] = len(row["by_seed"])
    row["mean"], row["std"] = mean_std(list(row["by_seed"].values()))
  return list(rows.values())


def paired_differences(records: Sequence[dict[str, Any]], runs: Sequence[grids.Run]
                       ) -> list[dict[str, Any]]:
  """For every row with a baseline: (row − baseline) per seed, mean ± std over those seeds."""
  miou = {(r["method"], r["seed"]): r["mIoU"] for r in records if r["status"] == "finished"}
  out, seen = [], set()
  for run in runs:
    row = run.row
    if row.baseline is None or row.label in seen:
      continue
    seen.add(row.label)
    seeds = sorted({r.seed for r in runs if r.row.label == row.label})
    diffs = {s: miou[(row.label, s)] - miou[(row.baseline, s)] for s in seeds
             if (row.label, s) in miou and (row.baseline, s) in miou}
    mean, std = mean_std(list(diffs.values()))
    out.append({"method": row.label, "baseline": row.baseline, "by_seed": diffs,
                "n": len(diffs), "mean": mean, "std": std})
  return out


def _fmt(mean: float, std: float, signed: bool = False) -> str:
  if math.isnan(mean):
    return "–"
  text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
  return text + ("" if math.isnan(std) else f" ± {std:.2f}")


def summary_markdown(records, runs) -> str:
  """The study's tables as Markdown: mIoU per row, paired differences, per-run details."""
  lines = ["| method | seeds | mIoU (mean ± std) | by seed |", "|---|---|---|---|"]
  for row in summarize(records):
    by_seed = ", ".join(f"s{s}: {v:.2f}" for s, v in sorted(row["by_seed"].items()))
    lines.append(f"| {row['method']} | {row['n']}/{row['planned']} | "
                 f"{_fmt(row['mean'], row['std'])} | {by_seed} |")
  diffs = paired_differences(records, runs)
  if diffs:
    lines += ["", "| paired difference (per seed) | seeds | Δ mIoU (mean ± std) | by seed |",
              "|---|---|---|---|"]
    for d in diffs:
      by_seed = ", ".join(f"s{s}: {v:+.2f}" for s, v in sorted(d["by_seed"].items()))
      lines.append(f"| {d['method']} − {d['baseline']} | {d['n']} | "
                   f"{_fmt(d['mean'], d['std'], signed=True)} | {by_seed} |")
  lines += ["", "| run | status | mIoU | wall time (s) | mean load | from |",
            "|---|---|---|---|---|---|"]
  for rec in records:
    miou = "–" if math.isnan(rec["mIoU"]) else f"{rec['mIoU']:.2f}"
    wall = "–" if math.isnan(rec["wall_s"]) else f"{rec['wall_s']:.0f}"
    load = "–" if math.isnan(rec["loadavg"]) else f"{rec['loadavg']:.2f}"
    source = rec.get("source") or "this workdir"
    lines.append(f"| {rec['run']} | {rec['status']} | {miou} | {wall} | {load} | {source} |")
  return "\n".join(lines) + "\n"


def _json_safe(obj: Any) -> Any:
  if isinstance(obj, float) and math.isnan(obj):
    return None
  if isinstance(obj, dict):
    return {str(k): _json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_json_safe(v) for v in obj]
  return obj


def write(records, runs, out_dir: str) -> dict[str, str]:
  """Writes results.csv, results.json and summary.md to ``out_dir``; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  classes = [c for c in _class_order(records)
             if any(not math.isnan(r["per_class"].get(c, math.nan)) for r in records)]
  paths = {k: os.path.join(out_dir, f) for k, f in
           (("csv", "results.csv"), ("json", "results.json"), ("md", "summary.md"))}
  fields = ["source", "run", "method", "config", "overrides", "seed", "status", "mIoU", "wall_s",
            "attempts", "loadavg"]
  with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(fields + [f"IoU {c}" for c in classes])
    for r in records:
      w.writerow([("" if isinstance(r[k], float) and math.isnan(r[k]) else r[k])
                  for k in fields]
                 + [_cell(r["per_class"].get(c, math.nan)) for c in classes])
  doc = {"runs": records, "summary": summarize(records),
         "paired_differences": paired_differences(records, runs)}
  with open(paths["json"], "w", encoding="utf-8") as f:
    json.dump(_json_safe(doc), f, indent=2)
  with open(paths["md"], "w", encoding="utf-8") as f:
    f.write(summary_markdown(records, runs))
  return paths


def _cell(v: float) -> str:
  return "" if math.isnan(v) else f"{v:.2f}"


def _class_order(records) -> list[str]:
  out: list[str] = []
  for r in records:
    out.extend(c for c in r["per_class"] if c not in out)
  return out
