"""Synthetic first-trimester ultrasound images in the CRL dataset's raw layout.

`synthesize(out_dir, num, seed)` writes::

    out_dir/images/<id>.png         grayscale ultrasound, H in [120, 160], W in [150, 200]
    out_dir/masks/<id>.png          fetus (head + body) mask, 0/255
    out_dir/annotations/<id>.json   LabelMe points "crown" and "rump", (x, y) in pixels
    out_dir/metadata.csv            id,patient_id,pixel_spacing_mm,ga_days,quality

Pixel (row i, column j) has its centre at (x, y) = (j, i); the mask holds the pixels whose
centre lies inside the fetus.

Each image is a B-mode scan: a fan-shaped field of view on black, speckle made by blurring
complex white noise with an anisotropic point-spread function and taking its magnitude
(Rayleigh-distributed, multiplicative on the echogenicity), depth attenuation and log
compression. The scene is a dark anechoic gestational sac with a bright rim in textured
uterine tissue, sometimes a yolk sac, and the fetus: an elliptical head and a larger
elliptical body, overlapping, at any angle, facing either way, moderately brighter than the
fluid, with a brighter skin line, a spine echo and a darker brain vesicle.

Ground truth is exact by construction. The crown is the point of the head ellipse furthest
along the fetus long axis and the rump the point of the body ellipse furthest the other way,
both computed in closed form on the ellipse boundaries (so within a pixel of the mask edge).
CRL_px is their distance. Per patient a CRL is drawn uniformly in [15, 80] mm; each image
jitters it by at most 1 % (repeat measurements), and `pixel_spacing_mm = CRL_mm / CRL_px`, so
`CRL_px * pixel_spacing_mm` is the image's CRL. `ga_days` is a patient property: Robinson &
Fleming, GA = 8.052 * sqrt(1.037 * CRL_mm) + 23.73, of the patient's CRL plus uniform noise in
[-1.5, 1.5] days, so every image's GA is within 2 days of Robinson of its own CRL.

Patients have 1 to 3 images (about num / 2 patients, at least 3 when num >= 3); ids are
`P0001` and `P0001_01`. About 20 % of images are `quality=bad` and really degraded by one or
two of: fetus partly outside the field of view, a heavy acoustic shadow across the fetus,
strong blur, low contrast with extra noise; their masks and points stay exact (the mask covers
the whole fetus even where it is not visible).

Output is deterministic for a seed (byte-identical files for one OpenCV version).
"""

import csv
import dataclasses
import json
import math
import os

import cv2
import numpy as np
from medjax_datasets.common import new_output_dir

CRL_MM_RANGE = (15.0, 80.0)
HEIGHT_RANGE = (120, 160)
WIDTH_RANGE = (150, 200)
CRL_WIDTH_FRACTION = (0.35, 0.65)
GA_NOISE_DAYS = 1.5
CRL_JITTER = 0.01
BAD_FRACTION = 0.2
MAX_IMAGES_PER_PATIENT = 3
DEGRADATIONS = ("outside_sector", "shadow", "blur", "low_contrast")
METADATA_COLUMNS = ("id", "patient_id", "pixel_spacing_mm", "ga_days", "quality")
LABELME_VERSION = "5.4.1"


def robinson_ga_days(crl_mm: float) -> float:
    """Gestational age in days from CRL in mm (Robinson & Fleming 1975)."""
    return 8.052 * math.sqrt(1.037 * crl_mm) + 23.73


