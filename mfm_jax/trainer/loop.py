"""Training loop: data, jitted update, logging, evaluation, checkpoints, signals.

``train_and_evaluate(config, workdir)`` holds the work directory's lock (``run_lock``) and
resumes from the newest readable checkpoint in it (state + data-iterator position; a damaged
newest one is moved aside), so a stopped run continues exactly. SIGTERM/SIGINT stop the run
after the current step with a checkpoint (``stopping``); a non-finite loss, flagged inside the
step and read with the logged metrics, stops it without overwriting the last good checkpoint; a
failed save stops it at once. README, "Failure behaviour", lists the exit codes ``main`` maps
these outcomes to.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from mfm_jax.config import validation
from mfm_jax.data import pipeline
from mfm_jax.evaluation import inference
from mfm_jax.evaluation import visualize
from mfm_jax.evaluation.metrics import format_report
from mfm_jax.evaluation.metrics import report_scalars
from mfm_jax.runtime import errors
from mfm_jax.runtime import json_io
from mfm_jax.runtime import metric_writers
from mfm_jax.runtime import progress as progress_lib
from mfm_jax.runtime import run_lock
from mfm_jax.runtime import stopping
from mfm_jax.trainer import checkpoint
from mfm_jax.trainer import parallel
from mfm_jax.trainer import state as state_lib
from mfm_jax.trainer.step import jit_update_fn


class NonFiniteLossError(errors.UserError, RuntimeError):
  """A loss became NaN/inf; the last good checkpoint is kept."""

  exit_code = errors.NON_FINITE


def _raise_non_finite(first: int, last: int, last_saved: int | None, detail: str = "") -> None:
  kept = (f"the last good checkpoint (step {last_saved}) is kept" if last_saved is not None
          else "no checkpoint was written")
  where = f"at step {last}" if first >= last else f"between steps {first} and {last}"
  raise NonFiniteLossError(f"Non-finite loss or gradient {where}; training stopped and {kept}. "
                           f"Lower config.optim.lr or check the data.{detail}")


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
  """``inference.evaluate`` hook keeping the first ``n`` (image, prediction, label) triples
  (only those predictions are read back from the device)."""

  def __init__(self, n: int):
    self.n, self.samples = n, []

  def __call__(self, batch: dict[str, Any], pred: jax.Array) -> None:
    for i in range(min(self.n - len(self.samples), pred.shape[0])):
      self.samples.append((np.asarray(batch["image"][i]), np.asarray(pred[i]),
                           np.asarray(batch["label"][i])))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_at: int | None = None) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` and returns the final evaluation report.

  ``stop_at`` ends the run after that step with a checkpoint, as a preemption would (the
  schedule still targets ``config.num_steps``; a later call resumes). A SIGTERM/SIGINT returns
  ``{'stopped_at': step, 'preempted': 'SIGTERM', 'saved': bool}`` (``saved`` is False when no
  step had run yet).
  """
  validation.validate(config)
  with stopping.StopRequest() as stop, run_lock.hold(workdir):
    return _train(config, workdir, stop, stop_at)


