"""TFDS builder for time-lapse embryo videos (Gomez et al. 2022 layout) with clinical outcomes.

Reads the public dataset's layout, plus an outcome file a clinic adds, from the manual
directory (see `MANUAL_DOWNLOAD_INSTRUCTIONS`) and writes ArrayRecord files; no TensorFlow is
needed to build or read it. Frames are decoded, localised and cropped once, here, and stored
as a raw-bytes `Tensor`.

Features of one example (one embryo video):

    video_id      string             the video folder's name, e.g. "AA83-7"
    patient_id    string             from outcomes.csv (see Patients below)
    frames        (T, S, S, 1) uint8 embryo crops, S = frame_size, T <= max_frames, time order
    frame_index   (T,) int32         the frames' numbers k (file names ...RUN<k>.jpeg)
    hours         (T,) float32       time since insemination, from the time-elapsed file
    phase         (T,) int32         index into PHASES of the annotated phase; -1 unannotated
    outcome       int32              index into OUTCOMES (liveborn, no_implantation,
                                     miscarriage); -1 unknown (only with allow_unlabelled)
    circle        (3,) float32       zona centre x, y and radius in the original frame's pixels
    localization  string             how the circle was found: hough, contour or centre

Build options (`BUILD_OPTIONS`, defaults in `DEFAULT_OPTIONS`): frame_size, max_frames,
max_hours, min_frames, allow_unlabelled, given as `medjax.data.build(..., frame_size=96)` or
`python -m medjax.data build embryo_timelapse ... --option frame_size=96`.

Read back with `builder.as_data_source(split)`: strings come back as `bytes`, scalars as Python
numbers, tensors as numpy arrays. Frame tensors have a dynamic shape, so builds with different
`frame_size` read back alike.

Layout. The public set has 704 videos of 500x500 gray JPEG frames, one every 10-20 minutes
over 5-7 days, with the time and well number burned in. `embryo_dataset/<video>/*RUN<k>.jpeg`
holds the central focal plane (the public set's
six other planes, `embryo_dataset_F<z>`, are not read); files directly in the video folder
whose names end in RUN<k>.jpeg or .jpg are frames, k sorted numerically (RUN2 before RUN10);
other files and sub-folders (some public videos hold a duplicate sub-folder) are ignored and
counted. `embryo_dataset_annotations/<video>_phases.csv` has no header and one row
`phase,first_frame,last_frame` per phase (frame numbers k; later rows win where ranges
overlap). `embryo_dataset_time_elapsed/<video>_timeElapsed.csv` has rows `frame_index,time`
(hours); the public files start with that header line, and a file without it is read the
same way. `outcomes.csv` has the header `video,patient_id,outcome` and optionally `split`;
outcome is liveborn, no_implantation or miscarriage (any case; spaces and hyphens read as
underscores) or empty when unknown.

Frames. Of the frames with a time no later than `max_hours` (default 140: the project's first
140 h), up to `max_frames` (default 64) are chosen uniformly in time: for each of max_frames
evenly spaced times from the first to the last such frame, the nearest frame, each frame
once (so T can be a little below max_frames when frames are irregular). All frames of a
video are taken when there are no more. Frames are localised and cropped with
`medjax.preprocess.embryo`: the burned-in text banner is removed, the zona pellucida found on
`LOCALIZE_FRAMES` frames spread over the chosen ones (CLAHE + Hough circle, contour
fallback, frame centre as the last resort), and all frames cropped with their median circle
(the embryo barely moves; per-frame crops would jitter) to a square of side 2 r 1.15, resized
to `frame_size` (default 64) with INTER_AREA. CLAHE is used only to find the embryo: the
stored crops keep the frames' gray levels. A video keeping fewer than `min_frames` (default
16) frames is reported and left out.

Outcomes and patients. Outcomes are what a clinic adds; the public dataset has none. Without
outcomes.csv the build stops and says so, unless the builder is made with
`allow_unlabelled=True` (for the frame embedder, trained without labels): then every video
has outcome -1. Videos without an outcome (no row, or an empty outcome cell) are counted and
left out, or kept with outcome -1 under allow_unlabelled. A video's patient is its row's
patient_id; for a video without a row it is the video name up to its last "-" (the public
names are `<patient>-<embryo>`, e.g. AA83-7 -> AA83), or the whole name when it has none.

Splits are by patient. A `split` column (train, validation or val, test) is honoured, and a
patient whose rows name two splits is an error. Patients without an explicit split are shuffled
deterministically (ordered by a SHA-256 of `SPLIT_SEED` and the patient id, which needs no RNG
and no numpy version) and cut about 70/15/15 % train/validation/test, validation and test
getting at least one patient each when there are three or more such patients. Empty splits are
left out.

Problems. A truncated JPEG (one that does not end with the FFD9 end-of-image marker, checked
before decoding: some OpenCV builds decode such a file partially with only a warning) or an undecodable one is reported by name
and left out; so are frames of another size than the video's others, and frames without a
time. A video without a time-elapsed file, or whose times decrease with the frame number, or
with two files for one frame number, is reported and left out (time matters for the
outcome); a video without a phases file is kept with all phases -1. A malformed CSV (wrong
column count, unparsable number, unknown phase name, first frame after last, duplicate frame
or video row) and an unknown outcome string raise `EmbryoDataError` (a `ValueError`) naming
the file and line (and, for outcomes, the allowed values). Rows of outcomes.csv whose video
folder does not exist are counted and ignored. All of these are counted in a build summary,
logged when generation ends and stored in `builder.info.metadata["build_summary"]`; the build
options are stored in `builder.info.metadata["build_options"]`.
"""

