"""Micro-benchmarks of single operations, and the timing helper of ``mfm_jax.benchmark``.

``depthwise_table``: every depthwise conv shape of a MiT + DAFormer model (forward + backward)
in both formulations of ``ops.depthwise_conv2d`` ('xla' grouped conv vs 'shift' multiply-adds);
``upsample_table``: every ×2 transposed conv of the MFM Rebuilder's projectors in both
formulations of ``ops.conv_transpose_2x`` ('transpose' vs 'subpixel'). Used by
``python -m mfm_jax.benchmark --depthwise --upsample``.
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import statistics
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mfm_jax.trainer import state as state_lib


def timed(call, steps: int, warmup: int) -> tuple[float, float]:
  """(median wall seconds, median process CPU seconds: user + system, all threads) per
  ``call()`` (which must wait for its result), after ``warmup`` calls."""
  for _ in range(warmup):
    call()
  walls, cpus = [], []
  for _ in range(steps):
    r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    call()
    walls.append(time.perf_counter() - t)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpus.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
  return statistics.median(walls), statistics.median(cpus)


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_freed_memory() -> None:
  """Collects garbage and hands freed heap pages back to the OS (glibc ``malloc_trim``), so the
  resident size drops to what is still allocated."""
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def step_memory(call, calls: int = 1, interval_s: float = 0.002) -> float | None:
  """Transient memory of ``call()`` in GiB: the process's peak resident size while it runs
  (sampled every ``interval_s`` by a thread) minus its resident size just before, after freed
  memory is handed back. Call after the warm-up, so what persists between calls (parameters,
  optimizer moments, compiled code) is in the baseline and what one call allocates and frees
  (activations, gradients, XLA temporaries) is measured. None where /proc is missing."""
  if not os.path.exists("/proc/self/statm"):
    return None
  _release_freed_memory()
  base = peak = _rss_bytes()
  done = threading.Event()

  def sample():
    nonlocal peak
    while not done.is_set():
      peak = max(peak, _rss_bytes())
      time.sleep(interval_s)

  t = threading.Thread(target=sample, daemon=True)
  t.start()
  try:
    for _ in range(calls):
      call()
  finally:
    done.set()
    t.join()
  peak = max(peak, _rss_bytes())
  return (peak - base) / 2**30



def depthwise_shapes(config) -> list[tuple[int, int, int, int]]:
  """(H, W, C, dilation) of the model's depthwise convs at the configured crop (MiT Mix-FFN
  3x3 per stage; the separable ASPP's dilated 3x3 on the stride-4 map), MiT + DAFormer only."""
  from mfm_jax.models import mit  # pylint: disable=g-import-not-at-top
  if config.model.backbone not in mit.MIT_VARIANTS:
    return []
  v = mit.MIT_VARIANTS[config.model.backbone]
  h, w = config.data.crop_size
  if config.model.hrda.enabled:  # the network runs on the HR detail crop and the LR context
    h, w = config.model.hrda.hr_crop_size
  shapes = []
  for i, (dim, ratio) in enumerate(zip(v["embed_dims"], v["mlp_ratios"])):
    s = 4 * 2**i
    shapes.append((-(-h // s), -(-w // s), int(dim * ratio), 1))
  if config.model.head == "daformer_sepaspp":
    from mfm_jax.models import daformer_head  # pylint: disable=g-import-not-at-top
    shapes += [(-(-h // 4), -(-w // 4), 4 * config.model.head_embed_dim, d)
               for d in daformer_head.DAFormerHead.dilations if d > 1]
  return shapes


def depthwise_table(config, steps: int, warmup: int) -> list[dict[str, Any]]:
  """Forward + backward time of each depthwise conv shape, per formulation (same batch as a
  step: 2 × batch_size images)."""
  from mfm_jax import ops  # pylint: disable=g-import-not-at-top
  dtype = jnp.bfloat16 if config.model.compute_dtype == "bfloat16" else jnp.float32
  b = 2 * config.data.batch_size
  rows = []
  for h, w, c, d in depthwise_shapes(config):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, h, w, c)), dtype)
    k = jnp.asarray(rng.normal(size=(3, 3, 1, c)), dtype)
    row = {"shape": f"{b}x{h}x{w}x{c}", "dilation": d}
    for impl in ops.DEPTHWISE_IMPLS:
      fn = jax.jit(jax.grad(lambda x, k, impl=impl: jnp.sum(
          ops.depthwise_conv2d(x, k, dilation=d, padding=d, impl=impl).astype(jnp.float32)),
                            argnums=(0, 1)))
      row[f"{impl}_ms"] = 1e3 * timed(
          lambda fn=fn: jax.block_until_ready(fn(x, k)), max(steps, 1), max(warmup, 1))[0]
    rows.append(row)
  return rows


def upsample_shapes(config) -> list[tuple[int, int, int, int, int, int]]:
  """(B, h, w, cin, cout, count) of the Rebuilder projectors' ×2 transposed convs at the
  configured crop (count = how many projectors run that shape); [] without a Rebuilder."""
  from mfm_jax.models import rebuilder  # pylint: disable=g-import-not-at-top
  task = state_lib.build_mfm_task(config)
  if task is None or not task.has_params:
    return []
  b = config.data.batch_size * (2 if config.mfm.domain == "both" else 1)
  (gh, gw), d = task.grid, int(config.mfm.embed_dim)
  levels = (len(task.level_sizes) - 1,) if config.model.head.startswith("dlv2") else task.levels
  counts: dict[tuple[int, ...], int] = {}
  for lvl in levels:
    for s in range(rebuilder.upsample_steps(task.level_sizes[lvl], (gh, gw))):
      key = (b, gh * 2**s, gw * 2**s, d if s == 0 else d // 2 if s == 1 else d // 4,
             d // 2 if s == 0 else d // 4)
      counts[key] = counts.get(key, 0) + 1
  return [(*k, n) for k, n in counts.items()]


def upsample_table(config, steps: int, warmup: int) -> list[dict[str, Any]]:
  """Forward + backward (input and kernel) time of each projector transposed-conv shape, per
  formulation of ``ops.conv_transpose_2x``."""
  from mfm_jax import ops  # pylint: disable=g-import-not-at-top
  dtype = jnp.bfloat16 if config.model.compute_dtype == "bfloat16" else jnp.float32
  rows = []
  for b, h, w, cin, cout, n in upsample_shapes(config):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, h, w, cin)), dtype)
    k = jnp.asarray(rng.normal(size=(4, 4, cout, cin)), dtype)
    row = {"shape": f"{b}x{h}x{w}x{cin}->{cout}", "count": n}
    for impl in ops.CONV_TRANSPOSE_IMPLS:
      fn = jax.jit(jax.grad(lambda x, k, impl=impl: jnp.sum(
          ops.conv_transpose_2x(x, k, impl).astype(jnp.float32)), argnums=(0, 1)))
      row[f"{impl}_ms"] = 1e3 * timed(
          lambda fn=fn: jax.block_until_ready(fn(x, k)), max(steps, 1), max(warmup, 1))[0]
    rows.append(row)
  return rows

