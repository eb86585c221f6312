"""CT readers and writers in Hounsfield units (HU), and HU windowing for display and model input.

Readers return a `CtImage` whose `hu` array is float32 HU in display orientation (row 0 is the
top of the displayed image, column 0 its left):

* `read_dicom_slice`: one DICOM file. Stored values become HU through RescaleSlope and
  RescaleIntercept. Compressed transfer syntaxes are decoded by pydicom (RLE Lossless) and by
  pylibjpeg with its libjpeg and openjpeg plugins (JPEG baseline, extended, lossless, JPEG-LS,
  JPEG 2000). A multi-frame file gives a volume (H, W, S), ordered like a series (below).
* `read_dicom_series`: the DICOM files of one series in a folder, stacked into (H, W, S).
* `read_nifti_volume`: a NIfTI-1/-2 file (.nii or .nii.gz) in the layout of the PhysioNet CT-ICH
  dataset; `write_nifti_volume` is its exact inverse.
* `read_ct_file`: any of the above single files, or a PNG/JPEG screenshot, recognised by content.

`write_dicom_series` writes CT Image Storage files (used by the synthetic dataset generator and
by tests). Windowing: `WINDOWS`, `parse_window`, `apply_window`, `window_uint8`,
`window_channels`.

Two corrections are applied to DICOM files, each with a warning in `CtImage.warnings`:

* Bad intercept. Some scanners (seen in the RSNA 2019 intracranial hemorrhage data) write
  BitsStored 12, PixelRepresentation 0 (unsigned) and a RescaleIntercept > -100, although their
  values are really HU stored in 12 bits with negative HU wrapped around 4096. The correction used
  by the Kaggle RSNA pipelines (J. Howard, "cleaning the data for rapid prototyping") is applied:
  ``HU = slope * ((stored + 1000) mod 4096) - 1000``. With slope 1 this keeps stored values
  0..3095 as 0..3095 HU and maps 3096..4095 to -1000..-1 HU; the file's own intercept is ignored.
  It differs from reading the 12 bits as two's complement only for stored 2048..3095, which stay
  +2048..+3095 HU (dense bone, metal) instead of becoming -2048..-1001 HU (below air); this
  keeps HU identical to those of models trained with the RSNA pipelines.
* Missing RescaleSlope / RescaleIntercept in a CT: 1 and 0 are used.

MONOCHROME1 CTs are not inverted: the DICOM standard applies the photometric interpretation after
the rescale to HU, so HU values do not depend on it, and windowing HU gives the usual CT display
(bone bright). A warning says so.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import math
import os
import struct
import zlib
from collections.abc import Sequence

import numpy as np

from medjax.preprocess.dicom import DicomReadError, pixel_header
from medjax.preprocess.image import MAX_PIXELS

WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (80.0, 200.0),
    "soft_tissue": (40.0, 380.0),
    "bone": (600.0, 2800.0),
}

# (level, width) assumed for an 8-bit PNG/JPEG given instead of a DICOM or NIfTI file.
SCREENSHOT_WINDOW = WINDOWS["brain"]

# The bad-intercept pattern and its correction (see the module docstring).
_BAD_INTERCEPT_BITS = 12
_BAD_INTERCEPT_ABOVE = -100.0
_BAD_INTERCEPT_SHIFT = 1000
_TWELVE_BIT_MODULUS = 4096

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
_GZIP_SIGNATURE = b"\x1f\x8b"
_NIFTI1_MAGICS = (b"n+1\x00", b"ni1\x00")
_NIFTI2_MAGICS = (b"n+2\x00", b"ni2\x00")
_NIFTI1_MAGIC_OFFSET = 344
_NIFTI2_MAGIC_OFFSET = 4
# The longest NIfTI header (NIfTI-2); a NIfTI-1 header is 348 bytes.
NIFTI_HEADER_BYTES = 540
_DICOM_MAGIC_OFFSET = 128

ACCEPTED_FORMATS = (
    "DICOM (with the 128-byte preamble and 'DICM'), NIfTI-1/-2 (.nii, .nii.gz), PNG or JPEG"
)

_COMPRESSIONS = {
    "rle": "1.2.840.10008.1.2.5",  # RLE Lossless
    "jpeg2000": "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
    "jpeg-ls": "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
}

# openjpeg always uses 6 wavelet resolutions, so both sides need at least 2**5 pixels.
_JPEG2000_MIN_SIDE = 32

# No real CT value comes near this many HU; beyond it a rescale is broken (and float32 overflows).
_MAX_HU = 1e9
# Relative spread of slice gaps above which a series is reported as unevenly spaced.
_SPACING_TOLERANCE = 0.01
# Positions closer than this (mm) along the slice normal are the same position.
_SAME_POSITION_MM = 1e-3


class CtReadError(DicomReadError):
    """A CT file or folder that cannot be read; the message names it and says what to do."""


@dataclasses.dataclass
class CtImage:
    """A CT slice or volume in Hounsfield units.

    Attributes:
      hu: float32 HU, (H, W) for a slice or (H, W, S) for a volume, display orientation
        (row 0 = top of the displayed image).
      pixel_spacing_mm: (row, column) spacing in mm, None when the file does not say.
      slice_spacing_mm: distance between slice centres in mm, None when unknown.
      window_centers: window levels stored in the file (DICOM WindowCenter), empty if none.
      window_widths: the matching window widths.
      warnings: what was corrected or assumed while reading, one sentence each.
    """

    hu: np.ndarray
    pixel_spacing_mm: tuple[float, float] | None
    slice_spacing_mm: float | None
    window_centers: tuple[float, ...]
    window_widths: tuple[float, ...]
    warnings: list[str]


# ---------------------------------------------------------------------------------------------
# Windowing
# ---------------------------------------------------------------------------------------------


def parse_window(spec) -> tuple[float, float]:
    """Turns a window name, a "level/width" string or a (level, width) pair into two floats.

    Args:
      spec: a name of `WINDOWS` ("brain", "subdural", "soft_tissue", "bone"), a string
        "LEVEL/WIDTH" such as "40/80" or "-600/1500", or a (level, width) pair of numbers.

    Returns:
      (level, width) in HU.

    Raises:
      ValueError: naming `spec` and the accepted forms, when it is none of these, or its width
        is not > 0, or a number is not finite.
    """
    choices = f"a name ({', '.join(WINDOWS)}), 'LEVEL/WIDTH' such as '40/80', or (level, width)"
    if isinstance(spec, str):
        text = spec.strip()
        if text.lower() in WINDOWS:
            return WINDOWS[text.lower()]
        parts = text.split("/")
        if len(parts) != 2:
            raise ValueError(f"Unknown CT window {spec!r}; use {choices}.")
        try:
            level, width = float(parts[0]), float(parts[1])
        except ValueError:
            raise ValueError(f"CT window {spec!r} is not two numbers; use {choices}.") from None
    else:
        try:
            level, width = (float(v) for v in spec)
        except (TypeError, ValueError):
            raise ValueError(f"CT window {spec!r} is not valid; use {choices}.") from None
    if not (math.isfinite(level) and math.isfinite(width)):
        raise ValueError(f"CT window {spec!r} has a non-finite level or width; use {choices}.")
    if width <= 0:
        raise ValueError(f"CT window {spec!r} has width {width:g}; the width must be > 0.")
    return level, width


def apply_window(hu, level: float, width: float) -> np.ndarray:
    """Maps HU to [0, 1] through a window: clip((hu - (level - width / 2)) / width, 0, 1).

    Args:
      hu: array of HU values, any shape.
      level: window centre in HU.
      width: window width in HU, > 0.

    Returns:
      float32 array of the shape of `hu`; level - width/2 maps to 0, level + width/2 to 1.
    """
    if not width > 0:
        raise ValueError(f"Window width {width!r} must be > 0.")
    low = level - width / 2.0
    scaled = (np.asarray(hu, dtype=np.float64) - low) / width
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def window_uint8(hu, window) -> np.ndarray:
    """Windows HU for display as 8-bit gray.

    Args:
      hu: array of HU values, any shape.
      window: anything `parse_window` accepts.

    Returns:
      uint8 array, rint(apply_window(hu, level, width) * 255).
    """
    level, width = parse_window(window)
    return np.rint(apply_window(hu, level, width) * 255.0).astype(np.uint8)


def window_channels(hu, windows: Sequence = ("brain", "subdural", "bone")) -> np.ndarray:
    """Stacks several windows of the same HU array as channels (the usual 3-window CT input).

    Args:
      hu: array of HU values, shape (...).
      windows: window specs (see `parse_window`), one per output channel, in order.

    Returns:
      float32 array (..., len(windows)) with values in [0, 1].
    """
    if isinstance(windows, str) or len(windows) == 0:
        raise ValueError(f"windows={windows!r}: give a non-empty list of windows, e.g. ['brain'].")
    return np.stack([apply_window(hu, *parse_window(w)) for w in windows], axis=-1)


# ---------------------------------------------------------------------------------------------
# DICOM reading
# ---------------------------------------------------------------------------------------------


def _floats(value) -> tuple[float, ...]:
    """A DICOM number or multi-valued number (MultiValue, list, string "a\\b") as floats."""
    if value is None:
        return ()
    if isinstance(value, (str, bytes)):
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        items = [v for v in text.split("\\") if v.strip()]
    elif isinstance(value, Sequence) or hasattr(value, "__iter__"):
        items = list(value)
    else:
        items = [value]
    return tuple(float(v) for v in items)


def _optional_float(ds, keyword: str, warnings: list[str]) -> float | None:
    value = getattr(ds, keyword, None)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        warnings.append(f"{keyword} {value!r} is not a number and was ignored.")
        return None


def _rescale(ds, frame: int | None, warnings: list[str]) -> tuple[float, float, bool]:
    """(slope, intercept, found) from the top level or the enhanced-CT functional groups."""
    slope = _optional_float(ds, "RescaleSlope", warnings)
    intercept = _optional_float(ds, "RescaleIntercept", warnings)
    if slope is None and intercept is None:
        groups = []
        if frame is not None and "PerFrameFunctionalGroupsSequence" in ds:
            groups.append(ds.PerFrameFunctionalGroupsSequence[frame])
        if "SharedFunctionalGroupsSequence" in ds:
            groups.append(ds.SharedFunctionalGroupsSequence[0])
        for group in groups:
            transform = getattr(group, "PixelValueTransformationSequence", None)
            if transform:
                slope = _optional_float(transform[0], "RescaleSlope", warnings)
                intercept = _optional_float(transform[0], "RescaleIntercept", warnings)
                break
    found = slope is not None or intercept is not None
    return (1.0 if slope is None else slope), (0.0 if intercept is None else intercept), found


def _to_hu(ds, stored: np.ndarray, frame: int | None, warnings: list[str]) -> np.ndarray:
    slope, intercept, found = _rescale(ds, frame, warnings)
    modality = str(getattr(ds, "Modality", "") or "")
    if not found and modality == "CT" and not any("RescaleSlope" in w for w in warnings):
        warnings.append(
            "CT without RescaleSlope/RescaleIntercept; slope 1 and intercept 0 were used, so "
            "the values are HU only if the scanner stored HU directly."
        )
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        raise ValueError(
            f"RescaleSlope {slope:g} / RescaleIntercept {intercept:g} are not finite numbers; "
            "the file is damaged."
        )
    if slope == 0:
        raise ValueError("RescaleSlope is 0; every pixel would have the same HU.")
    bits_stored = int(getattr(ds, "BitsStored", 16) or 16)
    representation = int(getattr(ds, "PixelRepresentation", 0) or 0)
    if (
        bits_stored == _BAD_INTERCEPT_BITS
        and representation == 0
        and found
        and intercept > _BAD_INTERCEPT_ABOVE
    ):
        if not any("bad-intercept" in w for w in warnings):
            warnings.append(
                f"BitsStored 12, unsigned pixels and RescaleIntercept {intercept:g} > -100: the "
                "known bad-intercept pattern; corrected with HU = slope * ((stored + 1000) mod "
                "4096) - 1000 (the file's intercept is ignored)."
            )
        wrapped = np.mod(stored.astype(np.int64) + _BAD_INTERCEPT_SHIFT, _TWELVE_BIT_MODULUS)
        hu = wrapped * slope - _BAD_INTERCEPT_SHIFT
    else:
        hu = stored.astype(np.float64) * slope + intercept
    if hu.size and np.abs(hu).max() > _MAX_HU:
        raise ValueError(
            f"RescaleSlope {slope:g} and RescaleIntercept {intercept:g} give values up to "
            f"{np.abs(hu).max():.3g} HU, beyond +-{_MAX_HU:g}; the file is damaged."
        )
    return hu.astype(np.float32)


def _pixel_spacing(ds, warnings: list[str]) -> tuple[float, float] | None:
    value = getattr(ds, "PixelSpacing", None)
    if value is None and "SharedFunctionalGroupsSequence" in ds:
        measures = getattr(ds.SharedFunctionalGroupsSequence[0], "PixelMeasuresSequence", None)
        if measures:
            value = getattr(measures[0], "PixelSpacing", None)
    if value is None:
        return None
    try:
        spacing = _floats(value)
    except (TypeError, ValueError):
        spacing = ()
    if len(spacing) != 2 or not all(s > 0 for s in spacing):
        warnings.append(f"PixelSpacing {value!r} is not two positive numbers and was ignored.")
        return None
    return spacing[0], spacing[1]


def _windows(ds, warnings: list[str]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    try:
        centers = _floats(getattr(ds, "WindowCenter", None))
        widths = _floats(getattr(ds, "WindowWidth", None))
    except (TypeError, ValueError):
        warnings.append("WindowCenter/WindowWidth are not numbers and were ignored.")
        return (), ()
    if len(centers) != len(widths):
        warnings.append(
            f"{len(centers)} WindowCenter values but {len(widths)} WindowWidth values; the "
            "first pairs were kept."
        )
        count = min(len(centers), len(widths))
        centers, widths = centers[:count], widths[:count]
    return centers, widths


def _file_slice_spacing(ds, warnings: list[str]) -> float | None:
    """Slice spacing a single file states: SpacingBetweenSlices, else SliceThickness."""
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = _optional_float(ds, keyword, warnings)
        if value is not None and value > 0:
            return value
    return None


def _load_dataset(path: str):
    """Reads a whole DICOM file; CtReadError naming it when it is missing, empty or not DICOM."""
    import pydicom  # Imported here: only DICOM inputs need it.

    if not os.path.isfile(path):
        raise CtReadError(f"{path}: no such file.")
    if os.path.getsize(path) == 0:
        raise CtReadError(f"{path}: empty file (0 bytes); copy or export it again.")
    try:
        return pydicom.dcmread(path)
    except Exception as e:  # pydicom raises many types for malformed files.
        raise CtReadError(
            f"{path}: not a readable DICOM file ({type(e).__name__}: {e}); "
            "export the slice again as DICOM."
        ) from e


def _decode_pixels(ds, path: str) -> np.ndarray:
    """Stored values, (H, W) or (frames, H, W); CtReadError for missing or truncated data."""
    if "PixelData" not in ds:
        raise CtReadError(
            f"{path}: DICOM file without pixel data (a report, a DICOMDIR, or a file cut off "
            "before its pixels); give the complete image file."
        )
    header = pixel_header(ds, path, CtReadError)
    if header.samples != 1:
        raise CtReadError(
            f"{path}: a colour DICOM (SamplesPerPixel {header.samples}), not a CT slice; give the "
            "original grayscale CT image."
        )
    rows, columns, frames = header.rows, header.columns, header.frames
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        pixels = ds.pixel_array
    except Exception as e:  # Decoder and length errors come in many types.
        name = getattr(syntax, "name", syntax)
        raise CtReadError(
            f"{path}: pixel data could not be decoded (transfer syntax {name}; "
            f"{type(e).__name__}: {e}). If the data are compressed, install pylibjpeg with "
            "pylibjpeg-libjpeg and pylibjpeg-openjpeg; otherwise the file is damaged."
        ) from e
    expected_shape = (frames, rows, columns) if frames > 1 else (rows, columns)
    if pixels.shape != expected_shape:
        raise CtReadError(
            f"{path}: decoded pixels have shape {pixels.shape}, expected {expected_shape}; "
            "the file is damaged."
        )
    return pixels


def _decode_dicom(path: str) -> tuple[object, CtImage]:
    """The dataset (without its pixel data) and the CtImage of one DICOM file."""
    path = os.fspath(path)
    ds = _load_dataset(path)
    pixels = _decode_pixels(ds, path)
    warnings: list[str] = []
    try:
        if pixels.ndim == 3:
            frames = [_to_hu(ds, pixels[k], k, warnings) for k in range(pixels.shape[0])]
            hu, slice_spacing = _stack_frames(ds, frames, warnings)
        else:
            hu = _to_hu(ds, pixels, None, warnings)
            slice_spacing = _file_slice_spacing(ds, warnings)
    except ValueError as e:
        raise CtReadError(f"{path}: {e}") from e
    modality = str(getattr(ds, "Modality", "") or "")
    if modality and modality != "CT":
        warnings.append(f"Modality is {modality}, not CT; the values are not Hounsfield units.")
    if str(getattr(ds, "PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        warnings.append(
            "MONOCHROME1: HU values are kept as rescaled (photometric inversion applies to "
            "display only); windows show bone bright as usual."
        )
    if "ModalityLUTSequence" in ds:
        warnings.append("ModalityLUTSequence is not applied; RescaleSlope/Intercept were used.")
    centers, widths = _windows(ds, warnings)
    image = CtImage(
        hu=hu,
        pixel_spacing_mm=_pixel_spacing(ds, warnings),
        slice_spacing_mm=slice_spacing,
        window_centers=centers,
        window_widths=widths,
        warnings=[f"{path}: {w}" for w in warnings],
    )
    del ds.PixelData
    return ds, image


def _stack_frames(ds, frames: list[np.ndarray], warnings: list[str]):
    """A multi-frame file as (H, W, S), frames ordered along the slice normal when possible."""
    positions = []
    for group in getattr(ds, "PerFrameFunctionalGroupsSequence", None) or []:
        plane = getattr(group, "PlanePositionSequence", None)
        positions.append(_floats(getattr(plane[0], "ImagePositionPatient", None)) if plane else ())
    orientation = _floats(getattr(ds, "ImageOrientationPatient", None))
    if not orientation and "SharedFunctionalGroupsSequence" in ds:
        plane = getattr(ds.SharedFunctionalGroupsSequence[0], "PlaneOrientationSequence", None)
        if plane:
            orientation = _floats(getattr(plane[0], "ImageOrientationPatient", None))
    names = [f"frame {k + 1}" for k in range(len(frames))]
    if len(positions) == len(frames) and _usable_geometry(positions, [orientation] * len(frames)):
        order, spacing = _order_by_position(positions, orientation, names)
        _check_even_spacing(positions, orientation, order, warnings)
    else:
        order, spacing = list(range(len(frames))), None
        warnings.append(f"{len(frames)} frames without per-frame positions; kept in file order.")
    if spacing is None:
        spacing = _file_slice_spacing(ds, warnings)
        if spacing is None and "SharedFunctionalGroupsSequence" in ds:
            measures = getattr(ds.SharedFunctionalGroupsSequence[0], "PixelMeasuresSequence", None)
            if measures:
                spacing = _file_slice_spacing(measures[0], warnings)
    return np.stack([frames[k] for k in order], axis=-1), spacing


def read_dicom_slice(path) -> CtImage:
    """Reads one DICOM CT file as HU.

    Args:
      path: the DICOM file (any extension).

    Returns:
      CtImage with hu (H, W) float32; for a multi-frame file (H, W, S), frames ordered along
      the slice normal by their positions (file order, with a warning, when they have none).
      slice_spacing_mm of a single slice is SpacingBetweenSlices, else SliceThickness, else None.

    Raises:
      CtReadError: naming the file, when it is missing, empty, not DICOM, has no or truncated
        pixel data, a damaged image header or one declaring more than `MAX_PIXELS` values
        (checked before decoding, see `medjax.preprocess.dicom.pixel_header`), colour pixels,
        pixels that cannot be decoded, or a rescale giving non-finite or absurd HU.
    """
    return _decode_dicom(os.fspath(path))[1]


def _usable_geometry(positions: list[tuple], orientations: list[tuple]) -> bool:
    return all(len(p) == 3 for p in positions) and all(len(o) == 6 for o in orientations)


def _normal(orientation: Sequence[float]) -> np.ndarray:
    row, column = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    return np.cross(row, column)


def _order_by_position(
    positions: list[tuple], orientation: tuple, names: list[str]
) -> tuple[list[int], float | None]:
    """Indices sorted by distance along the slice normal, and the median gap (None for 1)."""
    distances = np.asarray(positions, np.float64) @ _normal(orientation)
    order = sorted(range(len(positions)), key=lambda k: distances[k])
    gaps = np.diff(distances[order])
    for k, gap in enumerate(gaps):
        if gap < _SAME_POSITION_MM:
            raise ValueError(
                f"{names[order[k]]} and {names[order[k + 1]]} are at the same position along "
                "the slice normal (ImagePositionPatient); the folder holds two acquisitions or "
                "duplicate files. Keep one copy of each slice."
            )
    return order, (float(np.median(gaps)) if len(gaps) else None)


def _check_even_spacing(positions, orientation, order, warnings: list[str]) -> None:
    distances = np.asarray(positions, np.float64)[order] @ _normal(orientation)
    gaps = np.diff(distances)
    if len(gaps) > 1:
        median = float(np.median(gaps))
        if float(np.max(np.abs(gaps - median))) > _SPACING_TOLERANCE * median:
            warnings.append(
                f"slices are unevenly spaced ({gaps.min():.4g} to {gaps.max():.4g} mm); the "
                f"median, {median:.4g} mm, is used as the slice spacing."
            )


def _dicom_candidates(folder: str) -> tuple[list[str], list[str]]:
    """(paths with a DICOM preamble, other files) in a folder, sorted by name, not recursive."""
    dicoms, others = [], []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or name.upper() == "DICOMDIR" or not os.path.isfile(path):
            continue
        kind = _sniff(path)
        (dicoms if kind == "dicom" else others).append(path)
    return dicoms, others


def read_dicom_series(folder) -> CtImage:
    """Reads the DICOM files of one CT series in a folder as a volume in HU.

    Slices are sorted along the slice normal (the cross product of the ImageOrientationPatient
    row and column directions; for an axial head CT, feet to head) by their
    ImagePositionPatient, and the slice spacing is the median gap between positions. Without
    positions they are sorted by InstanceNumber, then by file name, with a warning, and the
    spacing is SpacingBetweenSlices or SliceThickness. Files without the DICOM preamble are
    skipped with a warning; sub-folders and hidden files are ignored.

    Args:
      folder: the folder holding the series' files (any extension).

    Returns:
      CtImage with hu (H, W, S) float32; pixel spacing and windows from the first slice.

    Raises:
      CtReadError: naming the folder, when it holds no DICOM file, files of several series
        (listing their SeriesInstanceUIDs), slices of different sizes or orientations, two
        slices at the same position, or a multi-frame file; naming the file when one cannot be
        read (see `read_dicom_slice`).
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CtReadError(f"{folder}: not a folder; give the folder holding one DICOM series.")
    paths, others = _dicom_candidates(folder)
    if not paths:
        raise CtReadError(
            f"{folder}: no DICOM file (with the 'DICM' preamble) in this folder; give the "
            "folder that holds the series' slices."
        )
    slices = [_decode_dicom(path) for path in paths]
    names = [os.path.basename(p) for p in paths]
    _check_one_series(folder, slices, names)
    for (_, image), name in zip(slices, names):
        if image.hu.ndim != 2:
            raise CtReadError(
                f"{folder}: {name} is a multi-frame file; read it alone with read_dicom_slice "
                "or move it out of the series folder."
            )
    shapes = {}
    for (_, image), name in zip(slices, names):
        shapes.setdefault(image.hu.shape, []).append(name)
    if len(shapes) > 1:
        listing = "; ".join(
            f"{h}x{w}: {len(n)} files, e.g. {n[0]}" for (h, w), n in sorted(shapes.items())
        )
        raise CtReadError(
            f"{folder}: slices of different sizes ({listing}); a series has one size, move "
            "the other files (scouts, reformats) out of the folder."
        )
    warnings = [f"{folder}: skipped {os.path.basename(p)} (not DICOM)." for p in others]
    order, spacing = _series_order(folder, slices, names, warnings)
    first_ds, first = slices[order[0]]
    spacings = {image.pixel_spacing_mm for _, image in slices}
    if len(spacings) > 1:
        warnings.append(
            f"{folder}: slices have different PixelSpacing {sorted(map(str, spacings))}; the "
            "first slice's is used."
        )
    warnings.extend(_merge_warnings([image.warnings for _, image in slices], paths))
    return CtImage(
        hu=np.stack([slices[k][1].hu for k in order], axis=-1),
        pixel_spacing_mm=first.pixel_spacing_mm,
        slice_spacing_mm=spacing,
        window_centers=first.window_centers,
        window_widths=first.window_widths,
        warnings=warnings,
    )


