"""grain input pipeline: UDA training batches (source + target) and the evaluation split.

Training (uda_reference.md §3.2, §2.5): every global step ``s`` holds ``B = batch_size``
source and ``B`` target examples with global indices ``g = s·B + j``. Example ``g`` draws all
its randomness from ``np.random.default_rng([seed, g, domain])``:

* source: a file by Rare Class Sampling (class c ~ P, file with > min_pixels of c) or uniformly;
  Resize → RandomCrop(cat_max_ratio) → Flip → Pad, re-run up to 10 times (RCS)
  until the crop has > min_pixels·min_crop_ratio pixels of c;
* target: a uniform file; the same steps without cat_max_ratio, plus the plcrop v2 valid mask.

Images stay uint8 RGB: Normalize runs on the device (``mfm_jax.ops.normalize_images``, at the
start of the train step and of evaluation), so a batch moves 4× fewer image bytes to it.

Process ``p`` of ``P`` builds only its rows ``[p·b, (p+1)·b)`` (b = B / P) of every global
batch, so the stream does not depend on the process count, and grain's ``mp_prefetch``
preserves order, so it does not depend on ``num_workers`` either. The iterator state is just
the next step (plus the seed and batch size it was made with); ``set_state`` rebuilds the grain
pipeline from that step, which also lets a run resume with another worker or process count.

grain workers are spawned processes: the launching program needs an
``if __name__ == "__main__":`` guard. grain also reads an absl flag when it starts them; a
caller that did not parse flags gets them marked parsed here (``_ensure_flags_parsed``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from absl import flags
from absl import logging
import grain
import numpy as np

from mfm_jax.data import labels
from mfm_jax.data import rcs as rcs_lib
from mfm_jax.data import splits as splits_lib
from mfm_jax.data import transforms

_SOURCE, _TARGET = 0, 1  # RNG stream ids of the two domains
_UNBOUNDED = 2**62  # step count of an endless stream (grain ranges are lazy)


def _pair(value) -> tuple[int, int]:
  """A validated (config/validation.py) size pair as a tuple of two ints."""
  return int(value[0]), int(value[1])


@dataclasses.dataclass(frozen=True)
class _Split:
  """A prepared split, opened lazily in whichever process reads it (picklable)."""
  name: str  # the config name, for messages
  dataset: str
  split: str
  data_dir: str
  scale: tuple[int, int] | None = None  # pre-resized copy (config.data.prepared_scale)

  def open(self):
    return splits_lib.open_split(self.dataset, self.split, self.data_dir, scale=self.scale)


def _resolve(name: str, data_cfg, role: str, key: str) -> _Split:
  # resolve() generates/prepares 'synthetic_*' (ensure_synthetic) and 'folder_*' on first use.
  # With config.data.prepared_scale the training splits are read from the copies prepared at
  # the training scale (``prepare --scale``); the keep-ratio resize is then the identity.
  scale = None
  if data_cfg.prepared_scale:
    scale = _pair(data_cfg[f"{key}_scale"])
  resolved = splits_lib.resolve(name, data_cfg, scale=scale)
  if role not in resolved.splits:
    raise ValueError(f"config.data.{key}={name!r} has no {role!r} split (it has "
                     f"{sorted(resolved.splits)}).")
  return _Split(name, resolved.dataset, resolved.splits[role], resolved.data_dir,
                resolved.scale)


def _eval_split(data_cfg) -> _Split:
  resolved = splits_lib.resolve(data_cfg.target, data_cfg)
  split = data_cfg.eval_split
  if split not in resolved.splits and split not in resolved.splits.values():
    raise ValueError(f"config.data.eval_split={split!r} does not exist for "
                     f"config.data.target={data_cfg.target!r}; it has {sorted(resolved.splits)}.")
  return _Split(data_cfg.target, resolved.dataset, resolved.splits.get(split, split),
                resolved.data_dir)


class _BatchMaker:
  """Builds this process's rows of global step ``s`` (picklable; sources open lazily)."""

  def __init__(self, data_cfg, source: _Split, target: _Split,
               sampler: rcs_lib.RareClassSampler | None, *, seed: int, process_index: int,
               local_batch: int):
    self.source, self.target, self.sampler = source, target, sampler
    self.seed, self.process_index, self.local_batch = seed, process_index, local_batch
    self.global_batch = int(data_cfg.batch_size)
    self.source_scale = _pair(data_cfg.source_scale)
    self.target_scale = _pair(data_cfg.target_scale)
    self.crop_size = _pair(data_cfg.crop_size)
    self.cat_max_ratio = float(data_cfg.cat_max_ratio)
    self.flip_prob = float(data_cfg.flip_prob)
    self.margins = tuple(int(m) for m in data_cfg.pseudo_margins)
    self.min_pixels = int(data_cfg.rcs.min_pixels)
    self.min_crop_ratio = float(data_cfg.rcs.min_crop_ratio)
    self._open = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_open"] = None  # file handles stay in the process that opened them
    return state

  def _sources(self):
    if self._open is None:
      self._open = (self.source.open(), self.target.open())
    return self._open

  def _transform(self, ex, split: _Split, rng, **kwargs) -> dict[str, np.ndarray]:
    try:
      return transforms.train_transform(ex["image"], ex["label"], rng, crop_size=self.crop_size,
                                        flip_prob=self.flip_prob, **kwargs)
    except ValueError as e:
      raise ValueError(f"{split.name} ({split.dataset}/{split.split} in {split.data_dir}), "
                       f"image {ex.get('image_id')!r}: {e}") from e

  def source_example(self, g: int, src) -> dict[str, np.ndarray]:
    """Source example of global index ``g`` (RCS or uniform; §2.5, §3.2)."""
    rng = np.random.default_rng([self.seed, g, _SOURCE])
    cls = None
    if self.sampler is not None:
      index, cls = self.sampler.sample(rng)
    else:
      index = int(rng.integers(len(src)))
    ex = src[index]
    kwargs = dict(scale=self.source_scale, cat_max_ratio=self.cat_max_ratio)
    out = self._transform(ex, self.source, rng, **kwargs)
    if cls is not None and self.min_crop_ratio > 0:
      for _ in range(rcs_lib.RETRIES):
        if rcs_lib.crop_has_class(out["label"], cls, self.min_pixels, self.min_crop_ratio):
          break
        out = self._transform(ex, self.source, rng, **kwargs)
    return out

  def target_example(self, g: int, tgt) -> dict[str, np.ndarray]:
    """Target example of global index ``g`` (uniform file, no cat_max_ratio, plcrop mask)."""
    rng = np.random.default_rng([self.seed, g, _TARGET])
    ex = dict(tgt[int(rng.integers(len(tgt)))])
    if ex.get("label") is None:  # unlabelled target: all ignore
      ex["label"] = np.full(ex["image"].shape[:2], labels.IGNORE_INDEX, np.uint8)
    return self._transform(ex, self.target, rng, scale=self.target_scale,
                           margins=self.margins)

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    src, tgt = self._sources()
    first = step * self.global_batch + self.process_index * self.local_batch
    rows = [(self.source_example(g, src), self.target_example(g, tgt))
            for g in range(first, first + self.local_batch)]
    return {
        "source_image": np.stack([s["image"] for s, _ in rows]),
        "source_size": np.stack([s["size"] for s, _ in rows]),
        "source_label": np.stack([s["label"] for s, _ in rows]),
        "target_image": np.stack([t["image"] for _, t in rows]),
        "target_size": np.stack([t["size"] for _, t in rows]),
        "target_valid": np.stack([t["valid"] for _, t in rows]),
        "target_label": np.stack([t["label"] for _, t in rows]),
    }


