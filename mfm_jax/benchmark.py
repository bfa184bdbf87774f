r"""Step-time benchmark: ``python -m mfm_jax.benchmark --config=configs/mic_mfm.py[:preset]``.

Prints, for the configured UDA step on fake data of the configured crop and batch size:
compile time, median step time over ``--steps`` after ``--warmup``, images/s (source + target
images per step), peak device memory (GPU/TPU allocator) and XLA's temporary-buffer size of the
compiled step (any backend, the figure the memory switches such as ``model.remat`` change), XLA's FLOP count of the compiled step, an analytic FLOP
count, achieved TFLOP/s and MFU; the parameters and FLOPs of the deployed network with and
without MFM (equal: the Rebuilder is discarded); and, with ``--torch``, a side-by-side
supervised step of the same network in PyTorch and in JAX: our MiT + DAFormer segmentor and its
torch twin (``mfm_jax/torch_reference.py``) loaded with the same weights, forward + CE +
backward + AdamW with the same parameter groups, on the same batch and crop, in the same
process; wall time per step (median), process CPU time per step (user + system, median) and
their ratio (cores in use), and ``torch_over_jax`` = torch wall / JAX wall; and each side's
transient step memory (peak resident size during one step minus the resident size before it:
activations, gradients, temporaries; ``benchmark_ops.step_memory``). HRDA configs are
compared on their plain encoder-decoder at the configured crop. ``--depthwise`` times every
depthwise conv shape of the model in both formulations (``config.model.depthwise_impl``);
``--upsample`` every ×2 transposed conv of the MFM Rebuilder's projectors in both formulations of
``ops.conv_transpose_2x`` ('transpose', the default, vs 'subpixel').

Analytic FLOPs (documented): F = forward FLOPs of the deployed segmentor for one image
(XLA cost analysis of the inference forward). A training pass costs 3F (forward + backward),
a no-grad pass F. Per step with batch b per domain: source 3F·b, ClassMix 3F·b, MIC 3F·b,
MFM target encoder+decoder 3F·b (+ the Rebuilder, counted by XLA only), EMA teacher F·b,
ImageNet encoder ≈ F·b (upper bound: the encoder alone is cheaper).
"""

from __future__ import annotations

