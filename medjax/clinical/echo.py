"""Echocardiography measures: end-systole detection from the LV area curve, beat-to-beat EF.

EchoNet-Dynamic's beat-to-beat protocol: segment the left ventricle in every frame, take the
area (pixels) per frame, find the end-systoles as the peaks of the negative area (the
smallest ventricle of each beat), with a minimum prominence of half the area range (5th to
95th percentile, robust to a few bad frames) and a minimum distance between beats; then
predict EF on the clip around each end-systole and average over beats.
"""

from __future__ import annotations

import numpy as np


def find_peaks(signal, *, min_distance: int = 1, min_prominence: float = 0.0) -> np.ndarray:
    """Indices of the local maxima of a 1-D signal, filtered like SciPy's `find_peaks`.

    A peak is a sample (or the middle of a flat run of samples) higher than both neighbours. Peaks closer than `min_distance` samples to a higher kept
    peak are dropped (highest first); then peaks whose prominence (height above the higher
    of the two lowest points between it and the nearest higher sample on each side, or the
    signal's end) is below `min_prominence` are dropped.

    Returns:
      Sorted int64 indices.
    """
    x = np.asarray(signal, np.float64)
    n = x.size
    if n < 3:
        return np.zeros(0, np.int64)
    candidates = []
    i = 1
    while i < n - 1:
        if x[i] > x[i - 1]:
            j = i
            while j + 1 < n and x[j + 1] == x[i]:
                j += 1
            if j + 1 < n and x[j + 1] < x[i]:
                candidates.append((i + j) // 2)
            i = j + 1
        else:
            i += 1
    peaks = np.array(candidates, np.int64)
    if peaks.size and min_distance > 1:
        keep = np.ones(peaks.size, bool)
        for k in np.argsort(-x[peaks], kind="stable"):
            if keep[k]:
                close = np.abs(peaks - peaks[k]) < min_distance
                close[k] = False
                keep[close] = False
        peaks = peaks[keep]
    if peaks.size and min_prominence > 0:
        peaks = peaks[prominences(x, peaks) >= min_prominence]
    return peaks


def prominences(signal, peaks) -> np.ndarray:
    """Topographic prominence of each peak index in `peaks` (see `find_peaks`)."""
    x = np.asarray(signal, np.float64)
    out = np.empty(len(peaks))
    for k, p in enumerate(peaks):
        left = p
        left_min = x[p]
        while left > 0 and x[left - 1] <= x[p]:
            left -= 1
            left_min = min(left_min, x[left])
        right = p
        right_min = x[p]
        while right < x.size - 1 and x[right + 1] <= x[p]:
            right += 1
            right_min = min(right_min, x[right])
        out[k] = x[p] - max(left_min, right_min)
    return out


def end_systoles(
    areas, fps: float, *, min_distance_s: float = 0.4, prominence: float = 0.5
) -> np.ndarray:
    """Frames of end-systole: peaks of the negative LV area.

    Args:
      areas: LV area per frame.
      fps: frames per second of the video.
      min_distance_s: minimum time between two end-systoles (0.4 s: up to 150 bpm).
      prominence: minimum prominence as a share of the area range (5th-95th percentile).

    Returns:
      Sorted frame indices.
    """
    areas = np.asarray(areas, np.float64)
    if areas.size < 3:
        return np.zeros(0, np.int64)
    low, high = np.percentile(areas, [5, 95])
    return find_peaks(
        -areas,
        min_distance=max(1, int(round(min_distance_s * fps))),
        min_prominence=prominence * (high - low),
    )


def beat_clip_start(es_frame: int, num_frames: int, length: int, period: int) -> int:
    """Start of the clip of `length` frames every `period` centred on an end-systole,
    moved inside the video (after zero-padding to ``length * period`` frames)."""
    span = (length - 1) * period + 1
    last_start = max(num_frames, length * period) - span
    return int(min(max(es_frame - span // 2, 0), last_start))
