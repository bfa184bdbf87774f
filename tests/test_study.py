"""The study runner: grid expansion, command lines, skip/resume, aggregation, figures."""

import csv
import json
import math
import os

from absl import flags
from ml_collections import config_flags
import numpy as np
import pytest

from mfm_jax.config import fragments
from mfm_jax.config import validation
from mfm_jax.study import cli
from mfm_jax.study import grids
from mfm_jax.study import plots
from mfm_jax.study import results
from mfm_jax.study import runner

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- grids ------------------------------------------------------------------------------------


def test_hosts_grid_is_seed_major_with_pairs():
  runs = grids.study_runs("hosts")
  labels = ["source-only", "DACS", "DACS+MFM", "DAFormer", "DAFormer+MFM", "MIC(DAFormer)",
            "MIC(DAFormer)+MFM", "oracle"]
  assert [r.row.label for r in runs] == labels * 3
  assert [r.seed for r in runs] == [0] * 8 + [1] * 8 + [2] * 8
  assert len({r.name for r in runs}) == 24
  pairs = {r.row.label: r.row.baseline for r in runs if r.row.baseline}
  assert pairs == {"DACS+MFM": "DACS", "DAFormer+MFM": "DAFormer",
                   "MIC(DAFormer)+MFM": "MIC(DAFormer)"}
  assert all(r.row.config.endswith(":study") or r.row.config.endswith(":study,oracle")
             for r in runs)


def test_ablation_and_masking_grids():
  runs = grids.study_runs("ablations")
  assert sorted({r.seed for r in runs}) == [0, 1]
  overrides = {r.overrides for r in runs if r.seed == 0}
  expected = {(), *[((k, v),) for k, vs in (
      ("mfm.mask_ratio", (0.2, 0.6, 0.8)), ("mfm.rebuild", (False,)),
      ("mfm.objective", ("feature", "pixel")), ("mfm.domain", ("both", "source")),
      ("mfm.freeze", ("encoder", "decoder")), ("mfm.levels", ("last",))) for v in vs]}
  assert overrides == expected  # () twice: DAFormer and DAFormer+MFM (different configs)
  sweep = sorted(r.row.sweep[1] for r in runs if r.row.sweep and r.seed == 0)
  assert sweep == [0.2, 0.4, 0.6, 0.8]
  # Shared with the hosts study: same slug, same config.
  hosts = {r.row.slug: r.row.config for r in grids.study_runs("hosts")}
  for r in runs:
    if r.row.slug in hosts:
      assert hosts[r.row.slug] == r.row.config and not r.overrides
  masking = grids.study_runs("masking", seeds=[5])
  assert [r.name for r in masking] == ["daformer-s5", "daformer_mfm-s5",
                                       "daformer_mfm-mask_uncertainty-s5"]
  assert masking[2].overrides == (("mfm.mask_strategy", "uncertainty"),)


def test_select_and_errors():
  runs = grids.study_runs("hosts", seeds=[0, 1])
  plain = grids.select(runs, r"^(source_only|dacs|daformer|mic|oracle)-")
  assert [r.name for r in plain] == [f"{m}-s{s}" for s in (0, 1)
                                     for m in ("source_only", "dacs", "daformer", "mic", "oracle")]
  assert grids.select(runs, "") == runs
  with pytest.raises(ValueError, match="Unknown study"):
    grids.study_runs("nope")
  with pytest.raises(ValueError, match="Duplicate seeds"):
    grids.study_runs("hosts", seeds=[1, 1])


def _parse_like_main(cmd):
  """Parses a runner command line with the flags of mfm_jax.main (config_flags)."""
  argv = ["main"] + cmd[3:]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  fv(argv)
  return fv.config


@pytest.mark.parametrize("study", ["hosts", "ablations"])
def test_every_run_validates_and_its_command_gives_the_same_config(study, tmp_path):
  for run in grids.study_runs(study, seeds=[0, 3]):
    config = runner.build_config(run)
    validation.validate(config)
    assert config.seed == run.seed
    for key, value in run.overrides:
      assert runner.get_key(config, key) == value
    cmd = runner.command(run, str(tmp_path / run.name))
    assert cmd[1:3] == ["-m", "mfm_jax.main"]
    assert _parse_like_main(cmd).to_dict() == config.to_dict(), run.name


