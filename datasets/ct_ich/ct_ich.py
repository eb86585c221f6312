"""TFDS builder for CT-ICH: head CT slices with intracranial hemorrhage masks and labels.

Reads the PhysioNet "Computed Tomography Images for Intracranial Hemorrhage Detection and
Segmentation" v1.3.1 layout, or its Kaggle JPG variant, from the manual directory (see
`MANUAL_DOWNLOAD_INSTRUCTIONS`) and writes ArrayRecord files; no TensorFlow is needed to build or
read it. One example is one axial slice at its native size (512x512 in the real data).

Features of one example:

    patient_id        string          file stem, e.g. "049"
    slice_number      int32           1-indexed, as SliceNumber in the CSV
    augment_copy      int32           0 for an original slice, 1..N for its augmented copies
    image             (H, W, 1) int16 Hounsfield units
    mask              (H, W, 1) uint8 hemorrhage mask, 0/1
    intraventricular, intraparenchymal, subarachnoid, epidural, subdural
                      int32           0/1 subtype labels from the CSV
    fracture          int32           0/1, Fracture_Yes_No
    any_hemorrhage    int32           1 - No_Hemorrhage
    pixel_spacing_mm  float32         mean of the row and column spacing; NaN when unknown

Read back with `builder.as_data_source(split)`: strings come back as `bytes`, scalars as Python
numbers, tensors as numpy arrays.

Layouts, told apart by what the manual directory holds (no flag needed):

    PhysioNet v1.3.1  ct_scans/<NNN>.nii, masks/<NNN>.nii, hemorrhage_diagnosis_raw_ct.csv.
                      Volumes are read with `medjax.preprocess.ct.read_nifti_volume` (display
                      orientation, HU after the NIfTI scaling); slice k of the volume is
                      SliceNumber k + 1. Mask voxels >= 0.5 are hemorrhage.
    Kaggle JPG        Patients_CT/<NNN>/brain/<SliceNumber>.jpg, <SliceNumber>_HGE_Seg.jpg (only
                      for some slices with hemorrhage), hemorrhage_diagnosis.csv; bone/ folders
                      are not read. The JPGs are 8-bit brain-window images made by the dataset's
                      own script with level 40 and width 120 HU, so HU = -20 + gray * 120 / 255:
                      anything outside -20..100 HU is lost for this variant (clipped), and
                      pixel_spacing_mm is NaN. A slice without a _HGE_Seg.jpg has an empty mask.
                      The lossy JPG masks are binarised with Otsu's threshold, except that a
                      mask whose brightest pixel is below 64 is empty (JPEG noise on black).
    When both are present the NIfTI layout is used. Both CSVs have the columns
    PatientNumber,SliceNumber,Intraventricular,Intraparenchymal,Subarachnoid,Epidural,Subdural,
    No_Hemorrhage,Fracture_Yes_No with integer values (labels 0 or 1); PatientNumber 49 is the
    file or folder 049.

Splits `train`/`validation`/`test` are by patient and deterministic: the patients (those with a
scan, a mask file for the NIfTI layout, and CSV rows) are ordered by a salted SHA-256 of their
number (a fixed-seed shuffle that needs no RNG), the last 20 % (at least one) are `test`, and of
the rest the last 20 % (at least one) are `validation`, as the project did (80/20 then 80/20).
At least 3 patients are needed. `builder.info.metadata["build_summary"]["patients"]` lists the
ids of the patients each split holds slices of (for k-fold by patient, done by the training
config).

Offline augmentation. With `offline_augment_copies=N > 0` (`--option offline_augment_copies=N`)
a split `train_augmented` holds every train slice plus N copies of each train slice with
hemorrhage (non-empty mask or any_hemorrhage): a horizontal flip (probability 1/2), rotation in
+-15 degrees and scaling in 0.9..1.1 applied jointly to image (linear, -1024 HU air outside) and
mask (nearest, 0 outside) by `medjax.input.augment.random_affine`, seeded by (patient number,
slice, copy) so a rebuild gives the same copies. Copies keep patient_id and slice_number and get
augment_copy 1..N.

Problems are reported, not guessed, and counted in a build summary that is logged when the build
ends and stored in `builder.info.metadata["build_summary"]`:
  * a malformed CSV (missing column, a non-integer value, a label other than 0/1, a duplicate
    (PatientNumber, SliceNumber)) raises `CtIchDataError` naming the file, line and column;
  * a slice without a CSV row is left out (a patient with no row at all is listed as "NNN/*");
    a CSV row without a slice is ignored; both counted;
  * a patient whose mask file is missing is left out (no mask is invented);
  * a corrupt or truncated NIfTI file: its patient is left out (the others are built, and
    keep their splits); an unreadable JPG: that slice is left out;
  * scan and mask of different shapes: that patient (NIfTI) or slice (JPG) is left out;
  * a non-empty mask with No_Hemorrhage = 1, or hemorrhage labels with an empty mask: kept as
    labelled (the real data has a few) and counted;
  * a split left without any readable slice stops the build with `CtIchDataError`.
"""

