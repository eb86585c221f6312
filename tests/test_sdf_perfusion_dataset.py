"""Tests of the SDF perfusion dataset: synthetic generator, labels, splits, builder and CLI."""

import csv
import math
import os
import shutil
import subprocess
import sys

import cv2
import dataset_helpers as helpers
import numpy as np
import pytest
from medjax_datasets.sdf_perfusion import SdfDataError, SdfPerfusion, flow_class, mfi
from medjax_datasets.sdf_perfusion.sdf_perfusion import (
    assign_splits,
    read_labels,
    split_patients,
)
from medjax_datasets.sdf_perfusion.synthetic import render_video

from medjax import data
from medjax.preprocess.video import read_video_gray

NAME = "sdf_perfusion"
NUM = 12
SEED = 0
SIZE = 96
NATIVE_FRAMES = 36
OPTIONS = {"frame_size": 32, "num_frames": 24}
BUILDER_LOGGER = "medjax_datasets.sdf_perfusion.sdf_perfusion"
HEADER = ["video_id", "patient_id", "mfi_q1", "mfi_q2", "mfi_q3", "mfi_q4"]
QUADRANTS = ("mfi_q1", "mfi_q2", "mfi_q3", "mfi_q4")


def label_rows(raw) -> list[dict[str, str]]:
    return helpers.read_csv_rows(os.path.join(raw, "labels.csv"))


def write_labels(raw, rows: list[dict[str, str]]) -> None:
    helpers.write_csv_rows(os.path.join(raw, "labels.csv"), rows)


def scores_of(row: dict[str, str]) -> list[int]:
    return [int(row[q]) if row[q] else -1 for q in QUADRANTS]


def all_examples(builder) -> dict[str, dict]:
    return helpers.all_examples(builder, "video_id")


def build_logged(raw, data_dir, **options):
    """data.build, returning (builder, messages the SDF builder logged)."""
    return helpers.build_logged(NAME, BUILDER_LOGGER, raw, data_dir, **options)


def resized(frames: np.ndarray, size: int) -> np.ndarray:
    return np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in frames])


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdf") / "raw"
    data.DATASETS[NAME].synthesize(out, NUM, SEED, size=(SIZE, SIZE), num_frames=NATIVE_FRAMES)
    return out


@pytest.fixture(scope="module")
def built(raw_dir, tmp_path_factory):
    return build_logged(raw_dir, tmp_path_factory.mktemp("tfds"), **OPTIONS)


@pytest.fixture(scope="module")
def examples(built):
    return all_examples(built[0])


# Synthetic generator.


def test_synthetic_layout(raw_dir):
    with open(raw_dir / "labels.csv") as f:
        assert f.readline().strip().split(",") == HEADER
    rows = label_rows(raw_dir)
    assert len(rows) == NUM and len({r["video_id"] for r in rows}) == NUM
    assert sorted(os.listdir(raw_dir / "videos")) == sorted(f"{r['video_id']}.avi" for r in rows)
    per_patient = {}
    for row in rows:
        per_patient[row["patient_id"]] = per_patient.get(row["patient_id"], 0) + 1
        assert all(row[q] in ("", "0", "1", "2", "3") for q in QUADRANTS)
        assert sum(row[q] == "" for q in QUADRANTS) <= 2
        frames, fps = read_video_gray(raw_dir / "videos" / f"{row['video_id']}.avi")
        assert frames.shape == (NATIVE_FRAMES, SIZE, SIZE) and fps == 30.0
        assert 60 < frames.mean() < 220 and frames.std() > 10
    assert len(per_patient) == 4 and all(1 <= n <= 4 for n in per_patient.values())
    scores = [s for r in rows for s in scores_of(r) if s >= 0]
    assert set(scores) == {0, 1, 2, 3}  # Every flow type occurs...
    assert scores.count(3) + scores.count(2) > scores.count(1) + scores.count(0)  # ...good most.


