"""Video clips: sampling, zero-padding, resizing and the pad-then-crop augmentation.

EchoNet-Dynamic's protocol: a clip is `length` frames taken every `period` frames from a start
frame; a video shorter than ``length * period`` frames is zero-padded at the end first; during
training the start is random and the clip is zero-padded by `pad` pixels on each side and
randomly cropped back; at test time every start is used and the predictions are averaged.
Videos are (T, H, W, C) uint8 arrays.
"""

from __future__ import annotations

import cv2
import numpy as np


def span(length: int, period: int) -> int:
    """Frames covered by one clip: from the first to the last sampled frame, inclusive."""
    return (length - 1) * period + 1


def pad_video(video: np.ndarray, length: int, period: int) -> np.ndarray:
    """Zero-pads `video` at the end to at least ``length * period`` frames (EchoNet's rule)."""
    needed = length * period
    if video.shape[0] >= needed:
        return video
    padding = np.zeros((needed - video.shape[0],) + video.shape[1:], video.dtype)
    return np.concatenate([video, padding], axis=0)


def num_starts(num_frames: int, length: int, period: int) -> int:
    """How many clip starts a video of `num_frames` frames has (after `pad_video`)."""
    return max(num_frames, length * period) - span(length, period) + 1


def take_clip(video: np.ndarray, start: int, length: int, period: int) -> np.ndarray:
    """The clip of `length` frames every `period` frames from `start` (video padded first).

    A strided view of the video when no padding is needed (no copy)."""
    video = pad_video(video, length, period)
    return video[start : start + span(length, period) : period]


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """Resizes each (H, W, C) frame to (size, size) with area interpolation; a no-op at size."""
    if frames.shape[1] == size and frames.shape[2] == size:
        return frames
    out = np.empty((frames.shape[0], size, size, frames.shape[3]), frames.dtype)
    for i, frame in enumerate(frames):
        resized = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
        out[i] = resized.reshape(size, size, frames.shape[3])
    return out


def random_pad_crop(
    frames: np.ndarray, pad: int, rng: np.random.Generator, masks: np.ndarray | None = None
):
    """Zero-pads (T, H, W, C) `frames` by `pad` pixels per side and crops (H, W) back at a
    random offset: a random shift of up to `pad` pixels. `masks`, when given, is shifted alike.

    Returns:
      The shifted frames, or (frames, masks) when masks are given.
    """
    if pad <= 0:
        return frames if masks is None else (frames, masks)
    i, j = (int(v) - pad for v in rng.integers(0, 2 * pad + 1, size=2))

    def shift(array):
        # out[y, x] = array[y + i, x + j] where that is inside, else 0: one copy, no padding.
        height, width = array.shape[1:3]
        out = np.zeros_like(array)
        out[:, max(0, -i) : height - max(0, i), max(0, -j) : width - max(0, j)] = array[
            :, max(0, i) : height + min(0, i), max(0, j) : width + min(0, j)
        ]
        return out

    return shift(frames) if masks is None else (shift(frames), shift(masks))