import dataclasses
import logging
import math
import os
import re
import textwrap
from collections.abc import Iterator

import cv2
import numpy as np
import tensorflow_datasets as tfds
from medjax_datasets.common import (
    SummaryReport,
    code_path_property,
    counted_splits,
    finish_build,
    read_csv_dicts,
    split_patients_by_hash,
)

from medjax.input.augment import random_affine
from medjax.preprocess.ct import CtReadError, read_nifti_volume
from medjax.preprocess.image import ImageReadError, read_grayscale

CT_SCANS_DIR = "ct_scans"
MASKS_DIR = "masks"
RAW_CSV = "hemorrhage_diagnosis_raw_ct.csv"
JPG_DIR = "Patients_CT"
JPG_CSV = "hemorrhage_diagnosis.csv"
SEG_SUFFIX = "_HGE_Seg"
# Feature name -> CSV column.
SUBTYPES = {
    "intraventricular": "Intraventricular",
    "intraparenchymal": "Intraparenchymal",
    "subarachnoid": "Subarachnoid",
    "epidural": "Epidural",
    "subdural": "Subdural",
}
LABEL_COLUMNS = (*SUBTYPES.values(), "No_Hemorrhage", "Fracture_Yes_No")
CSV_COLUMNS = ("PatientNumber", "SliceNumber", *LABEL_COLUMNS)
JPG_WINDOW_LEVEL_HU = 40.0
JPG_WINDOW_WIDTH_HU = 120.0
JPG_MASK_MIN_MAX = 64  # A mask JPG darker than this everywhere is empty.
MASK_THRESHOLD = 0.5
AIR_HU = -1024
SPLIT_SALT = "ct_ich/patient-split/v1"
TEST_FRACTION = 0.2
VALIDATION_FRACTION = 0.2
AUGMENT_SEED = 0x1C4  # Mixed with (patient number, slice, copy).
AUGMENT_MAX_ROTATE_DEG = 15.0
AUGMENT_SCALE_RANGE = (0.9, 1.1)

_DESCRIPTION = """\
Head CT slices of 82 traumatic brain injury patients (PhysioNet CT-ICH) with intracranial
hemorrhage masks, per-slice hemorrhage subtype labels (intraventricular, intraparenchymal,
subarachnoid, epidural, subdural) and skull fracture labels. Images in Hounsfield units.
Split by patient into train/validation/test.
"""

logger = logging.getLogger(__name__)


class CtIchDataError(ValueError):
    """The raw CT-ICH data is inconsistent; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class SliceLabels:
    """One CSV row: its line and the label columns as 0/1."""

    line: int
    values: dict[str, int]


# (PatientNumber, SliceNumber) -> labels.
Diagnosis = dict[tuple[int, int], SliceLabels]


@dataclasses.dataclass(frozen=True)
class Patient:
    """One patient's files: a scan and mask volume, or a folder of JPG slices."""

    patient_id: str  # File stem or folder name, e.g. "049".
    number: int  # PatientNumber in the CSV.
    scan_path: str  # NIfTI scan, or the JPG brain/ folder.
    mask_path: str | None  # NIfTI mask; None for JPGs.


