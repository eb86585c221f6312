"""De-identification: no identifying DICOM value reaches any output or log.

DICOMs are written full of the identifying attributes of the DICOM basic confidentiality
profile (PS3.15 Annex E: names, ids, dates, addresses, institution, physicians, operators,
device, and the study/series/instance UIDs), each with a distinctive marker value. Every path
that consumes DICOM then runs on them:

* echo cine DICOMs -> `medjax.preprocess.echo_dicom` (AVI + FileList.csv, and its command's
  printout) -> the EchoNet-Dynamic dataset build -> the EF task's evaluation report
  (predictions.csv and plots) -> `predict` on the DICOM itself (JSON, area plot, overlay AVI);
* a CT slice -> `predict` for ICH (JSON, overlay PNG) and the web page (HTML and JSON answers,
  with their inline PNGs);
* an ultrasound image DICOM -> `predict` for CRL (JSON, overlay PNG).

The models are stand-ins (the output writing is what is under test, not the networks). Every
file written, byte for byte, also inside ArrayRecord records and PNG text chunks (which may be
compressed), and the captured logs and console output are searched for each marker, in ASCII
and UTF-16, any case, and for the unsalted SHA-256 / SHA-1 / MD5 of the patient's name and id.
"""

from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import io
import logging
import os
import re
import struct
import types
import zlib

import numpy as np
import pydicom
import pytest

from medjax import data
from medjax.preprocess import ct, echo_dicom
from tests.conftest import REPO, load_config
from tests.test_echo_dicom import echo_frames, make_dataset
from tests.test_serve import ThresholdPredictor, head_hu

UID_ROOT = "1.2.826.0.1.3680043.10.4711"
MARKERS = {
    "PatientName": "ZQXFAMILY^ZQXGIVEN",
    "PatientID": "ZQXPID4711",
    "OtherPatientIDs": "ZQXOTHERPID",
    "PatientBirthDate": "19010203",
    "PatientAddress": "ZQXSTREET 9",
    "PatientTelephoneNumbers": "ZQXPHONE555",
    "AccessionNumber": "ZQXACC0815",
    "StudyID": "ZQXSTUDYID",
    "StudyDescription": "ZQXSTUDYDESC",
    "StudyDate": "19020304",
    "SeriesDate": "19020305",
    "ContentDate": "19020306",
    "InstitutionName": "ZQXINSTITUTE",
    "InstitutionAddress": "ZQXINSTADDRESS",
    "ReferringPhysicianName": "ZQXREFERRER",
    "PerformingPhysicianName": "ZQXPERFORMER",
    "OperatorsName": "ZQXOPERATOR",
    "StationName": "ZQXSTATION",
    "DeviceSerialNumber": "ZQXSERIAL",
    "StudyInstanceUID": f"{UID_ROOT}.1",
    "SeriesInstanceUID": f"{UID_ROOT}.2",
    "FrameOfReferenceUID": f"{UID_ROOT}.3",
}
SOP_UID = f"{UID_ROOT}.9"  # + ".<n>" per file.


def _forbidden() -> dict[bytes, str]:
    """{byte string that must not appear in an output, lower case: the value it stands for}."""
    words = set()
    for value in [*MARKERS.values(), SOP_UID]:
        words.update(w for w in re.split(r"[\^ ]", value) if len(w) >= 6)
        words.add(value)
    for secret in (MARKERS["PatientID"], MARKERS["PatientName"], "ZQXFAMILY"):
        for algorithm in ("sha256", "sha1", "md5"):
            digest = hashlib.new(algorithm, secret.encode()).hexdigest()
            words.update({digest, digest[:16]})
    return {
        encoded: word
        for word in words
        for encoded in (word.lower().encode(), word.lower().encode("utf-16-le"))
    }


FORBIDDEN = _forbidden()