def _train(config: ml_collections.ConfigDict, workdir: str, stop: stopping.StopRequest,
           stop_at: int | None) -> dict[str, Any]:
  mesh = parallel.make_mesh(config.mesh.data)
  is_main = jax.process_index() == 0
  if is_main:
    json_io.write_atomic(os.path.join(workdir, "config.json"), json.loads(config.to_json()))

  # Data first: a missing dataset fails in seconds, before any model is built.
  data_iter = pipeline.make_train_iterator(
      config.data, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  parallel.check_batch_size(config.data.batch_size, mesh)
  net = state_lib.build_network(config)
  mfm_task = state_lib.build_mfm_task(config)
  tx = state_lib.build_optimizer(config, net, mfm_task)
  repl = parallel.replicated(mesh)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 keep=config.keep_checkpoints)
  if stop.requested:  # signalled while the data was prepared: no model built, nothing saved
    step = ckpt.latest_step() or 0
    ckpt.close()
    return {"stopped_at": step, "preempted": stop.name, "saved": False}
  restored = None
  if ckpt.all_steps():
    abstract = state_lib.abstract_train_state(config, net, mfm_task, tx, repl)
    restored = ckpt.restore_latest_good(abstract,
                                        state_lib.other_layout(config, abstract))
    if restored is None:
      logging.warning("No checkpoint in %s could be read (all moved aside as damaged); "
                      "training starts again from step 0.", ckpt.directory)
  if restored is not None:
    start, state, extra = restored
    data_iter.set_state(extra["data"])
    logging.info("Resumed from %s at step %d.", ckpt.directory, start)
  else:
    state = state_lib.create_train_state(config, net, mfm_task, tx, repl)
    start = 0
  last_saved = start if start else None
  # Batches are placed on the devices two ahead of the step; the data state saved with a
  # checkpoint is that of the last batch a step consumed.
  batches = parallel.DevicePrefetch(data_iter, mesh, size=2)

  update, step_traces = jit_update_fn(config, net, mfm_task, tx, mesh)
  # Evaluation: prediction + confusion matrix jitted over this process's devices of the mesh,
  # each process on its own shard of the split (no waiting inside a computation when the
  # shards differ in size).
  mesh_eval = inference.MeshEvaluation(config, net, parallel.local_mesh(mesh))
  schedule = state_lib.optim.lr_schedule(
      config.optim.lr, config.num_steps, config.optim.warmup_steps, config.optim.warmup_ratio,
      config.optim.power, config.optim.min_lr)
  writer = metric_writers.MetricWriter(workdir, enabled=is_main)

  def run_eval(step: int, log_table: bool = True) -> dict[str, Any]:
    t0 = time.time()
    variables = state_lib.deployed_params(state, config.eval.which)
    eval_batches = pipeline.make_eval_dataset(config.data, process_index=jax.process_index(),
                                              process_count=jax.process_count())
    keeper = _SampleKeeper(config.eval.num_logged_images if is_main else 0)
    report = inference.evaluate(config, net, variables, eval_batches, mesh_eval,
                                on_batch=keeper)
    writer.write_scalars(step, report_scalars(report))
    writer.write_texts(step, {"eval/iou_table": visualize.iou_markdown(report)})
    # image | prediction | ground truth, Cityscapes colours.
    writer.write_images(step, {f"eval/sample_{i}": visualize.validation_panel(*sample)
                               for i, sample in enumerate(keeper.samples)})
    if log_table:
      logging.info("Evaluation at step %d (%.1fs):\n%s", step, time.time() - t0,
                   format_report(report))
    else:
      logging.info("Evaluation at step %d (%.1fs): mIoU %.2f", step, time.time() - t0,
                   report["mIoU"])
    return report

  try:
    if start < config.num_steps:
      batch = next(batches)
      t_compile = time.time()
      step_fn = stopping.compile_interruptibly(update, (state, batch), stop)
      if step_fn is None:
        return {"stopped_at": start, "preempted": stop.name, "saved": False}
      logging.info("Compiled the train step in %.1fs.", time.time() - t_compile)
    # Logged steps are synchronised (device_get), so their times give the rate and the ETA.
    progress = None
    finished = collections.deque()
    images_per_step = _images_per_step(config)
    last_log = (time.time(), start)
    checked = start  # the non-finite flag was last read after this step
    for step in range(start, config.num_steps):
      if step > start:
        batch = next(batches)
      state, metrics = step_fn(state, batch)
      done = step + 1
      if step == start:
        jax.block_until_ready(metrics)
        # Started after the first step, so that compilation is not in the rate.
        progress = progress_lib.Progress(config.num_steps, desc="train", start=done,
                                         every=config.log_every, log=logging.info)
        last_log = (time.time(), done)
      log_now = done % config.log_every == 0 or done == config.num_steps or step == start
      if log_now:
        host_metrics, nonfinite = jax.device_get((metrics, state.nonfinite))
        if nonfinite:
          _raise_non_finite(checked + 1, done, last_saved)
        checked = done
        host_metrics = {k: float(v) for k, v in host_metrics.items()}
        host_metrics["lr"] = float(schedule(step))
        now = time.time()
        if done > last_log[1]:
          steps_per_s = (done - last_log[1]) / max(now - last_log[0], 1e-9)
          host_metrics["perf/steps_per_s"] = steps_per_s
          host_metrics["perf/images_per_s"] = steps_per_s * images_per_step
        last_log = (now, done)
        host_metrics.update(_memory_figures())
        host_metrics["perf/step_traces"] = step_traces()
        writer.write_scalars(done, host_metrics)
        progress.update(done, force=True, **dict(sorted(host_metrics.items())))
        finished.clear()
      elif progress is not None and progress.tty:
        # Live line: steps are dispatched asynchronously, so a step counts when its metrics
        # are ready (checked without blocking), not when the host queued it.
        finished.append((done, jax.tree_util.tree_leaves(metrics)[0]))
        while finished and finished[0][1].is_ready():
          progress.update(finished.popleft()[0])
      if done % config.eval_every == 0 and done != config.num_steps and not stop.requested:
        run_eval(done)
      stop_now = stop.should_stop(done)
      if (done % config.checkpoint_every == 0 or done == config.num_steps or stop_now
          or done == stop_at):
        if checked != done and bool(jax.device_get(state.nonfinite)):
          _raise_non_finite(checked + 1, done, last_saved)
        checked = done
        try:
          if ckpt.save(done, state, extra={"data": batches.get_state()}):
            last_saved = done
        except checkpoint.NonFiniteStateError as e:
          _raise_non_finite(done, done, last_saved, f" {e}")
      if (stop_now or done == stop_at) and progress is not None:
        progress.close()
      if stop_now:
        logging.warning("Stopped by %s after step %d; checkpoint saved. Run the same command "
                        "again to resume.", stop.name, done)
        return {"stopped_at": done, "preempted": stop.name, "saved": True}
      if done == stop_at:
        return {"stopped_at": done}
    if progress is not None:
      progress.close()
    report = run_eval(config.num_steps, log_table=False)
    if is_main:
      json_io.write_atomic(os.path.join(workdir, "eval_results.json"), report)
      print(format_report(report), flush=True)
    return report
  finally:
    batches.close()
    writer.close()
    try:
      ckpt.close()
    except Exception:  # pylint: disable=broad-except  (never mask the error being raised)
      logging.exception("Closing the checkpoint manager failed.")