def _ensure_flags_parsed() -> None:
  """Marks absl flags as parsed (keeping their defaults) before grain starts worker processes.

  Still required with grain 0.2.18: ``mp_prefetch`` calls
  ``grain._src.core.profiler.is_worker_profiling_enabled()`` in the launching process, which
  reads the absl flag ``--grain_enable_multiprocess_worker_profiling`` (whenever grain's
  profiler module could import ``jax.profiler`` with subprocess hooks, i.e. always here). In
  a program that never ran ``app.run``
  (pytest, a notebook, a library caller) that read raises ``UnparsedFlagAccessError``; without
  this call ``tests/test_pipeline.py::test_worker_processes_give_the_same_batches`` fails
  that way. Programs started through ``app.run``/``errors.run`` have parsed flags and are
  unaffected. Remove this once grain reads the flag with ``get_or_default`` like its others.
  """
  if not flags.FLAGS.is_parsed():
    logging.info("absl flags not parsed; marking them parsed (defaults) for grain workers.")
    flags.FLAGS.mark_as_parsed()


class TrainIterator:
  """Checkpointable iterator over per-process training batches.

  ``get_state()`` → ``{'step', 'seed', 'global_batch_size'}`` (JSON-able); ``set_state``
  continues from that step (the grain pipeline, and its workers, start at the first ``next``).
  """

  def __init__(self, maker: _BatchMaker, *, num_steps: int | None, num_workers: int,
               prefetch: int):
    self._maker, self._num_steps = maker, num_steps
    self._num_workers, self._prefetch = num_workers, prefetch
    self._step, self._it = 0, None

  def _dataset(self, start: int):
    stop = _UNBOUNDED if self._num_steps is None else self._num_steps
    ds = grain.MapDataset.range(start, max(start, stop)).map(self._maker)
    if self._num_workers == 0:  # in-process; `prefetch` threads build batches ahead
      return ds.to_iter_dataset(grain.ReadOptions(num_threads=self._prefetch,
                                                  prefetch_buffer_size=self._prefetch))
    _ensure_flags_parsed()
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    return ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=self._num_workers, per_worker_buffer_size=max(1, self._prefetch)))

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._it = iter(self._dataset(self._step))
    batch = next(self._it)
    self._step += 1
    if self._num_workers:  # own the memory: grain hands over shared-memory blocks
      batch = {k: np.array(v) for k, v in batch.items()}
    return batch

  def get_state(self) -> dict[str, int]:
    return {"step": self._step, "seed": self._maker.seed,
            "global_batch_size": self._maker.global_batch}

  def set_state(self, state: dict[str, Any]) -> None:
    for key in ("seed", "global_batch_size"):
      if key in state and int(state[key]) != self.get_state()[key]:
        raise ValueError(f"Data iterator state was saved with {key}={state[key]} but this run "
                         f"uses {self.get_state()[key]} (config.seed / config.data.batch_size); "
                         "the data order would not continue.")
    if "step" not in state or int(state["step"]) < 0:
      raise ValueError(f"Data iterator state {state!r} has no valid 'step'.")
    self.close()
    self._step = int(state["step"])

  def close(self) -> None:
    """Stops prefetch threads / worker processes (a later ``next`` restarts them)."""
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()
    self._it = None


