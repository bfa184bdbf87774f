"""Inference for evaluation: 'whole' and 'slide' modes on top of a ``SegmentationNetwork``.

Reference (uda_reference.md §4): DAFormer evaluates 'whole' images at the test scale with
logits bilinearly resized to the full-resolution label; HRDA / MIC(HRDA) use 'slide' windows
(crop 1024, stride 512) whose logits are averaged by a count map. Prediction = argmax after the
resize. Confusion matrices are summed on the net (float-exact integers).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mfm_jax import ops
from mfm_jax.data import labels as labels_lib
from mfm_jax.evaluation import metrics
from mfm_jax.evaluation import sliding
from mfm_jax.runtime import progress as progress_lib


def make_predict_fn(config: ml_collections.ConfigDict, net, *,
                    pad_multiple: int = 1) -> Callable[..., jax.Array]:
  """Returns jitted ``predict(variables, image [B,h,w,3], label_size) -> int32 [B,H,W]``.

  ``pad_multiple > 1`` zero-pads (= the mean colour after Normalize) the bottom/right of the
  input to a multiple of it and crops the logits back before the resize: HRDA's windows must
  align with the head's output stride, which images of arbitrary size do not (predict).
  """
  mode = config.eval.mode
  k = config.model.num_classes

  def logits_fn(variables, x):
    logits, _, _ = net.predict(variables, x, train=False)
    return logits

  def predict(variables, image, label_size):
    h, w = image.shape[1:3]
    ph, pw = -h % pad_multiple, -w % pad_multiple
    if ph or pw:
      image = jnp.pad(image, ((0, 0), (0, ph), (0, pw), (0, 0)))
    if mode == "slide":
      logits = sliding.slide_inference(
          lambda x: logits_fn(variables, x), image, tuple(config.eval.crop_size),
          tuple(config.eval.stride), k)
    else:
      logits = logits_fn(variables, image)
    logits = logits[:, :h, :w]  # both modes return logits at the (padded) input size
    logits = ops.resize_bilinear(logits.astype(jnp.float32), label_size)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  return jax.jit(predict, static_argnums=(2,))


def evaluate(config: ml_collections.ConfigDict, net, variables: dict[str, Any],
             batches: Iterable[dict[str, np.ndarray]], predict_fn=None, *,
             on_batch: Callable[[dict[str, np.ndarray], np.ndarray], Any] | None = None,
             show_progress: bool = True) -> dict[str, Any]:
  """mIoU report (19 classes + SYNTHIA 16/13 protocols) of ``variables`` on ``batches``.

  ``on_batch(batch, prediction)`` sees every batch with its net prediction (e.g. to keep a
  few for pictures). With ``show_progress`` (and a sized ``batches``) the images done, the rate
  and the ETA are shown (a live line on a terminal, otherwise every 25 %).
  """
  predict_fn = predict_fn or make_predict_fn(config, net)
  conf = np.zeros((config.model.num_classes,) * 2, np.int64)
  count = 0
  total = len(batches) if hasattr(batches, "__len__") else 0
  progress = None
  if show_progress and total and jax.process_index() == 0:
    progress = progress_lib.Progress(total, desc="eval", unit="img",
                                     every=max(total // 4, 1), log=logging.info)
  for batch in batches:
    label = np.asarray(batch["label"])
    pred = np.asarray(predict_fn(variables, jnp.asarray(batch["image"]),
                                 tuple(label.shape[1:3])))
    conf += np.asarray(metrics.confusion_matrix(pred, label, config.model.num_classes),
                       np.int64)
    count += label.shape[0]
    if on_batch is not None:
      on_batch(batch, pred)
    if progress is not None:
      progress.update(min(count, total))
  if progress is not None:
    progress.close()
  if jax.process_count() > 1:  # each process evaluated its own shard of the split
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    conf = np.asarray(multihost_utils.process_allgather(conf)).sum(0)
    count = int(np.asarray(multihost_utils.process_allgather(np.int64(count))).sum())
  if count == 0:
    raise ValueError(f"The evaluation split {config.data.eval_split!r} of "
                     f"{config.data.target!r} yielded no images.")
  report = metrics.miou_report(conf, labels_lib.CLASSES[:config.model.num_classes])
  report["num_images"] = count
  return report