import json
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from mfm_jax.benchmark_ops import depthwise_shapes  # noqa: F401  (re-exported)
from mfm_jax.benchmark_ops import depthwise_table
from mfm_jax.benchmark_ops import step_memory
from mfm_jax.benchmark_ops import timed
from mfm_jax.benchmark_ops import upsample_shapes  # noqa: F401  (re-exported)
from mfm_jax.benchmark_ops import upsample_table
from mfm_jax.config import fragments
from mfm_jax.config import validation
from mfm_jax.models import mit
from mfm_jax.trainer import parallel
from mfm_jax.trainer import state as state_lib
from mfm_jax.trainer.step import jit_update_fn

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when it runs, so modules can be imported together)."""
  config_flags.DEFINE_config_file("config", None, "Config file[:preset].")
  flags.DEFINE_integer("steps", 20, "Timed steps (median reported).")
  flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
  flags.DEFINE_bool("torch", False, "Also time the same network's supervised step in PyTorch "
                    "and in JAX, side by side (mfm_jax/torch_reference.py).")
  flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads for --torch (0: torch's "
                       "default); on an oversubscribed CPU fewer OpenMP threads can be faster.")
  flags.DEFINE_string("json", "", "Also write the figures to this JSON file.")
  flags.DEFINE_bool("mfm_cost", True, "With MFM on: also compile the step without "
                    "MFM and print both steps' XLA FLOPs and temporary memory.")
  flags.DEFINE_bool(
      "depthwise", False, "Also time every depthwise conv shape of the model (forward + backward, "
      "batch 2+2) in both formulations of config.model.depthwise_impl ('xla' grouped conv vs "
      "'shift' multiply-adds).")
  flags.DEFINE_bool(
      "upsample", False, "Also time every ×2 transposed conv of the MFM Rebuilder's projectors "
      "(forward + backward) in both formulations of ops.conv_transpose_2x ('transpose' vs "
      "'subpixel').")
  flags.DEFINE_bool(
      "compile_only", False, "Compile the step and report XLA's memory and FLOP figures without "
      "running it (e.g. the full-size model's memory on a CPU machine).")
  flags.DEFINE_string(
      "aot", "", "Compile the real train step for a TPU topology without the hardware "
      "(e.g. v5e:2x2, v5p:2x2x1, v4:2x2x1, v6e:2x2; needs pip install \"jax[tpu]\") and print "
      "per-device memory, whether it fits the chip's HBM, compile time and FLOPs.")
  flags.DEFINE_integer("batch_per_device", 0, "--aot: source (and target) images per device "
                       "(default: config.data.batch_size / devices, at least 1).")


# Dense peak TFLOP/s by device kind (vendor data sheets; SXM parts).
_PEAK_TFLOPS = {
    ("H100", "bfloat16"): 989.0, ("H100", "float32"): 67.0,
    ("H200", "bfloat16"): 989.0, ("H200", "float32"): 67.0,
    ("A100", "bfloat16"): 312.0, ("A100", "float32"): 19.5,
}


def fake_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  """Random uint8 images and blocky random labels of the configured crop and global batch size
  (the input pipeline's format: images are normalised inside the step)."""
  rng = np.random.default_rng(seed)
  b, (h, w) = config.data.batch_size, config.data.crop_size
  k = config.model.num_classes
  blocks = rng.integers(0, k, (b, -(-h // 32), -(-w // 32)))
  lbl = blocks.repeat(32, 1).repeat(32, 2)[:, :h, :w].astype(np.int32)
  size = np.tile(np.array([h, w], np.int32), (b, 1))
  return dict(source_image=rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8),
              source_size=size, source_label=lbl,
              target_image=rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8),
              target_size=size.copy(), target_valid=np.ones((b, h, w), np.float32),
              target_label=np.full((b, h, w), 255, np.int32))


def _cost_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def deployed_figures(config) -> dict[str, Any]:
  """Parameters and forward FLOPs (one image) of the inference network.

  Counted with the MiT blocks unrolled: XLA's cost analysis counts a loop body once, not once
  per iteration, so a ``model.scan_blocks`` forward would count one block per stage.
  """
  config = config.copy_and_resolve_references()
  config.model.scan_blocks = False
  net = state_lib.build_network(config)
  h, w = config.data.crop_size
  x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  shapes = state_lib.abstract_variables(config, net)
  variables = {"params": shapes["params"]["model"], "batch_stats": shapes["batch_stats"]}
  n = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(variables["params"]))
  fwd = jax.jit(lambda v, x: net.predict(v, x, train=False)[0]).lower(variables, x).compile()
  return {"params": n, "forward_flops": _cost_flops(fwd),
          "tree": jax.tree_util.tree_structure(variables["params"])}


def compiled_step(config):
  """(compiled update, initial state, sharded batch, host batch, compile seconds, mesh)."""
  mesh = parallel.make_mesh(config.mesh.data)
  net = state_lib.build_network(config)
  task = state_lib.build_mfm_task(config)
  tx = state_lib.build_optimizer(config, net, task)
  repl = parallel.replicated(mesh)
  state = state_lib.create_train_state(config, net, task, tx, repl)
  host = fake_batch(config)
  batch = parallel.shard_batch(host, mesh)
  update, _ = jit_update_fn(config, net, task, tx, mesh)
  t0 = time.perf_counter()
  compiled = update.lower(state, batch).compile()
  return compiled, state, batch, host, time.perf_counter() - t0, mesh


def time_step(config, steps: int, warmup: int) -> dict[str, Any]:
  compiled, state, batch, _, compile_s, mesh = compiled_step(config)
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
  out = {"compile_s": compile_s, "xla_temp_gib": temp / 2**30 if temp is not None else None,
         "xla_step_flops": _cost_flops(compiled) * mesh.devices.size,
         "devices": mesh.devices.size, "step_s": None, "step_cpu_s": None, "peak_gib": None}
  if steps <= 0:  # compile only
    return out

  def step():
    nonlocal state
    state, m = compiled(state, batch)
    jax.block_until_ready(m)

  out["step_s"], out["step_cpu_s"] = timed(step, steps, warmup)
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["peak_gib"] = stats["peak_bytes_in_use"] / 2**30
  return out


def analytic_step_flops(config, forward_flops: float) -> float:
  b = config.data.batch_size
  passes = 3.0  # source
  if config.uda.enabled:
    passes += 3.0 + 1.0  # ClassMix + teacher
    if config.uda.mic.enabled:
      passes += 3.0
  if config.uda.fd.enabled:
    passes += 1.0
  if config.mfm.enabled:
    passes += 3.0 * (2 if config.mfm.domain == "both" else 1)
  return passes * forward_flops * b


def supervised_config(config):
  """The supervised-only step of ``config``'s network (source CE, no UDA, no MFM, no HRDA)."""
  sup = config.copy_and_resolve_references()
  fragments.source_only(sup)
  sup.mfm.enabled = False
  if sup.model.get("hrda") is not None:
    sup.model.hrda.enabled = False
  validation.validate(sup)
  return sup


def torch_comparison(config, steps: int, warmup: int, torch_threads: int = 0
                     ) -> dict[str, Any]:
  """The same network's supervised step in JAX and in PyTorch (same weights, batch, crop):
  forward + CE + backward + AdamW on both sides, timed one after the other in this process."""
  from mfm_jax import torch_reference  # pylint: disable=g-import-not-at-top
  from mfm_jax.models import segmentor  # pylint: disable=g-import-not-at-top
  sup = supervised_config(config)
  compiled, state, batch, host, _, _ = compiled_step(sup)
  variables = jax.device_get({"params": mit.unstack_blocks(state.params["model"]),
                              "batch_stats": state.batch_stats})
  twin_step, info = torch_reference.train_step(sup, variables, host, threads=torch_threads)

  def jax_step():
    nonlocal state
    state, m = compiled(state, batch)
    jax.block_until_ready(m)

  impl = segmentor._depthwise_impl(sup.model)  # pylint: disable=protected-access
  out = {"compared_network": f"{sup.model.backbone}+{sup.model.head}", "jax_depthwise_impl": impl}
  out["jax_supervised_step_s"], out["jax_supervised_cpu_s"] = timed(jax_step, steps, warmup)
  out["torch_step_s"], out["torch_cpu_s"] = timed(twin_step, steps, warmup)
  # Transient memory of one step on each side, after the timed steps (benchmark_ops.step_memory):
  # activations, gradients and temporaries, not the parameters and moments both keep.
  out["jax_step_transient_gib"] = step_memory(jax_step)
  out["torch_step_transient_gib"] = step_memory(twin_step)
  out.update(info)
  out["jax_cores_used"] = out["jax_supervised_cpu_s"] / out["jax_supervised_step_s"]
  out["torch_cores_used"] = out["torch_cpu_s"] / out["torch_step_s"]
  out["torch_over_jax"] = out["torch_step_s"] / out["jax_supervised_step_s"]
  out["jax_over_torch"] = 1.0 / out["torch_over_jax"]  # the CPU target: <= 1.0
  if out["jax_step_transient_gib"] and out["torch_step_transient_gib"]:
    out["jax_over_torch_transient"] = (out["jax_step_transient_gib"]
                                       / out["torch_step_transient_gib"])
  return out


def rebuilder_params(config) -> int:
  """Trainable parameters of the MFM Rebuilder (training only; 0 without one)."""
  task = state_lib.build_mfm_task(config)
  if task is None or not task.has_params:
    return 0
  feats = [jax.ShapeDtypeStruct((1, *s, c), jnp.float32)
           for s, c in zip(task.level_sizes, task.channels)]
  tree = jax.eval_shape(task.init, jax.random.key(0), feats)
  return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(tree))