def make_train_iterator(data_cfg, *, seed: int, process_index: int = 0, process_count: int = 1,
                        num_steps: int | None = None) -> TrainIterator:
  """Per-process UDA training batches (see the module docstring).

  Yields dicts of numpy with ``b = data_cfg.batch_size // process_count`` rows:
  ``source_image`` uint8 RGB [b,H,W,3] (not normalised), ``source_size`` i32 [b,2] (each
  image's (h, w) before the pad), ``source_label`` i32 [b,H,W], ``target_image`` uint8,
  ``target_size`` i32, ``target_valid`` f32 [b,H,W] (plcrop v2 mask; ones without
  ``pseudo_margins``),
  ``target_label`` i32 (255 where the target has no labels). ``num_steps=None``: endless.
  """
  batch = int(data_cfg.batch_size)
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
  if batch < 1 or batch % process_count:
    raise ValueError(f"config.data.batch_size={batch} must be a positive multiple of the "
                     f"process count {process_count}.")
  margins = tuple(data_cfg.pseudo_margins)
  if margins:
    transforms.valid_pseudo_mask(1, 1, margins)  # validates the four values
  source = _resolve(data_cfg.source, data_cfg, "train", "source")
  target = _resolve(data_cfg.target, data_cfg, "train", "target")
  sampler = None
  if data_cfg.rcs.enabled:
    stats = splits_lib.load_class_stats(source.dataset, source.split, source.data_dir,
                                      scale=source.scale)  # counted at original resolution
    sampler = rcs_lib.RareClassSampler(stats, float(data_cfg.rcs.temperature),
                                       int(data_cfg.rcs.min_pixels))
    logging.info("RCS class probabilities (%s): %s", data_cfg.source,
                 np.array2string(sampler.probs, precision=4))
  maker = _BatchMaker(data_cfg, source, target, sampler, seed=int(seed),
                      process_index=process_index, local_batch=batch // process_count)
  opened = tuple(split.open() for split in (source, target))  # fail now, in the caller
  for split, src in zip((source, target), opened):
    if len(src) == 0:
      raise ValueError(f"config.data {split.name!r} ({split.dataset}/{split.split} in "
                       f"{split.data_dir}) has no examples.")
  maker._open = opened  # pylint: disable=protected-access  # in-process threads share these
  return TrainIterator(maker, num_steps=num_steps, num_workers=int(data_cfg.num_workers),
                       prefetch=int(data_cfg.prefetch))


class EvalDataset:
  """Iterable (re-iterable) of ``{'image' uint8 RGB [b,h,w,3], 'label' i32 [b,H0,W0]}``.

  Consecutive images of the same size are stacked up to ``batch_size`` (Cityscapes val is one
  size throughout); a size change or the end of the split closes a batch early, so every image
  is evaluated exactly once whatever the batch size.
  """

  def __init__(self, split: _Split, indices: np.ndarray, test_scale: tuple[int, int],
               batch_size: int):
    self.split, self.indices, self.test_scale = split, indices, test_scale
    self.batch_size = int(batch_size)
    self._source = None

  def __len__(self) -> int:
    return len(self.indices)

  def _example(self, index: int) -> dict[str, np.ndarray]:
    ex = self._source[int(index)]
    if ex.get("label") is None:
      raise ValueError(f"{self.split.name} ({self.split.dataset}/{self.split.split}) image "
                       f"{ex.get('image_id')!r} has no label; it cannot be evaluated.")
    return {"image": transforms.eval_transform(ex["image"], self.test_scale)[None],
            "label": np.asarray(ex["label"], np.int32)[None]}

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    if self._source is None:
      self._source = self.split.open()
    ds = grain.MapDataset.source(list(self.indices)).map(self._example)
    examples = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))
    return examples if self.batch_size == 1 else self._stack(examples)

  def _stack(self, examples) -> Iterator[dict[str, np.ndarray]]:
    group = []
    for ex in examples:
      if group and (len(group) == self.batch_size or any(
          ex[k].shape != group[0][k].shape for k in ("image", "label"))):
        yield {k: np.concatenate([g[k] for g in group]) for k in ("image", "label")}
        group = []
      group.append(ex)
    if group:
      yield {k: np.concatenate([g[k] for g in group]) for k in ("image", "label")}


def make_eval_dataset(data_cfg, *, process_index: int = 0,
                      process_count: int = 1) -> EvalDataset:
  """The target's ``eval_split`` at ``test_scale`` (§3.3), sharded ``p::P`` by process.

  ``data_cfg.max_eval_images > 0`` keeps the first that many images (before sharding);
  ``data_cfg.eval_batch_size`` images of one size are predicted together.
  Labels stay at their ORIGINAL resolution (predictions are resized to them).
  """
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
  split = _eval_split(data_cfg)
  n = len(split.open())
  if data_cfg.max_eval_images > 0:
    n = min(n, int(data_cfg.max_eval_images))
  indices = np.arange(n)[process_index::process_count]
  return EvalDataset(split, indices, _pair(data_cfg.test_scale),
                     int(data_cfg.eval_batch_size))
