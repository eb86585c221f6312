"""Property-based fuzzing of the DICOM readers and the CSV readers of the dataset builders.

The property: whatever the bytes, a reader returns a valid result or raises the project's clear
error (its `ValueError` subclass, naming the file); never another exception type, never a hang,
never an allocation beyond the size limit. DICOM inputs are a valid small file with random byte
changes and truncations, and files written from random header values (Rows, Columns,
BitsAllocated, SamplesPerPixel, NumberOfFrames, PixelData length, photometric interpretation,
transfer syntax). CSV inputs are random rows: missing and extra cells, unicode, NaN, infinities,
huge numbers, path-like names, control characters, bytes that are not UTF-8.

The size limit is lowered to 2**16 values while fuzzing, so a file whose header slips past the
checks would be caught by the memory guard instead of exhausting the machine. Hypothesis runs
derandomized with a fixed example budget, so a CI run is reproducible.
"""

from __future__ import annotations

import contextlib
import math
import os
from unittest import mock

import numpy as np
import pydicom
import pydicom.config
import pydicom.datadict
import pydicom.dataelem
import pydicom.dataset
import pydicom.encaps
import pydicom.tag
import pydicom.uid
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from medjax_datasets.crl_ultrasound.crl_ultrasound import CrlDataError, read_metadata
from medjax_datasets.ct_ich.ct_ich import CSV_COLUMNS, CtIchDataError, read_diagnosis
from medjax_datasets.echonet_dynamic.echonet_dynamic import (
    FILE_LIST_COLUMNS,
    EchonetDataError,
    read_file_list,
    read_volume_tracings,
)
from medjax_datasets.embryo_timelapse.embryo_timelapse import (
    EmbryoDataError,
    read_outcomes,
    read_times,
)
from medjax_datasets.sdf_perfusion.sdf_perfusion import (
    LABEL_COLUMNS,
    SdfDataError,
    assign_splits,
    read_labels,
)

from medjax.preprocess import ct, dicom, echo_dicom, image
from tests.reliability import guards
from tests.test_echo_dicom import echo_frames, make_dataset

FUZZ_MAX_PIXELS = 2**16
HANG_GUARD_S = 20
MEMORY_GUARD_BYTES = 2**30
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@contextlib.contextmanager
def bounded():
    """Lowered size limit, a hang guard and a memory guard (see the module docstring)."""
    patches = [mock.patch.object(m, "MAX_PIXELS", FUZZ_MAX_PIXELS) for m in (image, dicom, ct)]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        stack.enter_context(guards.bounded(HANG_GUARD_S, MEMORY_GUARD_BYTES))
        yield


def _only_clear_errors(read, path: str, error: type[Exception]):
    """`read(path)`, or None when it raised `error` naming the file; anything else fails."""
    with bounded():
        try:
            return read(path)
        except error as e:
            assert os.path.basename(path) in str(e), str(e)
            return None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def valid_dicoms(workdir):
    """The bytes of a valid 8x8 CT slice and of a 3-frame 12x12 ultrasound cine."""
    hu = np.arange(64, dtype=np.float64).reshape(8, 8, 1) * 10 - 300
    (ct_path,) = ct.write_dicom_series(
        workdir / "ct", hu, (0.5, 0.5), 2.0, patient_id="ANON", series_uid="1.2.3.4.5"
    )  # Fixed UIDs: the same bytes, so the same examples, in every run.
    us = make_dataset(echo_frames(3)[:, :12, :12], uid="1.2.3.4.6")
    us_path = str(workdir / "us.dcm")
    us.save_as(us_path, enforce_file_format=True)
    return {name: open(p, "rb").read() for name, p in (("ct", ct_path), ("us", us_path))}


def _read_ct(path):
    image_ = ct.read_ct_file(path)
    assert np.all(np.isfinite(image_.hu)) and image_.hu.ndim in (2, 3)
    return image_


