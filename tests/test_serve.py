"""The ICH web page (medjax.serve) with a fake model: every upload kind gives the overlay and the
numbers, and hostile uploads give a readable message without leaking paths or writing files."""

from __future__ import annotations

import base64
import gzip
import html
import io
import os
import re
import struct
import tempfile
import time
import zlib

import cv2
import numpy as np
import pytest
from absl import flags

from medjax import serve
from medjax.preprocess import ct

THRESHOLD_HU = 60.0
SPACING_MM = (0.5, 0.4)
# Brain at 30 HU with a 10 x 12 blob of blood at 80 HU: the fake's mask is exactly the blob.
BLOB = (slice(20, 30), slice(24, 36))
BLOB_PIXELS = 120


class ThresholdPredictor:
    """Marks pixels above 60 HU, like `IchPredictor.segment` returns them."""

    def __init__(self):
        self.calls = 0

    def segment(self, hu, pixel_spacing_mm):
        self.calls += 1
        assert hu.ndim == 2 and hu.dtype == np.float32
        prob = (1.0 / (1.0 + np.exp(-(hu - THRESHOLD_HU) / 10.0))).astype(np.float32)
        mask = hu > THRESHOLD_HU
        area_px = int(mask.sum())
        area_cm2 = None
        if pixel_spacing_mm is not None:
            area_cm2 = area_px * pixel_spacing_mm[0] * pixel_spacing_mm[1] / 100.0
        return dict(
            prob=prob,
            mask=mask,
            p_hemorrhage=float(prob.max()),
            area_px=area_px,
            area_cm2=area_cm2,
        )


def head_hu(size: int = 64) -> np.ndarray:
    hu = np.full((size, size), 30.0, np.float32)
    hu[BLOB] = 80.0
    return hu


