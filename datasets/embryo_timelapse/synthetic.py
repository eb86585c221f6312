"""Synthetic time-lapse embryo videos in the Gomez et al. (2022) raw layout, with outcomes.

`synthesize(out_dir, num, seed)` writes::

    out_dir/embryo_dataset/<video>/D<date>_S<slide>_I<id>_WELL<w>_RUN<k>.jpeg
                                              gray JPEG (quality 90), k = 1, 2, ... frame index
    out_dir/embryo_dataset_annotations/<video>_phases.csv          phase,first_frame,last_frame
                                                                   (no header)
    out_dir/embryo_dataset_time_elapsed/<video>_timeElapsed.csv    header frame_index,time
                                                                   (hours)
    out_dir/outcomes.csv                                           header video,patient_id,outcome

Videos are named `<patient>-<embryo>` (as the public set's `AA83-7`); a patient has 1 to 3
embryos. Pixel (row i, column j) has its centre at (x, y) = (j, i).

A frame shows a culture well (a bright disc with a dark wall, vignetting) and one embryo at a
random place in it, drifting by about a pixel over the video: the zona pellucida (a bright ring
of outer radius R, 0.16-0.23 of the frame side, dark edge lines) around the perivitelline space
and the cells, granular discs with dark membranes. The embryo passes through the 16 phases of
the real annotation: tPB2 (a polar body appears), tPNa/tPNf (two pronuclei appear, then fade),
t2..t8 and t9+ (cells divide, each a cube-root-of-two smaller than its mother), tM (a compact
morula), tSB, tB, tEB (a cavity forms and grows; the expanding blastocyst thins the zona) and
tHB (the blastocyst bulges out of the zona). Frames before tPB2 are unannotated. A burned-in
white banner holds the time (bottom left) and the well number (top left). Gaussian noise.

Outcome drives development, with overlapping distributions (`OUTCOME_MODELS`): a speed factor
scaling every phase onset of a normal timeline (`NORMAL_ONSETS_H`, liveborn about 1.0,
miscarriage about 1.1, no implantation about 1.2, each with a spread), fragmentation
(small debris between the cells, growing with the cell count), irregular cleavage (a
2-cell stage of under an hour, as in direct cleavage, and uneven cell sizes) and
developmental arrest (the embryo stops in a phase between t4 and tM, then slowly fragments).
Phase annotations follow from the simulation: a phase is listed with the first and last frame
showing it; phases that no frame shows (too short for the frame interval, or never reached)
are not listed. How learnable: a logistic
regression on the simulated onsets, fragmentation and irregularity (what a perfect frame
reader could know) classifies about 91 % of embryos right (79 % from the onsets alone), against
45 % for the majority class.

Frames span 135-150 h, evenly spaced with a little jitter (real videos: every 10-20 min;
synthetic ones are sparser, by default 100 frames). Output is deterministic for a seed.
"""

import csv
import dataclasses
import math
import os

import cv2
import numpy as np
from medjax_datasets.common import new_output_dir
from medjax_datasets.embryo_timelapse.embryo_timelapse import (
    ANNOTATIONS_DIR,
    FRAMES_DIR,
    OUTCOME_COLUMNS,
    OUTCOMES_FILE,
    PHASES,
    TIMES_DIR,
)

IMAGE_SIZE = 128
NUM_FRAMES = 100
JPEG_QUALITY = 90
SPAN_H = (135.0, 150.0)
NOISE_STD = 4.0
OUTCOME_SHARES = {"liveborn": 0.35, "no_implantation": 0.45, "miscarriage": 0.2}

# Mean onset (hours after insemination) of each phase for a normally developing embryo.
NORMAL_ONSETS_H = dict(
    zip(
        PHASES,
        (
            3.5,
            9.0,
            23.5,
            26.0,
            36.5,
            38.0,
            49.0,
            51.5,
            54.0,
            57.0,
            68.0,
            85.0,
            96.0,
            106.0,
            116.0,
            130.0,
        ),
    )
)
ONSET_JITTER_H = 1.5


@dataclasses.dataclass(frozen=True)
class OutcomeModel:
    """How one outcome class develops (see the module docstring)."""

    speed: tuple[float, float]  # Mean and standard deviation of the onset scale factor.
    fragmentation: tuple[float, float]  # Uniform range of the final debris amount.
    irregular: float  # Probability of irregular cleavage.
    arrest: float  # Probability of developmental arrest.


