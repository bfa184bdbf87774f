"""Our numbers against code nobody here wrote: cityscapesScripts' label table and its official
pixel-level evaluation (evalPixelLevelSemanticLabeling) on synthetic label maps."""

import importlib
import math

import numpy as np
import PIL.Image
import pytest

from mfm_jax.data import labels
from mfm_jax.evaluation import metrics

cs_labels = pytest.importorskip("cityscapesscripts.helpers.labels")


def test_label_table_equals_cityscapesscripts():
  theirs = {l.id: l.trainId for l in cs_labels.labels if l.id >= 0 and 0 <= l.trainId < 255}
  assert labels.CITYSCAPES_ID_TO_TRAIN_ID == theirs
  assert labels.CLASSES == tuple(cs_labels.trainId2label[t].name for t in range(19))
  assert labels.PALETTE == tuple(tuple(cs_labels.trainId2label[t].color) for t in range(19))
  # Every other id (trainId 255 / -1) is ignored in their evaluation and maps to 255 here.
  others = [l for l in cs_labels.labels if l.id >= 0 and l.id not in theirs]
  assert others and all(l.ignoreInEval for l in others)
  assert set(labels.CITYSCAPES_KNOWN_IDS) == {l.id for l in cs_labels.labels if l.id >= 0} | {255}
  ids = np.asarray([l.id for l in others], np.int32)
  assert (labels.to_train_ids(ids, labels.CITYSCAPES_ID_TO_TRAIN_ID) == 255).all()


def _label_maps(seed, shape=(37, 53)):
  """Label-id ground truth (all ids incl. ignored ones) and a train-id prediction that is
  right ~60 % of the time; 'train' never occurs in either (an absent class)."""
  rng = np.random.default_rng(seed)
  all_ids = np.asarray([l.id for l in cs_labels.labels if l.id >= 0 and l.name != "train"])
  gt_ids = rng.choice(all_ids, size=shape).astype(np.uint8)
  gt_train = labels.to_train_ids(gt_ids.astype(np.int32), labels.CITYSCAPES_ID_TO_TRAIN_ID)
  present = [t for t in range(19) if labels.CLASSES[t] != "train"]
  pred = np.where((rng.random(shape) < 0.6) & (gt_train < 19), gt_train,
                  rng.choice(present, size=shape)).astype(np.uint8)
  return gt_ids, gt_train, pred


def test_miou_equals_cityscapes_pixel_level_evaluation(tmp_path, monkeypatch):
  # The module reads these at import (result paths); keep it inside tmp_path.
  monkeypatch.setenv("CITYSCAPES_DATASET", str(tmp_path))
  monkeypatch.delenv("CITYSCAPES_RESULTS", raising=False)
  monkeypatch.delenv("CITYSCAPES_EXPORT_DIR", raising=False)
  cs_eval = importlib.import_module("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
  args = cs_eval.args
  args.evalInstLevelScore, args.evalPixelAccuracy, args.quiet = False, False, True
  conf_cs = cs_eval.generateMatrix(args)
  conf = np.zeros((19, 19), np.int64)
  for seed in range(4):
    gt_ids, gt_train, pred = _label_maps(seed)
    pred_ids = np.vectorize(lambda t: cs_labels.trainId2label[int(t)].id)(pred).astype(np.uint8)
    gt_path, pred_path = tmp_path / f"gt{seed}_labelIds.png", tmp_path / f"pred{seed}.png"
    PIL.Image.fromarray(gt_ids).save(gt_path)
    PIL.Image.fromarray(pred_ids).save(pred_path)
    cs_eval.evaluatePair(str(pred_path), str(gt_path), conf_cs, None, {}, args)
    conf += np.asarray(metrics.confusion_matrix(pred, gt_train, 19), np.int64)
  theirs = {cs_labels.id2label[l].name: cs_eval.getIouScoreForLabel(l, conf_cs, args)
            for l in args.evalLabels if not cs_labels.id2label[l].ignoreInEval}
  report = metrics.miou_report(conf)
  assert set(theirs) == set(report["per_class"])
  for name, iou in report["per_class"].items():
    if math.isnan(theirs[name]):
      assert math.isnan(iou) and name == "train", name
    else:
      assert iou / 100 == pytest.approx(theirs[name], abs=1e-12), name
  assert report["mIoU"] / 100 == pytest.approx(cs_eval.getScoreAverage(theirs, args), abs=1e-12)
  assert 0.2 < report["mIoU"] / 100 < 0.9  # a non-trivial case
