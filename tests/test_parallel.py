"""Data parallelism: a step on a 4- or 8-device mesh equals the single-device step."""

import json
import os
import subprocess
import sys

import jax
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
