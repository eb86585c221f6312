"""What the TFDS dataset builders of `medjax_datasets` share.

Every builder here reads a dataset's raw layout from the manual directory and does the same
few things around its own decoding: it reads CSV files whose errors name the file, line and
column; splits patients by a salted hash; checks that the listed video files exist and decodes
them, skipping unreadable ones by name; counts the examples of each split, stopping the build
when a split ends empty; and logs and stores a build summary after the last split. Those steps
live here, once; messages and summaries keep each dataset's own words.
"""

import csv
import dataclasses
import hashlib
import logging
import math
import os
import unicodedata
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import TypeVar

import cv2
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from medjax.preprocess.text import csv_text
from medjax.preprocess.video import VideoReadError, read_video_gray

SPLITS = ("train", "validation", "test")
SUMMARY_NAMES_LOGGED = 10  # Names listed per problem in a logged build summary.

Item = TypeVar("Item")
PatientId = TypeVar("PatientId", bound=Hashable)
Example = tuple[str, dict]


def code_path_property(module_file: str):
    """A `code_path` class property for a builder class defined in `module_file`.

    TFDS 4.9.10 resolves `code_path` for builders in sub-packages through
    `importlib_resources`, a dependency it only declares for Python < 3.9; the builder's own
    file is the answer anyway.

    Args:
      module_file: the builder module's `__file__`.

    Returns:
      A class property to assign as `code_path = code_path_property(__file__)` in the builder
      class body.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(module_file)

    return code_path


def video_feature(frame_size: int | None = None) -> tfds.features.Tensor:
    """The feature of a (T, S, S, 1) uint8 gray video, stored as raw bytes.

    Raw bytes, not zlib: speckle and noise barely compress (EchoNet videos to about 0.67), and
    inflating a video took 80 % of the time to read one; uncompressed a clip is read about 4x
    faster.

    Args:
      frame_size: S, or None to leave the frame size open (a build's options then need not be
        known to read it).

    Returns:
      A `tfds.features.Tensor` of shape (None, S, S, 1).
    """
    return tfds.features.Tensor(
        shape=(None, frame_size, frame_size, 1),
        dtype=np.uint8,
        encoding=tfds.features.Encoding.BYTES,
    )


# Synthetic raw data.


def new_output_dir(out_dir: str | os.PathLike, subdirs: Sequence[str] = ()) -> str:
    """Creates a synthetic dataset's output folder and its sub-folders.

    Args:
      out_dir: the folder to write the raw layout into; it must not exist or be empty.
      subdirs: sub-folders to create in it.

    Returns:
      `out_dir` as a string.

    Raises:
      FileExistsError: `out_dir` holds files already.
    """
    out_dir = os.fspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir!r} is not empty; synthesize into a new directory.")
    os.makedirs(out_dir, exist_ok=True)
    for sub in subdirs:
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    return out_dir


def random_hex_ids(rng: np.random.Generator, num: int, prefix: str, num_bytes: int) -> list[str]:
    """`num` distinct ids `prefix` + `num_bytes` random bytes in upper-case hex, e.g. "0X1A2B..".

    Args:
      rng: the generator the bytes are drawn from (a repeat draws again).
      num: how many ids.
      prefix: what every id starts with.
      num_bytes: random bytes per id.

    Returns:
      The ids, in the order drawn.
    """
    ids = []
    while len(ids) < num:
        new_id = prefix + rng.bytes(num_bytes).hex().upper()
        if new_id not in ids:
            ids.append(new_id)
    return ids


# CSV files and cells.


def read_csv_dicts(
    path: str,
    required: Sequence[str],
    error: type[Exception],
    *,
    header_rule: str | None = None,
    missing_message: Callable[[list[str], list[str]], str] | None = None,
    extra_values_fix: str = "quote values containing commas.",
) -> Iterator[tuple[dict[str, str], int]]:
    """The rows of a CSV file with a header, as stripped dicts with their line numbers.

    The header is checked before any row is read; a UTF-8 byte order mark is ignored.

    Args:
      path: the CSV file.
      required: columns the header must have (others are allowed).
      error: the exception type raised for a problem (the dataset's `...DataError`).
      header_rule: how the message for missing columns says what the header must be, e.g.
        "must be A,B,C"; by default "must contain " and the required columns.
      missing_message: replaces the whole message for missing columns: called with (missing
        columns, columns found), it returns the text.
      extra_values_fix: what the message for a row with more values than the header says to do.

    Yields:
      ({column: value}, line number) per row, column names and values stripped of spaces.

    Raises:
      error: a required column is missing, a row has more values than the header, the file is
        not UTF-8 text, or a row cannot be parsed as CSV (e.g. a cell over the csv module's
        field size limit); the message names the file and line.
    """
    reader = csv.DictReader(csv_text(path, error), skipinitialspace=True)
    try:
        columns = [(c or "").strip() for c in reader.fieldnames or []]
        missing = [c for c in required if c not in columns]
        if missing:
            if missing_message is not None:
                raise error(missing_message(missing, columns))
            rule = header_rule or f"must contain {','.join(required)}"
            raise error(
                f"{path} lacks the required column(s) {', '.join(missing)}; its header {rule} "
                f"(found {','.join(columns) or 'nothing'})."
            )
        for row in reader:
            if None in row:  # DictReader's key for values beyond the header.
                raise error(
                    f"{path}, line {reader.line_num}: more values than header columns; "
                    f"{extra_values_fix}"
                )
            yield {(k or "").strip(): (v or "").strip() for k, v in row.items()}, reader.line_num
    except csv.Error as e:  # The DictReader's own line count stops at the last good row.
        raise error(_csv_error_message(path, reader.reader.line_num, e)) from None


def read_csv_rows(path: str, error: type[Exception]) -> Iterator[tuple[list[str], int]]:
    """The non-empty rows of a CSV file (with or without a header) as stripped cells.

    Args:
      path: the CSV file.
      error: the exception type raised for a problem (the dataset's `...DataError`).

    Yields:
      (cells, line number) per row that has a non-empty cell.

    Raises:
      error: the file is not UTF-8 text, or a row cannot be parsed as CSV.
    """
    reader = csv.reader(csv_text(path, error))
    try:
        for row in reader:
            cells = [c.strip() for c in row]
            if any(cells):
                yield cells, reader.line_num
    except csv.Error as e:
        raise error(_csv_error_message(path, reader.line_num, e)) from None


def _csv_error_message(path: str, line: int, problem: csv.Error) -> str:
    return f"{path}, line {line}: not valid CSV ({problem}); fix the row."


def check_file_name(
    name: str, *, path: str, line: int, column: str, folder: str, error: type[Exception]
) -> str:
    """Checks that a CSV cell naming a file is a plain name, not a path.

    Ids such as `../../etc/passwd`, `/abs/path`, `a\\b` or names with control characters
    (NUL, newlines) would make a builder read files outside its manual directory, or fail
    deep in the OS with a message that names no CSV line.

    Args:
      name: the cell's value (without extension).
      path: the CSV file, named in the error.
      line: the cell's line.
      column: the cell's column.
      folder: the folder the name is looked up in, named in the error.
      error: the exception type raised.

    Returns:
      `name`, unchanged.

    Raises:
      error: `name` holds '/' or '\\', is '.' or '..', or holds a control character.
    """
    if (
        "/" in name
        or "\\" in name
        or name in (".", "..")
        or any(unicodedata.category(c) == "Cc" for c in name)
    ):
        raise error(
            f"{path}, line {line}, column {column}: {name!r} is not a plain file name (it holds "
            "a path separator, is '.' or '..', or holds a control character); give the name of "
            f"a file in {folder}/, without any folder."
        )
    return name


def float_or_nan(text: str) -> float:
    """`float(text)`, or NaN where the text is not a number (callers then report the cell).

    Args:
      text: a CSV cell.

    Returns:
      The number; NaN when `float` cannot parse it. Infinities are returned as they are.
    """
    try:
        return float(text)
    except ValueError:
        return math.nan


def strip_extension(name: str, extension: str) -> str:
    """`name` without `extension` (any case) at its end, e.g. "a.AVI" -> "a" for ".avi".

    Args:
      name: a file name or id.
      extension: the extension with its dot, lower case.

    Returns:
      The name without the extension; the name itself when it does not end with it.
    """
    return name[: -len(extension)] if name.lower().endswith(extension) else name


# Splits.


def split_patients_by_hash(
    patient_ids: Iterable[PatientId],
    salt: str,
    shares: Sequence[tuple[str, float]],
    *,
    shares_of_remainder: bool = False,
    from_end: bool = False,
    rest: str = "train",
) -> dict[PatientId, str]:
    """Assigns patients to splits by cutting a salted-hash order of their ids.

    The unique ids are ordered by the SHA-256 of f"{salt}/{id}" (a fixed-seed permutation that
    needs no RNG and depends on no library version). Each split of `shares` in turn takes the
    next max(1, round-half-up(share * base)) patients, from the start of that order, or from its
    end with `from_end`; base is the number of patients, or with `shares_of_remainder` the
    number not yet taken. The patients left over go to `rest`. A caller checks that there are
    enough patients for every split to get one.

    Args:
      patient_ids: patient ids (strings or integers), repeats allowed.
      salt: the dataset's salt; another salt gives another permutation.
      shares: (split name, fraction) in the order the splits take their patients.
      shares_of_remainder: fractions of the patients not yet taken, instead of all of them.
      from_end: take from the end of the order instead of its start.
      rest: the split of the patients left over.

    Returns:
      {patient id: split name}.
    """

    def rank(patient_id: PatientId) -> str:
        return hashlib.sha256(f"{salt}/{patient_id}".encode()).hexdigest()

    remaining = sorted(set(patient_ids), key=rank)
    if from_end:
        remaining.reverse()
    total = len(remaining)
    assignment: dict[PatientId, str] = {}
    for split, share in shares:
        base = len(remaining) if shares_of_remainder else total
        count = max(1, math.floor(share * base + 0.5))
        assignment.update({p: split for p in remaining[:count]})
        remaining = remaining[count:]
    assignment.update({p: rest for p in remaining})
    return assignment


def group_by_split(
    items: Iterable[Item], split_of: Callable[[Item], str], names: Sequence[str] = SPLITS
) -> dict[str, list[Item]]:
    """The items of each split, in order, leaving out splits without any.

    Args:
      items: records, patients or plans of a build.
      split_of: the split name of an item.
      names: the split names, in the order the splits are generated.

    Returns:
      {split name: items}, only for splits with at least one item.
    """
    items = list(items)
    groups = {name: [item for item in items if split_of(item) == name] for name in names}
    return {name: group for name, group in groups.items() if group}


def counted_splits(
    splits: Mapping[str, Item],
    examples: Callable[[str, Item], Iterator[Example]],
    counts: dict[str, int],
    *,
    error: type[Exception],
    unit: str,
    verb: str = "read",
    on_done: Callable[[], None],
) -> dict[str, Iterator[Example]]:
    """Split generators that count their examples and call `on_done` after the last split.

    TFDS generates the splits one after the other; once every one is exhausted the build is
    complete, so that is where a build summary can be logged and stored.

    Args:
      splits: {split name: what `examples` needs to generate it}.
      examples: (split name, value of `splits`) -> the (key, example) pairs of that split.
      counts: gets {split name: number of examples} (the build summary's `examples`).
      error: the exception type raised for a split without any example.
      unit: what one example is, for that message ("video", "slice").
      verb: what could not be done to any of them ("read", "built").
      on_done: called once, after the last split is generated.

    Returns:
      {split name: generator of (key, example)}, for `_split_generators` to return.

    Raises:
      error: from a generator, when its split ends without an example.
    """
    pending = set(splits)

    def generate(name: str, value: Item) -> Iterator[Example]:
        count = 0
        for example in examples(name, value):
            count += 1
            yield example
        counts[name] = count
        if not count:
            raise error(
                f"No {unit} of the {name} split could be {verb}; see the errors logged above."
            )
        pending.discard(name)
        if not pending:
            on_done()

    return {name: generate(name, value) for name, value in splits.items()}


# Build summaries.


class SummaryReport:
    """Mixin for a build summary dataclass: `as_dict`, `report` and `has_problems`.

    A subclass is a dataclass with an `examples` field ({split: count}) and defines `TITLE`
    (or `title`), `named_lists` and, if it has more to say before them, `head_lines`.
    """

    TITLE = "Build summary:"

    def as_dict(self) -> dict:
        """The summary as plain Python values, for `builder.info.metadata`."""
        return dataclasses.asdict(self)

    def title(self) -> str:
        """The report's first line."""
        return self.TITLE

    def head_lines(self) -> list[str]:
        """The report's lines before the lists of names; by default the examples per split."""
        return [
            "  examples per split: "
            + ", ".join(f"{k}={v}" for k, v in sorted(self.examples.items()))
        ]

    def named_lists(self) -> list[tuple[str, list[str], bool]]:
        """(label, names, whether any name in it makes the summary a warning) per list."""
        raise NotImplementedError

    def has_problems(self) -> bool:
        """Whether any list flagged as a problem holds a name."""
        return any(names for _, names, problem in self.named_lists() if problem)

    def report(self) -> str:
        """The summary as log text: counts, and the first names of each list."""
        lines = [self.title(), *self.head_lines()]
        for label, names, _ in self.named_lists():
            shown = list(names[:SUMMARY_NAMES_LOGGED])
            if len(names) > len(shown):
                shown.append(f"... {len(names) - len(shown)} more")
            lines.append(f"  {label}: {len(names)}" + (f" [{', '.join(shown)}]" if names else ""))
        return "\n".join(lines)


def finish_build(builder: tfds.core.DatasetBuilder, summary, logger: logging.Logger) -> None:
    """Keeps, stores and logs a build summary once every split is generated.

    The summary goes to `builder.build_summary` and `builder.info.metadata["build_summary"]`
    (written with the dataset info after generation), and is logged as a warning when it
    has problems, else as info.

    Args:
      builder: the builder being prepared.
      summary: a `SummaryReport` dataclass.
      logger: the builder module's logger.
    """
    builder.build_summary = summary
    builder.info.metadata["build_summary"] = summary.as_dict()
    logger.log(logging.WARNING if summary.has_problems() else logging.INFO, summary.report())


# Videos.


def drop_missing_videos(
    records: Sequence[Item],
    path_of: Callable[[Item], str],
    *,
    listed_in: str,
    videos_dir: str,
    skip: bool,
    error: type[Exception],
) -> tuple[list[Item], list[Item]]:
    """Splits records into those whose video file exists and those whose file is missing.

    Args:
      records: the rows of the file listing the videos.
      path_of: the video path of a record.
      listed_in: the listing file, named in the error.
      videos_dir: the folder of the videos, named in the error when it is missing.
      skip: leave missing videos out instead of raising (`skip_missing_videos`).
      error: the exception type raised.

    Returns:
      (records with a video file, records without one).

    Raises:
      error: some videos are missing and `skip` is false; lists all of them.
    """
    missing = [r for r in records if not os.path.isfile(path_of(r))]
    if missing and not skip:
        where = "" if os.path.isdir(videos_dir) else f" (the folder {videos_dir} is missing)"
        raise error(
            f"{len(missing)} video file(s) listed in {listed_in} do not exist{where}: "
            f"{', '.join(path_of(r) for r in missing)}. Add them, remove their rows, or build "
            "with skip_missing_videos=True (--skip_missing_videos)."
        )
    return [r for r in records if os.path.isfile(path_of(r))], missing


def read_video_or_skip(
    path: str, name: str, min_frames: int, skipped: list[str], logger: logging.Logger
) -> tuple[np.ndarray, float] | None:
    """Decodes a video, or logs why it cannot be and records it as skipped.

    Args:
      path: the video file.
      name: the video's name in logs and in the build summary.
      min_frames: the frames it must decode to at least; a shorter video is skipped.
      skipped: gets `name` when the video is skipped.
      logger: the builder module's logger.

    Returns:
      (frames (T, H, W) uint8, container frame rate), or None when the video is skipped.
    """
    try:
        return read_video_gray(path, min_frames)
    except VideoReadError as e:
        logger.error("Skipping %s: %s", name, e)
        skipped.append(name)
        return None


def resize_frames(video: np.ndarray, size: int) -> np.ndarray:
    """Every frame of a (T, H, W) video resized to (size, size) with `cv2.INTER_AREA`.

    Args:
      video: (T, H, W) uint8 frames.
      size: the side of the resized frames; the aspect ratio is not kept.

    Returns:
      (T, size, size) uint8 frames.
    """
    return np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in video])
