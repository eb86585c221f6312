"""Task registry: `config.task` -> the Task class that knows its model, loss, data and metrics."""

from __future__ import annotations

import os
from typing import Any


def _crl(config: Any):
    if config.stage == "quality":
        from medjax.tasks.crl_quality import CrlQuality

        return CrlQuality(config)
    if config.stage == "keypoints":
        from medjax.tasks.crl_keypoints import CrlKeypoints

        return CrlKeypoints(config)
    from medjax.tasks.crl import CrlSegmentation

    return CrlSegmentation(config)


def _echonet(config: Any):
    if config.stage == "segment":
        from medjax.tasks.echonet import EchonetSegmentation

        return EchonetSegmentation(config)
    from medjax.tasks.echonet import EchonetEF

    return EchonetEF(config)


def _ich(config: Any):
    from medjax.tasks.ich import IchSegmentation

    return IchSegmentation(config)


def _embryo(config: Any):
    from medjax.tasks.embryo import make_task

    return make_task(config)


def _perfusion(config: Any):
    from medjax.tasks.perfusion import make_task

    return make_task(config)


# The metrics medjax.main prints after evaluation, where a task reports them.
HEADLINE_METRICS = (
    "dice",
    "iou",
    "pixel_f1",  # segmentation
    "auc",
    "accuracy",
    "sensitivity",
    "specificity",  # classification
    "point_error_mm",
    "pck_5mm",
    "crl_abs_error_mm",  # keypoints
    "mae",
    "rmse",
    "r2",
    "auc_hfref",  # EF regression
    "dice_overall",
    "dice_ed",
    "dice_es",  # LV segmentation
    "dice_positive_slices",
    "dice_pooled",
    "iou_pooled",
    "pixel_auc",
    "slice_auc",  # ICH
    "macro_f1",
    "recon_mse",
    "kl",
    "elbo",  # embryo
    "kappa",
    "mfi_mae",
    "quadrant_accuracy",  # perfusion
)

TASKS = {
    "crl": _crl,
    "echonet": _echonet,
    "ich": _ich,
    "embryo": _embryo,
    "perfusion": _perfusion,
}


def run_dir(config: Any, workdir: str) -> str:
    """The directory of one run: `workdir/<stage>` for staged tasks, else `workdir`.

    The stages of one experiment (e.g. CRL segment, quality, keypoints) share a workdir, so
    chained prediction and end-to-end evaluation need only that workdir.
    """
    stage = config.get("stage")
    return os.path.join(workdir, stage) if stage else workdir


def get_task(config: Any):
    if config.task not in TASKS:
        raise ValueError(
            f"config.task={config.task!r} is not a known task; known: {', '.join(sorted(TASKS))}."
        )
    return TASKS[config.task](config)


def fit_without_gradients(config: Any):
    """`fit(config, run_dir) -> metrics` for a stage fitted without the gradient trainer
    (no checkpoints: e.g. the embryo SVM), or None for the stages the trainer trains."""
    if config.task == "embryo" and config.get("stage") == "classify_svm":
        from medjax.tasks.embryo import fit_svm

        return fit_svm
    if config.task == "perfusion" and config.model.name == "classical":
        from medjax.tasks.perfusion_classical import fit_and_evaluate_classical

        return fit_and_evaluate_classical
    return None


def end_to_end_evaluator(config: Any):
    """The function evaluating a task's chained stages together, for tasks that chain."""
    if config.task == "crl":
        from medjax.tasks.crl_chain import evaluate_end_to_end

        return evaluate_end_to_end
    if config.task == "echonet":
        from medjax.tasks.echonet_chain import evaluate_beat_to_beat

        return evaluate_beat_to_beat
    raise ValueError(f"Task {config.task!r} has no end-to-end evaluation (crl, echonet do).")
