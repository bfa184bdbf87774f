"""Data parallelism: a step on a 4- or 8-device mesh equals the single-device step."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _check(result):
  for name, (a, b) in result["losses"].items():
    assert a == pytest.approx(b, rel=2e-5, abs=1e-6), name
  assert result["max_grad_rel_diff"] < 1e-4, result


def test_four_and_eight_devices_equal_one():
  """One subprocess with 8 simulated devices: the one-device step against the 4- and 8-device
  meshes on the same global batch (one test, so the three compiles happen once)."""
  env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, os.path.join(HERE, "parallel_check.py"), "8", "4", "8"],
                     env=env, capture_output=True, text=True, timeout=1200)
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(r.stdout.strip().splitlines()[-1])
  assert sorted(result) == ["4", "8"]
  for n in ("4", "8"):
    _check(result[n])
    for name in ("loss/mic_ce", "loss/mfm_target"):  # the target terms are in play
      assert result[n]["losses"][name][0] > 0.1, (n, name)


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


def test_joint_encoder_equals_separate_passes():
  """model.joint_encoder: one encoder call for the source, ClassMix, MIC and MFM-target batches
  gives the per-pass losses and gradients (drop path off: the one thing it draws differently)."""
  import parallel_check  # pylint: disable=g-import-not-at-top
  from mfm_jax.trainer import parallel  # pylint: disable=g-import-not-at-top
  out = {}
  for joint in (False, True):
    c = parallel_check.tiny_config(global_batch=2)
    c.model.drop_path_rate = 0.0
    c.model.joint_encoder = joint
    c.mfm.rebuild = False  # MFM on the joint features without the Rebuilder: a smaller program
    with parallel_check.smooth_relu():
      out[joint] = parallel_check.run_step(c, parallel.make_mesh(1), parallel_check.fake_batch(c))
  for name in ("loss/src_ce", "loss/mix_ce", "loss/mic_ce", "loss/mfm_target"):
    assert out[True][name] > 0.1, name  # the term is in play
    assert out[True][name] == pytest.approx(out[False][name], rel=1e-5), name
  assert parallel_check.max_grad_rel_diff(out[False]["grads"], out[True]["grads"]) < 1e-4


def test_joint_encoder_only_for_per_image_encoders():
  from mfm_jax.config import fragments  # pylint: disable=g-import-not-at-top
  from mfm_jax.trainer import state as state_lib  # pylint: disable=g-import-not-at-top
  mit_net = state_lib.build_network(fragments.compose(fragments.mic, presets="synthetic"))
  assert mit_net.per_image_encoder
  dlv2 = fragments.compose(fragments.dacs, fragments.deeplabv2, presets="synthetic")
  net = state_lib.build_network(dlv2)
  assert not net.per_image_encoder
  with pytest.raises(ValueError, match="BatchNorm"):
    net.encode_many({}, [np.zeros((1, 8, 8, 3), np.float32)] * 2)
