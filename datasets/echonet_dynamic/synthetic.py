"""Synthetic apical four-chamber echocardiograms in the EchoNet-Dynamic raw layout.

`synthesize(out_dir, num, seed)` writes::

    out_dir/Videos/<FileName>.avi   112x112 MJPG AVI at 50 fps, grayscale as 3 equal channels
    out_dir/FileList.csv            FileName,EF,ESV,EDV,FrameHeight,FrameWidth,FPS,
                                    NumberOfFrames,Split
    out_dir/VolumeTracings.csv      FileName,X1,Y1,X2,Y2,Frame (FileName with .avi)

Pixel (row i, column j) has its centre at (x, y) = (j, i).

Each video is a B-mode apical view: a fan-shaped sector on black, multiplicative speckle (the
envelope of complex white scatterers weighted by the echogenicity and blurred by a point-spread
function, so Rayleigh distributed), depth attenuation and log compression. The scene is
textured tissue, a bright left-ventricular (LV) myocardium, a dark LV cavity with its apex at the
top of the sector, a dark right ventricle to its left and dark atria below.

The LV cavity is a "bullet": in coordinates u along the long axis from the apex (u = 0) to the
mitral plane (u = L) and v across it, the cavity is |v| <= W / 2 * (1 - (1 - u / L)^2)^q (q
near 1/2: a half-ellipse). The apex and axis stay put; L and W follow a raised-cosine curve of
period P = 2h frames (h in [14, 30], i.e. 50-107 bpm at 50 fps): end-diastole (ED, largest) at
frames f0 + kP and end-systole (ES, smallest) at f0 + h + kP, with a random phase f0 in [0, P).
Videos have max(96..128, 2P) frames, so at least two full beats. The ES shape scales the ED
length by (1 - EF*)^0.2 and the ED width by (1 - EF*)^0.4 for a per-video target EF* (35 % of
videos in [15, 50), the rest in [50, 80], stratified so that every dataset of three or more
videos has both).

Ground truth follows from the drawn ventricle. VolumeTracings.csv traces the ED frame f0 and the
ES frame f0 + h: a long-axis row from the apex (X1, Y1) to the mitral-plane midpoint (X2, Y2),
then 20 disc rows perpendicular to it at u = (i + 1/2) L / 20, whose left (X1, Y1) and right
(X2, Y2) endpoints lie on the drawn cavity boundary. Coordinates are rounded to 4 decimals and
the volumes computed from the rounded values by the method of discs (Simpson's rule),
V = sum_i pi (d_i / 2)^2 L / 20 with d_i the disc lengths and L the long-axis length, in pixels
scaled by `MM_PER_PIXEL` mm per pixel and given in mL; EF = 100 (EDV - ESV) / EDV. FileList.csv
holds these numbers at full precision, so recomputing them from VolumeTracings.csv gives back
the same values. Most videos list the ES frame first and the ED frame second, as the real
dataset does; about 10 % (at least one video when num >= 2) list ED first.

Splits are about 75/12.5/12.5 % TRAIN/VAL/TEST, each split getting at least one video when
num >= 3. Output is deterministic for a seed (byte-identical files for one OpenCV version).
"""

import csv
import dataclasses
import math
import os

import cv2
import numpy as np
from medjax_datasets.common import new_output_dir, random_hex_ids
from medjax_datasets.echonet_dynamic.echonet_dynamic import (
    FILE_LIST_COLUMNS,
    TRACING_COLUMNS,
)

from medjax.preprocess.video import write_video_gray

FRAME_SIZE = 112
FPS = 50
NUM_DISCS = 20
MM_PER_PIXEL = 1.5
HALF_PERIOD_RANGE = (14, 30)  # Frames from ED to ES.
FRAMES_RANGE = (96, 128)
EF_RANGE = (15.0, 80.0)
REDUCED_EF_SHARE = 0.35  # Share of videos with a target EF below 50.
ED_FIRST_SHARE = 0.1  # Share of videos whose tracings list ED before ES.
SPLIT_SHARES = {"VAL": 0.125, "TEST": 0.125}  # The rest is TRAIN.
COORDINATE_DECIMALS = 4

