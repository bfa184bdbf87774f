"""Ahead-of-time compilation of the real train step for an accelerator topology, without it.

``compile_step(config, topology)`` builds the step exactly as the train loop does
(``trainer/step.py jit_update_fn``), lowers it with abstract state and batch (shapes, dtypes and
shardings only: no parameter is materialised) on the devices of a topology description
(``jax.experimental.topologies``) and compiles it with that platform's compiler. The compiled
program reports per-device memory (``memory_analysis``) and cost (``cost_analysis``).

TPU: needs the TPU extra (``pip install "jax[tpu]"``, which brings libtpu); no TPU is used or
needed. GPU: XLA's GPU compiler needs the CUDA plugin and a visible GPU to describe the target,
so GPU memory cannot be planned this way on a machine without a GPU; the CPU figures of
``python -m mfm_jax.benchmark --compile_only`` are the nearest stand-in (same program, CPU
fusion decisions).
"""

from __future__ import annotations

import importlib.util
import os
import re
import resource
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mfm_jax.trainer import parallel
from mfm_jax.trainer import state as state_lib
from mfm_jax.trainer.step import jit_update_fn

GIB = 2**30

# HBM per chip, GiB (Cloud TPU system-architecture pages, docs.cloud.google.com/tpu/docs/<v>:
# v4 32 GiB HBM2; v5e 16 GB HBM2; v5p 95 GB HBM2e; v6e 32 GB HBM). The figure a run can use is
# a little lower (the runtime reserves some).
HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}
# `jax.experimental.topologies` names: "v5e:2x2" → the chip generation before the colon.
_KINDS = {"v4": "v4", "v5e": "v5e", "v5litepod": "v5e", "v5p": "v5p", "v6e": "v6e"}


class AotError(RuntimeError):
  """The topology cannot be described or compiled for on this machine."""


def tpu_compiler_available() -> bool:
  """Whether libtpu (the TPU compiler) is installed."""
  return importlib.util.find_spec("libtpu") is not None


def chip_kind(topology: str) -> str:
  """``'v5e:2x2'`` → ``'v5e'`` (raises ``ValueError`` naming the known kinds)."""
  kind = topology.split(":", 1)[0].strip().lower()
  if kind not in _KINDS:
    raise ValueError(f"--aot={topology!r}: unknown TPU generation {kind!r}; use one of "
                     f"{sorted(_KINDS)} with a topology, e.g. v5e:2x2, v5p:2x2x1, v4:2x2x1, "
                     "v6e:2x2.")
  return _KINDS[kind]


def topology_devices(topology: str) -> list[Any]:
  """The (abstract) devices of a TPU topology such as ``'v5e:2x2'``."""
  chip_kind(topology)
  if not tpu_compiler_available():
    raise AotError("--aot needs the TPU compiler: pip install \"jax[tpu]\" (same jax version); "
                   "no TPU is needed.")
  # Only compiling, no chip is touched: several processes may load libtpu at once (otherwise
  # libtpu's lockfile lets one process at a time), and there are no TPU workers to find.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
  except Exception as e:  # pylint: disable=broad-except  (libtpu reports assorted errors)
    raise AotError(f"Cannot describe TPU topology {topology!r}: {e}") from e