def test_unknown_override_key_is_reported_invalid(tmp_path):
  runs = grids.study_runs("hosts", seeds=[0])[:3]
  entries = runner.plan(runs, str(tmp_path), common=[("mfm.no_such_key", 1)])
  assert {e["status"] for e in entries} == {"invalid"}
  assert all("mfm.no_such_key" in e["error"] for e in entries)


# --- runner with a fake launcher: skip / resume -----------------------------------------------

_TINY_CFG = "configs/source_only.py:synthetic,steps=4"
_MIOU = {("a", 0): 40.0, ("b", 0): 41.0, ("a", 1): 42.0, ("b", 1): 45.5}


def _tiny_rows():
  return [grids.Row("a", "net", _TINY_CFG, sweep=("mask ratio", 0.0)),
          grids.Row("b", "net+MFM", _TINY_CFG, (("mfm.mask_ratio", 0.5),), baseline="net",
                    sweep=("mask ratio", 0.5))]


class FakeLauncher:
  """Writes what a finished (or, once, a killed) training run leaves in its workdir."""

  def __init__(self, kill=()):
    self.calls, self.kill = [], set(kill)

  def __call__(self, run, rdir, cmd, env):
    assert "JAX_COMPILATION_CACHE_DIR" in env and "--config.seed=%d" % run.seed in cmd
    self.calls.append(run.name)
    killed = run.name in self.kill
    self.kill.discard(run.name)
    start = runner.last_logged_step(rdir)
    last = 2 if killed else 4
    with open(os.path.join(rdir, "metrics.jsonl"), "a", encoding="utf-8") as f:
      for step in range(start + 1, last + 1):
        f.write(json.dumps({"step": step, "loss/total": 1.5 / step, "pseudo_weight": 0.5,
                            "loss/src_ce": 1.0 / step, "lr": 1e-3}) + "\n")
        if step in (2, 4):
          f.write(json.dumps({"step": step, "eval/mIoU": _MIOU[run.row.slug, run.seed] - 4 + step})
                  + "\n")
    if killed:
      return -9
    with open(os.path.join(rdir, "eval_results.json"), "w", encoding="utf-8") as f:
      miou = _MIOU[run.row.slug, run.seed]
      json.dump({"mIoU": miou, "per_class": {"road": miou + 10, "wall": math.nan}}, f)
    return 0


@pytest.fixture
def tiny_study(monkeypatch):
  monkeypatch.setitem(grids.STUDIES, "tiny", grids.Study(_tiny_rows, (0, 1), ("a", "b")))
  return "tiny"


def test_skip_and_resume(tiny_study, tmp_path):
  workdir = str(tmp_path)
  fake = FakeLauncher(kill={"b-s0"})
  out = cli.run_study(tiny_study, workdir, launcher=fake, figures=False,
                      log=lambda _: None)
  assert fake.calls == ["a-s0", "b-s0", "a-s1", "b-s1"]
  assert out["failed"] == ["b-s0"] and len(out["finished"]) == 3
  assert runner.last_logged_step(runner.run_dir(workdir, grids.study_runs("tiny")[1])) == 2

  fake.calls.clear()  # the study is started again: only the killed run runs, and resumes
  out = cli.run_study(tiny_study, workdir, launcher=fake, figures=False,
                      log=lambda _: None)
  assert fake.calls == ["b-s0"] and out["finished"] == ["b-s0"] and len(out["skipped"]) == 3
  spec = runner.read_spec(os.path.join(workdir, "runs", "b-s0"))
  assert [a["returncode"] for a in spec["attempts"]] == [-9, 0]
  assert all({"jax", "cpus", "xla_flags"} <= set(a) for a in spec["attempts"])
  assert spec["overrides"] == [["mfm.mask_ratio", 0.5], ["seed", 0]]
  assert spec["num_steps"] == 4

  fake.calls.clear()
  cli.run_study(tiny_study, workdir, launcher=fake, figures=False,
                      log=lambda _: None)
  assert not fake.calls

  # --only selects runs by name; a changed spec in an existing run dir is refused.
  fake.calls.clear()
  with pytest.raises(runner.SpecMismatchError, match="a-s0"):
    cli.run_study(tiny_study, workdir, launcher=fake, only="^a-s0$", figures=False,
                  common=[("optim.lr", 1e-3)], log=lambda _: None)
  assert not fake.calls
  records = results.collect(grids.study_runs(tiny_study), workdir, common=[("optim.lr", 1e-3)])
  assert {r["status"] for r in records} == {"other settings"}


