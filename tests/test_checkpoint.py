"""Tests for mfm_jax.trainer.checkpoint: save/restore across meshes, keep-N, interval, atomicity, errors."""

import os
import shutil
import socket
import subprocess
import sys
import textwrap

from flax import struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.sharding import SingleDeviceSharding
import numpy as np
import optax
import pytest

from mfm_jax.trainer import checkpoint

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@struct.dataclass
class _State:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def _host_state(scale=1.0):
  params = {
      "model": {"w": np.arange(12, dtype=np.float32).reshape(4, 3) * scale,
                "b": np.full((3,), 0.5 * scale, np.float32)},
      "rebuilder": {"k": np.ones((2, 2), np.float32)},
  }
  opt_state = optax.adamw(1e-3).init(params)
  return _State(step=np.int32(7), params=params, opt_state=opt_state)


def _put(tree, sharding):
  return jax.tree.map(lambda x: jax.device_put(jnp.asarray(x), sharding), tree)


def _replicated4():
  return NamedSharding(Mesh(np.array(jax.devices()[:4]), ("data",)), P())


def _abstract(tree, sharding_fn):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype, sharding=sharding_fn(x)),
      tree)


def _assert_tree_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_save_restore_across_meshes(tmp_path):
  assert len(jax.devices()) >= 4
  net = _host_state()
  state = _put(net, _replicated4())
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", keep=2)
  assert ckpt.latest_step() is None
  assert ckpt.save(10, state, extra={"iterator": {"epoch": 1, "index": 42}})
  ckpt.wait()
  assert ckpt.latest_step() == 10

  # Onto a single device.
  one = SingleDeviceSharding(jax.devices()[0])
  restored, extra = ckpt.restore(_abstract(net, lambda x: one))
  _assert_tree_equal(restored, net)
  assert extra == {"iterator": {"epoch": 1, "index": 42}}
  assert restored.params["model"]["w"].sharding == one

  # Onto a 2-device mesh, with the first axis sharded where it divides.
  mesh2 = Mesh(np.array(jax.devices()[:2]), ("data",))
  def shard2(x):
    return NamedSharding(mesh2, P("data") if np.ndim(x) and np.shape(x)[0] % 2 == 0 else P())
  restored, _ = ckpt.restore(_abstract(net, shard2), step=10)
  _assert_tree_equal(restored, net)
  w = restored.params["model"]["w"]
  assert w.sharding.is_equivalent_to(NamedSharding(mesh2, P("data")), w.ndim)
  assert len(w.addressable_shards) == 2
  ckpt.close()


def test_every_save_writes_and_keep(tmp_path):
  state = _put(_host_state(), _replicated4())
  ckpt = checkpoint.Checkpointer(tmp_path, keep=2)
  saved = [s for s in (1, 5, 15) if ckpt.save(s, state)]
  assert saved == [1, 5, 15]  # the caller decides when; no interval policy in between
  assert ckpt.save(17, state)
  assert not ckpt.save(17, state)  # Already saved: no error, nothing written.
  ckpt.wait()
  assert ckpt.all_steps() == [15, 17]
  assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["15", "17"]
  ckpt.close()


def test_non_finite_state_is_refused(tmp_path):
  net = _host_state()
  ckpt = checkpoint.Checkpointer(tmp_path, keep=1)
  assert ckpt.save(1, _put(net, _replicated4()))
  ckpt.wait()
  bad = net.replace(params={**net.params, "model": {**net.params["model"],
                                                      "b": np.array([0., np.nan, 1.], np.float32)}})
  with pytest.raises(checkpoint.NonFiniteStateError, match="params/model/b"):
    ckpt.save(2, _put(bad, _replicated4()))
  with pytest.raises(checkpoint.CheckpointError, match="JSON"):
    ckpt.save(3, _put(net, _replicated4()), extra={"x": object()})
  ckpt.wait()
  assert ckpt.all_steps() == [1]  # keep=1 did not evict the good checkpoint.
  restored, extra = ckpt.restore(_abstract(net, lambda x: SingleDeviceSharding(jax.devices()[0])))
  _assert_tree_equal(restored, net)
  assert extra == {}
  ckpt.close()


def test_interrupted_save_is_not_picked_up(tmp_path):
  net = _host_state()
  root = tmp_path / "ckpt"
  ckpt = checkpoint.Checkpointer(root, keep=3)
  ckpt.save(3, _put(net, _replicated4()))
  ckpt.close()
  # What a save killed before Orbax's final rename leaves behind: complete data under the
  # temporary name (the strongest case: only the rename is missing).
  shutil.copytree(root / "3", root / "9.orbax-checkpoint-tmp-1700000000000000")
  ckpt = checkpoint.Checkpointer(root, keep=3)
  assert ckpt.latest_step() == 3
  assert ckpt.all_steps() == [3]
  one = SingleDeviceSharding(jax.devices()[0])
  restored, _ = ckpt.restore(_abstract(net, lambda x: one))
  _assert_tree_equal(restored, net)
  # A later save of that step works and is then the latest.
  assert ckpt.save(9, _put(_host_state(2.0), _replicated4()))
  ckpt.wait()
  assert ckpt.latest_step() == 9
  # The stale temporary directory was cleaned up at start-up (cleanup_tmp_directories).
  assert sorted(p.name for p in root.iterdir()) == ["3", "9"]
  assert checkpoint.load_params(root)["w"][1, 0] == 6.0
  ckpt.close()


