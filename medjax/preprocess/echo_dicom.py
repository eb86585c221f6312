"""Multi-frame echocardiogram DICOMs -> de-identified videos in the EchoNet-Dynamic layout.

Command line::

    python -m medjax.preprocess.echo_dicom --input DICOM_DIR --output RAW_DIR \\
        [--split TEST] [--size 112] [--fps FALLBACK]

Every multi-frame ultrasound DICOM under DICOM_DIR (searched recursively; the `.dcm` extension
is optional) becomes `RAW_DIR/Videos/<name>.avi`, a `size` x `size` grayscale MJPG video at the
source frame rate, and one row of `RAW_DIR/FileList.csv`::

    FileName,EF,ESV,EDV,FrameHeight,FrameWidth,FPS,NumberOfFrames,Split

EF, ESV and EDV are unknown and left empty. An existing FileList.csv is merged, never
duplicated: a video converted again replaces its row (keeping EF/ESV/EDV values already filled
in there), other rows stay as they are. The CSV is written to a temporary file and renamed.

De-identification:
  * `<name>` is the first 16 hex digits of the SHA-256 of the SOPInstanceUID (of the file's
    bytes when the UID is missing); it never contains the input file name or patient data.
  * No DICOM tag is copied to any output.
  * Only the scan sector is kept. The sector is where the pixels change over time: the largest
    connected region of the temporal standard deviation above a small threshold, after a
    morphological opening that cuts thin moving lines such as ECG traces, filled to its convex
    hull. Burned-in text (patient name, ID, dates), logos, static markers and separate moving
    overlays fall outside it and are set to 0 in every frame before anything is resized. When
    the file has SequenceOfUltrasoundRegions, the motion is first limited to the 2-D region
    that holds most of it. Text drawn inside the sector itself cannot be told apart from the
    image and stays.

Pixels: colour frames become gray with OpenCV's weights (0.299 R + 0.587 G + 0.114 B); with
pydicom 3 `pixel_array` already returns YBR_FULL and YBR_FULL_422 data as RGB, so no second
colour conversion is done. MONOCHROME1 is inverted; data outside 0..255 (e.g. 16-bit) is scaled
to 0..255 over the whole clip. The frame rate is CineRate, else RecommendedDisplayFrameRate,
else 1000 / FrameTime (ms), else 1000 / the mean of FrameTimeVector (ms); a file with none of
these fails, naming the file, unless `--fps` gives a fallback.

Files that are not DICOM, DICOMs without pixels, single-frame images and non-ultrasound
modalities are skipped and listed with the reason. Multi-frame ultrasound DICOMs that cannot be
converted (compressed pixels without a decoder, no frame rate, no moving sector) are listed as
failures; the other files are still converted and the command exits with status 1.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import os
import sys
import tempfile

import cv2
import numpy as np

from medjax.preprocess.dicom import DicomReadError, pixel_header
from medjax.preprocess.text import csv_text
from medjax.preprocess.video import write_video_gray

FILE_LIST_COLUMNS = (
    "FileName",
    "EF",
    "ESV",
    "EDV",
    "FrameHeight",
    "FrameWidth",
    "FPS",
    "NumberOfFrames",
    "Split",
)
# Columns filled in by people, not by conversion; a re-run keeps their existing values.
LABEL_COLUMNS = ("EF", "ESV", "EDV")
VIDEOS_DIR = "Videos"
FILE_LIST = "FileList.csv"
DEFAULT_SIZE = 112
# Temporal standard deviation (gray levels of 0..255) above which a pixel counts as moving.
MOTION_THRESHOLD = 2.0
# The sector must cover at least this fraction of the frame, or no sector was found.
MIN_SECTOR_FRACTION = 0.01
NAME_HEX_DIGITS = 16
REGION_SPATIAL_FORMAT_2D = 1
DECODER_HINT = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"


class NotEchoVideoError(DicomReadError):
    """A file that is not a multi-frame ultrasound DICOM (skipped, not a failure)."""


@dataclasses.dataclass
class EchoVideo:
    """The frames of one echo DICOM and what is needed to convert them; no patient data.

    Attributes:
      frames: (T, H, W) uint8 grayscale frames.
      fps: frames per second.
      name: anonymous output name (hex digits of a SHA-256).
      regions: ultrasound region boxes (x0, y0, x1, y1), inclusive pixel bounds, 2-D only.
    """

    frames: np.ndarray
    fps: float
    name: str
    regions: list[tuple[int, int, int, int]]


@dataclasses.dataclass
class ConversionSummary:
    """What `convert_directory` did.

    Attributes:
      converted: (source path, output name) per converted video.
      skipped: (path, reason) per file that is not a multi-frame ultrasound DICOM.
      failed: (path, reason) per multi-frame ultrasound DICOM that could not be converted.
    """

    converted: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def read_echo_dicom(path: str, fallback_fps: float | None = None) -> EchoVideo:
    """Reads a multi-frame ultrasound DICOM as grayscale uint8 frames.

    Args:
      path: the DICOM file.
      fallback_fps: frame rate to use when the file has no timing tag; None makes that an error.

    Raises:
      NotEchoVideoError: the file is not DICOM, has no pixels, has one frame or is not ultrasound.
      DicomReadError: the pixels cannot be decoded or the frame rate is unknown; the message
        names the file and says what to do.
    """
    import pydicom  # Imported here: only DICOM conversion needs it.
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, defer_size="1 MB")
    except InvalidDicomError:
        raise NotEchoVideoError(f"{path}: not a DICOM file (no 'DICM' file header).")
    except Exception as e:  # pydicom raises many types for damaged files.
        raise NotEchoVideoError(f"{path}: not a readable DICOM file ({type(e).__name__}: {e}).")
    if "PixelData" not in ds:
        raise NotEchoVideoError(f"{path}: DICOM without pixel data (not an image).")
    try:
        modality = str(ds.get("Modality", "") or "").strip()
    except Exception as e:  # A damaged element fails when it is converted.
        raise DicomReadError(f"{path}: Modality cannot be read ({type(e).__name__}: {e}).")
    if modality and modality != "US":
        raise NotEchoVideoError(f"{path}: modality {modality!r}, not ultrasound ('US').")
    num_frames = pixel_header(ds, path).frames
    if num_frames < 2:
        raise NotEchoVideoError(f"{path}: single-frame DICOM image, not a video.")
    fps = _frame_rate(ds, path, fallback_fps)
    pixels = _decode_pixels(ds, path)
    if pixels.ndim not in (3, 4) or pixels.shape[0] != num_frames:
        raise DicomReadError(
            f"{path}: pixel array of shape {pixels.shape} does not hold NumberOfFrames="
            f"{num_frames} frames; re-export the cine loop from the scanner or PACS."
        )
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    frames = _to_gray_uint8(pixels, photometric)
    return EchoVideo(frames, fps, _anonymous_name(ds, path), _ultrasound_regions(ds))


def _decode_pixels(ds, path: str) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as e:  # Missing plugins and corrupt data raise many types.
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        try:
            compressed = syntax is not None and syntax.is_compressed
        except ValueError:  # pydicom: not a transfer syntax it knows.
            compressed = False
        if compressed:
            raise DicomReadError(
                f"{path}: cannot decode its compressed pixel data ({syntax.name}; "
                f"{type(e).__name__}: {e}). Install the JPEG decoders with "
                f"`{DECODER_HINT}` and run again."
            )
        raise DicomReadError(
            f"{path}: pixel data cannot be read ({type(e).__name__}: {e}); the file may be "
            "truncated or corrupt, re-export it."
        )


def _frame_rate(ds, path: str, fallback_fps: float | None) -> float:
    """Frames per second from the timing tags, in the order the module docstring gives."""
    for keyword in ("CineRate", "RecommendedDisplayFrameRate"):
        value = _positive_float(getattr(ds, keyword, None))
        if value is not None:
            return value
    frame_time_ms = _positive_float(getattr(ds, "FrameTime", None))
    if frame_time_ms is not None:
        return 1000.0 / frame_time_ms
    vector = getattr(ds, "FrameTimeVector", None)
    if vector is not None:
        # By convention the first entry is 0 (the first frame's own time); the rest are steps.
        try:
            steps = np.atleast_1d(np.asarray(vector, np.float64))
        except (TypeError, ValueError):
            steps = np.zeros(0)
        steps = steps[np.isfinite(steps) & (steps > 0)]
        if steps.size:
            return 1000.0 / float(steps.mean())
    if fallback_fps is not None:
        return float(fallback_fps)
    raise DicomReadError(
        f"{path}: no frame rate (none of CineRate, RecommendedDisplayFrameRate, FrameTime, "
        "FrameTimeVector is set); pass the scanner's rate with --fps (e.g. --fps 50)."
    )


def _positive_float(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) and number > 0 else None


def _to_gray_uint8(pixels: np.ndarray, photometric: str) -> np.ndarray:
    """(T, H, W) or (T, H, W, 3) pixels -> (T, H, W) uint8, one scaling for the whole clip."""
    colour = pixels.ndim == 4
    if pixels.dtype == np.uint8 and photometric != "MONOCHROME1":
        if not colour:
            return np.ascontiguousarray(pixels)
        return np.stack([cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in pixels])
    weights = np.array([0.299, 0.587, 0.114], np.float32)
    gray = np.empty(pixels.shape[:3], np.float32)
    for t, frame in enumerate(pixels):
        frame = frame.astype(np.float32)
        gray[t] = frame @ weights if colour else frame
    if photometric == "MONOCHROME1":
        gray = gray.max() - gray
    low, high = float(gray.min()), float(gray.max())
    if low < 0 or high > 255:
        gray = (gray - low) * (255.0 / max(high - low, 1e-6))
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)


def _anonymous_name(ds, path: str) -> str:
    uid = str(getattr(ds, "SOPInstanceUID", "") or "").strip()
    digest = hashlib.sha256()
    if uid:
        digest.update(uid.encode("ascii", "replace"))
    else:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:NAME_HEX_DIGITS]


def _ultrasound_regions(ds) -> list[tuple[int, int, int, int]]:
    boxes = []
    for region in getattr(ds, "SequenceOfUltrasoundRegions", None) or []:
        spatial_format = getattr(region, "RegionSpatialFormat", None)
        if spatial_format is not None and int(spatial_format) != REGION_SPATIAL_FORMAT_2D:
            continue
        try:
            box = tuple(
                int(getattr(region, k))
                for k in (
                    "RegionLocationMinX0",
                    "RegionLocationMinY0",
                    "RegionLocationMaxX1",
                    "RegionLocationMaxY1",
                )
            )
        except (AttributeError, TypeError, ValueError):
            continue
        if box[2] > box[0] and box[3] > box[1]:
            boxes.append(box)
    return boxes


def sector_mask(
    frames: np.ndarray,
    regions: list[tuple[int, int, int, int]] | tuple = (),
    threshold: float = MOTION_THRESHOLD,
) -> np.ndarray:
    """The scan sector: convex hull of the largest moving region of a clip.

    Args:
      frames: (T, H, W) uint8 frames.
      regions: optional ultrasound region boxes (x0, y0, x1, y1), inclusive; the motion is
        limited to the box that holds most of it.
      threshold: temporal standard deviation (gray levels) above which a pixel moves.

    Returns:
      (H, W) bool mask, True inside the sector.

    Raises:
      ValueError: no moving region covering at least MIN_SECTOR_FRACTION of the frame.
    """
    height, width = frames.shape[1:3]
    total = np.zeros((height, width), np.float64)
    total_sq = np.zeros((height, width), np.float64)
    for frame in frames:
        frame = frame.astype(np.float64)
        total += frame
        total_sq += frame * frame
    mean = total / len(frames)
    variance = np.maximum(total_sq / len(frames) - mean * mean, 0.0)
    moving = (variance > threshold * threshold).astype(np.uint8)

    if regions:
        counts = [moving[y0 : y1 + 1, x0 : x1 + 1].sum() for x0, y0, x1, y1 in regions]
        x0, y0, x1, y1 = regions[int(np.argmax(counts))]
        in_region = np.zeros_like(moving)
        in_region[max(y0, 0) : y1 + 1, max(x0, 0) : x1 + 1] = 1
        moving &= in_region

    # An opening removes lines thinner than ~1% of the frame (ECG traces, moving cursors).
    kernel_size = max(3, (min(height, width) // 100) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel_size, kernel_size))
    moving = cv2.morphologyEx(moving, cv2.MORPH_OPEN, kernel)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(moving, connectivity=8)
    if count < 2:
        raise ValueError("no moving scan sector (all frames are identical outside thin lines)")
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    points = cv2.findNonZero((labels == largest).astype(np.uint8))
    hull = cv2.convexHull(points)
    mask = np.zeros((height, width), np.uint8)
    cv2.fillConvexPoly(mask, hull, 1)
    if mask.sum() < MIN_SECTOR_FRACTION * height * width:
        raise ValueError(
            f"the largest moving region covers {mask.sum()} of {height * width} pixels, "
            "too small to be a scan sector"
        )
    return mask.astype(bool)


def crop_sector(
    frames: np.ndarray, mask: np.ndarray, size: int = DEFAULT_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Blanks everything outside the sector, crops to it, pads to a square, resizes.

    Pixels outside `mask` are set to 0 at full resolution first, so nothing outside the sector
    (burned-in text) leaks into the resized frames; then the resized mask blanks the edge again.

    Args:
      frames: (T, H, W) uint8 frames.
      mask: (H, W) bool sector mask.
      size: output side in pixels.

    Returns:
      ((T, size, size) uint8 frames, (size, size) bool mask of the sector in them)
    """
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop_mask = mask[top:bottom, left:right]
    side = max(bottom - top, right - left)
    pad_y, pad_x = side - (bottom - top), side - (right - left)
    padding = ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2))
    # INTER_AREA averages when shrinking; when enlarging it degrades to nearest neighbour.
    interpolation = cv2.INTER_AREA if side >= size else cv2.INTER_LINEAR

    square_mask = np.pad(crop_mask.astype(np.uint8) * 255, padding)
    out_mask = cv2.resize(square_mask, (size, size), interpolation=interpolation) >= 128
    out = np.empty((len(frames), size, size), np.uint8)
    for t, frame in enumerate(frames):
        crop = np.where(crop_mask, frame[top:bottom, left:right], 0).astype(np.uint8)
        resized = cv2.resize(np.pad(crop, padding), (size, size), interpolation=interpolation)
        out[t] = np.where(out_mask, resized, 0)
    return out, out_mask