def test_a_run_locked_by_another_study_process_is_left_alone(tiny_study, tmp_path):
  import fcntl  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path)
  rdir = os.path.join(workdir, "runs", "a-s0")
  os.makedirs(rdir)
  fake = FakeLauncher()
  with open(os.path.join(rdir, runner.LOCK_FILE), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)  # as the other process does while it trains a-s0
    out = cli.run_study(tiny_study, workdir, launcher=fake, figures=False, only="-s0$",
                        log=lambda _: None)
  assert out["busy"] == ["a-s0"] and fake.calls == ["b-s0"]
  out = cli.run_study(tiny_study, workdir, launcher=fake, figures=False, only="-s0$",
                      log=lambda _: None)
  assert out["finished"] == ["a-s0"] and out["skipped"] == ["b-s0"]


def test_finished_needs_the_final_evaluation(tmp_path):
  rdir = str(tmp_path)
  with open(os.path.join(rdir, "eval_results.json"), "w") as f:
    json.dump({"mIoU": 1.0, "per_class": {}}, f)
  with open(os.path.join(rdir, "metrics.jsonl"), "w") as f:
    f.write('{"step": 2, "eval/mIoU": 1.0}\n{"step": 4, "loss/total": 1.0}\n{"step": 4, "ev')
  assert not runner.is_finished(rdir, 4)  # e.g. num_steps raised after a finished run
  assert runner.is_finished(rdir, 2)
  assert runner.last_logged_step(rdir) == 4


# --- aggregation and outputs -----------------------------------------------------------------


def test_mean_std_and_paired_differences():
  assert results.mean_std([1.0, 2.0, 6.0]) == (3.0, pytest.approx(math.sqrt(7.0)))
  m, s = results.mean_std([5.0])
  assert m == 5.0 and math.isnan(s)
  rows = [grids.Row("h", "net", _TINY_CFG), grids.Row("m", "net+MFM", _TINY_CFG,
                                                       baseline="net")]
  runs = grids.expand(rows, [0, 1, 2])
  miou = {("net", 0): 40.0, ("net", 1): 42.0, ("net", 2): 44.0,
          ("net+MFM", 0): 41.0, ("net+MFM", 1): 45.0, ("net+MFM", 2): math.nan}
  records = [{"method": r.row.label, "seed": r.seed, "mIoU": miou[r.row.label, r.seed],
              "status": "pending" if r.name == "m-s2" else "finished"} for r in runs]
  summary = {row["method"]: row for row in results.summarize(records)}
  assert summary["net"]["n"] == 3 and summary["net"]["mean"] == pytest.approx(42.0)
  assert summary["net"]["std"] == pytest.approx(2.0)
  assert summary["net+MFM"]["n"] == 2 and summary["net+MFM"]["planned"] == 3
  (diff,) = results.paired_differences(records, runs)
  assert diff["by_seed"] == {0: 1.0, 1: 3.0}  # seed 2 lacks the MFM run
  assert diff["mean"] == pytest.approx(2.0) and diff["std"] == pytest.approx(math.sqrt(2.0))


