"""Data parallelism: a step on a 4- or 8-device mesh equals the single-device step."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _check(result):
  for name, (a, b) in result["losses"].items():
    assert a == pytest.approx(b, rel=2e-5, abs=1e-6), name
  assert result["max_grad_rel_diff"] < 1e-4, result


def test_four_devices_equal_one():
  import parallel_check  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 4
  _check(parallel_check.compare(4))


def test_eight_devices_equal_one():
  env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, os.path.join(HERE, "parallel_check.py"), "8"], env=env,
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  _check(json.loads(r.stdout.strip().splitlines()[-1]))


class _Counter:
  """A checkpointable host iterator: batch i is {'x': [i] * 4}; state = the next i."""

  def __init__(self):
    self.i = 0

  def __next__(self):
    self.i += 1
    return {"x": np.full((4,), self.i - 1, np.int32)}

  def get_state(self):
    return {"step": self.i}

  def set_state(self, state):
    self.i = state["step"]


def test_device_prefetch_keeps_the_consumed_batch_state():
  """Batches come placed on the mesh (data-sharded) two ahead; the state is that of the last
  batch handed out, not of the prefetched ones, and set_state drops the prefetched ones."""
  from mfm_jax.trainer import parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh(4)
  host = _Counter()
  it = parallel.DevicePrefetch(host, mesh, size=2)
  assert it.get_state() == {"step": 0}
  first = next(it)
  assert first["x"].sharding == parallel.data_sharded(mesh)
  assert np.asarray(first["x"]).tolist() == [0] * 4
  assert it.get_state() == {"step": 1} and host.i == 2  # one batch placed ahead
  assert int(next(it)["x"][0]) == 1 and it.get_state() == {"step": 2} and host.i == 3
  it.set_state({"step": 1})  # as a resume from the checkpoint of step 1
  assert it.get_state() == {"step": 1}
  assert [int(next(it)["x"][0]) for _ in range(3)] == [1, 2, 3]
  assert it.get_state() == {"step": 4}
