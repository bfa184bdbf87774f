"""End-to-end: the synthetic preset trains, checkpoints, resumes exactly, and stops safely."""

import json
import os

import jax
import numpy as np
import pytest

from mfm_jax.config import fragments
from mfm_jax.data import labels
from mfm_jax.trainer import checkpoint
from mfm_jax.trainer import loop
from mfm_jax.trainer import step as step_lib


def small_config(**overrides):
  c = fragments.compose(fragments.mic, fragments.mfm, presets="synthetic")
  c.data.synthetic.num_source = 12
  c.data.synthetic.num_target = 8
  c.data.synthetic.num_val = 4
  c.num_steps = 4
  c.log_every = 1
  c.eval_every = 100
  c.checkpoint_every = 2
  c.keep_checkpoints = 3
  # Small and on one device: multi-device equality is tests/test_parallel.py's job.
  c.mesh.data = 1
  c.data.crop_size = (32, 32)
  c.uda.mic.block_size = 2
  c.mfm.grid_size = 4
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


def _params(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step))
  return checkpoint.load_params(path, subtree=("params",))


def _val_labelled_pixels(c, data_dir=None):
  """Labelled (non-255) pixels of the whole validation split, from the class statistics."""
  from mfm_jax.data import splits  # pylint: disable=g-import-not-at-top
  from mfm_jax.data import synthetic
  if data_dir is None:
    data_dir = synthetic.ensure_synthetic(c.data)
  return int(splits.load_class_stats("cityscapes", "val", data_dir).sum())


def _check_report(report, labelled_pixels):
  """The report is consistent with its own table and covers the whole validation split."""
  assert list(report["per_class"]) == list(labels.CLASSES) and len(labels.CLASSES) == 19
  iou = np.array(list(report["per_class"].values()), np.float64)
  assert np.isfinite(report["mIoU"])
  assert report["mIoU"] == pytest.approx(np.nanmean(iou), abs=1e-9)
  assert report["num_pixels"] == labelled_pixels > 0
  # A class the model never predicts and that is absent from the labels has no IoU (NaN);
  # classes present in the labels always have one.
  acc = np.array(list(report["per_class_acc"].values()), np.float64)
  assert not np.isnan(iou[~np.isnan(acc)]).any()


def _same_report(a, b):
  for key in ("mIoU", "aAcc", "num_pixels"):
    assert a[key] == pytest.approx(b[key], abs=1e-9), key
  np.testing.assert_allclose(list(a["per_class"].values()), list(b["per_class"].values()),
                             atol=1e-9)


def _strict_json(text):
  def refuse(token):
    raise ValueError(f"non-standard JSON token {token}")
  return json.loads(text, parse_constant=refuse)


