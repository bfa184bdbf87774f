r"""The study runner: ``python -m mfm_jax.study --study=NAME --workdir=DIR``.

Runs the named grid (``grids.STUDIES``: ``hosts``, ``ablations``, ``masking``) one run after
another in ``DIR/runs/<slug>-s<seed>``, skipping finished runs (a stopped study continues where
it stopped; a killed run resumes from its own checkpoint), and after every run rewrites
``DIR/<study>/``: ``results.csv``, ``results.json``, ``summary.md`` (mean ± std per row; for
rows with MFM the paired difference to the host without MFM, per seed), ``methods.png``,
``curves.png`` (target mIoU and every loss term), ``sweep.png`` (mIoU vs mask ratio, ablations)
and ``predictions.png`` (target val images, ground truth, predictions without / with MFM).

Flags: ``--seeds=0,1`` (default per study), ``--only=REGEX`` (runs whose name matches, e.g.
``--only='^(source_only|dacs|daformer|mic|oracle)-'`` for the rows without MFM),
``--override=KEY=VALUE`` (repeatable, applied to every run and recorded in its spec),
``--dry_run`` (print the plan and each run's status, run nothing), ``--report_only`` (only
rewrite the tables and figures), ``--merge=OLD/results.csv`` (repeatable: finished runs of an
earlier results table, e.g. from another machine, fill the runs not finished here when they
have the same name, config, overrides and seed). The tables are rewritten after every run, the figures when
the study ends (or with ``--report_only``). Use one ``--workdir`` for all studies: they share
runs.
"""

from __future__ import annotations

import ast
import os
from typing import Any, Sequence

from mfm_jax.study import grids
from mfm_jax.study import plots
from mfm_jax.study import results
from mfm_jax.study import runner


def parse_override(text: str) -> tuple[str, Any]:
  """``'data.data_dir=/x'`` → ``('data.data_dir', '/x')``; values are Python literals if
  they parse as one, else strings."""
  key, sep, raw = text.partition("=")
  if not sep or not key:
    raise ValueError(f"--override needs KEY=VALUE, got {text!r}.")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  return key.strip(), value


def report(study: str, runs: Sequence[grids.Run], workdir: str, common=(),
           figures: bool = True, visual: bool = True, merge: Sequence[str] = (),
           log=print) -> dict[str, str]:
  """Rewrites the study's tables (and figures) from whatever runs have finished.

  ``merge``: earlier ``results.csv`` files whose finished runs fill the runs that have not
  finished in ``workdir`` (``results.merge``); the learning curves and the prediction grid
  need the run directories, so they show the runs of ``workdir`` only.
  """
  out_dir = os.path.join(workdir, study)
  records = results.collect(runs, workdir, common)
  for path in merge:
    records = results.merge(records, results.read_csv(path), log=log)
  paths = results.write(records, runs, out_dir)
  if not figures:
    return paths
  if any(r["status"] == "finished" for r in records):
    paths["methods"] = plots.plot_methods(records, os.path.join(out_dir, "methods.png"),
                                          title=f"study '{study}': target val mIoU")
    sweep = plots.plot_sweep(records, runs, os.path.join(out_dir, "sweep.png"))
    if sweep:
      paths["sweep"] = sweep
  curves = plots.plot_curves(runs, workdir, os.path.join(out_dir, "curves.png"))
  if curves:
    paths["curves"] = curves
  if visual and study in grids.STUDIES:
    pair = _visual_pair(study, runs, records)
    if pair:
      from mfm_jax.study import visual as visual_lib  # pylint: disable=g-import-not-at-top
      paths["predictions"] = visual_lib.prediction_grid(
          [runner.run_dir(workdir, r) for r in pair],
          os.path.join(out_dir, "predictions.png"), [r.row.label for r in pair])
  log(results.summary_markdown(records, runs))
  log("Wrote " + ", ".join(sorted(paths.values())))
  return paths


def _visual_pair(study, runs, records):
  """The study's (without MFM, with MFM) runs of the first seed where both finished."""
  done = {r["run"] for r in records if r["status"] == "finished"}
  a, b = grids.STUDIES[study].visual_pair
  for seed in dict.fromkeys(r.seed for r in runs):
    pair = [r for s in (a, b) for r in runs if r.row.slug == s and r.seed == seed]
    if len(pair) == 2 and all(r.name in done for r in pair):
      return pair
  return None


def run_study(study: str, workdir: str, *, seeds: Sequence[int] | None = None, only: str = "",
              common: Sequence[tuple[str, Any]] = (), dry_run: bool = False,
              report_only: bool = False, figures: bool = True, visual: bool = True,
              merge: Sequence[str] = (),
              launcher: runner.Launcher = runner.launch_subprocess, log=print) -> dict:
  """Runs (or plans) ``study`` in ``workdir``; returns the runner's outcome by run name."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  runs = grids.study_runs(study, seeds)
  chosen = grids.select(runs, only)
  if only and not chosen:
    raise ValueError(f"--only={only!r} matches none of {[r.name for r in runs]}.")
  if dry_run:
    for i, e in enumerate(runner.plan(chosen, workdir, common)):
      log(f"[{i + 1}/{len(chosen)}] {e['run'].name:<36} {e['status']:<20} "
          + (e.get("error") or " ".join(e["command"][1:])))
    return {}
  outcome = {}
  if not report_only:
    os.makedirs(workdir, exist_ok=True)
    outcome = runner.execute(
        chosen, workdir, common=common, launcher=launcher, log=log,
        after_each=lambda: report(study, runs, workdir, common, figures=False, merge=merge))
  report(study, runs, workdir, common, figures=figures, visual=visual, merge=merge, log=log)
  bad = outcome.get("failed", []) + outcome.get("invalid", [])
  if bad:
    log(f"Not finished: {', '.join(bad)}")
  return outcome


def define_flags() -> None:
  """Defines the command-line flags (called under ``__main__`` only)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum("study", None, sorted(grids.STUDIES), "Which study to run.")
  flags.DEFINE_string("workdir", None, "Study directory (runs/, <study>/ tables and figures).")
  flags.DEFINE_list("seeds", None, "Seeds (default: the study's, e.g. 0,1,2 for hosts).")
  flags.DEFINE_string("only", "", "Regular expression: run only runs whose name matches.")
  flags.DEFINE_multi_string("override", [], "KEY=VALUE applied to every run (repeatable).")
  flags.DEFINE_bool("dry_run", False, "Print the plan and each run's status; run nothing.")
  flags.DEFINE_bool("report_only", False, "Only rewrite the tables and figures.")
  flags.DEFINE_multi_string("merge", [], "An earlier results.csv (e.g. of the same study on "
                            "another machine) whose finished runs fill the runs not finished "
                            "in --workdir (repeatable).")
  flags.DEFINE_bool("visual", True, "Write predictions.png when its two runs have finished.")
  flags.mark_flags_as_required(["study", "workdir"])


def main(argv) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  seeds = None if f.seeds is None else [int(s) for s in f.seeds]
  outcome = run_study(f.study, f.workdir, seeds=seeds, only=f.only,
                      common=[parse_override(o) for o in f.override], dry_run=f.dry_run,
                      report_only=f.report_only, visual=f.visual, merge=f.merge)
  if outcome.get("failed") or outcome.get("invalid"):
    raise SystemExit(1)
