"""medjax.benchmark: records of the smoke U-Net on 1 and 2 (virtual CPU) devices, the max-batch
search, and clear errors. No wall-clock speed is asserted: the machine is shared."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from medjax import benchmark, hugepages
from tests.conftest import CRL_CONFIG, load_config, run_module

FIELDS = (
    "task",
    "stage",
    "model",
    "num_params",
    "platform",
    "device_kind",
    "device_count",
    "process_count",
    "batch_per_device",
    "global_batch",
    "dtype",
    "compile_s",
    "step_time_median_s",
    "step_time_min_s",
    "step_time_max_s",
    "examples_per_s",
    "examples_per_s_per_device",
    "scaling_efficiency",
    "flops_per_step",
    "tflops",
    "peak_tflops",
    "peak_tflops_source",
    "mfu",
    "peak_memory_bytes",
    "peak_memory_source",
    "jax",
    "jaxlib",
    "flax",
    "hostname",
    "date",
    "config",
    "config_overrides",
)


def test_one_and_two_devices_give_complete_records(crl_data_dir, tmp_path):
    out = tmp_path / "benchmark.json"
    proc = run_module(
        [
            "-m",
            "medjax.benchmark",
            f"--config={CRL_CONFIG}:smoke",
            "--devices=1,2",
            "--batch_per_device=2",
            "--steps=3",
            "--warmup=1",
            "--input_pipeline",
            "--input_batches=2",
            f"--config.data.data_dir={crl_data_dir}",
            f"--out={out}",
        ],
        # Without GLIBC_TUNABLES the entry point picks 2 MiB pages itself where it can.
        env_extra={
            "XLA_FLAGS": "",
            "JAX_PLATFORMS": "cpu",
            "GLIBC_TUNABLES": None,
            hugepages.OFF_SWITCH: None,
        },
    )
    records = json.loads(out.read_text())
    assert [r["device_count"] for r in records] == [1, 2]
    supported = hugepages.wanted(
        {}, "medjax.benchmark", sys.platform, hugepages.glibc_version(), hugepages.thp_mode()
    )
    assert {r["glibc_tunables"] for r in records} == {hugepages.TUNABLE if supported else None}
    for r in records:
        assert not [k for k in FIELDS if k not in r], r
        assert r["platform"] == "cpu" and r["batch_per_device"] == 2
        assert r["global_batch"] == 2 * r["device_count"]
        assert 0 < r["step_time_min_s"] <= r["step_time_median_s"] <= r["step_time_max_s"]
        assert r["examples_per_s"] > 0 and r["examples_per_s_per_device"] > 0
        assert r["compile_s"] > 0 and r["flops_per_step"] > 0 and r["peak_memory_bytes"] > 0
        assert 0 < r["mfu"] <= 1
        assert r["input_examples_per_s"] > 0
        assert r["input_verdict"] in ("input-bound", "compute-bound")
        assert r["config_overrides"] == {"data.data_dir": crl_data_dir}
    one, two = records
    assert one["scaling_efficiency"] == pytest.approx(1.0)
    assert two["scaling_efficiency"] > 0
    # XLA's cost analysis is per device: the record holds the whole step's FLOPs.
    assert two["flops_per_step"] == pytest.approx(2 * one["flops_per_step"], rel=0.05)
    assert "scaling" in proc.stdout and "MFU" in proc.stdout


def test_find_max_batch_on_the_smoke_unet():
    from medjax import parallel, tasks

    config = load_config()
    best, trials = benchmark.find_max_batch(
        config, tasks.get_task(config), parallel.make_mesh(1), cap=4
    )
    assert best == 4
    assert [t["batch_per_device"] for t in trials] == [1, 2, 4]


@pytest.mark.parametrize(
    "limit, cap, best, tried",
    [
        (37, 256, 37, [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]),
        (1000, 6, 6, [1, 2, 4, 6]),
        (0, 8, 0, [1]),
    ],
)
def test_search_max_batch_doubles_then_bisects(limit, cap, best, tried):
    found, trials = benchmark.search_max_batch(lambda b: b <= limit, cap)
    assert found == best
    assert [t["batch_per_device"] for t in trials] == tried


def test_batch_that_does_not_divide_is_a_clear_error():
    config = load_config(train__batch_size=6)
    with pytest.raises(ValueError, match="train.batch_size=6 does not divide over 4 devices"):
        benchmark.resolve_batch_per_device(config, [1, 2, 4], 0)
    with pytest.raises(ValueError, match="must be positive"):
        benchmark.resolve_batch_per_device(config, [1], -2)
    assert benchmark.resolve_batch_per_device(config, [1, 2], 0) == 3
    assert benchmark.resolve_batch_per_device(config, [1, 4], 5) == 5


def test_synthetic_batch_values_fit_each_field():
    from medjax import tasks

    seg = benchmark.synthetic_batch(tasks.get_task(load_config()), 4)
    assert seg["image"].dtype == np.uint8 and seg["image"].max() > 1
    assert set(np.unique(seg["mask"])) <= {0, 1}
    keypoints = tasks.get_task(load_config(arg="smoke,stage=keypoints"))
    points = benchmark.synthetic_batch(keypoints, 4)["points"]
    assert points.dtype == np.float32 and 0 <= points.min() and points.max() < 32
    labels = benchmark.synthetic_batch(tasks.get_task(load_config(arg="smoke,stage=quality")), 8)
    assert set(np.unique(labels["label"])) <= {0, 1}


def test_bfloat16_is_set_on_a_copy_of_the_config():
    config = load_config()
    bf16, dtype = benchmark.with_dtype(config, "bfloat16")
    assert dtype == "bfloat16" and bf16.model.dtype == "bfloat16"
    assert "dtype" not in config.model
    assert benchmark.with_dtype(config, None) == (config, "float32")


def test_worker_command_line_replaces_devices_and_out():
    argv = ["--config=c.py:smoke", "--devices", "1,2", "--out=x.json", "--steps=3"]
    assert benchmark._worker_argv(argv, 2, "/t/r.json") == [
        "--config=c.py:smoke",
        "--steps=3",
        "--devices=2",
        "--worker_out=/t/r.json",
    ]
    assert benchmark.is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory"))
    assert not benchmark.is_out_of_memory(ValueError("shapes do not match"))
