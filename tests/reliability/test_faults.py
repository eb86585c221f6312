"""Fault injection: training and dataset builds survive kills, preemption, full or unwritable
disks and NaN/Inf, and a run is reproducible to the bit.

Every test injects one fault into the CRL `:smoke` segmentation run (a tiny U-Net) and checks
the outcome against one uninterrupted run of the same config (`reference`). Runs that are
killed go through a small driver (`_TRAIN_DRIVER`) that can slow each step and hold one
checkpoint save open, so that a kill lands where the test means it to; every wait has a
deadline. Runs share a persistent JAX compilation cache, which only saves compile time; the
determinism test's second run compiles afresh.

Faults injected: kill -9 (at random steps, and inside an asynchronous checkpoint save),
SIGTERM, ENOSPC in a background checkpoint write, an unwritable workdir or checkpoint
directory, NaN/Inf loss and gradients (stop and skip modes, across a resume), a dataset build
that fails or is killed half-way, a synthesis killed half-way.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.experimental.compilation_cache import compilation_cache
from medjax_datasets import crl_ultrasound

from medjax import checkpoint as ckpt_lib
from medjax import data, parallel, tasks, train
from medjax.input import pipeline
from medjax.tasks import crl
from tests.conftest import CRL_CONFIG, REPO, load_config

STEPS = 12
# The run every fault is compared with; checkpoint and log intervals do not change the result.
RUN = dict(train__steps=STEPS, train__log_every=1, train__eval_every=4)
TIMING_KEYS = ("steps_per_sec",)  # Wall-clock rates: the only metrics allowed to differ.
KILL_SEED = 20240617

# Runs `python -m medjax.main` with two optional faults, set by environment variables:
# FAULTS_STEP_DELAY (seconds of sleep before each batch: room for a signal between steps) and
# FAULTS_HOLD_SAVE_STEP (that step's asynchronous checkpoint save stops half-way, its
# temporary directory on disk, after printing a line saying so).
_TRAIN_DRIVER = r"""
import os, re, sys, time
import orbax.checkpoint as ocp
from medjax import parallel

delay = float(os.environ.get("FAULTS_STEP_DELAY", "0"))
if delay > 0:
    to_global = parallel.to_global
    def slow_to_global(*args, **kwargs):
        time.sleep(delay)
        return to_global(*args, **kwargs)
    parallel.to_global = slow_to_global

hold = os.environ.get("FAULTS_HOLD_SAVE_STEP")
if hold:
    save_json = ocp.handlers.JsonCheckpointHandler._save_fn
    async def held_save_json(self, item, directory):
        if re.search(rf"/{hold}\.orbax-checkpoint-tmp", str(directory)):
            print(f"FAULTS: holding the save of step {hold} in {directory}", flush=True)
            time.sleep(300)
        return await save_json(self, item, directory)
    ocp.handlers.JsonCheckpointHandler._save_fn = held_save_json

from absl import app, flags
from medjax import main
flags.mark_flags_as_required(["config", "workdir"])
app.run(main.main)
"""

# `python -m medjax.data build ...`, stopping for good before yielding its 5th example.
_BUILD_DRIVER = r"""
import sys, time
from medjax_datasets import crl_ultrasound

generate = crl_ultrasound.CrlUltrasound._generate_examples
def held_generate(self, records):
    for index, example in enumerate(generate(self, records)):
        if index == 4:
            print("FAULTS: holding the build", flush=True)
            time.sleep(300)
        yield example
crl_ultrasound.CrlUltrasound._generate_examples = held_generate

from medjax import data
data.main(sys.argv[1:])
"""


# ============================================================================ helpers
class Process:
    """A subprocess whose merged stdout/stderr is collected line by line in a thread."""

    def __init__(self, args: list[str], env: dict):
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match:
        """The first output line matching `pattern`; fails at the deadline or if the process
        ends without printing one."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    match = re.search(pattern, line)
                    if match:
                        return match
                seen = len(self.lines)
                if not self._reader.is_alive():
                    self.stop()
                    raise AssertionError(f"Exited before printing {pattern!r}:\n{self.output}")
                left = deadline - time.monotonic()
                if left <= 0:
                    self.stop()
                    raise AssertionError(f"No {pattern!r} within {timeout} s:\n{self.output}")
                self._changed.wait(min(left, 1.0))

    def finish(self, timeout: float) -> int:
        """Waits for the exit (killing the process at the deadline); returns its exit code."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"Still running after {timeout} s:\n{self.output}") from None
        self._reader.join(timeout=10)
        return self.proc.returncode

    def stop(self) -> None:
        """kill -9, then reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=10)


