"""Shared fixtures: a tiny synthetic CRL dataset built once per session, smoke configs, and
a runner for `python -m ...` subprocesses (8 virtual CPU devices, kill/resume tests)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRL_CONFIG = os.path.join(REPO, "configs", "crl.py")


def load_config(path: str = CRL_CONFIG, arg: str | None = "smoke", **overrides):
    """`configs/<x>.py:get_config(arg)` with dotted-key overrides, e.g. train__steps=4."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    config.lock()  # As config_flags does: a misspelt override below raises.
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.fixture(scope="session")
def crl_data_dir(tmp_path_factory):
    """A data_dir holding the smoke-sized synthetic CRL dataset, built once."""
    from medjax import data

    data_dir = str(tmp_path_factory.mktemp("crl_data"))
    config = load_config()
    data.ensure_built(
        "crl_ultrasound",
        manual_dir=None,
        data_dir=data_dir,
        synthetic_num=config.data.synthetic_num,
        synthetic_seed=config.data.synthetic_seed,
    )
    return data_dir


def run_module(
    args: list[str], *, env_extra: dict | None = None, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess:
    """Runs `python <args>` from the repo root and returns the completed process.

    `env_extra` is added to this process's environment; a value None removes that variable.
    """
    env = dict(os.environ)
    env.update(env_extra or {})
    env = {k: v for k, v in env.items() if v is not None}
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc
