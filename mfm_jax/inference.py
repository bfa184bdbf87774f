"""Inference for evaluation: 'whole' and 'slide' modes on top of a ``SegmentationHost``.

Reference (uda_reference.md §4): DAFormer evaluates 'whole' images at the test scale with
logits bilinearly resized to the full-resolution label; HRDA / MIC(HRDA) use 'slide' windows
(crop 1024, stride 512) whose logits are averaged by a count map. Prediction = argmax after the
resize. Confusion matrices are summed on the host (float-exact integers).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mfm_jax import evaluation, ops
from mfm_jax.data import labels as labels_lib


def make_predict_fn(config: ml_collections.ConfigDict, host) -> Callable[..., jax.Array]:
  """Returns jitted ``predict(variables, image [B,h,w,3], label_size) -> int32 [B,H,W]``."""
  mode = config.eval.mode
  k = config.model.num_classes

  def logits_fn(variables, x):
    logits, _, _ = host.predict(variables, x, train=False)
    return logits

  def predict(variables, image, label_size):
    if mode == "slide":
      logits = evaluation.slide_inference(
          lambda x: logits_fn(variables, x), image, tuple(config.eval.crop_size),
          tuple(config.eval.stride), k)
    else:
      logits = logits_fn(variables, image)
    logits = ops.resize_bilinear(logits.astype(jnp.float32), label_size)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  return jax.jit(predict, static_argnums=(2,))


def evaluate(config: ml_collections.ConfigDict, host, variables: dict[str, Any],
             batches: Iterable[dict[str, np.ndarray]], predict_fn=None) -> dict[str, Any]:
  """mIoU report (19 classes + SYNTHIA 16/13 protocols) of ``variables`` on ``batches``."""
  predict_fn = predict_fn or make_predict_fn(config, host)
  conf = np.zeros((config.model.num_classes,) * 2, np.int64)
  count = 0
  for batch in batches:
    label = np.asarray(batch["label"])
    pred = np.asarray(predict_fn(variables, jnp.asarray(batch["image"]),
                                 tuple(label.shape[1:3])))
    conf += np.asarray(evaluation.confusion_matrix(pred, label, config.model.num_classes),
                       np.int64)
    count += label.shape[0]
  if jax.process_count() > 1:  # each process evaluated its own shard of the split
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    conf = np.asarray(multihost_utils.process_allgather(conf)).sum(0)
    count = int(np.asarray(multihost_utils.process_allgather(np.int64(count))).sum())
  if count == 0:
    raise ValueError(f"The evaluation split {config.data.eval_split!r} of "
                     f"{config.data.target!r} yielded no images.")
  report = evaluation.miou_report(conf, labels_lib.CLASSES[:config.model.num_classes])
  report["num_images"] = count
  return report