def _read_2d(path):
    pixels, spacing, _ = dicom.read_dicom_image(path)
    assert pixels.dtype == np.uint8 and pixels.ndim == 2
    assert spacing is None or (math.isfinite(spacing) and spacing > 0)
    return pixels


def _read_echo(path):
    video = echo_dicom.read_echo_dicom(path, fallback_fps=30.0)
    assert video.frames.dtype == np.uint8 and video.frames.ndim == 3 and video.fps > 0
    return video


DICOM_READERS = [(_read_ct, ct.CtReadError), (_read_2d, dicom.DicomReadError)]


# ---------------------------------------------------------------------------------------------
# DICOM: byte mutations and truncations of a valid file
# ---------------------------------------------------------------------------------------------


@FUZZ
@given(
    kind=st.sampled_from(["ct", "us"]),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
)
@pytest.mark.filterwarnings("ignore")  # pydicom warns about every invalid value it meets.
def test_mutated_dicom_gives_a_result_or_a_clear_error(valid_dicoms, workdir, kind, edits, cut):
    data = bytearray(valid_dicoms[kind])
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    path = str(workdir / f"mutated_{kind}.dcm")
    with open(path, "wb") as f:
        f.write(data)
    for read, error in DICOM_READERS:
        _only_clear_errors(read, path, error)
    video = _only_clear_errors(_read_echo, path, dicom.DicomReadError)
    if video is not None:
        assert kind == "us" and video.frames.shape[1:] == (12, 12)


# ---------------------------------------------------------------------------------------------
# DICOM: files written from random header values
# ---------------------------------------------------------------------------------------------


def _raw_text(ds, keyword: str, vr: str, text: str) -> None:
    """Sets an element to `text` exactly as written, valid or not (pydicom checks assignments)."""
    value = text.encode("ascii")
    value += b" " * (len(value) % 2)
    tag = pydicom.datadict.tag_for_keyword(keyword)
    ds[tag] = pydicom.dataelem.RawDataElement(
        pydicom.tag.Tag(tag), vr, len(value), value, 0, False, True
    )


SYNTAXES = [
    pydicom.uid.ExplicitVRLittleEndian,
    pydicom.uid.ExplicitVRLittleEndian,
    pydicom.uid.ExplicitVRLittleEndian,
    pydicom.uid.ImplicitVRLittleEndian,
    pydicom.uid.ExplicitVRBigEndian,
    pydicom.uid.RLELossless,
    pydicom.uid.JPEGBaseline8Bit,
]


SIDES = [*range(1, 13), 0, 65535]  # Mostly valid, sometimes absurd.
BITS = [8, 8, 16, 16, 16, 1, 0, 12, 32, 64]
SAMPLES = [1, 1, 1, 1, 3, 3, 0, 2]
FRAMES = [None, None, "1", "3", "3", "0", "-2", "2.5", "many", "99999999999"]
SLOPES = [None, None, "1", "0", "NaN", "inf", "abc", "-1e308"]


@FUZZ
@given(
    rows=st.sampled_from(SIDES),
    columns=st.sampled_from(SIDES),
    bits=st.sampled_from(BITS),
    samples=st.sampled_from(SAMPLES),
    frames=st.sampled_from(FRAMES),
    pixel_bytes=st.one_of(st.none(), st.integers(0, 4096)),
    photometric=st.sampled_from(["MONOCHROME2", "MONOCHROME1", "RGB", "YBR_FULL", "PALETTE COLOR"]),
    signed=st.booleans(),
    modality=st.sampled_from(["CT", "US", ""]),
    syntax=st.sampled_from(SYNTAXES),
    slope=st.sampled_from(SLOPES),
)
@pytest.mark.filterwarnings("ignore")
def test_dicom_with_random_header_values_gives_a_result_or_a_clear_error(
    workdir, rows, columns, bits, samples, frames, pixel_bytes, photometric, signed, modality,
    syntax, slope,
):  # fmt: skip
    if pixel_bytes is None:  # As many bytes as the header asks for, when that is small.
        count = int(frames) if frames in ("1", "3") else 1
        pixel_bytes = min(rows * columns * count * samples * max(bits, 1) // 8, 2**16)
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["fuzz"])
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, max(bits - 1, 0)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = samples, photometric
    ds.PixelRepresentation = int(signed)
    ds.CineRate = 30
    if frames is not None:
        _raw_text(ds, "NumberOfFrames", "IS", frames)
    if slope is not None:
        _raw_text(ds, "RescaleSlope", "DS", slope)
        ds.RescaleIntercept = "-1024"
    pixels = bytes((np.arange(pixel_bytes) * 37 % 251).astype(np.uint8))
    path = str(workdir / "random_header.dcm")
    try:
        ds.PixelData = pydicom.encaps.encapsulate([pixels]) if syntax.is_compressed else pixels
        with pydicom.config.disable_value_validation():
            ds.save_as(path, enforce_file_format=True, little_endian=None, implicit_vr=None)
    except Exception:  # Combinations pydicom itself refuses to write are not inputs.
        return
    for read, error in DICOM_READERS:
        _only_clear_errors(read, path, error)
    _only_clear_errors(_read_echo, path, dicom.DicomReadError)


