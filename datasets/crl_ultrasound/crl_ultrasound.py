"""TFDS builder for first-trimester ultrasound crown-rump length (CRL) data.

Reads the raw layout from the manual directory (see `MANUAL_DOWNLOAD_INSTRUCTIONS`) and writes
ArrayRecord files; no TensorFlow is needed to build or read it (images are stored as
zlib-compressed `Tensor` features, not `Image` features, which need TF to encode).

Features of one example:

    id                string          image id (the file stem)
    patient_id        string
    image             (H, W, 1) uint8 original size, not resized
    mask              (H, W, 1) uint8 fetus mask, 0/1
    crown, rump       (2,) float32    landmark (x, y) in pixels; pixel (row i, col j) is at (j, i)
    pixel_spacing_mm  float32         NaN where metadata.csv leaves it empty
    ga_days           float32         gestational age; NaN where empty
    quality           int32           1 good, 0 bad, -1 unknown (empty in metadata.csv)

Read back with `builder.as_data_source()`: strings come back as `bytes`, scalars as Python
numbers, tensors as numpy arrays.

Splits `train`/`validation`/`test` are by patient, about 70/15/15 %, deterministic: unique
patient ids are ordered by a salted SHA-256 of the id (a fixed-seed permutation that needs no
RNG and does not depend on the numpy version) and cut, every split getting at least one
patient. At least 3 patients are required.

Every problem with the raw data raises one `CrlDataError` (a `ValueError`), or an
`ImageReadError` for an unreadable PNG, naming the offending file and what to do.
"""

import dataclasses
import json
import math
import os
import textwrap
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from medjax_datasets.common import (
    SPLITS,
    check_file_name,
    code_path_property,
    float_or_nan,
    read_csv_dicts,
    split_patients_by_hash,
)

from medjax.preprocess.image import read_grayscale, read_mask

METADATA_FILE = "metadata.csv"
REQUIRED_COLUMNS = ("id", "patient_id", "pixel_spacing_mm", "ga_days", "quality")
QUALITY_CODES = {"good": 1, "bad": 0, "": -1}
LANDMARKS = ("crown", "rump")
SPLIT_FRACTIONS = {"validation": 0.15, "test": 0.15}  # The rest is train.
SPLIT_SALT = "crl_ultrasound/patient-split/v1"

_DESCRIPTION = """\
First-trimester ultrasound images for crown-rump length (CRL) measurement: per image the
fetus segmentation mask, crown and rump landmarks, pixel spacing, gestational age and an image
quality label. Split by patient into train/validation/test.
"""


class CrlDataError(ValueError):
    """The raw CRL data is inconsistent; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One metadata row with its files and parsed annotation."""

    id: str
    patient_id: str
    pixel_spacing_mm: float
    ga_days: float
    quality: int
    image_path: str
    mask_path: str
    annotation_path: str
    crown: np.ndarray
    rump: np.ndarray
    annotated_size: tuple[int, int] | None  # (height, width) stated in the annotation.


def _parse_float(value: str, column: str, line: int, path: str) -> float:
    if not value.strip():
        return math.nan
    number = float_or_nan(value)
    if not math.isfinite(number) or (column == "pixel_spacing_mm" and number <= 0):
        raise CrlDataError(
            f"{path}, line {line}: {column}={value!r} is not a valid number; "
            "fix it or leave it empty if unknown."
        )
    return number


def read_landmarks(path: str) -> tuple[dict[str, np.ndarray], tuple[int, int] | None]:
    """Parses a LabelMe annotation: the crown and rump points and the stated (H, W), if any."""
    try:
        with open(path, encoding="utf-8") as f:
            annotation = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CrlDataError(
            f"Annotation {path} is not valid JSON ({e}); fix it or re-export it from LabelMe."
        ) from None
    shapes = annotation.get("shapes") if isinstance(annotation, dict) else None
    if not isinstance(shapes, list):
        raise CrlDataError(
            f"Annotation {path} has no 'shapes' list; it must be a LabelMe JSON file with "
            "'crown' and 'rump' points."
        )
    points = {}
    for name in LANDMARKS:
        matches = [
            s
            for s in shapes
            if isinstance(s, dict) and str(s.get("label", "")).strip().lower() == name
        ]
        if len(matches) != 1:
            problem = f"has {len(matches)} '{name}' points" if matches else f"has no '{name}' point"
            raise CrlDataError(
                f"Annotation {path} {problem}; it needs exactly one point "
                f"labelled '{name}'. Fix it in LabelMe."
            )
        xy = matches[0].get("points")
        try:
            point = np.asarray(xy, dtype=np.float64).reshape(2)
        except (TypeError, ValueError):
            point = np.full(2, np.nan)
        if not np.all(np.isfinite(point)):
            raise CrlDataError(
                f"Annotation {path}: the '{name}' shape must be one point [[x, y]], got {xy!r}. "
                "Fix it in LabelMe."
            )
        points[name] = point.astype(np.float32)
    height, width = annotation.get("imageHeight"), annotation.get("imageWidth")
    size = (height, width) if isinstance(height, int) and isinstance(width, int) else None
    return points, size


