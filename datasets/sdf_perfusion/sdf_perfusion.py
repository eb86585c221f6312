"""TFDS builder for sidestream dark-field (SDF) microcirculation videos scored for perfusion.

Reads a hospital export of SDF videos and their microvascular flow index (MFI) scores from the
manual directory (see `MANUAL_DOWNLOAD_INSTRUCTIONS`) and writes ArrayRecord files; no
TensorFlow is needed to build or read it. Every video is decoded once, here, and stored as a
raw-bytes `Tensor`. There is no public SDF dataset; the layout is what such an export looks
like, and `synthetic.py` writes it.

Raw layout::

    labels.csv            header video_id,patient_id,mfi_q1,mfi_q2,mfi_q3,mfi_q4[,split]
    videos/<video_id>.avi

Features of one example:

    video_id         string                    labels.csv video_id, without ".avi"
    patient_id       string
    video            (num_frames, S, S, 1)     uint8 gray, S = frame_size (see Frames)
    fps              float32                   the container's frame rate; NaN if it states none
    quadrant_scores  (4,) int32                mfi_q1..mfi_q4: 0 no flow, 1 intermittent,
                                               2 sluggish, 3 continuous; -1 not scored
    mfi              float32                   mean of the scored quadrants
    flow_class       int32                     the dominant quadrant score (see Labels)
    split            string                    "train", "validation" or "test"

Read back with `builder.as_data_source(split)`: strings come back as `bytes`, scalars as Python
numbers, tensors as numpy arrays.

Build options (keyword arguments of the builder; `medjax.data` registers their names):

    frame_size           int, default 64: frames are resized to frame_size x frame_size with
                         cv2.INTER_AREA (the aspect ratio is not kept: 640x480 and 720x576
                         frames become square); must be even, so that quadrants are halves
    num_frames           int, default 32: consecutive frames kept from the start of the video
    frame_stride         int, default 1: keep every frame_stride-th frame before counting
                         num_frames, so the kept frames are 0, s, 2s, ..., (num_frames - 1) s
    skip_missing_videos  bool, default False: see Problems

Frames. Flow shows in how cells move from one frame to the next, so the video is not sampled
uniformly over its length: the first num_frames frames at the native rate are kept (at
frame_stride 1; about a second of a 30 fps recording at the default 32). A video needs at least
(num_frames - 1) * frame_stride + 1 frames. The options a dataset was built with are stored in
`builder.info.metadata["build_options"]`; `medjax.data.build` keeps builds of the same raw data
with other options apart. A builder made for an existing build takes its stored options where
it is given the defaults, and raises where it is given another value, so a build is never read
as something it is not.

Quadrants. MFI (Ince et al. 2018 consensus) scores each quadrant of the image for its
predominant flow, 0 no flow, 1 intermittent, 2 sluggish, 3 continuous. Here the quadrants are
the four image quadrants: q1 top-left, q2 top-right, q3 bottom-left, q4 bottom-right (rows
before columns, as an image is read), in the native frame and in the resized one alike.

Labels. `mfi` is the mean score of the scored quadrants, the consensus video MFI. `flow_class`
is the most frequent score among the scored quadrants, a tie going to the lower (worse) score:
(3, 3, 2, -1) gives 3, (3, 3, 0, 0) gives 0, (3, 2, -1, -1) gives 2. Rounding the mean instead
would give a flow type that may appear in no quadrant ((3, 3, 0, 0) has mean 1.5, "sluggish");
the mode names the flow most of the field shows, and breaking ties towards worse flow keeps a
mixed, partly non-perfused field from being called well perfused. A row with no scored
quadrant has no label: it is logged, counted and left out.

Splits are by patient. With a split column every row must name train, validation (or val) or
test, in any case, and all videos of a patient must be in one split. Without it, the unique
patient ids (of every labels.csv row, also of videos that are later left out, so a bad file
never reshuffles the others) are ordered by a salted SHA-256 of the id, a fixed-seed
permutation independent of library versions, and cut 70/15/15 % train/validation/test, each
split getting at least one patient; this needs at least 3 patients. A split that no row is
assigned to is left out.

Problems. A malformed labels.csv raises `SdfDataError` (a `ValueError`) naming the file, line
and column: a missing column, a score that is not an integer 0-3 ("nan" included; a quadrant
that was not scored is left empty), an empty or duplicate video_id, an empty patient_id, an
unknown split, a patient in two splits. Rows whose video file is missing raise one
`SdfDataError` listing all of them, unless the builder is made with `skip_missing_videos=True`,
which leaves them out. A video that cannot be decoded or is too short for the kept frames is
logged by name and left out, never stored short or padded; a split none of whose videos can be
read is an error. AVI files in videos/ without a row are counted and ignored. All of these are
counted in a build summary, logged when generation ends and stored in
`builder.info.metadata["build_summary"]`.
"""

