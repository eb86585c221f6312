"""Reading a 2-D image and its pixel spacing from a DICOM file (pydicom).

Ultrasound DICOMs keep the spacing either in PixelSpacing (mm, row then column) or in
SequenceOfUltrasoundRegions (PhysicalDeltaX/Y, usually in cm); both are read. Colour images
(RGB, YBR) become grayscale; multi-frame files give their first frame, with a warning.

`pixel_header` checks the image attributes every DICOM reader here relies on (Rows, Columns,
NumberOfFrames, SamplesPerPixel, BitsAllocated, the transfer syntax and, for uncompressed data,
the length of the pixel data) before any pixel is decoded, so a damaged or hostile header
claiming a huge image is refused by name instead of being allocated, and a cut-off file is
reported as such.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from medjax.preprocess.image import MAX_PIXELS

ULTRASOUND_CM_UNITS = 3  # PhysicalUnitsXDirection code for centimetres.
_BITS_ALLOCATED = (1, 8, 16, 24, 32, 40, 48, 56, 64)  # 1 or a whole number of bytes, as pydicom.


class DicomReadError(ValueError):
    """A file that is not a usable DICOM image; the message names it."""


@dataclasses.dataclass(frozen=True)
class PixelHeader:
    """The image attributes of a DICOM file, checked.

    Attributes:
      rows, columns: the image size.
      frames: NumberOfFrames (1 when absent).
      samples: SamplesPerPixel (1 for gray, 3 for colour).
      bits_allocated: BitsAllocated.
    """

    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int


def _tag_int(ds, keyword: str, default: int | None, path: str, error: type[Exception]) -> int:
    value = ds.get(keyword, None)
    if value is None or (isinstance(value, str) and not value.strip()):
        if default is None:
            raise error(f"{path}: DICOM image without {keyword}; the file is damaged.")
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number) or number != int(number):
        raise error(f"{path}: {keyword} {value!r} is not a whole number; the file is damaged.")
    return int(number)


def pixel_header(ds, path: str, error: type[Exception] = DicomReadError) -> PixelHeader:
    """Checks a dataset's image attributes before its pixels are decoded.

    Args:
      ds: a pydicom dataset with pixel data.
      path: the file, named in errors.
      error: the exception type to raise (a `DicomReadError` subclass).

    Returns:
      The checked `PixelHeader`.

    Raises:
      error: naming the file, when Rows or Columns is missing or below 1, NumberOfFrames or
        SamplesPerPixel is below 1, BitsAllocated is not 1 or a whole number of bytes up to 64,
        the image declares more than `MAX_PIXELS` values in all, the transfer syntax is
        unknown, or uncompressed pixel data are shorter than the header says (a cut-off file).
    """
    try:
        header = PixelHeader(
            rows=_tag_int(ds, "Rows", None, path, error),
            columns=_tag_int(ds, "Columns", None, path, error),
            frames=_tag_int(ds, "NumberOfFrames", 1, path, error),
            samples=_tag_int(ds, "SamplesPerPixel", 1, path, error),
            bits_allocated=_tag_int(ds, "BitsAllocated", 16, path, error),
        )
    except error:
        raise
    except Exception as e:  # pydicom raises many types when a damaged element is converted.
        raise error(
            f"{path}: the image attributes cannot be read ({type(e).__name__}: {e}); the file "
            "is damaged, export it again."
        ) from None
    for keyword, value in (
        ("Rows", header.rows),
        ("Columns", header.columns),
        ("NumberOfFrames", header.frames),
        ("SamplesPerPixel", header.samples),
    ):
        if value < 1:
            raise error(
                f"{path}: {keyword} is {value}; it must be at least 1. The file is damaged."
            )
    if header.bits_allocated not in _BITS_ALLOCATED:
        raise error(
            f"{path}: BitsAllocated is {header.bits_allocated}; it must be 1, 8, 16, 32 or "
            "another whole number of bytes. The file is damaged."
        )
    values = header.rows * header.columns * header.frames * header.samples
    if values > MAX_PIXELS:
        raise error(
            f"{path}: the header declares {header.frames} frame(s) of {header.rows}x"
            f"{header.columns} pixels x {header.samples} sample(s) = {values:,} values, more "
            f"than the {MAX_PIXELS:,} read from one file: the header is damaged, or export a "
            "smaller image or fewer frames."
        )
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        compressed = syntax is not None and syntax.is_compressed
    except ValueError:  # pydicom: the UID is not a transfer syntax it knows.
        raise error(
            f"{path}: unknown transfer syntax {str(syntax)!r}; the file is damaged, or export "
            "it again with a standard transfer syntax."
        ) from None
    if not compressed:
        expected = (values * header.bits_allocated + 7) // 8
        stored = len(ds.PixelData or b"")
        if stored < expected:
            raise error(
                f"{path}: truncated pixel data ({stored} of {expected} bytes for "
                f"{header.frames} frame(s) of {header.rows}x{header.columns} at "
                f"{header.bits_allocated} bits); the file was cut off, copy or export it again."
            )
    return header


def read_dicom_image(path: str) -> tuple[np.ndarray, float | None, list[str]]:
    """Reads a DICOM image as grayscale uint8.

    Args:
      path: the DICOM file.

    Returns:
      (image (H, W) uint8, pixel spacing in mm or None, warnings)

    Raises:
      DicomReadError: naming the file, when it is empty, not DICOM, has a damaged or oversized
        image header (see `pixel_header`), or has no usable pixels.
    """
    import pydicom  # Imported here: only DICOM inputs need it.

    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise DicomReadError(f"{path}: missing or empty file.")
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:  # pydicom raises many types for bad files.
        raise DicomReadError(f"{path}: not a readable DICOM file ({type(e).__name__}: {e}).")
    if "PixelData" not in ds:
        raise DicomReadError(f"{path}: DICOM file without pixel data (not an image).")
    pixel_header(ds, path)
    try:
        pixels = ds.pixel_array
    except Exception as e:  # pydicom raises many types for bad files.
        raise DicomReadError(f"{path}: not a readable DICOM image ({type(e).__name__}: {e}).")
    warnings = []
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        warnings.append(f"{path}: {frames} frames; the first is measured.")
        pixels = pixels[0]
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if pixels.ndim == 3:
        # pydicom's pixel_array already returns YBR colour data as RGB.
        pixels = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    if pixels.ndim != 2:
        raise DicomReadError(
            f"{path}: decoded pixels have shape {pixels.shape}, not one 2-D image; the file is "
            "damaged."
        )
    pixels = pixels.astype(np.float32)
    if not np.all(np.isfinite(pixels)):
        raise DicomReadError(f"{path}: pixel values are NaN or infinite; the file is damaged.")
    if photometric == "MONOCHROME1":
        pixels = pixels.max() - pixels
    low, high = float(pixels.min()), float(pixels.max())
    if high > 255 or low < 0:
        pixels = (pixels - low) / max(high - low, 1e-6) * 255.0
    image = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return image, _spacing_mm(ds, warnings), warnings


def _spacing_mm(ds, warnings: list[str]) -> float | None:
    try:
        spacing = getattr(ds, "PixelSpacing", None)
        if spacing is not None and len(spacing) == 2:
            row, col = float(spacing[0]), float(spacing[1])
            if row > 0 and col > 0 and np.isfinite(row) and np.isfinite(col):
                if abs(row - col) > 1e-3 * max(row, col):
                    warnings.append(f"Anisotropic PixelSpacing {row}x{col} mm; their mean is used.")
                return (row + col) / 2
            warnings.append(f"PixelSpacing {row}x{col} mm is not positive; it was ignored.")
        for region in getattr(ds, "SequenceOfUltrasoundRegions", []) or []:
            units = getattr(region, "PhysicalUnitsXDirection", None)
            delta_x = getattr(region, "PhysicalDeltaX", None)
            if units == ULTRASOUND_CM_UNITS and delta_x is not None:
                delta_mm = float(delta_x) * 10.0
                if np.isfinite(delta_mm) and delta_mm > 0:
                    return delta_mm
    except (TypeError, ValueError) as e:
        warnings.append(f"The pixel spacing cannot be read ({e}); it was ignored.")
    return None