@dataclasses.dataclass
class BuildSummary(SummaryReport):
    """What a build kept and left out; see the module docstring."""

    layout: str = ""
    examples: dict[str, int] = dataclasses.field(default_factory=dict)
    patients: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    slices_without_csv_row: list[str] = dataclasses.field(default_factory=list)
    csv_rows_without_slice: list[str] = dataclasses.field(default_factory=list)
    patients_without_mask: list[str] = dataclasses.field(default_factory=list)
    unreadable_files: list[str] = dataclasses.field(default_factory=list)
    shape_mismatches: list[str] = dataclasses.field(default_factory=list)
    mask_without_hemorrhage_label: list[str] = dataclasses.field(default_factory=list)
    hemorrhage_label_without_mask: list[str] = dataclasses.field(default_factory=list)
    ignored_files: list[str] = dataclasses.field(default_factory=list)

    def title(self) -> str:
        return f"CT-ICH build summary ({self.layout} layout):"

    def head_lines(self) -> list[str]:
        return [
            *super().head_lines(),
            "  patients per split: "
            + ", ".join(f"{k}={len(v)}" for k, v in sorted(self.patients.items())),
        ]

    def named_lists(self) -> list[tuple[str, list[str], bool]]:
        """The lists of names; those whose slices are kept make no warning."""
        return [
            ("slices without a CSV row (skipped)", self.slices_without_csv_row, True),
            ("CSV rows without a slice (ignored)", self.csv_rows_without_slice, True),
            ("patients without a mask file (skipped)", self.patients_without_mask, True),
            ("unreadable files (patient or slice skipped)", self.unreadable_files, True),
            ("scan and mask of different shapes (skipped)", self.shape_mismatches, True),
            (
                "slices with a mask but No_Hemorrhage=1 (kept)",
                self.mask_without_hemorrhage_label,
                False,
            ),
            (
                "slices labelled hemorrhage with an empty mask (kept)",
                self.hemorrhage_label_without_mask,
                False,
            ),
            ("files not in the layout (ignored)", self.ignored_files, True),
        ]


def read_diagnosis(path: str) -> Diagnosis:
    """Parses a CT-ICH diagnosis CSV (either layout's) into {(patient, slice): labels}.

    Args:
      path: hemorrhage_diagnosis_raw_ct.csv or hemorrhage_diagnosis.csv.

    Returns:
      The rows keyed by (PatientNumber, SliceNumber), in file order.

    Raises:
      CtIchDataError: a missing column, a value that is not an integer, a label other than
        0/1, a slice number below 1 or a duplicate row; the message names file, line, column.
    """

    def missing_message(missing: list[str], columns: list[str]) -> str:
        return (
            f"{path}, line 1: missing column(s) {', '.join(missing)}; the header must "
            f"contain {','.join(CSV_COLUMNS)} (found {','.join(columns) or 'nothing'})."
        )

    diagnosis: Diagnosis = {}
    rows = read_csv_dicts(
        path,
        CSV_COLUMNS,
        CtIchDataError,
        missing_message=missing_message,
        extra_values_fix="fix the row.",
    )
    for row, line in rows:
        values = {}
        for column in CSV_COLUMNS:
            text = row[column]
            if not re.fullmatch(r"[+-]?\d+", text):
                raise CtIchDataError(
                    f"{path}, line {line}, column {column}: {text!r} is not an integer; "
                    "fix the value."
                )
            values[column] = int(text)
        for column in LABEL_COLUMNS:
            if values[column] not in (0, 1):
                raise CtIchDataError(
                    f"{path}, line {line}, column {column}: {values[column]} is not 0 or 1."
                )
        if values["PatientNumber"] < 0 or values["SliceNumber"] < 1:
            column = "PatientNumber" if values["PatientNumber"] < 0 else "SliceNumber"
            raise CtIchDataError(
                f"{path}, line {line}, column {column}: {values[column]} is out of range "
                "(patient numbers are >= 0, slice numbers >= 1)."
            )
        key = (values["PatientNumber"], values["SliceNumber"])
        if key in diagnosis:
            raise CtIchDataError(
                f"{path}, line {line}, column SliceNumber: patient {key[0]} slice {key[1]} "
                f"already appears on line {diagnosis[key].line}; remove the duplicate row."
            )
        diagnosis[key] = SliceLabels(line, {c: values[c] for c in LABEL_COLUMNS})
    return diagnosis


