"""Benchmark one task's training step: compile time, step time, throughput, FLOPs, MFU, memory.

    python -m medjax.benchmark --config=configs/crl.py --devices=1,2,4,8 --batch_per_device=4
    python -m medjax.benchmark --config=configs/crl.py:stage=keypoints --dtype=bfloat16
    python -m medjax.benchmark --config=configs/crl.py --find_max_batch --input_pipeline

The step is the trainer's own (`medjax.train.build_training`: AdamW, data-parallel over a
one-axis mesh, state donated), fed a synthetic in-memory batch of random values shaped like
`task.example_batch` (masks 0/1, labels 0/1, points inside the image), so no dataset is needed
except for --input_pipeline. Per device count the benchmark measures, with
`jax.block_until_ready` and excluding compilation and --warmup steps:

- compile_s: `lower` + `compile` of the train step, timed on their own.
- step time median / min / max over --steps; examples/s in total and per device; scaling
  efficiency = examples/s at N devices / (N * examples/s at 1 device), at the same batch per
  device (present when --devices includes 1).
- FLOPs per step from XLA's cost analysis of the compiled step (XLA reports one device's
  share of the partitioned program; the record holds that times the device count), achieved
  TFLOP/s and MFU = achieved / peak. Peaks (`PEAK_TFLOPS`) are dense (no sparsity) data-sheet
  numbers per chip, times the device count. On a CPU, or a chip missing from the table, the
  peak is measured: the best of a few 2048x2048 float32 matmuls (and bfloat16 ones with
  --dtype=bfloat16) on the first device. Virtual CPU devices share the host's cores, so on a
  CPU the peak is the host's whatever the device count. --peak_tflops overrides it.
- peak memory per device: `device.memory_stats()['peak_bytes_in_use']` where the backend keeps
  it (GPU, TPU; the process-wide peak so far), else the compiled step's memory analysis
  (temp + arguments + outputs, donated buffers counted once).
- --find_max_batch: the largest batch per device that compiles and runs one step, by doubling
  from 1 then bisecting (an out-of-memory / RESOURCE_EXHAUSTED error means "does not fit"); on
  a CPU the search stops at --max_batch (default 256) so it ends.
- --input_pipeline: examples/s the task's real grain `train_loader` (with the config's
  augmentation, over the built TFDS data) delivers to this process, next to what the step
  consumes; "input-bound" if the pipeline is the slower, else "compute-bound".
- --dtype=bfloat16: sets `config.model.dtype` (the models' computation dtype; parameters stay
  float32), adding the key for this run when the config has none.

On a CPU, each device count other than this process's runs in a fresh subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=N; on GPU / TPU the first N devices are used.
A table is printed and --out (benchmark.json) gets one record per device count.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from medjax import parallel, tasks, train, writers

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Task config file, e.g. configs/crl.py or configs/crl.py:smoke.",
    lock_config=True,
)
_DEVICES = flags.DEFINE_list(
    "devices", None, "Device counts to measure, e.g. 1,2,4,8 (default: this process's count)."
)
_BATCH_PER_DEVICE = flags.DEFINE_integer(
    "batch_per_device",
    0,
    "Examples per device per step; 0: config train.batch_size split over the largest count.",
)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per configuration.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps run after compiling.")
_DTYPE = flags.DEFINE_enum(
    "dtype", None, ["float32", "bfloat16"], "Model computation dtype (default: the config's)."
)
_FIND_MAX_BATCH = flags.DEFINE_bool(
    "find_max_batch", False, "Also search the largest batch per device that fits."
)
_MAX_BATCH = flags.DEFINE_integer(
    "max_batch", 0, "Upper bound of --find_max_batch per device; 0: 256 on CPU, 65536 else."
)
_INPUT_PIPELINE = flags.DEFINE_bool(
    "input_pipeline", False, "Also measure the task's real input pipeline (builds the data)."
)
_INPUT_BATCHES = flags.DEFINE_integer(
    "input_batches", 20, "Batches timed by --input_pipeline (after --warmup batches)."
)
_PEAK_TFLOPS = flags.DEFINE_float(
    "peak_tflops", 0.0, "Peak TFLOP/s of one device for MFU; 0: the table, else measured."
)
_OUT = flags.DEFINE_string("out", "benchmark.json", "Where the JSON records are written.")
_WORKER_OUT = flags.DEFINE_string(
    "worker_out", None, "Internal: run in-process only and write the records here."
)

# Dense peak TFLOP/s per chip (vendor data sheets), by a lower-case substring of
# `device.device_kind`; the first match wins. H100 numbers are the SXM part; H200 has the same
# compute. GPU float32 is the non-tensor-core peak: XLA's default precision may run float32
# matmuls as TF32, so float32 MFU on a GPU can exceed 1. TPUs have no float32 entry: XLA runs
# float32 matmuls on the bfloat16 units.
PEAK_TFLOPS = (
    ("h100", {"bfloat16": 989.0, "float32": 67.0}),
    ("h200", {"bfloat16": 989.0, "float32": 67.0}),
    ("a100", {"bfloat16": 312.0, "float32": 19.5}),
    ("tpu v4", {"bfloat16": 275.0}),
    ("tpu v5 lite", {"bfloat16": 197.0}),
    ("tpu v5e", {"bfloat16": 197.0}),
    ("tpu v5", {"bfloat16": 459.0}),  # v5p reports "TPU v5".
    ("tpu v6 lite", {"bfloat16": 918.0}),
    ("tpu v6e", {"bfloat16": 918.0}),
)
CPU_MAX_BATCH = 256
ACCELERATOR_MAX_BATCH = 65536
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


# ============================================================================ inputs
def with_dtype(config, dtype: Optional[str]):
    """The config with `model.dtype` set to `dtype` (a copy; the key is added if missing).

    Args:
      config: a (locked) task config.
      dtype: 'float32', 'bfloat16', or None to keep the config's own.

    Returns:
      (config, effective dtype name).
    """
    current = config.model.get("dtype", "float32")
    if dtype is None or dtype == current:
        return config, str(current)
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model.dtype = dtype
    return config, dtype


def resolve_batch_per_device(config, device_counts: list[int], batch_per_device: int) -> int:
    """The batch per device: `batch_per_device`, or the config's global batch over the largest
    device count.

    Args:
      config: the task config (reads train.batch_size).
      device_counts: the device counts to be measured.
      batch_per_device: the requested batch per device; 0 for the default.

    Returns:
      A positive batch per device.

    Raises:
      ValueError: for a negative batch, or a global batch that does not divide.
    """
    if batch_per_device < 0:
        raise ValueError(f"--batch_per_device={batch_per_device} must be positive.")
    if batch_per_device:
        return batch_per_device
    global_batch, largest = config.train.batch_size, max(device_counts)
    if global_batch % largest:
        raise ValueError(
            f"train.batch_size={global_batch} does not divide over {largest} devices (the "
            f"largest of --devices): pass --batch_per_device, or a train.batch_size that is a "
            f"multiple of {largest}."
        )
    return global_batch // largest


def synthetic_batch(task, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A training batch of random values with `task.example_batch`'s shapes and dtypes.

    uint8 images are uniform in [0, 255], masks and integer labels 0/1, float `points`
    uniform inside the image, other floats uniform in [0, 1).

    Args:
      task: the task.
      batch_size: examples in the batch.
      seed: numpy seed.

    Returns:
      A dict of numpy arrays.
    """
    rng = np.random.default_rng(seed)
    zeros = task.example_batch(batch_size)
    side = zeros["image"].shape[1] if "image" in zeros else 1
    batch = {}
    for key, array in zeros.items():
        dtype = array.dtype
        if (
            key == "mask"
            or dtype == np.bool_
            or (np.issubdtype(dtype, np.integer) and dtype != np.uint8)
        ):
            value = rng.integers(0, 2, array.shape)
        elif dtype == np.uint8:
            value = rng.integers(0, 256, array.shape)
        elif "points" in key:
            value = rng.uniform(0, side, array.shape)
        else:
            value = rng.uniform(0, 1, array.shape)
        batch[key] = value.astype(dtype)
    return batch


