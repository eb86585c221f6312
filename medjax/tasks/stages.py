"""Trained stages of one experiment directory, loaded for chained inference.

Staged tasks (CRL: segment, quality, keypoints; EchoNet: ef, segment) train each stage in
DIR/<stage>/ with its config.json next to its checkpoints. `load_stage` restores a stage's
model variables and rebuilds its task from that saved config, so inference needs only DIR.
"""

from __future__ import annotations

import json
import os

import ml_collections
from absl import logging

from medjax import checkpoint as ckpt_lib
from medjax import evaluate as eval_lib
from medjax import parallel, tasks


class MissingStageError(FileNotFoundError):
    """A stage of a chain has no config or checkpoint in the experiment directory."""


def _train_command(config_file: str, variant: str, workdir: str) -> str:
    return f"python -m medjax.main --config={config_file}:{variant} --workdir={workdir}"


def stage_config(
    workdir: str, stage: str, config_file: str, variant: str
) -> ml_collections.ConfigDict:
    """The config a stage was trained with (DIR/<stage>/config.json).

    Args:
      workdir: the experiment directory.
      stage: the stage's folder name.
      config_file, variant: how the stage is trained, for the error message
        (e.g. "configs/crl.py", "stage=quality").
    """
    path = os.path.join(workdir, stage, "config.json")
    if not os.path.exists(path):
        what = f"trained {stage!r} stage" if stage else "trained model"
        raise MissingStageError(
            f"No {what} in {workdir} ({path} is missing). Train it with: "
            f"{_train_command(config_file, variant, workdir)}"
        )
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def data_from(config):
    """An `overrides` for `load_stage`: the stage reads the data `config` names (its data_dir
    and manual_dir), not the data it was trained on."""

    def override(stage_config):
        stage_config.data.data_dir = config.data.data_dir
        stage_config.data.manual_dir = config.data.manual_dir

    return override


def load_stage(
    workdir: str,
    stage: str,
    *,
    config_file: str,
    variant: str,
    checkpoint: str = "best",
    overrides=None,
):
    """Restores one stage: (config, task, model variables, step).

    Args:
      overrides: callable(config) applied to the saved config first (e.g. another data_dir).
    """
    config = stage_config(workdir, stage, config_file, variant)
    if overrides is not None:
        overrides(config)
    checkpointer = ckpt_lib.Checkpointer(
        os.path.join(workdir, stage, "checkpoints"),
        best_metric=config.train.best_metric,
        best_mode=config.train.best_mode,
        read_only=True,
    )
    if not checkpointer.all_steps():
        raise MissingStageError(
            f"The {stage!r} stage in {workdir} has no checkpoint. Train it with: "
            f"{_train_command(config_file, variant, workdir)}"
        )
    step = checkpointer.resolve(checkpoint)
    state = checkpointer.restore_arrays(step, parallel.replicated(parallel.make_mesh()))
    task = tasks.get_task(config)
    task.load_artifacts(os.path.join(workdir, stage))
    logging.info("Loaded stage %s from step %d of %s", stage, step, workdir)
    return config, task, eval_lib.model_variables(state), step
