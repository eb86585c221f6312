"""Synthetic head CT volumes with hemorrhage masks in the PhysioNet CT-ICH raw layout.

`synthesize(out_dir, num, seed)` writes::

    out_dir/ct_scans/<NNN>.nii                  int16 HU volume (H, W, S), H = W = image_size
    out_dir/masks/<NNN>.nii                     uint8 0/1 hemorrhage mask, same shape
    out_dir/hemorrhage_diagnosis_raw_ct.csv     PatientNumber,SliceNumber,Intraventricular,
                                                Intraparenchymal,Subarachnoid,Epidural,
                                                Subdural,No_Hemorrhage,Fracture_Yes_No
    out_dir/dicom/<NNN>/*.dcm                   the same volume as a DICOM series (dicom=True)

Patients are numbered from 49 up, as in the real dataset (049..130): the files are named with
three digits ("049"), the CSV holds the plain number (49) and 1-indexed slice numbers.

Each volume is an axial head CT from the skull base (slice 1) to the vertex, in display
orientation (anterior at the top, patient's left on the image right): air (-1000 HU) around a
thin scalp (~30 HU), an elliptical skull ring (1000-1800 HU, a few pixels thick, narrower
towards the base and the vertex), grey-matter cortex (~40 HU) over white matter (~26 HU), CSF
(~5 HU) in the lateral ventricles and the sulci, deep grey nuclei, sometimes a calcified pineal
gland (~300 HU). About 44 % of patients (36 of 82 in the real set, at least one patient and at
least one without when num >= 2) have one or two hemorrhages, each on a run of consecutive
slices, 55-90 HU (acute blood, brighter than brain at the brain window):

    epidural         lens against the inner table (circle cut by the skull), often with a
                     fracture: a thin lucent gap through the skull (Fracture_Yes_No = 1)
    subdural         crescent along the inner table, thickest in its middle
    intraparenchymal irregular blob in the brain with a hypodense oedema rim
    intraventricular blood layering in the dependent (posterior) part of a lateral ventricle
    subarachnoid     blood filling sulci and a thin layer along the brain surface

The mask is exactly the pixels painted with blood, and the CSV labels of a slice are the
subtypes with painted pixels on it (No_Hemorrhage = 1 when none). The scan is then blurred
slightly (Gaussian, sigma 0.6 px) and gets white Gaussian noise of 5-8 HU, so blood is not
separable from brain pixel by pixel but is on average.

Pixel spacing is 0.45 mm * 512 / image_size (about 1.8 mm at 128 px: the real scans are 512 px
at 0.4-0.5 mm), jittered by 10 %; slices are 5 mm apart. Output is deterministic for a seed.
"""

import csv
import dataclasses
import math
import os

import cv2
import numpy as np
from medjax_datasets.ct_ich.ct_ich import (
    CSV_COLUMNS,
    CT_SCANS_DIR,
    MASKS_DIR,
    RAW_CSV,
    SUBTYPES,
)

from medjax.preprocess.ct import write_dicom_series, write_nifti_volume

FIRST_PATIENT = 49
HEMORRHAGE_FRACTION = 36 / 82
SLICE_SPACING_MM = 5.0
REAL_PIXEL_SPACING_MM = 0.45
REAL_SIZE = 512
BLUR_SIGMA_PX = 0.6
NOISE_HU = (5.0, 8.0)
# Subtype -> relative frequency of drawing it.
SUBTYPE_WEIGHTS = {
    "intraparenchymal": 0.3,
    "subdural": 0.25,
    "subarachnoid": 0.2,
    "intraventricular": 0.12,
    "epidural": 0.13,
}
MIN_LESION_PIXELS = 3  # Smaller cuts of a lesion are not painted (nor labelled).


@dataclasses.dataclass
class _Head:
    """Per-patient anatomy in head coordinates (u to the patient's left, v posterior)."""

    u: np.ndarray  # (H, W) pixel coordinates in the head frame.
    v: np.ndarray
    radius: np.ndarray  # Distance to the head centre, pixels.
    angle: np.ndarray  # atan2(v, u).
    semi_u: float  # Outer skull semi-axes at the widest slice, pixels.
    semi_v: float
    skull_px: float
    scalp_px: float
    cortex_px: float
    grey_hu: float
    white_hu: float
    ventricle_scale: float
    sulci: np.ndarray  # (K, 2): angle, depth in pixels.
    pineal: bool


