"""The trainer: runs, resumes exactly, survives kills and leftovers, stops on NaN and SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from medjax import checkpoint as ckpt_lib
from medjax import parallel, train
from tests.conftest import CRL_CONFIG, REPO, load_config


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


def test_resume_matches_uninterrupted_run(crl_data_dir, tmp_path):
    overrides = dict(
        data__data_dir=crl_data_dir,
        train__steps=8,
        train__eval_every=4,
        train__checkpoint_every=100,
    )
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train.train_and_evaluate(load_config(**overrides), straight)

    first = train.train_and_evaluate(load_config(train__halt_at_step=4, **overrides), split)
    assert first["step"] == 4
    # A save killed half-way leaves a temporary directory behind: it must not break the resume.
    leftover = tmp_path / "split" / "checkpoints" / "8.orbax-checkpoint-tmp-1234567"
    leftover.mkdir()
    (leftover / "garbage").write_text("half written")
    second = train.train_and_evaluate(load_config(**overrides), split)
    assert second["step"] == 8
    assert not leftover.exists()
    assert_trees_equal(saved_state(straight, 8), saved_state(split, 8))
    # metrics.jsonl reads like one run: no step logged twice.
    steps = [
        json.loads(l)["step"]
        for l in open(os.path.join(split, "metrics.jsonl"))
        if "loss" in json.loads(l)
    ]
    assert len(steps) == len(set(steps))


def test_rerun_of_finished_run_does_nothing(crl_data_dir, tmp_path):
    config = load_config(data__data_dir=crl_data_dir, train__steps=3)
    train.train_and_evaluate(config, str(tmp_path))
    before = saved_state(str(tmp_path))
    result = train.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 3
    assert_trees_equal(before, saved_state(str(tmp_path)))


def test_nan_loss_stops_naming_step_and_is_not_checkpointed(crl_data_dir, tmp_path):
    config = load_config(
        data__data_dir=crl_data_dir,
        train__steps=20,
        train__log_every=1,
        train__checkpoint_every=1,
        train__eval_every=100,
        train__learning_rate=1e30,
        train__warmup_steps=0,
        train__grad_clip=0.0,
    )
    with pytest.raises(train.NonFiniteLossError, match=r"at step (\d+)") as info:
        train.train_and_evaluate(config, str(tmp_path))
    bad_step = int(str(info.value).split("at step ")[1].split(";")[0])
    steps = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), read_only=True).all_steps()
    assert bad_step not in steps
    assert all(s < bad_step for s in steps)
    for step in steps:
        for leaf in jax.tree.leaves(saved_state(str(tmp_path), step)["params"]):
            assert np.all(np.isfinite(leaf))


def _start_training(workdir: str, data_dir: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medjax.main",
            f"--config={CRL_CONFIG}:smoke",
            f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}",
            *extra,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def _logged_steps(workdir: str) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


def test_sigterm_saves_and_exits_cleanly_then_resumes(crl_data_dir, tmp_path):
    workdir, run_dir = str(tmp_path), str(tmp_path / "segment")
    common = ["--config.train.log_every=1", "--config.train.eval_every=100000"]
    proc = _start_training(
        workdir,
        crl_data_dir,
        "--config.train.steps=100000",
        "--config.train.checkpoint_every=100000",
        *common,
    )
    _wait_for(lambda: _logged_steps(run_dir) >= 3 or proc.poll() is not None)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "Stopped by SIGTERM" in out
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    steps = ckpt_lib.Checkpointer(ckpt_dir, read_only=True).all_steps()
    assert len(steps) == 1 and steps[0] >= 3
    resumed = _start_training(
        workdir, crl_data_dir, f"--config.train.steps={steps[0] + 2}", *common
    )
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"Resumed from step {steps[0]}" in out
    assert ckpt_lib.Checkpointer(ckpt_dir, read_only=True).latest_step() == steps[0] + 2


def test_kill_9_during_saves_leaves_a_resumable_workdir(crl_data_dir, tmp_path):
    workdir, run_dir = str(tmp_path), str(tmp_path / "segment")
    common = [
        "--config.train.log_every=1",
        "--config.train.eval_every=100000",
        "--config.train.checkpoint_every=1",
    ]
    proc = _start_training(workdir, crl_data_dir, "--config.train.steps=100000", *common)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    _wait_for(lambda: _logged_steps(run_dir) >= 6 or proc.poll() is not None)
    proc.kill()  # SIGKILL while saving a checkpoint every step.
    proc.communicate(timeout=60)
    latest = ckpt_lib.Checkpointer(ckpt_dir, read_only=True).latest_step()
    assert latest is not None
    target = latest + 3
    resumed = _start_training(workdir, crl_data_dir, f"--config.train.steps={target}", *common)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"Resumed from step {latest}" in out
    assert ckpt_lib.Checkpointer(ckpt_dir, read_only=True).latest_step() == target