# ============================================================================ measurements
def flops_of(compiled) -> float:
    """FLOPs of one run of a compiled program (one device's share when partitioned).

    `cost_analysis()` is a dict in current jax, a list of dicts (one per program) in older
    versions.
    """
    analysis = compiled.cost_analysis()
    if isinstance(analysis, dict):
        analysis = [analysis]
    return float(sum(a.get("flops", 0.0) for a in analysis or ()))


def compiled_memory_bytes(compiled) -> Optional[int]:
    """Device memory of a compiled program: temp + arguments + outputs - aliased (donated)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(
        stats.temp_size_in_bytes
        + stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
    )


def peak_memory(compiled, devices) -> tuple[Optional[int], str]:
    """Peak bytes per device and where the number comes from."""
    peaks = []
    for device in devices:
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    if peaks:
        return max(peaks), "memory_stats.peak_bytes_in_use"
    return compiled_memory_bytes(compiled), "compiled.memory_analysis"


def measure_matmul_tflops(device, dtype: str, size: int = 2048, reps: int = 5) -> float:
    """The best TFLOP/s of a `size` x `size` matmul in `dtype` on `device`."""
    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.device_put(jax.random.normal(k, (size, size), dtype), device) for k in keys)
    # XLA's defaults, not medjax's compiler options: its YNNPACK matmul is the faster one here.
    matmul = jax.jit(jnp.matmul).lower(a, b).compile()
    jax.block_until_ready(matmul(a, b))
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def device_peak_tflops(device, dtype: str, override: float = 0.0) -> tuple[float, str]:
    """Peak TFLOP/s of one device (of the whole host on a CPU) and its source.

    Args:
      device: a jax device.
      dtype: the computation dtype.
      override: a value to use as is (> 0).

    Returns:
      (TFLOP/s, source).
    """
    if override > 0:
        return override, "--peak_tflops"
    kind = getattr(device, "device_kind", "").lower()
    if device.platform != "cpu":
        for pattern, peaks in PEAK_TFLOPS:
            if pattern in kind:
                value = peaks.get(dtype, peaks["bfloat16"])
                return value, f"table: {device.device_kind} {dtype} dense"
    dtypes = sorted({"float32", dtype})
    measured = {d: measure_matmul_tflops(device, d) for d in dtypes}
    best = max(measured, key=measured.get)
    return measured[best], f"measured: 2048x2048 {best} matmul on {device.platform}"


def time_steps(step, state, batch, *, steps: int, warmup: int):
    """Runs `warmup` then `steps` timed steps, each waited for.

    Returns:
      (final state, list of step seconds).
    """
    for _ in range(warmup):
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return state, times


def search_max_batch(fits: Callable[[int], bool], cap: int) -> tuple[int, list[dict]]:
    """The largest batch in [1, cap] for which `fits` holds: doubling from 1, then bisecting.

    Assumes that a batch fits when a larger one does.

    Args:
      fits: batch -> whether it compiles and runs.
      cap: the largest batch tried.

    Returns:
      (largest batch that fits, 0 if none; [{'batch_per_device', 'fits'}, ...] in order).
    """
    trials = []

    def attempt(batch):
        ok = bool(fits(batch))
        trials.append({"batch_per_device": batch, "fits": ok})
        return ok

    good, bad, batch = 0, None, 1
    while batch <= cap:
        if not attempt(batch):
            bad = batch
            break
        good = batch
        if batch == cap:
            break
        batch = min(2 * batch, cap)
    while bad is not None and bad - good > 1:
        middle = (good + bad) // 2
        if attempt(middle):
            good = middle
        else:
            bad = middle
    return good, trials


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception from compiling or running is an out-of-memory error."""
    text = str(error)
    return (
        isinstance(error, MemoryError)
        or "RESOURCE_EXHAUSTED" in text
        or "out of memory" in text.lower()
    )