# ---------------------------------------------------------------------------------------------
# CSV readers: random rows
# ---------------------------------------------------------------------------------------------

NASTY_CELLS = [
    "", " ", "nan", "NaN", "inf", "-inf", "1e400", "-1e400", "9" * 40, "0", "-1", "2.5",
    "../../etc/passwd", "/etc/passwd", "..", ".", "a\\b", "a\x00b", "line\nbreak", '"', "a,b",
    "\u00e9\u4e2d\U0001f600", "\ufeff", "\u202e", "x" * 300,
]  # fmt: skip
nasty = st.one_of(st.sampled_from(NASTY_CELLS), st.text(max_size=12))


def _mostly(valid: st.SearchStrategy) -> st.SearchStrategy:
    """A cell that is usually valid for its column, sometimes anything at all."""
    return st.one_of(*[valid] * 12, nasty)


name = st.from_regex(r"[A-Za-z0-9_\-\u00e9\u4e2d]{1,12}", fullmatch=True)
number = st.floats(-1e6, 1e6, allow_nan=False).map(lambda x: f"{x:.4g}")
positive = st.floats(0.01, 1e3).map(lambda x: f"{x:.4g}")


def integer(low: int, high: int) -> st.SearchStrategy:
    return st.integers(low, high).map(str)


def one_of(*values: str) -> st.SearchStrategy:
    return st.sampled_from(values)


split = one_of("TRAIN", "VAL", "TEST", "train", "validation", "test")
# Mostly UTF-8; now and then a byte order mark, another encoding, or stray bytes at the end.
encodings = st.sampled_from(["utf-8"] * 10 + ["utf-8-sig", "latin-1", "utf-16"])
extras = st.sampled_from([b""] * 10 + [b"\xff\xfe", b"\x00\x00", b"\r\r\n", b"\x80abc\n"])


def _csv_bytes(header: list[str], body: list[list[str]], encoding: str, extra: bytes) -> bytes:
    def quote(cell: str) -> str:
        return '"' + cell.replace('"', '""') + '"' if any(c in cell for c in ',"\n\r') else cell

    text = "\n".join(",".join(quote(c) for c in row) for row in [header, *body]) + "\n"
    return text.encode(encoding, errors="replace") + extra


def _inside(path: str, folder: str) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep)


