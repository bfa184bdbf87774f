"""Executes a study's runs one after another, each as ``python -m mfm_jax.main`` in a subprocess.

A subprocess per run keeps runs independent (a crash or an out-of-memory kill ends one run, not
the study) and lets JAX's persistent compilation cache (``<workdir>/xla_cache`` unless
``JAX_COMPILATION_CACHE_DIR`` is set) compile each distinct step once across runs and restarts.

Resumability: a run is *finished* when its workdir holds ``eval_results.json`` and its
``metrics.jsonl`` has the evaluation at the config's final step; finished runs are skipped. An
unfinished run is relaunched in its own workdir, where ``train.py`` resumes from its newest
checkpoint. Every run workdir records what it is (``study_run.json``: config, overrides, seed,
and each attempt's wall time, exit code and the machine's load); relaunching a workdir with a
different spec is refused, so results are never mixed. A run being trained is locked
(``.study.lock``), so two study processes on one workdir (e.g. ``hosts`` and ``ablations``,
which share runs) never train the same run twice.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import ml_collections

import mfm_jax
from mfm_jax.config import validation
from mfm_jax.runtime import json_io
from mfm_jax.study import grids

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(mfm_jax.__file__)))
SPEC_FILE = "study_run.json"
LOCK_FILE = ".study.lock"

# launcher(run, run_dir, command, env) -> exit code; tests substitute a fake.
Launcher = Callable[[grids.Run, str, list[str], dict[str, str]], int]


class SpecMismatchError(RuntimeError):
  """A run workdir already holds a run with another config, overrides or seed."""


def run_dir(workdir: str, run: grids.Run) -> str:
  return os.path.join(workdir, "runs", run.name)


def all_overrides(run: grids.Run, common: Sequence[tuple[str, Any]] = ()
                  ) -> list[tuple[str, Any]]:
  """The row's overrides, then the study-wide ones (``--override``), then the seed."""
  return list(run.overrides) + list(common) + [("seed", run.seed)]