def find_max_batch(config, task, mesh, cap: int) -> tuple[int, list[dict]]:
    """The largest batch per device whose train step compiles and runs on `mesh`.

    Args:
      config: the task config.
      task: its task.
      mesh: the device mesh.
      cap: the largest batch per device tried.

    Returns:
      As `search_max_batch`.
    """
    holder = {}

    def fits(batch_per_device):
        if not holder:
            _, _, holder["state"], holder["step"] = train.build_training(config, task, mesh)
        batch = _global_batch(task, batch_per_device, mesh)
        try:
            compiled = holder["step"].lower(holder["state"], batch).compile()
            holder["state"], metrics = compiled(holder["state"], batch)
            jax.block_until_ready((holder["state"], metrics))
        except Exception as error:  # pylint: disable=broad-except
            if not is_out_of_memory(error):
                raise
            logging.info("Batch %d per device does not fit: %s", batch_per_device, error)
            holder.clear()  # The donated state may be gone: build a fresh one next time.
            return False
        return True

    return search_max_batch(fits, cap)


def input_pipeline_rate(task, batch_size: int, seed: int, *, batches: int, warmup: int) -> float:
    """Examples/s the task's training loader delivers to this process.

    Args:
      task: the task (its data is built if needed).
      batch_size: examples per batch on this process.
      seed: loader seed.
      batches: batches timed.
      warmup: batches read first, untimed.

    Returns:
      Examples per second.
    """
    iterator = iter(task.train_loader(batch_size, seed=seed))
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def _global_batch(task, batch_per_device: int, mesh) -> dict[str, jax.Array]:
    size = parallel.per_process_batch_size(batch_per_device * mesh.devices.size, mesh)
    return parallel.to_global(synthetic_batch(task, size, seed=jax.process_index()), mesh)


