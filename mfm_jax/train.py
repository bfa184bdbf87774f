"""Training loop: data, jitted update, logging, evaluation, checkpoints, signals.

``train_and_evaluate(config, workdir)`` resumes from the newest checkpoint in ``workdir`` if
there is one (state + data-iterator position), so a stopped run continues exactly. SIGTERM
saves a checkpoint and exits cleanly; a non-finite loss stops the run with a clear message and
never overwrites the last good checkpoint.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from mfm_jax import checkpoint, config_lib, inference, metric_writers, parallel, state as state_lib
from mfm_jax import progress as progress_lib
from mfm_jax import visualize
from mfm_jax.data import pipeline
from mfm_jax.evaluation import format_report, report_scalars
from mfm_jax.train_step import make_update_fn


class NonFiniteLossError(RuntimeError):
  """A loss became NaN/inf; the last good checkpoint is kept."""


class _SigtermFlag:
  """Turns SIGTERM into a flag checked once per step (the step itself is never interrupted)."""

  def __init__(self):
    self.raised = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not in the main thread (e.g. some test runners)
      self._old = None
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self.raised = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


class _FinishSavesOnError:
  """On an exception, lets pending asynchronous checkpoint saves finalise before it propagates
  (otherwise the last good checkpoint would be left as an unfinalised temporary directory)."""

  def __init__(self, ckpt):
    self.ckpt = ckpt

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *exc):
    if exc_type is not None:
      try:
        self.ckpt.wait()
      except Exception:  # pylint: disable=broad-except
        logging.exception("Waiting for pending checkpoint saves failed.")
    return False


def _write_json_atomic(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _check_finite(step: int, metrics: dict[str, float], last_saved: int | None) -> None:
  bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    kept = (f"the last good checkpoint (step {last_saved}) is kept" if last_saved is not None
            else "no checkpoint was written")
    raise NonFiniteLossError(f"Non-finite values at step {step}: {bad}; training stopped and "
                             f"{kept}. Lower config.optim.lr or check the data.")


def _images_per_step(config: ml_collections.ConfigDict) -> int:
  """Images one step reads: the global source batch, plus the target batch when it is used."""
  uses_target = bool(config.uda.enabled) or bool(config.mfm.enabled)
  return int(config.data.batch_size) * (2 if uses_target else 1)


def _memory_figures() -> dict[str, float]:
  """Device memory (allocator in use / peak, GPU and TPU only) and the host's peak RSS, GiB."""
  out = {}
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  (backends without allocator statistics)
    stats = {}
  for key, name in (("bytes_in_use", "device_mem_gib"), ("peak_bytes_in_use",
                                                         "device_peak_mem_gib")):
    if key in stats:
      out[f"perf/{name}"] = stats[key] / 2**30
  # ru_maxrss is in KiB on Linux.
  out["perf/host_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return out


class _SampleKeeper:
  """``inference.evaluate`` hook keeping the first ``n`` (image, prediction, label) triples."""

  def __init__(self, n: int):
    self.n, self.samples = n, []

  def __call__(self, batch: dict[str, Any], pred: np.ndarray) -> None:
    for i in range(min(self.n - len(self.samples), pred.shape[0])):
      self.samples.append((np.asarray(batch["image"][i]), pred[i], np.asarray(batch["label"][i])))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_at: int | None = None) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` and returns the final evaluation report.

  ``stop_at`` ends the run after that step with a checkpoint, as a preemption would (the
  schedule still targets ``config.num_steps``; a later call resumes).
  """
  config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.make_mesh(config.mesh.data)
  is_main = jax.process_index() == 0
  writer = metric_writers.MetricWriter(workdir, enabled=is_main)
  if is_main:
    _write_json_atomic(os.path.join(workdir, "config.json"), json.loads(config.to_json()))

  # Data first: a missing dataset fails in seconds, before any model is built.
  data_iter = pipeline.make_train_iterator(
      config.data, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  parallel.check_batch_size(config.data.batch_size, mesh)
  host = state_lib.build_host(config)
  mfm_task = state_lib.build_mfm_task(config)
  tx = state_lib.build_optimizer(config, host, mfm_task)
  repl = parallel.replicated(mesh)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 keep=config.keep_checkpoints,
                                 save_interval_steps=config.checkpoint_every)
  start = ckpt.latest_step()
  if start is not None:
    abstract = state_lib.abstract_train_state(config, host, mfm_task, tx, repl)
    state, extra = ckpt.restore(abstract, step=start)
    data_iter.set_state(extra["data"])
    logging.info("Resumed from %s at step %d.", ckpt.directory, start)
  else:
    state = state_lib.create_train_state(config, host, mfm_task, tx, repl)
    start = 0
  last_saved = start if start else None

  update = jax.jit(make_update_fn(config, host, mfm_task, tx), donate_argnums=(0,),
                   in_shardings=(repl, parallel.data_sharded(mesh)),
                   out_shardings=(repl, repl))
  predict_fn = inference.make_predict_fn(config, host)
  schedule = state_lib.optim.lr_schedule(
      config.optim.lr, config.num_steps, config.optim.warmup_steps, config.optim.warmup_ratio,
      config.optim.power, config.optim.min_lr)

  def run_eval(step: int) -> dict[str, Any]:
    t0 = time.time()
    # Evaluation runs per process on its first local device (its own shard of the split), so
    # processes with unequal shard sizes never wait for each other inside a computation.
    variables = jax.tree_util.tree_map(lambda x: x.addressable_data(0),
                                       state_lib.deployed_params(state, config.eval.which))
    batches = pipeline.make_eval_dataset(config.data, process_index=jax.process_index(),
                                         process_count=jax.process_count())
    keeper = _SampleKeeper(config.eval.num_logged_images if is_main else 0)
    report = inference.evaluate(config, host, variables, batches, predict_fn, on_batch=keeper)
    writer.write_scalars(step, report_scalars(report))
    writer.write_texts(step, {"eval/iou_table": visualize.iou_markdown(report)})
    # image | prediction | ground truth, Cityscapes colours.
    writer.write_images(step, {f"eval/sample_{i}": visualize.validation_panel(*sample)
                               for i, sample in enumerate(keeper.samples)})
    logging.info("Evaluation at step %d (%.1fs):\n%s", step, time.time() - t0,
                 format_report(report))
    return report

  # Logged steps are synchronised (device_get), so their times give the rate and the ETA.
  progress = None
  finished = collections.deque()
  images_per_step = _images_per_step(config)
  report = None
  t_compile = time.time()
  with _SigtermFlag() as sigterm, _FinishSavesOnError(ckpt):
    for step in range(start, config.num_steps):
      batch = parallel.shard_batch(next(data_iter), mesh)
      state, metrics = update(state, batch)
      done = step + 1
      if step == start:
        jax.block_until_ready(metrics)
        logging.info("First step (compile + run) took %.1fs.", time.time() - t_compile)
        # Started after the first step, so that compilation is not in the rate.
        progress = progress_lib.Progress(config.num_steps, desc="train", start=done,
                                         every=config.log_every, log=logging.info)
        last_log = (time.time(), done)
      log_now = done % config.log_every == 0 or done == config.num_steps or step == start
      save_now = (done % config.checkpoint_every == 0 or done == config.num_steps
                  or sigterm.raised or done == stop_at)
      if log_now or save_now:
        host_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(done, host_metrics, last_saved)
        if log_now:
          host_metrics["lr"] = float(schedule(step))
          now = time.time()
          if done > last_log[1]:
            steps_per_s = (done - last_log[1]) / max(now - last_log[0], 1e-9)
            host_metrics["perf/steps_per_s"] = steps_per_s
            host_metrics["perf/images_per_s"] = steps_per_s * images_per_step
          last_log = (now, done)
          host_metrics.update(_memory_figures())
          writer.write_scalars(done, host_metrics)
          progress.update(done, force=True, **dict(sorted(host_metrics.items())))
          finished.clear()
      if progress is not None and progress.tty and not log_now:
        # Live line: steps are dispatched asynchronously, so a step counts when its metrics
        # are ready (checked without blocking), not when the host queued it.
        finished.append((done, jax.tree_util.tree_leaves(metrics)[0]))
        while finished and finished[0][1].is_ready():
          progress.update(finished.popleft()[0])
      if done % config.eval_every == 0 and done != config.num_steps:
        run_eval(done)
      if sigterm.raised and not save_now:  # the flag may have been raised during this step
        save_now = True
        _check_finite(done, {k: float(v) for k, v in jax.device_get(metrics).items()},
                      last_saved)
      if save_now:
        try:
          if ckpt.save(done, state, extra={"data": data_iter.get_state()}, force=True):
            last_saved = done
        except checkpoint.NonFiniteStateError as e:
          raise NonFiniteLossError(
              f"Non-finite parameters after step {done}; training stopped and "
              f"{'the last good checkpoint (step %s) is kept' % last_saved}. {e}") from e
      if (done == stop_at or sigterm.raised) and progress is not None:
        progress.close()
      if done == stop_at and not sigterm.raised:
        ckpt.wait()
        writer.close()
        return {"stopped_at": done}
      if sigterm.raised:
        ckpt.wait()
        writer.close()
        logging.warning("Stopped by SIGTERM after step %d; checkpoint saved.", done)
        return {"stopped_at": done}
  ckpt.wait()
  if progress is not None:
    progress.close()
  report = run_eval(config.num_steps)
  if is_main:
    _write_json_atomic(os.path.join(workdir, "eval_results.json"), report)
    print(format_report(report), flush=True)
  writer.close()
  ckpt.close()
  return report
