"""Tests of the EchoNet-Dynamic dataset: video I/O, synthetic generator, builder, API and CLI."""

import math
import os
import re
import shutil

import cv2
import dataset_helpers as helpers
import numpy as np
import pytest
from medjax_datasets.echonet_dynamic import EchonetDataError
from medjax_datasets.echonet_dynamic.synthetic import MM_PER_PIXEL

from medjax import data
from medjax.preprocess.video import VideoReadError, read_video_gray, write_video_gray

NAME = "echonet_dynamic"
NUM = 12
SEED = 0
SPLITS = {"TRAIN": "train", "VAL": "validation", "TEST": "test"}
BUILDER_LOGGER = "medjax_datasets.echonet_dynamic.echonet_dynamic"


# Reading the raw layout independently of the builder.


def file_list(raw) -> list[dict[str, str]]:
    return helpers.read_csv_rows(os.path.join(raw, "FileList.csv"))


def write_file_list(raw, rows: list[dict[str, str]]) -> None:
    helpers.write_csv_rows(os.path.join(raw, "FileList.csv"), rows)


def tracing_rows(raw) -> list[dict[str, str]]:
    return helpers.read_csv_rows(os.path.join(raw, "VolumeTracings.csv"))


def write_tracings(raw, rows: list[dict[str, str]]) -> None:
    helpers.write_csv_rows(
        os.path.join(raw, "VolumeTracings.csv"), rows, ["FileName", "X1", "Y1", "X2", "Y2", "Frame"]
    )


def traced_frames(raw) -> dict[str, list[tuple[int, np.ndarray]]]:
    """{FileName without .avi: [(frame, (rows, 4) X1, Y1, X2, Y2), ...] in CSV order}."""
    grouped: dict[str, dict[int, list]] = {}
    for row in tracing_rows(raw):
        frames = grouped.setdefault(row["FileName"].removesuffix(".avi"), {})
        frames.setdefault(int(row["Frame"]), []).append(
            [float(row[c]) for c in ("X1", "Y1", "X2", "Y2")]
        )
    return {
        name: [(frame, np.array(rows)) for frame, rows in frames.items()]
        for name, frames in grouped.items()
    }


def discs_volume_ml(tracing: np.ndarray) -> float:
    """Simpson's method of discs: the first row is the long axis, the others the discs."""
    length = np.hypot(*(tracing[0, 2:] - tracing[0, :2]))
    diameters = np.hypot(tracing[1:, 2] - tracing[1:, 0], tracing[1:, 3] - tracing[1:, 1])
    volume_px = np.sum(np.pi * diameters**2 / 4 * length / len(diameters))
    return float(volume_px) * MM_PER_PIXEL**3 / 1000


def polygon_area(tracing: np.ndarray) -> float:
    polygon = np.concatenate([tracing[1:, :2], tracing[1:, 2:][::-1]])
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def all_examples(builder) -> dict[str, dict]:
    return helpers.all_examples(builder, "filename")


def split_counts(rows) -> dict[str, int]:
    counts = {}
    for row in rows:
        split = SPLITS[row["Split"].upper()]
        counts[split] = counts.get(split, 0) + 1
    return counts


def build_logged(raw, data_dir, **kwargs):
    """data.build, returning (builder, messages the EchoNet builder logged)."""
    return helpers.build_logged(NAME, BUILDER_LOGGER, raw, data_dir, **kwargs)


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("echonet") / "raw"
    data.synthesize(NAME, out, NUM, SEED)
    return out