def test_load_params_paths_and_errors(tmp_path):
  net = _host_state()
  root = tmp_path / "ckpt"
  ckpt = checkpoint.Checkpointer(root, keep=3)
  ckpt.save(4, _put(net, _replicated4()))
  ckpt.save(8, _put(_host_state(3.0), _replicated4()))
  ckpt.close()

  latest = checkpoint.load_params(root)
  assert set(latest) == {"w", "b"}
  assert isinstance(latest["w"], np.ndarray)
  np.testing.assert_array_equal(latest["w"], net.params["model"]["w"] * 3.0)
  np.testing.assert_array_equal(checkpoint.load_params(root / "4")["b"], net.params["model"]["b"])
  reb = checkpoint.load_params(root / "4" / "state", subtree=("params", "rebuilder"))
  np.testing.assert_array_equal(reb["k"], np.ones((2, 2), np.float32))

  with pytest.raises(checkpoint.CheckpointError, match="sub-tree 'params/decoder'"):
    checkpoint.load_params(root, subtree=("params", "decoder"))
  with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
    checkpoint.load_params(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(checkpoint.CheckpointError, match="empty.*not an Orbax checkpoint"):
    checkpoint.load_params(tmp_path / "empty")
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "notes.txt").write_text("hello")
  with pytest.raises(checkpoint.CheckpointError, match="junk"):
    checkpoint.load_params(tmp_path / "junk")

  # Corrupt: metadata garbage, then data files removed.
  shutil.copytree(root / "4", tmp_path / "bad_meta")
  (tmp_path / "bad_meta" / "state" / "_METADATA").write_text("{not json")
  with pytest.raises(checkpoint.CheckpointError, match="bad_meta"):
    checkpoint.load_params(tmp_path / "bad_meta")
  shutil.copytree(root / "4", tmp_path / "bad_data")
  for f in (tmp_path / "bad_data" / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(b"\0" * 7)
  with pytest.raises(checkpoint.CheckpointError, match="bad_data"):
    checkpoint.load_params(tmp_path / "bad_data")


def test_restore_errors(tmp_path):
  net = _host_state()
  ckpt = checkpoint.Checkpointer(tmp_path, keep=1)
  one = SingleDeviceSharding(jax.devices()[0])
  with pytest.raises(checkpoint.CheckpointError, match="No checkpoint found"):
    ckpt.restore(_abstract(net, lambda x: one))
  ckpt.save(2, _put(net, _replicated4()))
  with pytest.raises(checkpoint.CheckpointError, match="ShapeDtypeStruct with a sharding"):
    ckpt.restore(jax.eval_shape(lambda: _put(net, one)))
  with pytest.raises(checkpoint.CheckpointError, match=r"step 5 .* available steps: \[2\]"):
    ckpt.restore(_abstract(net, lambda x: one), step=5)
  ckpt.close()


_WORKER = textwrap.dedent("""
    import sys
    pid, port, workdir, repo = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    sys.path.insert(0, repo)
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from mfm_jax.trainer import checkpoint
    mesh = Mesh(np.array(jax.devices()), ("data",))
    repl, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    net = {"params": {"model": {"w": np.arange(8, dtype=np.float32).reshape(4, 2)}},
            "step": np.int32(5)}
    state = jax.tree.map(lambda x: jax.device_put(x, repl), net)
    ckpt = checkpoint.Checkpointer(workdir, keep=2)
    assert ckpt.save(5, state, extra={"data": [pid, 1]})  # Per-process iterator state.
    ckpt.wait()
    # NaN only in the rows held by process 1: every process must refuse (no one hangs).
    local = net["params"]["model"]["w"].copy()
    if pid == 1:
      local[:] = np.nan
    bad = {"params": {"model": {"w": jax.make_array_from_callback((4, 2), rows,
                                                                  lambda idx: local[idx])}},
           "step": state["step"]}
    try:
      ckpt.save(10, bad)
      raise SystemExit("a non-finite state was saved")
    except checkpoint.NonFiniteStateError:
      pass
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=rows if x.ndim else repl), net)
    restored, extra = ckpt.restore(abstract)
    assert extra == {"data": [pid, 1]}, extra
    w = restored["params"]["model"]["w"]
    assert len(w.addressable_shards) == 2
    for shard in w.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), net["params"]["model"]["w"][shard.index])
    assert ckpt.all_steps() == [5], ckpt.all_steps()
    ckpt.close()
    np.testing.assert_array_equal(checkpoint.load_params(workdir)["w"], net["params"]["model"]["w"])
    print(f"worker {pid}/{jax.process_count()} ok")
""")


def test_two_process_save_restore(tmp_path):
  """All processes call save/restore; Orbax coordinates the writes (2 processes x 2 CPUs)."""
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  procs = [subprocess.Popen(
      [sys.executable, str(script), str(pid), str(port), str(tmp_path / "ckpt"), _REPO],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for pid in (0, 1)]
  outputs = []
  for p in procs:
    try:
      outputs.append(p.communicate(timeout=120)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for pid, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0 and f"worker {pid}/2 ok" in out, out[-3000:]
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["5"]
  # This (single) process cannot take over the two processes' per-process `extra`.
  one = SingleDeviceSharding(jax.devices()[0])
  abstract = {"params": {"model": {"w": jax.ShapeDtypeStruct((4, 2), jnp.float32, sharding=one)}},
              "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=one)}
  with checkpoint.Checkpointer(tmp_path / "ckpt", keep=1) as ckpt:
    with pytest.raises(checkpoint.CheckpointError, match="`extra` of 2 processes"):
      ckpt.restore(abstract)


# ---------------------------------------------------------------- failures


def test_failed_save_stops_at_once_and_keeps_the_last_good(tmp_path, monkeypatch):
  """A forced failure inside Orbax's save (a full disk) raises at once, naming path and cause."""
  import errno  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  net = _host_state()
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", keep=1)
  assert ckpt.save(1, _put(net, _replicated4()))
  original = ocp.CheckpointManager.save

  def full_disk(self, step, *args, **kwargs):
    if step == 2:
      raise OSError(errno.ENOSPC, "No space left on device", str(self.directory / "2"))
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
  t0 = time.time()
  with pytest.raises(checkpoint.CheckpointSaveError) as err:
    ckpt.save(2, _put(_host_state(2.0), _replicated4()))
  assert time.time() - t0 < 10
  msg = str(err.value)
  assert str(tmp_path / "ckpt" / "2") in msg and "No space left on device" in msg
  assert "last good checkpoint (step 1) is kept" in msg
  assert err.value.exit_code == 4
  monkeypatch.undo()
  ckpt.close()
  one = SingleDeviceSharding(jax.devices()[0])
  with checkpoint.Checkpointer(tmp_path / "ckpt", keep=1) as again:
    assert again.all_steps() == [1]
    restored, _ = again.restore(_abstract(net, lambda x: one))
  _assert_tree_equal(restored, net)


_READ_ONLY = textwrap.dedent("""
    import os, subprocess, sys, time
    sys.path.insert(0, sys.argv[2])
    import jax.numpy as jnp
    from mfm_jax.trainer import checkpoint
    root = sys.argv[1]
    ckpt = checkpoint.Checkpointer(root, keep=1)
    ckpt.save(1, {"w": jnp.arange(4.0)})
    if os.geteuid() == 0:  # root ignores permission bits: make the directory immutable
      if subprocess.run(["chattr", "+i", root], capture_output=True).returncode:
        print("SKIP: cannot make the directory read-only"); sys.exit(0)
    else:
      os.chmod(root, 0o555)
    t0 = time.time()
    try:
      ckpt.save(2, {"w": jnp.arange(4.0) + 1})
      print("FAIL: saved into a read-only directory")
    except checkpoint.CheckpointSaveError as e:
      print(f"RAISED after {time.time() - t0:.1f}s: {e}")
    finally:
      if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", root])
      else:
        os.chmod(root, 0o755)
""")


def test_save_into_read_only_directory_fails_fast_and_the_process_exits(tmp_path):
  """The real failure of the probe: no background error, no 5-minute wait at exit."""
  import time  # pylint: disable=g-import-not-at-top
  script = tmp_path / "ro.py"
  script.write_text(_READ_ONLY)
  root = tmp_path / "ckpt"
  t0 = time.time()
  proc = subprocess.run([sys.executable, str(script), str(root), _REPO], capture_output=True,
                        text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  elapsed = time.time() - t0
  if "SKIP" in proc.stdout:
    pytest.skip(proc.stdout)
  assert proc.returncode == 0 and "RAISED" in proc.stdout, proc.stdout + proc.stderr[-3000:]
  assert str(root / "2") in proc.stdout and "last good checkpoint (step 1)" in proc.stdout
  assert elapsed < 60, elapsed  # whole process, start-up included
  assert checkpoint.load_params(root, subtree=("w",)).tolist() == [0.0, 1.0, 2.0, 3.0]


def _damage(step_dir):
  """Overwrites every array data file of a saved state (same size, garbage content)."""
  hit = 0
  for dirpath, _, files in os.walk(step_dir / "state"):
    for name in files:
      if os.sep + "d" in dirpath:
        path = os.path.join(dirpath, name)
        with open(path, "r+b") as f:
          f.write(b"\xff" * os.path.getsize(path))
        hit += 1
  assert hit


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax teardown
def test_damaged_newest_checkpoint_is_moved_aside(tmp_path, caplog):
  net = _host_state()
  root = tmp_path / "ckpt"
  ckpt = checkpoint.Checkpointer(root, keep=3)
  ckpt.save(1, _put(net, _replicated4()), extra={"data": 1})
  ckpt.save(2, _put(_host_state(2.0), _replicated4()), extra={"data": 2})
  ckpt.close()
  _damage(root / "2")
  one = SingleDeviceSharding(jax.devices()[0])
  ckpt = checkpoint.Checkpointer(root, keep=3)
  with pytest.raises(Exception):  # what a plain restore of the damaged step does
    ckpt.restore(_abstract(net, lambda x: one), step=2)
  with caplog.at_level("WARNING"):
    step, restored, extra = ckpt.restore_latest_good(_abstract(net, lambda x: one))
  assert step == 1 and extra == {"data": 1}
  _assert_tree_equal(restored, net)
  aside = [p.name for p in root.iterdir() if p.name.startswith("2" + checkpoint.DAMAGED_TAG)]
  assert len(aside) == 1 and "damaged" in caplog.text and aside[0] in caplog.text
  assert ckpt.all_steps() == [1]
  assert ckpt.save(2, _put(_host_state(3.0), _replicated4()))  # the step can be saved again
  ckpt.close()
  with checkpoint.Checkpointer(root, keep=3) as again:  # the damaged copy is kept and never listed
    assert again.all_steps() == [1, 2]
  assert aside[0] in os.listdir(root)


def test_config_mismatch_is_not_damage(tmp_path):
  net = _host_state()
  ckpt = checkpoint.Checkpointer(tmp_path, keep=3)
  ckpt.save(1, _put(net, _replicated4()))
  one = SingleDeviceSharding(jax.devices()[0])
  other = net.replace(params={**net.params, "model": {**net.params["model"],
                                                        "w": np.zeros((5, 3), np.float32)}})
  with pytest.raises(checkpoint.CheckpointError, match=r"does not fit .*other shape 1: "
                                                       r"params/model/w"):
    ckpt.restore_latest_good(_abstract(other, lambda x: one))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]
  assert checkpoint.Checkpointer(tmp_path / "empty", keep=3).restore_latest_good(
      _abstract(net, lambda x: one)) is None
  ckpt.close()


def test_a_checkpoint_in_the_other_block_layout_is_converted_on_restore(tmp_path):
  """model.scan_blocks keeps MiT blocks stacked in the state; a run resumes a checkpoint
  written in either layout, and load_params always returns the per-block layout."""
  from mfm_jax.models import mit  # pylint: disable=g-import-not-at-top
  blocks = {f"block2_{j}": {"w": np.full((3,), j, np.float32)} for j in range(3)}
  params = {"model": {"backbone": {**blocks, "norm2": {"s": np.ones(3, np.float32)}}}}
  per_block = _State(step=np.int32(3), params=params,
                     opt_state=optax.adamw(1e-3).init(params))
  repl = _replicated4()
  for written, wanted in ((per_block, mit.stack_blocks(per_block)),
                          (mit.stack_blocks(per_block), per_block)):
    root = tmp_path / str(len(os.listdir(tmp_path)))
    ckpt = checkpoint.Checkpointer(root, keep=3)
    ckpt.save(3, _put(written, repl))
    abstract = _abstract(wanted, lambda x: repl)
    with pytest.raises(checkpoint.CheckpointError, match="does not fit"):
      ckpt.restore_latest_good(abstract)  # without the conversion: a config mismatch
    convert = mit.stack_blocks if "blocks2" in str(jax.tree.structure(wanted)) else (
        mit.unstack_blocks)
    other = mit.unstack_blocks(abstract) if convert is mit.stack_blocks else (
        mit.stack_blocks(abstract))
    step, state, _ = ckpt.restore_latest_good(abstract, (other, convert))
    assert step == 3 and jax.tree.structure(state) == jax.tree.structure(wanted)
    _assert_tree_equal(state, wanted)
    assert all(x.sharding.is_equivalent_to(repl, x.ndim) for x in jax.tree.leaves(state))
    loaded = checkpoint.load_params(root, subtree=("params", "model"))
    _assert_tree_equal(loaded, params["model"])
    assert sorted(loaded["backbone"]) == ["block2_0", "block2_1", "block2_2", "norm2"]
    ckpt.close()
