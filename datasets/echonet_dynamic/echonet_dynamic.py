"""TFDS builder for EchoNet-Dynamic echocardiogram videos: ejection fraction and LV tracings.

Reads the dataset's original layout from the manual directory (see
`MANUAL_DOWNLOAD_INSTRUCTIONS`) and writes ArrayRecord files; no TensorFlow is needed to build or
read it. Every video is decoded once, here, and stored as a raw-bytes `Tensor`.

Features of one example:

    filename       string            FileName from FileList.csv, without ".avi"
    video          (T, 112, 112, 1)  uint8, every decoded frame
    fps            float32           FileList FPS; the container's rate where FPS is empty
    ef, edv, esv   float32           NaN where FileList leaves them empty (unlabelled video)
    large_frame    int32             end-diastolic (ED) traced frame index, -1 if not traced
    small_frame    int32             end-systolic (ES) traced frame index, -1 if not traced
    large_mask     (112, 112, 1)     uint8 0/1 LV mask at large_frame; zeros if not traced
    small_mask     (112, 112, 1)     uint8 0/1 LV mask at small_frame; zeros if not traced
    has_tracings   bool              both masks are valid (use for segmentation only then)
    split          string            "train", "validation" or "test"

Read back with `builder.as_data_source(split)`: strings come back as `bytes`, scalars as Python
numbers, tensors as numpy arrays. Splits follow FileList's Split column (TRAIN/VAL/TEST in any
case; VALIDATION is accepted for VAL); a split with no FileList rows is left out.

Frames. Videos of another size are resized to 112x112 with `cv2.INTER_AREA` (the aspect ratio is
not kept) and their tracing coordinates scaled to match, with pixel centres at integer
coordinates: x' = (x + 1/2) * 112 / W - 1/2, likewise y. A video must decode to at least
NumberOfFrames frames, with no slack; extra frames are kept.

Masks, the EchoNet way. In VolumeTracings.csv each traced frame is a long-axis row followed by
disc rows. The long-axis row is dropped; the polygon is the discs' left endpoints (X1, Y1) from
top to bottom followed by their right endpoints (X2, Y2) from bottom to top. Coordinates are
float pixels, pixel (row i, column j) being the point (x, y) = (j, i). Instead of rounding them
to whole pixels (as the reference loader does), the polygon is filled with `cv2.fillPoly` on a
16x finer grid with 4 fractional bits per vertex (`shift=4`), and a pixel is in the mask when at
least half of it is covered. Mask areas then exceed polygon areas by about 0.5 % on average
(OpenCV also fills the fine pixels its edges touch), against about 5 % for filling the polygon
at 112x112.

Of the traced frames of a video, the one with the largest mask area is the large (ED) frame and
the one with the smallest the small (ES) frame, whatever the CSV order (equal areas keep the
CSV order). The reference EchoNet loader instead assumes that the CSV lists ES first and ED
last; the build summary counts the videos where the areas disagree with that. A traced frame
needs a long-axis row and at least two disc rows, a non-empty mask, and must lie inside the
video; a video with fewer than two such frames keeps its EF example with has_tracings false.

Problems. Malformed CSVs (missing columns, unparsable numbers, unknown splits, duplicate
FileNames) raise `EchonetDataError` (a `ValueError`) naming the file, line and column. FileList
rows whose video file is missing raise one `EchonetDataError` listing all of them, unless the
builder is made with `skip_missing_videos=True`, which leaves them out. A video that cannot be
decoded or is truncated (fewer frames than NumberOfFrames) is logged by name and left out,
never stored short. Tracings of files not in FileList are ignored. Without VolumeTracings.csv
every example has has_tracings false. All of these are counted in a build summary, logged when
generation ends and stored in `builder.info.metadata["build_summary"]`.
"""

import collections
import dataclasses
import logging
import math
import os
import textwrap
from collections.abc import Iterator