def detect_layout(manual_dir: str) -> str:
    """'nifti' or 'jpg' from what `manual_dir` holds; raises `CtIchDataError` for neither."""
    if os.path.isdir(os.path.join(manual_dir, CT_SCANS_DIR)):
        if os.path.isdir(os.path.join(manual_dir, JPG_DIR)):
            logger.info("%s holds both layouts; reading the NIfTI volumes.", manual_dir)
        return "nifti"
    if os.path.isdir(os.path.join(manual_dir, JPG_DIR)):
        return "jpg"
    raise CtIchDataError(
        f"{manual_dir} holds neither {CT_SCANS_DIR}/ (PhysioNet NIfTI layout) nor {JPG_DIR}/ "
        f"(Kaggle JPG layout).\n{textwrap.dedent(CtIch.MANUAL_DOWNLOAD_INSTRUCTIONS)}"
    )


def _nifti_stem(name: str) -> str | None:
    for extension in (".nii.gz", ".nii"):
        if name.lower().endswith(extension):
            return name[: -len(extension)]
    return None


def find_patients(manual_dir: str, layout: str, summary: BuildSummary) -> list[Patient]:
    """The patients whose files are present, sorted by number; records what is left out.

    Args:
      manual_dir: the raw data directory.
      layout: 'nifti' or 'jpg' (`detect_layout`).
      summary: gets patients without a mask file and files not in the layout.

    Returns:
      One `Patient` per scan file (NIfTI, with its mask) or patient folder (JPG).
    """
    patients = []
    if layout == "nifti":
        scans_dir = os.path.join(manual_dir, CT_SCANS_DIR)
        masks = {}
        masks_dir = os.path.join(manual_dir, MASKS_DIR)
        if os.path.isdir(masks_dir):
            masks = {_nifti_stem(n): n for n in os.listdir(masks_dir) if _nifti_stem(n)}
        for name in sorted(os.listdir(scans_dir)):
            stem = _nifti_stem(name)
            if stem is None or not stem.isdigit():
                if not name.startswith("."):
                    summary.ignored_files.append(f"{CT_SCANS_DIR}/{name}")
                continue
            if stem not in masks:
                logger.warning(
                    "Skipping patient %s: its mask %s does not exist.",
                    stem,
                    os.path.join(masks_dir, f"{stem}.nii"),
                )
                summary.patients_without_mask.append(stem)
                continue
            patients.append(
                Patient(
                    stem,
                    int(stem),
                    os.path.join(scans_dir, name),
                    os.path.join(masks_dir, masks[stem]),
                )
            )
    else:
        root = os.path.join(manual_dir, JPG_DIR)
        for name in sorted(os.listdir(root)):
            brain = os.path.join(root, name, "brain")
            if not name.isdigit() or not os.path.isdir(brain):
                if not name.startswith("."):
                    summary.ignored_files.append(f"{JPG_DIR}/{name}")
                continue
            patients.append(Patient(name, int(name), brain, None))
    numbers = {}
    for patient in patients:
        if patient.number in numbers:
            raise CtIchDataError(
                f"{patient.scan_path} and {numbers[patient.number]} are both patient "
                f"{patient.number}; keep one of them."
            )
        numbers[patient.number] = patient.scan_path
    return sorted(patients, key=lambda p: p.number)


def split_patients(numbers: list[int]) -> dict[int, str]:
    """Maps each patient number to 'train', 'validation' or 'test' (see module docstring).

    Raises:
      CtIchDataError: fewer than 3 patients.
    """
    patients = set(numbers)
    if len(patients) < 3:
        raise CtIchDataError(
            f"Found {len(patients)} usable patient(s); at least 3 are needed for "
            "patient-disjoint train/validation/test splits."
        )
    # The last patients of the hash order are test, those before them validation.
    return split_patients_by_hash(
        patients,
        SPLIT_SALT,
        (("test", TEST_FRACTION), ("validation", VALIDATION_FRACTION)),
        shares_of_remainder=True,
        from_end=True,
    )


