"""Tests for mfm_jax.plot: metrics.jsonl → learning-curve PNG (matplotlib, Agg)."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from mfm_jax import plot


def _run(path, steps, miou_every=50, resumed_from=None):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "metrics.jsonl"), "a") as f:
    for s in range(resumed_from or 10, steps + 1, 10):
      f.write(json.dumps({"step": s, "loss/src_ce": 2.0 / s, "loss/mfm_target": 1.0 / s,
                          "pseudo_weight": 0.5, "lr": 6e-5}) + "\n")
      if s % miou_every == 0:
        f.write(json.dumps({"step": s, "eval/mIoU": s / 10, "eval/IoU/road": 90.0}) + "\n")


def test_read_metrics_resume_and_truncated_line(tmp_path):
  _run(tmp_path, 100)
  _run(tmp_path, 100, resumed_from=60)  # a resumed run logs steps 60..100 again
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 110, "loss/src')  # killed while writing
  series = plot.read_metrics(str(tmp_path))
  assert [s for s, _ in series["loss/src_ce"]] == list(range(10, 101, 10))
  assert series["eval/mIoU"] == [(50, 5.0), (100, 10.0)]
  assert plot.panel_keys([series]) == ["eval/mIoU", "loss/mfm_target", "loss/src_ce",
                                       "pseudo_weight", "lr"]
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "metrics.jsonl").write_text("nonsense\n{\"step\": 1}\n")
  with pytest.raises(ValueError, match=r"bad/metrics.jsonl:1: not a metrics record"):
    plot.read_metrics(str(tmp_path / "bad"))


def test_plot_runs_writes_a_png(tmp_path):
  _run(tmp_path / "a", 100)
  _run(tmp_path / "b", 60, miou_every=30)
  out = plot.plot_runs([str(tmp_path / "a"), str(tmp_path / "b")],
                       str(tmp_path / "figs" / "curves.png"), labels=["MIC", "MIC+MFM"])
  assert out == str(tmp_path / "figs" / "curves.png")
  image = PIL.Image.open(out)
  assert image.format == "PNG" and image.width > 800 and image.height > 200
  assert np.asarray(image.convert("L")).std() > 5  # something was drawn
  assert os.listdir(tmp_path / "figs") == ["curves.png"]  # no temporary file left
  with pytest.raises(FileNotFoundError, match=r"--workdir=.*nowhere.*metrics.jsonl"):
    plot.plot_runs([str(tmp_path / "nowhere")], str(tmp_path / "x.png"))
  with pytest.raises(ValueError, match="2 workdirs"):
    plot.plot_runs([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "x.png"),
                   labels=["one"])


def test_cli(tmp_path):
  _run(tmp_path / "a", 50)
  _run(tmp_path / "b", 50)
  res = subprocess.run([sys.executable, "-m", "mfm_jax.plot", f"--workdir={tmp_path / 'a'}",
                        str(tmp_path / "b")], capture_output=True, text=True, check=True)
  assert os.path.isfile(tmp_path / "a" / "curves.png") and "Wrote" in res.stdout
  res = subprocess.run([sys.executable, "-m", "mfm_jax.plot", f"--workdir={tmp_path / 'c'}"],
                       capture_output=True, text=True)
  assert res.returncode != 0 and "plot: error: --workdir=" in res.stderr