def start_training(workdir, data_dir, cache_dir, *flags, step_delay=0.0, hold_save_step=None):
    """`python -m medjax.main --config=configs/crl.py:smoke` with `RUN` (it trains in
    `<workdir>/segment`), through the fault driver; `cache_dir` None compiles afresh."""
    run_flags = [f"--config.{k.replace('__', '.')}={v}" for k, v in RUN.items()]
    env = {
        "FAULTS_STEP_DELAY": str(step_delay),
        "FAULTS_HOLD_SAVE_STEP": "" if hold_save_step is None else str(hold_save_step),
    }
    env.update({name.upper(): str(value) for name, value in _CACHE_OPTIONS.items()})
    env["JAX_COMPILATION_CACHE_DIR"] = "" if cache_dir is None else str(cache_dir)
    args = [
        "-c",
        _TRAIN_DRIVER,
        f"--config={CRL_CONFIG}:smoke",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        *run_flags,
        *flags,
    ]
    return Process(args, env)


def wait_until(condition, run: Process, timeout: float = 60.0) -> None:
    """Polls `condition` until true; at the deadline, kills `run` and fails."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            run.stop()
            raise AssertionError(f"Condition not met within {timeout} s:\n{run.output}")
        time.sleep(0.02)


def complete_steps(checkpoint_dir) -> list[int]:
    """Steps of the finished checkpoints on disk (orbax names them by the bare step)."""
    if not os.path.isdir(checkpoint_dir):
        return []
    return sorted(int(name) for name in os.listdir(checkpoint_dir) if name.isdigit())


def leftover_tmp_dirs(checkpoint_dir) -> list[str]:
    if not os.path.isdir(checkpoint_dir):
        return []
    return sorted(name for name in os.listdir(checkpoint_dir) if "tmp" in name)


def saved_state(checkpoint_dir, step: int) -> dict:
    checkpointer = ckpt_lib.Checkpointer(str(checkpoint_dir), read_only=True)
    return jax.device_get(
        checkpointer.restore_arrays(step, parallel.replicated(parallel.make_mesh()))
    )


def assert_trees_equal(a, b) -> None:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_all_finite(tree) -> None:
    for leaf in jax.tree.leaves(tree):
        assert np.all(np.isfinite(leaf))


def metric_lines(workdir) -> list[dict]:
    """metrics.jsonl without the wall-clock rates."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return [{k: v for k, v in line.items() if k not in TIMING_KEYS} for line in lines]


# ============================================================================ fixtures
_CACHE_OPTIONS = {
    "jax_compilation_cache_dir": None,  # Set by the fixture.
    "jax_persistent_cache_min_compile_time_secs": 0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
}


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    """A persistent compilation cache for this module's runs, in process and in subprocesses
    (the same step is compiled a dozen times); the previous settings are restored after."""
    path = str(tmp_path_factory.mktemp("jax_cache"))
    previous = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
    for name, value in {**_CACHE_OPTIONS, "jax_compilation_cache_dir": path}.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    yield path
    for name, value in previous.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def reference(crl_data_dir, tmp_path_factory):
    """One uninterrupted in-process run of `RUN`: its workdir, final state and metrics."""
    workdir = tmp_path_factory.mktemp("reference")
    result = train.train_and_evaluate(load_config(data__data_dir=crl_data_dir, **RUN), str(workdir))
    assert result["step"] == STEPS
    return {
        "workdir": workdir,
        "state": saved_state(workdir / "checkpoints", STEPS),
        "metrics": metric_lines(workdir),
    }


