"""Tests of the CRL ultrasound dataset: synthetic generator, builder, medjax.data API and CLI."""

import contextlib
import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import cv2
import dataset_helpers as helpers
import numpy as np
import pytest
from medjax_datasets.crl_ultrasound import CrlDataError
from medjax_datasets.crl_ultrasound.crl_ultrasound import split_patients
from medjax_datasets.crl_ultrasound.synthetic import robinson_ga_days

from medjax import data
from medjax.preprocess.image import ImageReadError, read_grayscale, read_mask

NAME = "crl_ultrasound"
NUM = 16
SEED = 0
SPLITS = ("train", "validation", "test")


@contextlib.contextmanager
def no_network():
    """Makes any attempt to open a network connection fail the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        yield


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("crl") / "raw"
    data.synthesize(NAME, out, NUM, SEED)
    return out


@pytest.fixture(scope="module")
def built(raw_dir, tmp_path_factory):
    with no_network():
        return data.build(NAME, raw_dir, tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def raw_copy(raw_dir, tmp_path):
    return shutil.copytree(raw_dir, tmp_path / "raw")


def metadata_rows(raw):
    return helpers.read_csv_rows(os.path.join(raw, "metadata.csv"))


def landmarks(raw, image_id):
    with open(os.path.join(raw, "annotations", f"{image_id}.json")) as f:
        shapes = json.load(f)["shapes"]
    return {s["label"]: np.array(s["points"][0]) for s in shapes}


def examples(source):
    return [source[i] for i in range(len(source))]


# Synthetic generator.


def test_synthetic_layout(raw_dir):
    with open(raw_dir / "metadata.csv") as f:
        assert f.readline().strip() == "id,patient_id,pixel_spacing_mm,ga_days,quality"
    rows = metadata_rows(raw_dir)
    assert len(rows) == NUM
    assert len({r["patient_id"] for r in rows}) >= 3
    assert {r["quality"] for r in rows} <= {"good", "bad"}
    for row in rows:
        image = read_grayscale(raw_dir / "images" / f"{row['id']}.png")
        mask = cv2.imread(str(raw_dir / "masks" / f"{row['id']}.png"), cv2.IMREAD_UNCHANGED)
        assert 120 <= image.shape[0] <= 160 and 150 <= image.shape[1] <= 200
        assert mask.shape == image.shape and set(np.unique(mask)) == {0, 255}
        with open(raw_dir / "annotations" / f"{row['id']}.json") as f:
            annotation = json.load(f)
        assert (annotation["imageHeight"], annotation["imageWidth"]) == image.shape
        assert sorted(s["label"] for s in annotation["shapes"]) == ["crown", "rump"]
        for shape in annotation["shapes"]:
            assert shape["shape_type"] == "point" and len(shape["points"]) == 1


def test_synthetic_is_deterministic(raw_dir, tmp_path):
    data.synthesize(NAME, tmp_path / "same", NUM, SEED)
    data.synthesize(NAME, tmp_path / "other", NUM, SEED + 1)
    reference = helpers.file_contents(raw_dir)
    assert helpers.file_contents(tmp_path / "same") == reference
    other = helpers.file_contents(tmp_path / "other")
    assert other["metadata.csv"] != reference["metadata.csv"]
    assert other["images/P0001_01.png"] != reference["images/P0001_01.png"]


def test_synthetic_refuses_non_empty_dir(raw_dir):
    with pytest.raises(FileExistsError):
        data.synthesize(NAME, raw_dir, 2, SEED)


def test_synthetic_ground_truth(raw_dir):
    for row in metadata_rows(raw_dir):
        mask = read_mask(raw_dir / "masks" / f"{row['id']}.png")
        ys, xs = np.nonzero(mask)
        points = landmarks(raw_dir, row["id"])
        for xy in points.values():
            assert np.hypot(xs - xy[0], ys - xy[1]).min() <= 1.5
        # Crown and rump are the mask's extremes along the crown-rump axis.
        crl_px = np.linalg.norm(points["crown"] - points["rump"])
        axis = (points["crown"] - points["rump"]) / crl_px
        along = (xs - points["rump"][0]) * axis[0] + (ys - points["rump"][1]) * axis[1]
        assert along.min() > -0.5 and along.max() < crl_px + 0.5
        crl_mm = crl_px * float(row["pixel_spacing_mm"])
        assert 15.0 <= crl_mm <= 80.0
        assert crl_mm == pytest.approx(round(crl_mm, 1), abs=1e-9)  # The drawn CRL, to 0.1 mm.
        assert abs(float(row["ga_days"]) - robinson_ga_days(crl_mm)) <= 2.0
        assert 0.25 <= crl_px / mask.shape[1] <= 0.65


# Builder.


def test_build_features(built):
    sizes = {}
    for split in SPLITS:
        source = built.as_data_source(split)
        sizes[split] = len(source)
        for ex in examples(source):
            assert set(ex) == {
                "id",
                "patient_id",
                "image",
                "mask",
                "crown",
                "rump",
                "pixel_spacing_mm",
                "ga_days",
                "quality",
            }
            assert isinstance(ex["id"], bytes) and isinstance(ex["patient_id"], bytes)
            assert ex["image"].dtype == np.uint8
            assert ex["image"].ndim == 3 and ex["image"].shape[2] == 1
            assert ex["mask"].dtype == np.uint8 and ex["mask"].shape == ex["image"].shape
            assert set(np.unique(ex["mask"])) == {0, 1}
            for name in ("crown", "rump"):
                assert ex[name].dtype == np.float32 and ex[name].shape == (2,)
            assert ex["pixel_spacing_mm"] > 0 and 40 < ex["ga_days"] < 120
            assert ex["quality"] in (0, 1)
    assert all(sizes.values()) and sum(sizes.values()) == NUM


def test_build_matches_raw(built, raw_dir):
    rows = {r["id"]: r for r in metadata_rows(raw_dir)}
    source = built.as_data_source("train")
    ex = source[0]
    row = rows[ex["id"].decode()]
    image = read_grayscale(raw_dir / "images" / f"{row['id']}.png")
    np.testing.assert_array_equal(ex["image"][:, :, 0], image)
    points = landmarks(raw_dir, row["id"])
    np.testing.assert_allclose(ex["crown"], points["crown"], rtol=1e-6)
    np.testing.assert_allclose(ex["rump"], points["rump"], rtol=1e-6)
    assert ex["pixel_spacing_mm"] == pytest.approx(float(row["pixel_spacing_mm"]), rel=1e-6)
    assert ex["quality"] == {"good": 1, "bad": 0}[row["quality"]]


def test_splits_are_patient_disjoint(built):
    patients = {
        split: {ex["patient_id"] for ex in examples(built.as_data_source(split))}
        for split in SPLITS
    }
    assert all(patients.values())
    assert not patients["train"] & patients["validation"]
    assert not patients["train"] & patients["test"]
    assert not patients["validation"] & patients["test"]


@pytest.mark.parametrize("num_patients", [3, 4, 7, 10, 40, 101])
def test_split_patients(num_patients):
    ids = [f"P{i:04d}" for i in range(num_patients)]
    assignment = split_patients(ids)
    assert assignment == split_patients(ids[::-1])
    counts = {s: sum(v == s for v in assignment.values()) for s in SPLITS}
    assert set(assignment) == set(ids) and min(counts.values()) >= 1
    if num_patients >= 10:
        for split, fraction in zip(SPLITS, (0.7, 0.15, 0.15)):
            assert abs(counts[split] - fraction * num_patients) <= 1


def test_split_needs_three_patients():
    with pytest.raises(CrlDataError, match="at least 3"):
        split_patients(["a", "b", "a"])


def test_empty_quality_is_unknown(raw_copy, tmp_path):
    rows = metadata_rows(raw_copy)
    rows[0]["quality"] = ""
    with open(raw_copy / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    builder = data.build(NAME, raw_copy, tmp_path / "tfds")
    qualities = {}
    for split in SPLITS:
        source = builder.as_data_source(split)
        qualities.update((ex["id"].decode(), ex["quality"]) for ex in examples(source))
    assert qualities[rows[0]["id"]] == -1


def _build_error(raw, data_dir, match):
    with pytest.raises(ValueError, match=match):
        data.build(NAME, raw, data_dir)
    assert data.built_configs(NAME, data_dir) == []  # Nothing that looks built is left behind.


def test_error_missing_mask(raw_copy, tmp_path):
    os.remove(raw_copy / "masks" / "P0002_01.png")
    _build_error(raw_copy, tmp_path / "tfds", r"P0002_01\.png.*does not exist")


def test_error_corrupt_png(raw_copy, tmp_path):
    (raw_copy / "images" / "P0003_01.png").write_bytes(b"this is not a png at all")
    _build_error(raw_copy, tmp_path / "tfds", r"P0003_01\.png.*could not be decoded")


def test_error_bad_json(raw_copy, tmp_path):
    (raw_copy / "annotations" / "P0001_01.json").write_text('{"shapes": [')
    _build_error(raw_copy, tmp_path / "tfds", r"P0001_01\.json is not valid JSON")


def test_error_missing_landmark(raw_copy, tmp_path):
    path = raw_copy / "annotations" / "P0001_01.json"
    annotation = json.loads(path.read_text())
    annotation["shapes"] = [s for s in annotation["shapes"] if s["label"] != "rump"]
    path.write_text(json.dumps(annotation))
    _build_error(raw_copy, tmp_path / "tfds", r"P0001_01\.json has no 'rump' point")


def test_error_mask_size(raw_copy, tmp_path):
    path = raw_copy / "masks" / "P0001_01.png"
    cv2.imwrite(str(path), np.zeros((10, 10), np.uint8))
    _build_error(raw_copy, tmp_path / "tfds", r"P0001_01\.png is 10x10 but its image")


def test_error_missing_columns(raw_copy, tmp_path):
    path = raw_copy / "metadata.csv"
    lines = path.read_text().splitlines()
    rows = [",".join(line.split(",")[:3]) for line in lines]  # Drop ga_days and quality.
    path.write_text("\n".join(rows) + "\n")
    match = r"metadata\.csv lacks the required column\(s\) ga_days, quality"
    _build_error(raw_copy, tmp_path / "tfds", match)


@pytest.mark.parametrize("content", [None, b"", b"garbage"])
def test_read_image_errors(tmp_path, content):
    path = tmp_path / "scan.png"
    if content is not None:
        path.write_bytes(content)
    for read in (read_grayscale, read_mask):
        with pytest.raises(ImageReadError, match=re.escape(str(path))):
            read(path)


# medjax.data API and CLI.


def test_build_is_keyed_by_raw_content(built, raw_dir, raw_copy):
    assert data.source_key(raw_dir) == built.builder_config.name
    assert data.source_key(raw_copy) == data.source_key(raw_dir)  # Same name and content.
    (raw_copy / "images" / "P0001_01.png").write_bytes(b"changed")
    assert data.source_key(raw_copy) != data.source_key(raw_dir)


def test_load_builder(built):
    loaded = data.load_builder(NAME, built.data_dir_root)
    assert loaded.data_dir == built.data_dir
    assert {s: loaded.info.splits[s].num_examples for s in SPLITS} == {
        s: built.info.splits[s].num_examples for s in SPLITS
    }


def test_ensure_built_is_idempotent(tmp_path):
    kwargs = dict(data_dir=tmp_path, synthetic_num=8, synthetic_seed=3)
    with no_network():
        first = data.ensure_built(NAME, **kwargs)
    raw = data.synthetic_raw_dir(NAME, tmp_path, 8, 3)
    assert os.listdir(tmp_path / "raw") == [os.path.basename(raw)]
    watched = (os.path.join(first.data_dir, "dataset_info.json"), os.path.join(raw, "metadata.csv"))
    stamps = [os.stat(path).st_mtime_ns for path in watched]
    second = data.ensure_built(NAME, **kwargs)
    assert second.data_dir == first.data_dir
    assert [os.stat(path).st_mtime_ns for path in watched] == stamps
    assert len(second.as_data_source("train")) > 0


def run_cli(*args):
    result = subprocess.run(
        [sys.executable, "-m", "medjax.data", *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_cli(tmp_path):
    assert NAME in run_cli("list")
    raw, out = tmp_path / "raw", tmp_path / "tfds"
    run_cli("synthesize", NAME, "--out", str(raw), "--num", "6", "--seed", "1")
    assert len(metadata_rows(raw)) == 6
    stdout = run_cli("build", NAME, f"--manual_dir={raw}", f"--data_dir={out}")
    assert re.search(r"train: \d+ examples", stdout)
    builder = data.load_builder(NAME, out)
    assert sum(builder.info.splits[s].num_examples for s in SPLITS) == 6
