"""A local web page for the ICH task: upload a head CT slice, see the predicted hemorrhage.

  python -m medjax.serve --config=configs/ich.py --workdir=runs/ich [--host=127.0.0.1 --port=8080]

then open http://127.0.0.1:8080/ . A clinician uploads a DICOM, a NIfTI volume or slice, or a
PNG/JPEG, picks a display window, and gets the windowed CT with the predicted hemorrhage mask in
red, the slice-level hemorrhage probability and the hemorrhage area (cm² when the file gives its
pixel spacing, else pixels). `POST /api/segment` takes the same form fields and answers JSON.

The model is loaded once at start. The server binds 127.0.0.1 unless told otherwise; it has no
authentication, so serve it to a network only behind something that provides it.

Uploads are handled as untrusted input:
- the request size is limited (`--max_upload_mb`, HTTP 413 beyond it);
- the file kind is told from its content (DICOM preamble, NIfTI header, PNG/JPEG signature), never
  from its name, and the image size declared in its header is checked before anything is decoded,
  so a small file claiming a huge image is refused without allocating it;
- the client's file name is never used as a path: each upload is received in memory, then written
  under a fixed name into a fresh temporary directory, which is deleted before the response is
  sent;
- a file that cannot be read gives a readable message on the page; any other failure gives a
  generic message, and the details (stack trace included) go to the server's log only. No response
  contains a server path.
"""

from __future__ import annotations

import base64
import gzip
import io
import ipaddress
import os
import struct
import sys
import tempfile
import threading
import unicodedata
from typing import Any, Protocol

import cv2
import flask
import numpy as np
from absl import app as absl_app
from absl import flags, logging
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from medjax.preprocess import ct
from medjax.preprocess.image import declared_image_size

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_UPLOAD_MB = 64
# 512 x 512 x 512 voxels: a whole head CT volume fits; a header claiming more is refused.
DEFAULT_MAX_VOXELS = 2**27
# Decompressed NIfTI data may hold up to this many bytes per allowed voxel (float64).
BYTES_PER_VOXEL = 8
CUSTOM_WINDOW = "custom"
UPLOAD_BASENAME = "upload"
MAX_DISPLAY_NAME = 80
OVERLAY_RGB = (255, 0, 0)
OVERLAY_ALPHA = 0.45

