"""Checkpoint-based evaluation reproduces training's validation numbers and writes its report."""

from __future__ import annotations

import json
import os

import cv2
import pytest

from medjax import evaluate, tasks, train
from tests.conftest import CRL_CONFIG, load_config, run_module


@pytest.fixture(scope="module")
def trained(crl_data_dir, tmp_path_factory):
    experiment = str(tmp_path_factory.mktemp("eval_run"))
    config = load_config(data__data_dir=crl_data_dir)
    workdir = tasks.run_dir(config, experiment)  # experiment/segment
    result = train.train_and_evaluate(config, workdir)
    return config, workdir, result


def test_evaluate_reproduces_last_validation_dice(trained):
    config, workdir, result = trained
    lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    last_val = [l for l in lines if "val_dice" in l][-1]
    assert last_val["step"] == config.train.steps
    metrics = evaluate.evaluate_checkpoint(config, workdir, checkpoint="latest", split="validation")
    assert metrics["step"] == config.train.steps
    assert metrics["dice"] == pytest.approx(last_val["val_dice"], abs=1e-6)
    assert metrics["num_examples"] == last_val["val_num_examples"]


def test_evaluate_command_writes_metrics_and_overlays(trained):
    config, workdir, _ = trained
    run_module(
        [
            "-m",
            "medjax.evaluate",
            f"--config={CRL_CONFIG}:smoke",
            f"--workdir={os.path.dirname(workdir)}",
            f"--config.data.data_dir={config.data.data_dir}",
            "--checkpoint=best",
            "--split=test",
        ]
    )
    out_dir = os.path.join(workdir, "eval", "test")
    metrics = json.load(open(os.path.join(out_dir, "metrics.json")))
    assert metrics["split"] == "test" and metrics["checkpoint"] == "best"
    assert 0.0 <= metrics["dice"] <= 1.0 and metrics["num_examples"] > 0
    grid = cv2.imread(os.path.join(out_dir, "overlays.png"))
    assert grid is not None
    rows = min(config.eval.num_plot, metrics["num_examples"])
    size = config.data.image_size * 2  # Rows are drawn at 2x.
    assert grid.shape == (rows * size, 3 * size, 3)


def test_evaluate_unknown_checkpoint_is_a_clear_error(trained):
    config, workdir, _ = trained
    with pytest.raises(ValueError, match="No checkpoint for step 999"):
        evaluate.evaluate_checkpoint(config, workdir, checkpoint="999")
    with pytest.raises(FileNotFoundError, match="train first"):
        evaluate.evaluate_checkpoint(config, workdir + "_missing", checkpoint="latest")
