"""Tests of the embryo time-lapse dataset: synthetic generator, CSV readers, builder and CLI."""

import csv
import os
import re
import shutil
import subprocess
import sys

import dataset_helpers as helpers
import numpy as np
import pytest
from medjax_datasets.embryo_timelapse import OUTCOMES, PHASES, EmbryoDataError
from medjax_datasets.embryo_timelapse import embryo_timelapse as builder_module
from medjax_datasets.embryo_timelapse.synthetic import synthesize

from medjax import data
from medjax.preprocess.embryo import crop_embryo, strip_banner
from medjax.preprocess.image import read_grayscale

NAME = "embryo_timelapse"
NUM = 12
SEED = 0
OPTIONS = {"frame_size": 32, "max_frames": 24}  # Videos have 40 frames: subsampled.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Reading the raw layout independently of the builder.


def outcome_rows(raw) -> list[dict[str, str]]:
    return helpers.read_csv_rows(os.path.join(raw, "outcomes.csv"))


def write_outcomes(raw, rows: list[dict[str, str]]) -> None:
    helpers.write_csv_rows(os.path.join(raw, "outcomes.csv"), rows)


def frame_files(raw, video) -> dict[int, str]:
    """{k: path} of a video's ...RUN<k>.jpeg files."""
    folder = os.path.join(raw, "embryo_dataset", video)
    return {
        int(re.search(r"RUN(\d+)\.jpeg$", name).group(1)): os.path.join(folder, name)
        for name in os.listdir(folder)
    }


def times(raw, video) -> dict[int, float]:
    path = os.path.join(raw, "embryo_dataset_time_elapsed", f"{video}_timeElapsed.csv")
    with open(path, newline="") as f:
        return {int(r["frame_index"]): float(r["time"]) for r in csv.DictReader(f)}


def phase_of_frame(raw, video) -> dict[int, int]:
    path = os.path.join(raw, "embryo_dataset_annotations", f"{video}_phases.csv")
    phases = {}
    with open(path, newline="") as f:
        for name, first, last in csv.reader(f):
            phases.update({k: PHASES.index(name) for k in range(int(first), int(last) + 1)})
    return phases


def all_examples(builder) -> dict[str, dict]:
    return helpers.all_examples(builder, "video_id", with_split=True)


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("embryo") / "raw"
    synthesize(out, NUM, SEED, image_size=96, num_frames=40)
    return out


@pytest.fixture(scope="module")
def built(raw_dir, tmp_path_factory):
    return data.build(NAME, raw_dir, tmp_path_factory.mktemp("tfds"), **OPTIONS)


@pytest.fixture(scope="module")
def examples(built):
    return all_examples(built)


# Synthetic generator.


def test_synthetic_layout(raw_dir):
    rows = outcome_rows(raw_dir)
    videos = sorted(os.listdir(raw_dir / "embryo_dataset"))
    assert sorted(r["video"] for r in rows) == videos and len(videos) == NUM
    assert {r["outcome"] for r in rows} == set(OUTCOMES)
    assert all(r["video"].startswith(r["patient_id"] + "-") for r in rows)
    assert len({r["patient_id"] for r in rows}) < NUM  # Some patients have several embryos.
    video = videos[0]
    files = frame_files(raw_dir, video)
    assert sorted(files) == list(range(1, 41))
    assert re.fullmatch(
        r"D2013\.\d\d\.\d\d_S\d{4}_I\d{3}_WELL\d+_RUN7\.jpeg", os.path.basename(files[7])
    )
    assert read_grayscale(files[1]).shape == (96, 96)
    with open(raw_dir / "embryo_dataset_time_elapsed" / f"{video}_timeElapsed.csv") as f:
        assert f.readline() == "frame_index,time\n"
    hours = np.array([times(raw_dir, video)[k] for k in range(1, 41)])
    assert np.all(np.diff(hours) > 0) and hours[0] < 1.5 and 130 < hours[-1] < 151


def test_synthetic_phases_follow_development(raw_dir):
    for video in os.listdir(raw_dir / "embryo_dataset"):
        phases = phase_of_frame(raw_dir, video)
        shown = [phases.get(k, -1) for k in range(1, 41)]
        annotated = [p for p in shown if p >= 0]
        assert annotated == sorted(annotated) and annotated[0] <= PHASES.index("tPNa")
        assert shown[0] == -1 or shown[0] == 0  # Unannotated before tPB2.