# Echogenicity (mean scatterer amplitude) of the structures.
TISSUE_ECHO = 0.3
MYOCARDIUM_ECHO = 0.8
RV_WALL_ECHO = 0.6
BLOOD_ECHO = 0.035


@dataclasses.dataclass(frozen=True)
class Ventricle:
    """A bullet-shaped cavity: apex (x, y), unit long axis apex->base, length, width, profile q."""

    apex: np.ndarray
    axis: np.ndarray
    length: float
    width: float
    exponent: float

    @property
    def right(self) -> np.ndarray:
        """Unit vector across the long axis, pointing to the image right for a downward axis."""
        return np.array([self.axis[1], -self.axis[0]])

    def half_width(self, t: np.ndarray | float) -> np.ndarray:
        """Half the cavity width at fraction t (0 apex, 1 base) of the long axis."""
        t = np.clip(t, 0.0, 1.0)
        return 0.5 * self.width * (1.0 - (1.0 - t) ** 2) ** self.exponent

    def tracing(self) -> np.ndarray:
        """(1 + NUM_DISCS, 4) rows X1, Y1, X2, Y2: the long axis, then the discs apex to base.

        Rounded to COORDINATE_DECIMALS, as written to VolumeTracings.csv.
        """
        base = self.apex + self.length * self.axis
        rows = [np.concatenate([self.apex, base])]
        for i in range(NUM_DISCS):
            t = (i + 0.5) / NUM_DISCS
            centre = self.apex + t * self.length * self.axis
            offset = self.half_width(t) * self.right
            rows.append(np.concatenate([centre - offset, centre + offset]))
        return np.round(np.array(rows), COORDINATE_DECIMALS)


def disc_volume_ml(tracing: np.ndarray) -> float:
    """Method-of-discs volume in mL of one traced frame ((1 + discs, 4) rows X1, Y1, X2, Y2)."""
    tracing = np.asarray(tracing, dtype=np.float64)
    length = math.hypot(*(tracing[0, 2:] - tracing[0, :2]))
    diameters = np.hypot(*(tracing[1:, 2:] - tracing[1:, :2]).T)
    discs = len(diameters)
    volume_px = float(np.sum(math.pi * (diameters / 2.0) ** 2 * length / discs))
    return volume_px * MM_PER_PIXEL**3 / 1000.0


def _smooth_noise(rng: np.random.Generator, cell: float) -> np.ndarray:
    """Zero-mean, unit-std (FRAME_SIZE, FRAME_SIZE) noise varying over about `cell` pixels."""
    size = FRAME_SIZE
    coarse = rng.standard_normal((int(size / cell) + 3,) * 2).astype(np.float32)
    fine = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return (fine - fine.mean()) / (fine.std() + 1e-6)


def _axis_coordinates(xx, yy, origin: np.ndarray, axis: np.ndarray):
    """Pixel coordinates along a unit `axis` from `origin`, and across it (to the right)."""
    dx, dy = xx - origin[0], yy - origin[1]
    return dx * axis[0] + dy * axis[1], dx * axis[1] - dy * axis[0]


def _bullet(u: np.ndarray, v: np.ndarray, length, width, exponent: float) -> np.ndarray:
    """Inside test of a bullet given axis coordinates; length, width broadcast over frames."""
    t = u / length
    profile = (1.0 - (1.0 - np.clip(t, 0.0, 1.0)) ** 2) ** exponent
    return (t >= 0.0) & (t <= 1.0) & (np.abs(v) <= 0.5 * width * profile)