CSV_CASES = {
    # reader: (file name, {column: cell strategy}, reader of the folder, error,
    #          check of a valid result)
    "echonet_file_list": (
        "FileList.csv",
        dict(zip(FILE_LIST_COLUMNS, (name, number, number, number, integer(1, 500),
                                     integer(1, 500), positive, integer(1, 300), split))),
        read_file_list, EchonetDataError,
        lambda d, out: all(_inside(r.path, os.path.join(d, "Videos")) and r.num_frames >= 1
                           and (math.isnan(r.ef) or math.isfinite(r.ef)) for r in out),
    ),
    "echonet_tracings": (
        "VolumeTracings.csv",
        {"FileName": name.map(lambda n: n + ".avi"), "X1": number, "Y1": number,
         "X2": number, "Y2": number, "Frame": integer(0, 100)},
        read_volume_tracings, EchonetDataError,
        lambda d, out: all(math.isfinite(v) for t in out.values() for rs in t.values()
                           for r in rs for v in r),
    ),
    "sdf_labels": (
        "labels.csv",
        {**dict.fromkeys(LABEL_COLUMNS[:2], name),
         **dict.fromkeys(LABEL_COLUMNS[2:], one_of("0", "1", "2", "3", "")),
         "split": one_of("train", "val", "test")},
        lambda d: assign_splits(read_labels(d)), SdfDataError,
        lambda d, out: set(out.values()) <= {"train", "validation", "test"},
    ),
    "crl_metadata": (
        "metadata.csv",
        {"id": name, "patient_id": name, "pixel_spacing_mm": positive, "ga_days": number,
         "quality": one_of("good", "bad", "")},
        read_metadata, CrlDataError, lambda d, out: out == [],
    ),
    "ct_ich_diagnosis": (
        "hemorrhage_diagnosis_raw_ct.csv",
        {"PatientNumber": integer(0, 200), "SliceNumber": integer(1, 40),
         **dict.fromkeys(CSV_COLUMNS[2:], one_of("0", "1"))},
        lambda d: read_diagnosis(os.path.join(d, "hemorrhage_diagnosis_raw_ct.csv")),
        CtIchDataError,
        lambda d, out: all(v in (0, 1) for r in out.values() for v in r.values.values()),
    ),
    "embryo_outcomes": (
        "outcomes.csv",
        {"video": name, "patient_id": name,
         "outcome": one_of("liveborn", "no implantation", "Miscarriage", ""),
         "split": one_of("train", "val", "test")},
        read_outcomes, EmbryoDataError,
        lambda d, out: all(r.outcome in (-1, 0, 1, 2) for r in out.values()),
    ),
    "embryo_times": (
        "AA1-1_timeElapsed.csv", {"frame_index": integer(0, 500), "time": positive},
        lambda d: read_times(os.path.join(d, "AA1-1_timeElapsed.csv")), EmbryoDataError,
        lambda d, out: all(k >= 0 and math.isfinite(v) for k, v in out.items()),
    ),
}  # fmt: skip


@st.composite
def csv_files(draw) -> tuple[str, bytes]:
    """(case, the bytes of a CSV file for it). Half are clean (every cell valid for its column,
    UTF-8), so the readers' valid results are checked too; the others may lack a column, hold
    a row a cell short or long, odd cells, another encoding or stray bytes."""
    case = draw(st.sampled_from(sorted(CSV_CASES)))
    columns = CSV_CASES[case][1]
    clean = draw(st.booleans())
    header = list(columns)
    drop = draw(st.integers(0, 4 * len(header)))
    if drop < len(header) and not clean:
        del header[drop]
    body = []
    for _ in range(draw(st.integers(0, 5))):
        row = [draw(columns[c] if clean else _mostly(columns[c])) for c in header]
        change = 0 if clean else draw(st.integers(-1, 20))  # A row a cell short or long.
        if change < 0:
            row = row[:change]
        elif change > 19:
            row.append(draw(nasty))
        body.append(row)
    encoding = "utf-8" if clean else draw(encodings)
    return case, _csv_bytes(header, body, encoding, b"" if clean else draw(extras))


@FUZZ
@given(csv_file=csv_files())
def test_csv_reader_gives_a_result_or_a_clear_error(workdir, csv_file):
    case, content = csv_file
    file_name, _, read, error, valid = CSV_CASES[case]
    folder = str(workdir / "csv" / case)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, file_name)
    with open(path, "wb") as f:
        f.write(content)
    result = _only_clear_errors(lambda p: read(folder), path, error)
    if result is not None:
        assert valid(folder, result), result
