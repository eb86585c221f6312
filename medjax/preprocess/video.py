"""OpenCV video reading and writing, shared by dataset builders and inference on a user's file.

`read_video_gray` decodes a whole video file (AVI, MP4, ... whatever the OpenCV build's FFmpeg
backend reads) into a (T, H, W) uint8 grayscale array; `write_video_gray` writes such an array
as a Motion-JPEG AVI with three identical colour channels, the way echocardiography exports
(EchoNet-Dynamic among them) store grayscale cine loops.

Every reading problem raises one `VideoReadError` (a `ValueError`) whose message names the file
and says what to do: missing, empty, not decodable, no frames, fewer frames than expected (a
truncated download or copy), or more pixels than `medjax.preprocess.image.MAX_PIXELS` in all
(decoding stops there, so memory stays bounded whatever the file).
"""

import math
import os

import cv2
import numpy as np

from medjax.preprocess.image import MAX_PIXELS

MJPG_QUALITY = 90  # JPEG quality (0-100) of the frames written by write_video_gray.


class VideoReadError(ValueError):
    """A video file is missing, empty, cannot be decoded, or is shorter than expected."""


def read_video_gray(
    path: str | os.PathLike, expected_frames: int | None = None
) -> tuple[np.ndarray, float]:
    """Decodes every frame of a video file as grayscale.

    Colour frames are converted with OpenCV's BGR-to-gray weights; for the usual grayscale
    ultrasound stored as three identical channels that returns the channel values unchanged.

    Args:
      path: the video file.
      expected_frames: when given, the number of frames the file should hold (e.g. from a file
        list); decoding fewer raises, so a truncated file never passes as a short video.
        Decoding more is not an error: all decoded frames are returned.

    Returns:
      (frames (T, H, W) uint8, frames per second as stored in the container; NaN when the
      container states none).

    Raises:
      VideoReadError: naming the file, when it is missing, empty, cannot be opened or
        decoded, has no frames, has fewer than `expected_frames` frames, or decodes to more
        than `MAX_PIXELS` pixels.
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise VideoReadError(f"Video file {name!r} does not exist (or is not a file).")
    if os.path.getsize(name) == 0:
        raise VideoReadError(f"Video file {name!r} is empty (0 bytes); copy or export it again.")
    capture = cv2.VideoCapture(name)
    try:
        if not capture.isOpened():
            raise VideoReadError(
                f"Video file {name!r} could not be opened by OpenCV (corrupt, or a codec this "
                "OpenCV build cannot decode); re-export it, e.g. as an MJPG AVI."
            )
        fps = float(capture.get(cv2.CAP_PROP_FPS))
        frames = []
        pixels = 0
        while True:
            ok, frame = capture.read()
            if not ok or frame is None:
                break
            if frame.ndim == 3:
                frame = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
            frames.append(frame)
            pixels += frame.size
            if pixels > MAX_PIXELS:
                raise VideoReadError(
                    f"Video file {name!r} decodes to more than {MAX_PIXELS:,} pixels (over "
                    f"{len(frames)} frames of {frame.shape[0]}x{frame.shape[1]}), more than one "
                    "video may hold here; cut it into shorter clips."
                )
    finally:
        capture.release()
    if not frames:
        raise VideoReadError(
            f"Video file {name!r} has no decodable frames (corrupt or truncated); "
            "copy or export it again."
        )
    if expected_frames is not None and len(frames) < expected_frames:
        raise VideoReadError(
            f"Video file {name!r} decodes to {len(frames)} frames but {expected_frames} were "
            "expected: it is truncated or corrupt. Copy or download it again (or correct the "
            "expected frame count if that is what is wrong)."
        )
    shapes = {frame.shape for frame in frames}
    if len(shapes) != 1:
        raise VideoReadError(
            f"Video file {name!r} has frames of different sizes {sorted(shapes)}; "
            "re-export it with a fixed frame size."
        )
    if not math.isfinite(fps) or fps <= 0:
        fps = math.nan
    return np.stack(frames).astype(np.uint8, copy=False), fps


def write_video_gray(path: str | os.PathLike, frames: np.ndarray, fps: float) -> None:
    """Writes (T, H, W) uint8 frames as a Motion-JPEG AVI with three identical channels.

    Uses OpenCV's built-in MJPG writer (present in every OpenCV build, deterministic for one
    OpenCV version) at quality `MJPG_QUALITY`; JPEG is lossy, so reading the file back gives
    values within a few grey levels of `frames`.

    Raises:
      ValueError: `frames` is not a non-empty (T, H, W) uint8 array or `fps` is not positive.
      OSError: naming the file, when it cannot be written.
    """
    name = os.fspath(path)
    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.dtype != np.uint8 or frames.shape[0] == 0:
        raise ValueError(
            f"frames for {name!r} must be a non-empty (T, H, W) uint8 array, "
            f"got shape {frames.shape} and dtype {frames.dtype}."
        )
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps for {name!r} must be positive, got {fps!r}.")
    height, width = frames.shape[1:]
    writer = cv2.VideoWriter(
        name,
        cv2.CAP_OPENCV_MJPEG,
        cv2.VideoWriter_fourcc(*"MJPG"),
        float(fps),
        (width, height),
    )
    try:
        if not writer.isOpened():
            raise OSError(f"Could not open {name!r} for writing an MJPG AVI video.")
        writer.set(cv2.VIDEOWRITER_PROP_QUALITY, MJPG_QUALITY)
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    finally:
        writer.release()
    if not os.path.isfile(name) or os.path.getsize(name) == 0:
        raise OSError(f"Writing the video {name!r} failed: the file is missing or empty.")