def run(config, steps: int, warmup: int, with_torch: bool, mfm_cost: bool = True,
        torch_threads: int = 0) -> dict[str, Any]:
  validation.validate(config)
  device = jax.devices()[0]
  out: dict[str, Any] = {"device": f"{device.platform}:{device.device_kind}",
                         "date": time.strftime("%Y-%m-%d"),
                         "crop": tuple(config.data.crop_size),
                         "batch_per_domain": config.data.batch_size,
                         "dtype": config.model.compute_dtype}
  with_mfm, without = config.copy_and_resolve_references(), config.copy_and_resolve_references()
  without.mfm.enabled = False
  d_with, d_without = deployed_figures(with_mfm), deployed_figures(without)
  out["deployed_params"] = d_with["params"]
  out["deployed_params_without_mfm"] = d_without["params"]
  out["deployed_forward_gflops"] = d_with["forward_flops"] / 1e9
  out["deployed_forward_gflops_without_mfm"] = d_without["forward_flops"] / 1e9
  out["deployed_equal"] = (d_with["tree"] == d_without["tree"]
                           and d_with["params"] == d_without["params"]
                           and d_with["forward_flops"] == d_without["forward_flops"])
  out["rebuilder_params"] = rebuilder_params(config)
  out.update(time_step(config, steps, warmup))
  if mfm_cost and config.mfm.enabled:
    # The training cost of MFM: the same step compiled without it (XLA FLOPs and temporaries).
    base = time_step(without, 0, 0)
    out["xla_step_flops_without_mfm"] = base["xla_step_flops"]
    out["xla_temp_gib_without_mfm"] = base["xla_temp_gib"]
    out["mfm_step_flops_ratio"] = out["xla_step_flops"] / base["xla_step_flops"]
  out["analytic_step_tflops"] = analytic_step_flops(config, d_with["forward_flops"]) / 1e12
  if config.model.scan_blocks:  # XLA counts each scanned stage's block once, not depth times
    out["xla_flops_note"] = "lower bound: scan_blocks loop bodies counted once"
  if out["step_s"] is None:  # compile only
    return out
  out["images_per_s"] = 2 * config.data.batch_size / out["step_s"]
  out["achieved_tflops_s"] = out["analytic_step_tflops"] / out["step_s"]
  kind = next((k for k in ("H100", "H200", "A100") if k in device.device_kind), None)
  peak = _PEAK_TFLOPS.get((kind, config.model.compute_dtype)) if kind else None
  out["mfu"] = out["achieved_tflops_s"] / peak if peak else None
  if with_torch:
    out.update(torch_comparison(config, steps, warmup, torch_threads))
  return out