# ============================================================================ one configuration
def benchmark(
    config,
    num_devices: int,
    batch_per_device: int,
    *,
    steps: int = 20,
    warmup: int = 3,
    max_batch: Optional[int] = None,
    input_batches: int = 0,
) -> dict[str, Any]:
    """Measures the train step of `config`'s task on the first `num_devices` devices.

    Args:
      config: the task config (with its model dtype already set).
      num_devices: devices in the mesh.
      batch_per_device: examples per device per step.
      steps: timed steps.
      warmup: untimed steps after compiling.
      max_batch: if set, also search the largest batch per device up to this.
      input_batches: if > 0, also time this many batches of the real input pipeline.

    Returns:
      One record (see `finish_records` for the fields it adds).
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"Need --steps >= 1 and --warmup >= 0, got {steps} and {warmup}.")
    mesh = parallel.make_mesh(num_devices)
    task = tasks.get_task(config)
    if input_batches <= 0:
        task.without_data()  # Synthetic batches only: no dataset is built or read.
    _, _, state, step = train.build_training(config, task, mesh)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    batch = _global_batch(task, batch_per_device, mesh)

    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    state, times = time_steps(compiled, state, batch, steps=steps, warmup=warmup)
    memory, memory_source = peak_memory(compiled, mesh.devices.ravel())

    global_batch = batch_per_device * num_devices
    median = statistics.median(times)
    examples_per_s = global_batch / median
    flops = flops_of(compiled) * num_devices
    device = mesh.devices.ravel()[0]
    record = {
        "task": config.task,
        "stage": config.get("stage") or "",
        "model": config.model.name,
        "num_params": int(num_params),
        # One example's model input (H, W, C; T, H, W, C for video) without the batch axis.
        "input_shape": list(np.shape(task.model_inputs(task.example_batch(1)))[1:]),
        "platform": device.platform,
        "device_kind": getattr(device, "device_kind", device.platform),
        "device_count": num_devices,
        "process_count": jax.process_count(),
        "batch_per_device": batch_per_device,
        "global_batch": global_batch,
        "dtype": str(config.model.get("dtype", "float32")),
        "steps": steps,
        "warmup": warmup,
        "compile_s": compile_s,
        "step_time_median_s": median,
        "step_time_min_s": min(times),
        "step_time_max_s": max(times),
        "examples_per_s": examples_per_s,
        "examples_per_s_per_device": examples_per_s / num_devices,
        "flops_per_step": flops,
        "tflops": flops / median / 1e12,
        "peak_memory_bytes": memory,
        "peak_memory_source": memory_source,
        # 2 MiB pages or not (medjax/hugepages.py): it changes CPU step times.
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }
    del state  # Frees the timed state's device memory before the search builds its own.
    if max_batch:
        best, trials = find_max_batch(config, task, mesh, max_batch)
        record.update(max_batch_per_device=best, max_batch_cap=max_batch, max_batch_trials=trials)
    if input_batches > 0:
        process_batch = parallel.per_process_batch_size(global_batch, mesh)
        rate = input_pipeline_rate(
            task, process_batch, config.seed, batches=input_batches, warmup=max(warmup, 1)
        )
        consumed = examples_per_s / jax.process_count()
        record.update(
            input_examples_per_s=rate,
            input_verdict="input-bound" if rate < consumed else "compute-bound",
        )
    return record


def finish_records(records: list[dict], peak_per_device: float, peak_source: str) -> list[dict]:
    """Adds MFU, the peak used and scaling efficiency vs the 1-device record, versions, host
    and date.

    Args:
      records: records from `benchmark`, in place.
      peak_per_device: peak TFLOP/s of one device (of the host on a CPU).
      peak_source: where that number comes from.

    Returns:
      The same records.
    """
    single = {
        (r["batch_per_device"], r["dtype"]): r["examples_per_s"]
        for r in records
        if r["device_count"] == 1
    }
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for r in records:
        chips = r["process_count"] if r["platform"] == "cpu" else r["device_count"]
        peak = peak_per_device * chips
        base = single.get((r["batch_per_device"], r["dtype"]))
        r.update(
            peak_tflops=peak,
            peak_tflops_source=peak_source,
            mfu=r["tflops"] / peak if peak else None,
            scaling_efficiency=(r["examples_per_s"] / (r["device_count"] * base) if base else None),
            jax=jax.__version__,
            jaxlib=jaxlib.__version__,
            flax=flax.__version__,
            hostname=socket.gethostname(),
            date=date,
        )
    return records


# ============================================================================ table
def _bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


def format_table(records: list[dict]) -> str:
    """A plain-text table of the records, one row each."""
    header = (
        "devices",
        "batch/dev",
        "dtype",
        "compile s",
        "step ms med [min-max]",
        "ex/s",
        "ex/s/dev",
        "scaling",
        "TFLOP/s",
        "MFU",
        "peak mem",
    )
    extra = any("input_examples_per_s" in r for r in records)
    maxb = any("max_batch_per_device" in r for r in records)
    header += ("input ex/s", "verdict") * extra + ("max batch/dev",) * maxb
    rows = [header]
    for r in records:
        scaling = r.get("scaling_efficiency")
        mfu = r.get("mfu")
        row = (
            str(r["device_count"]),
            str(r["batch_per_device"]),
            r["dtype"],
            f"{r['compile_s']:.1f}",
            f"{1e3 * r['step_time_median_s']:.1f} [{1e3 * r['step_time_min_s']:.1f}-"
            f"{1e3 * r['step_time_max_s']:.1f}]",
            f"{r['examples_per_s']:.1f}",
            f"{r['examples_per_s_per_device']:.1f}",
            "-" if scaling is None else f"{scaling:.2f}",
            f"{r['tflops']:.4f}",
            "-" if mfu is None else f"{100 * mfu:.2f}%",
            _bytes(r["peak_memory_bytes"]),
        )
        if extra:
            rate = r.get("input_examples_per_s")
            row += ("-", "-") if rate is None else (f"{rate:.1f}", r["input_verdict"])
        if maxb:
            row += (str(r.get("max_batch_per_device", "-")),)
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    first = records[0] if records else {}
    title = (
        f"{'/'.join(filter(None, (first.get('task'), first.get('stage'))))} {first.get('model')} "
        f"({first.get('num_params', 0) / 1e6:.2f}M params, input "
        f"{'x'.join(map(str, first.get('input_shape', [])))}) on "
        f"{first.get('device_kind')}; peak {first.get('peak_tflops', 0):.3g} TFLOP/s "
        f"({first.get('peak_tflops_source')})"
    )
    return "\n".join([title, *lines])


# ============================================================================ subprocesses
def _worker_argv(argv: list[str], num_devices: int, out: str) -> list[str]:
    """This command line with --devices / --out / --worker_out replaced for one worker."""
    dropped = ("devices", "out", "worker_out")
    result, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.lstrip("-").split("=", 1)[0]
        if arg.startswith("-") and name in dropped:
            skip = "=" not in arg
            continue
        result.append(arg)
    return [*result, f"--devices={num_devices}", f"--worker_out={out}"]


def _xla_flags(num_devices: int) -> str:
    """XLA_FLAGS of this process with the host device count set to `num_devices`."""
    flags_now = re.sub(rf"{_DEVICE_COUNT_FLAG}=\S*", "", os.environ.get("XLA_FLAGS", ""))
    return f"{flags_now.strip()} {_DEVICE_COUNT_FLAG}={num_devices}".strip()


def run_in_subprocess(argv: list[str], num_devices: int) -> list[dict]:
    """Runs `python -m medjax.benchmark argv` on `num_devices` virtual CPU devices.

    Returns:
      The worker's records.
    """
    with tempfile.TemporaryDirectory(prefix="medjax-bench-") as tmp:
        out = os.path.join(tmp, "records.json")
        env = {**os.environ, "XLA_FLAGS": _xla_flags(num_devices)}
        command = [sys.executable, "-m", "medjax.benchmark", *_worker_argv(argv, num_devices, out)]
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"The {num_devices}-device benchmark subprocess failed (exit "
                f"{proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        with open(out) as f:
            return json.load(f)


# ============================================================================ main
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    writers.quiet_library_logs()
    parallel.maybe_initialize_distributed()
    config, _ = with_dtype(_CONFIG.value, _DTYPE.value)
    here = jax.device_count()
    counts = [int(n) for n in _DEVICES.value] if _DEVICES.value else [here]
    if any(n < 1 for n in counts):
        raise app.UsageError(f"--devices must be positive counts, got {_DEVICES.value}.")
    platform = jax.devices()[0].platform
    if platform != "cpu" and max(counts) > here:
        raise app.UsageError(f"--devices={max(counts)} but {here} devices are visible.")
    if jax.process_count() > 1 and any(n != here for n in counts):
        raise app.UsageError(f"With several processes, --devices must be {here}.")
    batch_per_device = resolve_batch_per_device(config, counts, _BATCH_PER_DEVICE.value)
    max_batch = None
    if _FIND_MAX_BATCH.value:
        default = CPU_MAX_BATCH if platform == "cpu" else ACCELERATOR_MAX_BATCH
        max_batch = _MAX_BATCH.value or default
    options = dict(
        steps=_STEPS.value,
        warmup=_WARMUP.value,
        max_batch=max_batch,
        input_batches=_INPUT_BATCHES.value if _INPUT_PIPELINE.value else 0,
    )

    records = []
    for n in counts:
        if platform == "cpu" and n != here:
            logging.info("Benchmarking %d devices in a subprocess.", n)
            records += run_in_subprocess(sys.argv[1:], n)
        else:
            logging.info("Benchmarking %d device(s).", n)
            records.append(benchmark(config, n, batch_per_device, **options))
    if _WORKER_OUT.value:
        writers.write_json(_WORKER_OUT.value, records)
        return
    if jax.process_index() != 0:
        return
    peak, source = device_peak_tflops(
        jax.devices()[0], records[0]["dtype"], override=_PEAK_TFLOPS.value
    )
    finish_records(records, peak, source)
    config_flag = flags.FLAGS["config"]
    for record in records:
        record["config"] = config_flags.get_config_filename(config_flag)
        record["config_overrides"] = config_flags.get_override_values(config_flag)
    print(format_table(records))
    writers.write_json(_OUT.value, records)
    print(f"Wrote {len(records)} record(s) to {_OUT.value}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
