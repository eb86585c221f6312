"""Tests for medjax.plots: files written and readable, statistics, NaN and tiny inputs."""

import math
import os

import cv2
import numpy as np
import pytest

from medjax import plots

_LINE_BGR = np.array([40, 40, 210])
_POINT_BGR = np.array([180, 90, 20])


def _count_colour(image, bgr, tolerance=40):
    """Number of pixels within ``tolerance`` (per channel) of a BGR colour."""
    return int(np.all(np.abs(image.astype(int) - bgr) <= tolerance, axis=-1).sum())


def test_bland_altman_hand_values(tmp_path):
    """Differences 1, 3, 2, 6: mean 3, sample SD sqrt(14 / 3), limits 3 -+ 1.96 SD."""
    reference = np.array([10.0, 20.0, 30.0, 40.0])
    measured = np.array([11.0, 23.0, 32.0, 46.0])
    path = str(tmp_path / "sub" / "ba.png")  # The missing folder is created.
    stats = plots.bland_altman_png(path, reference, measured, title="CRL", units="mm")
    # Squared deviations from 3: 4 + 0 + 1 + 9 = 14; / (n - 1) = 14 / 3.
    sd = math.sqrt(14.0 / 3.0)
    assert stats["n"] == 4 and isinstance(stats["n"], int)
    assert stats["mean_diff"] == pytest.approx(3.0)
    assert stats["sd_diff"] == pytest.approx(sd)
    assert stats["loa_low"] == pytest.approx(3.0 - 1.96 * sd)
    assert stats["loa_high"] == pytest.approx(3.0 + 1.96 * sd)
    image = cv2.imread(path)
    assert image is not None and image.shape == (480, 680, 3)
    # Three horizontal lines across the box and four points were drawn.
    assert _count_colour(image, _LINE_BGR) > 3 * 200
    assert _count_colour(image, _POINT_BGR) > 4 * 15


def test_bland_altman_matches_numpy_and_drops_nan(tmp_path):
    """Random data with NaN / inf pairs: statistics of the finite pairs only."""
    rng = np.random.default_rng(0)
    reference = rng.uniform(20, 80, 30)
    measured = reference + rng.normal(1.0, 2.0, 30)
    reference[3], measured[7], measured[11] = np.nan, np.nan, np.inf
    keep = np.isfinite(reference) & np.isfinite(measured)
    diffs = measured[keep] - reference[keep]
    stats = plots.bland_altman_png(
        str(tmp_path / "ba.png"), reference, measured, title="GA", units="days"
    )
    assert stats["n"] == 27
    assert stats["mean_diff"] == pytest.approx(np.mean(diffs))
    assert stats["sd_diff"] == pytest.approx(np.std(diffs, ddof=1))
    assert stats["loa_high"] - stats["loa_low"] == pytest.approx(2 * 1.96 * np.std(diffs, ddof=1))


def test_bland_altman_one_and_zero_pairs(tmp_path):
    """n = 1: bias only, SD and limits NaN; n = 0: all NaN; the file is written anyway."""
    one = plots.bland_altman_png(str(tmp_path / "one.png"), [3.0], [4.5], title="one")
    assert one["n"] == 1 and one["mean_diff"] == 1.5
    assert all(math.isnan(one[k]) for k in ("sd_diff", "loa_low", "loa_high"))
    assert cv2.imread(str(tmp_path / "one.png")) is not None
    none = plots.bland_altman_png(
        str(tmp_path / "none.png"), [np.nan, 1.0], [2.0, np.nan], title="none"
    )
    assert none["n"] == 0
    assert all(math.isnan(none[k]) for k in ("mean_diff", "sd_diff", "loa_low", "loa_high"))
    assert cv2.imread(str(tmp_path / "none.png")) is not None
    with pytest.raises(ValueError, match="size"):
        plots.bland_altman_png(str(tmp_path / "bad.png"), [1.0, 2.0], [1.0], title="bad")


def test_scatter_png(tmp_path):
    """Statistics of the finite pairs against numpy; the file is a readable square PNG."""
    x = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
    y = np.array([1.5, 1.5, 3.5, 5.0, 2.0])
    path = str(tmp_path / "scatter.png")
    stats = plots.scatter_png(path, x, y, title="CRL", xlabel="true (mm)", ylabel="pred (mm)")
    # |y - x| = 0.5, 0.5, 0.5, 1.0 -> MAE 2.5 / 4.
    assert stats["n"] == 4 and stats["mae"] == pytest.approx(0.625)
    assert stats["pearson_r"] == pytest.approx(np.corrcoef(x[:4], y[:4])[0, 1])
    image = cv2.imread(path)
    assert image is not None and image.shape == (560, 560, 3)
    assert _count_colour(image, _POINT_BGR) > 4 * 15
    single = plots.scatter_png(
        str(tmp_path / "single.png"), [2.0], [3.0], title="one", xlabel="x", ylabel="y"
    )
    assert single["n"] == 1 and single["mae"] == 1.0 and math.isnan(single["pearson_r"])
    assert os.path.getsize(str(tmp_path / "single.png")) > 0


def test_nice_ticks_cover_the_range():
    """Ticks step by 1, 2 or 5 times a power of ten and cover the data."""
    ticks = plots._nice_ticks(0.13, 0.87)
    np.testing.assert_allclose(ticks, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ticks = plots._nice_ticks(-2.2, 6.4)
    np.testing.assert_allclose(ticks, np.arange(-4.0, 10.0, 2.0))
    ticks = plots._nice_ticks(5.0, 5.0)  # A single value gets padded.
    assert ticks[0] < 5.0 < ticks[-1]
    assert plots._tick_label(0.4, ticks=np.array([0.0, 0.2])) == "0.4"
    assert plots._tick_label(-1e-17, ticks=np.array([0.0, 0.2])) == "0.0"