import collections
import dataclasses
import logging
import math
import os
import re
import textwrap
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from medjax_datasets.common import (
    SummaryReport,
    code_path_property,
    counted_splits,
    finish_build,
    float_or_nan,
    group_by_split,
    read_csv_rows,
    split_patients_by_hash,
    video_feature,
)

from medjax.preprocess.embryo import LOCALIZE_FRAMES, crop_video
from medjax.preprocess.image import ImageReadError, read_grayscale

FRAMES_DIR = "embryo_dataset"
ANNOTATIONS_DIR = "embryo_dataset_annotations"
TIMES_DIR = "embryo_dataset_time_elapsed"
OUTCOMES_FILE = "outcomes.csv"
OUTCOME_COLUMNS = ("video", "patient_id", "outcome")
PHASES = (
    "tPB2", "tPNa", "tPNf", "t2", "t3", "t4", "t5", "t6", "t7", "t8", "t9+",
    "tM", "tSB", "tB", "tEB", "tHB",
)  # fmt: skip
OUTCOMES = ("liveborn", "no_implantation", "miscarriage")
SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
SPLIT_FRACTIONS = {"validation": 0.15, "test": 0.15}  # The rest is train.
SPLIT_SEED = "embryo_timelapse/patient-split/v1"
FRAME_PATTERN = re.compile(r"RUN(\d+)\.jpe?g$", re.IGNORECASE)
DEFAULT_OPTIONS = {
    "frame_size": 64,
    "max_frames": 64,
    "max_hours": 140.0,
    "min_frames": 16,
    "allow_unlabelled": False,
}
BUILD_OPTIONS = tuple(DEFAULT_OPTIONS)

_DESCRIPTION = """\
Time-lapse videos of developing human embryos (central focal plane), cropped to the embryo,
with the time of each frame, the annotated developmental phase of each frame (16 phases,
tPB2 to tHB) and the clinical outcome of the embryo (liveborn, no implantation, miscarriage).
Split by patient into train/validation/test.
"""

logger = logging.getLogger(__name__)


