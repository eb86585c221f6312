"""Tests for medjax.preprocess.echo_dicom: multi-frame echo DICOMs -> de-identified EchoNet layout.

The DICOMs are built here with pydicom: a moving speckled fan with a beating dark chamber, a
burned-in patient name and ID outside the fan (one copy inside the fan's bounding box, so only
blanking removes it), a static logo and a moving ECG cursor block in a corner.
"""

from __future__ import annotations

import csv
import hashlib
import os

import cv2
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from medjax.preprocess import echo_dicom
from medjax.preprocess.video import read_video_gray
from tests.conftest import run_module

ROWS, COLS = 160, 200
APEX = (100, 20)  # (x, y)
RADIUS = 125
HALF_ANGLE_DEG = 35
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
INPUT_NAME = "jane_doe_echo.dcm"
PHI_STRINGS = [
    b"Doe",
    b"DOE",
    b"doe",
    b"Jane",
    b"JANE",
    b"PHI-12345",
    b"jane_doe_echo",
    b"19700101",
]
# Where the name is burned in inside the fan's bounding box but outside the fan.
NAME_IN_BOX = (30, 36)


def fan_mask() -> np.ndarray:
    """(ROWS, COLS) bool: the scan sector every synthetic clip moves in."""
    mask = np.zeros((ROWS, COLS), np.uint8)
    cv2.ellipse(mask, APEX, (RADIUS, RADIUS), 90, -HALF_ANGLE_DEG, HALF_ANGLE_DEG, 1, -1)
    return mask.astype(bool)