@dataclasses.dataclass(frozen=True)
class Ellipse:
    """An ellipse with centre (cx, cy), semi-axes a, b and rotation `angle` (radians)."""

    cx: float
    cy: float
    a: float
    b: float
    angle: float

    def q(self, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
        """Squared normalised radius: < 1 inside, 1 on the boundary."""
        u, v = self.local(xx, yy)
        return (u / self.a) ** 2 + (v / self.b) ** 2

    def local(self, xx: np.ndarray, yy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates along the a and b axes, relative to the centre."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dy = xx - self.cx, yy - self.cy
        return c * dx + s * dy, -s * dx + c * dy

    def support_point(self, direction: np.ndarray) -> np.ndarray:
        """The boundary point furthest along `direction` (exact)."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        rot = np.array([[c, -s], [s, c]])
        w = np.array([self.a, self.b]) * (rot.T @ direction)
        offset = rot @ (np.array([self.a, self.b]) * w / np.linalg.norm(w))
        return np.array([self.cx, self.cy]) + offset

    def boundary(self, n: int = 48) -> np.ndarray:
        """(n, 2) points on the boundary."""
        t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
        c, s = math.cos(self.angle), math.sin(self.angle)
        u, v = self.a * np.cos(t), self.b * np.sin(t)
        return np.stack([self.cx + c * u - s * v, self.cy + s * u + c * v], axis=1)


@dataclasses.dataclass(frozen=True)
class Sector:
    """Fan-shaped field of view: apex, radii and half-angle measured from straight down."""

    apex_x: float
    apex_y: float
    r_in: float
    r_out: float
    half_angle: float

    def polar(self, xx: np.ndarray, yy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dx, dy = xx - self.apex_x, yy - self.apex_y
        return np.hypot(dx, dy), np.arctan2(dx, dy)

    def contains(self, xx: np.ndarray, yy: np.ndarray, margin: float = 0.0) -> np.ndarray:
        r, theta = self.polar(xx, yy)
        return (
            (r >= self.r_in + margin)
            & (r <= self.r_out - margin)
            & (np.abs(theta) * r <= self.half_angle * r - margin)
        )


@dataclasses.dataclass(frozen=True)
class Fetus:
    head: Ellipse
    body: Ellipse
    crown: np.ndarray
    rump: np.ndarray

    def boundary(self) -> np.ndarray:
        return np.concatenate([self.head.boundary(), self.body.boundary()])


@dataclasses.dataclass(frozen=True)
class FetusShape:
    """Fetus proportions relative to its length, independent of position and size."""

    head_a: float
    head_b: float
    head_v: float
    head_tilt: float
    body_a: float
    body_b: float
    body_tilt: float

    @classmethod
    def sample(cls, rng: np.random.Generator, crl_mm: float) -> "FetusShape":
        # The head is relatively larger in younger embryos.
        head = np.interp(crl_mm, CRL_MM_RANGE, (0.27, 0.21)) * rng.uniform(0.95, 1.05)
        return cls(
            head_a=head * rng.uniform(1.0, 1.1),
            head_b=head * rng.uniform(0.88, 1.0),
            head_v=rng.uniform(-0.06, 0.06),
            head_tilt=rng.uniform(-0.2, 0.2),
            body_a=rng.uniform(0.33, 0.37),
            body_b=rng.uniform(0.16, 0.21),
            body_tilt=rng.uniform(-0.15, 0.15),
        )

    def place(self, length: float, x: float, y: float, theta: float, flip: bool) -> Fetus:
        """The fetus of nominal length `length` centred at (x, y), crown towards `theta`."""
        axis = np.array([math.cos(theta), math.sin(theta)])
        normal = np.array([-axis[1], axis[0]]) * (-1.0 if flip else 1.0)

        def at(u: float, v: float) -> tuple[float, float]:
            p = np.array([x, y]) + length * (u * axis + v * normal)
            return float(p[0]), float(p[1])

        head = Ellipse(
            *at(0.5 - self.head_a, self.head_v),
            self.head_a * length,
            self.head_b * length,
            theta + self.head_tilt,
        )
        body = Ellipse(
            *at(-0.5 + self.body_a, 0.0),
            self.body_a * length,
            self.body_b * length,
            theta + self.body_tilt,
        )
        return Fetus(head, body, head.support_point(axis), body.support_point(-axis))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Zero-mean, unit-std noise varying over about `cell` pixels."""
    h, w = shape
    coarse = rng.standard_normal((int(h / cell) + 3, int(w / cell) + 3)).astype(np.float32)
    fine = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    return (fine - fine.mean()) / (fine.std() + 1e-6)


def _speckle(rng, amplitude: np.ndarray, sigma_x: float, sigma_y: float) -> np.ndarray:
    """Envelope of complex white scatterers weighted by `amplitude`, blurred by the PSF.

    Normalised so a uniform amplitude of 1 gives a mean envelope of 1.
    """
    kx = cv2.getGaussianKernel(int(6 * sigma_x) | 1, sigma_x)
    ky = cv2.getGaussianKernel(int(6 * sigma_y) | 1, sigma_y)
    rayleigh_sigma = float(np.sqrt(np.sum((ky @ kx.T) ** 2)))
    scatterers = [amplitude * rng.standard_normal(amplitude.shape, np.float32) for _ in range(2)]
    parts = [cv2.sepFilter2D(s, -1, kx, ky) for s in scatterers]
    return np.hypot(*parts) / (rayleigh_sigma * math.sqrt(math.pi / 2))


def _place_fetus(
    rng, shape: FetusShape, sector: Sector, width: int, height: int, outside: bool
) -> Fetus | None:
    """Finds a pose with the fetus inside the image and inside the sector.

    With `outside`, 15-40 % of its outline must instead fall outside the sector. Shrinks the
    fetus when no pose fits; returns None only if even a small one does not.
    """
    length = rng.uniform(*CRL_WIDTH_FRACTION) * width
    theta = rng.uniform(0.0, 2.0 * math.pi)
    flip = bool(rng.integers(2))
    while length > 0.25 * min(width, height):
        offsets = shape.place(length, 0.0, 0.0, theta, flip).boundary()
        lo = np.array([2.0, 2.0]) - offsets.min(axis=0)
        hi = np.array([width - 3.0, height - 3.0]) - offsets.max(axis=0)
        if np.all(hi > lo):
            for _ in range(40):
                x, y = rng.uniform(lo, hi)
                points = offsets + (x, y)
                out = 1.0 - sector.contains(points[:, 0], points[:, 1], margin=2.0).mean()
                if (0.15 <= out <= 0.4) if outside else out == 0.0:
                    return shape.place(length, x, y, theta, flip)
        length *= 0.92
    return None


def _gestational_sac(rng, fetus: Fetus, length: float) -> Ellipse:
    """A sac roughly aligned with the fetus, enlarged until the fetus is well inside."""
    axis = fetus.crown - fetus.rump
    centre = (fetus.crown + fetus.rump) / 2 + rng.uniform(-0.08, 0.08, 2) * length
    sac = Ellipse(
        float(centre[0]),
        float(centre[1]),
        length * rng.uniform(0.62, 0.8),
        length * rng.uniform(0.4, 0.55),
        math.atan2(axis[1], axis[0]) + rng.uniform(-0.3, 0.3),
    )
    points = fetus.boundary()
    scale = math.sqrt(max(1.0, float(sac.q(points[:, 0], points[:, 1]).max()) / 0.7))
    return dataclasses.replace(sac, a=sac.a * scale, b=sac.b * scale)


def _yolk_sac(rng, sac: Ellipse, fetus: Fetus, length: float) -> tuple[float, float, float] | None:
    """Centre and radius of a small yolk sac in the fluid, clear of the fetus, or None."""
    radius = max(2.5, length * rng.uniform(0.04, 0.07))
    outline = fetus.boundary()
    for _ in range(20):
        x, y = rng.uniform(-1.0, 1.0, 2) * (sac.a, sac.b)
        c, s = math.cos(sac.angle), math.sin(sac.angle)
        cx, cy = sac.cx + c * x - s * y, sac.cy + s * x + c * y
        inside_fetus = fetus.head.q(cx, cy) < 1 or fetus.body.q(cx, cy) < 1
        clear = np.hypot(outline[:, 0] - cx, outline[:, 1] - cy).min() > radius + 3
        if sac.q(cx, cy) < 0.6 and not inside_fetus and clear:
            return cx, cy, radius
    return None


def render_image(rng: np.random.Generator, crl_mm: float, bad: bool):
    """One synthetic scan.

    Returns:
      (image (H, W) uint8, mask (H, W) uint8 0/255, crown (2,), rump (2,), degradations).
    """
    height = int(rng.integers(HEIGHT_RANGE[0], HEIGHT_RANGE[1] + 1))
    width = int(rng.integers(WIDTH_RANGE[0], WIDTH_RANGE[1] + 1))
    apex_y = -rng.uniform(0.15, 0.35) * height
    sector = Sector(
        apex_x=width / 2 + rng.uniform(-2.0, 2.0),
        apex_y=apex_y,
        r_in=-apex_y + rng.uniform(2.0, 6.0),
        r_out=(height - 1 - apex_y) * rng.uniform(0.97, 1.0),
        half_angle=math.radians(rng.uniform(40.0, 50.0)),
    )
    degradations = (
        tuple(rng.choice(DEGRADATIONS, size=int(rng.integers(1, 3)), replace=False)) if bad else ()
    )
    shape = FetusShape.sample(rng, crl_mm)
    fetus = _place_fetus(rng, shape, sector, width, height, "outside_sector" in degradations)
    if fetus is None:  # No pose with the fetus partly outside: fall back to a blurred scan.
        degradations = ("blur",)
        fetus = _place_fetus(rng, shape, sector, width, height, outside=False)
    length = float(np.linalg.norm(fetus.crown - fetus.rump))

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    radius, theta = sector.polar(xx, yy)
    in_sector = sector.contains(xx, yy)

    # Echogenicity (scatterer amplitude) of each tissue.
    echo = rng.uniform(0.35, 0.5) * (1 + 0.3 * _smooth_noise(rng, (height, width), 10.0))
    echo = np.clip(echo, 0.05, None)
    sac = _gestational_sac(rng, fetus, length)
    sac_radius = np.sqrt(sac.q(xx, yy))
    rim_px = (sac_radius - 1.0) * (sac.a + sac.b) / 2
    rim_width = rng.uniform(2.0, 4.0)
    echo = echo + rng.uniform(0.5, 0.8) * np.exp(-0.5 * ((rim_px - rim_width) / rim_width) ** 2)
    fluid = rng.uniform(0.03, 0.07)
    echo = np.where(sac_radius < 1.0, fluid, echo)
    yolk = _yolk_sac(rng, sac, fetus, length) if rng.uniform() < 0.7 else None
    if yolk is not None:
        cx, cy, r = yolk
        ring = 0.9 * np.exp(-0.5 * ((np.hypot(xx - cx, yy - cy) - r) / 0.8) ** 2)
        echo = np.where(sac_radius < 1.0, np.maximum(echo, ring), echo)

    head_in = fetus.head.q(xx, yy) < 1.0
    body_in = fetus.body.q(xx, yy) < 1.0
    mask = head_in | body_in
    low_contrast = "low_contrast" in degradations
    level = rng.uniform(0.1, 0.14) if low_contrast else rng.uniform(0.25, 0.45)
    fetal = level * (1 + 0.3 * _smooth_noise(rng, (height, width), 3.0))
    core = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2).astype(bool)
    skin = mask & ~core
    fetal = np.where(skin, fetal * 1.4, fetal)
    body_u, body_v = fetus.body.local(xx, yy)
    back = -1.0 if rng.integers(2) else 1.0
    spine = (np.abs(body_v - back * 0.55 * fetus.body.b) < 1.2) & (
        np.abs(body_u) < 0.8 * fetus.body.a
    )
    fetal = np.where(spine & body_in, fetal * 1.6, fetal)
    vesicle = dataclasses.replace(fetus.head, a=0.35 * fetus.head.a, b=0.25 * fetus.head.b)
    fetal = np.where(vesicle.q(xx, yy) < 1.0, fetal * 0.55, fetal)
    echo = np.where(mask, fetal, echo)

    depth = (radius - sector.r_in) / (sector.r_out - sector.r_in)
    echo = echo * np.exp(-rng.uniform(0.1, 0.5) * depth)
    if "shadow" in degradations:
        # A strong reflector above the fetus and a dark wedge behind it along the beam.
        outline = fetus.boundary()
        _, outline_theta = sector.polar(outline[:, 0], outline[:, 1])
        span = outline_theta.max() - outline_theta.min()
        centre = rng.uniform(outline_theta.min() + 0.3 * span, outline_theta.max() - 0.3 * span)
        wedge = np.exp(-0.5 * ((theta - centre) / (rng.uniform(0.12, 0.2) * span)) ** 6)
        middle = (fetus.crown + fetus.rump) / 2
        start = math.hypot(middle[0] - sector.apex_x, middle[1] - sector.apex_y)
        start -= rng.uniform(0.3, 0.6) * length
        behind = 0.5 * (1.0 + np.tanh(0.5 * (radius - start)))
        echo = echo * (1.0 - (1.0 - rng.uniform(0.05, 0.15)) * wedge * behind)
        echo = echo + 1.2 * wedge * np.exp(-0.5 * ((radius - start) / 1.5) ** 2)

    envelope = _speckle(rng, echo.astype(np.float32), rng.uniform(0.9, 1.4), rng.uniform(0.5, 0.8))
    if "blur" in degradations:
        envelope = cv2.GaussianBlur(envelope, (0, 0), rng.uniform(2.2, 3.5))
    gain = rng.uniform(0.8, 1.2)
    compressed = np.log1p(8.0 * gain * envelope) / math.log1p(8.0 * 2.2)
    image = 255.0 * np.clip(compressed, 0.0, 1.0)
    if low_contrast:
        image = image.mean() + rng.uniform(0.35, 0.5) * (image - image.mean())
        image = image + rng.normal(0.0, 10.0, image.shape)
    image = np.where(in_sector, np.clip(image, 0, 255), 0).astype(np.uint8)
    return image, mask.astype(np.uint8) * 255, fetus.crown, fetus.rump, degradations


def _images_per_patient(rng: np.random.Generator, num: int) -> list[int]:
    """Split `num` images over about num / 2 patients (>= 3 when num >= 3), 1-3 each."""
    patients = max(min(3, num), round(num / 2))
    counts = [1] * patients
    for _ in range(num - patients):
        open_ = [i for i, c in enumerate(counts) if c < MAX_IMAGES_PER_PATIENT]
        counts[open_[int(rng.integers(len(open_)))]] += 1
    return counts


def _labelme(image_id: str, crown, rump, height: int, width: int) -> dict:
    def point(label, xy):
        return {
            "label": label,
            "points": [[float(xy[0]), float(xy[1])]],
            "group_id": None,
            "description": "",
            "shape_type": "point",
            "flags": {},
        }

    return {
        "version": LABELME_VERSION,
        "flags": {},
        "shapes": [point("crown", crown), point("rump", rump)],
        "imagePath": f"../images/{image_id}.png",
        "imageData": None,
        "imageHeight": height,
        "imageWidth": width,
    }


def _write_png(path: str, image: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode {path}")
    with open(path, "wb") as f:
        f.write(data.tobytes())


def synthesize(
    out_dir: str | os.PathLike, num: int, seed: int, *, bad_fraction: float = BAD_FRACTION
) -> None:
    """Writes `num` synthetic images in the raw CRL layout into `out_dir` (see module doc).

    `out_dir` must not exist or be empty. metadata.csv is written last.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    out_dir = new_output_dir(out_dir, ("images", "masks", "annotations"))

    rng = np.random.default_rng(seed)
    counts = _images_per_patient(rng, num)
    image_rngs = iter(rng.spawn(num))
    rows = []
    for p, count in enumerate(counts, start=1):
        patient_id = f"P{p:04d}"
        patient_crl = rng.uniform(*CRL_MM_RANGE)
        ga_noise = rng.uniform(-GA_NOISE_DAYS, GA_NOISE_DAYS)
        ga_days = round(robinson_ga_days(patient_crl) + ga_noise, 1)
        for j in range(1, count + 1):
            image_id = f"{patient_id}_{j:02d}"
            image_rng = next(image_rngs)
            jitter = 1 + image_rng.uniform(-CRL_JITTER, CRL_JITTER)
            crl_mm = round(float(np.clip(patient_crl * jitter, *CRL_MM_RANGE)), 1)
            bad = image_rng.uniform() < bad_fraction
            image, mask, crown, rump, _ = render_image(image_rng, crl_mm, bad)
            crown, rump = np.round(crown, 3), np.round(rump, 3)
            spacing = crl_mm / float(np.hypot(*(crown - rump)))
            _write_png(os.path.join(out_dir, "images", f"{image_id}.png"), image)
            _write_png(os.path.join(out_dir, "masks", f"{image_id}.png"), mask)
            annotation = _labelme(image_id, crown, rump, *image.shape)
            with open(os.path.join(out_dir, "annotations", f"{image_id}.json"), "w") as f:
                json.dump(annotation, f, indent=2)
            quality = "bad" if bad else "good"
            rows.append((image_id, patient_id, repr(spacing), repr(ga_days), quality))

    with open(os.path.join(out_dir, "metadata.csv"), "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(METADATA_COLUMNS)
        writer.writerows(rows)
