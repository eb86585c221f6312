"""What a run writes to its workdir: metrics.jsonl, TensorBoard events, JSON reports.

`metrics.jsonl` holds one JSON object per logged step. On resume, lines from steps after the
restored checkpoint are dropped, so the file reads like one uninterrupted run.
TensorBoard event files are written with tensorboardX (no TensorFlow needed).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from typing import Any, Mapping

import jax


def write_json(path: str, payload: Any) -> None:
    """Writes JSON atomically (temp file + rename): a kill never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=_jsonable)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_csv(path: str, rows: list[Mapping[str, Any]], header: list[str] | None = None) -> None:
    """Writes dict rows as CSV atomically (temp file + rename); the header is the first row's
    keys unless given."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields = header if header is not None else (list(rows[0]) if rows else [])
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value)} is not JSON serialisable")


def _clean(value: float) -> Any:
    value = float(value)
    return value if math.isfinite(value) else None


class _DropLibraryInfo(logging.Filter):
    """Keeps INFO and WARNING records of orbax/grain/TFDS internals out of the run's log."""

    _NOISY = ("/orbax/", "/grain/", "/tensorflow_datasets/", "/jax/_src/xla_bridge")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.WARNING or not any(
            n in record.pathname for n in self._NOISY
        )


def quiet_library_logs() -> None:
    """Call once at program start: library INFO chatter hides the training log."""
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().addFilter(_DropLibraryInfo())


class MetricWriter:
    """Appends scalars to `<workdir>/metrics.jsonl` and TensorBoard (process 0 only)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._active = jax.process_index() == 0
        self._tb = None
        if self._active:
            from tensorboardX import (
                SummaryWriter,  # Imported lazily: slow import, process 0 only.
            )

            os.makedirs(workdir, exist_ok=True)
            self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drops lines logged after `step` (used when resuming from a checkpoint at `step`)."""
        if not self._active or not os.path.exists(self.path):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line)
                except (ValueError, KeyError):
                    continue  # A line cut by a kill: drop it.
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self._active:
            return
        record = {"step": int(step), **{k: _clean(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in scalars.items():
            if math.isfinite(float(value)):  # Undefined metrics (NaN) stay out of TensorBoard.
                self._tb.add_scalar(name, float(value), int(step))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