def identify(dataset: pydicom.Dataset, number: int) -> pydicom.Dataset:
    """Fills `dataset` with the marker values; its SOPInstanceUID gets `number`."""
    for keyword, value in MARKERS.items():
        setattr(dataset, keyword, value)
    dataset.SOPInstanceUID = f"{SOP_UID}.{number}"
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    return dataset


# ---------------------------------------------------------------------------------------------
# Searching outputs
# ---------------------------------------------------------------------------------------------


def _png_texts(blob: bytes) -> list[bytes]:
    """The text of the tEXt, zTXt and iTXt chunks of a PNG (decompressed)."""
    texts, pos = [], 8
    while pos + 8 <= len(blob):
        (length,) = struct.unpack(">I", blob[pos : pos + 4])
        kind, body = blob[pos + 4 : pos + 8], blob[pos + 8 : pos + 8 + length]
        if kind == b"tEXt":
            texts.append(body)
        elif kind == b"zTXt":
            texts.append(zlib.decompress(body[body.index(b"\0") + 2 :]))
        elif kind == b"iTXt":
            key, rest = body.split(b"\0", 1)
            compressed, rest = rest[0], rest[2:]
            text = rest.split(b"\0", 2)[-1]
            texts.append(key + (zlib.decompress(text) if compressed else text))
        pos += 12 + length
    return texts


def readable_parts(path: str) -> list[bytes]:
    """A file's bytes, plus what is inside it that a byte search would not see."""
    with open(path, "rb") as f:
        blob = f.read()
    parts = [blob]
    if ".array_record" in os.path.basename(path):
        from array_record.python import array_record_module

        reader = array_record_module.ArrayRecordReader(path)
        parts += list(reader.read_all())
        reader.close()
    if blob.startswith(b"\x89PNG\r\n\x1a\n"):
        parts += _png_texts(blob)
    if blob.startswith(b"\x1f\x8b"):
        parts.append(gzip.decompress(blob))
    for inline in re.findall(rb"data:image/png;base64,([A-Za-z0-9+/=]+)", blob):
        parts += _png_texts(base64.b64decode(inline))
    return parts


def leaks_in(blob: bytes) -> list[str]:
    """The marker values (or patient-id digests) found in `blob`, in any case."""
    low = blob.lower()
    return sorted({word for encoded, word in FORBIDDEN.items() if encoded in low})


def leaks_under(*roots) -> dict[str, list[str]]:
    """{file: markers found} for every file below `roots`."""
    found = {}
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                path = os.path.join(folder, name)
                hits = sorted({h for part in readable_parts(path) for h in leaks_in(part)})
                if hits:
                    found[os.path.relpath(path, root)] = hits
    return found


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.DEBUG)
    return caplog


def test_the_search_finds_markers_where_they_hide(tmp_path):
    """The search itself: markers in DICOM bytes, in compressed PNG text chunks, in ArrayRecord
    records and in UTF-16 are all found (so a clean result below means something)."""
    from array_record.python import array_record_module

    ds = identify(make_dataset(echo_frames(2)), 1)
    ds.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    chunk = b"Comment\0\0" + zlib.compress(b"seen by ZQXOPERATOR")
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(chunk)) + b"zTXt" + chunk + b"\0" * 4
    (tmp_path / "b.png").write_bytes(png)
    writer = array_record_module.ArrayRecordWriter(str(tmp_path / "c.array_record-00000"), "")
    writer.write(b"filename: zqxpid4711")
    writer.close()
    (tmp_path / "d.txt").write_bytes("Dr ZQXREFERRER".encode("utf-16-le"))
    (tmp_path / "e.txt").write_text(hashlib.md5(b"ZQXPID4711").hexdigest())
    found = leaks_under(tmp_path)
    assert {"ZQXPID4711", "ZQXFAMILY", "19010203", f"{UID_ROOT}.1"} <= set(found["a.dcm"])
    assert found["b.png"] == ["ZQXOPERATOR"]
    assert found["c.array_record-00000"] == ["ZQXPID4711"]
    assert found["d.txt"] == ["ZQXREFERRER"]
    assert len(found["e.txt"]) == 2  # The digest and its first 16 digits.