import collections
import dataclasses
import logging
import math
import os
import textwrap
from collections.abc import Iterator, Sequence

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
    split_patients_by_hash,
    strip_extension,
    video_feature,
)

LABELS_FILE = "labels.csv"
VIDEOS_DIR = "videos"
QUADRANT_COLUMNS = ("mfi_q1", "mfi_q2", "mfi_q3", "mfi_q4")
LABEL_COLUMNS = ("video_id", "patient_id", *QUADRANT_COLUMNS)
SPLIT_COLUMN = "split"
SPLIT_NAMES = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
SPLIT_FRACTIONS = {"validation": 0.15, "test": 0.15}  # The rest is train.
SPLIT_SALT = "sdf_perfusion/patient-split/v1"
MAX_SCORE = 3
MISSING_SCORE = -1
DEFAULT_OPTIONS = {"frame_size": 64, "num_frames": 32, "frame_stride": 1}

_DESCRIPTION = """\
Sidestream dark-field (SDF) microcirculation videos with per-quadrant microvascular flow index
(MFI) scores, the video MFI and its dominant flow class; split by patient.
"""

logger = logging.getLogger(__name__)


class SdfDataError(ValueError):
    """The raw SDF perfusion data is inconsistent; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class VideoRecord:
    """One labels.csv row."""

    video_id: str  # Without ".avi".
    patient_id: str
    scores: tuple[int, int, int, int]  # q1..q4, MISSING_SCORE where not scored.
    split: str | None  # TFDS split name from the split column; None without one.
    line: int
    path: str


@dataclasses.dataclass
class BuildSummary(SummaryReport):
    """What a build kept and left out; see the module docstring."""

    TITLE = "SDF perfusion build summary:"

    examples: dict[str, int] = dataclasses.field(default_factory=dict)
    unlabelled_videos: list[str] = dataclasses.field(default_factory=list)
    missing_videos: list[str] = dataclasses.field(default_factory=list)
    unreadable_videos: list[str] = dataclasses.field(default_factory=list)
    unlisted_videos: list[str] = dataclasses.field(default_factory=list)

    def named_lists(self) -> list[tuple[str, list[str], bool]]:
        return [
            ("rows without any scored quadrant (skipped)", self.unlabelled_videos, True),
            ("missing video files (skipped)", self.missing_videos, True),
            ("unreadable or too short videos (skipped)", self.unreadable_videos, True),
            (
                f"videos in {VIDEOS_DIR}/ without a {LABELS_FILE} row (ignored)",
                self.unlisted_videos,
                False,
            ),
        ]


def mfi(scores: Sequence[int]) -> float:
    """The video MFI: the mean score of the scored quadrants.

    Args:
      scores: per-quadrant scores 0-3, -1 (`MISSING_SCORE`) where not scored.

    Returns:
      The mean of the scores >= 0; NaN if none is scored.
    """
    scored = [s for s in scores if s >= 0]
    return sum(scored) / len(scored) if scored else math.nan


def flow_class(scores: Sequence[int]) -> int:
    """The dominant flow class: the most frequent score of the scored quadrants.

    Args:
      scores: per-quadrant scores 0-3, -1 (`MISSING_SCORE`) where not scored.

    Returns:
      The most frequent score >= 0, the lower (worse flow) of equally frequent ones; -1 if
      none is scored.
    """
    counts = collections.Counter(s for s in scores if s >= 0)
    if not counts:
        return MISSING_SCORE
    return min(counts, key=lambda score: (-counts[score], score))


def _score(value: str, column: str, line: int, path: str) -> int:
    if not value:
        return MISSING_SCORE
    number = float_or_nan(value)
    if not (math.isfinite(number) and number == int(number) and 0 <= number <= MAX_SCORE):
        raise SdfDataError(
            f"{path}, line {line}, column {column}: {value!r} is not an MFI score 0, 1, 2 or 3; "
            "fix it, or leave the cell empty if the quadrant was not scored."
        )
    return int(number)


def read_labels(manual_dir: str) -> list[VideoRecord]:
    """Parses labels.csv (see module docstring); does not look at the video files.

    Args:
      manual_dir: the raw data directory.

    Returns:
      One record per row, in file order.

    Raises:
      SdfDataError: naming the file, line and column of the first problem.
    """
    path = os.path.join(manual_dir, LABELS_FILE)
    if not os.path.isfile(path):
        raise SdfDataError(
            f"{path} does not exist.\n{textwrap.dedent(SdfPerfusion.MANUAL_DOWNLOAD_INSTRUCTIONS)}"
        )
    records, seen = [], {}
    rows = read_csv_dicts(
        path,
        LABEL_COLUMNS,
        SdfDataError,
        header_rule=f"must be {','.join(LABEL_COLUMNS)}[,{SPLIT_COLUMN}]",
    )
    for row, line in rows:
        video_id = strip_extension(row["video_id"], ".avi")
        if not video_id:
            raise SdfDataError(f"{path}, line {line}, column video_id: empty video id.")
        check_file_name(
            video_id, path=path, line=line, column="video_id", folder=VIDEOS_DIR, error=SdfDataError
        )
        if video_id in seen:
            raise SdfDataError(
                f"{path}, line {line}, column video_id: {video_id!r} already appears on "
                f"line {seen[video_id]}; video ids must be unique."
            )
        seen[video_id] = line
        if not row["patient_id"]:
            raise SdfDataError(
                f"{path}, line {line}, column patient_id: empty patient id; every video "
                "needs one (the splits are by patient)."
            )
        split = None
        if SPLIT_COLUMN in row:
            split = SPLIT_NAMES.get(row[SPLIT_COLUMN].lower())
            if split is None:
                raise SdfDataError(
                    f"{path}, line {line}, column {SPLIT_COLUMN}: {row[SPLIT_COLUMN]!r} is not "
                    "train, validation (or val) or test; fix it, or drop the column to "
                    "split by patient automatically."
                )
        records.append(
            VideoRecord(
                video_id=video_id,
                patient_id=row["patient_id"],
                scores=tuple(_score(row[c], c, line, path) for c in QUADRANT_COLUMNS),
                split=split,
                line=line,
                path=os.path.join(manual_dir, VIDEOS_DIR, f"{video_id}.avi"),
            )
        )
    return records


def split_patients(patient_ids: Sequence[str]) -> dict[str, str]:
    """Maps each patient id to 'train', 'validation' or 'test' (see module docstring).

    Args:
      patient_ids: patient ids, repeats allowed.

    Returns:
      {patient id: split name}.

    Raises:
      SdfDataError: fewer than 3 patients.
    """
    patients = set(patient_ids)
    if len(patients) < 3:
        raise SdfDataError(
            f"{LABELS_FILE} has {len(patients)} patient(s); at least 3 are needed for "
            f"patient-disjoint train/validation/test splits. Add a {SPLIT_COLUMN} column to "
            "choose the splits yourself."
        )
    return split_patients_by_hash(patients, SPLIT_SALT, tuple(SPLIT_FRACTIONS.items()))


def assign_splits(records: Sequence[VideoRecord], path: str = LABELS_FILE) -> dict[str, str]:
    """The split of each video id: the split column's, or a patient split without one.

    Args:
      records: the rows of labels.csv, as `read_labels` returns them.
      path: labels.csv, named in errors.

    Returns:
      {video_id: split name}.

    Raises:
      SdfDataError: a patient in two splits of the split column (naming it and both lines), or
        fewer than 3 patients without a split column.
    """
    if records and records[0].split is None:
        by_patient = split_patients([r.patient_id for r in records])
        return {r.video_id: by_patient[r.patient_id] for r in records}
    first: dict[str, VideoRecord] = {}
    for record in records:
        other = first.setdefault(record.patient_id, record)
        if other.split != record.split:
            raise SdfDataError(
                f"{path}, line {record.line}, column {SPLIT_COLUMN}: patient "
                f"{record.patient_id!r} is in {record.split}, but in {other.split} on line "
                f"{other.line}; put all videos of a patient in one split."
            )
    return {r.video_id: r.split for r in records}


def _check_option(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"Build option {name} must be a positive integer, got {value!r}.")
    if name == "frame_size" and value % 2:
        raise ValueError(
            f"Build option frame_size must be even (quadrants are image halves), got {value}."
        )
    return int(value)


class SdfPerfusion(tfds.core.GeneratorBasedBuilder):
    """SDF microcirculation videos with per-quadrant MFI scores, MFI and flow class."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Export the SDF videos and their MFI scores and put them in the manual directory as
      labels.csv          header video_id,patient_id,mfi_q1,mfi_q2,mfi_q3,mfi_q4 and optionally
                          split (video_id with or without .avi; scores 0-3 per image quadrant
                          q1 top-left, q2 top-right, q3 bottom-left, q4 bottom-right, empty if
                          not scored; split train, validation/val or test)
      videos/<video_id>.avi
    and build with `python -m medjax.data build sdf_perfusion --manual_dir=DIR --data_dir=OUT`
    (add --skip_missing_videos to build without the rows whose video is missing).
    """

    def __init__(
        self,
        *,
        frame_size: int = DEFAULT_OPTIONS["frame_size"],
        num_frames: int = DEFAULT_OPTIONS["num_frames"],
        frame_stride: int = DEFAULT_OPTIONS["frame_stride"],
        skip_missing_videos: bool = False,
        **kwargs,
    ):
        """Args: frame_size, num_frames, frame_stride: see the module docstring (left at the
        default, an existing build's value is taken); skip_missing_videos: leave out rows
        without a video instead of raising; other arguments go to
        `tfds.core.GeneratorBasedBuilder`.

        Raises:
          ValueError: an option is invalid, or differs from that of the existing build.
        """
        given = {"frame_size": frame_size, "num_frames": num_frames, "frame_stride": frame_stride}
        given = {k: _check_option(k, v) for k, v in given.items()}
        self._skip_missing_videos = skip_missing_videos
        self.build_summary: BuildSummary | None = None
        super().__init__(**kwargs)
        stored = self.info.metadata.get("build_options") if self.is_prepared() else None
        if stored:
            differing = {
                k: (v, stored.get(k))
                for k, v in given.items()
                if v != DEFAULT_OPTIONS[k] and v != stored.get(k)
            }
            if differing:
                asked = ", ".join(f"{k}={v}" for k, (v, _) in differing.items())
                built = ", ".join(f"{k}={s}" for k, (_, s) in differing.items())
                raise ValueError(
                    f"{self.data_dir} holds sdf_perfusion built with {built}, not {asked}. "
                    "Leave the options at their defaults to read it, or build into another "
                    "data_dir (medjax.data.build keeps builds with other options apart)."
                )
            self.build_options = {k: int(stored[k]) for k in DEFAULT_OPTIONS}
        else:
            self.build_options = given

    code_path = code_path_property(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "video_id": tfds.features.Text(),
                    "patient_id": tfds.features.Text(),
                    # Frame size left open: a build's frame options need not be known to read it.
                    "video": video_feature(),
                    "fps": tfds.features.Scalar(dtype=np.float32),
                    "quadrant_scores": tfds.features.Tensor(shape=(4,), dtype=np.int32),
                    "mfi": tfds.features.Scalar(dtype=np.float32),
                    "flow_class": tfds.features.Scalar(dtype=np.int32),
                    "split": tfds.features.Text(),
                }
            ),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        labels_path = os.path.join(manual_dir, LABELS_FILE)
        records = read_labels(manual_dir)
        if not records:
            raise SdfDataError(f"{labels_path} lists no videos.")
        splits_of = assign_splits(records, labels_path)
        summary = BuildSummary()
        videos_dir = os.path.join(manual_dir, VIDEOS_DIR)
        listed = {r.video_id for r in records}
        if os.path.isdir(videos_dir):
            summary.unlisted_videos = sorted(
                name[:-4]
                for name in os.listdir(videos_dir)
                if name.lower().endswith(".avi") and name[:-4] not in listed
            )

        summary.unlabelled_videos = [r.video_id for r in records if flow_class(r.scores) < 0]
        for video_id in summary.unlabelled_videos:
            logger.warning("Skipping %s: no quadrant of it is scored in %s.", video_id, labels_path)
        records = [r for r in records if flow_class(r.scores) >= 0]
        records, missing = drop_missing_videos(
            records,
            lambda r: r.path,
            listed_in=labels_path,
            videos_dir=videos_dir,
            skip=self._skip_missing_videos,
            error=SdfDataError,
        )
        summary.missing_videos = [r.video_id for r in missing]
        if not records:
            raise SdfDataError(f"None of the labelled videos listed in {labels_path} exist.")

        self.info.metadata["build_options"] = dict(self.build_options)
        return counted_splits(
            group_by_split(records, lambda r: splits_of[r.video_id]),
            lambda name, split: self._generate_examples(split, name, summary),
            summary.examples,
            error=SdfDataError,
            unit="video",
            on_done=lambda: finish_build(self, summary, logger),
        )

    def _generate_examples(
        self, records: list[VideoRecord], split: str, summary: BuildSummary
    ) -> Iterator[tuple[str, dict]]:
        size = self.build_options["frame_size"]
        count, stride = self.build_options["num_frames"], self.build_options["frame_stride"]
        needed = (count - 1) * stride + 1
        for record in records:
            decoded = read_video_or_skip(
                record.path, record.video_id, needed, summary.unreadable_videos, logger
            )
            if decoded is None:
                continue
            video, fps = decoded
            video = video[:needed:stride]
            if video.shape[1:] != (size, size):
                video = resize_frames(video, size)
            yield (
                record.video_id,
                {
                    "video_id": record.video_id,
                    "patient_id": record.patient_id,
                    "video": video[..., None],
                    "fps": fps,
                    "quadrant_scores": np.array(record.scores, np.int32),
                    "mfi": mfi(record.scores),
                    "flow_class": flow_class(record.scores),
                    "split": split,
                },
            )