def test_synthetic_outcome_changes_development(tmp_path):
    """Liveborn embryos divide sooner and more often reach the blastocyst than no-implantation
    ones; the classes overlap."""
    raw = tmp_path / "raw"
    synthesize(raw, 30, 1, image_size=48, num_frames=30)
    t2, blastocyst = {o: [] for o in OUTCOMES}, {o: [] for o in OUTCOMES}
    for row in outcome_rows(raw):
        phases, hours = phase_of_frame(raw, row["video"]), times(raw, row["video"])
        t2_frames = [k for k, p in phases.items() if p == PHASES.index("t2")]
        if t2_frames:
            t2[row["outcome"]].append(hours[min(t2_frames)])
        blastocyst[row["outcome"]].append(max(phases.values()) >= PHASES.index("tB"))
    assert np.mean(t2["liveborn"]) < np.mean(t2["no_implantation"])
    assert np.mean(blastocyst["liveborn"]) > np.mean(blastocyst["no_implantation"])
    assert min(t2["no_implantation"]) < max(t2["liveborn"])  # Not separable by one number.


def test_synthetic_is_deterministic_and_refuses_non_empty_dir(raw_dir, tmp_path):
    synthesize(tmp_path / "again", NUM, SEED, image_size=96, num_frames=40)
    video = sorted(os.listdir(raw_dir / "embryo_dataset"))[3]
    for k in (1, 40):
        assert (
            open(frame_files(raw_dir, video)[k], "rb").read()
            == open(frame_files(tmp_path / "again", video)[k], "rb").read()
        )
    with pytest.raises(FileExistsError, match="not empty"):
        synthesize(raw_dir, 1, 0)


# The build.


def test_features(built, examples, raw_dir):
    assert len(examples) == NUM
    assert built.info.metadata["build_options"] == {
        **builder_module.DEFAULT_OPTIONS,
        **OPTIONS,
    }
    outcomes = {r["video"]: r for r in outcome_rows(raw_dir)}
    for video, example in examples.items():
        frames = example["frames"]
        assert frames.dtype == np.uint8 and frames.shape[1:] == (32, 32, 1)
        assert 20 <= len(frames) <= 24
        for key, dtype in (("frame_index", np.int32), ("hours", np.float32), ("phase", np.int32)):
            assert example[key].dtype == dtype and example[key].shape == (len(frames),)
        assert example["outcome"] == OUTCOMES.index(outcomes[video]["outcome"])
        assert example["patient_id"].decode() == outcomes[video]["patient_id"]
        assert example["localization"] == b"hough"
        assert example["circle"].shape == (3,) and 0.14 * 96 < example["circle"][2] < 0.25 * 96


def test_frames_are_chosen_uniformly_in_time_and_in_numeric_order(examples, raw_dir):
    for video, example in examples.items():
        index, hours = example["frame_index"], example["hours"]
        assert np.all(np.diff(index) > 0) and index[0] == 1
        assert np.all(np.diff(hours) > 0) and hours[-1] <= 140.0
        recorded = times(raw_dir, video)
        np.testing.assert_allclose(hours, [recorded[k] for k in index], atol=1e-5)
        last = max(k for k, h in recorded.items() if h <= 140.0)
        assert last - index[-1] <= 1  # Spans the first 140 h...
        gaps = np.diff(hours)
        assert gaps.max() < 2.5 * np.median(gaps)  # ...evenly.


