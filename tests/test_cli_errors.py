"""User errors on the command line: one message naming the problem, no traceback (unless
--verbose / MFM_JAX_VERBOSE=1), a non-zero exit, and nothing written before config checks."""

import errno
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from mfm_jax.config import validation
from mfm_jax.runtime import errors
from mfm_jax.runtime import json_io
from mfm_jax.trainer import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args, verbose=False, timeout=180):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  env.pop("MFM_JAX_VERBOSE", None)
  if verbose:
    env["MFM_JAX_VERBOSE"] = "1"
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _one_clean_error(r, *needles):
  assert r.returncode == errors.USER_ERROR, (r.returncode, r.stderr[-3000:])
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  lines = [l for l in r.stderr.splitlines() if ": error: " in l]
  assert len(lines) == 1, r.stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


def test_main_bad_crop_and_dataset_name_before_the_workdir(tmp_path):
  work = tmp_path / "w"
  r = _run("mfm_jax.main", "--config=configs/mic_mfm_daformer.py:synthetic",
           "--config.data.crop_size=(65,65)", f"--workdir={work}")
  _one_clean_error(r, "config.data.crop_size=(65, 65)", "multiple of 32")
  assert not work.exists()
  r = _run("mfm_jax.main", "--config=configs/mic_mfm_daformer.py:synthetic",
           "--config.data.source=gta6", f"--workdir={work}", verbose=True)
  assert r.returncode == 1 and "config.data.source='gta6'" in r.stderr
  assert "Traceback" in r.stderr  # the verbose switch shows it
  assert not work.exists()


def test_evaluate_prepare_and_convert_errors_are_one_line(tmp_path):
  r = _run("mfm_jax.evaluate", "--config=configs/mic_mfm_daformer.py:synthetic",
           f"--checkpoint={tmp_path / 'nope'}")
  _one_clean_error(r, str(tmp_path / "nope"), "does not exist")

  raw = tmp_path / "gta"
  for sub in ("images", "labels"):
    (raw / sub).mkdir(parents=True)
  PIL.Image.fromarray(np.zeros((6, 9, 3), np.uint8)).save(raw / "images" / "a.png")
  PIL.Image.fromarray(np.full((6, 9), 7, np.uint8)).save(raw / "labels" / "a.png", format="JPEG")
  r = _run("mfm_jax.data.prepare", "--dataset=gta5", f"--raw_dir={raw}",
           f"--data_dir={tmp_path / 'tfds'}", "--num_workers=1")
  _one_clean_error(r, str(raw / "labels" / "a.png"), "JPEG")

  torch = pytest.importorskip("torch")

  class Evil:  # pylint: disable=too-few-public-methods
    def __reduce__(self):
      return (os.system, ("echo EXECUTED",))

  pth = tmp_path / "evil.pth"
  torch.save({"state_dict": {"w": torch.zeros(2)}, "meta": Evil()}, pth)  # zip format
  r = _run("mfm_jax.convert", f"--input={pth}", f"--output={tmp_path / 'out'}")
  line = _one_clean_error(r, "Refusing to load", "nothing was executed")
  assert "system" in line and "truncated" not in line and "EXECUTED" not in r.stdout


def test_guard_maps_errors_to_exit_codes(capsys, monkeypatch):
  monkeypatch.delenv("MFM_JAX_VERBOSE", raising=False)

  def fail(error):
    def main(argv):
      del argv
      raise error
    return main

  cases = [(validation.ConfigError("config.x=1 is bad"), 1),
           (checkpoint.CheckpointSaveError("disk full"), 4),
           (checkpoint.NonFiniteStateError("nan"), 3),
           (PermissionError(errno.EACCES, "Permission denied", "/x"), 1)]
  for error, code in cases:
    with pytest.raises(SystemExit) as exit_info:
      errors.guard(fail(error), ["prog"])
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    assert str(error) in err and "Traceback" not in err and err.count("\n") == 1
  with pytest.raises(KeyError):  # a bug keeps its traceback
    errors.guard(fail(KeyError("bug")), ["prog"])


def test_strict_json():
  text = json_io.dumps({"a": float("nan"), "b": [np.float32(np.inf), 1.5], "c": np.int64(3)})
  assert text == '{"a": null, "b": [null, 1.5], "c": 3}'


def test_main_exits_75_on_sigterm(tmp_path):
  """The scheduler sees a distinct code: SIGTERM once the run owns its workdir → exit 75 (here
  before the first step, so nothing is saved and no model is compiled)."""
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  work = tmp_path / "w"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  proc = subprocess.Popen(
      [sys.executable, "-m", "mfm_jax.main", "--config=configs/source_only.py:synthetic",
       f"--workdir={work}", f"--config.data.data_dir={tmp_path / 'data'}",
       "--config.data.synthetic.num_source=8", "--config.data.synthetic.num_target=4",
       "--config.data.synthetic.num_val=2"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while not (work / "run.lock").exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == errors.PREEMPTED == 75, err[-3000:]
  assert "SIGTERM" in err and "Traceback" not in err, err[-3000:]
  assert not (work / "run.lock").exists()
