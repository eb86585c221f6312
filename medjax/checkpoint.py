"""Checkpoints: the only module that imports orbax.

A checkpoint holds three items: the train state (a pytree of arrays), the state of the
training data iterator (grain's JSON), and the config it was written with. Saves are
asynchronous and atomic: orbax writes into a temporary directory and renames it when the save
is complete, so a process killed mid-save leaves the previous checkpoints intact; leftover
temporary directories are ignored and removed when the manager opens the directory.

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
        """Starts saving; returns at once when async. Call `wait()` before exiting."""
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(state),
                _DATA: ocp.args.JsonSave(data_state or {}),
                _CONFIG: ocp.args.JsonSave(config or {}),
            }
        )
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        self._manager.save(step, args=args, metrics=metrics or None, force=force)

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
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
