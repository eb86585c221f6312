"""Tests of the CT-ICH dataset: synthetic generator, builder (NIfTI and JPG layouts), problem
reports, splits, offline augmentation and the command line."""

import math
import os
import re
import shutil
import subprocess
import sys

import cv2
import dataset_helpers as helpers
import numpy as np
import pytest
from medjax_datasets.ct_ich import CtIchDataError, synthesize
from medjax_datasets.ct_ich.ct_ich import (
    AUGMENT_SEED,
    CSV_COLUMNS,
    JPG_CSV,
    RAW_CSV,
    SUBTYPES,
    otsu_mask,
    read_diagnosis,
    split_patients,
)

from medjax import data
from medjax.input.augment import random_affine
from medjax.preprocess.ct import (
    read_dicom_series,
    read_nifti_volume,
    window_uint8,
    write_nifti_volume,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "ct_ich"
NUM = 6
SEED = 0
SIZE = 64
SLICES = (8, 12)
PATIENTS = [f"{49 + i:03d}" for i in range(NUM)]
SPLITS = ("train", "validation", "test")
K5 = np.ones((5, 5), np.uint8)


# Reading the raw layout independently of the builder.


def write_rows(path, rows: list[dict]) -> None:
    helpers.write_csv_rows(path, rows, CSV_COLUMNS)


def volumes(raw, patient_id: str) -> tuple[np.ndarray, np.ndarray]:
    scan = read_nifti_volume(os.path.join(raw, "ct_scans", f"{patient_id}.nii"))
    mask = read_nifti_volume(os.path.join(raw, "masks", f"{patient_id}.nii"))
    return scan.hu, mask.hu.astype(np.uint8)


def examples(builder, split: str) -> list[dict]:
    source = builder.as_data_source(split)
    return [source[i] for i in range(len(source))]


def summary_of(builder) -> dict:
    return builder.info.metadata["build_summary"]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> str:
    """The synthetic raw dataset (PhysioNet layout), written once."""
    path = str(tmp_path_factory.mktemp("ct_ich_raw") / "raw")
    synthesize(path, NUM, SEED, image_size=SIZE, slices_per_patient=SLICES)
    return path


@pytest.fixture(scope="module")
def raw_volumes(raw) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {p: volumes(raw, p) for p in PATIENTS}


@pytest.fixture(scope="module")
def built(raw, tmp_path_factory):
    """The builder of the raw dataset, with two augmented copies per hemorrhage slice."""
    out = tmp_path_factory.mktemp("ct_ich_tfds")
    return data.build(NAME, raw, out, offline_augment_copies=2)


# Synthetic generator.


def test_synthetic_layout_and_labels(raw, raw_volumes):
    rows = helpers.read_csv_rows(os.path.join(raw, RAW_CSV))
    assert list(rows[0]) == list(CSV_COLUMNS)
    diagnosis = read_diagnosis(os.path.join(raw, RAW_CSV))
    assert len(diagnosis) == len(rows)
    assert sorted({n for n, _ in diagnosis}) == [int(p) for p in PATIENTS]
    positive_patients = 0
    for patient, (hu, mask) in raw_volumes.items():
        assert hu.shape == mask.shape and hu.shape[:2] == (SIZE, SIZE)
        assert SLICES[0] <= hu.shape[2] <= SLICES[1]
        scan = read_nifti_volume(os.path.join(raw, "ct_scans", f"{patient}.nii"))
        assert scan.slice_spacing_mm == pytest.approx(5.0)
        assert scan.pixel_spacing_mm[0] == pytest.approx(0.45 * 512 / SIZE, rel=0.11)
        assert set(np.unique(mask)) <= {0, 1}
        slices = sorted(s for n, s in diagnosis if n == int(patient))
        assert slices == list(range(1, hu.shape[2] + 1))
        for s in slices:
            labels = diagnosis[(int(patient), s)].values
            drawn = bool(mask[:, :, s - 1].any())
            assert labels["No_Hemorrhage"] == int(not drawn), (patient, s)
            assert any(labels[c] for c in SUBTYPES.values()) == drawn
        positive_patients += bool(mask.any())
        # Air outside, a skull ring above 1000 HU on every slice.
        assert np.median(hu[0, :, :]) < -900
        assert (hu > 1000).any(axis=(0, 1)).all()
    assert positive_patients == round(NUM * 36 / 82)


def check_masks_are_the_blood(raw_volumes) -> None:
    """Masked pixels are blood (55-90 HU, brighter than the brain around them) and the brain
    outside the masks never averages to blood HU."""
    masked, contrasts = [], []
    for hu, mask in raw_volumes.values():
        for s in range(hu.shape[2]):
            plane, blood = hu[:, :, s], mask[:, :, s].astype(bool)
            # Pixels next to bone or calcification are raised by the blur; leave them out.
            hot = cv2.dilate((plane > 120).astype(np.uint8), K5).astype(bool)
            bone = np.argwhere(plane > 300)[:, ::-1].astype(np.int32)
            head = np.zeros(plane.shape, np.uint8)  # Inside the skull's hull (a fracture
            cv2.fillConvexPoly(head, cv2.convexHull(bone), 1)  # may open the ring).
            near_blood = cv2.dilate(blood.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
            brain = head.astype(bool) & ~hot & ~near_blood
            assert brain.sum() > 100
            assert cv2.blur(plane, (3, 3))[brain].max() < 52, s
            inner = blood & ~hot
            # The blur mixes edge pixels with their surroundings; the interior keeps blood HU.
            interior = cv2.erode(blood.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            masked.append(plane[interior & ~hot])
            ring = cv2.dilate(blood.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2)
            ring = ring.astype(bool) & ~blood & ~hot
            if inner.sum() >= 2 and ring.any():
                contrasts.append(plane[inner].mean() - plane[ring].mean())
    masked = np.concatenate(masked)
    assert masked.size >= 20
    assert 60 <= np.median(masked) <= 85
    assert contrasts and min(contrasts) > 10


def test_synthetic_masks_are_exactly_the_blood(tmp_path):
    synthesize(tmp_path, 4, SEED, image_size=128, slices_per_patient=(8, 10))
    check_masks_are_the_blood({p: volumes(tmp_path, p) for p in PATIENTS[:4]})


def test_synthetic_is_deterministic_and_writes_dicom(tmp_path):
    for name in ("a", "b"):
        synthesize(tmp_path / name, 1, 3, image_size=32, slices_per_patient=(4, 4), dicom=True)
    first = open(tmp_path / "a" / "ct_scans" / "049.nii", "rb").read()
    assert first == open(tmp_path / "b" / "ct_scans" / "049.nii", "rb").read()
    series = read_dicom_series(tmp_path / "a" / "dicom" / "049")
    hu, _ = volumes(tmp_path / "a", "049")
    np.testing.assert_array_equal(series.hu, hu)


# Builder.


def test_builder_features_match_the_raw_files(built, raw, raw_volumes):
    diagnosis = read_diagnosis(os.path.join(raw, RAW_CSV))
    total = 0
    for split in SPLITS:
        for example in examples(built, split):
            patient, s = example["patient_id"].decode(), example["slice_number"]
            hu, mask = raw_volumes[patient]
            assert example["image"].dtype == np.int16 and example["image"].shape == (SIZE, SIZE, 1)
            assert example["mask"].dtype == np.uint8 and example["mask"].shape == (SIZE, SIZE, 1)
            np.testing.assert_array_equal(example["image"][:, :, 0], hu[:, :, s - 1])
            np.testing.assert_array_equal(example["mask"][:, :, 0], mask[:, :, s - 1])
            labels = diagnosis[(int(patient), s)].values
            for feature, column in SUBTYPES.items():
                assert example[feature] == labels[column]
            assert example["fracture"] == labels["Fracture_Yes_No"]
            assert example["any_hemorrhage"] == 1 - labels["No_Hemorrhage"]
            assert example["augment_copy"] == 0
            assert example["pixel_spacing_mm"] == pytest.approx(0.45 * 512 / SIZE, rel=0.11)
            total += 1
    assert total == len(diagnosis)
    summary = summary_of(built)
    assert summary["layout"] == "nifti"
    assert not any(
        summary[k]
        for k in (
            "slices_without_csv_row",
            "csv_rows_without_slice",
            "unreadable_files",
            "hemorrhage_label_without_mask",
            "mask_without_hemorrhage_label",
        )
    )


def test_splits_are_by_patient_and_deterministic(built):
    owners = {}
    for split in SPLITS:
        for example in examples(built, split):
            owners.setdefault(example["patient_id"].decode(), set()).add(split)
    assert sorted(owners) == PATIENTS
    assert all(len(splits) == 1 for splits in owners.values())
    counts = {s: sum(o == {s} for o in owners.values()) for s in SPLITS}
    assert counts == {"train": 4, "validation": 1, "test": 1}
    numbers = [int(p) for p in PATIENTS]
    assignment = split_patients(numbers)
    assert split_patients(numbers[::-1]) == assignment
    recorded = summary_of(built)["patients"]
    for split in SPLITS:
        assert recorded[split] == sorted(p for p in PATIENTS if assignment[int(p)] == split)
    # 82 patients: 16 test, then 13 validation of the remaining 66.
    many = split_patients(list(range(49, 131)))
    assert [list(many.values()).count(s) for s in SPLITS] == [53, 13, 16]


def test_offline_augmentation_split(built, raw_volumes):
    train = examples(built, "train")
    augmented = examples(built, "train_augmented")
    bleeding = [e for e in train if e["any_hemorrhage"]]
    assert bleeding
    assert len(augmented) == len(train) + 2 * len(bleeding)
    assert summary_of(built)["examples"]["train_augmented"] == len(augmented)
    copies = [e for e in augmented if e["augment_copy"]]
    assert sorted(e["augment_copy"] for e in copies) == sorted([1, 2] * len(bleeding))
    keys = {(e["patient_id"], e["slice_number"], e["augment_copy"]) for e in augmented}
    assert len(keys) == len(augmented)
    assert {e["patient_id"] for e in copies} <= {e["patient_id"] for e in train}
    changed, blood, around = 0, [], []
    for copy in copies:
        hu, mask = raw_volumes[copy["patient_id"].decode()]
        s = copy["slice_number"] - 1
        assert copy["image"].dtype == np.int16 and copy["image"].shape == (SIZE, SIZE, 1)
        changed += not np.array_equal(copy["image"][:, :, 0], hu[:, :, s])
        image, moved = copy["image"][:, :, 0], copy["mask"][:, :, 0]
        assert image.min() >= -1024 and abs(int(moved.sum()) - int(mask[:, :, s].sum())) <= max(
            4, 0.3 * mask[:, :, s].sum()
        )
        hot = cv2.dilate((image > 120).astype(np.uint8), K5).astype(bool)
        ring = cv2.dilate(moved, np.ones((3, 3), np.uint8), iterations=2).astype(bool)
        blood.append(image[moved.astype(bool) & ~hot])
        around.append(image[ring & ~moved.astype(bool) & ~hot])
    assert changed == len(copies)
    # The masks moved with the blood: brighter than what surrounds them, as in the originals.
    assert np.concatenate(blood).mean() - np.concatenate(around).mean() > 15
    # The copy is the documented joint warp, seeded by (patient, slice, copy).
    copy = copies[-1]
    original = [
        e
        for e in train
        if (e["patient_id"], e["slice_number"]) == (copy["patient_id"], copy["slice_number"])
    ][0]
    rng = np.random.default_rng(
        [AUGMENT_SEED, int(copy["patient_id"]), copy["slice_number"], copy["augment_copy"]]
    )
    image, mask, _ = random_affine(
        original["image"],
        original["mask"],
        None,
        rng,
        max_rotate_deg=15.0,
        scale_range=(0.9, 1.1),
        max_shift_frac=0.0,
        fill_value=-1024,
    )
    np.testing.assert_array_equal(copy["image"], image)
    np.testing.assert_array_equal(copy["mask"], mask)


def test_offline_augmentation_is_reproducible(built, raw, tmp_path):
    again = data.build(NAME, raw, tmp_path, offline_augment_copies=2)
    first, second = examples(built, "train_augmented"), examples(again, "train_augmented")
    index = {(e["patient_id"], e["slice_number"], e["augment_copy"]): e for e in second}
    for example in first:
        other = index[(example["patient_id"], example["slice_number"], example["augment_copy"])]
        np.testing.assert_array_equal(example["image"], other["image"])
        np.testing.assert_array_equal(example["mask"], other["mask"])
    with pytest.raises(ValueError, match="offline_augment_copies=-1"):
        data.build(NAME, raw, tmp_path, offline_augment_copies=-1)


# Problems in the raw data.


@pytest.fixture(scope="module")
def broken(raw, raw_volumes, tmp_path_factory):
    """A copy of the raw data with one problem per patient, built; returns (builder, roles)."""
    root = tmp_path_factory.mktemp("ct_ich_broken")
    path = str(root / "raw")
    shutil.copytree(raw, path)
    # Break three train patients, so that every split keeps a patient.
    assignment = split_patients([int(p) for p in PATIENTS])
    train = [p for p in PATIENTS if assignment[int(p)] == "train"]
    train.sort(key=lambda p: not raw_volumes[p][1].any())
    held_out = [p for p in PATIENTS if assignment[int(p)] != "train"]
    keep = sorted(held_out + train[:1], key=lambda p: not raw_volumes[p][1].any())
    no_mask, corrupt, mismatch = train[1:]
    roles = {"keep": keep, "no_mask": no_mask, "corrupt": corrupt, "mismatch": mismatch}
    os.remove(os.path.join(path, "masks", f"{no_mask}.nii"))
    scan_path = os.path.join(path, "ct_scans", f"{corrupt}.nii")
    with open(scan_path, "r+b") as f:
        f.truncate(os.path.getsize(scan_path) // 2)
    roles["corrupt_path"] = scan_path
    hu, mask = raw_volumes[mismatch]
    write_nifti_volume(
        os.path.join(path, "masks", f"{mismatch}.nii"), mask[:, :, :-1], (1.0, 1.0), 5.0, np.uint8
    )
    rows = helpers.read_csv_rows(os.path.join(path, RAW_CSV))
    target = keep[0]
    bleeding = [
        s + 1
        for s in range(raw_volumes[target][1].shape[2])
        if raw_volumes[target][1][:, :, s].any()
    ]
    clean = [
        s + 1
        for s in range(raw_volumes[target][1].shape[2])
        if not raw_volumes[target][1][:, :, s].any()
    ]
    roles["unlabelled_blood"] = f"{target}/{bleeding[0]}"
    roles["labelled_clean"] = f"{target}/{clean[0]}"
    roles["no_row"] = f"{keep[1]}/2"
    kept_rows = []
    for row in rows:
        name = f"{int(row['PatientNumber']):03d}/{row['SliceNumber']}"
        if name == roles["no_row"]:
            continue
        if name == roles["unlabelled_blood"]:
            row.update({c: "0" for c in SUBTYPES.values()}, No_Hemorrhage="1")
        if name == roles["labelled_clean"]:
            row.update(Subdural="1", No_Hemorrhage="0")
        kept_rows.append(row)
    extra = dict(kept_rows[0], PatientNumber=str(int(keep[2])), SliceNumber="99")
    ghost = dict(kept_rows[0], PatientNumber="200", SliceNumber="1")
    write_rows(os.path.join(path, RAW_CSV), kept_rows + [extra, ghost])
    roles["extra_rows"] = [f"{keep[2]}/99", "200/1"]
    return data.build(NAME, path, root / "tfds"), roles


def built_slices(builder) -> set[str]:
    return {
        f"{e['patient_id'].decode()}/{e['slice_number']}"
        for split in SPLITS
        for e in examples(builder, split)
    }


def test_slice_without_csv_row_is_skipped_and_reported(broken):
    builder, roles = broken
    assert summary_of(builder)["slices_without_csv_row"] == [roles["no_row"]]
    assert roles["no_row"] not in built_slices(builder)
    assert sorted(summary_of(builder)["csv_rows_without_slice"]) == sorted(roles["extra_rows"])


def test_missing_mask_skips_the_patient(broken):
    builder, roles = broken
    summary = summary_of(builder)
    assert summary["patients_without_mask"] == [roles["no_mask"]]
    assert not any(s.startswith(roles["no_mask"] + "/") for s in built_slices(builder))
    assert re.search(
        rf"without a mask file \(skipped\): 1 \[{roles['no_mask']}\]",
        builder.build_summary.report(),
    )


def test_corrupt_nifti_and_shape_mismatch_skip_the_patient(broken):
    builder, roles = broken
    summary = summary_of(builder)
    assert summary["unreadable_files"] == [roles["corrupt_path"]]
    assert summary["shape_mismatches"] == [roles["mismatch"]]
    patients = {s.split("/")[0] for s in built_slices(builder)}
    assert patients == set(roles["keep"])
    assert sorted(p for split in SPLITS for p in summary["patients"][split]) == sorted(
        roles["keep"]
    )


def test_label_mask_disagreements_are_kept_and_counted(broken):
    builder, roles = broken
    summary = summary_of(builder)
    assert summary["mask_without_hemorrhage_label"] == [roles["unlabelled_blood"]]
    assert summary["hemorrhage_label_without_mask"] == [roles["labelled_clean"]]
    kept = built_slices(builder)
    assert roles["unlabelled_blood"] in kept and roles["labelled_clean"] in kept


@pytest.mark.parametrize(
    "header, line, pattern",
    [
        (
            "PatientNumber,SliceNumber,Intraventricular,Intraparenchymal,Subarachnoid,"
            "Epidural,No_Hemorrhage,Fracture_Yes_No",
            "49,1,0,0,0,0,1,0",
            r"line 1: missing column\(s\) Subdural",
        ),
        (None, "49,2,0,0,0,x,0,1,0", r"line 3, column Epidural: 'x' is not an integer"),
        (
            None,
            "49,1,0,0,0,0,0,1,0",
            r"line 3, column SliceNumber: patient 49 slice 1 already "
            r"appears on line 2",
        ),
        (None, "49,2,0,0,0,0,0,2,0", r"line 3, column No_Hemorrhage: 2 is not 0 or 1"),
        (None, "49,0,0,0,0,0,0,1,0", r"line 3, column SliceNumber: 0 is out of range"),
    ],
)
def test_malformed_csv_names_file_line_and_column(tmp_path, header, line, pattern):
    path = tmp_path / RAW_CSV
    lines = [header or ",".join(CSV_COLUMNS)]
    if header is None:
        lines.append("49,1,0,0,0,0,0,1,0")
    path.write_text("\n".join(lines + [line]) + "\n")
    with pytest.raises(CtIchDataError, match=re.escape(str(path)) + ", " + pattern):
        read_diagnosis(str(path))


def test_malformed_csv_stops_the_build(raw, tmp_path):
    path = tmp_path / "raw"
    shutil.copytree(raw, path)
    text = (path / RAW_CSV).read_text().splitlines()
    text[3] = text[3].replace(",", ",1.5,", 1).rsplit(",", 1)[0]
    (path / RAW_CSV).write_text("\n".join(text) + "\n")
    with pytest.raises(CtIchDataError, match=r"line 4, column SliceNumber: '1.5'"):
        data.build(NAME, path, tmp_path / "tfds")


# Kaggle JPG variant.


def write_kaggle_jpgs(raw, raw_volumes, out) -> tuple[str, str]:
    """The Kaggle layout of the synthetic data; returns a clean slice given a dark seg JPG."""
    dark_slice = None
    for patient, (hu, mask) in raw_volumes.items():
        brain = os.path.join(out, "Patients_CT", patient, "brain")
        bone = os.path.join(out, "Patients_CT", patient, "bone")
        os.makedirs(brain)
        os.makedirs(bone)
        for s in range(hu.shape[2]):
            number = s + 1
            cv2.imwrite(os.path.join(brain, f"{number}.jpg"), window_uint8(hu[:, :, s], (40, 120)))
            cv2.imwrite(os.path.join(bone, f"{number}.jpg"), window_uint8(hu[:, :, s], "bone"))
            if mask[:, :, s].any():
                cv2.imwrite(
                    os.path.join(brain, f"{number}_HGE_Seg.jpg"),
                    mask[:, :, s] * 255,
                    [cv2.IMWRITE_JPEG_QUALITY, 75],
                )
            elif dark_slice is None:
                noise = np.random.default_rng(0).integers(0, 30, hu.shape[:2]).astype(np.uint8)
                cv2.imwrite(os.path.join(brain, f"{number}_HGE_Seg.jpg"), noise)
                dark_slice = f"{patient}/{number}"
    shutil.copy(os.path.join(raw, RAW_CSV), os.path.join(out, JPG_CSV))
    return dark_slice


def test_kaggle_jpg_variant(raw, raw_volumes, tmp_path):
    jpg_raw = str(tmp_path / "kaggle")
    dark_slice = write_kaggle_jpgs(raw, raw_volumes, jpg_raw)
    builder = data.build(NAME, jpg_raw, tmp_path / "tfds")
    summary = summary_of(builder)
    assert summary["layout"] == "jpg"
    assert not summary["hemorrhage_label_without_mask"] and not summary["unreadable_files"]
    intersection = union = 0
    seen = set()
    for split in SPLITS:
        for example in examples(builder, split):
            patient, s = example["patient_id"].decode(), example["slice_number"]
            seen.add(f"{patient}/{s}")
            hu, mask = raw_volumes[patient]
            expected = np.clip(hu[:, :, s - 1], -20, 100)
            image = example["image"][:, :, 0]
            assert image.dtype == np.int16 and image.min() >= -20 and image.max() <= 100
            assert np.abs(image - expected).mean() < 4
            assert math.isnan(example["pixel_spacing_mm"])
            got, want = example["mask"][:, :, 0].astype(bool), mask[:, :, s - 1].astype(bool)
            if f"{patient}/{s}" == dark_slice:
                assert not got.any()
            intersection += (got & want).sum()
            union += (got | want).sum()
    assert len(seen) == sum(hu.shape[2] for hu, _ in raw_volumes.values())
    assert union > 50 and intersection / union > 0.9


def test_otsu_mask():
    rng = np.random.default_rng(1)
    dark = rng.integers(0, 60, (16, 16)).astype(np.uint8)
    assert not otsu_mask(dark).any()
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 10:24] = 1
    ok, encoded = cv2.imencode(".jpg", mask * 255, [cv2.IMWRITE_JPEG_QUALITY, 50])
    lossy = cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)
    assert ok and len(np.unique(lossy)) > 2
    np.testing.assert_array_equal(otsu_mask(lossy), mask)


# Command line.


def test_cli_build(raw, tmp_path):
    out = tmp_path / "tfds"
    command = ["-m", "medjax.data", "build", NAME, "--manual_dir", raw, "--data_dir", str(out)]
    proc = subprocess.run(
        [sys.executable, *command, "--option", "offline_augment_copies=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    counts = {k: int(v) for k, v in re.findall(r"(\w+): (\d+) examples", proc.stdout)}
    assert set(counts) == {*SPLITS, "train_augmented"}
    assert sum(counts[s] for s in SPLITS) == len(read_diagnosis(os.path.join(raw, RAW_CSV)))
    assert counts["train_augmented"] > counts["train"]
