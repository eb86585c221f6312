"""Data parallelism: 1 device and 8 virtual CPU devices train to the same loss and parameters."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from medjax import parallel
from tests.conftest import CRL_CONFIG, run_module
from tests.test_train import saved_state


def _train(workdir, data_dir, num_devices, *extra):
    env = {
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={num_devices}",
        "JAX_PLATFORMS": "cpu",
    }
    return run_module(
        [
            "-m",
            "medjax.main",
            f"--config={CRL_CONFIG}:smoke",
            f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}",
            "--config.train.steps=3",
            "--config.train.log_every=1",
            *extra,
        ],
        env_extra=env,
        check=False,
    )


def test_one_and_eight_devices_agree(crl_data_dir, tmp_path):
    one, eight = str(tmp_path / "one"), str(tmp_path / "eight")
    for workdir, n in ((one, 1), (eight, 8)):
        proc = _train(workdir, crl_data_dir, n)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"{n} device(s)" in proc.stderr and f"mesh shape {{'data': {n}}}" in proc.stderr
    losses = []
    one, eight = os.path.join(one, "segment"), os.path.join(eight, "segment")
    for workdir in (one, eight):
        lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
        losses.append([l["loss"] for l in lines if "loss" in l and "val_loss" not in l])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
    a, b = saved_state(one, 3), saved_state(eight, 3)
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_batch_not_dividing_over_devices_is_a_clear_error(crl_data_dir, tmp_path):
    proc = _train(str(tmp_path), crl_data_dir, 8, "--config.train.batch_size=12")
    assert proc.returncode != 0
    assert "train.batch_size=12 does not divide over 8 devices" in proc.stderr


def test_to_global_shards_the_batch_axis():
    mesh = parallel.make_mesh()
    batch = {"x": np.arange(4 * mesh.devices.size * 3).reshape(4 * mesh.devices.size, 3)}
    out = parallel.to_global(batch, mesh)["x"]
    assert out.shape == batch["x"].shape
    assert out.sharding.spec[0] == parallel.DATA_AXIS
    np.testing.assert_array_equal(np.asarray(out), batch["x"])
