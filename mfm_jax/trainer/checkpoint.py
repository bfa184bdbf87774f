"""Train-state checkpoints: one small wrapper around Orbax's ``CheckpointManager``.

Layout of a checkpoint root (one directory per saved step, written atomically by Orbax: the
data goes to ``<step>.orbax-checkpoint-tmp-<ts>/`` and is renamed to ``<step>/`` only once
complete, so an interrupted save is never listed)::

  <directory>/<step>/state/   StandardSave of the train state (any pytree of jax arrays)
  <directory>/<step>/extra/   JsonSave of a small JSON dict (e.g. the data iterator state)

The reference keeps one checkpoint at iteration 40k (uda_reference.md §2.7, max_keep 1); here
the interval and ``keep`` are configurable. All processes call ``save``/``restore``; Orbax
decides which host writes what.

Failures: saves are synchronous, so a failed write (disk full, read-only directory) raises
``CheckpointSaveError`` naming the step directory and the cause at once, in the caller's thread,
and leaves the older checkpoints as they were (an asynchronous save reported its error only at
the next save and then left Orbax threads waiting minutes for signals that never came).
``restore_latest_good`` skips a damaged newest checkpoint: it is renamed to
``<step>.damaged-<time>`` (kept for inspection, ignored by Orbax) and the next older one is used.
"""

from __future__ import annotations

from collections.abc import Sequence
import datetime
import json
import math
import os
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mfm_jax.models import mit
from mfm_jax.runtime import errors

STATE_ITEM = "state"
EXTRA_ITEM = "extra"
# In multi-process runs ``extra`` (e.g. each host's data-iterator state) differs per process,
# but Orbax writes JSON from the primary host only: all processes' dicts are gathered and
# stored as {_PER_PROCESS: [dict_0, dict_1, ...]}.
_PER_PROCESS = "__per_process__"


class CheckpointError(errors.UserError, ValueError):
  """A checkpoint directory is missing, empty, corrupt or does not hold what was asked for."""


class NonFiniteStateError(CheckpointError):
  """The state to be saved holds NaN/Inf values; it is not written."""

  exit_code = errors.NON_FINITE


class CheckpointSaveError(CheckpointError):
  """Writing a checkpoint failed (I/O); older checkpoints are untouched."""

  exit_code = errors.CHECKPOINT_SAVE_FAILED


DAMAGED_TAG = ".damaged-"


def _path_str(path: Sequence[Any]) -> str:
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/") or "<root>"


@jax.jit
def _leaves_finite(leaves: list[jax.Array]) -> jax.Array:
  # One global reduction per leaf: in multi-process runs every process gets the same answer,
  # so either all of them save or all of them raise (no process is left waiting in a barrier).
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def check_finite(state: Any) -> None:
  """Raises ``NonFiniteStateError`` naming the leaves of ``state`` that hold NaN or Inf."""
  named, bad = [], []
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    if isinstance(leaf, float):
      if not math.isfinite(leaf):
        bad.append(_path_str(path))
    elif hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact):
      named.append((path, leaf))
  if named:
    leaves = [leaf for _, leaf in named]
    try:
      finite = np.asarray(_leaves_finite(leaves))
    except ValueError:  # Leaves committed to different device sets: reduce them one by one.
      finite = np.asarray([jnp.all(jnp.isfinite(x)) for x in leaves])
    bad += [_path_str(p) for (p, _), ok in zip(named, finite) if not ok]
  if bad:
    shown = ", ".join(bad[:10]) + (f" (+{len(bad) - 10} more)" if len(bad) > 10 else "")
    raise NonFiniteStateError(
        f"Refusing to checkpoint a state with non-finite values in {len(bad)} leaves: {shown}. "
        "The last good checkpoint is kept.")