OUTCOME_MODELS = {
    "liveborn": OutcomeModel((1.0, 0.04), (0.0, 0.1), 0.03, 0.02),
    "miscarriage": OutcomeModel((1.1, 0.05), (0.08, 0.25), 0.4, 0.1),
    "no_implantation": OutcomeModel((1.2, 0.07), (0.15, 0.4), 0.25, 0.5),
}

# Gray levels.
WELL_GRAY, OUTSIDE_GRAY, WELL_WALL_GRAY = 165.0, 112.0, 70.0
ZONA_GRAY, ZONA_EDGE_GRAY, SPACE_GRAY = 200.0, 85.0, 152.0
CELL_GRAY, MEMBRANE_GRAY, NUCLEUS_GRAY = 122.0, 70.0, 150.0
CAVITY_GRAY, FRAGMENT_GRAY = 172.0, 95.0
SHIFT = 4  # Fractional bits of the coordinates given to cv2 drawing functions.


@dataclasses.dataclass(frozen=True)
class Development:
    """The simulated course of one embryo."""

    onsets: dict[str, float]  # Phase -> onset hour, for the phases reached.
    fragmentation: float
    irregular: bool

    def phase_at(self, hours: float) -> int:
        """Index into PHASES of the phase shown at `hours`; -1 before tPB2."""
        phase = -1
        for index, name in enumerate(PHASES):
            if name in self.onsets and self.onsets[name] <= hours:
                phase = index
        return phase


@dataclasses.dataclass(frozen=True)
class Scene:
    """Where things are drawn in one video (frame pixels)."""

    size: int
    well_centre: tuple[float, float]
    well_radius: float
    centre: tuple[float, float]  # Zona centre at the first frame.
    radius: float  # Zona outer radius.
    angle: float  # Orientation of the cell layout.
    well_number: int
    seed: int  # Seeds what must look the same in every frame (cell sizes, debris).
    background: np.ndarray  # (size, size) float32 well, wall and illumination.
    texture: np.ndarray  # (size, size) float32 granular cytoplasm texture, zero mean.


def simulate(rng: np.random.Generator, outcome: str, patient_speed: float = 1.0) -> Development:
    """Draws phase onsets, fragmentation and irregularity for one embryo of `outcome`."""
    model = OUTCOME_MODELS[outcome]
    speed = patient_speed * max(0.8, rng.normal(*model.speed))
    irregular = bool(rng.random() < model.irregular)
    onsets, previous = {}, 0.0
    for name in PHASES:
        onset = NORMAL_ONSETS_H[name] * speed + rng.normal(0.0, ONSET_JITTER_H)
        if irregular and name == "t3":  # Direct cleavage: 3 cells shortly after 2.
            onset = onsets["t2"] + rng.uniform(0.2, 1.0)
        onset = max(onset, previous + 0.3)
        onsets[name] = onset
        previous = onset
    if rng.random() < model.arrest:
        last = int(rng.integers(PHASES.index("t4"), PHASES.index("tM") + 1))
        onsets = {name: onsets[name] for name in PHASES[: last + 1]}
    return Development(onsets, float(rng.uniform(*model.fragmentation)), irregular)


def _smooth_noise(rng: np.random.Generator, size: int, cell: float) -> np.ndarray:
    coarse = rng.standard_normal((int(size / cell) + 3,) * 2).astype(np.float32)
    fine = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return (fine - fine.mean()) / (fine.std() + 1e-6)