# ============================================================================ kill -9
def test_kill_9_three_times_resumes_from_newest_complete_checkpoint(
    crl_data_dir, reference, cache_dir, tmp_path
):
    """Three kills: in the middle of the first checkpoint's asynchronous save (so the restart
    starts afresh), at a seeded random point, in the middle of a later save (at a seeded random
    step). Each restart resumes from the newest complete checkpoint, never from a half-written
    one, and the run ends bit-identical to the uninterrupted one (parameters and
    metrics.jsonl) with no temporary directory left."""
    rng = random.Random(KILL_SEED)
    run_dir = tmp_path / "segment"
    checkpoints = run_dir / "checkpoints"
    every_step = ["--config.train.checkpoint_every=1"]  # A save per step: kills meet saves.
    for kill in range(3):
        latest = (complete_steps(checkpoints) or [None])[-1]
        done = latest or 0
        hold = {0: 1, 1: None, 2: done + rng.randint(1, 3)}[kill]
        run = start_training(
            tmp_path, crl_data_dir, cache_dir, *every_step, step_delay=0.1, hold_save_step=hold
        )
        if latest is not None:
            run.wait_for(rf"Resumed from step {latest} \(")
        if hold is not None:
            run.wait_for(rf"FAULTS: holding the save of step {hold} ")
        else:  # At a random point after a random step whose checkpoint is complete.
            target = done + rng.randint(1, 3)
            run.wait_for(rf"step {target}/{STEPS} loss")
            needed = max(target - 1, done + 1)
            wait_until(lambda: max(complete_steps(checkpoints), default=0) >= needed, run)
            time.sleep(rng.uniform(0.0, 0.1))
        run.stop()
        steps = complete_steps(checkpoints)
        assert max(steps, default=0) >= done, (kill, steps, run.output)
        if hold is not None:  # Killed mid-save: the step's temporary directory is all there is.
            assert steps[-1:] == ([hold - 1] if hold > 1 else []), steps
            assert any(name.startswith(f"{hold}.") for name in leftover_tmp_dirs(checkpoints))

    latest = complete_steps(checkpoints)[-1]
    final = start_training(tmp_path, crl_data_dir, cache_dir, *every_step)
    assert final.finish(timeout=240) == 0, final.output
    assert f"Resumed from step {latest} (" in final.output
    assert leftover_tmp_dirs(checkpoints) == []
    assert_trees_equal(saved_state(checkpoints, STEPS), reference["state"])
    assert metric_lines(run_dir) == reference["metrics"]


# ============================================================================ SIGTERM
def test_sigterm_checkpoints_within_bounded_time_and_run_continues(
    crl_data_dir, reference, cache_dir, tmp_path
):
    """SIGTERM mid-run: a checkpoint of the current step and exit 0 within 60 s; the next run
    resumes from it and ends bit-identical to the uninterrupted run."""
    run_dir = tmp_path / "segment"
    checkpoints = run_dir / "checkpoints"
    rarely = ["--config.train.checkpoint_every=1000"]  # Only the preemption saves mid-run.
    run = start_training(tmp_path, crl_data_dir, cache_dir, *rarely, step_delay=0.2)
    run.wait_for(rf"step {random.Random(KILL_SEED).randint(2, 5)}/{STEPS} loss")
    signalled = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish(timeout=60) == 0, run.output
    assert time.monotonic() - signalled < 60
    stopped = int(re.search(r"Stopped by SIGTERM at step (\d+)", run.output).group(1))
    assert stopped < STEPS
    assert complete_steps(checkpoints) == [stopped]

    resumed = start_training(tmp_path, crl_data_dir, cache_dir, *rarely)
    assert resumed.finish(timeout=240) == 0, resumed.output
    assert f"Resumed from step {stopped} (" in resumed.output
    assert complete_steps(checkpoints)[-1] == STEPS
    assert_trees_equal(saved_state(checkpoints, STEPS), reference["state"])
    assert metric_lines(run_dir) == reference["metrics"]


# ============================================================================ determinism
def test_same_seed_gives_bit_identical_metrics_and_parameters(crl_data_dir, reference, tmp_path):
    """A second run, in another process compiling afresh, writes the very same metrics.jsonl
    (but for wall-clock rates) and parameters as the reference run."""
    run = start_training(tmp_path, crl_data_dir, None)
    assert run.finish(timeout=240) == 0, run.output
    lines = metric_lines(tmp_path / "segment")
    assert any("val_dice" in line for line in lines) and len(lines) > STEPS
    assert lines == reference["metrics"]
    assert_trees_equal(saved_state(tmp_path / "segment" / "checkpoints", STEPS), reference["state"])


# ============================================================================ disk
def test_unwritable_workdir_is_one_clear_error_before_training(crl_data_dir, tmp_path, monkeypatch):
    """A workdir under a file, or whose checkpoints/ is a file (root-proof stand-ins for a
    directory one cannot write): WorkdirError naming it, before any task is built."""

    def no_task(config):
        raise AssertionError("the task was built before the workdir was checked")

    monkeypatch.setattr(tasks, "get_task", no_task)
    config = load_config(data__data_dir=crl_data_dir)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    under_a_file = blocker / "run"
    with pytest.raises(train.WorkdirError, match=re.escape(f"Cannot write to {under_a_file}")):
        train.train_and_evaluate(config, str(under_a_file))

    checkpoints_is_a_file = tmp_path / "run"
    checkpoints_is_a_file.mkdir()
    (checkpoints_is_a_file / "checkpoints").write_text("not a directory")
    with pytest.raises(train.WorkdirError, match="--workdir") as info:
        train.train_and_evaluate(config, str(checkpoints_is_a_file))
    assert str(checkpoints_is_a_file / "checkpoints") in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="permission bits do not stop root")