class EmbryoDataError(ValueError):
    """The raw embryo data is inconsistent; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class OutcomeRow:
    """One outcomes.csv row."""

    patient_id: str
    outcome: int  # Index into OUTCOMES, -1 when the cell is empty.
    split: str | None  # TFDS split name from the optional split column.
    line: int


@dataclasses.dataclass
class VideoPlan:
    """One video as it will be built: the chosen frames, before decoding."""

    video_id: str
    patient_id: str
    outcome: int
    paths: list[str]
    frame_index: np.ndarray  # (T,) int32
    hours: np.ndarray  # (T,) float32
    phase: np.ndarray  # (T,) int32
    split: str = "train"


@dataclasses.dataclass
class BuildSummary(SummaryReport):
    """What a build kept and left out; see the module docstring."""

    TITLE = "Embryo time-lapse build summary:"

    examples: dict[str, int] = dataclasses.field(default_factory=dict)
    videos_found: int = 0
    unlabelled_videos: list[str] = dataclasses.field(default_factory=list)
    unlabelled_kept: bool = False
    outcome_rows_without_video: list[str] = dataclasses.field(default_factory=list)
    missing_time_files: list[str] = dataclasses.field(default_factory=list)
    decreasing_times: list[str] = dataclasses.field(default_factory=list)
    duplicate_frame_numbers: list[str] = dataclasses.field(default_factory=list)
    too_few_frames: list[str] = dataclasses.field(default_factory=list)
    truncated_frames: list[str] = dataclasses.field(default_factory=list)
    unreadable_frames: list[str] = dataclasses.field(default_factory=list)
    odd_size_frames: list[str] = dataclasses.field(default_factory=list)
    frames_without_time: list[str] = dataclasses.field(default_factory=list)
    unannotated_videos: list[str] = dataclasses.field(default_factory=list)
    ignored_files: list[str] = dataclasses.field(default_factory=list)
    localization: dict[str, int] = dataclasses.field(default_factory=dict)
    centre_fallback_videos: list[str] = dataclasses.field(default_factory=list)

    def head_lines(self) -> list[str]:
        (examples,) = super().head_lines()
        return [
            f"  video folders found: {self.videos_found}",
            examples,
            "  localisation methods: "
            + ", ".join(f"{k}={v}" for k, v in sorted(self.localization.items())),
        ]

    def named_lists(self) -> list[tuple[str, list[str], bool]]:
        unlabelled = "kept with outcome -1" if self.unlabelled_kept else "left out"
        return [
            (f"videos without an outcome ({unlabelled})", self.unlabelled_videos, False),
            ("outcomes.csv rows without a video folder (ignored)",
             self.outcome_rows_without_video, False),
            ("videos without a time-elapsed file (skipped)", self.missing_time_files, True),
            ("videos whose times decrease with the frame number (skipped)",
             self.decreasing_times, True),
            ("videos with two files for one frame number (skipped)",
             self.duplicate_frame_numbers, True),
            ("videos with too few frames (skipped)", self.too_few_frames, True),
            ("truncated JPEG frames (skipped)", self.truncated_frames, True),
            ("undecodable frames (skipped)", self.unreadable_frames, True),
            ("frames of another size than their video (skipped)", self.odd_size_frames, True),
            ("videos with frames without a time (those frames skipped)",
             self.frames_without_time, False),
            ("videos without a phases file (kept, phases -1)", self.unannotated_videos, False),
            ("files ignored in video folders", self.ignored_files, False),
            ("videos where no embryo was found (cropped at the frame centre)",
             self.centre_fallback_videos, True),
        ]  # fmt: skip


def _rows(path: str) -> Iterator[tuple[list[str], int]]:
    """Non-empty CSV rows as stripped cells with their line numbers."""
    return read_csv_rows(path, EmbryoDataError)


def _int(value: str, path: str, line: int, what: str) -> int:
    number = float_or_nan(value)
    if not math.isfinite(number) or number != int(number) or number < 0:
        raise EmbryoDataError(
            f"{path}, line {line}: {what} {value!r} is not a whole number >= 0; fix the file."
        )
    return int(number)


def read_phases(path: str) -> list[tuple[int, int, int]]:
    """Parses a `<video>_phases.csv` into (phase index, first frame, last frame) rows.

    Raises:
      EmbryoDataError: naming the file and line of a malformed row or unknown phase.
    """
    rows = []
    for cells, line in _rows(path):
        if len(cells) != 3:
            raise EmbryoDataError(
                f"{path}, line {line}: expected 3 values phase,first_frame,last_frame, "
                f"got {len(cells)} ({','.join(cells)!r}); fix the file."
            )
        name, first, last = cells
        if name not in PHASES:
            if not rows and name.lower() == "phase":  # A header line.
                continue
            raise EmbryoDataError(
                f"{path}, line {line}: unknown phase {name!r}; phases are {', '.join(PHASES)}."
            )
        first = _int(first, path, line, "first frame")
        last = _int(last, path, line, "last frame")
        if first > last:
            raise EmbryoDataError(
                f"{path}, line {line}: phase {name} starts at frame {first}, after its last "
                f"frame {last}; fix the file."
            )
        rows.append((PHASES.index(name), first, last))
    return rows


def read_times(path: str) -> dict[int, float]:
    """Parses a `<video>_timeElapsed.csv` into {frame number: hours}; a header line is optional.

    Raises:
      EmbryoDataError: naming the file and line of a malformed row or duplicate frame number.
    """
    times: dict[int, float] = {}
    lines: dict[int, int] = {}
    first = True
    for cells, line in _rows(path):
        if len(cells) != 2:
            raise EmbryoDataError(
                f"{path}, line {line}: expected 2 values frame_index,time, got {len(cells)} "
                f"({','.join(cells)!r}); fix the file."
            )
        if first and not _is_number(cells[0]) and not _is_number(cells[1]):
            first = False
            continue  # The header line.
        first = False
        frame = _int(cells[0], path, line, "frame_index")
        hours = float_or_nan(cells[1])
        if not math.isfinite(hours):
            raise EmbryoDataError(
                f"{path}, line {line}: time {cells[1]!r} is not a number of hours; fix the file."
            )
        if frame in times:
            raise EmbryoDataError(
                f"{path}, line {line}: frame {frame} already has a time on line {lines[frame]}; "
                "each frame may appear once."
            )
        times[frame], lines[frame] = hours, line
    return times


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _outcome_index(value: str, path: str, line: int) -> int:
    key = re.sub(r"[\s\-]+", "_", value.strip().lower())
    if not key:
        return -1
    if key not in OUTCOMES:
        raise EmbryoDataError(
            f"{path}, line {line}: unknown outcome {value!r}; use one of "
            f"{', '.join(OUTCOMES)}, or leave it empty if unknown."
        )
    return OUTCOMES.index(key)


def read_outcomes(manual_dir: str) -> dict[str, OutcomeRow] | None:
    """Parses outcomes.csv into {video: OutcomeRow}; None when the file does not exist.

    Raises:
      EmbryoDataError: naming the file and line of a malformed row, an unknown outcome or
        split, or a video listed twice.
    """
    path = os.path.join(manual_dir, OUTCOMES_FILE)
    if not os.path.isfile(path):
        return None
    rows = _rows(path)
    header, _ = next(rows, ([], 1))
    missing = [c for c in OUTCOME_COLUMNS if c not in header]
    if missing:
        raise EmbryoDataError(
            f"{path}, line 1: the header lacks {', '.join(missing)}; it must be "
            f"{','.join(OUTCOME_COLUMNS)} (optionally ,split), found {','.join(header)!r}."
        )
    has_split = "split" in header
    outcomes: dict[str, OutcomeRow] = {}
    for cells, line in rows:
        if len(cells) != len(header):
            raise EmbryoDataError(
                f"{path}, line {line}: {len(cells)} values for {len(header)} header columns "
                f"({','.join(header)}); fix the row."
            )
        row = dict(zip(header, cells))
        video, patient = row["video"], row["patient_id"]
        if not video or not patient:
            raise EmbryoDataError(
                f"{path}, line {line}: video and patient_id must not be empty; fix the row."
            )
        if video in outcomes:
            raise EmbryoDataError(
                f"{path}, line {line}: video {video!r} is already listed on line "
                f"{outcomes[video].line}; list each video once."
            )
        split = None
        if has_split:
            split = SPLIT_NAMES.get(row["split"].lower())
            if split is None:
                raise EmbryoDataError(
                    f"{path}, line {line}: unknown split {row['split']!r}; use train, "
                    "validation (or val) or test."
                )
        outcomes[video] = OutcomeRow(
            patient, _outcome_index(row["outcome"], path, line), split, line
        )
    return outcomes


def patient_of_video(video_id: str) -> str:
    """The patient of a video without an outcomes.csv row: the name up to its last '-'."""
    head, dash, _ = video_id.rpartition("-")
    return head if dash and head else video_id


def split_patients(patients: Sequence[str], explicit: dict[str, str]) -> dict[str, str]:
    """Maps each patient to a split: `explicit` ones keep theirs, the rest are cut 70/15/15."""
    free = {p for p in patients if p not in explicit}
    if len(free) >= 3:
        assignment = split_patients_by_hash(free, SPLIT_SEED, tuple(SPLIT_FRACTIONS.items()))
    else:
        assignment = {p: "train" for p in free}
    assignment.update({p: explicit[p] for p in patients if p in explicit})
    return assignment


def jpeg_is_complete(path: str) -> bool:
    """Whether a JPEG file starts with the SOI and ends with the EOI marker (FFD8 ... FFD9).

    Trailing zero bytes and whitespace, which some writers pad files with, are allowed.
    """
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 64))
        tail = f.read()
    return head == b"\xff\xd8" and tail.rstrip(b"\x00\r\n\t ").endswith(b"\xff\xd9")


def select_frames(hours: np.ndarray, max_frames: int) -> np.ndarray:
    """Positions of up to `max_frames` frames uniformly in time (see module docstring).

    Args:
      hours: (N,) non-decreasing times of the candidate frames.
      max_frames: how many to choose at most.

    Returns:
      Sorted unique positions into `hours`.
    """
    if len(hours) <= max_frames:
        return np.arange(len(hours))
    targets = np.linspace(hours[0], hours[-1], max_frames)
    right = np.clip(np.searchsorted(hours, targets), 1, len(hours) - 1)
    left = right - 1
    nearest = np.where(targets - hours[left] <= hours[right] - targets, left, right)
    return np.unique(nearest)


def list_frames(folder: str) -> tuple[dict[int, list[str]], list[str]]:
    """({frame number: [file paths]}, ignored file names) of one video folder."""
    frames: dict[int, list[str]] = collections.defaultdict(list)
    ignored = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        match = FRAME_PATTERN.search(name)
        if name.startswith(".") or not os.path.isfile(path) or match is None:
            ignored.append(name)
            continue
        frames[int(match.group(1))].append(path)
    return dict(frames), ignored


class EmbryoTimelapse(tfds.core.GeneratorBasedBuilder):
    """Time-lapse embryo videos: embryo crops, hours, per-frame phases, clinical outcome."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download the time-lapse embryo dataset of Gomez et al. 2022 (Zenodo, "Towards deep
    learning-powered IVF: a large public benchmark for morphokinetic parameter prediction")
    and put, unchanged, in the manual directory:
      embryo_dataset/<video>/*RUN<k>.jpeg             central focal plane, frame k
      embryo_dataset_annotations/<video>_phases.csv    phase,first_frame,last_frame (no header)
      embryo_dataset_time_elapsed/<video>_timeElapsed.csv   frame_index,time (hours)
    and add the clinic's outcomes:
      outcomes.csv   header video,patient_id,outcome[,split]; outcome liveborn,
                     no_implantation, miscarriage, or empty if unknown
    Build with `python -m medjax.data build embryo_timelapse --manual_dir=DIR --data_dir=OUT`.
    Without outcomes.csv, build with allow_unlabelled=True (outcomes -1, for the frame
    embedder trained without labels).
    """

    def __init__(
        self,
        *,
        frame_size: int = DEFAULT_OPTIONS["frame_size"],
        max_frames: int = DEFAULT_OPTIONS["max_frames"],
        max_hours: float = DEFAULT_OPTIONS["max_hours"],
        min_frames: int = DEFAULT_OPTIONS["min_frames"],
        allow_unlabelled: bool = DEFAULT_OPTIONS["allow_unlabelled"],
        **kwargs,
    ):
        """Args: the build options, see the module docstring; other arguments go to
        `tfds.core.GeneratorBasedBuilder`.

        Raises:
          EmbryoDataError: an option is out of range.
        """
        self.options = {
            "frame_size": int(frame_size),
            "max_frames": int(max_frames),
            "max_hours": float(max_hours),
            "min_frames": int(min_frames),
            "allow_unlabelled": bool(allow_unlabelled),
        }
        if frame_size < 8 or min_frames < 1 or max_frames < min_frames or not max_hours > 0:
            raise EmbryoDataError(
                f"Build options out of range: frame_size={frame_size} (>= 8), "
                f"min_frames={min_frames} (>= 1), max_frames={max_frames} (>= min_frames), "
                f"max_hours={max_hours} (> 0)."
            )
        self.build_summary: BuildSummary | None = None
        super().__init__(**kwargs)

    code_path = code_path_property(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "video_id": tfds.features.Text(),
                    "patient_id": tfds.features.Text(),
                    "frames": video_feature(),
                    "frame_index": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "hours": tfds.features.Tensor(shape=(None,), dtype=np.float32),
                    "phase": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "outcome": tfds.features.Scalar(dtype=np.int32),
                    "circle": tfds.features.Tensor(shape=(3,), dtype=np.float32),
                    "localization": tfds.features.Text(),
                }
            ),
            metadata=tfds.core.MetadataDict(),
            homepage="https://doi.org/10.1016/j.dib.2022.108258",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        plans, summary = self.plan(manual_dir)
        self.info.metadata["build_options"] = dict(self.options)
        return counted_splits(
            group_by_split(plans, lambda p: p.split),
            lambda name, split: self._generate_examples(split, summary),
            summary.examples,
            error=EmbryoDataError,
            unit="video",
            verb="built",
            on_done=lambda: finish_build(self, summary, logger),
        )

    def plan(self, manual_dir: str) -> tuple[list[VideoPlan], BuildSummary]:
        """Reads the CSVs and lists the frames of every video, without decoding any frame.

        Returns:
          (the videos to build, with their splits; the summary so far).

        Raises:
          EmbryoDataError: see the module docstring.
        """
        frames_dir = os.path.join(manual_dir, FRAMES_DIR)
        instructions = textwrap.dedent(self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        if not os.path.isdir(frames_dir):
            raise EmbryoDataError(f"{frames_dir} does not exist.\n{instructions}")
        videos = sorted(
            v
            for v in os.listdir(frames_dir)
            if not v.startswith(".") and os.path.isdir(os.path.join(frames_dir, v))
        )
        if not videos:
            raise EmbryoDataError(f"{frames_dir} holds no video folders.\n{instructions}")
        summary = BuildSummary(videos_found=len(videos))
        summary.unlabelled_kept = bool(self.options["allow_unlabelled"])
        outcomes = read_outcomes(manual_dir)
        if outcomes is None:
            if not self.options["allow_unlabelled"]:
                raise EmbryoDataError(
                    f"{os.path.join(manual_dir, OUTCOMES_FILE)} does not exist. Classifying "
                    "embryos needs it: the public dataset has no outcomes, a clinic adds them "
                    f"as {','.join(OUTCOME_COLUMNS)}[,split] rows. To build without outcomes "
                    "(all -1, e.g. for the frame embedder), pass allow_unlabelled=True."
                )
            logger.warning(
                "%s does not exist: every video gets outcome -1 (allow_unlabelled).",
                os.path.join(manual_dir, OUTCOMES_FILE),
            )
            outcomes = {}
        summary.outcome_rows_without_video = sorted(set(outcomes) - set(videos))

        plans = []
        for video in videos:
            row = outcomes.get(video)
            outcome = row.outcome if row else -1
            if outcome < 0:
                summary.unlabelled_videos.append(video)
                if not self.options["allow_unlabelled"]:
                    continue
            patient = row.patient_id if row else patient_of_video(video)
            plan = self._plan_video(manual_dir, video, patient, outcome, summary)
            if plan is not None:
                plans.append(plan)
        if not plans:
            raise EmbryoDataError(
                f"No video in {frames_dir} can be built; see the build summary logged above."
                if summary.videos_found
                else f"No videos in {frames_dir}."
            )

        explicit: dict[str, tuple[str, str]] = {}  # patient -> (split, video)
        for plan in plans:
            row = outcomes.get(plan.video_id)
            if row is None or row.split is None:
                continue
            split, video = explicit.setdefault(plan.patient_id, (row.split, plan.video_id))
            if split != row.split:
                raise EmbryoDataError(
                    f"{os.path.join(manual_dir, OUTCOMES_FILE)}, line {row.line}: patient "
                    f"{plan.patient_id!r} is put in {row.split} here but in {split} for "
                    f"video {video!r}; all videos of a patient must be in one split."
                )
        assignment = split_patients(
            [p.patient_id for p in plans], {p: s for p, (s, _) in explicit.items()}
        )
        for plan in plans:
            plan.split = assignment[plan.patient_id]
        return plans, summary

    def _plan_video(
        self, manual_dir: str, video: str, patient: str, outcome: int, summary: BuildSummary
    ) -> VideoPlan | None:
        frames, ignored = list_frames(os.path.join(manual_dir, FRAMES_DIR, video))
        summary.ignored_files.extend(f"{video}/{name}" for name in ignored)
        duplicates = {k: paths for k, paths in frames.items() if len(paths) > 1}
        if duplicates:
            k, paths = min(duplicates.items())
            logger.error(
                "Skipping video %s: %d frame numbers have several files, e.g. RUN%d: %s.",
                video, len(duplicates), k, ", ".join(os.path.basename(p) for p in paths),
            )  # fmt: skip
            summary.duplicate_frame_numbers.append(video)
            return None
        time_path = os.path.join(manual_dir, TIMES_DIR, f"{video}_timeElapsed.csv")
        if not os.path.isfile(time_path):
            logger.error("Skipping video %s: %s does not exist.", video, time_path)
            summary.missing_time_files.append(video)
            return None
        times = read_times(time_path)
        numbers = sorted(frames)
        untimed = [k for k in numbers if k not in times]
        if untimed:
            summary.frames_without_time.append(f"{video} ({len(untimed)})")
        numbers = [k for k in numbers if k in times and times[k] <= self.options["max_hours"]]
        hours = np.array([times[k] for k in numbers], dtype=np.float64)
        if np.any(np.diff(hours) < 0):
            at = int(np.argmax(np.diff(hours) < 0))
            logger.error(
                "Skipping video %s: in %s frame %d is at %.3f h, after frame %d at %.3f h.",
                video, time_path, numbers[at], hours[at], numbers[at + 1], hours[at + 1],
            )  # fmt: skip
            summary.decreasing_times.append(video)
            return None
        complete = []
        for position, k in enumerate(numbers):
            path = frames[k][0]
            if jpeg_is_complete(path):
                complete.append(position)
            else:
                logger.error("Skipping truncated JPEG %s (no end-of-image marker).", path)
                summary.truncated_frames.append(f"{video}/{os.path.basename(path)}")
        numbers = [numbers[i] for i in complete]
        hours = hours[complete]
        chosen = select_frames(hours, self.options["max_frames"])
        if len(chosen) < self.options["min_frames"]:
            logger.error(
                "Skipping video %s: %d usable frames within %g h, fewer than min_frames=%d.",
                video, len(chosen), self.options["max_hours"], self.options["min_frames"],
            )  # fmt: skip
            summary.too_few_frames.append(f"{video} ({len(chosen)})")
            return None
        frame_index = np.array([numbers[i] for i in chosen], dtype=np.int32)
        phase = np.full(len(frame_index), -1, dtype=np.int32)
        phases_path = os.path.join(manual_dir, ANNOTATIONS_DIR, f"{video}_phases.csv")
        if os.path.isfile(phases_path):
            for index, first, last in read_phases(phases_path):
                phase[(frame_index >= first) & (frame_index <= last)] = index
        else:
            summary.unannotated_videos.append(video)
        return VideoPlan(
            video_id=video,
            patient_id=patient,
            outcome=outcome,
            paths=[frames[k][0] for k in frame_index],
            frame_index=frame_index,
            hours=hours[chosen].astype(np.float32),
            phase=phase,
        )

    def _generate_examples(
        self, plans: list[VideoPlan], summary: BuildSummary
    ) -> Iterator[tuple[str, dict]]:
        for plan in plans:
            decoded, keep = [], []
            for position, path in enumerate(plan.paths):
                try:
                    decoded.append(read_grayscale(path))
                    keep.append(position)
                except ImageReadError as e:
                    logger.error("Skipping frame: %s", e)
                    summary.unreadable_frames.append(f"{plan.video_id}/{os.path.basename(path)}")
            shapes = collections.Counter(frame.shape for frame in decoded)
            shape = shapes.most_common(1)[0][0] if shapes else None
            same = [i for i, frame in enumerate(decoded) if frame.shape == shape]
            for i, frame in enumerate(decoded):
                if frame.shape != shape:
                    name = os.path.basename(plan.paths[keep[i]])
                    logger.error(
                        "Skipping frame %s: %dx%d, unlike the %dx%d of the video's others.",
                        plan.paths[keep[i]], frame.shape[1], frame.shape[0], shape[1], shape[0],
                    )  # fmt: skip
                    summary.odd_size_frames.append(f"{plan.video_id}/{name}")
            keep = [keep[i] for i in same]
            if len(keep) < self.options["min_frames"]:
                logger.error(
                    "Skipping video %s: %d decodable frames, fewer than min_frames=%d.",
                    plan.video_id, len(keep), self.options["min_frames"],
                )  # fmt: skip
                summary.too_few_frames.append(f"{plan.video_id} ({len(keep)})")
                continue
            crops, circle = crop_video(
                [decoded[i] for i in same], self.options["frame_size"],
                num_localize=LOCALIZE_FRAMES,
            )  # fmt: skip
            summary.localization[circle.method] = summary.localization.get(circle.method, 0) + 1
            if circle.method == "centre":
                summary.centre_fallback_videos.append(plan.video_id)
            yield (
                plan.video_id,
                {
                    "video_id": plan.video_id,
                    "patient_id": plan.patient_id,
                    "frames": crops[..., None],
                    "frame_index": plan.frame_index[keep],
                    "hours": plan.hours[keep],
                    "phase": plan.phase[keep],
                    "outcome": plan.outcome,
                    "circle": np.array(circle[:3], dtype=np.float32),
                    "localization": circle.method,
                },
            )