# ---------------------------------------------------------------------------------------------
# Echo: conversion, dataset, evaluation report, predict
# ---------------------------------------------------------------------------------------------


class StubEchoChain:
    """Stands in for the trained EF and LV stages: a fixed EF, a shrinking-then-growing LV."""

    def __init__(self, workdir, checkpoint="best"):
        self.stages = {
            "ef": (types.SimpleNamespace(eval=types.SimpleNamespace(hfref_threshold=50)),)
        }

    def measure(self, video, fps):
        masks = np.zeros((len(video), 112, 112), bool)
        masks[:, 40:70, 40:60] = True
        areas = masks.sum(axis=(1, 2)).astype(float)
        return dict(num_frames=len(video), fps=fps, ef_all_clips=55.0, ef_beat_to_beat=None,
                    num_clips=1, beats=[], areas=areas, masks=masks, warnings=[])  # fmt: skip


def test_echo_dicoms_leave_no_identifier_in_videos_dataset_reports_or_logs(
    tmp_path, logs, capfd, monkeypatch
):
    from medjax import tasks
    from medjax.tasks import echonet_chain

    dicom_dir, raw, data_dir = tmp_path / "dicom", tmp_path / "raw", tmp_path / "tfds"
    dicom_dir.mkdir()
    for number in (1, 2):
        ds = identify(make_dataset(echo_frames(16, seed=number)), number)
        ds.save_as(dicom_dir / f"echo_{number}.dcm", enforce_file_format=True)
    assert echo_dicom.main(["--input", str(dicom_dir), "--output", str(raw)]) == 0

    # The user fills in the labels, as after any conversion; then the dataset is built.
    file_list = raw / "FileList.csv"
    with open(file_list, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for row, ef in zip(rows, (35.0, 62.0)):
        row.update(EF=ef, ESV=40, EDV=100)
    with open(file_list, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    builder = data.build("echonet_dynamic", raw, data_dir)
    examples = builder.as_data_source("test")
    names = sorted(examples[i]["filename"].decode() for i in range(len(examples)))
    assert names == sorted(r["FileName"] for r in rows)
    assert all(re.fullmatch(r"[0-9a-f]{16}", name) for name in names)

    # The EF task's evaluation report over that split (stand-in predictions).
    config = load_config(os.path.join(REPO, "configs", "echonet.py"), "smoke")
    with config.unlocked():
        config.data.manual_dir, config.data.data_dir = str(raw), str(data_dir)
    task = tasks.get_task(config)
    gathered = {
        "video_index": np.array([0, 0, 1, 1]),
        "single": np.array([True, False, True, False]),
        "pred": np.array([40.0, 41.0, 60.0, 59.0]),
        "ef": np.array([35.0, 35.0, 62.0, 62.0]),
    }
    report_dir = tmp_path / "runs" / "eval" / "test"
    written = task.write_evaluation(str(report_dir), "test", gathered)
    assert any(p.endswith("predictions.csv") for p in written)

    # Predict on the DICOM itself.
    monkeypatch.setattr(echonet_chain, "EchonetChain", StubEchoChain)
    predict_dir = tmp_path / "runs" / "predict"
    (report,) = echonet_chain.predict_video_files(
        str(tmp_path / "runs"), [str(dicom_dir / "echo_1.dcm")], str(predict_dir)
    )
    assert report["ef_all_clips"] == 55.0
    assert sorted(os.listdir(predict_dir)) == [
        "echo_1.json",
        "echo_1_area.png",
        "echo_1_overlay.avi",
    ]

    assert leaks_under(raw, data_dir, tmp_path / "runs") == {}
    out, err = capfd.readouterr()
    assert leaks_in((out + err + logs.text).encode()) == []
    assert leaks_in(out.encode("utf-16-le")) == []


# ---------------------------------------------------------------------------------------------
# CT: predict and the web page; CRL: predict on an ultrasound image DICOM
# ---------------------------------------------------------------------------------------------


class StubIchPredictor(ThresholdPredictor):
    """Stands in for a trained ICH run: thresholds the HU like the web page tests' model."""

    threshold = 0.5

    def __init__(self, workdir=None, checkpoint="best"):
        super().__init__()


def _identified_ct_slice(tmp_path) -> str:
    (path,) = ct.write_dicom_series(tmp_path / "series", head_hu()[:, :, None], (0.5, 0.5), 5.0)
    ds = identify(pydicom.dcmread(path), 3)
    ds.save_as(path)
    return path


def test_ct_predict_and_web_page_show_no_identifier(tmp_path, logs, capfd, monkeypatch):
    from medjax import serve
    from medjax.tasks import ich

    path = _identified_ct_slice(tmp_path)
    monkeypatch.setattr(ich, "IchPredictor", StubIchPredictor)
    out_dir = tmp_path / "predict"
    (report,) = ich.predict_ct_files("unused", [path], str(out_dir))
    assert report["hemorrhage"] and sorted(os.listdir(out_dir)) == [
        "slice_0001.json",
        "slice_0001.png",
    ]

    client = serve.create_app(StubIchPredictor()).test_client()
    answers = []
    for url in ("/", "/api/segment"):
        with open(path, "rb") as f:
            form = {"file": (io.BytesIO(f.read()), "scan.dcm"), "window": "brain"}
        response = client.post(url, data=form, content_type="multipart/form-data")
        assert response.status_code == 200
        answers.append(response.get_data())
    assert b"data:image/png;base64," in answers[0] and b"p_hemorrhage" in answers[1]

    assert leaks_under(out_dir) == {}
    for answer in answers:
        assert leaks_in(answer) == []
        for inline in re.findall(rb"data:image/png;base64,([A-Za-z0-9+/=]+)", answer):
            assert all(leaks_in(t) == [] for t in _png_texts(base64.b64decode(inline)))
    out, err = capfd.readouterr()
    assert leaks_in((out + err + logs.text).encode()) == []


class StubCrlChain:
    """Stands in for the three trained CRL stages: a fixed fetus, crown and rump."""

    def __init__(self, workdir, checkpoint="best"):
        pass

    def measure(self, image, pixel_spacing_mm):
        mask = np.zeros((*image.shape[:2], 1), np.uint8)
        mask[20:40, 30:60] = 1
        return {
            "image_size": [image.shape[1], image.shape[0]],
            "quality": {"verdict": "good", "p_bad": 0.1},
            "crown_xy": [30.0, 30.0],
            "rump_xy": [59.0, 30.0],
            "crl_px": 29.0,
            "pixel_spacing_mm": pixel_spacing_mm,
            "crl_mm": None,
            "ga_days": {},
            "warnings": [],
            "mask": mask,
        }


def test_crl_predict_on_an_ultrasound_dicom_writes_no_identifier(
    tmp_path, logs, capfd, monkeypatch
):
    from medjax import predict
    from medjax.tasks import crl_chain

    ds = identify(make_dataset(echo_frames(1)[0][None]), 4)
    ds.PixelSpacing = [0.2, 0.2]
    path = str(tmp_path / "us.dcm")
    ds.save_as(path, enforce_file_format=True)
    monkeypatch.setattr(crl_chain, "CrlChain", StubCrlChain)
    out_dir = tmp_path / "predict"
    (report,) = predict.predict_files("unused", [path], str(out_dir))
    assert report["quality"]["verdict"] == "good"
    assert sorted(os.listdir(out_dir)) == ["us.json", "us.png"]
    assert leaks_under(out_dir) == {}
    out, err = capfd.readouterr()
    assert leaks_in((out + err + logs.text).encode()) == []
