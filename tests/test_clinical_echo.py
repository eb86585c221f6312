"""End-systole detection: SciPy-equivalent peaks, simulated beats found, clip placement."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import signal as sps

from medjax.clinical import echo


@pytest.mark.parametrize("seed", range(5))
def test_find_peaks_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    x = np.cumsum(rng.normal(size=300))
    x[50:53] = x[50]  # A plateau.
    for distance, prominence in ((1, 0.0), (10, 0.0), (1, 2.0), (15, 1.5)):
        kwargs = {"distance": distance} if distance > 1 else {}
        if prominence:
            kwargs["prominence"] = prominence
        expected, _ = sps.find_peaks(x, **kwargs)
        found = echo.find_peaks(x, min_distance=distance, min_prominence=prominence)
        np.testing.assert_array_equal(found, expected)
    peaks, _ = sps.find_peaks(x)
    np.testing.assert_allclose(echo.prominences(x, peaks), sps.peak_prominences(x, peaks)[0])


@pytest.mark.parametrize("bpm", [55, 75, 110])
def test_end_systoles_of_a_noisy_area_curve(bpm):
    fps, seconds = 50.0, 4.0
    t = np.arange(int(fps * seconds)) / fps
    rng = np.random.default_rng(bpm)
    phase = 2 * np.pi * bpm / 60 * t + 0.3
    areas = 1000 + 300 * np.cos(phase) + rng.normal(0, 15, t.size)  # ED at cos peaks.
    found = echo.end_systoles(areas, fps)
    # True end-systoles: the minima of the clean curve, cos(phase) = -1.
    k = np.arange(0, 20)
    truth = ((2 * k + 1) * np.pi - 0.3) / (2 * np.pi * bpm / 60) * fps
    truth = truth[(truth > 2) & (truth < t.size - 3)]
    assert abs(len(found) - len(truth)) <= 1
    for frame in found:
        assert np.min(np.abs(truth - frame)) < 0.1 * fps * 60 / bpm


def test_beat_clip_start_stays_inside_the_video():
    assert echo.beat_clip_start(100, 200, 32, 2) == 100 - 31
    assert echo.beat_clip_start(5, 200, 32, 2) == 0
    assert echo.beat_clip_start(195, 200, 32, 2) == 200 - 63
    assert echo.beat_clip_start(30, 40, 32, 2) == 0  # Short video: padded to 64 frames.