def _check_one_series(folder: str, slices, names: list[str]) -> None:
    series: dict[str, list[str]] = {}
    for (ds, _), name in zip(slices, names):
        series.setdefault(str(getattr(ds, "SeriesInstanceUID", "") or "(none)"), []).append(name)
    if len(series) > 1:
        listing = "; ".join(
            f"{uid}: {len(n)} files, e.g. {n[0]}" for uid, n in sorted(series.items())
        )
        raise CtReadError(
            f"{folder}: files of {len(series)} series (SeriesInstanceUID {listing}); put each "
            "series in its own folder."
        )


def _series_order(folder: str, slices, names: list[str], warnings: list[str]):
    datasets = [ds for ds, _ in slices]
    positions = [_floats(getattr(ds, "ImagePositionPatient", None)) for ds in datasets]
    orientations = [_floats(getattr(ds, "ImageOrientationPatient", None)) for ds in datasets]
    if _usable_geometry(positions, orientations):
        reference = np.asarray(orientations[0])
        for orientation, name in zip(orientations, names):
            if np.max(np.abs(np.asarray(orientation) - reference)) > 1e-3:
                raise CtReadError(
                    f"{folder}: {name} has ImageOrientationPatient {orientation}, {names[0]} "
                    f"has {tuple(reference)}; a series has one orientation, move the other "
                    "files out of the folder."
                )
        try:
            order, spacing = _order_by_position(positions, orientations[0], names)
        except ValueError as e:
            raise CtReadError(f"{folder}: {e}") from e
        even: list[str] = []
        _check_even_spacing(positions, orientations[0], order, even)
        warnings.extend(f"{folder}: {w}" for w in even)
        if spacing is None:
            spacing = _file_slice_spacing(datasets[0], warnings)
        return order, spacing
    numbers = [getattr(ds, "InstanceNumber", None) for ds in datasets]
    if all(n is not None and str(n).strip() != "" for n in numbers) and len(
        {int(n) for n in numbers}
    ) == len(numbers):
        order = sorted(range(len(datasets)), key=lambda k: int(numbers[k]))
        how = "InstanceNumber"
    else:
        order = list(range(len(datasets)))
        how = "file name"
    spacing = _file_slice_spacing(datasets[0], [])
    warnings.append(
        f"{folder}: slices lack ImagePositionPatient/ImageOrientationPatient; sorted by {how}, "
        f"slice spacing {'unknown' if spacing is None else f'{spacing:g} mm'} taken from "
        "SpacingBetweenSlices or SliceThickness."
    )
    return order, spacing


