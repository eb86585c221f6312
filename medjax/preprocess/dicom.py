"""Reading a 2-D image and its pixel spacing from a DICOM file (pydicom).

Ultrasound DICOMs keep the spacing either in PixelSpacing (mm, row then column) or in
SequenceOfUltrasoundRegions (PhysicalDeltaX/Y, usually in cm); both are read. Colour images
(RGB, YBR) become grayscale; multi-frame files give their first frame, with a warning.
"""

from __future__ import annotations

import os

import numpy as np

ULTRASOUND_CM_UNITS = 3  # PhysicalUnitsXDirection code for centimetres.


class DicomReadError(ValueError):
    """A file that is not a usable DICOM image; the message names it."""


def read_dicom_image(path: str) -> tuple[np.ndarray, float | None, list[str]]:
    """Reads a DICOM image as grayscale uint8.

    Returns:
      (image (H, W) uint8, pixel spacing in mm or None, warnings)

    Raises:
      DicomReadError: naming the file, when it is empty, not DICOM, or has no usable pixels.
    """
    import pydicom  # Imported here: only DICOM inputs need it.

    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise DicomReadError(f"{path}: missing or empty file.")
    try:
        ds = pydicom.dcmread(path)
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
    pixels = pixels.astype(np.float32)
    if photometric == "MONOCHROME1":
        pixels = pixels.max() - pixels
    low, high = float(pixels.min()), float(pixels.max())
    if high > 255 or low < 0:
        pixels = (pixels - low) / max(high - low, 1e-6) * 255.0
    image = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return image, _spacing_mm(ds, warnings), warnings


def _spacing_mm(ds, warnings: list[str]) -> float | None:
    spacing = getattr(ds, "PixelSpacing", None)
    if spacing is not None and len(spacing) == 2:
        row, col = float(spacing[0]), float(spacing[1])
        if abs(row - col) > 1e-3 * max(row, col):
            warnings.append(f"Anisotropic PixelSpacing {row}x{col} mm; their mean is used.")
        return (row + col) / 2
    for region in getattr(ds, "SequenceOfUltrasoundRegions", []) or []:
        units = getattr(region, "PhysicalUnitsXDirection", None)
        delta_x = getattr(region, "PhysicalDeltaX", None)
        if units == ULTRASOUND_CM_UNITS and delta_x:
            return float(delta_x) * 10.0
    return None