def make_scene(
    rng: np.random.Generator,
    size: int = IMAGE_SIZE,
    *,
    centre: tuple[float, float] | None = None,
    radius: float | None = None,
) -> Scene:
    """A well with a random embryo place and size (or the given zona centre and radius)."""
    well_centre = (
        (size - 1) / 2 + rng.uniform(-0.03, 0.03) * size,
        (size - 1) / 2 + rng.uniform(-0.03, 0.03) * size,
    )
    well_radius = rng.uniform(0.45, 0.5) * size
    if radius is None:
        radius = rng.uniform(0.16, 0.23) * size
    if centre is None:
        reach = max(0.0, well_radius - 1.3 * radius - 0.02 * size)
        while True:  # Inside the well, clear of the frame edges and of the bottom banner.
            offset = rng.uniform(-reach, reach, size=2)
            centre = (well_centre[0] + offset[0], well_centre[1] + offset[1])
            if (
                np.hypot(*offset) <= reach
                and 1.2 * radius <= min(centre) <= max(centre) <= size - 1.3 * radius
                and centre[1] + 1.2 * radius <= 0.88 * size
                and centre[1] - 1.2 * radius >= 0.1 * size
            ):
                break
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    distance = np.hypot(xx - well_centre[0], yy - well_centre[1])
    background = np.where(distance <= well_radius, WELL_GRAY, OUTSIDE_GRAY).astype(np.float32)
    wall = np.exp(-(((distance - well_radius) / (0.012 * size + 0.5)) ** 2))
    background += (WELL_WALL_GRAY - background) * wall
    background *= 1.0 - 0.12 * (distance / size) ** 2
    background += 4.0 * _smooth_noise(rng, size, 0.2 * size)
    return Scene(
        size=size,
        well_centre=well_centre,
        well_radius=float(well_radius),
        centre=(float(centre[0]), float(centre[1])),
        radius=float(radius),
        angle=float(rng.uniform(0.0, 2.0 * math.pi)),
        well_number=int(rng.integers(1, 13)),
        seed=int(rng.integers(2**31)),
        background=background.astype(np.float32),
        texture=_smooth_noise(rng, size, 1.5),
    )


def _point(x: float, y: float) -> tuple[int, int]:
    return int(round(x * (1 << SHIFT))), int(round(y * (1 << SHIFT)))


def _disc(image, x, y, r, gray, thickness=-1):
    cv2.circle(
        image,
        _point(x, y),
        max(1, int(round(r * (1 << SHIFT)))),
        float(gray),
        thickness,
        cv2.LINE_AA,
        SHIFT,
    )


def _cell_layout(count: int, inner: float, angle: float, rng: np.random.Generator, uneven: bool):
    """(x, y, r) offsets of `count` cells inside a space of radius `inner`."""
    if count == 1:
        return [(0.0, 0.0, 0.72 * inner)]
    generation = math.floor(math.log2(count))
    extra = count - 2**generation  # That many cells have divided once more.
    radii = [0.72 * inner * 2 ** (-(generation + 1) / 3)] * (2 * extra)
    radii += [0.72 * inner * 2 ** (-generation / 3)] * (count - 2 * extra)
    if uneven:
        radii = [r * rng.uniform(0.8, 1.2) for r in radii]
    cells = []
    outer = min(count, 6)
    for i, r in enumerate(radii):
        if i < outer:
            ring = max(0.0, inner - r) * (0.95 if count > 2 else 0.8)
            theta = angle + 2.0 * math.pi * i / outer
        else:
            ring = 0.35 * max(0.0, inner - r)
            theta = angle + math.pi / outer + 2.0 * math.pi * (i - outer) / max(1, count - outer)
        cells.append((ring * math.cos(theta), ring * math.sin(theta), r))
    return cells