def convert_file(
    path: str, videos_dir: str, size: int = DEFAULT_SIZE, fallback_fps: float | None = None
) -> dict[str, str]:
    """Converts one echo DICOM into `videos_dir/<name>.avi`.

    Returns:
      its FileList row without Split (all values as strings, EF/ESV/EDV empty).

    Raises:
      NotEchoVideoError, DicomReadError: as `read_echo_dicom`, and DicomReadError naming the file
        when no scan sector is found.
    """
    return _write_echo_video(read_echo_dicom(path, fallback_fps), path, videos_dir, size)


def _write_echo_video(video: EchoVideo, path: str, videos_dir: str, size: int) -> dict[str, str]:
    try:
        mask = sector_mask(video.frames, video.regions)
    except ValueError as e:
        raise DicomReadError(
            f"{path}: {e}; the clip is not a live ultrasound loop and cannot be de-identified "
            "by blanking, so it is not converted."
        )
    frames, _ = crop_sector(video.frames, mask, size)
    os.makedirs(videos_dir, exist_ok=True)
    final = os.path.join(videos_dir, video.name + ".avi")
    partial = os.path.join(videos_dir, f".{video.name}.partial.avi")
    try:
        write_video_gray(partial, frames, video.fps)
        os.replace(partial, final)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    return {
        "FileName": video.name,
        "EF": "",
        "ESV": "",
        "EDV": "",
        "FrameHeight": str(size),
        "FrameWidth": str(size),
        "FPS": f"{round(video.fps, 2):g}",
        "NumberOfFrames": str(len(frames)),
    }


