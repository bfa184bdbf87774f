"""Compares one train step on a device mesh with the same step on one device.

Run as a script (``python tests/parallel_check.py N [MESH ...]``, N simulated CPU devices chosen
before jax starts, meshes 4 and 8 by default); prints a JSON line with the largest differences
per mesh size. tests/test_parallel.py runs it once for the 4- and 8-device meshes: three
compiles (one device, 4, 8) in one process.

Both runs use a smooth stand-in for ReLU (``smooth_relu``). With ReLU the comparison is
ill-conditioned, not wrong: the tiny randomly initialised head has a few BN outputs within
~1e-6 of zero, the 1- and N-device programs round differently at that level, and one ReLU
that flips its gate moves the gradients of whole layers (measured on the 4-device batch: per-
leaf max relative difference 2.1e-2, global L2 8e-4, losses equal to 1e-7; the same run with
the ReLUs smooth: 3.2e-6). Which batches hit such a kink depends on the CPU's kernels, so the
check would pass or fail by machine. Sharding cannot tell the activations apart, so the smooth
version tests the same thing: that the mesh changes nothing but rounding.
"""

import contextlib
import json
import os
import sys
from unittest import mock

if __name__ == "__main__":
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={sys.argv[1]}"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from mfm_jax.config import fragments  # noqa: E402
from mfm_jax.trainer import parallel
from mfm_jax.trainer import state as state_lib
from mfm_jax.trainer.step import jit_update_fn  # noqa: E402


def tiny_config(global_batch: int):
  c = fragments.compose(fragments.mic, fragments.mfm, presets="synthetic")
  c.data.crop_size = (32, 32)
  c.data.batch_size = global_batch
  c.uda.mic.block_size = 4
  c.mfm.grid_size = 4
  c.model.head_dropout = 0.0  # dropout masks are sharding-invariant too, but keep it simple
  c.uda.pseudo_threshold = 0.0  # every pseudo-label counts: the MIC and MFM target terms are live
  c.model.depthwise_impl = "xla"  # ~20 % faster to compile than 'shift' (tested elsewhere)
  return c


def fake_batch(c, seed=0):
  rng = np.random.default_rng(seed)
  b, (h, w) = c.data.batch_size, c.data.crop_size
  lbl = rng.integers(0, 6, (b, h // 8, w // 8)).repeat(8, 1).repeat(8, 2)  # blocky classes
  size = np.tile(np.array([h, w], np.int32), (b, 1))
  size[0] = (h - 3, w - 5)  # one padded image: the pad is zeroed after normalisation
  return dict(
      source_image=rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8), source_size=size,
      source_label=np.where(rng.random((b, h, w)) < 0.05, 255, lbl).astype(np.int32),
      target_image=rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8), target_size=size[::-1],
      target_valid=np.ones((b, h, w), np.float32),
      target_label=np.full((b, h, w), 255, np.int32))


def run_step(c, mesh, batch, steps: int = 1):
  """Runs ``steps`` updates on ``mesh``; returns the last metrics (with grads) as numpy.

  One step by default: the gradients of a later step are taken at Adam-updated parameters,
  and Adam moves a parameter whose gradient is ~1e-11 (e.g. next to the zeroed padding) by
  about ±lr whatever its value, so rounding differences of step 1 become real differences of
  step 2. Gradients are compared, not Adam-updated parameters.
  """
  net = state_lib.build_network(c)
  task = state_lib.build_mfm_task(c)
  tx = state_lib.build_optimizer(c, net, task)
  repl = parallel.replicated(mesh)
  state = state_lib.create_train_state(c, net, task, tx, repl)
  update, _ = jit_update_fn(c, net, task, tx, mesh, donate=False, with_grads=True)
  for _ in range(steps):
    state, metrics = update(state, parallel.shard_batch(batch, mesh))
  return jax.tree_util.tree_map(np.asarray, jax.device_get(metrics))


@contextlib.contextmanager
def smooth_relu():
  """Within the block, the networks' ``nn.relu`` is GELU (see the module docstring)."""
  with mock.patch.object(nn, "relu", nn.gelu):
    yield


def max_grad_rel_diff(a, b) -> float:
  """Largest per-leaf ``max |a − b| / max |a|`` over two gradient trees."""
  rel = lambda x, y: float(np.max(np.abs(x - y)) / (np.max(np.abs(x)) + 1e-12))  # noqa: E731
  return max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(rel, a, b)))


def compare(meshes: tuple[int, ...] = (4, 8)) -> dict:
  """The one-device step against the same step on each mesh size in ``meshes`` (one global
  batch of ``max(meshes)`` images, so every mesh splits it evenly): per mesh size, the losses
  of both runs and the largest per-leaf relative gradient difference."""
  c = tiny_config(global_batch=max(meshes))
  batch = fake_batch(c)
  out = {}
  with smooth_relu():
    one = run_step(c, parallel.make_mesh(1), batch)
    for n in meshes:
      many = run_step(c, parallel.make_mesh(n), batch)
      losses = {k: (float(one[k]), float(many[k])) for k in one if k.startswith("loss/")}
      grad_rel = max_grad_rel_diff(one["grads"], many["grads"])
      out[str(n)] = {"devices": n, "losses": losses, "max_grad_rel_diff": grad_rel}
  return out


if __name__ == "__main__":
  jax.config.update("jax_compilation_cache_dir", os.environ.get(  # as tests/conftest.py
      "MFM_JAX_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mfm_jax_test_xla")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  print(json.dumps(compare(tuple(int(n) for n in sys.argv[2:]) or (4, 8))))