import cv2
import numpy as np
import tensorflow_datasets as tfds
from medjax_datasets.common import (
    SummaryReport,
    check_file_name,
    code_path_property,
    counted_splits,
    drop_missing_videos,
    finish_build,
    float_or_nan,
    group_by_split,
    read_csv_dicts,
    read_video_or_skip,
    resize_frames,
    strip_extension,
    video_feature,
)

# The columns echo DICOM conversion writes are the ones this builder reads.
from medjax.preprocess.echo_dicom import FILE_LIST_COLUMNS

FILE_LIST = "FileList.csv"
VOLUME_TRACINGS = "VolumeTracings.csv"
VIDEOS_DIR = "Videos"
TRACING_COLUMNS = ("FileName", "X1", "Y1", "X2", "Y2", "Frame")
SPLIT_NAMES = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
FRAME_SIZE = 112
MIN_DISCS = 2
POLYGON_SHIFT = 4  # Fractional bits of the polygon vertices given to cv2.fillPoly.
MASK_SUPERSAMPLING = 16  # Masks are drawn at 16x resolution, then averaged over 16x16 blocks.

_DESCRIPTION = """\
EchoNet-Dynamic apical four-chamber echocardiogram videos (112x112) with ejection fraction,
end-diastolic and end-systolic volumes, and expert left-ventricle tracings at one end-diastolic
and one end-systolic frame, rasterised to masks.
"""

logger = logging.getLogger(__name__)