def merge_file_list(csv_path: str, rows: list[dict[str, str]]) -> int:
    """Merges rows into an EchoNet FileList.csv (created if missing), atomically.

    A row whose FileName is already listed replaces it in place, except that EF/ESV/EDV values
    already filled in are kept when the new row leaves them empty. Other rows are kept.

    Returns:
      the number of rows in the file afterwards.

    Raises:
      ValueError: the existing file lacks one of FILE_LIST_COLUMNS (names the file and columns),
        is not UTF-8 text, or is not valid CSV (names the file and line).
    """
    columns = list(FILE_LIST_COLUMNS)
    existing: dict[str, dict[str, str]] = {}
    if os.path.exists(csv_path):
        text = csv_text(csv_path, advice="save it as UTF-8, or move it away to start a new one")
        reader = csv.DictReader(text)
        try:
            header = list(reader.fieldnames or [])
            missing = [c for c in FILE_LIST_COLUMNS if c not in header]
            if missing:
                raise ValueError(
                    f"{csv_path}: existing FileList lacks columns {missing}; move it away or "
                    f"give it the header {','.join(FILE_LIST_COLUMNS)}."
                )
            columns = header
            for row in reader:
                existing[row["FileName"]] = row
        except csv.Error as e:  # The DictReader's own line count stops at the last good row.
            raise ValueError(
                f"{csv_path}, line {reader.reader.line_num}: the existing FileList is not "
                f"valid CSV ({e}); fix it, or move it away to start a new one."
            ) from None
    for row in rows:
        old = existing.get(row["FileName"], {})
        merged = {**old, **row}
        for column in LABEL_COLUMNS:
            if not row.get(column) and old.get(column):
                merged[column] = old[column]
        existing[row["FileName"]] = merged

    directory = os.path.dirname(os.path.abspath(csv_path))
    handle, tmp_path = tempfile.mkstemp(prefix=".FileList.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(existing.values())
        os.replace(tmp_path, csv_path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    return len(existing)


def _candidate_files(input_dir: str, output_dir: str) -> list[str]:
    """Every file under input_dir, sorted, except the outputs when output_dir lies inside it."""
    real = os.path.realpath
    skip_dirs = {real(output_dir), real(os.path.join(output_dir, VIDEOS_DIR))}
    skip_file = real(os.path.join(output_dir, FILE_LIST))
    paths = []
    for root, dirs, files in os.walk(input_dir):
        dirs[:] = sorted(d for d in dirs if real(os.path.join(root, d)) not in skip_dirs)
        paths.extend(
            os.path.join(root, name)
            for name in sorted(files)
            if real(os.path.join(root, name)) != skip_file
        )
    return paths


def convert_directory(
    input_dir: str,
    output_dir: str,
    split: str = "TEST",
    size: int = DEFAULT_SIZE,
    fallback_fps: float | None = None,
) -> ConversionSummary:
    """Converts every multi-frame ultrasound DICOM under input_dir into the EchoNet layout.

    Args:
      input_dir: folder searched recursively; files need no `.dcm` extension.
      output_dir: EchoNet raw folder; gets `Videos/*.avi` and `FileList.csv` (merged).
      split: value of the Split column for the converted videos.
      size: side of the square output frames.
      fallback_fps: frame rate for files without timing tags; None makes those failures.

    Raises:
      ValueError: input_dir is not a folder, or size is not positive.
    """
    if not os.path.isdir(input_dir):
        raise ValueError(f"--input {input_dir!r} is not a folder; point it at the DICOM folder.")
    if size < 1:
        raise ValueError(f"--size {size} must be a positive number of pixels (e.g. 112).")
    summary = ConversionSummary()
    rows: dict[str, dict[str, str]] = {}
    videos_dir = os.path.join(output_dir, VIDEOS_DIR)
    for path in _candidate_files(input_dir, output_dir):
        try:
            video = read_echo_dicom(path, fallback_fps)
            if video.name in rows:
                summary.skipped.append(
                    (path, f"same SOPInstanceUID as an earlier file; video {video.name} kept.")
                )
                continue
            row = _write_echo_video(video, path, videos_dir, size)
        except NotEchoVideoError as e:
            summary.skipped.append((path, _reason(e, path)))
            continue
        except DicomReadError as e:
            summary.failed.append((path, _reason(e, path)))
            continue
        rows[row["FileName"]] = {**row, "Split": split}
        summary.converted.append((path, row["FileName"]))
    if rows:
        merge_file_list(os.path.join(output_dir, FILE_LIST), list(rows.values()))
    return summary


def _reason(error: Exception, path: str) -> str:
    message = str(error)
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status (1 when any conversion failed)."""
    parser = argparse.ArgumentParser(
        prog="python -m medjax.preprocess.echo_dicom", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--input", required=True, help="folder of DICOM files (recursive)")
    parser.add_argument("--output", required=True, help="EchoNet-Dynamic raw folder to write")
    parser.add_argument("--split", default="TEST", help="Split column value (default TEST)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="output side in pixels")
    parser.add_argument(
        "--fps",
        type=float,
        default=None,
        help="frame rate for files without CineRate/FrameTime tags (default: such files fail)",
    )
    args = parser.parse_args(argv)
    if args.fps is not None and args.fps <= 0:
        parser.error(f"--fps {args.fps} must be positive")
    try:
        summary = convert_directory(args.input, args.output, args.split, args.size, args.fps)
    except ValueError as e:
        parser.error(str(e))

    def shown(path: str) -> str:
        return os.path.relpath(path, args.input)

    print(
        f"Converted {len(summary.converted)} echo video(s) into "
        f"{os.path.join(args.output, VIDEOS_DIR)}:"
    )
    for path, name in summary.converted:
        print(f"  {shown(path)} -> {name}.avi")
    print(f"Skipped {len(summary.skipped)} file(s):")
    for path, reason in summary.skipped:
        print(f"  {shown(path)}: {reason}")
    if summary.failed:
        print(f"Failed {len(summary.failed)} echo DICOM(s):")
        for path, reason in summary.failed:
            print(f"  {shown(path)}: {reason}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