def _head_scale(t: float) -> float:
    """Cross-section scale of the head at relative height t (0 skull base, 1 vertex)."""
    return math.sqrt(max(0.2, 1.0 - ((t - 0.45) / 0.62) ** 2))


def _wrap(angle: np.ndarray) -> np.ndarray:
    return (angle + np.pi) % (2 * np.pi) - np.pi


def _smooth_field(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """A (size, size) Gaussian random field of unit standard deviation."""
    noise = rng.standard_normal((size, size)).astype(np.float32)
    field = cv2.GaussianBlur(noise, (0, 0), sigma)
    return field / max(float(field.std()), 1e-6)


def _make_head(rng: np.random.Generator, size: int) -> _Head:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    centre = (size - 1) / 2 + rng.uniform(-0.03, 0.03, 2) * size
    tilt = rng.uniform(-0.14, 0.14)
    dx, dy = xx - centre[0], yy - centre[1]
    u = dx * math.cos(tilt) + dy * math.sin(tilt)
    v = -dx * math.sin(tilt) + dy * math.cos(tilt)
    semi_v = size * rng.uniform(0.38, 0.43)
    num_sulci = int(rng.integers(10, 17))
    return _Head(
        u=u,
        v=v,
        radius=np.hypot(u, v),
        angle=np.arctan2(v, u),
        semi_u=semi_v * rng.uniform(0.78, 0.86),
        semi_v=semi_v,
        skull_px=max(2.0, 0.022 * size) * rng.uniform(0.9, 1.3),
        scalp_px=max(1.0, 0.012 * size) * rng.uniform(0.8, 1.4),
        cortex_px=max(2.0, 0.03 * size) * rng.uniform(0.9, 1.2),
        grey_hu=rng.uniform(38.0, 42.0),
        white_hu=rng.uniform(24.0, 28.0),
        ventricle_scale=rng.uniform(0.8, 1.4),
        sulci=np.stack(
            [rng.uniform(-np.pi, np.pi, num_sulci), rng.uniform(1.0, 2.0, num_sulci)], axis=1
        ),
        pineal=bool(rng.random() < 0.5),
    )


@dataclasses.dataclass
class _Slice:
    """Geometry of one axial slice: depth below the outer skull surface and brain regions."""

    depth: np.ndarray  # Pixels from the outer skull surface inwards (negative outside).
    brain_depth: np.ndarray  # Pixels below the inner table (negative in skull/outside).
    ventricles: np.ndarray  # bool
    scale: float


def _slice_geometry(head: _Head, t: float) -> _Slice:
    scale = _head_scale(t)
    a, b = head.semi_u * scale, head.semi_v * scale
    cos, sin = np.cos(head.angle), np.sin(head.angle)
    boundary = 1.0 / np.sqrt((cos / a) ** 2 + (sin / b) ** 2)
    depth = boundary - head.radius
    ventricles = np.zeros(depth.shape, bool)
    presence = 1.0 - abs(t - 0.53) / 0.2
    if presence > 0:  # Lateral ventricles on the middle slices, largest at t = 0.53.
        size = head.ventricle_scale * (0.4 + 0.6 * presence)
        for side in (-1.0, 1.0):
            cu, cv = side * 0.14 * a, -0.08 * b
            turn = -side * 0.25
            du, dv = head.u - cu, head.v - cv
            pu = du * math.cos(turn) + dv * math.sin(turn)
            pv = -du * math.sin(turn) + dv * math.cos(turn)
            half_u, half_v = 0.065 * a * size + 0.5, 0.33 * b * size
            ventricles |= (pu / half_u) ** 2 + (pv / half_v) ** 2 <= 1.0
    return _Slice(depth, depth - head.skull_px, ventricles, scale)


def _base_slice(head: _Head, geom: _Slice, t: float) -> np.ndarray:
    """HU of the healthy anatomy on one slice, before blur and noise."""
    depth, inside = geom.depth, geom.brain_depth
    hu = np.full(depth.shape, -1000.0, np.float32)
    hu[depth >= -head.scalp_px] = 30.0
    bone = (depth >= 0) & (inside < 0)
    # Dense inner and outer tables, lighter diploe between them.
    profile = np.abs(np.clip(depth / head.skull_px, 0, 1) * 2 - 1)
    hu[bone] = (1050.0 + 700.0 * profile)[bone]
    brain = inside >= 0
    grey_weight = np.clip(1.0 - (inside - head.cortex_px) / 2.0, 0.0, 1.0)
    tissue = head.white_hu + (head.grey_hu - head.white_hu) * grey_weight
    if 0.3 < t < 0.6:  # Deep grey nuclei beside the ventricles.
        a, b = head.semi_u * geom.scale, head.semi_v * geom.scale
        for side in (-1.0, 1.0):
            nuclei = ((head.u - side * 0.3 * a) / (0.1 * a)) ** 2 + (
                (head.v - 0.05 * b) / (0.18 * b)
            ) ** 2 <= 1.0
            tissue = np.where(nuclei, 36.0, tissue)
    hu[brain] = tissue[brain]
    hu[brain & sulci_mask(head, geom)] = 6.0
    hu[geom.ventricles & brain] = 5.0
    if head.pineal and 0.35 < t < 0.6:
        b = head.semi_v * geom.scale
        hu[np.hypot(head.u, head.v - 0.25 * b) <= max(0.8, 0.012 * hu.shape[0])] = 300.0
    return hu


def sulci_mask(head: _Head, geom: _Slice, widen: float = 1.0) -> np.ndarray:
    """Radial CSF clefts running from the brain surface into the cortex, `widen` times wider."""
    width = max(0.5, 0.004 * head.u.shape[0]) * widen
    mask = np.zeros(head.u.shape, bool)
    inside = geom.brain_depth
    for angle, depth_factor in head.sulci:
        across = np.abs(_wrap(head.angle - angle)) * head.radius
        mask |= (across <= width) & (inside >= 0) & (inside <= depth_factor * head.cortex_px)
    return mask


def _lesion_region(kind: str, head: _Head, geom: _Slice, params: dict, growth: float) -> np.ndarray:
    """The bool pixels of lesion `kind` on one slice; `growth` in (0, 1] scales its size."""
    inside = geom.brain_depth
    brain = inside >= 0
    a, b = head.semi_u * geom.scale, head.semi_v * geom.scale
    size = head.u.shape[0]
    if kind == "intraparenchymal":
        cu, cv = params["centre"][0] * a, params["centre"][1] * b
        du, dv = head.u - cu, head.v - cv
        theta = np.arctan2(dv, du)
        radius = params["radius"] * size * growth
        for k, amp, phase in params["harmonics"]:
            radius = radius * (1.0 + amp * np.cos(k * theta + phase))
        return brain & ~geom.ventricles & (np.hypot(du, dv) <= radius) & (inside >= 1.0)
    if kind == "epidural":
        angle = params["angle"]
        thick = max(1.5, params["thick"] * size * growth)
        bulge = params["radius"] * size
        cos, sin = math.cos(angle), math.sin(angle)
        edge = 1.0 / math.sqrt((cos / a) ** 2 + (sin / b) ** 2) - head.skull_px
        centre = (edge + bulge - thick) * np.array([cos, sin])
        disk = np.hypot(head.u - centre[0], head.v - centre[1]) <= bulge
        return brain & disk
    if kind == "subdural":
        off = np.abs(_wrap(head.angle - params["angle"])) / params["half_width"]
        thick = (
            max(1.5, params["thick"] * size * growth)
            * np.cos(np.clip(off, 0, 1) * np.pi / 2) ** 0.6
        )
        return brain & (off < 1.0) & (inside < thick)
    if kind == "subarachnoid":
        off = np.abs(_wrap(head.angle - params["angle"])) / (params["half_width"] * growth)
        near = off < 1.0
        layer = inside < max(1.0, 0.01 * size)
        return brain & near & (layer | sulci_mask(head, geom, widen=2.0))
    if kind == "intraventricular":
        level = b * (params["level"] - 0.3 * growth)
        side = head.u * params["side"] > 0
        return geom.ventricles & brain & side & (head.v >= level)
    raise ValueError(f"Unknown hemorrhage subtype {kind!r}.")


def _sample_lesion(rng: np.random.Generator, kind: str, num_slices: int) -> dict:
    """Random parameters and slice run of one lesion."""
    length = int(rng.integers(3, max(4, min(10, num_slices // 2)) + 1))
    if kind == "intraventricular":  # Where the ventricles are.
        middle = int(round(0.53 * num_slices))
        length = min(length, max(2, int(0.3 * num_slices)))
    else:
        middle = int(rng.integers(int(0.3 * num_slices), int(0.72 * num_slices) + 1))
    start = max(0, min(num_slices - length, middle - length // 2))
    params = {"slices": range(start, start + length), "hu": rng.uniform(62.0, 82.0)}
    angle = rng.uniform(-np.pi, np.pi)
    if kind == "intraparenchymal":
        direction = rng.uniform(-np.pi, np.pi)
        reach = rng.uniform(0.15, 0.55)
        params["centre"] = (reach * math.cos(direction), reach * math.sin(direction))
        params["radius"] = rng.uniform(0.035, 0.09)
        params["harmonics"] = [
            (k, rng.uniform(0.0, 0.2), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)
        ]
    elif kind == "epidural":
        params.update(angle=angle, thick=rng.uniform(0.04, 0.08), radius=rng.uniform(0.14, 0.22))
    elif kind == "subdural":
        params.update(angle=angle, thick=rng.uniform(0.02, 0.045), half_width=rng.uniform(0.5, 1.1))
    elif kind == "subarachnoid":
        params.update(angle=angle, half_width=rng.uniform(0.4, 0.9), hu=rng.uniform(58.0, 75.0))
    else:
        params.update(side=float(rng.choice([-1.0, 1.0])), level=rng.uniform(0.0, 0.25))
    return params


def draw_patient(
    rng: np.random.Generator, image_size: int, num_slices: int, hemorrhage: bool
) -> tuple[np.ndarray, np.ndarray, list[dict[str, int]], float]:
    """Draws one head CT.

    Args:
      rng: the patient's random generator.
      image_size: H = W of every slice.
      num_slices: S.
      hemorrhage: whether to draw hemorrhages.

    Returns:
      (hu, mask, labels, pixel_spacing_mm): float32 HU (H, W, S) after blur and noise; uint8
      0/1 mask (H, W, S) of the painted blood; per slice a dict of the CSV label columns
      (subtypes, No_Hemorrhage, Fracture_Yes_No); the in-plane pixel spacing in mm.
    """
    head = _make_head(rng, image_size)
    field = _smooth_field(rng, image_size, 3.0)
    noise_hu = rng.uniform(*NOISE_HU)
    lesions = []
    if hemorrhage:
        count = 2 if rng.random() < 0.3 else 1
        kinds = rng.choice(
            list(SUBTYPE_WEIGHTS),
            size=count,
            replace=False,
            p=np.array(list(SUBTYPE_WEIGHTS.values())) / sum(SUBTYPE_WEIGHTS.values()),
        )
        lesions = [(str(kind), _sample_lesion(rng, str(kind), num_slices)) for kind in kinds]
    fracture = None
    has_epidural = any(kind == "epidural" for kind, _ in lesions)
    if rng.random() < (0.6 if has_epidural else 0.05):
        if has_epidural:
            params = next(p for kind, p in lesions if kind == "epidural")
            fracture = (params["angle"] + rng.uniform(-0.15, 0.15), params["slices"])
        else:
            start = int(rng.integers(int(0.3 * num_slices), int(0.7 * num_slices)))
            fracture = (rng.uniform(-np.pi, np.pi), range(start, start + 2))

    hu = np.empty((image_size, image_size, num_slices), np.float32)
    mask = np.zeros((image_size, image_size, num_slices), np.uint8)
    labels = []
    for s in range(num_slices):
        t = (s + 0.5) / num_slices
        geom = _slice_geometry(head, t)
        plane = _base_slice(head, geom, t)
        row = {column: 0 for column in SUBTYPES.values()}
        row["Fracture_Yes_No"] = 0
        if fracture is not None and s in fracture[1]:
            across = np.abs(_wrap(head.angle - fracture[0])) * head.radius
            gap = (across <= max(0.6, 0.005 * image_size)) & (geom.depth >= 0)
            gap &= geom.brain_depth < 0
            plane[gap] = 40.0
            row["Fracture_Yes_No"] = 1
        blood = np.zeros(plane.shape, bool)
        for kind, params in lesions:
            if s not in params["slices"]:
                continue
            j = s - params["slices"].start
            growth = max(0.35, math.sin(math.pi * (j + 0.5) / len(params["slices"])) ** 0.5)
            region = _lesion_region(kind, head, geom, params, growth) & ~blood
            if region.sum() < MIN_LESION_PIXELS:
                continue
            if kind == "intraparenchymal":  # Oedema: a hypodense rim outside the mask.
                grown = cv2.dilate(region.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2)
                rim = grown.astype(bool) & ~region & ~blood & (geom.brain_depth >= 0)
                plane[rim] = 17.0
            plane[region] = np.clip(params["hu"] + 3.0 * field[region], 55.0, 90.0)
            blood |= region
            row[SUBTYPES[kind]] = 1
        row["No_Hemorrhage"] = int(not blood.any())
        labels.append(row)
        mask[:, :, s] = blood
        plane = cv2.GaussianBlur(plane, (0, 0), BLUR_SIGMA_PX)
        hu[:, :, s] = plane + noise_hu * rng.standard_normal(plane.shape, np.float32)
    spacing = REAL_PIXEL_SPACING_MM * REAL_SIZE / image_size * rng.uniform(0.9, 1.1)
    return hu, mask, labels, float(spacing)


def synthesize(
    out_dir: str | os.PathLike,
    num: int,
    seed: int,
    *,
    image_size: int = 128,
    slices_per_patient: tuple[int, int] = (16, 32),
    dicom: bool = False,
) -> None:
    """Writes `num` synthetic patients in the PhysioNet CT-ICH layout (module docstring).

    Args:
      out_dir: directory to write into (created if missing).
      num: number of patients.
      seed: random seed; the output is a function of (num, seed, options).
      image_size: H = W of every slice in pixels.
      slices_per_patient: (low, high) inclusive range of the number of slices per patient.
      dicom: also write each volume as a DICOM series under dicom/<NNN>/.
    """
    if num < 1:
        raise ValueError(f"num must be at least 1 patient, got {num}.")
    low, high = slices_per_patient
    if not 4 <= low <= high:
        raise ValueError(
            f"slices_per_patient must be (low, high) with 4 <= low <= high, got "
            f"{slices_per_patient!r}."
        )
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}.")
    rng = np.random.default_rng(seed)
    positives = min(num - 1, max(1, round(num * HEMORRHAGE_FRACTION))) if num >= 2 else 0
    bleeding = np.zeros(num, bool)
    bleeding[rng.permutation(num)[:positives]] = True
    for folder in (CT_SCANS_DIR, MASKS_DIR):
        os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
    rows = []
    for index in range(num):
        number = FIRST_PATIENT + index
        patient_id = f"{number:03d}"
        patient_rng = np.random.default_rng([seed, index])
        num_slices = int(patient_rng.integers(low, high + 1))
        hu, mask, labels, spacing = draw_patient(
            patient_rng, image_size, num_slices, bool(bleeding[index])
        )
        hu = np.clip(np.rint(hu), -1024, 3071)
        write_nifti_volume(
            os.path.join(out_dir, CT_SCANS_DIR, f"{patient_id}.nii"),
            hu,
            pixel_spacing_mm=(spacing, spacing),
            slice_spacing_mm=SLICE_SPACING_MM,
            dtype=np.int16,
        )
        write_nifti_volume(
            os.path.join(out_dir, MASKS_DIR, f"{patient_id}.nii"),
            mask,
            pixel_spacing_mm=(spacing, spacing),
            slice_spacing_mm=SLICE_SPACING_MM,
            dtype=np.uint8,
        )
        if dicom:
            from pydicom.uid import generate_uid  # Only DICOM output needs pydicom.

            write_dicom_series(
                os.path.join(out_dir, "dicom", patient_id),
                hu,
                (spacing, spacing),
                SLICE_SPACING_MM,
                patient_id=patient_id,
                series_uid=generate_uid(entropy_srcs=["ct_ich synthetic", str(seed), patient_id]),
            )
        for s, label in enumerate(labels):
            rows.append({"PatientNumber": number, "SliceNumber": s + 1, **label})
    with open(os.path.join(out_dir, RAW_CSV), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
