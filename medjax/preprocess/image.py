"""OpenCV image reading shared by the dataset builders and by inference on a user's file.

Every reader fails with one `ImageReadError` (a `ValueError`) whose message names the file and
says what is wrong with it: missing, empty, not decodable, or a header claiming an absurd size.
Files are read as bytes and decoded with `cv2.imdecode`, so paths with non-ASCII characters work
on every platform.

`MAX_PIXELS` bounds what any reader of `medjax.preprocess` decodes from one file (images, DICOM,
NIfTI, videos): a header that declares more is refused before anything is allocated, so a small
damaged or hostile file cannot exhaust memory.
"""

import os
import struct

import cv2
import numpy as np

MASK_THRESHOLD = 127
# Pixels (or voxels, or frames x pixels) one file may decode to: 1024^3, e.g. a 512x512 CT of
# 4096 slices or 100 minutes of 480x640 video at 1 frame per second. OpenCV's own image limit.
MAX_PIXELS = 2**30

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_STANDALONE_MARKERS = {0x01, *range(0xD0, 0xDA)}


class ImageReadError(ValueError):
    """An image file is missing, empty or cannot be decoded."""


def declared_image_size(data: bytes) -> tuple[int, int] | None:
    """The (height, width) a PNG or JPEG file's header declares, read without decoding pixels.

    Args:
      data: the file's bytes (the PNG IHDR chunk or the JPEG segments up to the frame header).

    Returns:
      (height, width), or None when the data is neither a PNG nor a JPEG with a readable header.
    """
    try:
        if data.startswith(_PNG_SIGNATURE):
            if len(data) < 24 or data[12:16] != b"IHDR":
                return None
            width, height = struct.unpack(">II", data[16:24])
            return height, width
        if data.startswith(b"\xff\xd8"):
            return _jpeg_size(data)
    except struct.error:
        return None
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # Fill byte before a marker.
            pos += 1
            continue
        if marker in _JPEG_STANDALONE_MARKERS:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _JPEG_SOF_MARKERS:
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return height, width
        if marker == 0xDA:  # Start of scan: no frame header came before it.
            return None
        pos += 2 + length
    return None


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

    Args:
      path: the image file; its format is told from its content, not its name.

    Returns:
      (H, W) uint8 array.

    Raises:
      ImageReadError: the file is missing, empty, not a decodable image, or its header declares
        more than `MAX_PIXELS` pixels.
    """
    data = _read_bytes(path)
    size = declared_image_size(data)
    if size is not None and size[0] * size[1] > MAX_PIXELS:
        raise ImageReadError(
            f"Image file {os.fspath(path)!r} declares {size[0]}x{size[1]} pixels (height x "
            f"width), more than the {MAX_PIXELS:,} accepted: its header is damaged or it is not "
            "a single scan. Re-export it."
        )
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    except cv2.error as e:  # OpenCV asserts on some malformed headers instead of failing.
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ImageReadError(
            f"Image file {os.fspath(path)!r} could not be decoded ({reason}); re-export it as PNG."
        ) from None
    if image is None or image.size == 0:
        raise ImageReadError(
            f"Image file {os.fspath(path)!r} could not be decoded (corrupt or not an image); "
            "re-export it as PNG."
        )
    return image


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Reads a segmentation mask as a (H, W) uint8 array of 0/1 (pixels > 127 are foreground).

    Args:
      path: the mask image file.

    Returns:
      (H, W) uint8 array of 0 and 1.

    Raises:
      ImageReadError: the file is missing, empty or not a decodable image.
    """
    return (read_grayscale(path) > MASK_THRESHOLD).astype(np.uint8)