def aot_config(config: ml_collections.ConfigDict, batch_per_device: int,
               num_devices: int) -> ml_collections.ConfigDict:
  """``config`` as it would run on the accelerator: the global batch is
  ``batch_per_device × num_devices`` per domain and 'auto' depthwise convolutions are XLA's
  grouped convolutions (the 'shift' formulation is the CPU choice)."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.data.batch_size = int(batch_per_device) * int(num_devices)
  if c.model.depthwise_impl == "auto":
    c.model.depthwise_impl = "xla"
  c.mesh.data = int(num_devices)
  return c


def abstract_batch(config: ml_collections.ConfigDict, sharding) -> dict[str, Any]:
  """Shapes/dtypes of one global training batch in the input pipeline's format (uint8 images
  with their unpadded sizes, int32 labels; ``benchmark.fake_batch``), sharded."""
  b = int(config.data.batch_size)
  h, w = config.data.crop_size
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
  return {"source_image": spec((b, h, w, 3), jnp.uint8), "source_size": spec((b, 2), jnp.int32),
          "source_label": spec((b, h, w), jnp.int32),
          "target_image": spec((b, h, w, 3), jnp.uint8), "target_size": spec((b, 2), jnp.int32),
          "target_valid": spec((b, h, w), jnp.float32),
          "target_label": spec((b, h, w), jnp.int32)}


def program_size(stablehlo: str, state_arrays: int) -> dict[str, int]:
  """What the compiler is given: StableHLO operations in all / in the top-level function (the
  rest sit in loop bodies and calls, compiled once each) and the train state's array count
  (each array gets its own optimizer and EMA update operations)."""
  op = re.compile(r"^\s*(?:%[^=]+= )?\"?(?:stablehlo|chlo)\.", re.M)
  ops = lambda text: len(op.findall(text))  # noqa: E731
  main = re.search(r"func\.func public @main\(.*?(?=\n  func\.func |\Z)", stablehlo, re.S)
  return {"hlo_ops": ops(stablehlo), "hlo_ops_top_level": ops(main.group(0)) if main else 0,
          "state_arrays": int(state_arrays)}


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux


def compile_step(config: ml_collections.ConfigDict, topology: str,
                 batch_per_device: int | None = None) -> dict[str, Any]:
  """Compiles the train step of ``config`` for ``topology``; returns the figures.

  Keys: topology, chip, devices, batch_per_device, lower_s, compile_s, hlo_ops,
  hlo_ops_top_level, state_arrays (``program_size``), host_peak_rss_gib (this process
  so far, i.e. at least the compiler's peak), per-device ``*_gib`` (argument, output, temp,
  alias, total = argument + output + temp − alias), hbm_gib, fits, xla_flops_per_device,
  xla_flops_per_step, xla_flops_per_image, bytes_accessed_per_device.
  """
  devices = topology_devices(topology)
  n = len(devices)
  per_device = batch_per_device or max(int(config.data.batch_size) // max(n, 1), 1)
  c = aot_config(config, per_device, n)
  mesh = Mesh(np.asarray(devices), (parallel.DATA_AXIS,))
  net = state_lib.build_network(c)
  task = state_lib.build_mfm_task(c)
  tx = state_lib.build_optimizer(c, net, task)
  state = state_lib.abstract_train_state(c, net, task, tx, NamedSharding(mesh, P()))
  batch = abstract_batch(c, NamedSharding(mesh, P(parallel.DATA_AXIS)))
  step, _ = jit_update_fn(c, net, task, tx, mesh)
  t0 = time.perf_counter()
  lowered = step.lower(state, batch)
  lower_s = time.perf_counter() - t0
  program = program_size(lowered.as_text(), len(jax.tree_util.tree_leaves(state)))
  t0 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  (XLA reports assorted errors)
    raise AotError(f"Compiling the step for {topology} failed: {e}") from e
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  arg, out = mem.argument_size_in_bytes / GIB, mem.output_size_in_bytes / GIB
  temp, alias = mem.temp_size_in_bytes / GIB, mem.alias_size_in_bytes / GIB
  total = arg + out + temp - alias
  kind = chip_kind(topology)
  flops = float(cost.get("flops", float("nan")))
  images = 2 * per_device  # source + target images per device per step
  return {
      "topology": topology, "chip": kind, "devices": n, "batch_per_device": per_device,
      "compute_dtype": c.model.compute_dtype, "remat": bool(c.model.remat),
      "lower_s": lower_s, "compile_s": compile_s, "host_peak_rss_gib": _peak_rss_gib(),
      **program,
      "argument_gib": arg, "output_gib": out, "temp_gib": temp, "alias_gib": alias,
      "total_gib": total, "hbm_gib": HBM_GIB[kind], "fits": total <= HBM_GIB[kind],
      "xla_flops_per_device": flops, "xla_flops_per_step": flops * n,
      "xla_flops_per_image": flops / images,
      "bytes_accessed_per_device": float(cost.get("bytes accessed", float("nan"))),
  }
