"""Learning: a tiny U-Net beats trivial baselines by a wide margin on held-out synthetic data."""

from __future__ import annotations

import numpy as np

from medjax import evaluate, tasks, train
from tests.conftest import load_config


def _dice(pred: np.ndarray, target: np.ndarray) -> float:
    denom = pred.sum() + target.sum()
    return 2.0 * np.logical_and(pred, target).sum() / denom if denom else 1.0


def test_unet_beats_background_and_mask_prior_baselines(tmp_path):
    config = load_config(
        arg="smoke",
        data__data_dir=str(tmp_path / "data"),
        data__synthetic_num=80,
        data__image_size=48,
        model__width=8,
        train__steps=150,
        train__batch_size=16,
        train__learning_rate=3e-3,
        train__warmup_steps=10,
        train__log_every=50,
        train__eval_every=150,
        train__checkpoint_every=150,
        eval__batch_size=16,
    )
    train.train_and_evaluate(config, str(tmp_path / "run"))
    model = evaluate.evaluate_checkpoint(
        config, str(tmp_path / "run"), checkpoint="latest", split="test"
    )

    task = tasks.get_task(config)
    train_masks = np.concatenate([b["mask"][b["valid"]] for b, _ in task.eval_batches("train", 16)])
    prior = train_masks.mean(axis=0) > 0.5  # The best fixed mask: where the fetus usually is.
    test_masks = np.concatenate([b["mask"][b["valid"]] for b, _ in task.eval_batches("test", 16)])
    background = np.mean([_dice(np.zeros_like(m, bool), m > 0) for m in test_masks])
    prior_dice = np.mean([_dice(prior, m > 0) for m in test_masks])

    assert model["num_examples"] == len(test_masks) >= 8
    assert background == 0.0
    assert model["dice"] > 0.7, model
    assert model["dice"] > prior_dice + 0.3, (model["dice"], prior_dice)
