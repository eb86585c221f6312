"""Checkpoints: the only module that imports orbax.

A checkpoint holds three items: the train state (a pytree of arrays), the state of the
training data iterator (grain's JSON), and the config it was written with. Saves are
asynchronous and atomic: orbax writes into a temporary directory and renames it when the save
is complete, so a process killed mid-save leaves the previous checkpoints intact; leftover
temporary directories are ignored and removed when the manager opens the directory.

A save that fails (disk full, permissions, a storage error), whether it fails at once or later in
the background, raises `CheckpointWriteError` naming the checkpoint directory, the step and the
last complete checkpoint, which the failed save leaves intact.

Kept: the latest `max_to_keep` checkpoints plus the best one by a configured metric.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp

_STATE = "state"
_DATA = "data_iterator"
_CONFIG = "config"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous checkpoints are left as they were."""


class Checkpointer:
    """Save and restore (state, data-iterator state, config) under one directory.

    Args:
      directory: where step directories are written (created if missing).
      max_to_keep: how many of the most recent checkpoints to keep.
      best_metric: name of a metric passed to `save(metrics=...)`; the best checkpoint by it is
        kept in addition to the latest ones. Empty string: keep only the latest.
      best_mode: 'max' or 'min'.
      async_save: write in a background thread while training continues.
      read_only: open an existing directory for restoring only (evaluation).
    """

    def __init__(
        self,
        directory: str,
        *,
        max_to_keep: int = 3,
        best_metric: str = "",
        best_mode: str = "max",
        async_save: bool = True,
        read_only: bool = False,
    ):
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.directory = os.path.abspath(directory)
        self.best_metric = best_metric
        self.best_mode = best_mode
        policies = [ocp.checkpoint_managers.LatestN(max_to_keep)]
        if best_metric:
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=self._metric_value,
                    reverse=(best_mode == "min"),
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            # best_fn makes orbax store each checkpoint's metrics; deletion follows the policy.
            best_fn=self._metric_value if best_metric else None,
            best_mode=best_mode,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=async_save,
            read_only=read_only,
            create=not read_only,
        )
        if read_only and not os.path.isdir(self.directory):
            raise FileNotFoundError(
                f"No checkpoint directory at {self.directory}: train first, or pass the --workdir "
                "that training used."
            )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(_STATE, _DATA, _CONFIG)
        )
        self._in_flight: Optional[int] = None  # Step of an asynchronous save not yet waited on.
        self._failure: Optional[CheckpointWriteError] = None

    def _metric_value(self, metrics: Mapping[str, Any]) -> float:
        value = float(metrics[self.best_metric])
        if math.isnan(value):  # A NaN metric must never win: rank it last.
            return -math.inf if self.best_mode == "max" else math.inf
        return value

    # ---------------------------------------------------------------- queries
    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def best_step(self) -> Optional[int]:
        """Step of the best checkpoint by `best_metric` among those on disk (None if none)."""
        best, best_value = None, None
        for step in self.all_steps():
            metrics = self._manager.metrics(step)
            if not metrics or self.best_metric not in metrics:
                continue
            value = self._metric_value(metrics)
            better = best_value is None or (
                value > best_value if self.best_mode == "max" else value < best_value
            )
            if better:
                best, best_value = step, value
        return best

    def resolve(self, which: str) -> int:
        """Turns 'latest', 'best' or a step number into a step that exists on disk."""
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"No checkpoint in {self.directory}: train first.")
        if which == "latest":
            return self.latest_step()
        if which == "best":
            step = self.best_step()
            if step is None:
                raise ValueError(
                    f"No checkpoint in {self.directory} has the metric {self.best_metric!r}; "
                    "use --checkpoint=latest or a step number."
                )
            return step
        try:
            step = int(which)
        except ValueError:
            raise ValueError(
                f"--checkpoint={which!r} is not 'best', 'latest' or a step number."
            ) from None
        if step not in steps:
            raise ValueError(
                f"No checkpoint for step {step} in {self.directory}; "
                f"available steps: {sorted(steps)}."
            )
        return step

    # ---------------------------------------------------------------- save / restore
    def save(
        self,
        step: int,
        state: Any,
        *,
        data_state: Optional[dict] = None,
        config: Optional[dict] = None,
        metrics: Optional[Mapping[str, float]] = None,
        force: bool = True,
    ) -> None:
        """Starts saving; returns at once when async. Call `wait()` or `close()` before exiting.

        Raises:
          CheckpointWriteError: this save, or the previous asynchronous one, could not be
            written (the checkpoints before it stay intact).
        """
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(state),
                _DATA: ocp.args.JsonSave(data_state or {}),
                _CONFIG: ocp.args.JsonSave(config or {}),
            }
        )
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        self.wait()  # A failure of the previous (asynchronous) save is reported as that step's.
        try:
            self._manager.save(step, args=args, metrics=metrics or None, force=force)
        except Exception as error:
            raise self._write_error(step, error) from error
        self._in_flight = step

    def restore(self, step: int, target_state: Any) -> tuple[Any, dict]:
        """Restores the train state into the structure/sharding of `target_state`.

        Returns:
          (state, data_iterator_state)
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    _STATE: ocp.args.StandardRestore(abstract),
                    _DATA: ocp.args.JsonRestore(),
                }
            ),
        )
        return restored[_STATE], dict(restored[_DATA] or {})

    def restore_arrays(self, step: int, sharding: Any) -> dict:
        """Restores the saved state as a nested dict of arrays placed with `sharding`.

        Needs no target structure (shapes come from the checkpoint's metadata), hence neither the
        optimizer nor any training code, and works whatever device count the run trained on.
        """
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    _STATE: ocp.args.StandardRestore(fallback_sharding=sharding),
                }
            ),
        )
        return restored[_STATE]

    def saved_config(self, step: int) -> dict:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()})
        )
        return dict(restored[_CONFIG] or {})

    def wait(self) -> None:
        """Blocks until the asynchronous save in flight, if any, is on disk.

        Raises:
          CheckpointWriteError: that save failed.
        """
        if self._failure is not None:
            raise self._failure
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            raise self._write_error(self._in_flight, error) from error
        self._in_flight = None

    def close(self) -> None:
        """Waits for the save in flight, then releases the manager.

        Raises:
          CheckpointWriteError: the save in flight failed (unless that failure was already
            raised by `save` or `wait`).
        """
        reported = self._failure is not None
        try:
            if not reported:
                self.wait()
        finally:
            try:
                self._manager.close()
            except Exception:  # The failure already raised resurfaces here: it is not news.
                if not (reported or self._failure is not None):
                    raise

    def _write_error(self, step: Optional[int], error: Exception) -> CheckpointWriteError:
        """The error a user sees for a failed save: directory, step, cause, what is intact."""
        try:
            self._manager.reload()  # What is on disk now, not what this manager last wrote.
        except Exception:  # The directory itself may be unreadable: keep the cached list.
            pass
        complete = self._manager.latest_step()
        intact = (
            f"The last complete checkpoint, step {complete}, is intact"
            if complete is not None
            else "No earlier checkpoint exists"
        )
        what = f"the checkpoint of step {step}" if step is not None else "a checkpoint"
        failure = CheckpointWriteError(
            f"Could not write {what} to {self.directory}: {error}. {intact}. Free disk space "
            "(or fix the directory's permissions, or use another --workdir), then re-run the "
            "same command to resume from the last complete checkpoint."
        )
        failure.errno = getattr(error, "errno", None)
        self._failure = failure
        self._in_flight = None
        return failure
