"""The trainer: a smoke run writes its workdir; re-running a finished run changes nothing.

Fault injection (kills, SIGTERM, full disks, NaN/Inf, exact resume) is in tests/reliability/."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from medjax import checkpoint as ckpt_lib
from medjax import parallel, train
from tests.conftest import load_config


def saved_state(workdir: str, step: int | None = None) -> dict:
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    step = checkpointer.latest_step() if step is None else step
    return jax.device_get(
        checkpointer.restore_arrays(step, parallel.replicated(parallel.make_mesh()))
    )


def assert_trees_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_smoke_run_writes_workdir(crl_data_dir, tmp_path):
    config = load_config(data__data_dir=crl_data_dir)
    result = train.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == config.train.steps
    assert json.load(open(tmp_path / "config.json"))["task"] == "crl"
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    train_lines = [l for l in lines if "loss" in l and "val_dice" not in l]
    assert [l["step"] for l in train_lines] == list(range(2, config.train.steps + 1, 2))
    for line in train_lines:
        assert {"loss", "learning_rate", "steps_per_sec"} <= set(line)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    steps = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), read_only=True).all_steps()
    assert config.train.steps in steps


def test_rerun_of_finished_run_does_nothing(crl_data_dir, tmp_path):
    config = load_config(data__data_dir=crl_data_dir, train__steps=3)
    train.train_and_evaluate(config, str(tmp_path))
    before = saved_state(str(tmp_path))
    result = train.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 3
    assert_trees_equal(before, saved_state(str(tmp_path)))