def _gather_per_process(extra: dict) -> dict:
  """Collects every process's ``extra`` dict (a collective: all processes must call it)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  blob = np.frombuffer(json.dumps(extra).encode("utf-8"), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(blob.size))).reshape(-1)
  padded = np.zeros((int(sizes.max()),), np.uint8)
  padded[:blob.size] = blob
  blobs = np.asarray(multihost_utils.process_allgather(padded))
  return {_PER_PROCESS: [json.loads(bytes(blobs[i, :n]).decode("utf-8"))
                         for i, n in enumerate(sizes)]}


def _check_abstract(abstract_state: Any) -> None:
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state):
    if isinstance(leaf, jax.Array):
      continue
    if not isinstance(leaf, jax.ShapeDtypeStruct) or leaf.sharding is None:
      raise CheckpointError(
          f"restore() needs an abstract target whose leaves are jax.ShapeDtypeStruct with a "
          f"sharding; leaf {_path_str(path)!r} is {leaf!r}. Build it with "
          "jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), "
          "jax.eval_shape(init_fn), shardings).")


class Checkpointer:
  """Saves/restores a train state plus a JSON ``extra`` dict under ``directory``.

  The caller decides when to save (the train loop: every ``config.checkpoint_every`` steps, at
  the end and when stopped); every ``save`` of a new step writes.

  Args:
    directory: checkpoint root (created if missing; local path or any ``epath`` URL).
    keep: number of most recent checkpoints kept (older ones are deleted).
  """

  def __init__(self, directory: str | epath.PathLike, *, keep: int):
    if keep < 1:
      raise ValueError(f"Checkpointer: keep must be >= 1, got {keep}")
    self.directory = epath.Path(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        # Leftovers of saves interrupted before the final rename are deleted at start-up.
        cleanup_tmp_directories=True,
        # Synchronous: a failed write raises here, at once (see the module docstring).
        enable_async_checkpointing=False,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=(STATE_ITEM, EXTRA_ITEM))

  def latest_step(self) -> int | None:
    """The newest finalised step, or None when the directory holds no checkpoint."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """All finalised steps, ascending."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, *, extra: dict | None = None) -> bool:
    """Saves ``state`` (and ``extra``) at ``step``.

    Returns whether a checkpoint was written (False when ``step`` is already saved). Raises ``NonFiniteStateError`` before writing anything if a
    floating leaf is NaN/Inf, so the last good checkpoint always survives, and
    ``CheckpointSaveError`` (naming the directory and the cause) when the write fails. The
    checkpoint is on disk when this returns.
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    extra = {} if extra is None else extra
    try:
      json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as e:
      raise CheckpointError(
          f"Checkpointer.save: `extra` must be a JSON-serialisable dict of finite values: {e}") from e
    check_finite(state)
    if jax.process_count() > 1:
      extra = _gather_per_process(extra)
    good = self.all_steps()
    try:
      saved = self._manager.save(
          step, args=ocp.args.Composite(**{
              STATE_ITEM: ocp.args.StandardSave(state),
              EXTRA_ITEM: ocp.args.JsonSave(extra),
          }), force=True)
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  (Orbax/tensorstore/OS errors)
      kept = (f"the last good checkpoint (step {good[-1]}) is kept" if good
              else "no earlier checkpoint exists")
      cause = f"{type(e).__name__}: {e}".strip()
      raise CheckpointSaveError(
          f"Saving the checkpoint of step {step} to {self.directory / str(step)} failed: "
          f"{cause}; {kept}. Free disk space or fix the permissions of {self.directory}, then "
          "run again to resume.") from e
    return saved

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores ``(state, extra)`` at ``step`` (default: latest) onto ``abstract_state``.

    ``abstract_state`` has the structure of the saved state and ``jax.ShapeDtypeStruct``
    leaves carrying the target shardings, so a checkpoint written on one mesh / device count
    can be restored onto another. ``extra`` is this process's own dict as passed to ``save``.
    """
    _check_abstract(abstract_state)
    self._manager.wait_until_finished()
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise CheckpointError(f"No checkpoint found in {self.directory}")
      step = steps[-1]
    elif step not in steps:
      raise CheckpointError(
          f"No checkpoint for step {step} in {self.directory}; available steps: {steps}")
    try:
      restored = self._read(step, abstract_state)
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(
          f"Could not restore step {step} from {self.directory} onto the given target "
          f"(structure/shape mismatch?): {e}") from e
    return restored[STATE_ITEM], self._own_extra(step, restored[EXTRA_ITEM])

  def _read(self, step: int, abstract_state: Any) -> Any:
    return self._manager.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardRestore(abstract_state),
        EXTRA_ITEM: ocp.args.JsonRestore(),
    }))

  def _own_extra(self, step: int, extra: Any) -> dict:
    extra = dict(extra or {})
    if _PER_PROCESS in extra:
      per_process = extra[_PER_PROCESS]
      if len(per_process) != jax.process_count():
        raise CheckpointError(
            f"Step {step} in {self.directory} holds `extra` of {len(per_process)} processes but "
            f"this run has {jax.process_count()}; per-process state (e.g. data iterators) cannot "
            "be resumed on a different process count.")
      extra = per_process[jax.process_index()]
    return extra

  def restore_latest_good(self, abstract_state: Any, other_layout=None
                          ) -> tuple[int, Any, dict] | None:
    """Restores the newest readable checkpoint as ``(step, state, extra)``; None if there is none.

    A checkpoint whose data or metadata cannot be read is damaged: it is renamed to
    ``<step>.damaged-<time>`` (by process 0; kept, never deleted) with a warning, and the next
    older one is tried. A checkpoint that reads fine but whose tree does not match
    ``abstract_state`` (the config changed) is not damage: ``CheckpointError`` says what differs
    and nothing is moved. ``other_layout``: ``(abstract state, convert)`` of another layout
    of the same state (``state.other_layout``); a checkpoint in that layout is read with it and
    converted (under jit, onto ``abstract_state``'s shardings).
    """
    _check_abstract(abstract_state)
    want = _shapes(abstract_state)
    other = _shapes(other_layout[0]) if other_layout is not None else None
    for step in reversed(self.all_steps()):
      target, convert = abstract_state, None
      try:
        have = self._saved_shapes(step)
      except Exception:  # pylint: disable=broad-except  (unreadable metadata: try the data)
        have = None
      if have is not None and have != want and have == other:
        target, convert = other_layout[0], jax.jit(other_layout[1], out_shardings=jax.tree.map(
            lambda s: s.sharding, abstract_state))
      elif have is not None and have != want:
        raise CheckpointError(
            f"Checkpoint step {step} in {self.directory} does not fit this config "
            f"({_describe_difference(have, want)}); was it written with another model or "
            "method config? Use another workdir, or the config it was written with.")
      problem = None
      try:
        restored = self._read(step, target)
      except Exception as e:  # pylint: disable=broad-except  (tensorstore/ocdbt/JSON errors)
        problem = e
      if _everywhere(problem is None):
        state = restored[STATE_ITEM] if convert is None else convert(restored[STATE_ITEM])
        return step, state, self._own_extra(step, restored[EXTRA_ITEM])
      self._move_aside(step, problem)
    return None

  def _saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    handler = ocp.PyTreeCheckpointHandler()
    try:
      metadata = handler.metadata(self.directory / str(step) / STATE_ITEM)
    finally:
      handler.close()
    return _shapes(metadata.tree if hasattr(metadata, "tree") else metadata)

  def _move_aside(self, step: int, problem: BaseException | None) -> None:
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    aside = self.directory / f"{step}{DAMAGED_TAG}{stamp}"
    cause = f"{type(problem).__name__}: {problem}" if problem else "unreadable on another process"
    logging.warning("Checkpoint step %d in %s is damaged (%s); moved it to %s and trying the "
                    "previous one.", step, self.directory, cause.splitlines()[0][:500], aside)
    if jax.process_index() == 0:
      os.rename(os.fspath(self.directory / str(step)), os.fspath(aside))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"mfm_jax_checkpoint_aside_{step}")
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until pending saves are finalised (saves are synchronous: a safety net)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's resources."""
    # The manager's constructor starts a background clean-up of leftover temporary directories
    # that only `save` awaits; a run stopped before its first save (SIGTERM) would leave that
    # thread to die at interpreter shutdown with a traceback. orbax-checkpoint has no public
    # hook for it, hence the guarded private call.
    await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
    if await_cleanup is not None:
      await_cleanup()
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """``{'params/model/w': shape}`` of a state, an abstract state or Orbax tree metadata."""
  return {_path_str(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
          if hasattr(leaf, "shape")}


def _describe_difference(have: dict, want: dict) -> str:
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  shapes = sorted(k for k in set(have) & set(want) if have[k] != want[k])
  parts = [f"{label} {len(keys)}: {', '.join(keys[:3])}" + (" ..." if len(keys) > 3 else "")
           for label, keys in (("missing", missing), ("unexpected", unexpected),
                               ("other shape", shapes)) if keys]
  return "; ".join(parts)


def _everywhere(ok: bool) -> bool:
  """Whether ``ok`` holds on every process (a collective in multi-process runs)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(ok))).min())


def _resolve_state_dir(path: epath.Path) -> epath.Path:
  """Maps a checkpoint root, a step directory or a state item directory to the item directory."""
  if not path.is_dir():
    raise CheckpointError(f"Checkpoint path {path} does not exist or is not a directory")
  if (path / "_METADATA").exists():  # Already the `state` item directory.
    return path
  if (path / STATE_ITEM).is_dir():  # A step directory.
    return path / STATE_ITEM
  manager = ocp.CheckpointManager(
      path, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_names=(STATE_ITEM, EXTRA_ITEM))
  try:
    step = manager.latest_step()
  finally:
    manager.close()
  if step is None:
    raise CheckpointError(
        f"{path} is not an Orbax checkpoint: expected a checkpoint root with finalised step "
        f"directories, a step directory containing '{STATE_ITEM}/', or a '{STATE_ITEM}' item "
        "directory")
  state_dir = path / str(step) / STATE_ITEM
  if not state_dir.is_dir():
    raise CheckpointError(f"Checkpoint step directory {path / str(step)} has no '{STATE_ITEM}/'")
  return state_dir


def load_params(path: str | epath.PathLike,
                subtree: Sequence[str] = ("params", "model")) -> Any:
  """Reads only ``subtree`` of a saved train state as a nested dict of numpy arrays.

  ``path`` may be a ``Checkpointer`` root (its latest step is used), one step directory or
  the ``state`` item directory. Used for ``config.init_from`` and standalone evaluation. MiT
  blocks come per block (``block{i}_{j}``), also from a run with ``model.scan_blocks``. No
  device placement happens, so it works whatever mesh wrote the checkpoint.
  """
  path = epath.Path(path)
  state_dir = _resolve_state_dir(path)
  handler = ocp.PyTreeCheckpointHandler()
  try:
    metadata = handler.metadata(state_dir)
    tree = metadata.tree if hasattr(metadata, "tree") else metadata
  except Exception as e:  # Orbax raises assorted types for unreadable metadata.
    raise CheckpointError(f"Corrupt or unreadable checkpoint metadata in {state_dir}: {e}") from e
  node = tree
  for i, key in enumerate(subtree):
    if not isinstance(node, dict) or key not in node:
      have = sorted(node) if isinstance(node, dict) else type(node).__name__
      raise CheckpointError(
          f"Checkpoint {state_dir} has no sub-tree {'/'.join(subtree[:i + 1])!r}; "
          f"keys at that level: {have}")
    node = node[key]
  item = node
  for key in reversed(tuple(subtree)):
    item = {key: item}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  try:
    restored = handler.restore(
        state_dir, args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))
  except Exception as e:  # tensorstore/ocdbt errors on damaged data files.
    raise CheckpointError(f"Corrupt checkpoint data in {state_dir}: {e}") from e
  finally:
    handler.close()
  for key in subtree:
    restored = restored[key]
  return mit.unstack_blocks(restored)  # the per-block layout, whichever the run trained in