def _merge_warnings(per_file: list[list[str]], paths: list[str]) -> list[str]:
    """One line per distinct message, with the number of files it concerns."""
    counts: dict[str, list[str]] = {}
    for warnings, path in zip(per_file, paths):
        for warning in warnings:
            message = warning[len(path) + 2 :] if warning.startswith(path + ": ") else warning
            counts.setdefault(message, []).append(path)
    merged = []
    for message, files in counts.items():
        where = files[0] if len(files) == 1 else f"{len(files)} files (e.g. {files[0]})"
        merged.append(f"{where}: {message}")
    return merged


# ---------------------------------------------------------------------------------------------
# DICOM writing
# ---------------------------------------------------------------------------------------------


def _ds_number(value: float):
    from pydicom.valuerep import DSfloat

    return DSfloat(float(value), auto_format=True)


def write_dicom_series(
    folder,
    hu: np.ndarray,
    pixel_spacing_mm: tuple[float, float],
    slice_spacing_mm: float,
    *,
    patient_id: str = "ANON",
    series_uid: str | None = None,
    rescale_slope: float = 1.0,
    rescale_intercept: float = -1024.0,
    window: Sequence[tuple[float, float]] = ((40, 80),),
    bits_stored: int = 16,
    compress: str | None = None,
) -> list[str]:
    """Writes a volume as one CT Image Storage DICOM file per slice.

    Stored values are rint((hu - rescale_intercept) / rescale_slope), unsigned when none is
    negative, else signed, in 16-bit words of which `bits_stored` are used. Slice k (0-based)
    is `slice_{k+1:04d}.dcm` with InstanceNumber k + 1 and ImagePositionPatient
    (0, 0, k * slice_spacing_mm) in an axial orientation (ImageOrientationPatient 1\\0\\0\\0\\1\\0),
    so `read_dicom_series` returns the slices in the order given. All UIDs derive from
    `series_uid`, so the same call writes the same bytes. No date, time or name is written.

    Args:
      folder: output folder, created if needed; existing files of the same names are replaced.
      hu: (H, W, S) HU in display orientation (row 0 at the top).
      pixel_spacing_mm: (row, column) spacing in mm.
      slice_spacing_mm: distance between slices in mm (also written as SliceThickness).
      patient_id: PatientID and PatientName.
      series_uid: SeriesInstanceUID; a new random one when None.
      rescale_slope: RescaleSlope, > 0.
      rescale_intercept: RescaleIntercept.
      window: (level, width) pairs written as (multi-valued) WindowCenter/WindowWidth; empty
        for none.
      bits_stored: BitsStored, 8 to 16.
      compress: None (Explicit VR Little Endian), "rle" (RLE Lossless, pydicom alone),
        "jpeg2000" (JPEG 2000 Lossless, needs pylibjpeg-openjpeg) or "jpeg-ls" (JPEG-LS
        Lossless, needs pyjpegls).

    Returns:
      The written paths, in slice order.

    Raises:
      ValueError: naming the argument, when the shape, spacing, bit depth or compression is
        invalid, or the HU values do not fit `bits_stored` with this slope and intercept.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = os.fspath(folder)
    hu = np.asarray(hu)
    if hu.ndim != 3 or min(hu.shape) < 1:
        raise ValueError(f"write_dicom_series({folder!r}): hu must be (H, W, S), got {hu.shape}.")
    if not np.all(np.isfinite(hu)):
        raise ValueError(f"write_dicom_series({folder!r}): hu has NaN or infinite values.")
    if not 8 <= bits_stored <= 16:
        raise ValueError(f"write_dicom_series: bits_stored={bits_stored}; use 8 to 16.")
    if not rescale_slope > 0:
        raise ValueError(f"write_dicom_series: rescale_slope={rescale_slope}; it must be > 0.")
    row_mm, column_mm = (float(v) for v in pixel_spacing_mm)
    if not (row_mm > 0 and column_mm > 0 and slice_spacing_mm > 0):
        raise ValueError(
            f"write_dicom_series: spacings {pixel_spacing_mm}, {slice_spacing_mm} must be > 0."
        )
    syntax = _compression_syntax(compress)
    if compress == "jpeg2000" and min(hu.shape[:2]) < _JPEG2000_MIN_SIDE:
        raise ValueError(
            f"write_dicom_series: compress='jpeg2000' needs images of at least "
            f"{_JPEG2000_MIN_SIDE}x{_JPEG2000_MIN_SIDE} pixels (openjpeg's 6 wavelet levels), "
            f"got {hu.shape[0]}x{hu.shape[1]}; use compress='rle'."
        )

    stored = np.rint((hu.astype(np.float64) - rescale_intercept) / rescale_slope)
    signed = bool(stored.min() < 0)
    low, high = (
        (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1)
        if signed
        else (0, 2**bits_stored - 1)
    )
    if stored.min() < low or stored.max() > high:
        raise ValueError(
            f"write_dicom_series({folder!r}): HU {hu.min():g}..{hu.max():g} give stored values "
            f"{stored.min():g}..{stored.max():g}, outside {low}..{high} for bits_stored="
            f"{bits_stored}; raise bits_stored or change rescale_slope/rescale_intercept."
        )
    stored = stored.astype(np.int16 if signed else np.uint16)

    series_uid = str(series_uid or generate_uid())
    study_uid = generate_uid(entropy_srcs=[series_uid, "study"])
    frame_uid = generate_uid(entropy_srcs=[series_uid, "frame-of-reference"])
    os.makedirs(folder, exist_ok=True)
    rows, columns, count = stored.shape
    paths = []
    for k in range(count):
        sop_uid = generate_uid(entropy_srcs=[series_uid, "instance", str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.PatientID = patient_id
        ds.PatientName = patient_id
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [_ds_number(v) for v in (1, 0, 0, 0, 1, 0)]
        ds.ImagePositionPatient = [_ds_number(v) for v in (0, 0, k * slice_spacing_mm)]
        ds.SliceLocation = _ds_number(k * slice_spacing_mm)
        ds.PixelSpacing = [_ds_number(row_mm), _ds_number(column_mm)]
        ds.SliceThickness = _ds_number(slice_spacing_mm)
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = int(signed)
        ds.RescaleSlope = _ds_number(rescale_slope)
        ds.RescaleIntercept = _ds_number(rescale_intercept)
        ds.RescaleType = "HU"
        if window:
            centers = [_ds_number(level) for level, _ in window]
            widths = [_ds_number(width) for _, width in window]
            ds.WindowCenter = centers if len(centers) > 1 else centers[0]
            ds.WindowWidth = widths if len(widths) > 1 else widths[0]
        pixels = np.ascontiguousarray(stored[:, :, k])
        ds.PixelData = pixels.tobytes()
        if syntax is not None:
            ds.compress(syntax, pixels, generate_instance_uid=False)
        path = os.path.join(folder, f"slice_{k + 1:04d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _compression_syntax(compress: str | None):
    if compress is None:
        return None
    from pydicom.pixels import get_encoder
    from pydicom.uid import UID

    key = str(compress).lower()
    if key not in _COMPRESSIONS:
        raise ValueError(
            f"write_dicom_series: compress={compress!r}; use None or one of {sorted(_COMPRESSIONS)}."
        )
    syntax = UID(_COMPRESSIONS[key])
    if not get_encoder(syntax).is_available:
        package = {"jpeg2000": "pylibjpeg-openjpeg", "jpeg-ls": "pyjpegls"}.get(key, "pydicom")
        raise ValueError(
            f"write_dicom_series: compress={compress!r} needs an encoder that is not installed; "
            f"install {package} or use compress='rle'."
        )
    return syntax


# ---------------------------------------------------------------------------------------------
# NIfTI
# ---------------------------------------------------------------------------------------------


def gunzip_head(data: bytes, size: int = NIFTI_HEADER_BYTES) -> bytes | None:
    """The first `size` decompressed bytes of gzip data, or None when it is not valid gzip.

    Args:
      data: gzip-compressed bytes.
      size: how many decompressed bytes to return at most.

    Returns:
      Up to `size` bytes; None when the gzip stream is damaged before them.
    """
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            return f.read(size)
    except (OSError, EOFError, ValueError, zlib.error):
        return None


def nifti_layout(header: bytes) -> tuple[int, int] | None:
    """(voxels, bytes up to the end of the voxel data) from a NIfTI-1/-2 header, or None.

    Read from the header alone, so a file's memory needs are known before its data are read.

    Args:
      header: at least the first 348 (NIfTI-1) or 540 (NIfTI-2) bytes of the file.

    Returns:
      (number of voxels, the file size the header needs), or None when the header is not a
      NIfTI-1/-2 header with 1-7 non-negative dimensions, a positive bitpix and a finite,
      non-negative vox_offset.
    """
    try:
        for endian in "<>":
            (sizeof_hdr,) = struct.unpack(endian + "i", header[:4])
            if sizeof_hdr == 348:
                dims = struct.unpack(endian + "8h", header[40:56])
                (bitpix,) = struct.unpack(endian + "h", header[72:74])
                (vox_offset,) = struct.unpack(endian + "f", header[108:112])
                break
            if sizeof_hdr == 540:
                (bitpix,) = struct.unpack(endian + "h", header[14:16])
                dims = struct.unpack(endian + "8q", header[16:80])
                (vox_offset,) = struct.unpack(endian + "q", header[168:176])
                break
        else:
            return None
    except struct.error:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or any(d < 0 for d in dims[1 : ndim + 1]) or bitpix <= 0:
        return None
    if not (math.isfinite(vox_offset) and 0 <= vox_offset < 2**40):
        return None
    voxels = 1
    for d in dims[1 : ndim + 1]:
        voxels *= max(int(d), 1)
    return voxels, max(int(vox_offset), sizeof_hdr) + (voxels * int(bitpix) + 7) // 8


def _nifti_image(path: str):
    """A nibabel image and its voxels from the file's bytes, whatever its extension.

    The header is checked first: a file declaring more than `MAX_PIXELS` voxels, or more data
    than it holds, is refused before any voxel is read, and gzip data are decompressed only as
    far as the header says the image needs (a small .nii.gz cannot expand to gigabytes).
    """
    import nibabel as nib

    if not os.path.isfile(path):
        raise CtReadError(f"{path}: no such file.")
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise CtReadError(f"{path}: empty file (0 bytes); copy or export it again.")
    compressed = data.startswith(_GZIP_SIGNATURE)
    head = gunzip_head(data) if compressed else data[:NIFTI_HEADER_BYTES]
    if head is None:
        raise CtReadError(
            f"{path}: damaged gzip data (the NIfTI header cannot be decompressed); download or "
            "export the .nii.gz again."
        )
    kind = _nifti_kind(head)
    if kind is None:
        raise CtReadError(
            f"{path}: not a NIfTI-1/-2 single file (no 'n+1'/'n+2' magic); give a .nii or "
            ".nii.gz file (Analyze .hdr/.img pairs are not read)."
        )
    layout = nifti_layout(head)
    if layout is None:
        raise CtReadError(
            f"{path}: damaged NIfTI header (its dimensions, bitpix or vox_offset are invalid); "
            "download or export it again."
        )
    voxels, needed = layout
    if voxels > MAX_PIXELS:
        raise CtReadError(
            f"{path}: the NIfTI header declares {voxels:,} voxels, more than the "
            f"{MAX_PIXELS:,} read from one file: the header is damaged, or give a smaller volume."
        )
    if compressed:
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
                data = f.read(needed)
        except (OSError, EOFError, zlib.error) as e:
            raise CtReadError(
                f"{path}: damaged gzip data ({e}); download or export the .nii.gz again."
            ) from e
    if len(data) < needed:
        raise CtReadError(
            f"{path}: truncated NIfTI file ({len(data):,} bytes{' uncompressed' * compressed}; "
            f"its header needs {needed:,}); download or export it again."
        )
    image_class = nib.Nifti1Image if kind == 1 else nib.Nifti2Image
    try:
        image = image_class.from_bytes(data)
        return image, np.asanyarray(image.get_fdata(dtype=np.float32))
    except Exception as e:  # nibabel raises several types for damaged headers and data.
        raise CtReadError(
            f"{path}: damaged NIfTI file ({type(e).__name__}: {e}); download or export it again."
        ) from e


def _nifti_kind(data: bytes) -> int | None:
    end1 = _NIFTI1_MAGIC_OFFSET + 4
    if len(data) >= end1 and data[_NIFTI1_MAGIC_OFFSET:end1] in _NIFTI1_MAGICS:
        return 1
    end2 = _NIFTI2_MAGIC_OFFSET + 4
    if len(data) >= end2 and data[_NIFTI2_MAGIC_OFFSET:end2] in _NIFTI2_MAGICS:
        return 2
    return None


def read_nifti_volume(path) -> CtImage:
    """Reads a NIfTI volume (CT in HU, or a 0/1 mask) in the PhysioNet CT-ICH layout.

    The file's voxel array (i, j, k), after the header's scl_slope/scl_inter, is turned into
    display orientation slice by slice with ``np.rot90(volume, k=1, axes=(0, 1))`` (90 degrees
    counter-clockwise): display row r, column c of slice k is voxel (c, J - 1 - r, k). This is
    the layout DICOM-to-NIfTI converters write (i along the DICOM columns, j along the DICOM
    rows from the bottom), and it is how CT-ICH pipelines display its `ct_scans/NNN.nii` and
    `masks/NNN.nii` upright; the dataset's own split_raw_data.py leaves this rotation commented
    out and so saves its PNGs rotated by 90 degrees. The affine is not used to reorient.

    Args:
      path: a .nii or .nii.gz file (recognised by content, not by extension); 2-D files are
        read as one slice, 4-D files only when their extra axes have length 1.

    Returns:
      CtImage with hu (H, W, S) float32, where H = the file's second axis and W its first;
      pixel_spacing_mm = (zoom j, zoom i) and slice_spacing_mm = zoom k in mm (None when 0 or
      for 2-D files); no windows.

    Raises:
      CtReadError: naming the file, when it is missing, empty, not NIfTI, damaged or
        truncated, declares more than `MAX_PIXELS` voxels, or has more than 3 dimensions of
        length > 1.
    """
    path = os.fspath(path)
    image, volume = _nifti_image(path)
    warnings: list[str] = []
    shape = volume.shape
    if volume.ndim == 2:
        volume = volume[:, :, None]
    elif volume.ndim > 3:
        if any(n != 1 for n in shape[3:]):
            raise CtReadError(
                f"{path}: NIfTI of shape {shape} has more than 3 dimensions; give a 3-D CT volume."
            )
        volume = volume.reshape(shape[:3])
    elif volume.ndim != 3:
        raise CtReadError(f"{path}: NIfTI of shape {shape}; give a 2-D slice or a 3-D volume.")
    if not np.all(np.isfinite(volume)):
        raise CtReadError(f"{path}: NIfTI holds NaN or infinite values; the file is damaged.")
    # Zooms are float32 in the header; their shortest decimal form gives back e.g. 0.4, not
    # 0.4000000059604645.
    zooms = [float(str(np.float32(z))) for z in image.header.get_zooms()[:3]] + [0.0] * 3
    unit = image.header.get_xyzt_units()[0]
    to_mm = {"meter": 1000.0, "micron": 1e-3}.get(unit, 1.0)
    zooms = [z * to_mm for z in zooms]
    if unit not in ("mm", "meter", "micron"):
        warnings.append(f"{path}: spatial unit {unit!r}; voxel sizes taken as mm.")
    pixel_spacing = (zooms[1], zooms[0]) if zooms[0] > 0 and zooms[1] > 0 else None
    if pixel_spacing is None:
        warnings.append(f"{path}: voxel size {tuple(zooms[:2])} is not positive; spacing unknown.")
    slice_spacing = zooms[2] if len(shape) >= 3 and zooms[2] > 0 else None
    hu = np.ascontiguousarray(np.rot90(volume, k=1, axes=(0, 1)), dtype=np.float32)
    return CtImage(
        hu=hu,
        pixel_spacing_mm=pixel_spacing,
        slice_spacing_mm=slice_spacing,
        window_centers=(),
        window_widths=(),
        warnings=warnings,
    )


def write_nifti_volume(
    path,
    hu: np.ndarray,
    pixel_spacing_mm: tuple[float, float],
    slice_spacing_mm: float,
    dtype=np.int16,
) -> None:
    """Writes a display-orientation volume as NIfTI-1, the exact inverse of `read_nifti_volume`.

    The voxel array is ``np.rot90(hu, k=-1, axes=(0, 1))``, zooms (column, row, slice) in mm,
    the affine diag(column, row, slice, 1) (sform and qform code 1), no intensity scaling.

    Args:
      path: output file ending in .nii or .nii.gz (gzip-compressed).
      hu: (H, W, S) values in display orientation: HU for a CT, 0/1 for a mask.
      pixel_spacing_mm: (row, column) spacing in mm.
      slice_spacing_mm: distance between slices in mm.
      dtype: stored type, e.g. np.int16 for CT (values are rounded), np.uint8 for masks,
        np.float32 to keep fractions.

    Raises:
      ValueError: naming the path, when the extension, shape or spacing is invalid, or values
        are not finite or do not fit `dtype`.
    """
    import nibabel as nib

    path = os.fspath(path)
    if not (path.endswith(".nii") or path.endswith(".nii.gz")):
        raise ValueError(f"write_nifti_volume: {path!r} must end in .nii or .nii.gz.")
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"write_nifti_volume({path!r}): hu must be (H, W, S), got {hu.shape}.")
    if not np.all(np.isfinite(hu)):
        raise ValueError(f"write_nifti_volume({path!r}): values contain NaN or infinity.")
    row_mm, column_mm = (float(v) for v in pixel_spacing_mm)
    slice_mm = float(slice_spacing_mm)
    if not (row_mm > 0 and column_mm > 0 and slice_mm > 0):
        raise ValueError(
            f"write_nifti_volume({path!r}): spacings {pixel_spacing_mm}, {slice_spacing_mm} "
            "must be > 0."
        )
    dtype = np.dtype(dtype)
    voxels = np.rot90(hu, k=-1, axes=(0, 1))
    if np.issubdtype(dtype, np.integer):
        voxels = np.rint(voxels.astype(np.float64))
        info = np.iinfo(dtype)
        if voxels.size and (voxels.min() < info.min or voxels.max() > info.max):
            raise ValueError(
                f"write_nifti_volume({path!r}): values {voxels.min():g}..{voxels.max():g} do "
                f"not fit {dtype.name} ({info.min}..{info.max}); choose another dtype."
            )
    voxels = np.ascontiguousarray(voxels, dtype=dtype)
    affine = np.diag([column_mm, row_mm, slice_mm, 1.0])
    image = nib.Nifti1Image(voxels, affine)
    header = image.header
    header.set_data_dtype(dtype)
    header.set_zooms((column_mm, row_mm, slice_mm))
    header.set_xyzt_units("mm")
    header.set_slope_inter(1.0, 0.0)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    nib.save(image, path)


# ---------------------------------------------------------------------------------------------
# Any single file
# ---------------------------------------------------------------------------------------------


def _sniff(path: str) -> str | None:
    """'dicom', 'nifti', 'png', 'jpeg', 'gzip' (not NIfTI inside) or None, from the content."""
    with open(path, "rb") as f:
        head = f.read(_NIFTI1_MAGIC_OFFSET + 4)
    if head[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return "dicom"
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if head.startswith(_JPEG_SIGNATURE):
        return "jpeg"
    if head.startswith(_GZIP_SIGNATURE):
        with open(path, "rb") as f:
            head = gunzip_head(f.read())
        # Damaged gzip data, or gzip of something else: the NIfTI reader says which.
        return "nifti" if head and _nifti_kind(head) else "gzip"
    return "nifti" if _nifti_kind(head) else None


def _read_screenshot(path: str, kind: str) -> CtImage:
    from medjax.preprocess.image import ImageReadError, read_grayscale

    try:
        gray = read_grayscale(path)
    except ImageReadError as e:
        raise CtReadError(f"{e} ({kind.upper()} recognised by its signature)") from e
    level, width = SCREENSHOT_WINDOW
    hu = (level - width / 2.0 + gray.astype(np.float64) / 255.0 * width).astype(np.float32)
    return CtImage(
        hu=hu,
        pixel_spacing_mm=None,
        slice_spacing_mm=None,
        window_centers=(level,),
        window_widths=(width,),
        warnings=[
            f"{path}: {kind.upper()} image taken as a brain-window ({level:g}/{width:g}) "
            f"display; HU are only approximate and limited to {level - width / 2:g}.."
            f"{level + width / 2:g}. Give the DICOM or NIfTI file for real HU."
        ],
    )


def read_ct_file(path) -> CtImage:
    """Reads one CT file of any accepted format, recognised by its content, not its extension.

    * DICOM (bytes 128..131 are 'DICM'): `read_dicom_slice`, (H, W) or, for a multi-frame
      file, (H, W, S).
    * NIfTI-1/-2, optionally gzipped: `read_nifti_volume`; a volume with one slice, or a 2-D
      file, gives (H, W); a volume with several slices gives (H, W, S).
    * PNG or JPEG: 8-bit gray (colour is converted to gray) taken as a brain-window display,
      HU = 40 - 80/2 + gray / 255 * 80, with a warning that HU are only approximate; the
      window fields are set to that window.

    Args:
      path: the file.

    Returns:
      CtImage; check `hu.ndim` when only slices are expected.

    Raises:
      CtReadError: naming the file, when it is missing or empty, is in none of the formats
        above (listing them), or cannot be read as the format it was recognised as.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CtReadError(f"{path}: no such file.")
    if os.path.getsize(path) == 0:
        raise CtReadError(f"{path}: empty file (0 bytes); accepted formats: {ACCEPTED_FORMATS}.")
    kind = _sniff(path)
    if kind == "dicom":
        return read_dicom_slice(path)
    if kind in ("nifti", "gzip"):
        image = read_nifti_volume(path)
        if image.hu.shape[-1] == 1:
            image.hu = image.hu[:, :, 0]
        return image
    if kind in ("png", "jpeg"):
        return _read_screenshot(path, kind)
    raise CtReadError(
        f"{path}: not a recognised CT file; accepted formats: {ACCEPTED_FORMATS}. A DICOM "
        "without its preamble can be re-saved with the preamble by any DICOM tool."
    )


__all__ = [
    "ACCEPTED_FORMATS",
    "CtImage",
    "CtReadError",
    "WINDOWS",
    "apply_window",
    "parse_window",
    "read_ct_file",
    "read_dicom_series",
    "read_dicom_slice",
    "read_nifti_volume",
    "window_channels",
    "window_uint8",
    "write_dicom_series",
    "write_nifti_volume",
]