def otsu_mask(gray: np.ndarray) -> np.ndarray:
    """Binarises an 8-bit (lossy) mask image with Otsu's threshold, as uint8 0/1.

    An image whose brightest pixel is below `JPG_MASK_MIN_MAX` is empty (Otsu would split
    JPEG noise on black into a random mask).
    """
    if int(gray.max(initial=0)) < JPG_MASK_MIN_MAX:
        return np.zeros(gray.shape, np.uint8)
    _, mask = cv2.threshold(gray, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return mask.astype(np.uint8)


def jpg_to_hu(gray: np.ndarray) -> np.ndarray:
    """Inverts the brain window of a Kaggle JPG: int16 HU in [level - width/2, level + width/2]."""
    low = JPG_WINDOW_LEVEL_HU - JPG_WINDOW_WIDTH_HU / 2
    return np.rint(low + gray.astype(np.float32) * (JPG_WINDOW_WIDTH_HU / 255.0)).astype(np.int16)


def to_int16_hu(hu: np.ndarray) -> np.ndarray:
    """Float HU rounded and clipped to int16."""
    return np.clip(np.rint(hu), -32768, 32767).astype(np.int16)


class CtIch(tfds.core.GeneratorBasedBuilder):
    """PhysioNet CT-ICH: head CT slices, hemorrhage masks, subtype and fracture labels."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download "Computed Tomography Images for Intracranial Hemorrhage Detection and
    Segmentation" v1.3.1 from PhysioNet (https://physionet.org/content/ct-ich/1.3.1/, after
    signing its data use agreement) and point --manual_dir at the folder holding
      ct_scans/<NNN>.nii                 head CT volumes in HU (049.nii ... 130.nii)
      masks/<NNN>.nii                    hemorrhage masks, same shape
      hemorrhage_diagnosis_raw_ct.csv    PatientNumber,SliceNumber,Intraventricular,
                                         Intraparenchymal,Subarachnoid,Epidural,Subdural,
                                         No_Hemorrhage,Fracture_Yes_No
    or, for the JPG variant (Kaggle "Computed Tomography (CT) images", vbookshelf), at the
    folder holding Patients_CT/<NNN>/brain/<slice>.jpg and hemorrhage_diagnosis.csv. Build with
    `python -m medjax.data build ct_ich --manual_dir=DIR --data_dir=OUT`.
    """

    def __init__(self, *, offline_augment_copies: int = 0, **kwargs):
        """Args: offline_augment_copies: N augmented copies of each train slice with
        hemorrhage in a `train_augmented` split (0: no such split); other arguments go to
        `tfds.core.GeneratorBasedBuilder`."""
        if (
            isinstance(offline_augment_copies, bool)
            or not isinstance(offline_augment_copies, (int, np.integer))
            or offline_augment_copies < 0
        ):
            raise ValueError(
                f"offline_augment_copies={offline_augment_copies!r}: expected an integer >= 0 "
                "(the number of augmented copies of each train slice with hemorrhage)."
            )
        self._offline_augment_copies = int(offline_augment_copies)
        self.build_summary: BuildSummary | None = None
        super().__init__(**kwargs)

    code_path = code_path_property(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        def label() -> tfds.features.Scalar:
            return tfds.features.Scalar(dtype=np.int32)

        return tfds.core.DatasetInfo(
            builder=self,
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "patient_id": tfds.features.Text(),
                    "slice_number": tfds.features.Scalar(dtype=np.int32),
                    "augment_copy": tfds.features.Scalar(dtype=np.int32),
                    "image": tfds.features.Tensor(
                        shape=(None, None, 1),
                        dtype=np.int16,
                        encoding=tfds.features.Encoding.ZLIB,
                    ),
                    "mask": tfds.features.Tensor(
                        shape=(None, None, 1),
                        dtype=np.uint8,
                        encoding=tfds.features.Encoding.ZLIB,
                    ),
                    **{name: label() for name in SUBTYPES},
                    "fracture": label(),
                    "any_hemorrhage": label(),
                    "pixel_spacing_mm": tfds.features.Scalar(dtype=np.float32),
                }
            ),
            metadata=tfds.core.MetadataDict(),
            homepage="https://physionet.org/content/ct-ich/1.3.1/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        layout = detect_layout(manual_dir)
        csv_path = os.path.join(manual_dir, RAW_CSV if layout == "nifti" else JPG_CSV)
        if not os.path.isfile(csv_path):
            raise CtIchDataError(
                f"{csv_path} does not exist; the {layout} layout needs it.\n"
                f"{textwrap.dedent(self.MANUAL_DOWNLOAD_INSTRUCTIONS)}"
            )
        diagnosis = read_diagnosis(csv_path)
        summary = BuildSummary(layout=layout)
        patients = find_patients(manual_dir, layout, summary)
        listed = {number for number, _ in diagnosis}
        present = {p.number for p in patients} | {int(p) for p in summary.patients_without_mask}
        summary.csv_rows_without_slice.extend(
            f"{number:03d}/{slice_number}"
            for number, slice_number in diagnosis
            if number not in present
        )
        for patient in patients:
            if patient.number not in listed:
                summary.slices_without_csv_row.append(f"{patient.patient_id}/*")
                logger.warning(
                    "Skipping patient %s: %s has no row for it.", patient.patient_id, csv_path
                )
        patients = [p for p in patients if p.number in listed]
        assignment = split_patients([p.number for p in patients])
        splits = {
            name: [p for p in patients if assignment[p.number] == name]
            for name in ("train", "validation", "test")
        }
        if self._offline_augment_copies:
            splits["train_augmented"] = splits["train"]

        def examples(name: str, split: list[Patient]) -> Iterator[tuple[str, dict]]:
            augment = name == "train_augmented"
            # The augmented split re-reads the train patients: count their problems once.
            record = BuildSummary() if augment else summary
            patient_ids = set()
            for key, example in self._generate_examples(split, layout, diagnosis, record, augment):
                patient_ids.add(example["patient_id"])
                yield key, example
            summary.patients[name] = sorted(patient_ids)

        return counted_splits(
            splits,
            examples,
            summary.examples,
            error=CtIchDataError,
            unit="slice",
            on_done=lambda: finish_build(self, summary, logger),
        )

    def _generate_examples(
        self,
        patients: list[Patient],
        layout: str,
        diagnosis: Diagnosis,
        summary: BuildSummary,
        augment: bool,
    ) -> Iterator[tuple[str, dict]]:
        """The slices of `patients`; with `augment`, each hemorrhage slice's copies after it."""
        for patient in patients:
            for key, example in self._patient_examples(patient, layout, diagnosis, summary):
                yield key, example
                if augment and (example["any_hemorrhage"] or example["mask"].any()):
                    for copy in range(1, self._offline_augment_copies + 1):
                        yield self._augmented(patient, key, example, copy)

    def _augmented(self, patient: Patient, key: str, example: dict, copy: int) -> tuple[str, dict]:
        rng = np.random.default_rng([AUGMENT_SEED, patient.number, example["slice_number"], copy])
        image, mask, _ = random_affine(
            example["image"],
            example["mask"],
            None,
            rng,
            flip_prob=0.5,
            max_rotate_deg=AUGMENT_MAX_ROTATE_DEG,
            scale_range=AUGMENT_SCALE_RANGE,
            max_shift_frac=0.0,
            border_mode="constant",
            fill_value=AIR_HU,
        )
        return f"{key}/{copy}", {**example, "image": image, "mask": mask, "augment_copy": copy}

    def _patient_examples(
        self, patient: Patient, layout: str, diagnosis: Diagnosis, summary: BuildSummary
    ) -> Iterator[tuple[str, dict]]:
        """(key, example) for every usable slice of one patient, in slice order."""
        if layout == "nifti":
            volumes = _load_nifti(patient, summary)
            if volumes is None:
                return  # Reported; its CSV rows are not counted as rows without a slice.
            hu, mask_volume, spacing = volumes
            numbers = list(range(1, hu.shape[2] + 1))

            def load(number: int) -> tuple[np.ndarray, np.ndarray]:
                return (
                    to_int16_hu(hu[:, :, number - 1]),
                    (mask_volume[:, :, number - 1] >= MASK_THRESHOLD).astype(np.uint8),
                )
        else:
            numbers = _jpg_slice_numbers(patient, summary)
            spacing = math.nan

            def load(number: int) -> tuple[np.ndarray, np.ndarray] | None:
                return _load_jpg_slice(patient, number, summary)

        for number in numbers:
            name = f"{patient.patient_id}/{number}"
            labels = diagnosis.get((patient.number, number))
            if labels is None:
                summary.slices_without_csv_row.append(name)
                continue
            arrays = load(number)
            if arrays is None:
                continue
            image, mask = arrays
            values = labels.values
            any_hemorrhage = 1 - values["No_Hemorrhage"]
            has_mask = bool(mask.any())
            if has_mask and not any_hemorrhage:
                summary.mask_without_hemorrhage_label.append(name)
            elif any_hemorrhage and not has_mask:
                summary.hemorrhage_label_without_mask.append(name)
            yield (
                f"{patient.patient_id}/{number:04d}",
                {
                    "patient_id": patient.patient_id,
                    "slice_number": number,
                    "augment_copy": 0,
                    "image": image[:, :, None],
                    "mask": mask[:, :, None],
                    **{feature: values[column] for feature, column in SUBTYPES.items()},
                    "fracture": values["Fracture_Yes_No"],
                    "any_hemorrhage": any_hemorrhage,
                    "pixel_spacing_mm": spacing,
                },
            )
        present = set(numbers)
        summary.csv_rows_without_slice.extend(
            f"{patient.patient_id}/{number}"
            for patient_number, number in diagnosis
            if patient_number == patient.number and number not in present
        )


def _load_nifti(
    patient: Patient, summary: BuildSummary
) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(scan HU, mask values, pixel spacing) of a NIfTI patient, or None if it is skipped."""
    volumes = []
    for path in (patient.scan_path, patient.mask_path):
        try:
            volume = read_nifti_volume(path)
        except CtReadError as e:
            logger.error("Skipping patient %s: %s", patient.patient_id, e)
            summary.unreadable_files.append(path)
            return None
        for warning in volume.warnings:
            logger.warning("%s: %s", path, warning)
        volumes.append(volume)
    scan, mask = volumes
    if scan.hu.shape != mask.hu.shape:
        logger.error(
            "Skipping patient %s: scan %s is %s but mask %s is %s (H, W, slices).",
            patient.patient_id,
            patient.scan_path,
            scan.hu.shape,
            patient.mask_path,
            mask.hu.shape,
        )
        summary.shape_mismatches.append(patient.patient_id)
        return None
    spacing = scan.pixel_spacing_mm
    mean_spacing = float(np.mean(spacing)) if spacing is not None else math.nan
    return scan.hu, mask.hu, mean_spacing


def _jpg_slice_numbers(patient: Patient, summary: BuildSummary) -> list[int]:
    """The slice numbers of the <number>.jpg files in a patient's brain/ folder."""
    numbers, segs = set(), set()
    for name in sorted(os.listdir(patient.scan_path)):
        stem, extension = os.path.splitext(name)
        seg = stem.endswith(SEG_SUFFIX)
        number = stem[: -len(SEG_SUFFIX)] if seg else stem
        if extension.lower() == ".jpg" and number.isdigit():
            (segs if seg else numbers).add(int(number))
        elif not name.startswith("."):
            summary.ignored_files.append(f"{JPG_DIR}/{patient.patient_id}/brain/{name}")
    summary.ignored_files.extend(
        f"{JPG_DIR}/{patient.patient_id}/brain/{n}{SEG_SUFFIX}.jpg" for n in sorted(segs - numbers)
    )
    return sorted(numbers)


def _load_jpg_slice(
    patient: Patient, number: int, summary: BuildSummary
) -> tuple[np.ndarray, np.ndarray] | None:
    """(int16 HU, uint8 0/1 mask) of one JPG slice, or None if it is skipped (reported)."""
    image_path = os.path.join(patient.scan_path, f"{number}.jpg")
    seg_path = os.path.join(patient.scan_path, f"{number}{SEG_SUFFIX}.jpg")
    arrays = []
    for path in (image_path, seg_path):
        if path == seg_path and not os.path.exists(path):
            arrays.append(None)
            continue
        try:
            arrays.append(read_grayscale(path))
        except ImageReadError as e:
            logger.error("Skipping slice %s/%s: %s", patient.patient_id, number, e)
            summary.unreadable_files.append(path)
            return None
    gray, seg = arrays
    if seg is None:
        return jpg_to_hu(gray), np.zeros(gray.shape, np.uint8)
    if seg.shape != gray.shape:
        logger.error(
            "Skipping slice %s/%s: %s is %s but %s is %s (H, W).",
            patient.patient_id,
            number,
            image_path,
            gray.shape,
            seg_path,
            seg.shape,
        )
        summary.shape_mismatches.append(f"{patient.patient_id}/{number}")
        return None
    return jpg_to_hu(gray), otsu_mask(seg)
