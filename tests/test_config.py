"""Configs: every configs/*.py loads, its :smoke variant trains a step, typos are errors."""

from __future__ import annotations

import glob
import os

import pytest

from medjax import config_lib, train
from tests.conftest import CRL_CONFIG, REPO, load_config, run_module

CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def test_there_are_configs():
    assert CRL_CONFIG in CONFIG_FILES


def _smoke_variants():
    """(config file, variant) pairs: `smoke`, or `stage=X,smoke` for each stage a file has."""
    import importlib.util

    pairs = []
    for path in CONFIG_FILES:
        spec = importlib.util.spec_from_file_location("_cfg", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        stages = getattr(module, "STAGES", None)
        key = getattr(module, "STAGE_VARIANT", "stage")  # configs/echonet.py: task=segment.
        pairs += [(path, f"{key}={s},smoke") for s in stages] if stages else [(path, "smoke")]
    return pairs


@pytest.mark.parametrize("path,variant", _smoke_variants(), ids=lambda v: os.path.basename(str(v)))
def test_config_smoke_variant_runs_one_step(path, variant, crl_data_dir, tmp_path):
    config = load_config(path, variant, train__steps=1)
    assert "python -m medjax.main" in open(path).read().split('"""')[1], "docstring command"
    if config.data.name == "crl_ultrasound":
        config.data.data_dir = crl_data_dir
    else:
        config.data.data_dir = str(tmp_path / "data")
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert result["step"] == 1


def test_variants_compose_and_unknown_variant_is_named():
    config = load_config(arg="smoke,stage=segment")
    assert config.train.steps == load_config(arg="smoke").train.steps
    with pytest.raises(ValueError, match="'smok'"):
        load_config(arg="smok")
    with pytest.raises(ValueError, match="stage='nonsense'"):
        load_config(arg="stage=nonsense")
    with pytest.raises(ValueError, match="needs a value"):
        config_lib.parse_variants("stage", stage="segment")


def test_locked_config_rejects_new_key():
    config = load_config()
    with pytest.raises(AttributeError):
        config.train.stepz = 3


def test_misspelt_override_on_the_command_line_names_the_key(tmp_path):
    proc = run_module(
        [
            "-m",
            "medjax.main",
            f"--config={CRL_CONFIG}:smoke",
            f"--workdir={tmp_path}",
            "--config.train.stepz=3",
        ],
        check=False,
    )
    assert proc.returncode != 0
    assert "stepz" in proc.stderr
    assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_has_the_trainers_train_block(path):
    expected = set(
        config_lib.train_config(
            steps=1, batch_size=1, learning_rate=1.0, best_metric="val_loss", best_mode="min"
        )
    )
    train_block = load_config(path, arg=None).train
    assert expected <= set(train_block), sorted(expected - set(train_block))
    assert train_block.best_mode in ("max", "min")
    assert train_block.nonfinite in ("stop", "skip")


def test_checkpoints_follow_evaluations_unless_told():
    kwargs = dict(steps=10, batch_size=2, learning_rate=0.1, best_metric="val_x", best_mode="max")
    assert config_lib.train_config(**kwargs, eval_every=7).checkpoint_every == 7
    assert config_lib.train_config(**kwargs, eval_every=7, checkpoint_every=3).checkpoint_every == 3
