"""One device mesh for training and scoring, global-view (``jax.make_mesh`` + ``NamedSharding``).

The mesh has two axes:

* ``"data"``: batches are split along their leading (image) axis;
* ``"ensemble"``: the students' stacked parameters and optimizer states may be split along their
  leading member axis M (size 1 by default, i.e. every device holds all M students).

The teacher, the target statistics and the score normalisation are small and replicated. Jitted
steps take these shardings as ``in_shardings``/``out_shardings``; XLA inserts the gradient
all-reduce over ``"data"`` itself. Nothing here uses ``pmap``.

Multi-host (several processes, each with its own devices, e.g. GPU nodes or TPU hosts): call
:func:`initialize_distributed` in every process before any other JAX call, then use the same
code as on one host::

    # process i of P, all with the same arguments except process_id
    ustad.sharding.initialize_distributed("10.0.0.1:1234", num_processes=P, process_id=i)
    mesh = ustad.sharding.make_mesh(ensemble_size=1)     # spans every process's devices
    images = ustad.sharding.shard_batch(global_batch, mesh)

Every process loads the same global batch (the data are small) and :func:`shard_batch` hands
each device its slice; results that are replicated (losses, parameters) can then be read on any
process. On CPU the cross-process collectives go through Gloo (JAX's default). On Cloud TPU and
SLURM, ``jax.distributed.initialize()`` finds its arguments itself: pass none.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

PyTree = Any
DATA_AXIS = "data"
ENSEMBLE_AXIS = "ensemble"


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids=None,
    initialization_timeout: int = 300,
) -> None:
    """Join a multi-process JAX run (a thin wrapper of ``jax.distributed.initialize``).

    Must be called in every process before anything touches a device.

    Args:
      coordinator_address: ``"host:port"`` of process 0, reachable by all processes.
      num_processes: P.
      process_id: this process's index in ``[0, P)``.
      local_device_ids: restrict this process to some of its local devices (e.g. one GPU per
        process); ``None`` for all.
      initialization_timeout: seconds to wait for the other processes.
    """
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
    )


def make_mesh(ensemble_size: int = 1, devices=None) -> Mesh:
    """A ``("data", "ensemble")`` mesh over all devices (of every process).

    Args:
      ensemble_size: devices along ``"ensemble"``; must divide the device count. The number of
        students M must then be a multiple of it when their parameters are sharded.
      devices: the devices to use (default ``jax.devices()``, all processes).

    Returns:
      A mesh of shape ``(num_devices // ensemble_size, ensemble_size)``. Both axes are
      ``AxisType.Auto``: steps state their input/output shardings and XLA propagates the rest,
      so the same code runs unchanged on one device.
    """
    devices = list(jax.devices() if devices is None else devices)
    if ensemble_size < 1 or len(devices) % ensemble_size:
        raise ValueError(
            f"ensemble_size={ensemble_size} must divide the number of devices ({len(devices)})"
        )
    return jax.make_mesh(
        (len(devices) // ensemble_size, ensemble_size),
        (DATA_AXIS, ENSEMBLE_AXIS),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices,
    )


def data_size(mesh: Mesh) -> int:
    """Devices along ``"data"``: global batch sizes must be multiples of it."""
    return int(mesh.shape[DATA_AXIS])


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (teacher, statistics, scalars)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (image) axis split over ``"data"``, replicated over ``"ensemble"``."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def member_sharding(mesh: Mesh, shard_members: bool) -> NamedSharding:
    """For stacked ensemble pytrees ``[M, ...]``: split M over ``"ensemble"`` or replicate."""
    if shard_members and mesh.shape[ENSEMBLE_AXIS] > 1:
        return NamedSharding(mesh, PartitionSpec(ENSEMBLE_AXIS))
    return replicated(mesh)


def check_members(mesh: Mesh, num_members: int, shard_members: bool) -> None:
    """Raise ``ValueError`` unless M splits evenly over the ``"ensemble"`` axis."""
    size = int(mesh.shape[ENSEMBLE_AXIS])
    if shard_members and num_members % size:
        raise ValueError(
            f"{num_members} students cannot be split over an ensemble axis of {size} devices; "
            f"use a number of students divisible by {size} or ensemble_axis_size dividing it"
        )


def shard_batch(batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """Place a global host batch on the mesh, split over ``"data"``.

    Every process passes the same global batch; each copies only the rows of its own devices
    (``jax.make_array_from_callback``), so this works unchanged on many hosts. A batch
    whose size is not a multiple of the ``"data"`` axis (a last partial batch when computing
    statistics) is replicated instead.

    Args:
      batch: ``[B, ...]`` host array, identical on every process.
      mesh: from :func:`make_mesh`.

    Returns:
      A global ``[B, ...]`` array.
    """
    batch = np.asarray(batch)
    if batch.shape[0] % data_size(mesh):
        return put_replicated(batch, mesh)
    return _put(batch, batch_sharding(mesh))


def put_replicated(tree: PyTree, mesh: Mesh) -> PyTree:
    """Place a host pytree (identical on every process) on every device of the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: _put(x, sharding), tree)


def put_members(tree: PyTree, mesh: Mesh, shard_members: bool) -> PyTree:
    """Place a stacked host ensemble pytree ``[M, ...]`` (identical on every process)."""
    sharding = member_sharding(mesh, shard_members)
    return jax.tree.map(lambda x: _put(x, sharding), tree)


def to_host(tree: PyTree) -> PyTree:
    """Fetch a pytree of global arrays to NumPy on every process.

    Fully replicated or fully addressable arrays are read directly; arrays split across
    processes are gathered first (``multihost_utils.process_allgather``).
    """

    def fetch(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(fetch, tree)


def _put(x, sharding: NamedSharding) -> jax.Array:
    """Host array → global array; on many processes each fills only its own devices."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def training_mesh(config, num_students: int) -> tuple[Mesh, bool]:
    """The ``("data", "ensemble")`` mesh of a students run and whether the members are split.

    Reads ``config.num_devices`` (0 = all), ``config.ensemble_axis_size`` and
    ``config.batch_size``; ``ValueError`` naming the setting when the M students or the batch
    do not split over the mesh.
    """
    num_devices = config.get("num_devices", 0) or jax.device_count()
    mesh = make_mesh(config.ensemble_axis_size, jax.devices()[:num_devices])
    shard_members = config.ensemble_axis_size > 1
    check_members(mesh, num_students, shard_members)
    if config.batch_size % data_size(mesh):
        raise ValueError(
            f"batch_size={config.batch_size} does not split over {data_size(mesh)} "
            f"data-parallel devices; use a multiple, set ensemble_axis_size (students across "
            f"devices) or num_devices"
        )
    return mesh, shard_members