def _ellipse(xx, yy, centre: np.ndarray, axis: np.ndarray, a, b) -> np.ndarray:
    """Inside test of an ellipse with semi-axis a along `axis`, b across; a, b may be per frame."""
    along, across = _axis_coordinates(xx, yy, centre, axis)
    return (along / a) ** 2 + (across / b) ** 2 <= 1.0


@dataclasses.dataclass(frozen=True)
class Echo:
    """One synthetic video and its ground truth."""

    frames: np.ndarray  # (T, H, W) uint8
    ed_frame: int
    es_frame: int
    ed_tracing: np.ndarray  # (21, 4)
    es_tracing: np.ndarray


def _sample_anatomy(rng: np.random.Generator) -> tuple[Ventricle, float]:
    """The ED left ventricle and its wall thickness, placed well inside the image and sector."""
    while True:
        tilt = math.radians(rng.uniform(3.0, 14.0))
        length = rng.uniform(54.0, 66.0)
        ventricle = Ventricle(
            apex=np.array([FRAME_SIZE / 2 + rng.uniform(0.0, 8.0), rng.uniform(14.0, 20.0)]),
            axis=np.array([math.sin(tilt), math.cos(tilt)]),
            length=length,
            width=length * rng.uniform(0.48, 0.6),
            exponent=rng.uniform(0.42, 0.6),
        )
        wall = rng.uniform(4.0, 6.5)
        outer = ventricle.tracing()[1:] + np.concatenate([-ventricle.right, ventricle.right]) * wall
        points = outer.reshape(-1, 2)
        if points.min() >= 3.0 and points.max() <= FRAME_SIZE - 4.0:
            return ventricle, wall


