"""Inference for evaluation: 'whole' and 'slide' modes on top of a ``SegmentationNetwork``.

Reference (uda_reference.md §4): DAFormer evaluates 'whole' images at the test scale with
logits bilinearly resized to the full-resolution label; HRDA / MIC(HRDA) use 'slide' windows
(crop 1024, stride 512) whose logits are averaged by a count map. Prediction = argmax after the
resize. Images arrive as uint8 RGB and are normalised inside the jitted function
(``ops.normalize_images``).

``evaluate`` runs prediction + confusion matrix as ONE jitted computation over a mesh
(``MeshEvaluation``) on a fixed number of rows: ``config.data.eval_batch_size`` rounded up to a
multiple of the mesh size (so a device holds at most ``eval_batch_size`` images). Consecutive
batches of one image size are regrouped to that many rows; a group left short (a size change,
the end of the split) is padded with rows of image 0 / label 255, never counted. The rows are
sharded over the ``data`` axis; each device predicts its rows and counts its confusion matrix,
which are summed over the devices (``psum``). A fixed row count keeps one compilation per image
size. The variables are replicated. The accumulation over batches is ``metrics.Evaluator``'s.
In a multi-process run each process evaluates its own shard of the split on the mesh of its
own devices (``parallel.local_mesh``), so processes with unequal shards never wait for each
other inside a computation, and the per-process matrices are summed at the end.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Iterator

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from mfm_jax import ops
from mfm_jax.data import labels as labels_lib
from mfm_jax.evaluation import metrics
from mfm_jax.evaluation import sliding
from mfm_jax.runtime import progress as progress_lib
from mfm_jax.trainer import parallel


def _predict(config: ml_collections.ConfigDict, net, pad_multiple: int = 1):
  """Un-jitted ``predict(variables, uint8 image [B,h,w,3], label_size) -> int32 [B,H,W]``."""
  mode = config.eval.mode
  k = config.model.num_classes

  def logits_fn(variables, x):
    logits, _, _ = net.predict(variables, x, train=False)
    return logits

  def predict(variables, image, label_size):
    image = ops.normalize_images(image)
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

  return predict


def make_predict_fn(config: ml_collections.ConfigDict, net, *,
                    pad_multiple: int = 1) -> Callable[..., jax.Array]:
  """Returns jitted ``predict(variables, image [B,h,w,3], label_size) -> int32 [B,H,W]``.

  ``image`` is uint8 RGB (the pipeline's), normalised inside. ``pad_multiple > 1`` zero-pads
  (= the mean colour after Normalize) the bottom/right of the normalised input to a multiple
  of it and crops the logits back before the resize: HRDA's windows must align with the
  head's output stride, which images of arbitrary size do not (predict).
  """
  return jax.jit(_predict(config, net, pad_multiple), static_argnums=(2,))


class MeshEvaluation:
  """``(variables, image, label) -> (int32 [K,K] counts, prediction)``: one jitted computation
  over ``mesh`` per batch (module docstring: padding and sharding); ``place`` puts variables
  on it, replicated. Build it once per run: it holds the compiled function."""

  def __init__(self, config: ml_collections.ConfigDict, net, mesh: Mesh):
    self.mesh = mesh
    n = mesh.devices.size
    self.rows = -(-int(config.data.eval_batch_size) // n) * n
    self._repl, self._data = parallel.replicated(mesh), parallel.data_sharded(mesh)
    predict, k = _predict(config, net), config.model.num_classes

    def local_counts(pred, label):  # per device, on its rows; summed over the devices
      return jax.lax.psum(metrics.confusion_matrix(pred, label, k), parallel.DATA_AXIS)

    counts = jax.shard_map(local_counts, mesh=mesh, in_specs=(P(parallel.DATA_AXIS),) * 2,
                           out_specs=P())

    def step(variables, image, label):
      pred = predict(variables, image, label.shape[1:3])
      return counts(pred, label), pred

    self._step = jax.jit(step, in_shardings=(self._repl, self._data, self._data),
                         out_shardings=(self._repl, self._data))

  def regroup(self, batches: Iterable[dict[str, np.ndarray]]
              ) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive batches of one image/label size stacked up to ``rows`` rows (a larger batch
    passes alone), so that small eval batches fill every device."""
    group, count = [], 0

    def stacked():
      return group[0] if len(group) == 1 else {
          k: np.concatenate([np.asarray(g[k]) for g in group]) for k in ("image", "label")}

    for batch in batches:
      shapes = tuple(np.shape(batch[k])[1:] for k in ("image", "label"))
      rows = np.shape(batch["label"])[0]
      if group and (count + rows > self.rows or shapes != tuple(
          np.shape(group[0][k])[1:] for k in ("image", "label"))):
        yield stacked()
        group, count = [], 0
      group.append(batch)
      count += rows
    if group:
      yield stacked()

  def place(self, variables: dict[str, Any]) -> dict[str, Any]:
    """``variables`` replicated on the mesh (no copy when they already are, e.g. the train
    state's in a single-process run; a multi-process state is read from its local copy)."""
    def put(x):
      if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
      return jax.device_put(x, self._repl)
    return jax.tree_util.tree_map(put, variables)

  def __call__(self, variables, image, label) -> tuple[jax.Array, jax.Array]:
    image, label = np.asarray(image), np.asarray(label)
    b = label.shape[0]
    if image.shape[0] != b:
      raise ValueError(f"{image.shape[0]} images but {b} labels in the batch")
    n = self.mesh.devices.size
    rows = max(self.rows, -(-b // n) * n)
    if rows > b:  # padding rows: image 0, label 255 (not counted)
      image = np.concatenate([image, np.zeros((rows - b,) + image.shape[1:], image.dtype)])
      label = np.concatenate([label, np.full((rows - b,) + label.shape[1:],
                                             labels_lib.IGNORE_INDEX, label.dtype)])
    counts, pred = self._step(variables, jax.device_put(image, self._data),
                              jax.device_put(label, self._data))
    return counts, (pred if rows == b else pred[:b])


def evaluate(config: ml_collections.ConfigDict, net, variables: dict[str, Any],
             batches: Iterable[dict[str, np.ndarray]],
             mesh_eval: MeshEvaluation | None = None, *,
             on_batch: Callable[[dict[str, np.ndarray], jax.Array], Any] | None = None,
             show_progress: bool = True) -> dict[str, Any]:
  """mIoU report (19 classes + SYNTHIA 16/13 protocols) of ``variables`` on ``batches``.

  ``mesh_eval`` (default: over this process's devices of ``config.mesh.data``'s mesh) is
  reused between calls to compile once. ``on_batch(batch, prediction)`` sees every batch
  with its prediction (a device array; converting it waits for the device). With
  ``show_progress`` (and a sized ``batches``) the images done, the rate and the ETA are shown
  (a live line on a terminal, otherwise every 25 %).
  """
  if mesh_eval is None:
    mesh_eval = MeshEvaluation(config, net,
                               parallel.local_mesh(parallel.make_mesh(config.mesh.data)))
  evaluator = metrics.Evaluator(
      num_classes=config.model.num_classes,
      class_names=labels_lib.CLASSES[:config.model.num_classes],
      count_fn=functools.partial(mesh_eval, mesh_eval.place(variables)))
  total = len(batches) if hasattr(batches, "__len__") else 0
  progress = None
  if show_progress and total and jax.process_index() == 0:
    progress = progress_lib.Progress(total, desc="eval", unit="img",
                                     every=max(total // 4, 1), log=logging.info)

  def seen(batch, pred):
    if on_batch is not None:
      on_batch(batch, pred)
    if progress is not None:
      progress.update(min(evaluator.num_images, total))

  report = evaluator.run(mesh_eval.regroup(batches), on_batch=seen)
  if progress is not None:
    progress.close()
  if jax.process_count() > 1:  # each process evaluated its own shard of the split
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    evaluator.confusion = np.asarray(
        multihost_utils.process_allgather(evaluator.confusion)).sum(0)
    evaluator.num_images = int(np.asarray(
        multihost_utils.process_allgather(np.int64(evaluator.num_images))).sum())
    report = evaluator.report()
  if evaluator.num_images == 0:
    raise ValueError(f"The evaluation split {config.data.eval_split!r} of "
                     f"{config.data.target!r} yielded no images.")
  return report