def png_bytes(gray: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", gray)
    assert ok
    return encoded.tobytes()


def dicom_bytes(tmp_path, hu: np.ndarray) -> bytes:
    (path,) = ct.write_dicom_series(tmp_path / "series", hu[:, :, None], SPACING_MM, 5.0)
    with open(path, "rb") as f:
        return f.read()


def nifti_bytes(tmp_path, volume: np.ndarray, gz: bool = False) -> bytes:
    path = tmp_path / ("volume.nii.gz" if gz else "volume.nii")
    ct.write_nifti_volume(path, volume, SPACING_MM, 5.0)
    return path.read_bytes()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def upload_dir(tmp_path):
    """Where the server makes its per-request folders; checked empty after every test."""
    path = tmp_path / "server" / "uploads"
    path.mkdir(parents=True)
    yield path
    assert os.listdir(path) == [], "a temporary upload was left behind"


@pytest.fixture
def predictor():
    return ThresholdPredictor()


@pytest.fixture
def client(predictor, upload_dir):
    return serve.create_app(predictor, upload_dir=str(upload_dir)).test_client()


def post(client, data: bytes, filename: str, url: str = "/", **fields):
    form = {"file": (io.BytesIO(data), filename), "window": "brain", **fields}
    response = client.post(url, data=form, content_type="multipart/form-data")
    body = response.get_data(as_text=True)
    assert "Traceback" not in body
    assert tempfile.gettempdir() + os.sep not in body
    return response, body


def element_text(body: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>(.*?)</', body, re.S)
    assert match, f"no #{element_id} in the page"
    return html.unescape(" ".join(match.group(1).split()))


def image_from(body: str, element_id: str) -> np.ndarray:
    match = re.search(rf'id="{element_id}"[^>]*src="data:image/png;base64,([^"]+)"', body)
    assert match, f"no inline PNG in #{element_id}"
    data = np.frombuffer(base64.b64decode(match.group(1)), np.uint8)
    return cv2.imdecode(data, cv2.IMREAD_UNCHANGED)


def red_pixels(overlay_bgr: np.ndarray) -> np.ndarray:
    blue, green, red = (overlay_bgr[..., k].astype(int) for k in range(3))
    return (red > green + 40) & (red > blue + 40)


# --- each kind of upload -------------------------------------------------------------------


def test_dicom_upload_gives_area_in_cm2_from_its_pixel_spacing(client, predictor, tmp_path):
    response, body = post(client, dicom_bytes(tmp_path, head_hu()), "slice.dcm")
    assert response.status_code == 200
    assert element_text(body, "probability") == "Hemorrhage probability: 0.88"  # sigmoid(2)
    # 120 pixels of 0.5 x 0.4 mm = 24 mm^2.
    assert element_text(body, "area") == "Hemorrhage area: 0.24 cm²"
    overlay = image_from(body, "overlay")
    assert overlay.shape == (64, 64, 3)
    expected = np.zeros((64, 64), bool)
    expected[BLOB] = True
    np.testing.assert_array_equal(red_pixels(overlay), expected)
    np.testing.assert_array_equal(image_from(body, "image"), ct.window_uint8(head_hu(), "brain"))
    assert predictor.calls == 1


def test_png_is_read_by_content_whatever_its_name(client, tmp_path):
    gray = np.full((40, 50), 100, np.uint8)
    gray[5:15, 5:10] = 255  # 255 -> 80 HU in the brain window a screenshot is taken as.
    response, body = post(client, png_bytes(gray), "named_like_a.dcm")
    assert response.status_code == 200
    assert element_text(body, "area") == "Hemorrhage area: 50 px (pixel spacing unknown)"
    assert element_text(body, "probability") == "Hemorrhage probability: 0.88"
    assert image_from(body, "overlay").shape == (40, 50, 3)
    assert "named_like_a.dcm: PNG image taken as a brain-window" in element_text(body, "warnings")


def test_nifti_volume_shows_the_middle_slice_or_the_chosen_one(client, tmp_path):
    volume = np.full((64, 64, 5), 30.0, np.float32)
    for k in range(5):
        volume[10 : 10 + k + 1, 10:20, k] = 90.0  # Slice k (0-based) has 10 * (k + 1) pixels.
    data = nifti_bytes(tmp_path, volume, gz=True)
    response, body = post(client, data, "scan.nii.gz")
    assert response.status_code == 200
    assert element_text(body, "area") == "Hemorrhage area: 0.06 cm²"  # Slice 3: 30 px * 0.2 mm².
    assert "slice 3 of 5" in body
    response, body = post(client, data, "scan.nii.gz", slice="5", url="/api/segment")
    assert response.status_code == 200
    result = response.get_json()
    assert (result["slice"], result["slice_count"], result["area_px"]) == (5, 5, 50)
    assert result["area_cm2"] == pytest.approx(50 * 0.2 / 100)
    assert result["pixel_spacing_mm"] == pytest.approx(list(SPACING_MM))
    response, body = post(client, data, "scan.nii.gz", slice="9")
    assert response.status_code == 400
    assert "Slice 9 does not exist: this file has 5 slice(s)" in element_text(body, "error")


def test_window_choice_sets_the_displayed_image(client, tmp_path):
    data = dicom_bytes(tmp_path, head_hu())
    _, body = post(client, data, "slice.dcm", window="bone")
    np.testing.assert_array_equal(image_from(body, "image"), ct.window_uint8(head_hu(), "bone"))
    response, body = post(client, data, "slice.dcm", window="custom", level="55", width="50")
    assert response.status_code == 200
    np.testing.assert_array_equal(image_from(body, "image"), ct.window_uint8(head_hu(), "55/50"))
    assert "custom (L 55 / W 50)" in body
    response, body = post(client, data, "slice.dcm", window="custom", level="40", width="-3")
    assert response.status_code == 400
    assert "width" in element_text(body, "error")


def test_page_lists_every_window(client):
    body = client.get("/").get_data(as_text=True)
    for name in ct.WINDOWS:
        assert f'<option value="{name}"' in body
    assert 'type="file"' in body and 'id="error"' not in body


# --- hostile uploads -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, filename, message",
    [
        (b"", "scan.dcm", "scan.dcm is empty (0 bytes)"),
        (b"patient name: x\nnot an image\n" * 20, "scan.dcm", "scan.dcm is not a DICOM, NIfTI"),
        (b"\0" * 128 + b"DICM" + b"\x02\x00garbage" * 10, "bad.dcm", "Could not read bad.dcm"),
        (b"\x1f\x8b" + b"\0" * 400, "scan.nii.gz", "is not a DICOM, NIfTI"),
    ],
)
@pytest.mark.filterwarnings("ignore:.*VR:UserWarning")  # pydicom on the garbage DICOM.
def test_unreadable_files_get_a_readable_message(client, predictor, data, filename, message):
    response, body = post(client, data, filename)
    assert response.status_code == 400
    assert message in element_text(body, "error")
    assert predictor.calls == 0


def test_image_claiming_a_huge_size_is_refused_before_decoding(client, predictor):
    start = time.perf_counter()
    response, body = post(client, png_header_only(100_000, 100_000), "bomb.png")
    assert time.perf_counter() - start < 2.0
    assert response.status_code == 400
    assert "declares an image of 10,000,000,000 voxels" in element_text(body, "error")
    assert predictor.calls == 0


def jpeg_bytes(gray: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".jpg", gray)
    assert ok
    return encoded.tobytes()


def test_declared_size_is_read_from_each_kind_of_header(tmp_path):
    volume = np.zeros((24, 16, 3), np.float32)
    gray = np.zeros((30, 70), np.uint8)
    files = {
        "png": png_bytes(gray),
        "jpeg": jpeg_bytes(gray),
        "dicom": dicom_bytes(tmp_path, np.zeros((20, 40), np.float32)),
        "nifti": nifti_bytes(tmp_path, volume),
        "nifti_gz": nifti_bytes(tmp_path, volume, gz=True),
    }
    expected = {"png": 2100, "jpeg": 2100, "dicom": 800, "nifti": 1152, "nifti_gz": 1152}
    for kind, data in files.items():
        assert serve.sniff_kind(data) == kind
        assert serve.declared_voxels(data, kind) == expected[kind], kind


def test_jpeg_claiming_a_huge_size_is_refused(client, predictor):
    data = bytearray(jpeg_bytes(np.zeros((30, 70), np.uint8)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 60_000)
    response, body = post(client, bytes(data), "huge.jpg")
    assert response.status_code == 400
    assert "declares an image of 3,600,000,000 voxels" in element_text(body, "error")
    assert predictor.calls == 0


def test_gzip_bomb_is_decompressed_only_as_far_as_its_header_says(client, tmp_path):
    small = nifti_bytes(tmp_path, np.zeros((8, 8, 1), np.float32))
    bomb = gzip.compress(small + b"\0" * 20_000_000, compresslevel=9)
    assert len(bomb) < 50_000
    assert len(serve.gunzip_nifti(bomb, max_bytes=10_000)) == len(small)
    response, body = post(client, bomb, "bomb.nii.gz")
    assert response.status_code == 200
    assert element_text(body, "area") == "Hemorrhage area: 0.00 cm²"
    with pytest.raises(serve.UploadError, match="needs 480 bytes"):
        serve.gunzip_nifti(gzip.compress(small), max_bytes=100)


def test_oversize_upload_gets_a_413_page(predictor, upload_dir):
    client = serve.create_app(
        predictor, max_upload_bytes=2000, upload_dir=str(upload_dir)
    ).test_client()
    response, body = post(client, b"\0" * 5000, "big.dcm")
    assert response.status_code == 413
    assert "larger than the" in element_text(body, "error")
    response, _ = post(client, b"\0" * 5000, "big.dcm", url="/api/segment")
    assert response.status_code == 413 and "larger than" in response.get_json()["error"]


@pytest.mark.parametrize("filename", ["../../etc/passwd", "..\\..\\x.dcm", "/abs/x.dcm", "a\0b"])
def test_client_file_name_never_becomes_a_path(client, upload_dir, tmp_path, filename, monkeypatch):
    read_paths = []
    real_read = ct.read_ct_file

    def recording_read(path):
        read_paths.append(path)
        return real_read(path)

    monkeypatch.setattr(ct, "read_ct_file", recording_read)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    response, _ = post(client, dicom_bytes(tmp_path / "d", head_hu()), filename)
    assert response.status_code == 200
    (path,) = read_paths
    assert os.path.basename(path) == "upload.dcm"
    assert os.path.dirname(os.path.dirname(path)) == str(upload_dir)
    after = sorted(
        str(p) for p in tmp_path.rglob("*") if not str(p).startswith(str(tmp_path / "d"))
    )
    assert after == [p for p in before if not p.startswith(str(tmp_path / "d"))]


def test_large_uploads_are_received_in_memory_not_spilled_to_disk(client, monkeypatch):
    import werkzeug.wrappers.request

    def no_spill(**kwargs):
        raise AssertionError("werkzeug spilled the upload to a temporary file")

    monkeypatch.setattr(werkzeug.wrappers.request, "default_stream_factory", no_spill)
    response, body = post(client, b"x" * 700_000, "big.txt")  # Above werkzeug's 500 KB.
    assert response.status_code == 400
    assert "big.txt is not a DICOM" in element_text(body, "error")


def test_file_name_with_markup_is_shown_escaped(client, tmp_path):
    name = '<script>alert("x")</script><img src=x onerror=alert(1)>.dcm'
    response, body = post(client, b"not an image at all", name)
    assert response.status_code == 400
    assert "<script" not in body and "<img src=x" not in body
    assert "&lt;script&gt;" in body


def test_reader_error_message_shows_the_file_name_not_the_server_path(client, upload_dir):
    header = b"\0" * 128 + b"DICM"
    response, body = post(client, header, "short.dcm")
    error = element_text(body, "error")
    assert response.status_code == 400 and "short.dcm" in error
    assert str(upload_dir) not in body and "upload.dcm" not in body


def test_unexpected_failures_give_a_generic_message(client, predictor, tmp_path, monkeypatch):
    def broken_segment(hu, spacing):
        raise RuntimeError("model exploded at /srv/secret/checkpoint")

    monkeypatch.setattr(predictor, "segment", broken_segment)
    response, body = post(client, dicom_bytes(tmp_path, head_hu()), "slice.dcm")
    assert response.status_code == 500
    assert element_text(body, "error") == serve.GENERIC_FAILURE
    assert "secret" not in body and "exploded" not in body
    response, _ = post(client, dicom_bytes(tmp_path, head_hu()), "slice.dcm", url="/api/segment")
    assert response.status_code == 500 and response.get_json() == {"error": serve.GENERIC_FAILURE}


def test_responses_carry_a_no_script_content_policy(client):
    response = client.get("/")
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"


# --- the command ---------------------------------------------------------------------------


def test_server_listens_on_loopback_by_default():
    flag_values = flags.FlagValues()
    serve.define_flags(flag_values)
    assert flag_values["host"].default == "127.0.0.1"
    assert flag_values["port"].default == 8080
    assert serve.is_loopback(flag_values["host"].default)
    assert serve.is_loopback("::1") and serve.is_loopback("localhost")
    assert not serve.is_loopback("0.0.0.0") and not serve.is_loopback("192.168.1.5")