def _load_config_module(path: str):
  full = path if os.path.isabs(path) else os.path.join(REPO_ROOT, path)
  spec = importlib.util.spec_from_file_location(
      f"_study_config_{abs(hash(full))}", full)
  if spec is None or not os.path.isfile(full):
    raise FileNotFoundError(f"Config file {full} does not exist.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def set_key(c: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """``c.<key> = value`` for a dotted key that must already exist (as config_flags)."""
  *parents, leaf = key.split(".")
  node = c
  for part in parents:
    if part not in node:
      raise KeyError(f"The config has no key {key!r}.")
    node = node[part]
  if leaf not in node:
    raise KeyError(f"The config has no key {key!r}.")
  node[leaf] = value


def get_key(c: ml_collections.ConfigDict, key: str) -> Any:
  for part in key.split("."):
    c = c[part]
  return c


def build_config(run: grids.Run, common: Sequence[tuple[str, Any]] = ()
                 ) -> ml_collections.ConfigDict:
  """The run's full config, as ``mfm_jax.main`` will see it (raises on unknown keys)."""
  path, _, preset = run.row.config.partition(":")
  c = _load_config_module(path).get_config(preset or None)
  for key, value in all_overrides(run, common):
    set_key(c, key, value)
  return c


def _flag_value(value: Any) -> str:
  return value if isinstance(value, str) else repr(value)


def command(run: grids.Run, rdir: str, common: Sequence[tuple[str, Any]] = ()) -> list[str]:
  """The ``python -m mfm_jax.main`` command line of ``run``."""
  path, sep, preset = run.row.config.partition(":")
  full = path if os.path.isabs(path) else os.path.join(REPO_ROOT, path)
  cmd = [sys.executable, "-m", "mfm_jax.main", f"--config={full}{sep}{preset}",
         f"--workdir={rdir}"]
  cmd += [f"--config.{k}={_flag_value(v)}" for k, v in all_overrides(run, common)]
  return cmd


def read_metrics(path: str) -> dict[int, dict[str, float]]:
  """``metrics.jsonl`` → {step: {key: value}}; later lines win (a resumed run re-logs steps)."""
  out: dict[int, dict[str, float]] = {}
  if not os.path.isfile(path):
    return out
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # a line cut by a kill
        continue
      step = int(record.pop("step"))
      out.setdefault(step, {}).update(record)
  return out


def is_finished(rdir: str, num_steps: int) -> bool:
  """The final evaluation of a ``num_steps`` run is in ``rdir``."""
  if not os.path.isfile(os.path.join(rdir, "eval_results.json")):
    return False
  final = read_metrics(os.path.join(rdir, "metrics.jsonl")).get(int(num_steps), {})
  return "eval/mIoU" in final


def last_logged_step(rdir: str) -> int:
  steps = read_metrics(os.path.join(rdir, "metrics.jsonl"))
  return max(steps, default=0)


def _spec(run: grids.Run, common, num_steps: int) -> dict[str, Any]:
  return {"name": run.name, "label": run.row.label, "config": run.row.config,
          "overrides": [[k, v] for k, v in all_overrides(run, common)],
          "seed": run.seed, "num_steps": int(num_steps)}


_SPEC_KEYS = ("config", "overrides", "seed", "num_steps")


def read_spec(rdir: str) -> dict[str, Any] | None:
  path = os.path.join(rdir, SPEC_FILE)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def spec_matches(stored: dict[str, Any], run: grids.Run, common=()) -> bool:
  """Whether a stored spec describes ``run`` (config, overrides, seed; not the step count)."""
  ours = json.loads(json.dumps(
      {"config": run.row.config, "seed": run.seed,
       "overrides": [[k, v] for k, v in all_overrides(run, common)]}))
  return all(stored.get(k) == v for k, v in ours.items())


def _check_spec(rdir: str, spec: dict[str, Any]) -> dict[str, Any]:
  """Returns the stored spec (with its attempts), refusing one that describes another run."""
  stored = read_spec(rdir)
  if stored is None:
    if os.path.isdir(rdir) and set(os.listdir(rdir)) - {LOCK_FILE}:
      raise SpecMismatchError(f"{rdir} exists without {SPEC_FILE}: not a study run; move it.")
    return dict(spec, attempts=[])
  theirs = {k: stored.get(k) for k in _SPEC_KEYS}
  ours = json.loads(json.dumps({k: spec[k] for k in _SPEC_KEYS}))
  if theirs != ours:
    raise SpecMismatchError(
        f"{rdir} holds another run ({theirs}) than {spec['name']} ({ours}); remove it or use "
        "another --workdir.")
  return stored


def launch_subprocess(run: grids.Run, rdir: str, cmd: list[str], env: dict[str, str]) -> int:
  """Runs ``cmd`` with its output appended to ``<rdir>/log.txt``; Ctrl-C stops it cleanly
  (SIGTERM: the training loop saves a checkpoint) and is re-raised."""
  del run
  with open(os.path.join(rdir, "log.txt"), "a", encoding="utf-8") as log:
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    try:
      return proc.wait()
    except KeyboardInterrupt:
      proc.send_signal(signal.SIGTERM)
      try:
        proc.wait(timeout=300)
      except subprocess.TimeoutExpired:
        proc.kill()
      raise


def child_env(workdir: str) -> dict[str, str]:
  """The environment of a run: this one, the repository importable, the compilation cache on."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH", "")]))
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.abspath(workdir),
                                                           "xla_cache"))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
  return env


def plan(runs: Sequence[grids.Run], workdir: str, common=()) -> list[dict[str, Any]]:
  """Per run: its config (or the error building it), workdir, status and command."""
  out = []
  for run in runs:
    rdir = run_dir(workdir, run)
    entry = {"run": run, "dir": rdir, "command": command(run, rdir, common)}
    try:
      config = build_config(run, common)
      validation.validate(config)
    except (KeyError, ValueError, TypeError) as e:
      msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
      entry.update(status="invalid", error=msg, num_steps=None)
      out.append(entry)
      continue
    entry["num_steps"] = int(config.num_steps)
    if is_finished(rdir, config.num_steps):
      entry["status"] = "finished"
    elif os.path.isdir(rdir) and last_logged_step(rdir) > 0:
      entry["status"] = f"partial (step {last_logged_step(rdir)})"
    else:
      entry["status"] = "pending"
    out.append(entry)
  return out


@contextlib.contextmanager
def _try_lock(rdir: str) -> Iterator[bool]:
  """Non-blocking exclusive lock of a run dir: False if another study process holds it."""
  os.makedirs(rdir, exist_ok=True)
  with open(os.path.join(rdir, LOCK_FILE), "a", encoding="utf-8") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      yield False
      return
    try:
      yield True
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _attempt(run: grids.Run, rdir: str, cmd: list[str], env: dict[str, str],
             spec: dict[str, Any], launcher: Launcher) -> tuple[int | None, float]:
  """Launches one attempt, recording its wall time, exit code and machine load in the spec,
  and what decides its floating-point results besides the config: the jax version, the CPU
  affinity and the XLA/JAX flags (threading changes the order of reductions, and over a few
  hundred self-training steps a last-bit difference grows to a few tenths of mIoU)."""
  import jax  # pylint: disable=g-import-not-at-top
  attempt = {"start": datetime.datetime.now().isoformat(timespec="seconds"),
             "loadavg_start": list(os.getloadavg()), "returncode": None,
             "jax": jax.__version__, "cpus": sorted(os.sched_getaffinity(0)),
             "xla_flags": env.get("XLA_FLAGS", ""),
             "jax_platforms": env.get("JAX_PLATFORMS", "")}
  spec["attempts"].append(attempt)
  json_io.write_atomic(os.path.join(rdir, SPEC_FILE), spec)
  t0 = time.time()
  try:
    attempt["returncode"] = launcher(run, rdir, cmd, env)
  finally:  # also when interrupted: the time spent counts
    attempt.update(wall_s=round(time.time() - t0, 1), loadavg_end=list(os.getloadavg()))
    json_io.write_atomic(os.path.join(rdir, SPEC_FILE), spec)
  return attempt["returncode"], attempt["wall_s"]


def execute(runs: Sequence[grids.Run], workdir: str, *, common=(),
            launcher: Launcher = launch_subprocess,
            after_each: Callable[[], None] | None = None,
            log: Callable[[str], None] = print) -> dict[str, list[str]]:
  """Runs every unfinished run of ``runs`` in order; returns run names by outcome.

  Outcomes: finished, failed, skipped (already finished), invalid (the config does not build
  or validate), busy (another study process is running it). ``after_each`` is called after
  every launched run (the study rewrites its tables there, so a stopped study always leaves
  current ones).
  """
  outcome: dict[str, list[str]] = {k: [] for k in ("skipped", "finished", "failed", "invalid",
                                                  "busy")}
  env = child_env(workdir)
  entries = plan(runs, workdir, common)
  for i, entry in enumerate(entries):
    run, rdir, num_steps = entry["run"], entry["dir"], entry["num_steps"]
    head = f"[{i + 1}/{len(entries)}] {run.name} ({run.row.label}, seed {run.seed})"
    if entry["status"] == "invalid":
      outcome["invalid"].append(run.name)
      log(f"{head}: invalid config, not run: {entry['error']}")
      continue
    # Also for finished runs: a run dir made with other settings must never count as this run.
    spec = _check_spec(rdir, _spec(run, common, num_steps))
    if entry["status"] == "finished":
      outcome["skipped"].append(run.name)
      log(f"{head}: finished, skipped")
      continue
    with _try_lock(rdir) as locked:
      if not locked:
        outcome["busy"].append(run.name)
        log(f"{head}: running in another study process, skipped")
        continue
      if is_finished(rdir, num_steps):  # finished by another process since the plan
        outcome["skipped"].append(run.name)
        log(f"{head}: finished, skipped")
        continue
      spec = _check_spec(rdir, _spec(run, common, num_steps))
      log(f"{head}: {entry['status']} → running in {rdir}")
      code, wall = _attempt(run, rdir, entry["command"], env, spec, launcher)
    if code == 0 and is_finished(rdir, num_steps):
      outcome["finished"].append(run.name)
      with open(os.path.join(rdir, "eval_results.json"), encoding="utf-8") as f:
        miou = json.load(f)["mIoU"]
      log(f"{head}: mIoU {float('nan') if miou is None else miou:.2f} in {wall:.0f} s")
    else:
      outcome["failed"].append(run.name)
      log(f"{head}: FAILED (exit code {code}); see {os.path.join(rdir, 'log.txt')}")
    if after_each is not None:
      after_each()
  return outcome
