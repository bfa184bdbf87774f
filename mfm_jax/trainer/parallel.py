"""Device mesh, shardings and multi-host start-up (``jax.jit`` + ``NamedSharding``, no pmap).

Data parallelism: the train state is replicated, every batch array is sharded on its leading
axis over the mesh's ``data`` axis. Statistics computed inside the step over the batch axis
(BatchNorm, the pseudo-label confidence fraction) are therefore global-batch statistics, exactly
as on one device with the same global batch.
"""

from __future__ import annotations

import collections
import os
from typing import Any

from absl import logging
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> None:
  """Starts multi-process JAX when the environment (or explicit flags) asks for it.

  Explicit ``coordinator_address`` wins; otherwise SLURM (``SLURM_NTASKS`` > 1), Cloud TPU pod
  slices and ``JAX_COORDINATOR_ADDRESS`` are auto-detected by ``jax.distributed.initialize``.
  A single-process run calls nothing.
  """
  if coordinator_address or num_processes > 1:
    # CPU-only multi-process runs (tests, debugging) need a cross-process collective backend.
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif (int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "JAX_COORDINATOR_ADDRESS" in os.environ
        or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0):
    jax.distributed.initialize()
  else:
    return
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def make_mesh(num_data: int = -1) -> Mesh:
  """A 1-D mesh over ``num_data`` devices (-1 = all) named ``data``."""
  devices = jax.devices()
  if num_data == -1:
    num_data = len(devices)
  if not 0 < num_data <= len(devices):
    raise ValueError(f"config.mesh.data={num_data} but {len(devices)} devices are available.")
  return Mesh(np.asarray(devices[:num_data]), (DATA_AXIS,))


def local_mesh(mesh: Mesh) -> Mesh:
  """The devices of ``mesh`` that belong to this process, as a 1-D ``data`` mesh (``mesh``
  itself in a single-process run): evaluation runs there, on each process's own shard."""
  mine = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  if len(mine) == mesh.devices.size:
    return mesh
  return Mesh(np.asarray(mine or jax.local_devices()[:1]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "config.data.batch_size") -> None:
  n = mesh.devices.size
  if global_batch % n:
    raise ValueError(f"{what}={global_batch} must be divisible by the {n} devices of the mesh "
                     f"(set config.mesh.data or the batch size).")


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles global arrays from each process's local shard of the batch."""
  sharding = data_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


class DevicePrefetch:
  """Batches of a checkpointable host iterator, placed on ``mesh`` (``shard_batch``) ahead.

  Each ``next`` first tops the queue up to ``size`` placed batches, then hands out the oldest:
  with ``size=2`` the batch after the one being returned is already being copied to the
  devices while the step runs. ``get_state`` is the host iterator's state right after the last
  batch handed out (the one the step consumed), NOT after the prefetched ones, so a
  checkpoint resumes exactly; ``set_state`` drops the prefetched batches.
  """

  def __init__(self, iterator, mesh: Mesh, size: int = 2):
    if size < 1:
      raise ValueError(f"DevicePrefetch size={size} must be >= 1.")
    self._it, self._mesh, self._size = iterator, mesh, size
    self._queue = collections.deque()  # (placed batch, host state after it)
    self._state = iterator.get_state()

  def __iter__(self) -> "DevicePrefetch":
    return self

  def __next__(self) -> dict[str, jax.Array]:
    while len(self._queue) < self._size:
      try:
        host = next(self._it)
      except StopIteration:
        break
      self._queue.append((shard_batch(host, self._mesh), self._it.get_state()))
    if not self._queue:
      raise StopIteration
    batch, self._state = self._queue.popleft()
    return batch

  def get_state(self) -> dict[str, Any]:
    return self._state

  def set_state(self, state: dict[str, Any]) -> None:
    self._queue.clear()
    self._it.set_state(state)
    self._state = self._it.get_state()

  def close(self) -> None:
    self._queue.clear()
    if hasattr(self._it, "close"):
      self._it.close()