def test_train_resume_equals_uninterrupted(tmp_path, data_dir, capsys, caplog):
  full = str(tmp_path / "full")
  with caplog.at_level("INFO"):
    report = loop.train_and_evaluate(small_config(**{"data.data_dir": data_dir}), full)
  pixels = _val_labelled_pixels(small_config(**{"data.data_dir": data_dir}))
  _check_report(report, pixels)
  # The IoU table is printed once (stdout), not also logged.
  assert capsys.readouterr().out.count("mIoU19") == 1
  assert "IoU    Acc" not in caplog.text
  # Strict JSON: classes absent from the split are null, never a bare NaN.
  with open(os.path.join(full, "eval_results.json")) as f:
    results = _strict_json(f.read())
  assert results["mIoU"] == pytest.approx(report["mIoU"])
  assert None in results["per_class"].values()
  assert [n for n, v in results["per_class"].items() if v is None] == [
      n for n, v in report["per_class"].items() if np.isnan(v)]
  assert not os.path.exists(os.path.join(full, "run.lock"))  # released
  lines = [_strict_json(l) for l in open(os.path.join(full, "metrics.jsonl"))]
  keys = set().union(*lines)
  for k in ("loss/src_ce", "loss/fd", "loss/mix_ce", "loss/mic_ce", "loss/mfm_target",
            "loss/total", "pseudo_weight", "ema_alpha", "lr", "perf/steps_per_s",
            "perf/images_per_s", "perf/host_peak_rss_gib", "eval/mIoU", "eval/IoU/road"):
    assert k in keys, k
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(full))
  # TensorBoard's own reader: scalars, the IoU table (text) and validation pictures.
  from tensorboard.backend.event_processing import event_accumulator  # noqa: E402
  acc = event_accumulator.EventAccumulator(full, size_guidance={"images": 0, "tensors": 0})
  acc.Reload()
  assert [e.step for e in acc.Scalars("loss/total")] == [1, 2, 3, 4]
  assert acc.Scalars("eval/mIoU")[-1].value == pytest.approx(report["mIoU"], rel=1e-6)
  assert acc.Tensors("eval/iou_table/text_summary")[-1].step == 4
  image = acc.Images("eval/sample_0")[-1]  # image | prediction | ground truth
  assert image.step == 4 and image.width > 3 * 192 and image.height == 96

  # Stop at step 2 (as if killed), then resume to 4 in the same workdir.
  part = str(tmp_path / "part")
  out = loop.train_and_evaluate(small_config(**{"data.data_dir": data_dir}), part, stop_at=2)
  assert out == {"stopped_at": 2}
  resumed = loop.train_and_evaluate(small_config(**{"data.data_dir": data_dir}), part)
  _same_report(resumed, report)
  a, b = _params(full, 4), _params(part, 4)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)

  # A damaged newest checkpoint: moved aside with a warning, the run resumes from step 2 and
  # ends identical again.
  from test_checkpoint import _damage  # pylint: disable=g-import-not-at-top
  _damage(tmp_path / "part" / "checkpoints" / "4")
  caplog.clear()
  with caplog.at_level("WARNING"):
    loop.train_and_evaluate(small_config(**{"data.data_dir": data_dir}), part)
  assert "Checkpoint step 4" in caplog.text and "damaged" in caplog.text
  names = os.listdir(os.path.join(part, "checkpoints"))
  assert sorted(n for n in names if "damaged" not in n) == ["2", "4"]
  assert any(n.startswith("4.damaged-") for n in names)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, _params(part, 4))

  # Checkpoint evaluation: the trained Orbax checkpoint reproduces the run's own final report;
  # exported to a reference-named .pth and read back, it gives the same numbers again.
  from mfm_jax import evaluate  # pylint: disable=g-import-not-at-top
  from mfm_jax.convert import cli  # pylint: disable=g-import-not-at-top
  cfg = small_config(**{"data.data_dir": data_dir})
  ckpt_dir = os.path.join(full, "checkpoints")
  ev = evaluate.evaluate_checkpoint(cfg, ckpt_dir)
  assert ev["mIoU"] == pytest.approx(report["mIoU"], abs=1e-9)
  assert os.path.isfile(ckpt_dir + ".eval_student_whole.json")
  pth = str(tmp_path / "exported.pth")
  cli.export_to_torch(ckpt_dir, pth, arch="daformer")
  ev_pth = evaluate.evaluate_checkpoint(cfg, pth)
  assert ev_pth["mIoU"] == pytest.approx(report["mIoU"], abs=1e-9)
  teacher = evaluate.evaluate_checkpoint(cfg, ckpt_dir, which="teacher")
  _check_report(teacher, pixels)
  # The teacher is the EMA of the student's first steps, not the student itself.
  assert teacher["per_class"] != report["per_class"]


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, data_dir, monkeypatch):
  from mfm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  make = pipeline.make_train_iterator

  class Poisoned:
    """Yields a NaN target valid mask from the 3rd batch on (same compiled step, bad data;
    images are uint8 and cannot hold a NaN)."""

    def __init__(self, it):
      self.it, self.n = it, 0

    def __next__(self):
      batch = dict(next(self.it))
      self.n += 1
      if self.n >= 3:
        batch["target_valid"] = np.full_like(batch["target_valid"], np.nan)
      return batch

    def get_state(self):
      return self.it.get_state()

    def set_state(self, s):
      self.it.set_state(s)

  monkeypatch.setattr(pipeline, "make_train_iterator", lambda *a, **k: Poisoned(make(*a, **k)))
  work = str(tmp_path / "nan")
  # log_every=100: no metric is read at step 3 or 4; the flag carried in the state is read
  # before the save at step 4, which is refused.
  with pytest.raises(loop.NonFiniteLossError,
                     match=r"between steps 3 and 4.*last good checkpoint \(step 2\) is kept"
                     ) as err:
    loop.train_and_evaluate(small_config(**{"data.data_dir": data_dir, "log_every": 100}),
                             work)
  assert err.value.exit_code == 3
  ckpt = checkpoint.Checkpointer(os.path.join(work, "checkpoints"), keep=3)
  assert ckpt.latest_step() == 2
  params = _params(work, 2)
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


