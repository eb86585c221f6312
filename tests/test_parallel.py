"""Data parallelism: 1 device and 8 virtual CPU devices train to the same loss and parameters."""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
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


def _conv_grad_hlo(jit):
    """The compiled text of a 3x3 convolution's gradient (forward, both gradients)."""
    x, w = jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 8, 32))

    def loss(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=CONV_DIMS)
        return jnp.sum(y * y)

    return jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()


CONV_DIMS = ("NHWC", "HWIO", "NHWC")


def _ynn_convolutions(text: str) -> int:
    """How many convolutions of a compiled HLO text sit in computations YNNPACK runs."""
    called = re.findall(r"calls=%?([\w.\-]+), [^\n]*__ynn_fusion", text)
    bodies = dict(re.findall(r"\n%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", text, re.S))
    return sum(bodies.get(name, "").count("convolution(") for name in called)


def test_cpu_steps_keep_convolutions_with_xla(monkeypatch):
    # On CPU medjax's jit leaves convolutions to XLA's multi-threaded ones (YNNPACK's ran on
    # one thread); the options must actually reach the compiler.
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    parallel.compiler_options.cache_clear()
    try:
        assert parallel.compiler_options() == parallel.CPU_COMPILER_OPTIONS
        text = _conv_grad_hlo(parallel.jit)
        assert "convolution" in text
        assert "LIBRARY_FUSION_TYPE" not in text
        assert _ynn_convolutions(text) == 0
        assert _ynn_convolutions(_conv_grad_hlo(jax.jit)) > 0  # XLA's default, for contrast
    finally:
        parallel.compiler_options.cache_clear()


def test_xla_flags_choice_wins_over_the_cpu_default(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    parallel.compiler_options.cache_clear()
    try:
        assert parallel.compiler_options() is None
    finally:
        parallel.compiler_options.cache_clear()