def render_echo(rng: np.random.Generator, target_ef: float) -> Echo:
    """Draws one beating-heart video with EF near `target_ef` (percent); see module doc."""
    size = FRAME_SIZE
    half_period = int(rng.integers(HALF_PERIOD_RANGE[0], HALF_PERIOD_RANGE[1] + 1))
    period = 2 * half_period
    num_frames = max(int(rng.integers(FRAMES_RANGE[0], FRAMES_RANGE[1] + 1)), 2 * period)
    ed_frame = int(rng.integers(0, period))
    es_frame = ed_frame + half_period

    ventricle, wall = _sample_anatomy(rng)
    remaining = 1.0 - target_ef / 100.0
    length_scale, width_scale = remaining**0.2, remaining**0.4

    # Contraction: 0 at ED, 1 at ES, a raised cosine per beat.
    f = np.arange(num_frames, dtype=np.float64)
    contraction = 0.5 * (1.0 - np.cos(2.0 * math.pi * (f - ed_frame) / period))
    lengths = ventricle.length * (1.0 - contraction * (1.0 - length_scale))
    widths = ventricle.width * (1.0 - contraction * (1.0 - width_scale))
    walls = wall * (1.0 + 0.35 * contraction)

    def per_frame(values: np.ndarray) -> np.ndarray:
        return values.astype(np.float32)[:, None, None]

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    u, v = _axis_coordinates(xx, yy, ventricle.apex, ventricle.axis)
    q = ventricle.exponent
    cavity = _bullet(u, v, per_frame(lengths), per_frame(widths), q)
    myocardium = _bullet(
        u + per_frame(walls),
        v,
        per_frame(lengths + walls),
        per_frame(widths + 2.0 * walls),
        q,
    ) & (u <= per_frame(lengths))

    # Right ventricle to the left of the septum, its axis swung outwards; atria below.
    swing = math.radians(rng.uniform(5.0, 15.0))
    rotation = np.array([[math.cos(swing), -math.sin(swing)], [math.sin(swing), math.cos(swing)]])
    rv_axis = rotation @ ventricle.axis
    rv_width = 0.75 * ventricle.width
    rv_length = 0.8 * ventricle.length * rng.uniform(0.9, 1.1)
    rv_apex = (
        ventricle.apex
        + 0.15 * ventricle.length * ventricle.axis
        - (0.5 * ventricle.width + wall + 0.45 * rv_width) * ventricle.right
    )
    rv_u, rv_v = _axis_coordinates(xx, yy, rv_apex, rv_axis)
    rv_lengths = per_frame(rv_length * (1.0 - 0.1 * contraction))
    rv_widths = per_frame(rv_width * (1.0 - 0.25 * contraction))
    rv_cavity = _bullet(rv_u, rv_v, rv_lengths, rv_widths, 0.5)
    rv_wall = _bullet(rv_u + 3.0, rv_v, rv_lengths + 3.0, rv_widths + 6.0, 0.5) & (
        rv_u <= rv_lengths
    )
    filling = per_frame(1.0 + 0.12 * contraction)  # Atria fill while the ventricles empty.
    la_a = rng.uniform(0.22, 0.3) * ventricle.length
    la_centre = ventricle.apex + (ventricle.length + wall + la_a + 2.0) * ventricle.axis
    la = _ellipse(xx, yy, la_centre, ventricle.axis, la_a * filling, 0.42 * ventricle.width)
    ra_centre = rv_apex + (rv_length + 4.0 + 0.8 * la_a) * rv_axis
    ra = _ellipse(xx, yy, ra_centre, rv_axis, 0.8 * la_a * filling, 0.4 * ventricle.width)

    tissue = TISSUE_ECHO * (1.0 + 0.3 * _smooth_noise(rng, 8.0))
    muscle = MYOCARDIUM_ECHO * (1.0 + 0.15 * _smooth_noise(rng, 4.0))
    echo = np.broadcast_to(np.clip(tissue, 0.05, None), cavity.shape).copy()
    echo[rv_wall] = RV_WALL_ECHO
    echo[rv_cavity | la | ra] = BLOOD_ECHO
    echo = np.where(myocardium, muscle, echo)
    echo[cavity] = BLOOD_ECHO

    # Sector geometry, attenuation and speckle that decorrelates a little with each beat.
    apex_x, apex_y = size / 2 + rng.uniform(-1.0, 1.0), -rng.uniform(2.0, 6.0)
    radius = np.hypot(xx - apex_x, yy - apex_y)
    angle = np.arctan2(xx - apex_x, yy - apex_y)
    r_in, r_out = -apex_y + rng.uniform(1.0, 3.0), (size - apex_y) * rng.uniform(0.97, 1.03)
    in_sector = (
        (radius >= r_in)
        & (radius <= r_out)
        & (np.abs(angle) <= math.radians(rng.uniform(40.0, 45.0)))
    )
    echo *= np.exp(-rng.uniform(0.3, 0.8) * radius / size)

    sigma_x, sigma_y = rng.uniform(0.8, 1.1), rng.uniform(0.45, 0.6)
    kx = cv2.getGaussianKernel(int(6 * sigma_x) | 1, sigma_x)
    ky = cv2.getGaussianKernel(int(6 * sigma_y) | 1, sigma_y)
    rayleigh_scale = float(np.sqrt(np.sum((ky @ kx.T) ** 2))) * math.sqrt(math.pi / 2)
    scatterers = rng.standard_normal((4, size, size)).astype(np.float32)
    drift = per_frame(0.5 * np.sin(2.0 * math.pi * (f - ed_frame) / period))
    envelope_parts = []
    for first, second in ((scatterers[0], scatterers[1]), (scatterers[2], scatterers[3])):
        field = echo * (first * np.cos(drift) + second * np.sin(drift))
        channels_last = np.ascontiguousarray(field.transpose(1, 2, 0))
        envelope_parts.append(cv2.sepFilter2D(channels_last, -1, kx, ky))
    envelope = np.hypot(*envelope_parts).transpose(2, 0, 1) / rayleigh_scale

    gain = rng.uniform(0.8, 1.2)
    compressed = np.log1p(10.0 * gain * envelope) / math.log1p(10.0 * 2.0)
    frames = np.where(in_sector, np.clip(255.0 * compressed, 0, 255), 0).astype(np.uint8)

    def shape_at(frame: int) -> Ventricle:
        return dataclasses.replace(
            ventricle, length=float(lengths[frame]), width=float(widths[frame])
        )

    return Echo(
        frames=frames,
        ed_frame=ed_frame,
        es_frame=es_frame,
        ed_tracing=shape_at(ed_frame).tracing(),
        es_tracing=shape_at(es_frame).tracing(),
    )


