"""OpenCV image reading shared by the dataset builders and by inference on a user's file.

Every reader fails with one `ImageReadError` (a `ValueError`) whose message names the file and
says what is wrong with it: missing, empty, or not decodable. Files are read as bytes and
decoded with `cv2.imdecode`, so paths with non-ASCII characters work on every platform.
"""

import os

import cv2
import numpy as np

MASK_THRESHOLD = 127


class ImageReadError(ValueError):
    """An image file is missing, empty or cannot be decoded."""


def _read_bytes(path: str | os.PathLike) -> bytes:
    if not os.path.isfile(path):
        raise ImageReadError(f"Image file {os.fspath(path)!r} does not exist (or is not a file).")
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ImageReadError(f"Image file {os.fspath(path)!r} is empty (0 bytes); re-export it.")
    return data


def read_grayscale(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file (PNG, JPEG, BMP, ...) as a (H, W) uint8 grayscale array.

    Colour images are converted to gray, 16-bit images are scaled to 8 bits.

    Raises:
      ImageReadError: the file is missing, empty or not a decodable image.
    """
    data = _read_bytes(path)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None or image.size == 0:
        raise ImageReadError(
            f"Image file {os.fspath(path)!r} could not be decoded (corrupt or not an image); "
            "re-export it as PNG."
        )
    return image


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Reads a segmentation mask as a (H, W) uint8 array of 0/1 (pixels > 127 are foreground).

    Raises:
      ImageReadError: the file is missing, empty or not a decodable image.
    """
    return (read_grayscale(path) > MASK_THRESHOLD).astype(np.uint8)
