"""`--config.model.init_from` and the frozen-backbone schedule, through the real trainer."""

from __future__ import annotations

import numpy as np
import pytest

from medjax import train
from tests.conftest import load_config
from tests.test_pretrained import _random_arrays, _torchvision_resnet, _write_npz
from tests.test_train import saved_state


def test_keypoint_stage_starts_from_imagenet_file_and_freezes_backbone(crl_data_dir, tmp_path):
    width = 4  # The smoke ResNet-18's width; the mapping is width-agnostic.
    arrays = _random_arrays(_torchvision_resnet(18, width=width))
    path = _write_npz(tmp_path / "resnet18.npz", arrays)
    config = load_config(
        arg="stage=keypoints,smoke",
        data__data_dir=crl_data_dir,
        model__init_from=str(path),
        model__freeze_backbone_steps=2,
        train__steps=4,
        train__checkpoint_every=2,
        train__eval_every=100,
        train__learning_rate=1e-2,
    )
    train.train_and_evaluate(config, str(tmp_path / "run"))
    frozen, later = saved_state(str(tmp_path / "run"), 2), saved_state(str(tmp_path / "run"), 4)
    backbone = frozen["params"]["backbone"]
    # The file's RGB first conv (O, I, H, W) summed over I, as HWIO for the 1-channel input.
    conv1 = arrays["conv1.weight"].sum(axis=1, keepdims=True).transpose(2, 3, 1, 0)
    np.testing.assert_allclose(backbone["conv1"]["kernel"], conv1, rtol=1e-6)
    np.testing.assert_allclose(
        backbone["layer2_0"]["conv1"]["kernel"],
        arrays["layer2.0.conv1.weight"].transpose(2, 3, 1, 0),
        rtol=1e-6,
    )
    # Unchanged through the two frozen steps (checked above), trained after them.
    assert not np.allclose(later["params"]["backbone"]["conv1"]["kernel"], conv1)


def test_init_from_a_file_that_does_not_fit_lists_the_keys(crl_data_dir, tmp_path):
    arrays = _random_arrays(_torchvision_resnet(18, width=4))
    del arrays["layer1.0.conv1.weight"]
    arrays["layer9.0.extra.weight"] = np.zeros((3,), np.float32)
    path = _write_npz(tmp_path / "broken.npz", arrays)
    config = load_config(
        arg="stage=keypoints,smoke",
        data__data_dir=crl_data_dir,
        model__init_from=str(path),
        train__steps=1,
    )
    with pytest.raises(ValueError, match="broken.npz") as info:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert "layer1.0.conv1.weight" in str(info.value)
    assert "layer9.0.extra.weight" in str(info.value)