def test_synthetic_is_deterministic(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        data.DATASETS[NAME].synthesize(tmp_path / name, 2, seed, size=(32, 32), num_frames=3)
    assert helpers.file_contents(tmp_path / "a") == helpers.file_contents(tmp_path / "b")
    assert helpers.file_contents(tmp_path / "a") != helpers.file_contents(tmp_path / "c")


def test_synthetic_refuses_non_empty_dir(raw_dir):
    with pytest.raises(FileExistsError, match="not empty"):
        data.synthesize(NAME, raw_dir, 2, SEED)


def motion_energy(frames: np.ndarray, lag: int) -> np.ndarray:
    """(4,) mean |I(t + lag) - I(t)| over the vessel pixels of quadrants q1..q4.

    Vessel pixels are those clearly darker than the bright background in the temporal mean.
    """
    frames = frames.astype(np.float32)
    mean = frames.mean(axis=0)
    vessel = mean < 0.85 * np.percentile(mean, 90)
    change = np.abs(frames[lag:] - frames[:-lag]).mean(axis=0)
    half = frames.shape[1] // 2
    return np.array(
        [
            change[rows, cols][vessel[rows, cols]].mean()
            for rows in (slice(0, half), slice(half, None))
            for cols in (slice(0, half), slice(half, None))
        ]
    )


def test_synthetic_labels_follow_the_motion(raw_dir):
    """Cells move fastest in quadrants scored continuous, slower in sluggish, not at all in
    no-flow ones, measured on the written AVIs with the scores of labels.csv."""
    by_score = {lag: {s: [] for s in range(4)} for lag in (1, 3)}
    for row in label_rows(raw_dir):
        frames, _ = read_video_gray(raw_dir / "videos" / f"{row['video_id']}.avi")
        for lag, energies in by_score.items():
            for score, energy in zip(scores_of(row), motion_energy(frames, lag)):
                if score >= 0:
                    energies[score].append(energy)
    lag1 = {s: np.mean(e) for s, e in by_score[1].items()}
    lag3 = {s: np.mean(e) for s, e in by_score[3].items()}
    # Continuous cells move a cell length between frames, sluggish ones a fraction of it.
    assert lag1[3] > 1.6 * lag1[2]
    # Over three frames sluggish cells have moved; stopped ones only show noise and jitter.
    assert lag3[2] > 1.5 * lag3[0]
    assert lag3[3] > lag3[1] > 1.3 * lag3[0]  # Intermittent: moving part of the time.


def test_single_frame_does_not_tell_the_flow():
    """The flows change only how cells move: the first frame is the same whatever they are."""
    flowing = render_video(np.random.default_rng(3), (3, 3, 2, 1), size=(64, 64), num_frames=6)
    stopped = render_video(np.random.default_rng(3), (0, 0, 0, 0), size=(64, 64), num_frames=6)
    np.testing.assert_array_equal(flowing.frames[0], stopped.frames[0])
    np.testing.assert_array_equal(flowing.vessel_mask, stopped.vessel_mask)
    assert np.abs(flowing.frames[5].astype(int) - stopped.frames[5]).mean() > 1.0
    # Speeds in px/frame of a 64-px image: half the 128-px speeds in the generator's table.
    speeds = flowing.mean_speeds
    assert all(1.25 * 0.85 <= s <= 2.5 * 1.15 for s in speeds[:2])  # Pulsatile wobble.
    assert 0.3 <= speeds[2] <= 0.5 and 0 < speeds[3] < 1.75
    np.testing.assert_array_equal(stopped.mean_speeds, 0.0)


# Labels and splits, without building.


@pytest.mark.parametrize(
    "scores, expected_mfi, expected_class",
    [
        ((3, 3, 3, 3), 3.0, 3),
        ((3, 3, 2, -1), 8 / 3, 3),  # A quadrant not scored: the mean of three.
        ((3, 3, 0, 0), 1.5, 0),  # Tie: the worse flow; rounding the mean would say 2.
        ((3, 2, -1, -1), 2.5, 2),
        ((1, 2, 3, 0), 1.5, 0),
        ((2, 1, 1, 3), 1.75, 1),
        ((-1, 0, -1, -1), 0.0, 0),
    ],
)
def test_mfi_and_flow_class(scores, expected_mfi, expected_class):
    assert mfi(scores) == pytest.approx(expected_mfi)
    assert flow_class(scores) == expected_class


def test_no_scored_quadrant_has_no_label():
    assert math.isnan(mfi((-1, -1, -1, -1))) and flow_class((-1, -1, -1, -1)) == -1


def test_patient_split_fractions_and_determinism():
    patients = [f"P{i:03d}" for i in range(40)]
    assignment = split_patients(patients + patients[:5])  # Repeats: one patient, one split.
    counts = {s: list(assignment.values()).count(s) for s in ("train", "validation", "test")}
    assert counts == {"train": 28, "validation": 6, "test": 6}
    assert split_patients(list(reversed(patients))) == assignment
    assert split_patients([f"P{i:03d}" for i in range(41)])["P000"] == assignment["P000"]
    assert set(split_patients(["a", "b", "c"]).values()) == {"train", "validation", "test"}
    with pytest.raises(SdfDataError, match="2 patient"):
        split_patients(["a", "b", "a"])


def write_csv(path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def test_split_column_is_honoured(tmp_path):
    rows = [
        ["v1.avi", "p1", "3", "3", "3", "3", "Train"],
        ["v2", "p1", "2", "", "2", "2", "TRAIN"],
        ["v3", "p2", "1", "1", "1", "1", "val"],
        ["v4", "p3", "0", "0", "0", "0", "Test"],
        ["v5", "p4", "3", "2", "3", "2", "validation"],
    ]
    write_csv(tmp_path / "labels.csv", HEADER + ["split"], rows)
    records = read_labels(str(tmp_path))
    assert [r.video_id for r in records] == ["v1", "v2", "v3", "v4", "v5"]
    assert records[1].scores == (2, -1, 2, 2)
    assert records[0].path == os.path.join(str(tmp_path), "videos", "v1.avi")
    assert assign_splits(records) == {
        "v1": "train",
        "v2": "train",
        "v3": "validation",
        "v4": "test",
        "v5": "validation",
    }


def test_patient_in_two_splits_is_rejected(tmp_path):
    rows = [
        ["v1", "p1", "3", "3", "3", "3", "train"],
        ["v2", "p2", "3", "3", "3", "3", "test"],
        ["v3", "p1", "3", "3", "3", "3", "test"],
    ]
    path = tmp_path / "labels.csv"
    write_csv(path, HEADER + ["split"], rows)
    with pytest.raises(SdfDataError) as error:
        assign_splits(read_labels(str(tmp_path)), str(path))
    message = str(error.value)
    assert str(path) in message and "line 4" in message and "'p1'" in message
    assert "line 2" in message and "train" in message and "test" in message


GOOD_ROW = ["v1", "p1", "3", "2", "", "1"]


@pytest.mark.parametrize(
    "header, rows, line, column, words",
    [
        (HEADER[:5], [GOOD_ROW[:5]], None, None, "mfi_q4"),
        (HEADER, [GOOD_ROW, ["v2", "p1", "4", "2", "2", "2"]], 3, "mfi_q1", "'4'"),
        (HEADER, [["v2", "p1", "2", "nan", "2", "2"]], 2, "mfi_q2", "'nan'"),
        (HEADER, [["v2", "p1", "2", "2", "x", "2"]], 2, "mfi_q3", "'x'"),
        (HEADER, [["v2", "p1", "2", "2", "2", "1.5"]], 2, "mfi_q4", "'1.5'"),
        (HEADER, [["v2", "p1", "-1", "2", "2", "2"]], 2, "mfi_q1", "'-1'"),
        (HEADER, [GOOD_ROW, GOOD_ROW], 3, "video_id", "line 2"),
        (HEADER, [["v2", "", "2", "2", "2", "2"]], 2, "patient_id", "empty"),
        (HEADER, [["", "p1", "2", "2", "2", "2"]], 2, "video_id", "empty"),
        (HEADER + ["split"], [GOOD_ROW + ["dev"]], 2, "split", "'dev'"),
        (HEADER + ["split"], [GOOD_ROW + [""]], 2, "split", "''"),
    ],
)
def test_malformed_labels(tmp_path, header, rows, line, column, words):
    path = tmp_path / "labels.csv"
    write_csv(path, header, rows)
    with pytest.raises(SdfDataError) as error:
        read_labels(str(tmp_path))
    message = str(error.value)
    assert str(path) in message and words in message
    if line is not None:
        assert f"line {line}, column {column}:" in message


def test_malformed_labels_stop_the_build(tmp_path):
    write_csv(tmp_path / "raw" / "labels.csv", HEADER, [["v1", "p1", "3", "3", "9", "3"]])
    with pytest.raises(SdfDataError, match="line 2, column mfi_q3"):
        data.build(NAME, tmp_path / "raw", tmp_path / "tfds")
    assert data.built_configs(NAME, tmp_path / "tfds") == []


def test_invalid_build_options(raw_dir, tmp_path):
    for options, words in (
        ({"frame_size": 33}, "even"),
        ({"num_frames": 0}, "num_frames must be a positive integer"),
        ({"frame_stride": 1.5}, "frame_stride"),
    ):
        with pytest.raises(ValueError, match=words):
            data.build(NAME, raw_dir, tmp_path, **options)


# Builder.


def test_build_features(examples, raw_dir):
    rows = {r["video_id"]: r for r in label_rows(raw_dir)}
    assert set(examples) == set(rows)
    for video_id, ex in examples.items():
        row = rows[video_id]
        assert set(ex) == {
            "video_id",
            "patient_id",
            "video",
            "fps",
            "quadrant_scores",
            "mfi",
            "flow_class",
            "split",
        }
        assert ex["video"].dtype == np.uint8 and ex["video"].shape == (24, 32, 32, 1)
        assert ex["quadrant_scores"].dtype == np.int32
        np.testing.assert_array_equal(ex["quadrant_scores"], scores_of(row))
        scored = [s for s in scores_of(row) if s >= 0]
        assert ex["mfi"] == np.float32(sum(scored) / len(scored))
        assert ex["flow_class"] == flow_class(scores_of(row))
        assert ex["patient_id"].decode() == row["patient_id"] and ex["fps"] == 30.0


def test_build_video_is_the_first_frames_resized(examples, raw_dir):
    video_id = sorted(examples)[0]
    frames, _ = read_video_gray(raw_dir / "videos" / f"{video_id}.avi")
    np.testing.assert_array_equal(examples[video_id]["video"][..., 0], resized(frames[:24], 32))


def test_build_splits_by_patient(built, examples, raw_dir):
    builder, _ = built
    rows = label_rows(raw_dir)
    expected = split_patients([r["patient_id"] for r in rows])
    patients_of = {}
    for ex in examples.values():
        split, patient = ex["split"].decode(), ex["patient_id"].decode()
        assert split == expected[patient]
        patients_of.setdefault(split, set()).add(patient)
    assert set(patients_of) == {"train", "validation", "test"}
    assert not (patients_of["train"] & patients_of["validation"])
    assert not (patients_of["train"] | patients_of["validation"]) & patients_of["test"]
    counts = {s: builder.info.splits[s].num_examples for s in builder.info.splits}
    assert sum(counts.values()) == NUM
    assert builder.info.metadata["build_summary"]["examples"] == counts


def test_build_options_are_stored_and_checked(built):
    builder, _ = built
    assert builder.info.metadata["build_options"] == {**OPTIONS, "frame_stride": 1}
    loaded = data.load_builder(NAME, builder.data_dir_root)  # Options left at the defaults.
    assert loaded.build_options == {**OPTIONS, "frame_stride": 1}
    assert loaded.as_data_source("train")[0]["video"].shape == (24, 32, 32, 1)
    with pytest.raises(ValueError, match="built with frame_size=32, not frame_size=48"):
        SdfPerfusion(
            data_dir=builder.data_dir_root,
            config=builder.builder_config,
            file_format=data.FILE_FORMAT,
            frame_size=48,
        )


def test_missing_videos_are_one_error(raw_dir, tmp_path):
    raw = shutil.copytree(raw_dir, tmp_path / "raw")
    rows = label_rows(raw)
    for row in rows[:2]:
        os.remove(raw / "videos" / f"{row['video_id']}.avi")
    with pytest.raises(SdfDataError) as error:
        data.build(NAME, raw, tmp_path / "tfds")
    message = str(error.value)
    assert "2 video file(s)" in message and "skip_missing_videos" in message
    for row in rows[:2]:
        assert str(raw / "videos" / f"{row['video_id']}.avi") in message


@pytest.fixture(scope="module")
def damaged(raw_dir, tmp_path_factory):
    """A copy of the raw data with a split column, a truncated video, a missing one, a row
    with no scored quadrant, and a video without a row; built with frame_stride 2."""
    raw = shutil.copytree(raw_dir, tmp_path_factory.mktemp("damaged") / "raw")
    rows = label_rows(raw)
    patients = sorted({r["patient_id"] for r in rows})
    column = {patients[0]: "TEST", patients[1]: "val"}
    for row in rows:
        row["split"] = column.get(row["patient_id"], "Train")
    by_patient = {p: [r["video_id"] for r in rows if r["patient_id"] == p] for p in patients}
    roles = {
        "truncated": by_patient[patients[2]][0],
        "missing": by_patient[patients[3]][0],
        "unlabelled": by_patient[patients[3]][-1],
    }
    assert len(set(roles.values())) == 3 and len(by_patient[patients[2]]) > 1
    path = raw / "videos" / f"{roles['truncated']}.avi"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    os.remove(raw / "videos" / f"{roles['missing']}.avi")
    shutil.copy(raw / "videos" / f"{roles['unlabelled']}.avi", raw / "videos" / "UNLISTED.avi")
    for row in rows:
        if row["video_id"] == roles["unlabelled"]:
            row.update({q: "" for q in QUADRANTS})
    write_labels(raw, rows)
    builder, messages = build_logged(
        raw,
        tmp_path_factory.mktemp("tfds"),
        frame_size=32,
        num_frames=16,
        frame_stride=2,
        skip_missing_videos=True,
    )
    return raw, rows, roles, builder, messages, all_examples(builder)


def test_damaged_build_leaves_out_bad_videos(damaged):
    raw, rows, roles, builder, messages, examples = damaged
    assert set(examples) == {r["video_id"] for r in rows} - set(roles.values())
    summary = builder.info.metadata["build_summary"]
    assert summary["unreadable_videos"] == [roles["truncated"]]
    assert summary["missing_videos"] == [roles["missing"]]
    assert summary["unlabelled_videos"] == [roles["unlabelled"]]
    assert summary["unlisted_videos"] == ["UNLISTED"]
    report = "\n".join(messages)
    assert f"Skipping {roles['truncated']}:" in report and f"{roles['truncated']}.avi" in report
    assert "unreadable or too short videos (skipped): 1" in report


def test_damaged_build_follows_the_split_column(damaged):
    _, rows, _, builder, _, examples = damaged
    names = {"test": "test", "val": "validation", "train": "train"}
    for video_id, ex in examples.items():
        row = next(r for r in rows if r["video_id"] == video_id)
        assert ex["split"].decode() == names[row["split"].lower()]
    counts = {s: builder.info.splits[s].num_examples for s in builder.info.splits}
    assert counts == builder.info.metadata["build_summary"]["examples"]


def test_frame_stride_keeps_every_other_frame(damaged):
    raw, _, _, _, _, examples = damaged
    video_id = sorted(examples)[0]
    frames, _ = read_video_gray(raw / "videos" / f"{video_id}.avi")
    video = examples[video_id]["video"][..., 0]
    np.testing.assert_array_equal(video, resized(frames[0:31:2], 32))


def test_too_short_for_the_options(raw_dir, tmp_path):
    """Videos of 36 frames cannot give 20 frames 2 apart (39 needed): all reported, none kept."""
    with pytest.raises(SdfDataError, match="No video of the .* split could be read"):
        data.build(NAME, raw_dir, tmp_path, num_frames=20, frame_stride=2)


def test_cli_build_with_defaults(raw_dir, tmp_path):
    out = tmp_path / "tfds"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medjax.data",
            "build",
            NAME,
            "--manual_dir",
            raw_dir,
            "--data_dir",
            out,
        ],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "train:" in proc.stdout and "test:" in proc.stdout
    builder = data.load_builder(NAME, out)
    assert builder.build_options == {"frame_size": 64, "num_frames": 32, "frame_stride": 1}
    example = builder.as_data_source("train")[0]
    assert example["video"].shape == (32, 64, 64, 1)