def read_metadata(manual_dir: str) -> list[Record]:
    """Reads metadata.csv and the annotations, checking that every referenced file exists."""
    path = os.path.join(manual_dir, METADATA_FILE)
    if not os.path.isfile(path):
        raise CrlDataError(
            f"{path} does not exist.\n{textwrap.dedent(CrlUltrasound.MANUAL_DOWNLOAD_INSTRUCTIONS)}"
        )
    # Every row is checked before any referenced file: a malformed row is reported first.
    rows = []
    seen = set()
    for row, line in read_csv_dicts(path, REQUIRED_COLUMNS, CrlDataError):
        image_id, patient_id = row["id"], row["patient_id"]
        if not image_id or not patient_id:
            raise CrlDataError(f"{path}, line {line}: id and patient_id must not be empty.")
        check_file_name(
            image_id, path=path, line=line, column="id", folder="images", error=CrlDataError
        )
        if image_id in seen:
            raise CrlDataError(
                f"{path}, line {line}: id {image_id!r} appears twice; ids must be unique."
            )
        seen.add(image_id)
        quality = row["quality"].lower()
        if quality not in QUALITY_CODES:
            raise CrlDataError(
                f"{path}, line {line}: quality={row['quality']!r}; "
                "use 'good', 'bad' or leave it empty."
            )
        values = {
            "pixel_spacing_mm": _parse_float(
                row["pixel_spacing_mm"], "pixel_spacing_mm", line, path
            ),
            "ga_days": _parse_float(row["ga_days"], "ga_days", line, path),
            "quality": QUALITY_CODES[quality],
        }
        rows.append((image_id, patient_id, values, line))

    records = []
    for image_id, patient_id, values, line in rows:
        files = {
            "image": os.path.join(manual_dir, "images", f"{image_id}.png"),
            "mask": os.path.join(manual_dir, "masks", f"{image_id}.png"),
            "annotation": os.path.join(manual_dir, "annotations", f"{image_id}.json"),
        }
        for kind, file in files.items():
            if not os.path.isfile(file):
                raise CrlDataError(
                    f"The {kind} file {file} for id {image_id!r} ({path}, line {line}) does not "
                    "exist; add it or remove the row from metadata.csv."
                )
        points, size = read_landmarks(files["annotation"])
        records.append(
            Record(
                id=image_id,
                patient_id=patient_id,
                **values,
                image_path=files["image"],
                mask_path=files["mask"],
                annotation_path=files["annotation"],
                crown=points["crown"],
                rump=points["rump"],
                annotated_size=size,
            )
        )
    return records


def split_patients(patient_ids: Sequence[str]) -> dict[str, str]:
    """Maps each patient id to 'train', 'validation' or 'test' (see module docstring)."""
    patients = set(patient_ids)
    if len(patients) < 3:
        raise CrlDataError(
            f"Found {len(patients)} patient(s); at least 3 are needed for patient-disjoint "
            "train/validation/test splits."
        )
    return split_patients_by_hash(patients, SPLIT_SALT, tuple(SPLIT_FRACTIONS.items()))


def check_patient_disjoint(splits: dict[str, list[Record]]) -> None:
    """Raises if any patient has images in two splits."""
    owner = {}
    for split, records in splits.items():
        for record in records:
            other = owner.setdefault(record.patient_id, split)
            if other != split:
                raise RuntimeError(
                    f"Patient {record.patient_id!r} is in both the {other} and {split} splits; "
                    "the split assignment is broken."
                )


class CrlUltrasound(tfds.core.GeneratorBasedBuilder):
    """First-trimester ultrasound: fetus mask, crown/rump landmarks, GA, quality."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Put the data in the manual directory as
      images/<id>.png        grayscale ultrasound image
      masks/<id>.png         fetus mask (0 background, 255 fetus), same size as the image
      annotations/<id>.json  LabelMe file with one point labelled 'crown' and one 'rump'
      metadata.csv           header id,patient_id,pixel_spacing_mm,ga_days,quality
                             (quality: good, bad or empty for unknown)
    and build with `python -m medjax.data build crl_ultrasound --manual_dir=DIR --data_dir=OUT`.
    """

    code_path = code_path_property(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        def plane() -> tfds.features.Tensor:
            return tfds.features.Tensor(
                shape=(None, None, 1), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
            )

        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "patient_id": tfds.features.Text(),
                    "image": plane(),
                    "mask": plane(),
                    "crown": tfds.features.Tensor(shape=(2,), dtype=np.float32),
                    "rump": tfds.features.Tensor(shape=(2,), dtype=np.float32),
                    "pixel_spacing_mm": tfds.features.Scalar(dtype=np.float32),
                    "ga_days": tfds.features.Scalar(dtype=np.float32),
                    "quality": tfds.features.Scalar(dtype=np.int32),
                }
            ),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        records = read_metadata(os.fspath(dl_manager.manual_dir))
        assignment = split_patients([r.patient_id for r in records])
        splits = {name: [r for r in records if assignment[r.patient_id] == name] for name in SPLITS}
        check_patient_disjoint(splits)
        return {name: self._generate_examples(split) for name, split in splits.items()}

    def _generate_examples(self, records: list[Record]) -> Iterator[tuple[str, dict]]:
        for record in records:
            image = read_grayscale(record.image_path)
            mask = read_mask(record.mask_path)
            if mask.shape != image.shape:
                raise CrlDataError(
                    f"Mask {record.mask_path} is {mask.shape[0]}x{mask.shape[1]} but its image "
                    f"{record.image_path} is {image.shape[0]}x{image.shape[1]} (HxW); "
                    "re-export the mask at the image's size."
                )
            if record.annotated_size not in (None, image.shape):
                raise CrlDataError(
                    f"Annotation {record.annotation_path} is for a "
                    f"{record.annotated_size[0]}x{record.annotated_size[1]} image but "
                    f"{record.image_path} is {image.shape[0]}x{image.shape[1]} (HxW); "
                    "annotate the image as exported."
                )
            yield (
                record.id,
                {
                    "id": record.id,
                    "patient_id": record.patient_id,
                    "image": image[:, :, None],
                    "mask": mask[:, :, None],
                    "crown": record.crown,
                    "rump": record.rump,
                    "pixel_spacing_mm": record.pixel_spacing_mm,
                    "ga_days": record.ga_days,
                    "quality": record.quality,
                },
            )