def test_frames_are_the_cropped_jpegs(examples, raw_dir):
    video = sorted(examples)[0]
    example = examples[video]
    files = frame_files(raw_dir, video)
    assert any(k >= 10 for k in example["frame_index"])  # RUN10 sorts after RUN9.
    for t in (0, len(example["frame_index"]) // 2, -1):
        frame = strip_banner(read_grayscale(files[int(example["frame_index"][t])]))
        expected = crop_embryo(frame, example["circle"], 32)
        np.testing.assert_array_equal(example["frames"][t, ..., 0], expected)


def test_phases_are_the_annotation(examples, raw_dir):
    seen = set()
    for video, example in examples.items():
        annotated = phase_of_frame(raw_dir, video)
        expected = [annotated.get(int(k), -1) for k in example["frame_index"]]
        np.testing.assert_array_equal(example["phase"], expected)
        seen.update(example["phase"].tolist())
    assert -1 in seen and {0, PHASES.index("t2"), PHASES.index("tB")} <= seen


def test_splits_are_by_patient_and_deterministic(built, examples, raw_dir):
    owner = {}
    for example in examples.values():
        assert owner.setdefault(example["patient_id"], example["split"]) == example["split"]
    assert set(owner.values()) == {"train", "validation", "test"}
    plans, _ = built.plan(os.fspath(raw_dir))
    assert {p.video_id: p.split for p in plans} == {v: e["split"] for v, e in examples.items()}
    patients = [f"P{i}" for i in range(40)]
    first = builder_module.split_patients(patients, {})
    assert builder_module.split_patients(list(reversed(patients)), {}) == first
    counts = {s: list(first.values()).count(s) for s in ("train", "validation", "test")}
    assert counts == {"train": 28, "validation": 6, "test": 6}
    explicit = builder_module.split_patients(patients, {"P0": "test", "P1": "train"})
    assert explicit["P0"] == "test" and explicit["P1"] == "train"


def test_rebuild_is_a_no_op_and_summary_is_stored(built, raw_dir):
    again = data.build(NAME, raw_dir, built.data_dir_root, **OPTIONS)
    assert again.data_dir == built.data_dir
    summary = again.info.metadata["build_summary"]
    assert summary["examples"] == {"train": 10, "validation": 1, "test": 1}
    assert summary["localization"] == {"hough": NUM} and summary["truncated_frames"] == []


# Problems in the raw data: one build over a copy with several, each checked separately.


@pytest.fixture(scope="module")
def damaged(raw_dir, examples, tmp_path_factory):
    raw = shutil.copytree(raw_dir, tmp_path_factory.mktemp("damaged") / "raw")
    rows = outcome_rows(raw)
    videos = [r["video"] for r in rows]
    roles = {
        "truncated": videos[0],
        "few": videos[1],
        "no_time": videos[2],
        "no_phases": videos[3],
        "unlabelled": videos[4],
        "decreasing": videos[5],
    }
    # A frame the clean build keeps.
    truncated_k = int(examples[roles["truncated"]]["frame_index"][2])
    truncated = frame_files(raw, roles["truncated"])[truncated_k]
    data_bytes = open(truncated, "rb").read()
    open(truncated, "wb").write(data_bytes[: len(data_bytes) * 2 // 3])
    for k, path in frame_files(raw, roles["few"]).items():
        if k > 10:
            os.remove(path)
    os.remove(raw / "embryo_dataset_time_elapsed" / f"{roles['no_time']}_timeElapsed.csv")
    os.remove(raw / "embryo_dataset_annotations" / f"{roles['no_phases']}_phases.csv")
    path = raw / "embryo_dataset_time_elapsed" / f"{roles['decreasing']}_timeElapsed.csv"
    lines = path.read_text().splitlines()
    lines[5] = lines[5].split(",")[0] + ",0.01"
    path.write_text("\n".join(lines) + "\n")
    (raw / "embryo_dataset" / roles["no_phases"] / "Thumbs.db").write_bytes(b"x")
    rows = [r for r in rows if r["video"] != roles["unlabelled"]]
    rows.append({"video": "XX1-1", "patient_id": "XX1", "outcome": "liveborn"})
    write_outcomes(raw, rows)
    return raw, roles, truncated, truncated_k


@pytest.fixture(scope="module")
def damaged_built(damaged, tmp_path_factory):
    raw = damaged[0]
    builder = data.build(NAME, raw, tmp_path_factory.mktemp("tfds"), **OPTIONS)
    return builder, all_examples(builder)


def test_damaged_summary(damaged, damaged_built):
    _, roles, truncated, _ = damaged
    builder, examples = damaged_built
    summary = builder.info.metadata["build_summary"]
    assert summary["truncated_frames"] == [f"{roles['truncated']}/{os.path.basename(truncated)}"]
    assert summary["unreadable_frames"] == []  # Caught before decoding, by the missing EOI.
    assert summary["too_few_frames"] == [f"{roles['few']} (10)"]
    assert summary["missing_time_files"] == [roles["no_time"]]
    assert summary["decreasing_times"] == [roles["decreasing"]]
    assert summary["unannotated_videos"] == [roles["no_phases"]]
    assert summary["unlabelled_videos"] == [roles["unlabelled"]]
    assert summary["outcome_rows_without_video"] == ["XX1-1"]
    assert summary["ignored_files"] == [f"{roles['no_phases']}/Thumbs.db"]
    left_out = {roles[r] for r in ("few", "no_time", "decreasing", "unlabelled")}
    assert set(examples) == set(os.listdir(damaged[0] / "embryo_dataset")) - left_out
    assert len(examples) == NUM - 4


def test_jpeg_completeness(raw_dir, tmp_path):
    path = frame_files(raw_dir, sorted(os.listdir(raw_dir / "embryo_dataset"))[0])[1]
    content = open(path, "rb").read()
    assert builder_module.jpeg_is_complete(path)
    padded, cut = tmp_path / "padded.jpeg", tmp_path / "cut.jpeg"
    padded.write_bytes(content + b"\x00\x00\n")
    cut.write_bytes(content[:-2])
    assert builder_module.jpeg_is_complete(padded)
    assert not builder_module.jpeg_is_complete(cut)


def test_truncated_jpeg_is_skipped(damaged, damaged_built):
    _, roles, _, truncated_k = damaged
    _, examples = damaged_built
    index = examples[roles["truncated"]]["frame_index"]
    assert truncated_k not in index and len(index) >= 20


def test_video_without_phases_is_kept_unannotated(damaged, damaged_built):
    roles = damaged[1]
    _, examples = damaged_built
    assert np.all(examples[roles["no_phases"]]["phase"] == -1)


def test_outcomes_are_required_unless_unlabelled_is_allowed(damaged, tmp_path):
    raw = shutil.copytree(damaged[0], tmp_path / "raw")
    os.remove(raw / "outcomes.csv")
    with pytest.raises(EmbryoDataError, match="outcomes.csv does not exist.*allow_unlabelled"):
        data.build(NAME, raw, tmp_path / "tfds")
    builder = data.build(NAME, raw, tmp_path / "tfds", allow_unlabelled=True, **OPTIONS)
    examples = all_examples(builder)
    assert len(examples) == NUM - 3  # Too few frames, no time file, decreasing times.
    assert {e["outcome"] for e in examples.values()} == {-1}
    for video, example in examples.items():
        assert example["patient_id"].decode() == video.rsplit("-", 1)[0]
    assert builder.info.metadata["build_summary"]["unlabelled_kept"] is True


# Malformed CSVs: each stops the build with the file and line.


@pytest.fixture(scope="module")
def small_raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "raw"
    synthesize(out, 4, 2, image_size=64, num_frames=20)
    return out


def _edit(path, edit):
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


def _video(raw) -> str:
    return outcome_rows(raw)[0]["video"]


@pytest.mark.parametrize(
    "target, edit, match",
    [
        (
            "outcomes",
            lambda lines: lines[:2] + [lines[2].rsplit(",", 1)[0] + ",alive"] + lines[3:],
            r"outcomes\.csv, line 3: unknown outcome 'alive'; use one of liveborn, "
            r"no_implantation, miscarriage",
        ),
        (
            "outcomes",
            lambda lines: lines[:3] + [lines[3] + ",extra"] + lines[4:],
            r"outcomes\.csv, line 4: 4 values for 3 header columns",
        ),
        (
            "outcomes",
            lambda lines: ["video,patient,outcome"] + lines[1:],
            r"outcomes\.csv, line 1: the header lacks patient_id",
        ),
        (
            "outcomes",
            lambda lines: lines + [lines[1]],
            r"outcomes\.csv, line 6: video '.*' is already listed on line 2",
        ),
        (
            "phases",
            lambda lines: [lines[0], "t2x,5,9"] + lines[1:],
            r"_phases\.csv, line 2: unknown phase 't2x'",
        ),
        (
            "phases",
            lambda lines: [lines[0], "t3,9,5"] + lines[1:],
            r"_phases\.csv, line 2: phase t3 starts at frame 9, after its last frame 5",
        ),
        (
            "times",
            lambda lines: lines[:4] + [lines[4].split(",")[0] + ",soon"] + lines[5:],
            r"_timeElapsed\.csv, line 5: time 'soon' is not a number of hours",
        ),
        (
            "times",
            lambda lines: lines[:4] + [lines[3]] + lines[5:],
            r"_timeElapsed\.csv, line 5: frame 3 already has a time on line 4",
        ),
    ],
    ids=[
        "unknown_outcome",
        "extra_value",
        "bad_header",
        "duplicate_video",
        "unknown_phase",
        "reversed_phase",
        "bad_time",
        "duplicate_time",
    ],
)
def test_malformed_csv_names_file_and_line(small_raw, tmp_path, target, edit, match):
    raw = shutil.copytree(small_raw, tmp_path / "raw")
    video = _video(raw)
    path = {
        "outcomes": raw / "outcomes.csv",
        "phases": raw / "embryo_dataset_annotations" / f"{video}_phases.csv",
        "times": raw / "embryo_dataset_time_elapsed" / f"{video}_timeElapsed.csv",
    }[target]
    _edit(path, edit)
    with pytest.raises(EmbryoDataError, match=match) as error:
        data.build(NAME, raw, tmp_path / "tfds", min_frames=4)
    assert str(path) in str(error.value)
    assert data.built_configs(NAME, tmp_path / "tfds") == []


def test_split_column_is_honoured_and_checked(small_raw, tmp_path):
    raw = shutil.copytree(small_raw, tmp_path / "raw")
    rows = outcome_rows(raw)
    patients = sorted({r["patient_id"] for r in rows})
    given = dict(zip(patients, ("test", "val", "train", "train")))
    for row in rows:
        row["split"] = given[row["patient_id"]]
    write_outcomes(raw, rows)
    examples = all_examples(data.build(NAME, raw, tmp_path / "tfds", min_frames=4))
    for row in rows:
        assert examples[row["video"]]["split"] == {"val": "validation"}.get(
            row["split"], row["split"]
        )
    # Another embryo of the first patient, put in another split.
    video = rows[0]["video"] + "0"
    shutil.copytree(raw / "embryo_dataset" / rows[0]["video"], raw / "embryo_dataset" / video)
    times_dir = raw / "embryo_dataset_time_elapsed"
    shutil.copy(
        times_dir / f"{rows[0]['video']}_timeElapsed.csv", times_dir / f"{video}_timeElapsed.csv"
    )
    other = "train" if rows[0]["split"] != "train" else "test"
    write_outcomes(raw, rows + [dict(rows[0], video=video, split=other)])
    with pytest.raises(
        EmbryoDataError,
        match=rf"outcomes\.csv, line 6: patient '{rows[0]['patient_id']}' is put in {other} "
        rf"here but in \w+ for video '{rows[0]['video']}'",
    ):
        data.build(NAME, raw, tmp_path / "tfds2", min_frames=4)


def test_time_file_without_header_reads_the_same(small_raw, tmp_path):
    path = small_raw / "embryo_dataset_time_elapsed" / f"{_video(small_raw)}_timeElapsed.csv"
    with_header = builder_module.read_times(os.fspath(path))
    plain = tmp_path / "plain.csv"
    plain.write_text("".join(path.read_text().splitlines(keepends=True)[1:]))
    assert builder_module.read_times(os.fspath(plain)) == with_header
    assert len(with_header) == 20 and with_header[1] < with_header[20]


def test_build_options_are_checked(small_raw, tmp_path):
    with pytest.raises(EmbryoDataError, match="max_frames=8 \\(>= min_frames\\)"):
        data.build(NAME, small_raw, tmp_path / "tfds", max_frames=8, min_frames=10)
    with pytest.raises(ValueError, match="no build option frame_rate"):
        data.build(NAME, small_raw, tmp_path / "tfds", frame_rate=3)


def test_cli_build(small_raw, tmp_path):
    out = tmp_path / "tfds"
    command = [
        sys.executable, "-m", "medjax.data", "build", NAME, f"--manual_dir={small_raw}",
        f"--data_dir={out}", "--option", "frame_size=16", "--option", "min_frames=4",
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    counts = {k: int(v) for k, v in re.findall(r"(\w+): (\d+) examples", proc.stdout)}
    assert sum(counts.values()) == 4
    builder = data.load_builder(NAME, out)
    example = builder.as_data_source("train")[0]
    assert example["frames"].shape[1:] == (16, 16, 1)