@pytest.fixture(scope="module")
def built(raw_dir, tmp_path_factory):
    return build_logged(raw_dir, tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def examples(built):
    return all_examples(built[0])


# Video reading and writing.


def test_video_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    frames = cv2.GaussianBlur(rng.integers(0, 256, (7, 40, 56), dtype=np.uint8), (5, 5), 0)
    path = tmp_path / "clip.avi"
    write_video_gray(path, frames, 25.0)
    decoded, fps = read_video_gray(path, expected_frames=7)
    assert decoded.shape == (7, 40, 56) and decoded.dtype == np.uint8
    assert fps == 25.0
    assert np.abs(decoded.astype(int) - frames).mean() < 3.0
    assert not np.array_equal(decoded[0], decoded[1])  # Frames stay in order and distinct.


@pytest.mark.parametrize("problem", ["missing", "empty", "garbage", "truncated"])
def test_video_read_errors(tmp_path, problem):
    path = tmp_path / "clip.avi"
    if problem == "empty":
        path.write_bytes(b"")
    elif problem == "garbage":
        path.write_bytes(b"RIFF this is not a video at all" * 10)
    elif problem == "truncated":
        write_video_gray(path, np.full((6, 16, 16), 128, np.uint8), 50.0)
    with pytest.raises(VideoReadError, match=re.escape(str(path))):
        read_video_gray(path, expected_frames=8)


def test_write_video_rejects_bad_frames(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_video_gray(tmp_path / "x.avi", np.zeros((2, 8, 8), np.float32), 50.0)


# Synthetic generator.


def test_synthetic_layout(raw_dir):
    with open(raw_dir / "FileList.csv") as f:
        header = "FileName,EF,ESV,EDV,FrameHeight,FrameWidth,FPS,NumberOfFrames,Split"
        assert f.readline().strip() == header
    with open(raw_dir / "VolumeTracings.csv") as f:
        assert f.readline().strip() == "FileName,X1,Y1,X2,Y2,Frame"
    rows = file_list(raw_dir)
    assert len(rows) == NUM and len({r["FileName"] for r in rows}) == NUM
    assert {r["Split"] for r in rows} == set(SPLITS)  # Uppercase, every split present.
    tracings = traced_frames(raw_dir)
    assert set(tracings) == {r["FileName"] for r in rows}
    for row in rows:
        assert not row["FileName"].endswith(".avi")
        assert (row["FrameHeight"], row["FrameWidth"], row["FPS"]) == ("112", "112", "50")
        frames, fps = read_video_gray(raw_dir / "Videos" / f"{row['FileName']}.avi")
        assert frames.shape == (int(row["NumberOfFrames"]), 112, 112) and fps == 50.0
        assert 96 <= len(frames) <= 128
        assert [len(t) for _, t in tracings[row["FileName"]]] == [21, 21]
        for frame, _ in tracings[row["FileName"]]:
            assert 0 <= frame < len(frames)


def test_synthetic_is_deterministic(tmp_path):
    data.synthesize(NAME, tmp_path / "a", 2, 5)
    data.synthesize(NAME, tmp_path / "b", 2, 5)
    data.synthesize(NAME, tmp_path / "c", 2, 6)
    assert helpers.file_contents(tmp_path / "a") == helpers.file_contents(tmp_path / "b")
    assert (
        helpers.file_contents(tmp_path / "a")["FileList.csv"]
        != helpers.file_contents(tmp_path / "c")["FileList.csv"]
    )


def test_synthetic_refuses_non_empty_dir(raw_dir):
    with pytest.raises(FileExistsError):
        data.synthesize(NAME, raw_dir, 2, SEED)


def test_synthetic_ef_follows_from_tracings(raw_dir):
    tracings = traced_frames(raw_dir)
    efs = []
    for row in file_list(raw_dir):
        volumes = sorted(discs_volume_ml(t) for _, t in tracings[row["FileName"]])
        esv, edv = volumes
        ef = 100 * (edv - esv) / edv
        assert float(row["EDV"]) == pytest.approx(edv, rel=1e-9)
        assert float(row["ESV"]) == pytest.approx(esv, rel=1e-9)
        assert float(row["EF"]) == pytest.approx(ef, abs=1e-7)
        assert 10 < esv < edv < 400
        efs.append(ef)
    assert min(efs) < 45 and max(efs) > 55
    assert all(14 < ef < 81 for ef in efs)


def test_synthetic_heart_beats(raw_dir):
    """The LV cavity (dark) is large at the traced ED frame and smaller at the ES frame."""
    row = max(file_list(raw_dir), key=lambda r: float(r["EF"]))
    frames, _ = read_video_gray(raw_dir / "Videos" / f"{row['FileName']}.avi")
    (es, es_tracing), (ed, ed_tracing) = sorted(
        traced_frames(raw_dir)[row["FileName"]], key=lambda item: polygon_area(item[1])
    )
    ring = np.zeros((112, 112), np.uint8)
    polygon = np.concatenate([ed_tracing[1:, :2], ed_tracing[1:, 2:][::-1]])
    cv2.fillPoly(ring, [np.round(polygon).astype(np.int32)], 1)
    inside = cv2.erode(ring, np.ones((5, 5), np.uint8)).astype(bool)
    # Inside the ED cavity: dark at ED; at ES the wall has moved in, brighter.
    assert frames[ed][inside].mean() + 15 < frames[es][inside].mean()


# Builder.


def test_build_counts_per_split(built, raw_dir):
    builder, _ = built
    expected = split_counts(file_list(raw_dir))
    assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == expected
    assert set(expected) == {"train", "validation", "test"}


def test_build_features(examples, raw_dir):
    rows = {r["FileName"]: r for r in file_list(raw_dir)}
    assert set(examples) == set(rows)
    for name, ex in examples.items():
        row = rows[name]
        assert set(ex) == {
            "filename",
            "video",
            "fps",
            "ef",
            "edv",
            "esv",
            "large_frame",
            "small_frame",
            "large_mask",
            "small_mask",
            "has_tracings",
            "split",
        }
        for column in ("EF", "EDV", "ESV"):
            assert ex[column.lower()] == np.float32(float(row[column]))
        assert ex["fps"] == 50.0
        assert ex["video"].dtype == np.uint8
        assert ex["video"].shape == (int(row["NumberOfFrames"]), 112, 112, 1)
        assert ex["split"].decode() == SPLITS[row["Split"]]
        assert ex["has_tracings"] is True
        for key in ("large_mask", "small_mask"):
            assert ex[key].dtype == np.uint8 and ex[key].shape == (112, 112, 1)
            assert set(np.unique(ex[key])) == {0, 1}


def test_build_video_is_the_decoded_avi(examples, raw_dir):
    name = sorted(examples)[0]
    frames, _ = read_video_gray(raw_dir / "Videos" / f"{name}.avi")
    np.testing.assert_array_equal(examples[name]["video"][..., 0], frames)


def test_build_masks(examples, raw_dir):
    tracings = traced_frames(raw_dir)
    mask_areas = polygon_areas = 0.0
    for name, ex in examples.items():
        (small_frame, small), (large_frame, large) = sorted(
            tracings[name], key=lambda item: polygon_area(item[1])
        )
        assert (ex["large_frame"], ex["small_frame"]) == (large_frame, small_frame)
        large_area, small_area = ex["large_mask"].sum(), ex["small_mask"].sum()
        assert large_area > small_area > 200
        # Sub-pixel rasterisation: each mask area is its polygon area to within 2.5 % (whole-
        # pixel vertices and edge pixels would add about 5 %), and on average to within 1 %.
        assert large_area == pytest.approx(polygon_area(large), rel=0.025)
        assert small_area == pytest.approx(polygon_area(small), rel=0.025)
        mask_areas += large_area + small_area
        polygon_areas += polygon_area(large) + polygon_area(small)
        # The masks cover the dark cavity at the frames they name; at ES the myocardium has
        # moved into the ED mask.
        video = ex["video"][..., 0]
        for frame, key in ((large_frame, "large_mask"), (small_frame, "small_mask")):
            mask = ex[key][..., 0].astype(bool)
            rest = (video[frame] > 0) & ~mask  # The sector outside the mask.
            assert video[frame][mask].mean() < 0.6 * video[frame][rest].mean()
        large_mask = ex["large_mask"][..., 0].astype(bool)
        assert video[large_frame][large_mask].mean() < video[small_frame][large_mask].mean()
    assert mask_areas == pytest.approx(polygon_areas, rel=0.01)


def test_area_decides_large_and_small(built, examples, raw_dir):
    """Videos whose tracings list ED first still get large and small right, and are counted."""
    builder, messages = built
    ed_first = sorted(
        name
        for name, frames in traced_frames(raw_dir).items()
        if polygon_area(frames[0][1]) > polygon_area(frames[1][1])
    )
    assert 1 <= len(ed_first) < NUM / 2
    for name in ed_first:
        first_listed = traced_frames(raw_dir)[name][0][0]
        assert examples[name]["large_frame"] == first_listed
    summary = builder.info.metadata["build_summary"]
    assert sorted(summary["area_order_disagreements"]) == ed_first
    assert builder.build_summary.area_order_disagreements == summary["area_order_disagreements"]
    report = "\n".join(messages)
    assert f"disagree with the CSV order (ES first): {len(ed_first)}" in report
    assert summary["unreadable_videos"] == summary["missing_videos"] == []


def test_build_summary_is_stored(built):
    builder, _ = built
    loaded = data.load_builder(NAME, builder.data_dir_root)
    assert loaded.info.metadata["build_summary"] == builder.info.metadata["build_summary"]


# Damaged raw data: one build over a copy with several problems, each checked separately.


@pytest.fixture(scope="module")
def damaged(raw_dir, tmp_path_factory):
    """A copy of the raw data with a truncated video, two missing ones, an unlabelled one, an
    untraced one, one traced at a frame past its end, one stored at 224x224, and tracings of a
    video not in FileList."""
    raw = shutil.copytree(raw_dir, tmp_path_factory.mktemp("damaged") / "raw")
    rows = file_list(raw)
    names = [r["FileName"] for r in rows]
    roles = {
        "truncated": names[0],
        "missing": names[1:3],
        "unlabelled": names[3],
        "untraced": names[4],
        "resized": names[5],
        "past_end": names[6],
    }
    path = raw / "Videos" / f"{roles['truncated']}.avi"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for name in roles["missing"]:
        os.remove(raw / "Videos" / f"{name}.avi")
    for row in rows:
        if row["FileName"] == roles["unlabelled"]:
            row.update(EF="", ESV="", EDV="")
        if row["FileName"] == roles["resized"]:
            row.update(FrameHeight="224", FrameWidth="224")
    write_file_list(raw, rows)
    path = raw / "Videos" / f"{roles['resized']}.avi"
    frames, fps = read_video_gray(path)
    write_video_gray(path, np.repeat(np.repeat(frames, 2, axis=1), 2, axis=2), fps)
    past_end_frame = traced_frames(raw)[roles["past_end"]][0][0]
    tracings = []
    for row in tracing_rows(raw):
        name = row["FileName"].removesuffix(".avi")
        if name == roles["untraced"]:
            continue
        if name == roles["past_end"] and int(row["Frame"]) == past_end_frame:
            row["Frame"] = "9999"
        if name == roles["resized"]:  # Pixel centres: x -> 2x + 1/2.
            row.update({c: repr(2 * float(row[c]) + 0.5) for c in ("X1", "Y1", "X2", "Y2")})
        tracings.append(row)
    tracings.append(dict(tracings[0], FileName="0XNOTINFILELIST.avi"))
    write_tracings(raw, tracings)
    return raw, roles


def test_missing_videos_are_one_error(damaged, tmp_path):
    raw, roles = damaged
    with pytest.raises(EchonetDataError) as error:
        data.build(NAME, raw, tmp_path / "tfds")
    message = str(error.value)
    assert "2 video file(s)" in message and "skip_missing_videos" in message
    for name in roles["missing"]:
        assert str(raw / "Videos" / f"{name}.avi") in message
    assert roles["truncated"] not in message  # Present, if damaged: found when decoding.
    assert data.built_configs(NAME, tmp_path / "tfds") == []


@pytest.fixture(scope="module")
def damaged_built(damaged, tmp_path_factory):
    raw, _ = damaged
    builder, messages = build_logged(raw, tmp_path_factory.mktemp("tfds"), skip_missing_videos=True)
    return builder, messages, all_examples(builder)


def test_damaged_counts(damaged, damaged_built):
    raw, roles = damaged
    builder, _, examples = damaged_built
    left_out = {roles["truncated"], *roles["missing"]}
    kept = [r for r in file_list(raw) if r["FileName"] not in left_out]
    assert set(examples) == {r["FileName"] for r in kept}
    assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == (
        split_counts(kept)
    )


def test_truncated_video_is_reported_and_skipped(damaged, damaged_built):
    raw, roles = damaged
    builder, messages, examples = damaged_built
    assert roles["truncated"] not in examples
    summary = builder.info.metadata["build_summary"]
    assert summary["unreadable_videos"] == [roles["truncated"]]
    assert any(
        str(raw / "Videos" / f"{roles['truncated']}.avi") in m and "expected" in m for m in messages
    )
    report = [m for m in messages if m.startswith("EchoNet-Dynamic build summary")]
    assert len(report) == 1
    assert f"unreadable or truncated videos (skipped): 1 [{roles['truncated']}]" in report[0]


def test_missing_videos_are_skipped_on_request(damaged, damaged_built):
    _, roles = damaged
    builder, _, examples = damaged_built
    assert not set(roles["missing"]) & set(examples)
    assert builder.info.metadata["build_summary"]["missing_videos"] == roles["missing"]


def test_unlabelled_video_is_kept(damaged, damaged_built):
    _, roles = damaged
    builder, _, examples = damaged_built
    ex = examples[roles["unlabelled"]]
    assert math.isnan(ex["ef"]) and math.isnan(ex["edv"]) and math.isnan(ex["esv"])
    assert ex["has_tracings"] is True
    assert builder.info.metadata["build_summary"]["unlabelled_videos"] == 1


def test_untraced_videos_keep_their_ef(damaged, damaged_built, examples):
    _, roles = damaged
    builder, _, damaged_examples = damaged_built
    for name in (roles["untraced"], roles["past_end"]):
        ex = damaged_examples[name]
        assert ex["has_tracings"] is False
        assert ex["large_frame"] == ex["small_frame"] == -1
        assert not ex["large_mask"].any() and not ex["small_mask"].any()
        assert ex["ef"] == examples[name]["ef"]
    summary = builder.info.metadata["build_summary"]
    assert sorted(summary["untraced_videos"]) == sorted([roles["untraced"], roles["past_end"]])
    assert summary["dropped_traced_frames"] == [f"{roles['past_end']}@9999"]
    assert summary["ignored_tracing_files"] == ["0XNOTINFILELIST"]


def test_large_video_is_resized(damaged, damaged_built, examples):
    _, roles = damaged
    builder, _, damaged_examples = damaged_built
    resized, original = damaged_examples[roles["resized"]], examples[roles["resized"]]
    assert resized["video"].shape == original["video"].shape
    assert np.abs(resized["video"].astype(int) - original["video"]).mean() < 4
    for key in ("large_mask", "small_mask"):
        assert np.sum(resized[key] != original[key]) <= 4
    assert resized["large_frame"] == original["large_frame"]
    assert builder.info.metadata["build_summary"]["resized_videos"] == [roles["resized"]]


# Malformed CSVs.


def _damage_csv(raw, file, edit):
    path = raw / file
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")
    return path


@pytest.mark.parametrize(
    "file, edit, match",
    [
        (
            "FileList.csv",
            lambda lines: [",".join(line.split(",")[:7] + line.split(",")[8:]) for line in lines],
            r"FileList\.csv lacks the required column\(s\) NumberOfFrames",
        ),
        (
            "FileList.csv",
            lambda lines: (
                [lines[0], lines[1], re.sub(r",[^,]*", ",sixty", lines[2], count=1)] + lines[3:]
            ),
            r"FileList\.csv, line 3, column EF: 'sixty' is not a number",
        ),
        (
            "FileList.csv",
            lambda lines: lines[:2] + [lines[2].rsplit(",", 1)[0] + ",holdout"] + lines[3:],
            r"FileList\.csv, line 3, column Split: 'holdout'",
        ),
        (
            "VolumeTracings.csv",
            lambda lines: lines[:4] + [lines[4].replace(",", ",x", 1)] + lines[5:],
            r"VolumeTracings\.csv, line 5, column X1: 'x",
        ),
    ],
    ids=["missing_column", "bad_number", "bad_split", "bad_tracing"],
)
def test_malformed_csv(raw_dir, tmp_path, file, edit, match):
    raw = shutil.copytree(raw_dir, tmp_path / "raw")
    path = _damage_csv(raw, file, edit)
    with pytest.raises(EchonetDataError, match=match) as error:
        data.build(NAME, raw, tmp_path / "tfds")
    assert str(path) in str(error.value)
    assert data.built_configs(NAME, tmp_path / "tfds") == []


# medjax.data API and command line.


def test_option_is_refused_by_other_datasets(tmp_path):
    with pytest.raises(ValueError, match="no build option skip_missing_videos"):
        data.build("crl_ultrasound", tmp_path, tmp_path / "tfds", skip_missing_videos=True)


def test_cli(tmp_path, capsys):
    data.main(["list"])
    listed = capsys.readouterr().out
    assert re.search(rf"^{NAME}\t", listed, re.MULTILINE) and "crl_ultrasound" in listed
    raw, out = tmp_path / "raw", tmp_path / "tfds"
    data.main(["synthesize", NAME, "--out", str(raw), "--num", "8", "--seed", "0"])
    rows = file_list(raw)
    assert len(rows) == 8 and {r["Split"] for r in rows} == set(SPLITS)
    os.remove(raw / "Videos" / f"{rows[0]['FileName']}.avi")
    capsys.readouterr()
    data.main(["build", NAME, f"--manual_dir={raw}", f"--data_dir={out}", "--skip_missing_videos"])
    stdout = capsys.readouterr().out
    counts = {k: int(v) for k, v in re.findall(r"(\w+): (\d+) examples", stdout)}
    expected = split_counts(rows[1:])
    assert counts == expected and sum(counts.values()) == 7