def draw_frame(
    scene: Scene,
    development: Development,
    hours: float,
    rng: np.random.Generator,
    *,
    drift: tuple[float, float] = (0.0, 0.0),
    banner: bool = True,
) -> np.ndarray:
    """One (size, size) uint8 frame of `scene` at `hours`; the zona centre is scene.centre + drift.

    The frame's phase is `development.phase_at(hours)`.
    """
    size = scene.size
    image = scene.background.copy()
    cells_mask = np.zeros((size, size), np.float32)
    cx, cy = scene.centre[0] + drift[0], scene.centre[1] + drift[1]
    phase = development.phase_at(hours)
    name = PHASES[phase] if phase >= 0 else None
    index = {n: i for i, n in enumerate(PHASES)}
    radius = scene.radius
    zona = 0.12 * radius
    if name in ("tEB", "tHB"):  # The expanding blastocyst stretches and thins the zona.
        radius, zona = 1.08 * radius, 0.07 * radius
    inner = radius - zona

    _disc(image, cx, cy, radius, ZONA_GRAY)
    _disc(image, cx, cy, radius, ZONA_EDGE_GRAY, 1)
    _disc(image, cx, cy, inner, SPACE_GRAY)
    _disc(image, cx, cy, inner, ZONA_EDGE_GRAY + 15, 1)

    last = list(development.onsets)[-1]
    arrested = len(development.onsets) < len(PHASES)
    arrested_for = max(0.0, hours - development.onsets[last]) if arrested else 0.0

    if phase < index["tM"]:
        count = 1 if phase < index["t2"] else (2 + phase - index["t2"] if name != "t9+" else 0)
        if name == "t9+":
            progress = (hours - development.onsets["t9+"]) / 12.0
            count = int(min(16, 9 + 7 * max(0.0, progress)))
        layout_rng = np.random.default_rng((scene.seed, count))  # Same sizes every frame.
        layout = _cell_layout(count, inner, scene.angle, layout_rng, development.irregular)
        for dx, dy, r in layout:
            _disc(image, cx + dx, cy + dy, r, CELL_GRAY)
            _disc(cells_mask, cx + dx, cy + dy, r, 1.0)
            _disc(image, cx + dx, cy + dy, r, MEMBRANE_GRAY, 1)
        if name == "tPNa":
            for side in (-1, 1):
                offset = 0.17 * inner * side
                px = cx + offset * math.cos(scene.angle)
                py = cy + offset * math.sin(scene.angle)
                _disc(image, px, py, 0.14 * inner, NUCLEUS_GRAY)
                _disc(image, px, py, 0.14 * inner, MEMBRANE_GRAY, 1)
        if phase >= index["tPB2"] and count <= 4:
            angle = scene.angle + 0.5 * math.pi
            reach = inner - 0.1 * inner
            bx, by = cx + reach * math.cos(angle), cy + reach * math.sin(angle)
            _disc(image, bx, by, 0.09 * inner, CELL_GRAY + 10)
            _disc(image, bx, by, 0.09 * inner, MEMBRANE_GRAY, 1)
    else:
        blast = {"tM": 0.78, "tSB": 0.82, "tB": 0.95, "tEB": 0.98, "tHB": 0.98}[name] * inner
        bx, by = cx, cy
        if name == "tHB":  # Hatched: the blastocyst bulges out of the opened zona.
            bx += 0.55 * radius * math.cos(scene.angle)
            by += 0.55 * radius * math.sin(scene.angle)
        _disc(image, bx, by, blast, CELL_GRAY)
        _disc(cells_mask, bx, by, blast, 1.0)
        _disc(image, bx, by, blast, MEMBRANE_GRAY, 1)
        cavity = {"tM": 0.0, "tSB": 0.4, "tB": 0.82, "tEB": 0.88, "tHB": 0.88}[name] * blast
        if cavity > 0:
            _disc(image, bx, by, cavity, CAVITY_GRAY)
            _disc(cells_mask, bx, by, cavity, 0.15)
            icm = 0.38 * blast
            ix = bx + (cavity - 0.4 * icm) * math.cos(scene.angle + math.pi)
            iy = by + (cavity - 0.4 * icm) * math.sin(scene.angle + math.pi)
            _disc(image, ix, iy, icm, CELL_GRAY - 8)
            _disc(cells_mask, ix, iy, icm, 1.0)

    # Debris: grows with cleavage, and after an arrest.
    cleaved = min(1.0, max(0.0, (phase - index["tPNf"]) / 8.0)) if phase >= 0 else 0.0
    amount = development.fragmentation * cleaved + min(0.4, arrested_for / 60.0)
    fragment_rng = np.random.default_rng(scene.seed)  # The same debris in every frame.
    for _ in range(int(round(40 * amount))):
        rho = inner * math.sqrt(fragment_rng.uniform(0.2, 0.95))
        theta = fragment_rng.uniform(0.0, 2.0 * math.pi)
        r = inner * fragment_rng.uniform(0.04, 0.09)
        _disc(image, cx + rho * math.cos(theta), cy + rho * math.sin(theta), r, FRAGMENT_GRAY)

    image += 14.0 * scene.texture * cells_mask
    image += rng.normal(0.0, NOISE_STD, image.shape).astype(np.float32)
    frame = np.clip(image, 0, 255).astype(np.uint8)
    if banner:
        scale = size / 400.0
        thickness = max(1, round(size / 250))
        cv2.putText(
            frame,
            f"{hours:.1f}h",
            (int(0.02 * size), int(0.97 * size)),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            255,
            thickness,
            cv2.LINE_8,
        )
        cv2.putText(
            frame,
            f"WELL {scene.well_number}",
            (int(0.02 * size), int(0.06 * size)),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            255,
            thickness,
            cv2.LINE_8,
        )
    return frame


def _outcomes(rng: np.random.Generator, num: int) -> list[str]:
    """Outcome per video in OUTCOME_SHARES proportions, every class present when num >= 3."""
    names = list(OUTCOME_SHARES)
    outcomes = list(names[: min(num, len(names))])
    outcomes += list(rng.choice(names, size=num - len(outcomes), p=list(OUTCOME_SHARES.values())))
    return [str(o) for o in rng.permutation(outcomes)]