def aot_run(config, topology: str, batch_per_device: int = 0) -> dict[str, Any]:
  """``--aot``: the step compiled for a TPU topology (``trainer/aot.py``) plus the analytic
  FLOPs of the same step (the deployed forward's FLOPs from a CPU compile)."""
  from mfm_jax.trainer import aot  # pylint: disable=g-import-not-at-top
  validation.validate(config)
  out = {"date": time.strftime("%Y-%m-%d"), "crop": tuple(config.data.crop_size)}
  out.update(aot.compile_step(config, topology, batch_per_device or None))
  c = aot.aot_config(config, out["batch_per_device"], out["devices"])
  if c.model.get("hrda") is not None and c.model.hrda.enabled:
    # HRDA's deployed forward is a sliding-window inference over the whole crop, not the one
    # detail crop + context of a training pass: 14F·b does not describe its step.
    out["analytic_flops_per_step"] = "n/a (HRDA: inference forward is sliding-window)"
  else:
    forward = deployed_figures(c)["forward_flops"]  # one image, on this machine's backend
    out["analytic_flops_per_step"] = analytic_step_flops(c, forward)
    out["xla_over_analytic"] = out["xla_flops_per_step"] / out["analytic_flops_per_step"]
  if c.model.scan_blocks:  # XLA counts each scanned stage's block once, not depth times
    out["xla_flops_note"] = "lower bound: scan_blocks loop bodies counted once"
  return out


def main(argv):
  del argv
  if FLAGS.aot:
    out = aot_run(FLAGS.config, FLAGS.aot, FLAGS.batch_per_device)
  else:
    steps = 0 if FLAGS.compile_only else FLAGS.steps
    out = run(FLAGS.config, steps, FLAGS.warmup, FLAGS.torch and steps > 0, FLAGS.mfm_cost,
              FLAGS.torch_threads)
  width = max(len(k) for k in out)
  for k, v in out.items():
    v = f"{v:.4g}" if isinstance(v, float) else v
    print(f"{k:<{width}}  {v}")
  if FLAGS.depthwise and not FLAGS.aot:
    out["depthwise"] = depthwise_table(FLAGS.config, FLAGS.steps, FLAGS.warmup)
    print("depthwise conv, forward + backward (median ms):")
    for row in out["depthwise"]:
      print(f"  {row['shape']:>20} d={row['dilation']:<3} xla {row['xla_ms']:8.3f}  "
            f"shift {row['shift_ms']:8.3f}")
  if FLAGS.upsample and not FLAGS.aot:
    out["upsample"] = upsample_table(FLAGS.config, FLAGS.steps, FLAGS.warmup)
    print("Rebuilder x2 transposed conv, forward + backward (median ms):")
    for row in out["upsample"]:
      print(f"  {row['shape']:>24} x{row['count']}  transpose {row['transpose_ms']:8.3f}  "
            f"subpixel {row['subpixel_ms']:8.3f}")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(out, f, indent=2, default=str)
  logging.info("done")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)