class _SignalAt:
  """Wraps the train iterator: sends ``sig`` to this process when batch ``n`` is fetched."""

  def __init__(self, it, n, sig):
    self.it, self.n, self.sig, self.count = it, n, sig, 0

  def __next__(self):
    self.count += 1
    if self.count == self.n:
      os.kill(os.getpid(), self.sig)
    return next(self.it)

  def get_state(self):
    return self.it.get_state()

  def set_state(self, s):
    self.it.set_state(s)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_stops_within_one_step_with_a_checkpoint(tmp_path, data_dir, monkeypatch, sig):
  import signal  # pylint: disable=g-import-not-at-top

  from mfm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  make = pipeline.make_train_iterator
  monkeypatch.setattr(pipeline, "make_train_iterator",
                      lambda *a, **k: _SignalAt(make(*a, **k), 3, getattr(signal, sig)))
  work = str(tmp_path / "term")
  # Neither a log step nor a checkpoint step comes near: the stop must not wait for one.
  cfg = small_config(**{"data.data_dir": data_dir, "log_every": 50, "checkpoint_every": 100})
  out = loop.train_and_evaluate(cfg, work)
  # The loop keeps 2 batches on the devices ahead of the step (parallel.DevicePrefetch): batch
  # 3 is fetched when step 2 is handed batch 2, so the signal arrives before step 2 runs and the
  # run stops right after it, with a checkpoint of step 2.
  assert out == {"stopped_at": 2, "preempted": sig, "saved": True}
  assert checkpoint.Checkpointer(os.path.join(work, "checkpoints"), keep=3).all_steps() == [2]
  assert not os.path.exists(os.path.join(work, "run.lock"))


def test_signal_during_compilation_exits_without_saving(tmp_path, data_dir, monkeypatch):
  import signal  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  tracing, release = threading.Event(), threading.Event()

  def make_signalling(*args, **kwargs):
    del args, kwargs

    def traced(state, batch):  # runs while the step is being traced/compiled
      del state, batch
      tracing.set()
      os.kill(os.getpid(), signal.SIGTERM)
      release.wait(600)  # blocked until the test has seen the loop return
      raise RuntimeError("test: compilation abandoned")
    return traced

  monkeypatch.setattr(step_lib, "make_update_fn", make_signalling)
  work = str(tmp_path / "compile")
  out = loop.train_and_evaluate(small_config(**{"data.data_dir": data_dir}), work)
  assert out == {"stopped_at": 0, "preempted": "SIGTERM", "saved": False}
  # The loop returned while the compilation was still blocked: it did not wait for it.
  assert tracing.is_set() and not release.is_set()
  release.set()
  for t in threading.enumerate():
    if t.name == "mfm_jax_compile":
      t.join()
  assert not any(t.name == "mfm_jax_compile" for t in threading.enumerate())
  assert checkpoint.Checkpointer(os.path.join(work, "checkpoints"), keep=3).all_steps() == []