def test_read_only_workdir_is_one_clear_error(crl_data_dir, tmp_path):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        with pytest.raises(train.WorkdirError, match=re.escape(str(read_only))):
            train.train_and_evaluate(load_config(data__data_dir=crl_data_dir), str(read_only))
    finally:
        read_only.chmod(0o755)


def test_disk_full_at_second_save_names_workdir_and_keeps_previous_checkpoint(
    crl_data_dir, reference, tmp_path, monkeypatch
):
    """ENOSPC in the background write of the 2nd checkpoint (step 8): a clear error naming the
    checkpoint directory, the step and the intact checkpoint; once space is back, the run
    resumes from that checkpoint and ends as the uninterrupted run."""
    save_json = ocp.handlers.JsonCheckpointHandler._save_fn

    async def disk_full_at_step_8(self, item, directory):
        if re.search(r"/8\.orbax-checkpoint-tmp", str(directory)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await save_json(self, item, directory)

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", disk_full_at_step_8)
    config = load_config(data__data_dir=crl_data_dir, train__checkpoint_every=4, **RUN)
    with pytest.raises(ckpt_lib.CheckpointWriteError) as info:
        train.train_and_evaluate(config, str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / "checkpoints") in message
    assert "checkpoint of step 8" in message and "No space left on device" in message
    assert "step 4, is intact" in message
    assert info.value.errno == errno.ENOSPC
    assert complete_steps(tmp_path / "checkpoints") == [4]
    assert_all_finite(saved_state(tmp_path / "checkpoints", 4)["params"])

    # Space is back; the run resumes in two time slices (train.halt_at_step, then the rest).
    monkeypatch.undo()
    config.train.halt_at_step = 10
    assert train.train_and_evaluate(config, str(tmp_path))["step"] == 10
    assert leftover_tmp_dirs(tmp_path / "checkpoints") == []
    assert complete_steps(tmp_path / "checkpoints")[-1] == 10
    config.train.halt_at_step = -1
    assert train.train_and_evaluate(config, str(tmp_path))["step"] == STEPS
    assert_trees_equal(saved_state(tmp_path / "checkpoints", STEPS), reference["state"])
    assert metric_lines(tmp_path) == reference["metrics"]


# ============================================================================ NaN / Inf
class _PoisonedLoader:
    """The task's training loader, with the batches of chosen steps marked so that the
    patched loss multiplies the loss (hence the gradients) by NaN or Inf there."""

    def __init__(self, loader, poison: dict[int, float], seen: dict, first_step: int):
        self._loader, self._poison, self._seen = loader, poison, seen
        self._first_step = first_step

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __iter__(self):
        return _PoisonedIterator(iter(self._loader), self._poison, self._seen, self._first_step)


class _PoisonedIterator:
    def __init__(self, iterator, poison, seen, first_step):
        self._iterator, self._poison, self._seen = iterator, poison, seen
        self._step = first_step - 1

    def __next__(self):
        batch = dict(next(self._iterator))
        self._step += 1
        self._seen[self._step] = batch
        factor = self._poison.get(self._step, 1.0)
        batch["poison"] = np.full(len(batch["image"]), factor, np.float32)
        return batch

    def get_state(self):
        return self._iterator.get_state()

    def set_state(self, state):
        self._iterator.set_state(state)


_GET_TASK = tasks.get_task


def _poison_task(monkeypatch, poison: dict[int, float], first_step: int = 1) -> dict:
    """Patches the task so that step k's loss is multiplied by poison[k] (the run's first
    batch being step `first_step`); returns the dict step -> batch that the loader fills."""
    seen: dict = {}
    get_task = _GET_TASK

    def poisoned_task(config):
        task = get_task(config)
        loss, loader = task.loss, task.train_loader

        def poisoned_loss(variables, batch, rng):
            batch = dict(batch)
            factor = batch.pop("poison")[0]
            value, aux = loss(variables, batch, rng)
            return value * factor, aux

        task.loss = poisoned_loss
        task.train_loader = lambda *a, **k: _PoisonedLoader(
            loader(*a, **k), poison, seen, first_step
        )
        return task

    monkeypatch.setattr(tasks, "get_task", poisoned_task)
    return seen


def _nan_config(data_dir, mode: str, steps: int):
    config = load_config(
        data__data_dir=data_dir,
        augment__enabled=False,  # Batches hold the stored images: checkable against records.
        train__steps=steps,
        train__log_every=1,
        train__checkpoint_every=1,
        train__keep_checkpoints=100,
        train__eval_every=1000,
    )
    with config.unlocked():  # The configs leave train.nonfinite out: 'stop' by default.
        if mode:
            config.train.nonfinite = mode
    return config


def _train_images_by_id(data_dir) -> dict[str, np.ndarray]:
    source = data.load_builder("crl_ultrasound", data_dir).as_data_source()["train"]
    images = {}
    for i in range(len(source)):
        example = crl.preprocess(source[i], image_size=32)
        images[example["id"]] = example["image"]
    return images


def _assert_dump_lists_batch(path, step: int, batch: dict, images: dict, action: str) -> None:
    with open(path) as f:
        dump = json.load(f)
    assert dump["step"] == step and dump["action"] == action
    assert len(dump["examples"]) == len(batch["image"])
    for row, example in zip(batch["image"], dump["examples"]):
        np.testing.assert_array_equal(row, images[example["id"]])
        assert example["patient_id"]


def test_nan_loss_stops_naming_step_and_batch_never_checkpointed(
    crl_data_dir, tmp_path, monkeypatch
):
    """NaN at step 4 (default 'stop'): the error names the step and the batch dump, the dump
    lists exactly that batch's examples in order, and no checkpoint from step 4 on exists."""
    seen = _poison_task(monkeypatch, {4: np.nan})
    with pytest.raises(train.NonFiniteLossError) as info:
        train.train_and_evaluate(_nan_config(crl_data_dir, "", steps=6), str(tmp_path))
    dump = tmp_path / "nonfinite_batch_4.json"
    message = str(info.value)
    assert "at step 4" in message and str(dump) in message and "non-finite loss" in message
    _assert_dump_lists_batch(dump, 4, seen[4], _train_images_by_id(crl_data_dir), "stopped")
    steps = complete_steps(tmp_path / "checkpoints")
    assert steps == [1, 2, 3]
    for step in steps:
        assert_all_finite(saved_state(tmp_path / "checkpoints", step)["params"])


def test_nonfinite_skip_mode_drops_those_updates_and_finishes(
    crl_data_dir, tmp_path, monkeypatch, caplog
):
    """Inf at step 3, NaN at step 5, a stop and resume at step 4 in between: both updates
    are dropped, counted across the resume, logged and their batches listed."""
    poison = {3: np.inf, 5: np.nan}
    seen = _poison_task(monkeypatch, poison)
    caplog.set_level("WARNING")
    config = _nan_config(crl_data_dir, "skip", steps=7)
    config.train.halt_at_step = 4
    first = train.train_and_evaluate(config, str(tmp_path))
    assert first["step"] == 4 and first["skipped_steps"] == 1
    seen_after_resume = _poison_task(monkeypatch, poison, first_step=5)
    config.train.halt_at_step = -1
    result = train.train_and_evaluate(config, str(tmp_path))
    seen.update(seen_after_resume)
    assert result["step"] == 7 and result["skipped_steps"] == 2
    images = _train_images_by_id(crl_data_dir)
    for step in (3, 5):
        _assert_dump_lists_batch(
            tmp_path / f"nonfinite_batch_{step}.json", step, seen[step], images, "skipped"
        )
        assert f"Skipped the update of step {step}" in caplog.text
    logged = {line["step"]: line for line in metric_lines(tmp_path) if "loss" in line}
    assert [logged[s]["skipped_steps"] for s in range(1, 8)] == [0, 0, 1, 1, 2, 2, 2]
    assert logged[3]["loss"] is None and logged[4]["loss"] is not None

    checkpoints = tmp_path / "checkpoints"
    assert complete_steps(checkpoints) == list(range(1, 8))
    states = {step: saved_state(checkpoints, step) for step in range(1, 8)}
    for state in states.values():
        assert_all_finite(state["params"])
    for skipped in (3, 5):  # A skipped step changes nothing but the step counter.
        before, after = states[skipped - 1], states[skipped]
        for part in ("params", "opt_state", "batch_stats"):
            assert_trees_equal(after[part], before[part])
    assert not np.array_equal(
        jax.tree.leaves(states[4]["params"])[0], jax.tree.leaves(states[3]["params"])[0]
    )


def test_unknown_nonfinite_mode_is_an_error_naming_the_key(crl_data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"train\.nonfinite='ignore'"):
        train.train_and_evaluate(_nan_config(crl_data_dir, "ignore", steps=2), str(tmp_path))


# ============================================================================ dataset builds
def _raw_dir(data_dir) -> str:
    config = load_config()
    return data.synthetic_raw_dir(
        "crl_ultrasound", data_dir, config.data.synthetic_num, config.data.synthetic_seed
    )


def _split_ids(builder) -> dict[str, list[str]]:
    return {
        split: sorted(pipeline.decode_text(source[i]["id"]) for i in range(len(source)))
        for split, source in builder.as_data_source().items()
    }


def _assert_not_built(data_dir) -> None:
    assert data.built_configs("crl_ultrasound", data_dir) == []
    with pytest.raises(FileNotFoundError, match="found none"):
        data.load_builder("crl_ultrasound", data_dir)


def _incomplete_dirs(data_dir) -> list[str]:
    root = os.path.join(data_dir, "crl_ultrasound")
    return [
        os.path.join(folder, name)
        for folder, names, _ in os.walk(root)
        for name in names
        if name.startswith("incomplete.")
    ]


def test_build_failing_halfway_leaves_nothing_loadable_and_rebuilds(
    crl_data_dir, tmp_path, monkeypatch
):
    """The builder raising at its 5th example (a write error): nothing loads as built, no
    temporary folder stays, and a rebuild gives the full dataset."""
    raw, data_dir = _raw_dir(crl_data_dir), tmp_path / "data"
    generate = crl_ultrasound.CrlUltrasound._generate_examples

    def fail_halfway(self, records):
        for index, example in enumerate(generate(self, records)):
            if index == 4:
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            yield example

    monkeypatch.setattr(crl_ultrasound.CrlUltrasound, "_generate_examples", fail_halfway)
    with pytest.raises(OSError, match="injected"):
        data.build("crl_ultrasound", raw, data_dir)
    _assert_not_built(data_dir)
    assert _incomplete_dirs(data_dir) == []

    monkeypatch.undo()
    rebuilt = data.build("crl_ultrasound", raw, data_dir)
    assert _split_ids(rebuilt) == _split_ids(data.load_builder("crl_ultrasound", crl_data_dir))


def test_build_killed_mid_write_leaves_nothing_loadable_and_rebuild_cleans_up(
    crl_data_dir, tmp_path
):
    """kill -9 of `python -m medjax.data build` half-way: only a temporary folder remains,
    nothing loads as built; the rebuild removes that folder and gives the full dataset."""
    raw, data_dir = _raw_dir(crl_data_dir), tmp_path / "data"
    build = Process(
        [
            "-c",
            _BUILD_DRIVER,
            "build",
            "crl_ultrasound",
            f"--manual_dir={raw}",
            f"--data_dir={data_dir}",
        ],
        env={},
    )
    build.wait_for("FAULTS: holding the build", timeout=120)
    build.stop()
    leftovers = _incomplete_dirs(data_dir)
    assert leftovers, "the kill left no temporary build folder: it did not land mid-build"
    _assert_not_built(data_dir)

    rebuilt = data.build("crl_ultrasound", raw, data_dir)
    assert _incomplete_dirs(data_dir) == []
    assert data.built_configs("crl_ultrasound", data_dir) == [rebuilt.builder_config.name]
    reference = data.load_builder("crl_ultrasound", crl_data_dir)
    assert _split_ids(rebuilt) == _split_ids(reference)
    for split, info in reference.info.splits.items():
        assert rebuilt.info.splits[split].num_examples == info.num_examples


def test_synthesis_killed_midway_is_redone_and_its_leftover_removed(tmp_path):
    config = load_config()
    num, seed = config.data.synthetic_num, config.data.synthetic_seed
    raw = data.synthetic_raw_dir("crl_ultrasound", tmp_path, num, seed)
    os.makedirs(os.path.dirname(raw))
    leftover = f"{os.path.dirname(raw)}/.incomplete-{os.path.basename(raw)}-killed"
    os.makedirs(os.path.join(leftover, "images"))  # What a killed synthesis leaves.
    builder = data.ensure_built(
        "crl_ultrasound", data_dir=tmp_path, synthetic_num=num, synthetic_seed=seed
    )
    assert not os.path.exists(leftover)
    assert sum(info.num_examples for info in builder.info.splits.values()) == num
