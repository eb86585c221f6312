"""EF metrics against scikit-learn, bootstrap intervals, clip sampling and per-video grouping."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from medjax import plots
from medjax.input import clips
from medjax.tasks import echonet


@pytest.fixture
def efs():
    rng = np.random.default_rng(0)
    y = rng.uniform(15, 80, 60)
    return y, y + rng.normal(0, 6, 60)


def test_regression_metrics_match_scikit_learn(efs):
    y, p = efs
    assert echonet.mae(y, p) == pytest.approx(skm.mean_absolute_error(y, p))
    assert echonet.rmse(y, p) == pytest.approx(np.sqrt(skm.mean_squared_error(y, p)))
    assert echonet.r2_score(y, p) == pytest.approx(skm.r2_score(y, p))
    assert echonet.pearson_r2(y, p) == pytest.approx(np.corrcoef(y, p)[0, 1] ** 2)
    # A biased predictor: squared Pearson ignores the bias, R² does not.
    assert echonet.pearson_r2(y, p + 10) == pytest.approx(echonet.pearson_r2(y, p))
    assert echonet.r2_score(y, p + 10) < echonet.r2_score(y, p) - 0.2


def test_hfref_auc_matches_scikit_learn_and_the_roc_plot(efs, tmp_path):
    y, p = efs
    labels = y < 50
    expected = skm.roc_auc_score(labels, -p)
    assert echonet.auc_score(-p, labels) == pytest.approx(expected)
    fpr, tpr = plots.roc_curve(-p, labels)
    assert np.trapezoid(tpr, fpr) == pytest.approx(expected)
    summary = plots.roc_png(str(tmp_path / "roc.png"), -p, labels, title="roc")
    assert summary["auc"] == pytest.approx(expected) and (tmp_path / "roc.png").stat().st_size
    assert np.isnan(echonet.auc_score(p, np.zeros_like(labels)))
    metrics = echonet.ef_metrics(y, p, threshold=50.0, samples=500)
    assert metrics["auc_hfref"] == pytest.approx(expected)


def test_bootstrap_interval_brackets_the_value_and_is_reproducible(efs):
    y, p = efs
    value, low, high = echonet.bootstrap_ci(y, p, echonet.mae, 2000)
    assert value == pytest.approx(skm.mean_absolute_error(y, p))
    assert low < value < high and high - low < value  # 60 pairs: a usefully narrow interval.
    assert echonet.bootstrap_ci(y, p, echonet.mae, 2000) == (value, low, high)
    # A worse predictor's interval sits clearly above.
    _, worse_low, _ = echonet.bootstrap_ci(y, p + 12, echonet.mae, 2000)
    assert worse_low > high


def test_clip_sampling_follows_the_echonet_rules():
    video = np.arange(70, dtype=np.uint8).reshape(70, 1, 1, 1)
    assert clips.num_starts(70, 32, 2) == 70 - 63 + 1
    clip = clips.take_clip(video, 5, 32, 2)
    assert clip[:, 0, 0, 0].tolist() == list(range(5, 69, 2))
    short = np.ones((40, 2, 2, 1), np.uint8)
    padded = clips.take_clip(short, 0, 32, 2)  # Zero-padded to 64 frames first.
    assert padded.shape == (32, 2, 2, 1) and padded[:20].min() == 1 and padded[20:].max() == 0
    assert clips.num_starts(40, 32, 2) == 2
    single, starts = echonet.eval_clip_starts(70, 3, length=32, period=2, stride=1, max_clips=0)
    assert starts == list(range(8)) and 0 <= single < 8
    assert echonet.eval_clip_starts(70, 3, length=32, period=2, stride=1, max_clips=0)[0] == single
    _, starts = echonet.eval_clip_starts(200, 0, length=32, period=2, stride=1, max_clips=5)
    assert len(starts) == 5 and starts[0] == 0 and starts[-1] == 200 - 63


def test_pad_crop_shifts_frames_and_masks_together():
    rng = np.random.default_rng(0)
    frames = np.zeros((3, 9, 9, 1), np.uint8)
    frames[:, 4, 4] = 255
    masks = (frames > 0).astype(np.uint8)
    shifted, shifted_masks = clips.random_pad_crop(frames, 2, rng, masks=masks)
    assert shifted.shape == frames.shape
    where = np.argwhere(shifted[0, ..., 0] == 255)
    assert len(where) == 1 and np.abs(where[0] - 4).max() <= 2
    np.testing.assert_array_equal(shifted > 0, shifted_masks > 0)
    assert all((s[..., 0] == shifted[0, ..., 0]).all() for s in shifted)


def test_predictions_are_grouped_per_video():
    gathered = {
        "video_index": np.array([7, 7, 7, 2, 2, 2, 2]),
        "single": np.array([True, False, False, True, False, False, False]),
        "pred": np.array([40.0, 42.0, 44.0, 60.0, 61.0, 62.0, 66.0]),
        "ef": np.array([45.0] * 3 + [63.0] * 4),
    }
    grouped = echonet.group_clip_predictions(gathered)
    assert grouped["video_index"].tolist() == [2, 7]
    np.testing.assert_allclose(grouped["pred_all"], [63.0, 43.0])
    np.testing.assert_allclose(grouped["pred_single"], [60.0, 40.0])
    np.testing.assert_allclose(grouped["ef"], [63.0, 45.0])
    assert grouped["num_clips"].tolist() == [3, 2]