def test_tables_and_figures_are_written(tiny_study, tmp_path):
  workdir = str(tmp_path)
  cli.run_study(tiny_study, workdir, launcher=FakeLauncher(), visual=False,
                log=lambda _: None)
  out = os.path.join(workdir, tiny_study)
  with open(os.path.join(out, "results.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["run"] for r in rows] == ["a-s0", "b-s0", "a-s1", "b-s1"]
  assert [float(r["mIoU"]) for r in rows] == [40.0, 41.0, 42.0, 45.5]
  assert rows[1]["overrides"] == "mfm.mask_ratio=0.5" and "IoU road" in rows[0]
  assert "IoU wall" not in rows[0]  # NaN in every run: not a column
  assert all(float(r["wall_s"]) >= 0 for r in rows)
  with open(os.path.join(out, "results.json")) as f:
    doc = json.load(f)
  (diff,) = doc["paired_differences"]
  assert diff["mean"] == pytest.approx(2.25) and diff["by_seed"] == {"0": 1.0, "1": 3.5}
  assert doc["runs"][0]["per_class"]["wall"] is None
  md = open(os.path.join(out, "summary.md")).read()
  assert "| net+MFM | 2/2 | 43.25 ± 3.18 |" in md
  assert "| net+MFM − net | 2 | +2.25 ± 1.77 |" in md
  for name in ("methods.png", "sweep.png", "curves.png"):
    with open(os.path.join(out, name), "rb") as f:
      assert f.read(8) == PNG_MAGIC, name
  curves = plots.curves(os.path.join(workdir, "runs", "a-s0"))
  assert list(curves["eval/mIoU"][0]) == [2, 4]
  assert plots.curve_keys([curves]) == ["eval/mIoU", "loss/src_ce", "loss/total",
                                        "pseudo_weight"]


def test_merge_fills_unfinished_runs_from_an_earlier_results_csv(tiny_study, tmp_path):
  first, second = str(tmp_path / "machine1"), str(tmp_path / "machine2")
  cli.run_study(tiny_study, first, launcher=FakeLauncher(), figures=False, only="-s0$",
                log=lambda _: None)
  old_csv = os.path.join(first, tiny_study, "results.csv")
  cli.run_study(tiny_study, second, launcher=FakeLauncher(), figures=False, only="-s1$",
                log=lambda _: None)
  # Without --merge, seed 0 is pending here; with it, the study is reported as one.
  runs = grids.study_runs(tiny_study)
  records = results.collect(runs, second)
  assert [r["status"] for r in records] == ["pending", "pending", "finished", "finished"]
  logged = []
  paths = cli.report(tiny_study, runs, second, visual=False, merge=[old_csv],
                     log=logged.append)
  with open(paths["csv"], newline="") as f:
    rows = list(csv.DictReader(f))
  assert [float(r["mIoU"]) for r in rows] == [40.0, 41.0, 42.0, 45.5]
  assert [r["source"] for r in rows] == [old_csv, old_csv, "", ""]
  assert float(rows[0]["IoU road"]) == 50.0
  md = open(paths["md"]).read()
  assert "| net+MFM − net | 2 | +2.25 ± 1.77 |" in md and old_csv in md
  # A run of the old table with other settings is not merged, and the log says why.
  with open(old_csv, newline="") as f:
    table = list(csv.DictReader(f))
  table[1]["overrides"] = "mfm.mask_ratio=0.9"
  with open(old_csv, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(table[0]))
    w.writeheader()
    w.writerows(table)
  merged = results.merge(results.collect(runs, second), results.read_csv(old_csv),
                         log=logged.append)
  assert [r["status"] for r in merged] == ["finished", "pending", "finished", "finished"]
  assert any("b-s0" in m and "other settings" in m for m in logged)
  # A run that finished here wins over the old table.
  assert merged[3]["source"] == "" and merged[3]["mIoU"] == 45.5
  bad = tmp_path / "bad.csv"
  bad.write_text("a,b\n1,2\n")
  with pytest.raises(ValueError, match="bad.csv.*columns"):
    results.read_csv(str(bad))
  with pytest.raises(ValueError, match="nope.csv"):
    results.read_csv(str(tmp_path / "nope.csv"))


def test_parse_override():
  assert cli.parse_override("data.data_dir=/x/y") == ("data.data_dir", "/x/y")
  assert cli.parse_override("num_steps=20") == ("num_steps", 20)
  assert cli.parse_override("data.crop_size=(32, 32)") == ("data.crop_size", (32, 32))
  with pytest.raises(ValueError, match="KEY=VALUE"):
    cli.parse_override("oops")


# --- end to end: real subprocess runs, then the prediction grid --------------------------------


@pytest.mark.slow
def test_real_two_run_study_and_prediction_grid(tmp_path, monkeypatch):
  from mfm_jax.study import visual  # pylint: disable=g-import-not-at-top
  rows = [grids.Row("src", "source-only", "configs/source_only.py:synthetic"),
          grids.Row("orc", "oracle", "configs/source_only.py:synthetic,oracle")]
  monkeypatch.setitem(grids.STUDIES, "e2e", grids.Study(lambda: rows, (0,), ("src", "orc")))
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", os.path.join(
      os.path.expanduser("~"), ".cache", "mfm_jax_test_xla"))
  common = [("data.data_dir", str(tmp_path / "data")), ("data.synthetic.num_source", 12),
            ("data.synthetic.num_target", 8), ("data.synthetic.num_val", 2),
            ("data.crop_size", (32, 32)), ("uda.mic.block_size", 2), ("num_steps", 2),
            ("log_every", 1), ("checkpoint_every", 2), ("mesh.data", 1)]
  workdir = str(tmp_path / "study")
  out = cli.run_study("e2e", workdir, common=common, visual=False, log=lambda _: None)
  assert out["finished"] == ["src-s0", "orc-s0"], out
  with open(os.path.join(workdir, "e2e", "results.json")) as f:
    runs = json.load(f)["runs"]
  assert [r["status"] for r in runs] == ["finished"] * 2
  assert all(0 <= r["mIoU"] <= 100 and r["wall_s"] > 0 for r in runs)
  config = visual.load_run_config(os.path.join(workdir, "runs", "src-s0"))
  assert tuple(config.data.crop_size) == (32, 32) and config.num_steps == 2
  png = visual.prediction_grid([os.path.join(workdir, "runs", n) for n in ("src-s0", "orc-s0")],
                               str(tmp_path / "grid.png"), ["source-only", "oracle"],
                               num_images=2)
  with open(png, "rb") as f:
    assert f.read(8) == PNG_MAGIC
  images, gts, preds = visual.predict_images(
      [os.path.join(workdir, "runs", "src-s0")], num_images=2)
  assert len(images) == len(gts) == len(preds[0]) == 2
  assert images[0].dtype == np.uint8 and images[0].shape[:2] == gts[0].shape == (96, 192)
  assert preds[0][0].shape == gts[0].shape
  # Colourised with the Cityscapes palette: road is (128, 64, 128), ignore black.
  rgb = visual.colourise(np.array([[0, 255]]))
  assert rgb.tolist() == [[[128, 64, 128], [0, 0, 0]]]


