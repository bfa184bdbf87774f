"""Two local processes (jax.distributed on CPU) train like one process with the same global batch.

The source-only step keeps the three compilations cheap; that the full MIC + MFM step is
sharding-invariant is tested in tests/test_parallel.py.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _args(workdir, data_dir):
  return [sys.executable, "-m", "mfm_jax.main", "--config=configs/source_only.py:synthetic",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
          "--config.data.synthetic.num_source=12", "--config.data.synthetic.num_target=8",
          "--config.data.synthetic.num_val=4", "--config.num_steps=3", "--config.log_every=1",
          "--config.eval_every=100", "--config.checkpoint_every=3",
          "--config.data.crop_size=(32,32)"]


def _env(devices):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if '"loss/total"' in l]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  data_dir = str(tmp_path / "data")
  one = str(tmp_path / "one")
  r = subprocess.run(_args(one, data_dir), cwd=ROOT, env=_env(2), capture_output=True,
                     text=True, timeout=1200)
  assert r.returncode == 0, r.stderr[-3000:]
  port = _free_port()
  two = str(tmp_path / "two")
  procs = [subprocess.Popen(
      _args(two, data_dir) + [f"--coordinator_address=localhost:{port}", "--num_processes=2",
                              f"--process_id={i}"],
      cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=1200) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  a, b = _metrics(one), _metrics(two)
  assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3]
  for ma, mb in zip(a, b):
    for k in ma:
      if k.startswith("loss/"):
        assert ma[k] == pytest.approx(mb[k], rel=1e-4, abs=1e-6), (ma["step"], k)
  with open(os.path.join(one, "eval_results.json")) as f1, open(
      os.path.join(two, "eval_results.json")) as f2:
    assert json.load(f1)["mIoU"] == pytest.approx(json.load(f2)["mIoU"], abs=1e-6)
