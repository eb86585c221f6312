"""Devices, mesh and shardings for data-parallel training over all devices and hosts.

Data parallelism is `jax.jit` over a one-axis `Mesh` ('data'): batches are sharded along
their leading axis, parameters and optimizer state are replicated. Each process feeds its
own slice of the global batch (a host-local numpy batch), which becomes one global
`jax.Array`; the same code runs on one CPU, 8 virtual CPU devices, a GPU box or a TPU pod.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Mapping, Optional, TypeVar

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
T = TypeVar("T")


def maybe_initialize_distributed(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    heartbeat_timeout_s: Optional[int] = None,
) -> None:
    """Joins a multi-process job when launched as one process of several.

    Where the settings come from, first match wins:
      - the arguments (medjax.main's --coordinator_address, --num_processes, --process_id);
      - JAX_COORDINATOR_ADDRESS, JAX_PROCESS_COUNT, JAX_PROCESS_ID;
      - a SLURM job with several tasks, or a multi-host Cloud TPU slice: JAX finds them itself.
    A single process (none of the above) does nothing. On CPU, collectives go over gloo.
    A process that dies is noticed by the others within about `heartbeat_timeout_s` (default
    MEDJAX_HEARTBEAT_TIMEOUT_S or 30): they stop with an error instead of waiting forever.
    """
    env = os.environ
    if heartbeat_timeout_s is None:
        heartbeat_timeout_s = int(env.get("MEDJAX_HEARTBEAT_TIMEOUT_S", "30"))
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_PROCESS_COUNT"):
        num_processes = int(env["JAX_PROCESS_COUNT"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    slurm = int(env.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
    if not (coordinator_address or slurm or tpu_pod):
        return
    if coordinator_address and (num_processes is None or process_id is None):
        raise ValueError(
            f"Coordinator {coordinator_address} given without the process count and id: set "
            "--num_processes and --process_id (or JAX_PROCESS_COUNT and JAX_PROCESS_ID)."
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
    )
    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)  # Process 0 reports; the others only warn.


def any_process(flag: bool) -> bool:
    """True if `flag` is true on any process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag], np.int32))))


def max_over_processes(value: int) -> int:
    """The largest `value` over all processes (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.array([value], np.int64))))


def build_once(build: Callable[[], T]) -> T:
    """Runs `build` on process 0 first, then on the others (which then find it done).

    For steps that write shared files, such as building a dataset into a shared data_dir.
    """
    if jax.process_count() == 1:
        return build()
    from jax.experimental import multihost_utils

    result = build() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("medjax.build_once")
    return result if result is not None else build()


# XLA's CPU backend (jaxlib 0.10) hands convolutions, dots and reductions to YNNPACK by default.
# Its convolutions ran on one thread here: with them left to XLA's own (Eigen) convolutions,
# which use every core, training steps on 2 cores took 7-45 % less time (README,
# "Performance"). Reductions stay with YNNPACK: without it XLA splits the batch-norm sums into
# slow reduce-windows. Set XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=... to choose
# otherwise; that wins over this default.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def compiler_options() -> Optional[dict[str, str]]:
    """XLA options for medjax's jitted functions on this backend (None: XLA's defaults).

    On CPU, `CPU_COMPILER_OPTIONS` unless XLA_FLAGS names the same option or this XLA does not
    know it (then a warning, and the defaults); elsewhere None.
    """
    if jax.default_backend() != "cpu":
        return None
    flags = os.environ.get("XLA_FLAGS", "")
    if any(name in flags for name in CPU_COMPILER_OPTIONS):
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(1.0).compile()
    except Exception as error:  # An XLA without the option: keep its defaults.
        logging.warning("XLA rejected %s (%s); using its defaults.", CPU_COMPILER_OPTIONS, error)
        return None
    return dict(CPU_COMPILER_OPTIONS)


def jit(fun: Callable, **kwargs) -> Any:
    """`jax.jit` with `compiler_options()` (the keyword arguments are jax.jit's)."""
    return jax.jit(fun, compiler_options=compiler_options(), **kwargs)


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
    """A one-axis mesh over the first `num_devices` devices (all of them by default)."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices={num_devices} but {len(devices)} devices are visible.")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def describe(mesh: Mesh) -> str:
    devices = mesh.devices.ravel()
    kinds = sorted({f"{d.platform}:{getattr(d, 'device_kind', '?')}" for d in devices})
    return (
        f"{len(devices)} device(s) [{', '.join(kinds)}] over {jax.process_count()} "
        f"process(es); mesh shape {dict(mesh.shape)}"
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def per_process_batch_size(global_batch_size: int, mesh: Mesh, name: str = "batch_size") -> int:
    """Checks that a global batch divides over the devices and returns this process's share."""
    num_devices = mesh.devices.size
    if global_batch_size % num_devices:
        raise ValueError(
            f"{name}={global_batch_size} does not divide over {num_devices} devices: "
            f"choose a multiple of {num_devices} (e.g. --config.{name}="
            f"{max(num_devices, global_batch_size // num_devices * num_devices)})."
        )
    return global_batch_size // jax.process_count()


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global arrays sharded on the 'data' axis."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def replicate(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, replicated(mesh))