class EchonetDataError(ValueError):
    """The raw EchoNet data is inconsistent; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class VideoRecord:
    """One FileList row."""

    filename: str  # Without ".avi".
    ef: float
    esv: float
    edv: float
    fps: float
    num_frames: int
    split: str  # TFDS split name.
    path: str


# Traced frames of one video in CSV order: frame index -> rows (X1, Y1, X2, Y2).
Tracings = dict[int, list[tuple[float, float, float, float]]]


@dataclasses.dataclass
class BuildSummary(SummaryReport):
    """What a build kept, left out and corrected; see the module docstring."""

    TITLE = "EchoNet-Dynamic build summary:"

    examples: dict[str, int] = dataclasses.field(default_factory=dict)
    missing_videos: list[str] = dataclasses.field(default_factory=list)
    unreadable_videos: list[str] = dataclasses.field(default_factory=list)
    untraced_videos: list[str] = dataclasses.field(default_factory=list)
    area_order_disagreements: list[str] = dataclasses.field(default_factory=list)
    dropped_traced_frames: list[str] = dataclasses.field(default_factory=list)
    ignored_tracing_files: list[str] = dataclasses.field(default_factory=list)
    resized_videos: list[str] = dataclasses.field(default_factory=list)
    unlabelled_videos: int = 0

    def head_lines(self) -> list[str]:
        return [
            *super().head_lines(),
            f"  videos without EF (unlabelled, kept): {self.unlabelled_videos}",
        ]

    def named_lists(self) -> list[tuple[str, list[str], bool]]:
        return [
            ("missing video files (skipped)", self.missing_videos, True),
            ("unreadable or truncated videos (skipped)", self.unreadable_videos, True),
            ("videos with fewer than two usable traced frames (kept, no masks)",
             self.untraced_videos, True),
            ("videos whose ED/ES by mask area disagree with the CSV order (ES first)",
             self.area_order_disagreements, False),
            ("traced frames dropped (too few rows, empty, or outside the video)",
             self.dropped_traced_frames, True),
            ("VolumeTracings files not in FileList (ignored)", self.ignored_tracing_files, True),
            ("videos resized to 112x112", self.resized_videos, False),
        ]  # fmt: skip


def _read_csv(path: str, required: tuple[str, ...]) -> Iterator[tuple[dict[str, str], int]]:
    """Rows of a CSV as stripped dicts with their line numbers, after checking the header."""
    return read_csv_dicts(
        path, required, EchonetDataError, header_rule=f"must be {','.join(required)}"
    )


def _number(row: dict[str, str], column: str, line: int, path: str, *, optional=False) -> float:
    """A finite float from a CSV cell; NaN for an empty optional one."""
    value = row[column]
    if not value and optional:
        return math.nan
    number = float_or_nan(value)
    if not math.isfinite(number):
        empty = " or leave it empty if unknown" if optional else ""
        raise EchonetDataError(
            f"{path}, line {line}, column {column}: {value!r} is not a number; fix it{empty}."
        )
    return number


def _integer(row: dict[str, str], column: str, line: int, path: str, *, minimum: int) -> int:
    number = _number(row, column, line, path)
    if number != int(number) or number < minimum:
        raise EchonetDataError(
            f"{path}, line {line}, column {column}: {row[column]!r} is not an integer "
            f">= {minimum}; fix it."
        )
    return int(number)


def read_file_list(manual_dir: str) -> list[VideoRecord]:
    """Parses FileList.csv (see module docstring); does not look at the video files."""
    path = os.path.join(manual_dir, FILE_LIST)
    if not os.path.isfile(path):
        raise EchonetDataError(
            f"{path} does not exist.\n"
            f"{textwrap.dedent(EchonetDynamic.MANUAL_DOWNLOAD_INSTRUCTIONS)}"
        )
    records, seen = [], {}
    for row, line in _read_csv(path, FILE_LIST_COLUMNS):
        filename = strip_extension(row["FileName"], ".avi")
        if not filename:
            raise EchonetDataError(f"{path}, line {line}, column FileName: empty file name.")
        check_file_name(
            filename,
            path=path,
            line=line,
            column="FileName",
            folder=VIDEOS_DIR,
            error=EchonetDataError,
        )
        if filename in seen:
            raise EchonetDataError(
                f"{path}, line {line}, column FileName: {filename!r} already appears on line "
                f"{seen[filename]}; file names must be unique."
            )
        seen[filename] = line
        split = SPLIT_NAMES.get(row["Split"].lower())
        if split is None:
            raise EchonetDataError(
                f"{path}, line {line}, column Split: {row['Split']!r} is not one of "
                "TRAIN, VAL, TEST (any case)."
            )
        fps = _number(row, "FPS", line, path, optional=True)
        if fps <= 0:
            raise EchonetDataError(
                f"{path}, line {line}, column FPS: {row['FPS']!r} must be positive; fix it or "
                "leave it empty to use the video's own frame rate."
            )
        for column in ("FrameHeight", "FrameWidth"):  # Checked, not used: frames tell the size.
            if row[column]:
                _integer(row, column, line, path, minimum=1)
        records.append(
            VideoRecord(
                filename=filename,
                ef=_number(row, "EF", line, path, optional=True),
                esv=_number(row, "ESV", line, path, optional=True),
                edv=_number(row, "EDV", line, path, optional=True),
                fps=fps,
                num_frames=_integer(row, "NumberOfFrames", line, path, minimum=1),
                split=split,
                path=os.path.join(manual_dir, VIDEOS_DIR, f"{filename}.avi"),
            )
        )
    return records


def read_volume_tracings(manual_dir: str) -> dict[str, Tracings] | None:
    """Parses VolumeTracings.csv into {FileName without .avi: {frame: rows}}, in CSV order.

    Returns None when the file does not exist.
    """
    path = os.path.join(manual_dir, VOLUME_TRACINGS)
    if not os.path.isfile(path):
        return None
    tracings: dict[str, Tracings] = collections.defaultdict(dict)
    for row, line in _read_csv(path, TRACING_COLUMNS):
        filename = strip_extension(row["FileName"], ".avi")
        if not filename:
            raise EchonetDataError(f"{path}, line {line}, column FileName: empty file name.")
        frame = _integer(row, "Frame", line, path, minimum=0)
        xy = tuple(_number(row, c, line, path) for c in ("X1", "Y1", "X2", "Y2"))
        tracings[filename].setdefault(frame, []).append(xy)
    return dict(tracings)


def tracing_mask(rows, scale_x: float = 1.0, scale_y: float = 1.0) -> np.ndarray | None:
    """The (112, 112) uint8 0/1 LV mask of one traced frame, or None with too few disc rows.

    `rows` are (X1, Y1, X2, Y2): the long axis, then the discs; coordinates are scaled by
    (scale_x, scale_y) about pixel centres first (see module docstring).
    """
    discs = np.asarray(rows, dtype=np.float64)[1:]
    if len(discs) < MIN_DISCS:
        return None
    polygon = np.concatenate([discs[:, :2], discs[::-1, 2:]])
    # Pixel centres at integer coordinates, in the supersampled grid: x_fine = (x + 1/2) S - 1/2.
    fine = (polygon + 0.5) * np.array([scale_x, scale_y]) * MASK_SUPERSAMPLING - 0.5
    # Far-away points only need to stay far away; clipping keeps them inside int32 after shift.
    size = FRAME_SIZE * MASK_SUPERSAMPLING
    fine = np.clip(fine, -4 * size, 5 * size)
    vertices = np.round(fine * (1 << POLYGON_SHIFT)).astype(np.int32)
    coverage = np.zeros((size, size), np.float32)
    cv2.fillPoly(coverage, [vertices], 1.0, lineType=cv2.LINE_8, shift=POLYGON_SHIFT)
    coverage = cv2.resize(coverage, (FRAME_SIZE, FRAME_SIZE), interpolation=cv2.INTER_AREA)
    return (coverage >= 0.5).astype(np.uint8)


class EchonetDynamic(tfds.core.GeneratorBasedBuilder):
    """EchoNet-Dynamic: echocardiogram videos, EF, EDV, ESV and ED/ES left-ventricle masks."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download EchoNet-Dynamic (https://echonet.github.io/dynamic/, after accepting its research
    use agreement) and put it, unchanged, in the manual directory as
      FileList.csv        header FileName,EF,ESV,EDV,FrameHeight,FrameWidth,FPS,
                          NumberOfFrames,Split (FileName without .avi; Split TRAIN, VAL or
                          TEST; EF, ESV, EDV may be empty for unlabelled videos)
      VolumeTracings.csv  header FileName,X1,Y1,X2,Y2,Frame (FileName with .avi): per traced
                          frame a long-axis row, then the disc rows (optional file)
      Videos/<FileName>.avi
    and build with `python -m medjax.data build echonet_dynamic --manual_dir=DIR --data_dir=OUT`
    (add --skip_missing_videos to build without the FileList rows whose video is missing).
    """

    def __init__(self, *, skip_missing_videos: bool = False, **kwargs):
        """Args: skip_missing_videos: leave out FileList rows without a video instead of
        raising; other arguments go to `tfds.core.GeneratorBasedBuilder`."""
        self._skip_missing_videos = skip_missing_videos
        self.build_summary: BuildSummary | None = None
        super().__init__(**kwargs)

    code_path = code_path_property(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        def mask() -> tfds.features.Tensor:
            return tfds.features.Tensor(
                shape=(FRAME_SIZE, FRAME_SIZE, 1),
                dtype=np.uint8,
                encoding=tfds.features.Encoding.ZLIB,
            )

        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "filename": tfds.features.Text(),
                    "video": video_feature(FRAME_SIZE),
                    "fps": tfds.features.Scalar(dtype=np.float32),
                    "ef": tfds.features.Scalar(dtype=np.float32),
                    "edv": tfds.features.Scalar(dtype=np.float32),
                    "esv": tfds.features.Scalar(dtype=np.float32),
                    "large_frame": tfds.features.Scalar(dtype=np.int32),
                    "small_frame": tfds.features.Scalar(dtype=np.int32),
                    "large_mask": mask(),
                    "small_mask": mask(),
                    "has_tracings": tfds.features.Scalar(dtype=np.bool_),
                    "split": tfds.features.Text(),
                }
            ),
            metadata=tfds.core.MetadataDict(),
            homepage="https://echonet.github.io/dynamic/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        records = read_file_list(manual_dir)
        if not records:
            raise EchonetDataError(f"{os.path.join(manual_dir, FILE_LIST)} lists no videos.")
        summary = BuildSummary()
        records, missing = drop_missing_videos(
            records,
            lambda r: r.path,
            listed_in=os.path.join(manual_dir, FILE_LIST),
            videos_dir=os.path.join(manual_dir, VIDEOS_DIR),
            skip=self._skip_missing_videos,
            error=EchonetDataError,
        )
        summary.missing_videos = [r.filename for r in missing]
        if not records:
            raise EchonetDataError(f"None of the videos listed in {FILE_LIST} exist.")

        tracings = read_volume_tracings(manual_dir)
        if tracings is None:
            logger.warning(
                "%s does not exist: no LV masks; every example has has_tracings false.",
                os.path.join(manual_dir, VOLUME_TRACINGS),
            )
            tracings = {}
        listed = {r.filename for r in records} | set(summary.missing_videos)
        summary.ignored_tracing_files = sorted(set(tracings) - listed)
        summary.unlabelled_videos = sum(math.isnan(r.ef) for r in records)

        return counted_splits(
            group_by_split(records, lambda r: r.split),
            lambda name, split: self._generate_examples(split, tracings, summary),
            summary.examples,
            error=EchonetDataError,
            unit="video",
            on_done=lambda: finish_build(self, summary, logger),
        )

    def _generate_examples(
        self,
        records: list[VideoRecord],
        tracings: dict[str, Tracings],
        summary: BuildSummary,
    ) -> Iterator[tuple[str, dict]]:
        for record in records:
            decoded = read_video_or_skip(
                record.path, record.filename, record.num_frames, summary.unreadable_videos, logger
            )
            if decoded is None:
                continue
            video, container_fps = decoded
            height, width = video.shape[1:]
            if (height, width) != (FRAME_SIZE, FRAME_SIZE):
                video = resize_frames(video, FRAME_SIZE)
                summary.resized_videos.append(record.filename)
            masks = self._masks(
                record.filename,
                tracings.get(record.filename, {}),
                len(video),
                (FRAME_SIZE / width, FRAME_SIZE / height),
                summary,
            )
            fps = record.fps if math.isfinite(record.fps) else container_fps
            empty = np.zeros((FRAME_SIZE, FRAME_SIZE, 1), np.uint8)
            (large_frame, large_mask), (small_frame, small_mask) = masks or ((-1, empty),) * 2
            yield (
                record.filename,
                {
                    "filename": record.filename,
                    "video": video[..., None],
                    "fps": fps,
                    "ef": record.ef,
                    "edv": record.edv,
                    "esv": record.esv,
                    "large_frame": large_frame,
                    "small_frame": small_frame,
                    "large_mask": large_mask,
                    "small_mask": small_mask,
                    "has_tracings": masks is not None,
                    "split": record.split,
                },
            )

    @staticmethod
    def _masks(
        filename: str,
        traced: Tracings,
        num_frames: int,
        scale: tuple[float, float],
        summary: BuildSummary,
    ) -> tuple[tuple[int, np.ndarray], tuple[int, np.ndarray]] | None:
        """((large frame, mask), (small frame, mask)) by mask area, or None if untraced."""
        usable = []  # (frame, mask, area) in CSV order.
        for frame, rows in traced.items():
            mask = tracing_mask(rows, *scale) if frame < num_frames else None
            if mask is None or not mask.any():
                summary.dropped_traced_frames.append(f"{filename}@{frame}")
            else:
                usable.append((frame, mask[..., None], int(mask.sum())))
        if len(usable) < 2:
            summary.untraced_videos.append(filename)
            return None
        # max/min return the first of equal areas, so ties keep the CSV order (ES first).
        large = max(reversed(usable), key=lambda item: item[2])
        small = min(usable, key=lambda item: item[2])
        if (large[0], small[0]) != (usable[-1][0], usable[0][0]):
            summary.area_order_disagreements.append(filename)
        return (large[0], large[1]), (small[0], small[1])