ACCEPTED_KINDS = "DICOM, NIfTI (.nii or .nii.gz) or PNG/JPEG"
GENERIC_FAILURE = (
    "Something went wrong while analysing this file. The details are in the server's log; "
    "please try again, or try another file."
)
# The fixed name's suffix for each kind (.nii.gz uploads are saved decompressed).
_SUFFIXES = {
    "dicom": ".dcm",
    "nifti": ".nii",
    "png": ".png",
    "jpeg": ".jpg",
}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SECURITY_HEADERS = {
    # The page runs no script and loads nothing: images are inline data URLs.
    "Content-Security-Policy": (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Predictor(Protocol):
    """What the server needs from a model (`medjax.tasks.ich.IchPredictor` is one)."""

    def segment(self, hu: np.ndarray, pixel_spacing_mm: tuple[float, float] | None) -> dict:
        """Returns prob, mask, p_hemorrhage, area_px and area_cm2 for one (H, W) HU slice."""


class UploadError(ValueError):
    """A problem with the user's upload or form, worded for the user (no server paths)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------
# Checking an upload by its content
# ---------------------------------------------------------------------------------------------


def sniff_kind(data: bytes) -> str | None:
    """The kind of a file from its first bytes: 'dicom', 'nifti', 'nifti_gz', 'png', 'jpeg'.

    Args:
      data: the file's bytes (at least the first 540 are looked at).

    Returns:
      The kind, or None when the content is none of them (whatever the file is called).
    """
    if data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if _is_nifti_header(data):
        return "nifti"
    if data.startswith(b"\x1f\x8b"):
        header = ct.gunzip_head(data)
        if header is not None and _is_nifti_header(header):
            return "nifti_gz"
    return None


def _is_nifti_header(header: bytes) -> bool:
    if len(header) < 348:
        return False
    for endian in "<>":
        (sizeof_hdr,) = struct.unpack(endian + "i", header[:4])
        if sizeof_hdr == 348 and header[344:347] in (b"n+1", b"ni1"):
            return True
        if sizeof_hdr == 540 and header[4:7] in (b"n+2", b"ni2"):
            return True
    return False


def declared_voxels(data: bytes, kind: str) -> int | None:
    """The number of voxels the file's header declares, read without decoding any pixels.

    Args:
      data: the file's bytes.
      kind: its kind from `sniff_kind`.

    Returns:
      Rows x columns (x slices or frames, x samples per pixel for DICOM), or None when the header
      cannot be parsed here (the reader then reports the file as unreadable).
    """
    try:
        if kind in ("png", "jpeg"):
            size = declared_image_size(data)
            return None if size is None else size[0] * size[1]
        if kind in ("nifti", "nifti_gz"):
            header = data if kind == "nifti" else ct.gunzip_head(data)
            layout = ct.nifti_layout(header) if header else None
            return None if layout is None else layout[0]
        if kind == "dicom":
            return _dicom_voxels(data)
    except (struct.error, ValueError, TypeError, OverflowError):
        return None
    return None


def gunzip_nifti(data: bytes, max_bytes: int) -> bytes:
    """Decompresses a .nii.gz upload, never past what its header says the image needs.

    A small gzip file can expand to gigabytes; only the header and the voxel data it declares
    are decompressed (anything after them is dropped), so memory stays bounded by the header,
    which the caller has already checked.

    Args:
      data: the gzip bytes.
      max_bytes: the most decompressed bytes accepted.

    Returns:
      The uncompressed NIfTI bytes (possibly shorter than declared: the reader reports that).

    Raises:
      UploadError: the header is unreadable or declares more than `max_bytes`.
    """
    header = ct.gunzip_head(data)
    layout = ct.nifti_layout(header) if header else None
    if layout is None:
        raise UploadError("the compressed NIfTI header is damaged; export the .nii.gz again.")
    needed = layout[1]
    if needed > max_bytes:
        raise UploadError(
            f"the NIfTI image needs {needed:,} bytes uncompressed; the largest accepted is "
            f"{max_bytes:,}. Upload a single slice or a smaller volume."
        )
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            return f.read(needed)
    except (OSError, EOFError, ValueError):
        raise UploadError("the gzip data are damaged; export the .nii.gz again.") from None


def _dicom_voxels(data: bytes) -> int | None:
    import pydicom  # Only DICOM uploads need it.

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception:  # pydicom raises many types for bad files; the reader reports them.
        return None
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if rows is None or columns is None:
        return None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    return int(rows) * int(columns) * frames * samples


def display_name(filename: str | None) -> str:
    """The client's file name made safe to show: last path component, printable, truncated.

    It is only ever shown (escaped by the template), never used as a path.

    Args:
      filename: the name the browser sent, possibly hostile ('../../etc/passwd', '<script>').

    Returns:
      The name to show, or 'the uploaded file' when nothing printable is left.
    """
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C").strip()
    if len(name) > MAX_DISPLAY_NAME:
        name = name[: MAX_DISPLAY_NAME - 1] + "…"
    return name or "the uploaded file"


# ---------------------------------------------------------------------------------------------
# Form fields
# ---------------------------------------------------------------------------------------------


def window_choices() -> list[tuple[str, str]]:
    """(value, label) of each named window, then the custom one, for the page's select."""
    choices = [
        (name, f"{name.replace('_', ' ')} (L {level:g} / W {width:g})")
        for name, (level, width) in ct.WINDOWS.items()
    ]
    return choices + [(CUSTOM_WINDOW, "custom level / width")]


def resolve_window(form) -> tuple[str, tuple[float, float]]:
    """The window the form asks for, as (label, (level, width)).

    Args:
      form: the request form: 'window' (a name of `ct.WINDOWS`, or 'custom' with 'level' and
        'width' in HU).

    Raises:
      UploadError: an unknown window name, or a custom level/width that is not a number
        (or a width that is not positive).
    """
    name = (form.get("window") or "brain").strip()
    if name == CUSTOM_WINDOW:
        level, width = (form.get("level") or "").strip(), (form.get("width") or "").strip()
        if not level or not width:
            raise UploadError("A custom window needs both a level and a width in HU, e.g. 40 / 80.")
        spec = f"{level}/{width}"
    elif name in ct.WINDOWS:
        spec = name
    else:
        raise UploadError(
            f"Unknown window {name!r}; choose one of {', '.join(ct.WINDOWS)} or custom."
        )
    try:
        level_hu, width_hu = ct.parse_window(spec)
    except ValueError as e:
        raise UploadError(f"Window {spec!r} cannot be used: {e}") from None
    if not (np.isfinite(level_hu) and np.isfinite(width_hu) and width_hu > 0):
        raise UploadError(f"Window {spec!r}: the width must be a positive number of HU.")
    label = name.replace("_", " ") if name != CUSTOM_WINDOW else "custom"
    return f"{label} (L {level_hu:g} / W {width_hu:g})", (float(level_hu), float(width_hu))


def _requested_slice(form) -> int | None:
    text = (form.get("slice") or "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise UploadError(f"Slice {text!r} is not a whole number; leave it empty for the middle.")


def pick_slice(hu: np.ndarray, requested: int | None) -> tuple[np.ndarray, int, int]:
    """One (H, W) slice of a CT image.

    Args:
      hu: (H, W) or (H, W, S) HU values.
      requested: 1-based slice number, or None for the middle slice.

    Returns:
      (slice (H, W), its 1-based number, the number of slices).

    Raises:
      UploadError: the slice number is outside 1..S, or the array is not 2-D or 3-D.
    """
    if hu.ndim == 2:
        count = 1
        hu = hu[:, :, None]
    elif hu.ndim == 3:
        count = hu.shape[2]
    else:
        raise UploadError(
            f"This file holds a {hu.ndim}-D image of shape {tuple(hu.shape)}; upload one CT slice "
            "or one CT volume (rows x columns x slices)."
        )
    number = count // 2 + 1 if requested is None else requested
    if not 1 <= number <= count:
        raise UploadError(
            f"Slice {number} does not exist: this file has {count} slice(s), numbered 1 to {count}."
        )
    return np.array(hu[:, :, number - 1], np.float32), number, count


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def overlay_rgb(windowed: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The windowed CT in gray with the mask blended in red and outlined.

    Args:
      windowed: (H, W) uint8 windowed CT.
      mask: (H, W) bool predicted hemorrhage.

    Returns:
      (H, W, 3) uint8 RGB.
    """
    rgb = np.repeat(windowed[:, :, None], 3, axis=2).astype(np.float32)
    red = np.asarray(OVERLAY_RGB, np.float32)
    rgb[mask] = (1 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * red
    rgb = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    cv2.drawContours(rgb, contours, -1, OVERLAY_RGB, 1)
    return rgb


def png_data_url(image: np.ndarray) -> str:
    """A `data:image/png;base64,...` URL of a (H, W) gray or (H, W, 3) RGB uint8 image."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError(f"PNG encoding failed for an image of shape {image.shape}.")
    return "data:image/png;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


# ---------------------------------------------------------------------------------------------
# One request
# ---------------------------------------------------------------------------------------------


def _sanitise(text: str, replacements: dict[str, str]) -> str:
    for secret, shown in replacements.items():
        text = text.replace(secret, shown)
    return text


def _read_upload(
    data: bytes, kind: str, name: str, work_dir: str, max_bytes: int
) -> tuple[ct.CtImage, list[str]]:
    """Writes the checked bytes of `kind` under a fixed name in `work_dir` and reads them as CT.

    A .nii.gz is decompressed here (at most `max_bytes`) and written uncompressed.

    Returns:
      (the image, its warnings with the temporary path replaced by the shown name).
    """
    if kind == "nifti_gz":
        try:
            data, kind = gunzip_nifti(data, max_bytes), "nifti"
        except UploadError as e:
            raise UploadError(f"Could not read {name}: {e}") from None
    path = os.path.join(work_dir, UPLOAD_BASENAME + _SUFFIXES[kind])
    with open(path, "wb") as f:
        f.write(data)
    replacements = {path: name, work_dir + os.sep: "", work_dir: "", os.path.basename(path): name}
    try:
        image = ct.read_ct_file(path)
    except ValueError as e:  # CtReadError and friends: a file the user can fix.
        reason = _sanitise(str(e), replacements).removeprefix(f"{name}: ")
        if tempfile.gettempdir() in reason:
            reason = "its content is not valid."
        raise UploadError(f"Could not read {name} as {ACCEPTED_KINDS}: {reason}") from None
    return image, [_sanitise(str(w), replacements) for w in image.warnings]


def analyse_upload(
    predictor: Predictor,
    lock: threading.Lock,
    request: flask.Request,
    *,
    max_voxels: int,
    upload_dir: str | None,
) -> dict[str, Any]:
    """Runs one upload through reading, windowing and the model.

    Returns:
      The result shown on the page: name, window, slice, count, probability, area, warnings and
      the two pictures as data URLs.

    Raises:
      UploadError: anything wrong with the file or the form, worded for the user.
    """
    upload = request.files.get("file")
    if upload is None:
        raise UploadError("Choose a file to upload (DICOM, NIfTI, PNG or JPEG).")
    name = display_name(upload.filename)
    window_label, window = resolve_window(request.form)
    requested_slice = _requested_slice(request.form)
    data = upload.stream.read()
    if not data:
        raise UploadError(f"{name} is empty (0 bytes); choose the file again or re-export it.")
    kind = sniff_kind(data)
    if kind is None:
        raise UploadError(
            f"{name} is not a {ACCEPTED_KINDS} file (the content was checked, not the name)."
        )
    voxels = declared_voxels(data, kind)
    if voxels is not None and voxels > max_voxels:
        raise UploadError(
            f"{name} declares an image of {voxels:,} voxels; the largest accepted is "
            f"{max_voxels:,}. Upload a single slice or a smaller volume."
        )
    with tempfile.TemporaryDirectory(prefix="medjax-serve-", dir=upload_dir) as work_dir:
        image, warnings = _read_upload(data, kind, name, work_dir, max_voxels * BYTES_PER_VOXEL)
        # Copied before the directory goes: a reader may hand back a memory-mapped array.
        hu, number, count = pick_slice(np.asarray(image.hu), requested_slice)
    spacing = image.pixel_spacing_mm
    spacing = None if spacing is None else (float(spacing[0]), float(spacing[1]))
    with lock:
        result = predictor.segment(hu, spacing)
    mask = np.asarray(result["mask"], bool)
    if mask.shape != hu.shape:
        raise RuntimeError(f"The model returned a mask of shape {mask.shape} for {hu.shape}.")
    windowed = ct.window_uint8(hu, window)
    area_cm2 = result.get("area_cm2")
    return {
        "name": name,
        "window": window_label,
        "slice": number,
        "slice_count": count,
        "shape": list(hu.shape),
        "pixel_spacing_mm": list(spacing) if spacing else None,
        "p_hemorrhage": float(result["p_hemorrhage"]),
        "area_px": int(result["area_px"]),
        "area_cm2": None if area_cm2 is None else float(area_cm2),
        "warnings": warnings,
        "image_url": png_data_url(windowed),
        "overlay_url": png_data_url(overlay_rgb(windowed, mask)),
    }


def area_text(result: dict) -> str:
    """'3.21 cm²', or '123 px (pixel spacing unknown)' when the file gave no spacing."""
    if result["area_cm2"] is None:
        return f"{result['area_px']} px (pixel spacing unknown)"
    return f"{result['area_cm2']:.2f} cm²"


# ---------------------------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------------------------

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>medjax: intracranial hemorrhage</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem; background: #111; color: #eee; }
  form { display: flex; flex-wrap: wrap; gap: 0.8rem; align-items: end; margin-bottom: 1rem; }
  label { display: flex; flex-direction: column; font-size: 0.85rem; gap: 0.2rem; }
  input[type=number] { width: 6rem; }
  .error { background: #5a1010; padding: 0.6rem 0.8rem; border-radius: 4px; }
  .pictures { display: flex; flex-wrap: wrap; gap: 1rem; }
  figure { margin: 0; }
  figure img { width: 512px; max-width: 90vw; image-rendering: pixelated; background: #000; }
  .numbers { font-size: 1.3rem; }
  .note { color: #aaa; font-size: 0.85rem; }
</style>
</head>
<body>
<h1>Intracranial hemorrhage on head CT</h1>
<p class="note">Research software: not for diagnosis.</p>
<form id="upload" method="post" action="{{ url_for('index') }}" enctype="multipart/form-data">
  <label>CT file (DICOM, NIfTI, PNG or JPEG; up to {{ max_upload_mb }} MB)
    <input id="file" type="file" name="file" required></label>
  <label>Window
    <select id="window" name="window">
    {% for value, text in windows %}
      <option value="{{ value }}"{% if value == form.window %} selected{% endif %}>{{ text }}</option>
    {% endfor %}
    </select></label>
  <label>Custom level (HU)
    <input id="level" type="number" step="any" name="level" value="{{ form.level }}"></label>
  <label>Custom width (HU)
    <input id="width" type="number" step="any" name="width" value="{{ form.width }}"></label>
  <label>Slice of a volume (empty: middle)
    <input id="slice" type="number" min="1" step="1" name="slice" value="{{ form.slice }}"></label>
  <button id="submit" type="submit">Analyse</button>
</form>
{% if error %}
<p id="error" class="error">{{ error }}</p>
{% endif %}
{% if result %}
<section id="result">
  <h2>{{ result.name }}</h2>
  <p class="numbers"><span id="probability">Hemorrhage probability: {{ "%.2f"|format(result.p_hemorrhage) }}</span><br>
  <span id="area">Hemorrhage area: {{ area }}</span></p>
  <p class="note">Window {{ result.window }}; slice {{ result.slice }} of {{ result.slice_count }};
  {{ result.shape[0] }} x {{ result.shape[1] }} pixels{% if result.pixel_spacing_mm %},
  pixel spacing {{ "%.3g"|format(result.pixel_spacing_mm[0]) }} x {{ "%.3g"|format(result.pixel_spacing_mm[1]) }} mm{% endif %}.</p>
  {% if result.warnings %}
  <ul id="warnings">{% for warning in result.warnings %}<li>{{ warning }}</li>{% endfor %}</ul>
  {% endif %}
  <div class="pictures">
    <figure><img id="overlay" alt="CT with the predicted hemorrhage in red" src="{{ result.overlay_url }}">
      <figcaption>Predicted hemorrhage (red)</figcaption></figure>
    <figure><img id="image" alt="CT" src="{{ result.image_url }}">
      <figcaption>CT</figcaption></figure>
  </div>
</section>
{% endif %}
</body>
</html>
"""


class _InMemoryUploadRequest(flask.Request):
    """A request keeping uploaded files in memory (they are read whole anyway, and bounded by
    MAX_CONTENT_LENGTH), instead of werkzeug's spill to a file in the system temp folder."""

    def _get_file_stream(
        self, total_content_length, content_type, filename=None, content_length=None
    ):
        return io.BytesIO()


def create_app(
    predictor: Predictor,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 2**20,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    upload_dir: str | None = None,
) -> flask.Flask:
    """The Flask application serving the page (`/`) and the JSON API (`/api/segment`).

    Args:
      predictor: any object with `segment(hu (H, W) float32, pixel_spacing_mm) -> dict(prob,
        mask, p_hemorrhage, area_px, area_cm2)`, loaded once by the caller; calls to it are
        serialised.
      max_upload_bytes: the largest request accepted; larger ones get HTTP 413 and a message.
      max_voxels: the largest image (rows x columns x slices) a file's header may declare.
      upload_dir: where each request's temporary directory is made (default: the system's).

    Returns:
      The application; `app.run(...)` or any WSGI server serves it.
    """
    if max_upload_bytes <= 0:
        raise ValueError(f"max_upload_bytes={max_upload_bytes} must be positive.")
    server = flask.Flask(__name__)
    server.request_class = _InMemoryUploadRequest
    server.config["MAX_CONTENT_LENGTH"] = int(max_upload_bytes)
    lock = threading.Lock()
    max_upload_mb = f"{max_upload_bytes / 2**20:g}"

    def render(status: int = 200, *, error: str | None = None, result: dict | None = None):
        fields = dict.fromkeys(("window", "level", "width", "slice"), "")
        if flask.request.method == "POST":
            try:
                fields.update({k: flask.request.form.get(k, "") for k in fields})
            except HTTPException:  # A too-large or malformed request has no form to show.
                pass
        fields["window"] = fields["window"] or "brain"
        html = flask.render_template_string(
            PAGE,
            windows=window_choices(),
            form=fields,
            error=error,
            result=result,
            area=area_text(result) if result else None,
            max_upload_mb=max_upload_mb,
        )
        return html, status

    def wants_json() -> bool:
        return flask.request.path.startswith("/api/")

    def failure(status: int, message: str):
        if wants_json():
            return flask.jsonify(error=message), status
        return render(status, error=message)

    @server.route("/", methods=["GET", "POST"])
    def index():
        if flask.request.method == "GET":
            return render()
        try:
            result = analyse_upload(
                predictor, lock, flask.request, max_voxels=max_voxels, upload_dir=upload_dir
            )
        except UploadError as e:
            return failure(e.status, str(e))
        return render(result=result)

    @server.route("/api/segment", methods=["POST"])
    def api_segment():
        try:
            result = analyse_upload(
                predictor, lock, flask.request, max_voxels=max_voxels, upload_dir=upload_dir
            )
        except UploadError as e:
            return failure(e.status, str(e))
        result["area_text"] = area_text(result)
        return flask.jsonify(result)

    @server.errorhandler(RequestEntityTooLarge)
    def too_large(_):
        return failure(
            413,
            f"The upload is larger than the {max_upload_mb} MB limit. Upload a single slice, a "
            "compressed volume (.nii.gz), or restart the server with a larger --max_upload_mb.",
        )

    @server.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        return failure(e.code or 500, f"{e.code} {e.name}: {e.description}")

    @server.errorhandler(Exception)
    def unexpected(e: Exception):
        logging.exception("Failed on %s %s", flask.request.method, flask.request.path)
        return failure(500, GENERIC_FAILURE)

    @server.after_request
    def security_headers(response: flask.Response):
        response.headers.update(_SECURITY_HEADERS)
        return response

    return server


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the command's flags (here, not at import, so importing this module is harmless)."""
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config",
        None,
        "The ICH task config file, e.g. configs/ich.py.",
        flag_values=flag_values,
        lock_config=True,
    )
    flags.DEFINE_string(
        "workdir",
        None,
        "The experiment directory the ICH model trained in.",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "checkpoint", "best", "best, latest, or a step number.", flag_values=flag_values
    )
    flags.DEFINE_string(
        "host",
        DEFAULT_HOST,
        "Address to listen on. The default serves this computer only; the page has no login, "
        "so listen on a network address only behind an authenticating proxy.",
        flag_values=flag_values,
    )
    flags.DEFINE_integer("port", DEFAULT_PORT, "Port to listen on.", flag_values=flag_values)
    flags.DEFINE_float(
        "max_upload_mb",
        DEFAULT_MAX_UPLOAD_MB,
        "The largest upload accepted, in MB.",
        lower_bound=0.001,
        flag_values=flag_values,
    )
    flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or 'localhost') is reachable from this computer only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv):
    if len(argv) > 1:
        raise absl_app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from medjax import writers

    writers.quiet_library_logs()
    f = flags.FLAGS
    if f.config.get("task") != "ich":
        raise absl_app.UsageError(
            f"--config={f['config'].config_filename} is for task {f.config.get('task')!r}; "
            "medjax.serve serves the ICH task (configs/ich.py)."
        )
    from medjax.tasks.ich import (
        IchPredictor,  # Imported here: only the command needs the model.
    )

    try:
        predictor = IchPredictor(f.workdir, checkpoint=f.checkpoint)
    except FileNotFoundError as e:  # No trained run or checkpoint there: the message says which.
        sys.exit(f"Error: {e}")
    server = create_app(predictor, max_upload_bytes=int(f.max_upload_mb * 2**20))
    if not is_loopback(f.host):
        logging.warning(
            "Listening on %s: anyone who can reach this address can upload files; the page has "
            "no login.",
            f.host,
        )
    print(f"Serving the ICH model from {f.workdir} on http://{f.host}:{f.port}/ (Ctrl-C stops).")
    server.run(host=f.host, port=f.port, threaded=True, debug=False, use_reloader=False)


if __name__ == "__main__":
    define_flags()
    absl_app.run(main)