def echo_frames(num_frames: int, seed: int = 0) -> np.ndarray:
    """(T, ROWS, COLS) uint8 frames: moving speckle in the fan plus static burned-in text."""
    rng = np.random.default_rng(seed)
    fan = fan_mask()
    frames = np.zeros((num_frames, ROWS, COLS), np.uint8)
    for t in range(num_frames):
        coarse = rng.uniform(40, 230, (ROWS // 4, COLS // 4)).astype(np.float32)
        speckle = cv2.resize(coarse, (COLS, ROWS), interpolation=cv2.INTER_LINEAR)
        frame = np.where(fan, speckle, 0).astype(np.uint8)
        radius = int(14 + 6 * np.sin(2 * np.pi * t / 8))  # A beating dark chamber.
        cv2.ellipse(frame, (100, 85), (radius, radius + 8), 0, 0, 360, 5, -1)
        cv2.putText(frame, "DOE JANE", (2, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 255, 1)
        cv2.putText(frame, "DOE JANE", NAME_IN_BOX, cv2.FONT_HERSHEY_SIMPLEX, 0.3, 255, 1)
        cv2.putText(frame, "PHI-12345", (115, 157), cv2.FONT_HERSHEY_SIMPLEX, 0.35, 255, 1)
        cv2.rectangle(frame, (182, 4), (196, 18), 200, -1)  # Static logo.
        sweep_x = 2 + (3 * t) % 16  # A moving ECG cursor block in the bottom-left corner.
        frame[128:140, sweep_x : sweep_x + 5] = 255
        frames[t] = frame
    return frames


def text_mask() -> np.ndarray:
    """(ROWS, COLS) bool: every pixel the burned-in text, logo or cursor block ever covers."""
    return (echo_frames(8).max(axis=0) > 0) & ~fan_mask()


def make_dataset(
    frames: np.ndarray,
    photometric: str = "MONOCHROME2",
    timing: dict | None = None,
    sop_class: str = US_MULTIFRAME,
    uid: str | None = None,
) -> Dataset:
    """An uncompressed ultrasound DICOM holding `frames` ((T, H, W) or (T, H, W, 3)), with PHI."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = uid or generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PHI-12345"
    ds.PatientBirthDate = "19700101"
    ds.InstitutionName = "Jane Doe Memorial Hospital"
    ds.Rows, ds.Columns = frames.shape[1:3]
    ds.SamplesPerPixel = 3 if frames.ndim == 4 else 1
    if frames.ndim == 4:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    bits = 16 if frames.dtype == np.uint16 else 8
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    for keyword, value in (timing if timing is not None else {"CineRate": 30}).items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    return ds


def save(ds: Dataset, path) -> str:
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


def read_file_list(raw_dir) -> list[dict[str, str]]:
    with open(os.path.join(raw_dir, "FileList.csv"), newline="") as f:
        return list(csv.DictReader(f))


def expected_output_mask(size: int = 112) -> np.ndarray:
    """The true fan mapped the way the converter maps its detected sector."""
    _, mask = echo_dicom.crop_sector(np.zeros((1, ROWS, COLS), np.uint8), fan_mask(), size)
    return mask


def name_in_box_output_pixels(size: int = 112) -> np.ndarray:
    """(size, size) bool: where the name inside the fan's bounding box lands when only cropped."""
    name = np.zeros((1, ROWS, COLS), np.uint8)
    cv2.putText(name[0], "DOE JANE", NAME_IN_BOX, cv2.FONT_HERSHEY_SIMPLEX, 0.3, 255, 1)
    rows = np.flatnonzero(fan_mask().any(axis=1))
    cols = np.flatnonzero(fan_mask().any(axis=0))
    box = np.zeros((ROWS, COLS), bool)
    box[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True
    cropped, _ = echo_dicom.crop_sector(name, box, size)
    return cropped[0] > 100


def test_sector_mask_finds_the_fan_and_leaves_out_text_logo_and_sweep():
    frames = echo_frames(16)
    mask = echo_dicom.sector_mask(frames)
    fan = fan_mask()
    iou = (mask & fan).sum() / (mask | fan).sum()
    assert iou > 0.95, iou
    assert not (mask & text_mask()).any()
    # The dark chamber does not change inside its smallest extent, yet is part of the sector.
    assert mask[85, 100]


def test_sector_mask_is_limited_to_the_ultrasound_region():
    box = (0, 0, 110, ROWS - 1)  # Left half of the fan only.
    mask = echo_dicom.sector_mask(echo_frames(12), regions=[box])
    assert mask.any() and not mask[:, 111:].any()
    assert mask[60, 95]


def test_sector_mask_rejects_a_still_clip():
    frames = np.repeat(echo_frames(1), 5, axis=0)
    with pytest.raises(ValueError, match="no moving scan sector"):
        echo_dicom.sector_mask(frames)


def test_convert_grayscale_dicom_end_to_end(tmp_path, capsys):
    in_dir, raw_dir = tmp_path / "dicoms", tmp_path / "raw"
    (in_dir / "nested").mkdir(parents=True)
    frames = echo_frames(24)
    ds = make_dataset(frames, timing={"CineRate": 30})
    save(ds, in_dir / "nested" / INPUT_NAME)
    (in_dir / "notes.txt").write_text("Doe^Jane echo notes\n")
    save(make_dataset(echo_frames(1)[0][None], sop_class=US_IMAGE), in_dir / "still_image")

    assert echo_dicom.main(["--input", str(in_dir), "--output", str(raw_dir)]) == 0
    printed = capsys.readouterr().out
    assert "Converted 1 echo video(s)" in printed
    assert "Skipped 2 file(s)" in printed
    assert "notes.txt: not a DICOM file" in printed
    assert "still_image: single-frame DICOM" in printed

    name = hashlib.sha256(ds.SOPInstanceUID.encode()).hexdigest()[:16]
    assert sorted(os.listdir(raw_dir)) == ["FileList.csv", "Videos"]
    assert os.listdir(raw_dir / "Videos") == [f"{name}.avi"]
    video, fps = read_video_gray(str(raw_dir / "Videos" / f"{name}.avi"))
    assert video.shape == (24, 112, 112)
    assert abs(fps - 30) < 0.01

    # Nothing outside the fan survives. MJPG rings within its 8x8 blocks next to the fan's
    # edge (up to ~20 gray levels); burned-in text would be 100 or more.
    inside = expected_output_mask()
    near = cv2.dilate(inside.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    assert video[:, ~near].max() <= 30 and video[:, ~near].mean() < 0.5
    # The burned-in name inside the fan's bounding box would survive a crop; it is blanked.
    name_pixels = name_in_box_output_pixels()
    assert name_pixels.sum() > 20
    assert video[:, name_pixels].max() <= 30

    # The fan's content is kept, frame by frame and in order.
    reference, _ = echo_dicom.crop_sector(frames, fan_mask(), 112)
    core = cv2.erode(inside.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    assert video[:, core].mean() > 60
    for t in (0, 11, 23):
        same = np.corrcoef(video[t][core], reference[t][core])[0, 1]
        other = np.corrcoef(video[t][core], reference[(t + 5) % 24][core])[0, 1]
        assert same > 0.95 and other < 0.75, (t, same, other)

    rows = read_file_list(raw_dir)
    assert rows == [
        {
            "FileName": name,
            "EF": "",
            "ESV": "",
            "EDV": "",
            "FrameHeight": "112",
            "FrameWidth": "112",
            "FPS": "30",
            "NumberOfFrames": "24",
            "Split": "TEST",
        }
    ]

    for root, _, files in os.walk(raw_dir):
        for file_name in files:
            assert not any(s.decode() in file_name for s in PHI_STRINGS)
            with open(os.path.join(root, file_name), "rb") as f:
                data = f.read()
            for phi in PHI_STRINGS:
                assert phi not in data, (file_name, phi)


def test_rgb_and_ybr_frames_become_opencv_gray_with_frame_time_fps(tmp_path):
    gray = echo_frames(12)  # 1.15 MB of RGB pixels: read lazily (defer_size) by the reader.
    rgb = np.stack([gray, (gray * 0.5).astype(np.uint8), 255 - gray], axis=-1)
    expected = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in rgb])

    video = echo_dicom.read_echo_dicom(
        save(make_dataset(rgb, "RGB", {"FrameTime": 40.0}), tmp_path / "rgb.dcm")
    )
    assert video.frames.shape == (12, ROWS, COLS) and video.frames.dtype == np.uint8
    assert np.array_equal(video.frames, expected)
    assert video.fps == pytest.approx(25.0)

    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    video = echo_dicom.read_echo_dicom(
        save(
            make_dataset(ybr, "YBR_FULL", {"FrameTimeVector": [0] + [20] * 11}),
            tmp_path / "ybr.dcm",
        )
    )
    assert np.abs(video.frames.astype(int) - expected).max() <= 2
    assert video.fps == pytest.approx(50.0)

    in_dir, raw_dir = tmp_path / "in", tmp_path / "raw"
    in_dir.mkdir()
    save(make_dataset(rgb, "RGB", {"RecommendedDisplayFrameRate": 25}), in_dir / INPUT_NAME)
    summary = echo_dicom.convert_directory(str(in_dir), str(raw_dir))
    assert len(summary.converted) == 1 and not summary.failed
    video, fps = read_video_gray(str(raw_dir / "Videos" / f"{summary.converted[0][1]}.avi"))
    assert video.shape == (12, 112, 112) and abs(fps - 25) < 0.01


def test_monochrome1_16_bit_is_inverted_and_scaled(tmp_path):
    frames = (echo_frames(4).astype(np.uint16) * 200 + 1000).astype(np.uint16)
    video = echo_dicom.read_echo_dicom(
        save(make_dataset(frames, "MONOCHROME1"), tmp_path / "mono1.dcm")
    )
    assert video.frames.dtype == np.uint8
    brightest = np.unravel_index(np.argmax(frames), frames.shape)
    darkest = np.unravel_index(np.argmin(frames), frames.shape)
    assert video.frames[brightest] == 0 and video.frames[darkest] == 255


def test_rerun_merges_file_list_and_keeps_filled_in_labels(tmp_path):
    in_dir, raw_dir = tmp_path / "in", tmp_path / "raw"
    in_dir.mkdir()
    raw_dir.mkdir()
    with open(raw_dir / "FileList.csv", "w", newline="") as f:
        f.write(",".join(echo_dicom.FILE_LIST_COLUMNS) + "\n")
        f.write("0X1A2B3C4D5E6F7A8B,61.2,20.1,51.8,112,112,50,201,TRAIN\n")
    first = make_dataset(echo_frames(10, seed=1), timing={"CineRate": 30})
    second = make_dataset(echo_frames(12, seed=2), timing={"FrameTime": 20})
    save(first, in_dir / INPUT_NAME)
    save(second, in_dir / "second_echo")
    args = ["--input", str(in_dir), "--output", str(raw_dir)]

    assert echo_dicom.main(args) == 0
    rows = read_file_list(raw_dir)
    assert [r["FileName"] for r in rows][0] == "0X1A2B3C4D5E6F7A8B"
    assert len(rows) == 3
    by_name = {r["FileName"]: r for r in rows}
    first_name = hashlib.sha256(first.SOPInstanceUID.encode()).hexdigest()[:16]
    second_name = hashlib.sha256(second.SOPInstanceUID.encode()).hexdigest()[:16]
    assert by_name[second_name]["FPS"] == "50" and by_name[second_name]["NumberOfFrames"] == "12"
    assert by_name["0X1A2B3C4D5E6F7A8B"]["EF"] == "61.2"

    by_name[first_name]["EF"] = "45.5"  # A person fills in a label, then converts again.
    with open(raw_dir / "FileList.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=echo_dicom.FILE_LIST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    assert echo_dicom.main(args + ["--split", "VAL"]) == 0
    rows = read_file_list(raw_dir)
    assert len(rows) == 3
    by_name = {r["FileName"]: r for r in rows}
    assert by_name[first_name]["EF"] == "45.5" and by_name[first_name]["Split"] == "VAL"
    assert by_name["0X1A2B3C4D5E6F7A8B"]["Split"] == "TRAIN"
    assert sorted(os.listdir(raw_dir / "Videos")) == sorted(
        [first_name + ".avi", second_name + ".avi"]
    )
    assert not [n for n in os.listdir(raw_dir) if n.endswith(".tmp")]


@pytest.mark.parametrize("output", ["raw", "."])
def test_output_inside_input_folder_is_not_read_back(tmp_path, output):
    save(make_dataset(echo_frames(6)), tmp_path / INPUT_NAME)
    raw_dir = tmp_path / output
    echo_dicom.convert_directory(str(tmp_path), str(raw_dir))
    summary = echo_dicom.convert_directory(str(tmp_path), str(raw_dir))
    assert len(summary.converted) == 1 and summary.skipped == [] and summary.failed == []


def test_missing_frame_rate_fails_naming_the_file_unless_fps_is_given(tmp_path, capsys):
    in_dir, raw_dir = tmp_path / "in", tmp_path / "raw"
    in_dir.mkdir()
    path = save(make_dataset(echo_frames(6), timing={}), in_dir / INPUT_NAME)
    with pytest.raises(echo_dicom.DicomReadError, match="--fps") as error:
        echo_dicom.read_echo_dicom(path)
    assert INPUT_NAME in str(error.value)

    assert echo_dicom.main(["--input", str(in_dir), "--output", str(raw_dir)]) == 1
    assert f"{INPUT_NAME}: no frame rate" in capsys.readouterr().out
    assert not os.path.exists(raw_dir / "FileList.csv")

    assert echo_dicom.main(["--input", str(in_dir), "--output", str(raw_dir), "--fps", "20"]) == 0
    assert read_file_list(raw_dir)[0]["FPS"] == "20"


def test_compressed_pixels_without_decoder_say_what_to_install(tmp_path):
    ds = make_dataset(echo_frames(3))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([b"\xff\xd8not a jpeg\xff\xd9"] * 3)
    ds["PixelData"].VR = "OB"
    path = save(ds, tmp_path / INPUT_NAME)
    with pytest.raises(echo_dicom.DicomReadError) as error:
        echo_dicom.read_echo_dicom(path)
    message = str(error.value)
    assert path in message
    assert "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg" in message


def test_name_without_sop_instance_uid_hashes_the_file_bytes(tmp_path):
    ds = make_dataset(echo_frames(3))
    del ds.SOPInstanceUID
    path = save(ds, tmp_path / INPUT_NAME)
    with open(path, "rb") as f:
        expected = hashlib.sha256(f.read()).hexdigest()[:16]
    assert echo_dicom.read_echo_dicom(path).name == expected


def test_command_line_converts_and_skips_other_modalities(tmp_path):
    in_dir, raw_dir = tmp_path / "in", tmp_path / "raw"
    in_dir.mkdir()
    save(make_dataset(echo_frames(8), timing={"CineRate": 25}), in_dir / INPUT_NAME)
    ct = make_dataset(echo_frames(3))
    ct.Modality = "CT"
    save(ct, in_dir / "ct_series.dcm")
    proc = run_module(
        [
            "-m",
            "medjax.preprocess.echo_dicom",
            "--input",
            str(in_dir),
            "--output",
            str(raw_dir),
            "--size",
            "64",
            "--split",
            "TRAIN",
        ],
        timeout=120,
    )
    assert "Converted 1 echo video(s)" in proc.stdout
    assert "ct_series.dcm: modality 'CT', not ultrasound" in proc.stdout
    (row,) = read_file_list(raw_dir)
    assert (row["FrameHeight"], row["FrameWidth"], row["FPS"], row["Split"]) == (
        "64",
        "64",
        "25",
        "TRAIN",
    )
    video, fps = read_video_gray(str(raw_dir / "Videos" / f"{row['FileName']}.avi"))
    assert video.shape == (8, 64, 64) and abs(fps - 25) < 0.01