def _target_efs(rng: np.random.Generator, num: int) -> np.ndarray:
    """Stratified target EFs (percent): REDUCED_EF_SHARE below 50, the rest 50 or above."""
    quantiles = (rng.permutation(num) + rng.uniform(size=num)) / num
    low, high = EF_RANGE
    reduced = low + quantiles / REDUCED_EF_SHARE * (50.0 - low)
    preserved = 50.0 + (quantiles - REDUCED_EF_SHARE) / (1.0 - REDUCED_EF_SHARE) * (high - 50.0)
    return np.where(quantiles < REDUCED_EF_SHARE, reduced, preserved)


def _splits(rng: np.random.Generator, num: int) -> list[str]:
    """TRAIN/VAL/TEST per video, about 75/12.5/12.5 %, each non-empty when num >= 3."""
    splits = ["TRAIN"] * num
    order = iter(rng.permutation(num))
    for split, share in SPLIT_SHARES.items():
        count = max(1, math.floor(share * num + 0.5)) if num >= 3 else 0
        for _ in range(count):
            splits[next(order)] = split
    return splits


def _format(value: float) -> str:
    """Shortest text that parses back to the same float."""
    return repr(float(value))


def synthesize(out_dir: str | os.PathLike, num: int, seed: int) -> None:
    """Writes `num` synthetic videos in the raw EchoNet-Dynamic layout into `out_dir`.

    See the module docstring for what is drawn. `out_dir` must not exist or be empty;
    FileList.csv is written last.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    out_dir = new_output_dir(out_dir, ("Videos",))

    rng = np.random.default_rng(seed)
    names = random_hex_ids(rng, num, "0X", 8)
    target_efs = _target_efs(rng, num)
    splits = _splits(rng, num)
    ed_first_count = max(1, math.floor(ED_FIRST_SHARE * num + 0.5)) if num >= 2 else 0
    ed_first = set(rng.choice(num, size=ed_first_count, replace=False).tolist())
    video_rngs = rng.spawn(num)

    file_rows, tracing_rows = [], []
    for i, (name, target_ef, split, video_rng) in enumerate(
        zip(names, target_efs, splits, video_rngs)
    ):
        echo = render_echo(video_rng, float(target_ef))
        write_video_gray(os.path.join(out_dir, "Videos", f"{name}.avi"), echo.frames, FPS)
        edv, esv = disc_volume_ml(echo.ed_tracing), disc_volume_ml(echo.es_tracing)
        ef = 100.0 * (edv - esv) / edv
        file_rows.append(
            (
                name,
                _format(ef),
                _format(esv),
                _format(edv),
                FRAME_SIZE,
                FRAME_SIZE,
                FPS,
                len(echo.frames),
                split,
            )
        )
        traced = [(echo.es_frame, echo.es_tracing), (echo.ed_frame, echo.ed_tracing)]
        if i in ed_first:
            traced.reverse()
        for frame, tracing in traced:
            for row in tracing:
                tracing_rows.append((f"{name}.avi", *(_format(x) for x in row), frame))

    with open(os.path.join(out_dir, "VolumeTracings.csv"), "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(TRACING_COLUMNS)
        writer.writerows(tracing_rows)
    with open(os.path.join(out_dir, "FileList.csv"), "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(FILE_LIST_COLUMNS)
        writer.writerows(file_rows)