def _patients(rng: np.random.Generator, num: int) -> list[str]:
    """Patient code per video: patients have 1-3 embryos (videos)."""
    patients, codes = [], set()
    while len(patients) < num:
        while True:
            code = "".join(rng.choice(list("ABCDEFGHJKLMNPRSTUVWXYZ"), size=2)) + str(
                int(rng.integers(10, 1000))
            )
            if code not in codes:
                codes.add(code)
                break
        patients += [code] * int(rng.integers(1, 4))
    return patients[:num]


def synthesize(
    out_dir: str | os.PathLike,
    num: int,
    seed: int,
    *,
    image_size: int = IMAGE_SIZE,
    num_frames: int = NUM_FRAMES,
) -> None:
    """Writes `num` synthetic embryo videos in the Gomez et al. layout into `out_dir`.

    Args:
      out_dir: a new or empty directory.
      num: number of videos (embryos).
      seed: random seed; the output is deterministic for it.
      image_size: frame side in pixels (the public data: 500).
      num_frames: frames per video.

    See the module docstring for what is drawn; outcomes.csv is written last.
    """
    if num < 1 or num_frames < 2 or image_size < 48:
        raise ValueError(
            f"Need num >= 1, num_frames >= 2 and image_size >= 48; got {num}, {num_frames}, "
            f"{image_size}."
        )
    out_dir = new_output_dir(out_dir, (FRAMES_DIR, ANNOTATIONS_DIR, TIMES_DIR))

    rng = np.random.default_rng(seed)
    outcomes = _outcomes(rng, num)
    patients = _patients(rng, num)
    patient_speed = {p: float(rng.normal(1.0, 0.03)) for p in dict.fromkeys(patients)}
    embryo_numbers: dict[str, int] = {}
    rows = []
    for outcome, patient, video_rng in zip(outcomes, patients, rng.spawn(num)):
        embryo_numbers[patient] = embryo_numbers.get(patient, 0) + 1
        video = f"{patient}-{embryo_numbers[patient]}"
        development = simulate(video_rng, outcome, patient_speed[patient])
        scene = make_scene(video_rng, image_size)
        span = video_rng.uniform(*SPAN_H)
        start = video_rng.uniform(0.3, 1.0)
        step = (span - start) / (num_frames - 1)
        hours = (
            start + step * np.arange(num_frames) + video_rng.uniform(-0.2, 0.2, num_frames) * step
        )
        hours = np.round(hours, 2)
        drift = np.cumsum(video_rng.normal(0.0, 0.1, (num_frames, 2)), axis=0)
        prefix = (
            f"D2013.{int(video_rng.integers(1, 13)):02d}.{int(video_rng.integers(1, 29)):02d}"
            f"_S{int(video_rng.integers(100, 1000)):04d}_I{int(video_rng.integers(100, 200))}"
            f"_WELL{scene.well_number}"
        )
        folder = os.path.join(out_dir, FRAMES_DIR, video)
        os.makedirs(folder)
        phases = []
        for k, (h, d) in enumerate(zip(hours, drift), start=1):
            frame = draw_frame(scene, development, float(h), video_rng, drift=tuple(d))
            ok, encoded = cv2.imencode(".jpeg", frame, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if not ok:
                raise RuntimeError(f"OpenCV could not encode frame {k} of {video} as JPEG.")
            with open(os.path.join(folder, f"{prefix}_RUN{k}.jpeg"), "wb") as f:
                f.write(encoded.tobytes())
            phases.append(development.phase_at(float(h)))

        with open(os.path.join(out_dir, ANNOTATIONS_DIR, f"{video}_phases.csv"), "w") as f:
            writer = csv.writer(f, lineterminator="\n")
            for index, name in enumerate(PHASES):
                shown = [k for k, p in enumerate(phases, start=1) if p == index]
                if shown:
                    writer.writerow((name, shown[0], shown[-1]))
        with open(os.path.join(out_dir, TIMES_DIR, f"{video}_timeElapsed.csv"), "w") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(("frame_index", "time"))
            writer.writerows((k, f"{h:.2f}") for k, h in enumerate(hours, start=1))
        rows.append((video, patient, outcome))

    with open(os.path.join(out_dir, OUTCOMES_FILE), "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(OUTCOME_COLUMNS)
        writer.writerows(rows)