def test_failed_save_stops_the_run_at_once(tmp_path, data_dir, monkeypatch):
  """A forced-failure checkpointer (full disk at step 4): the run stops with the path and the
  cause, the step-2 checkpoint stays restorable."""
  import errno  # pylint: disable=g-import-not-at-top

  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  original = ocp.CheckpointManager.save

  def full_disk(self, step, *args, **kwargs):
    if step == 4:
      raise OSError(errno.ENOSPC, "No space left on device", str(self.directory / "4"))
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
  work = str(tmp_path / "full_disk")
  with pytest.raises(checkpoint.CheckpointSaveError,
                     match=r"checkpoints/4 failed: OSError: .*No space left on device.*"
                           r"last good checkpoint \(step 2\) is kept") as err:
    loop.train_and_evaluate(small_config(**{"data.data_dir": data_dir}), work)
  assert err.value.exit_code == 4
  assert not os.path.exists(os.path.join(work, "eval_results.json"))
  params = _params(work, 2)
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))
  assert not os.path.exists(os.path.join(work, "run.lock"))


def test_hrda_mic_mfm_synthetic_trains(tmp_path, data_dir):
  """configs/mic_mfm.py (MIC(HRDA) + MFM) trains end to end on the synthetic preset."""
  c = fragments.compose(fragments.mic, fragments.hrda, fragments.mfm, presets="synthetic")
  assert c.model.hrda.enabled and c.mfm.enabled and c.uda.mic.enabled
  c.data.data_dir = data_dir
  c.data.synthetic.num_source, c.data.synthetic.num_target = 12, 8
  c.data.synthetic.num_val = 4
  c.mesh.data = 1
  c.num_steps, c.log_every, c.checkpoint_every = 2, 1, 2
  report = loop.train_and_evaluate(c, str(tmp_path / "hrda"))
  # HRDA slides over the whole 192×96 validation images: every labelled pixel is scored.
  _check_report(report, _val_labelled_pixels(c))
  lines = [json.loads(l) for l in open(tmp_path / "hrda" / "metrics.jsonl")]
  assert all(np.isfinite(l["loss/total"]) for l in lines if "loss/total" in l)
  assert {"loss/mic_ce", "loss/mfm_target", "loss/fd"} <= set().union(*lines)


def test_trains_on_prepared_gta5_and_cityscapes_folders(tmp_path, data_dir):
  """The real dataset names (gta5 → cityscapes) on raw folders prepared with the CLI path."""
  from mfm_jax.data import builders  # pylint: disable=g-import-not-at-top
  from mfm_jax.data import synthetic
  c = small_config(**{"data.data_dir": data_dir})
  synthetic.ensure_synthetic(c.data)
  raw = os.path.join(builders.raw_root(c.data), "synthetic", synthetic.synthetic_key(c.data))
  assert os.path.isdir(os.path.join(raw, "gta5", "images")), raw
  real = str(tmp_path / "prepared")
  builders.prepare("gta5", os.path.join(raw, "gta5"), real)
  builders.prepare("cityscapes", os.path.join(raw, "cityscapes"), real)
  c = small_config(**{"data.data_dir": real, "data.source": "gta5",
                      "data.target": "cityscapes", "num_steps": 4})
  report = loop.train_and_evaluate(c, str(tmp_path / "real"))
  # Scored on the prepared cityscapes val split (the same images as the synthetic one).
  pixels = _val_labelled_pixels(c, real)
  assert pixels == _val_labelled_pixels(small_config(**{"data.data_dir": data_dir}))
  _check_report(report, pixels)


def test_loss_decreases_on_a_fixed_batch(data_dir):
  """Source-only, one fixed batch, 20 jitted updates: the source CE must fall clearly (the
  step really applies its gradients, in the right direction, to the parameters it updates)."""
  from mfm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mfm_jax.trainer import parallel  # pylint: disable=g-import-not-at-top
  from mfm_jax.trainer import state as state_lib  # pylint: disable=g-import-not-at-top
  c = fragments.compose(fragments.source_only, presets="synthetic")
  c.data.data_dir = data_dir
  c.data.synthetic.num_source, c.data.synthetic.num_target = 12, 8
  c.data.synthetic.num_val = 4
  c.data.crop_size = (32, 32)
  c.mesh.data = 1
  c.optim.warmup_steps = 0  # full learning rate from the first step …
  c.num_steps = 1000  # … and nearly constant over the 20 steps (poly decay over 1000)
  mesh = parallel.make_mesh(1)
  net = state_lib.build_network(c)
  tx = state_lib.build_optimizer(c, net, None)
  state = state_lib.create_train_state(c, net, None, tx, parallel.replicated(mesh))
  batch = next(pipeline.make_train_iterator(c.data, seed=c.seed))
  assert (batch["source_label"] != 255).any()
  batch = parallel.shard_batch(batch, mesh)
  update, traces = step_lib.jit_update_fn(c, net, None, tx, mesh)
  losses = []
  for _ in range(20):
    state, metrics = update(state, batch)
    losses.append(float(metrics["loss/src_ce"]))
  assert traces() == 1 and int(state.step) == 20
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.7 * losses[0], losses


