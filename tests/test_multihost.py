"""Multi-process training on one machine: 2 processes x 2 CPU devices behave like 1 x 4,
a dead process stops the job with an error in bounded time, and the pair resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np

from medjax import checkpoint as ckpt_lib
from tests.conftest import CRL_CONFIG, REPO, run_module
from tests.test_train import saved_state

LAUNCH = os.path.join(REPO, "launch", "multiprocess_local.sh")


def _env(devices_per_process: int) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHON=sys.executable,
        DEVICES_PER_PROCESS=str(devices_per_process),
        XLA_FLAGS="",
        JAX_PLATFORMS="cpu",
        MEDJAX_HEARTBEAT_TIMEOUT_S="10",
    )
    return env


def _pair(workdir, data_dir, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        [
            "bash",
            LAUNCH,
            "2",
            f"{CRL_CONFIG}:smoke",
            workdir,
            f"--config.data.data_dir={data_dir}",
            *extra,
        ],
        cwd=REPO,
        env=_env(2),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_two_processes_match_one_process_with_four_devices(crl_data_dir, tmp_path):
    two, four = str(tmp_path / "two"), str(tmp_path / "four")
    proc = _pair(two, crl_data_dir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "4 device(s) [cpu:cpu] over 2 process(es)" in out
    run_module(
        [
            "-m",
            "medjax.main",
            f"--config={CRL_CONFIG}:smoke",
            f"--workdir={four}",
            f"--config.data.data_dir={crl_data_dir}",
        ],
        env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
    )
    a, b = (
        saved_state(os.path.join(two, "segment"), 6),
        saved_state(os.path.join(four, "segment"), 6),
    )
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    # Only process 0 writes the logs and reports.
    lines = [json.loads(l) for l in open(os.path.join(two, "segment", "metrics.jsonl"))]
    assert len([l for l in lines if "loss" in l and "val_loss" not in l]) == 3
    assert os.path.exists(os.path.join(two, "segment", "eval", "test", "metrics.json"))


def _processes(workdir, data_dir, *extra) -> list[subprocess.Popen]:
    """Two medjax.main processes started directly, as two hosts would start them."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _env(2)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "medjax.main",
                f"--config={CRL_CONFIG}:smoke",
                f"--workdir={workdir}",
                f"--config.data.data_dir={data_dir}",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                *extra,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]


def test_dead_process_stops_the_other_and_the_pair_resumes(crl_data_dir, tmp_path):
    workdir = str(tmp_path)
    run_dir = os.path.join(workdir, "segment")
    common = [
        "--config.train.log_every=1",
        "--config.train.eval_every=100000",
        "--config.train.checkpoint_every=2",
    ]
    first, second = _processes(workdir, crl_data_dir, "--config.train.steps=100000", *common)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + 240
    while not (os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 5):
        assert first.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.2)
    second.kill()  # As a crashed host would: no goodbye.
    second.communicate()
    start = time.time()
    out, _ = first.communicate(timeout=180)  # Must not hang.
    assert first.returncode != 0
    assert time.time() - start < 120
    assert "another task died" in out or "Connection" in out or "Gloo" in out, out[-3000:]

    latest = ckpt_lib.Checkpointer(
        os.path.join(run_dir, "checkpoints"), read_only=True
    ).latest_step()
    assert latest is not None and latest >= 2
    resumed = _pair(workdir, crl_data_dir, f"--config.train.steps={latest + 2}", *common)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"Resumed from step {latest}" in out