# --- the latent-mask figure ------------------------------------------------------------------


def test_pc1_and_masked_cosine():
  from mfm_jax.study import latent  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  orig = rng.normal(size=(4, 4, 6))
  orig[..., 0] *= 10  # the dominant direction
  p_orig, p_same = latent._pc1(orig, orig.copy())  # pylint: disable=protected-access
  np.testing.assert_allclose(p_orig, p_same)
  assert abs(np.corrcoef(p_orig.ravel(), orig[..., 0].ravel())[0, 1]) > 0.95
  masked = np.zeros((4, 4), bool)
  masked[:2] = True
  assert latent.masked_cosine(orig, orig, masked) == pytest.approx(1.0)
  assert latent.masked_cosine(orig, -orig, masked) == pytest.approx(-1.0)
  assert np.isnan(latent.masked_cosine(orig, orig, np.zeros((4, 4), bool)))


def test_latent_figure_on_a_one_step_mfm_run(tmp_path):
  """A one-step DACS+MFM run: the figure is written, visible cells are the encoder's own."""
  from mfm_jax.config import fragments  # pylint: disable=g-import-not-at-top
  from mfm_jax.study import latent  # pylint: disable=g-import-not-at-top
  from mfm_jax.trainer import loop
  c = fragments.compose(fragments.dacs, fragments.mfm, presets="synthetic")
  c.data.synthetic.num_source, c.data.synthetic.num_target, c.data.synthetic.num_val = 8, 4, 2
  c.data.data_dir = str(tmp_path / "data")
  c.mesh.data = 1
  workdir = str(tmp_path / "run")
  assert loop.train_and_evaluate(c, workdir, stop_at=1) == {"stopped_at": 1}
  out = latent.rebuild_one(workdir, seed=3)
  assert out["levels"] == [0, 1, 2, 3] and out["keep"].shape == (2, 2)
  for orig, reb in zip(out["original"], out["rebuilt"]):
    assert orig.shape == reb.shape
    k = np.kron(out["keep"], np.ones((orig.shape[0] // 2, orig.shape[1] // 2))) > 0.5
    np.testing.assert_array_equal(orig[k], reb[k])
  cos = latent.latent_figure(workdir, str(tmp_path / "latent.png"), seed=3)
  assert sorted(cos) == ["level_1", "level_2", "level_3", "level_4"]
  with open(tmp_path / "latent.png", "rb") as f:
    assert f.read(8) == PNG_MAGIC