def test_step_traces_once_per_run(tmp_path, data_dir):
  """Evaluations and checkpoints between steps never retrace the step, in the first process
  call nor in the resumed one (the counter is logged as perf/step_traces)."""
  work = str(tmp_path / "traces")
  cfg = lambda: small_config(**{"data.data_dir": data_dir, "num_steps": 6, "eval_every": 2,  # noqa: E731
                                "checkpoint_every": 2, "log_every": 1})
  assert loop.train_and_evaluate(cfg(), work, stop_at=4) == {"stopped_at": 4}
  rows = [_strict_json(l) for l in open(os.path.join(work, "metrics.jsonl"))]
  first = len(rows)
  report = loop.train_and_evaluate(cfg(), work)
  assert np.isfinite(report["mIoU"])
  rows = [_strict_json(l) for l in open(os.path.join(work, "metrics.jsonl"))]
  traced = [(r["step"], r["perf/step_traces"]) for r in rows if "perf/step_traces" in r]
  assert traced == [(s, 1) for s in range(1, 7)], traced
  # Evaluations ran at steps 2 and 4 (first call) and 6 (resumed call).
  assert [r["step"] for r in rows if "eval/mIoU" in r] == [2, 4, 6]
  assert [r["step"] for r in rows[first:] if "perf/step_traces" in r] == [5, 6]
  assert checkpoint.Checkpointer(os.path.join(work, "checkpoints"), keep=3).all_steps() == [
      2, 4, 6]


def test_deeplabv2_mfm_trains_through_the_loop(tmp_path, data_dir):
  """DACS + DeepLabV2 (tiny ResNet-V1c) + MFM: trains, evaluates and checkpoints the ResNet,
  the DeepLabV2 head and a single-projector Rebuilder."""
  from mfm_jax.models import segmentor  # pylint: disable=g-import-not-at-top
  c = fragments.compose(fragments.dacs, fragments.deeplabv2, fragments.mfm,
                        presets="synthetic,steps=2")
  assert c.model.backbone == "resnet_tiny_v1c" and c.model.head.startswith("dlv2")
  c.data.data_dir = data_dir
  c.data.synthetic.num_source, c.data.synthetic.num_target = 12, 8
  c.data.synthetic.num_val = 4
  c.mesh.data = 1
  c.log_every = 1
  work = str(tmp_path / "dlv2")
  report = loop.train_and_evaluate(c, work)
  with open(os.path.join(work, "eval_results.json")) as f:
    results = _strict_json(f.read())
  assert np.isfinite(results["mIoU"]) and results["mIoU"] == pytest.approx(report["mIoU"])
  _check_report(report, _val_labelled_pixels(c))
  rows = [_strict_json(l) for l in open(os.path.join(work, "metrics.jsonl"))]
  steps = [r for r in rows if "loss/total" in r]
  assert [r["step"] for r in steps] == [1, 2]
  assert all(np.isfinite(r["loss/total"]) and np.isfinite(r["loss/mfm_target"]) for r in steps)
  params = _params(work, 2)
  assert set(params) == {"model", "rebuilder"}
  backbone, head = params["model"]["backbone"], params["model"]["decode_head"]
  assert {"stem_0", "layer1_0", "layer4_0"} <= set(backbone), sorted(backbone)
  assert any(k.startswith("aspp") for k in head), sorted(head)
  assert set(params["rebuilder"]) == {"embedding", "transformer", "projector"}
  proj = params["rebuilder"]["projector"]
  # One projector for the last level (not one per level: no 'projector<i>' children), and it
  # maps back to the ResNet's last-stage width.
  assert not any(k.startswith("projector") for k in proj), sorted(proj)
  assert np.shape(proj["norm"]["scale"]) == (segmentor.feature_channels(c.model)[-1],)


