"""Data parallelism with `jax.sharding`, and multi-process runs with `jax.distributed`.

Every device of every process forms a one-axis mesh, `data`. The batch's rows, and so the
carry's rows, are split over it; params and optimizer state are replicated. The train step
runs under `shard_map` on each device's own rows (the model's feature-major layout keeps the
rows in the minor position of its arrays, where XLA's partitioner would gather them all) and
averages the loss and gradients over the devices, so one device is the same code path as many.
Each process holds the whole (small) text and hands over only the rows that live on its own
devices.
"""

import functools
import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from charlstm_jax.errors import UserError

DATA = "data"


class ParallelError(UserError):
    """The run cannot be laid out over the devices, or the processes cannot meet."""


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    auto: bool = False,
) -> None:
    """Join a multi-process run when asked by the arguments or the environment.

    The arguments fall back on `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and
    `JAX_PROCESS_ID`. With none of them set, `auto` (or an `srun` step of several tasks, or a
    TPU pod slice) lets JAX find the cluster itself; otherwise this is a single-process run.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes or _env_int("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JAX_PROCESS_ID")
    explicit = coordinator_address or num_processes or process_id is not None
    if explicit:
        if not (coordinator_address and num_processes and process_id is not None):
            raise ParallelError(
                "A multi-process run needs all three of --coordinator_address, --num_processes "
                "and --process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                "JAX_PROCESS_ID); give the missing ones."
            )
        if not 0 <= process_id < num_processes:
            raise ParallelError(
                f"--process_id must lie in [0, {num_processes}), got {process_id}; number the "
                "processes from 0."
            )
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif auto or _cluster_detected():
        jax.distributed.initialize()  # JAX reads the cluster from TPU or Slurm metadata
    else:
        return
    logging.info(
        "Process %d of %d: %d local devices, %d in all.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ParallelError(f"{name} must be an integer, got {value!r}.") from None


def _cluster_detected() -> bool:
    """An `srun` step of several tasks, or a TPU pod slice of several hosts.

    Only a job step counts: `SLURM_NTASKS` is also set in a batch script that starts one
    Python process, which would then wait for peers that never come.
    """
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1:
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def is_primary() -> bool:
    """True in the process that logs, writes metrics and plots (process 0)."""
    return jax.process_index() == 0


def make_mesh(devices=None) -> Mesh:
    """A one-axis mesh named `data` over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same whole array on every device."""
    return NamedSharding(mesh, PartitionSpec())


def split_rows(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """Axis `axis` (the rows) split over the `data` axis, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(*([None] * axis), DATA))


def data_parallel(fn, mesh: Mesh, in_specs, out_specs):
    """`fn(..., axis_name=DATA)` run on each device's part of its arguments (`shard_map`).

    `fn` averages what must agree over the devices itself (`lax.pmean` over `axis_name`), as
    data-parallel training does with its gradients, so shard_map's checks of which values vary
    over devices are off: they would also reject the model's hand-written backward pass, whose
    kernel gradient is a device's own part before that average.
    """
    return jax.shard_map(
        functools.partial(fn, axis_name=DATA),
        mesh=mesh,
        in_specs=in_specs,
        out_specs=out_specs,
        check_vma=False,
    )


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """The rows must split evenly over the devices."""
    if batch_size % mesh.size:
        raise ParallelError(
            f"config.batch_size={batch_size} does not split evenly over {mesh.size} devices; "
            f"use a multiple of {mesh.size}."
        )


def put(tree, sharding: NamedSharding):
    """Place a tree of host values (the same in every process) on `sharding`.

    Each process supplies only the pieces that live on its own devices.
    """

    def place(x):
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(place, tree)


def to_host(x) -> np.ndarray:
    """The whole value of an array as numpy, gathered from every process when it is split."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def sync_flag(flag: bool) -> bool:
    """True in every process when `flag` is true in any (a stop request, say)."""
    if jax.process_count() == 1:
        return flag
    flags = multihost_utils.process_allgather(np.asarray(flag, dtype=np.int32))
    return bool(np.asarray(flags).any())