def test_step_on_uint8_images_equals_the_step_on_host_normalised_images(data_dir, monkeypatch):
  """The step normalises the pipeline's uint8 images itself (padding zeroed); the losses equal
  those of the same step fed the float images the host pipeline made before (Normalize → Pad
  on the host), up to float rounding."""
  from mfm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mfm_jax.data import transforms
  from mfm_jax.trainer import parallel
  from mfm_jax.trainer import state as state_lib
  c = small_config(**{"data.data_dir": data_dir})
  net, task = state_lib.build_network(c), state_lib.build_mfm_task(c)
  tx = state_lib.build_optimizer(c, net, task)
  state = state_lib.create_train_state(c, net, task, tx,
                                       parallel.replicated(parallel.make_mesh(1)))
  it = pipeline.make_train_iterator(c.data, seed=c.seed)
  batch = next(it)
  it.close()
  batch["source_size"][0] = (29, 27)  # as a padded image: the pad is zeroed after Normalize
  host = dict(batch)
  for d in ("source", "target"):
    x = (batch[f"{d}_image"].astype(np.float32) - transforms.MEAN) / transforms.STD
    for i, (h, w) in enumerate(batch[f"{d}_size"]):
      x[i, h:], x[i, :, w:] = 0.0, 0.0
    host[f"{d}_image"] = x
  _, on_device = jax.jit(step_lib.make_update_fn(c, net, task, tx))(state, batch)
  monkeypatch.setattr(step_lib.ops, "normalize_images", lambda images, sizes=None: images)
  _, on_host = jax.jit(step_lib.make_update_fn(c, net, task, tx))(state, host)
  losses = [k for k in on_device if k.startswith("loss/")]
  assert len(losses) >= 4, losses  # source, ClassMix, MIC, MFM terms and the total
  for k in losses:
    assert float(on_device[k]) == pytest.approx(float(on_host[k]), rel=1e-5, abs=1e-5), k


def test_scan_blocks_state_trains_and_resumes_in_either_layout(tmp_path, data_dir):
  """model.scan_blocks keeps a stage's MiT blocks stacked in the train state and its
  checkpoints; the same run resumes without scan_blocks (the checkpoint is converted), and
  checkpoint.load_params returns the per-block layout whichever was saved."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  c = fragments.compose(fragments.source_only, presets="synthetic,steps=2")
  c.data.data_dir = data_dir
  c.data.synthetic.num_source, c.data.synthetic.num_target = 12, 8
  c.data.synthetic.num_val = 4
  c.mesh.data = 1
  c.data.crop_size = (32, 32)
  c.model.backbone = "mit_b0"  # two blocks per stage (mit_tiny has one: nothing to stack)
  c.model.scan_blocks = True
  c.checkpoint_every = 2
  work = str(tmp_path / "scan")
  loop.train_and_evaluate(c, work)
  handler = ocp.PyTreeCheckpointHandler()
  saved = handler.metadata(epath.Path(work) / "checkpoints" / "2" / "state")
  handler.close()
  saved = saved.tree if hasattr(saved, "tree") else saved
  backbone = saved["params"]["model"]["backbone"]
  assert {"blocks1", "blocks4"} <= set(backbone) and "block1_0" not in backbone
  assert tuple(backbone["blocks1"]["norm1"]["scale"].shape) == (2, 32)
  params = _params(work, 2)["model"]["backbone"]
  assert {"block1_0", "block1_1", "block4_1"} <= set(params) and "blocks1" not in params
  # Resume the same workdir to step 3 with the blocks unrolled (per-block layout).
  c.model.scan_blocks = False
  c.num_steps = 3
  c.checkpoint_every = 3
  report = loop.train_and_evaluate(c, work)
  assert np.isfinite(report["mIoU"])
  rows = [_strict_json(l) for l in open(os.path.join(work, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "loss/total" in r] == [1, 2, 3]
  later = _params(work, 3)["model"]["backbone"]
  assert sorted(later) == sorted(params)
