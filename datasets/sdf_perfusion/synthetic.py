"""Synthetic sidestream dark-field (SDF) microcirculation videos in the SDF perfusion raw layout.

`synthesize(out_dir, num, seed)` writes::

    out_dir/videos/<video_id>.avi   MJPG AVI, 128x128 gray (3 equal channels), 30 fps, 48 frames
    out_dir/labels.csv              video_id,patient_id,mfi_q1,mfi_q2,mfi_q3,mfi_q4

with no split column, so the builder splits patients itself. About num/3 patients have 1-4
videos each.

What a video shows. SDF imaging lights tissue with green light that haemoglobin absorbs, so
vessels and red blood cells look DARK on a lighter, diffuse background. Each video draws:

- a vessel network of smooth random curves (turning rate = smoothed white noise): 1-2 venules
  6-10 px wide entering from the border, and 14-20 capillaries 2-4 px wide, half of them
  branching off an existing vessel at 35-80 degrees, the rest starting anywhere; lumen slightly
  darker than the background;
- red blood cells as dark Gaussian blobs (sigma 1.5 px) on the vessel centrelines, in single
  file in capillaries (gaps of about 7-12 px) and in several lanes in venules, at the same
  density whatever the flow, so that a single frame does not tell the flow type;
- per image quadrant (q1 top-left, q2 top-right, q3 bottom-left, q4 bottom-right) one flow
  type moving the cells of every vessel piece inside it along its centreline:

      score  flow          cell speed (px/frame at 128 px, scaled with the image size)
      3      continuous    2.5-5, steady up to a 15 % pulsatile wobble
      2      sluggish      0.6-1.0, steady
      1      intermittent  1.5-3.5 for 3-8 frames, then stopped for 4-12, repeatedly
      0      none          0 (cells stay put)

  The scores are those of the consensus microvascular flow index (MFI, Ince et al. 2018).
  Cells leaving a vessel piece re-enter at its other end, which keeps the cell density
  constant (flow is not carried over from one quadrant to the next); pieces shorter than 5 px
  carry no cells;
- nuisances: slow illumination drift (global gain and a rotating gradient), a slight optical
  blur, small smooth camera jitter (up to about 2 px) and Gaussian noise.

Labels follow from the simulation: labels.csv holds each quadrant's simulated score. Each video
has a base perfusion state (3, 2, 1, 0 with probabilities 0.4, 0.3, 0.18, 0.12, stratified so
that a dataset of 9 or more videos has videos of each); most quadrants take it, some one step more or
less, so scores are correlated within a video. About 5 % of quadrants are left unscored (an
empty cell, as for a quadrant a reader could not assess), never more than two per video.

Everything that is drawn except the flows (network, cells, illumination, jitter, noise) comes
from one random stream and the flows from another, so the same seed with other flow types gives
the same first frame. Output is deterministic for a seed (byte-identical files for one OpenCV
version).
"""

import csv
import dataclasses
import math
import os

import cv2
import numpy as np
from medjax_datasets.common import new_output_dir, random_hex_ids
from medjax_datasets.sdf_perfusion.sdf_perfusion import LABEL_COLUMNS

from medjax.preprocess.video import write_video_gray

SIZE = (128, 128)  # (height, width)
NUM_FRAMES = 48
FPS = 30.0
REFERENCE_SIZE = 128  # Lengths and speeds below are in pixels of a 128-px image.
FLOW_NAMES = {3: "continuous", 2: "sluggish", 1: "intermittent", 0: "none"}
BASE_STATE_PROBABILITIES = {3: 0.4, 2: 0.3, 1: 0.18, 0: 0.12}
DEVIATING_QUADRANTS_PROBABILITIES = (0.45, 0.4, 0.15)  # 0, 1, 2 quadrants off the base state.
UNSCORED_QUADRANT_SHARE = 0.05
MAX_VIDEOS_PER_PATIENT = 4

CONTINUOUS_SPEED = (2.5, 5.0)
SLUGGISH_SPEED = (0.6, 1.0)
INTERMITTENT_SPEED = (1.5, 3.5)
INTERMITTENT_MOVING_FRAMES = (3, 8)
INTERMITTENT_STOPPED_FRAMES = (4, 12)
CELL_SIGMA = 1.5
MAX_JITTER = 2.0
MIN_PIECE_LENGTH = 5


@dataclasses.dataclass(frozen=True)
class Vessel:
    """A vessel centreline sampled every pixel, in padded-canvas coordinates, and its width."""

    points: np.ndarray  # (N, 2) x, y
    width: float


@dataclasses.dataclass(frozen=True)
class SdfVideo:
    """One synthetic video and its ground truth."""

    frames: np.ndarray  # (T, H, W) uint8
    scores: tuple[int, int, int, int]  # Simulated flow score of q1..q4 (see FLOW_NAMES).
    mean_speeds: np.ndarray  # (4,) mean cell speed (px/frame) in each quadrant.
    vessel_mask: np.ndarray  # (H, W) bool: vessel lumen at the first frame's camera position.


def _smooth(values: np.ndarray, sigma: float) -> np.ndarray:
    """`values` convolved along its last axis with a normalised Gaussian (edges: reflect)."""
    radius = max(1, int(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(values, [(0, 0)] * (values.ndim - 1) + [(radius, radius)], mode="reflect")
    return np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), -1, padded)


def _curve(
    rng: np.random.Generator,
    start: np.ndarray,
    heading: float,
    length: float,
    wiggle: float,
    bounds: tuple[float, float],
) -> np.ndarray:
    """A smooth random curve of unit steps from `start`, cut where it leaves [0, bounds)."""
    steps = max(2, int(length))
    turning = _smooth(rng.normal(0.0, wiggle, steps), 6.0)
    headings = heading + np.cumsum(turning)
    moves = np.stack([np.cos(headings), np.sin(headings)], axis=1)
    points = start + np.concatenate([np.zeros((1, 2)), np.cumsum(moves[:-1], axis=0)])
    outside = (points < 0).any(axis=1) | (points[:, 0] >= bounds[0]) | (points[:, 1] >= bounds[1])
    end = int(np.argmax(outside)) if outside.any() else len(points)
    return points[:end]


def _vessel_network(
    rng: np.random.Generator, width: int, height: int, scale: float
) -> list[Vessel]:
    """Venules entering from the border, then capillaries, half branching off earlier vessels."""
    bounds = (float(width), float(height))
    centre = np.array(bounds) / 2
    vessels: list[Vessel] = []
    area_factor = width * height / (REFERENCE_SIZE * scale) ** 2
    for _ in range(int(rng.integers(1, 3))):
        side = rng.uniform(0, 2 * math.pi)
        start = centre + 0.5 * np.array(bounds) * np.array([math.cos(side), math.sin(side)])
        start = np.clip(start, 0.5, np.array(bounds) - 1.5)
        heading = math.atan2(*(centre - start)[::-1]) + rng.uniform(-0.5, 0.5)
        points = _curve(rng, start, heading, 2.0 * max(bounds), 0.06 / scale, bounds)
        if len(points) >= 8:
            vessels.append(Vessel(points, rng.uniform(6.0, 10.0) * scale))
    num_capillaries = int(round(rng.integers(14, 21) * area_factor))
    for _ in range(num_capillaries):
        if vessels and rng.uniform() < 0.5:
            parent = vessels[int(rng.integers(len(vessels)))].points
            index = int(
                rng.integers(len(parent) // 5, max(len(parent) // 5 + 1, 4 * len(parent) // 5))
            )
            step = parent[min(index + 1, len(parent) - 1)] - parent[max(index - 1, 0)]
            angle = math.radians(rng.uniform(35.0, 80.0)) * rng.choice([-1.0, 1.0])
            start, heading = parent[index], math.atan2(step[1], step[0]) + angle
        else:
            start = rng.uniform([0.0, 0.0], bounds)
            heading = rng.uniform(0, 2 * math.pi)
        length = rng.uniform(25.0, 80.0) * scale
        points = _curve(rng, start, heading, length, 0.25 / scale, bounds)
        if len(points) >= 6:
            vessels.append(Vessel(points, rng.uniform(2.0, 4.0) * scale))
    return vessels


@dataclasses.dataclass(frozen=True)
class _Pieces:
    """Vessel pieces, each inside one quadrant, and the cells riding on them."""

    points: np.ndarray  # (P, 2) every piece's centreline points, concatenated.
    normals: np.ndarray  # (P, 2) unit normals at those points.
    piece_start: np.ndarray  # (K,) index of each piece's first point.
    piece_length: np.ndarray  # (K,) arc length (points - 1).
    piece_quadrant: np.ndarray  # (K,) quadrant 0..3 of each piece.
    cell_piece: np.ndarray  # (C,) piece of each cell.
    cell_position: np.ndarray  # (C,) arc position at frame 0.
    cell_offset: np.ndarray  # (C,) offset across the vessel, px.


def _quadrants(points: np.ndarray, margin: float, width: int, height: int) -> np.ndarray:
    """Quadrant 0..3 (q1..q4) of padded-canvas points, from their position in the output image."""
    right = points[:, 0] - margin >= width / 2
    bottom = points[:, 1] - margin >= height / 2
    return 2 * bottom.astype(int) + right.astype(int)


def _cells(
    rng: np.random.Generator,
    vessels: list[Vessel],
    margin: float,
    width: int,
    height: int,
    scale: float,
) -> _Pieces:
    """Cuts the vessels at quadrant borders and seeds cells along each piece."""
    points, normals, starts, lengths, quadrants = [], [], [], [], []
    cell_piece, cell_position, cell_offset = [], [], []
    total = 0
    for vessel in vessels:
        tangent = np.gradient(vessel.points, axis=0)
        tangent /= np.linalg.norm(tangent, axis=1, keepdims=True) + 1e-9
        normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
        quadrant = _quadrants(vessel.points, margin, width, height)
        cuts = np.flatnonzero(np.diff(quadrant)) + 1
        for begin, end in zip(np.r_[0, cuts], np.r_[cuts, len(quadrant)]):
            length = end - begin - 1
            if length < MIN_PIECE_LENGTH:  # Too short to show cells moving along it.
                continue
            piece = len(starts)
            points.append(vessel.points[begin:end])
            normals.append(normal[begin:end])
            starts.append(total)
            lengths.append(length)
            quadrants.append(quadrant[begin])
            total += end - begin
            lanes = max(1, int(round(vessel.width / (3.5 * scale))))
            spacing = rng.uniform(7.0, 12.0) * scale
            half_span = max(0.0, vessel.width / 2 - 1.5 * scale)
            for _ in range(lanes):
                # Gamma-distributed gaps: cells in single file, unevenly spaced, no lattice.
                gaps = rng.gamma(4.0, spacing / 4.0, int(length / spacing * 2) + 4)
                positions = rng.uniform(0, spacing) + np.cumsum(gaps) - gaps[0]
                positions = positions[positions < length]
                cell_piece.append(np.full(len(positions), piece))
                cell_position.append(positions)
                cell_offset.append(rng.uniform(-half_span, half_span, len(positions)))
    if not starts:
        points, normals, cell_piece = [np.zeros((0, 2))], [np.zeros((0, 2))], [np.zeros(0, int)]
        cell_position, cell_offset = [np.zeros(0)], [np.zeros(0)]
    return _Pieces(
        points=np.concatenate(points),
        normals=np.concatenate(normals),
        piece_start=np.array(starts),
        piece_length=np.array(lengths, dtype=np.float64),
        piece_quadrant=np.array(quadrants),
        cell_piece=np.concatenate(cell_piece).astype(int),
        cell_position=np.concatenate(cell_position),
        cell_offset=np.concatenate(cell_offset),
    )


def _piece_velocities(
    rng: np.random.Generator, scores: np.ndarray, num_frames: int, scale: float
) -> np.ndarray:
    """(K, T) signed speeds along each piece (px/frame) for the pieces' quadrant scores."""
    velocities = np.zeros((len(scores), num_frames))
    t = np.arange(num_frames)
    for k, score in enumerate(scores):
        direction = rng.choice([-1.0, 1.0])
        if score == 3:
            wobble = 1.0 + 0.15 * np.sin(
                2 * math.pi * t / rng.uniform(20, 30) + rng.uniform(0, 6.3)
            )
            velocities[k] = rng.uniform(*CONTINUOUS_SPEED) * wobble
        elif score == 2:
            velocities[k] = rng.uniform(*SLUGGISH_SPEED)
        elif score == 1:
            moving = bool(rng.uniform() < 0.5)
            frame = -int(rng.integers(0, INTERMITTENT_STOPPED_FRAMES[1]))
            speed = rng.uniform(*INTERMITTENT_SPEED)
            while frame < num_frames:
                span = INTERMITTENT_MOVING_FRAMES if moving else INTERMITTENT_STOPPED_FRAMES
                duration = int(rng.integers(span[0], span[1] + 1))
                if moving:
                    velocities[k, max(frame, 0) : max(frame + duration, 0)] = speed
                frame += duration
                moving = not moving
        velocities[k] *= direction * scale
    return velocities


def _splat(frames: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """Adds unit mass at sub-pixel (x, y) per frame into (T, H, W) `frames`, bilinearly."""
    num_frames, height, width = frames.shape
    t = np.broadcast_to(np.arange(num_frames)[:, None], x.shape)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    flat = frames.reshape(-1)
    for dx, dy, weight in (
        (0, 0, (1 - fx) * (1 - fy)),
        (1, 0, fx * (1 - fy)),
        (0, 1, (1 - fx) * fy),
        (1, 1, fx * fy),
    ):
        xi, yi = x0 + dx, y0 + dy
        inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
        index = (t[inside] * height + yi[inside]) * width + xi[inside]
        np.add.at(flat, index, weight[inside])


def render_video(
    rng: np.random.Generator,
    scores: tuple[int, int, int, int],
    *,
    size: tuple[int, int] = SIZE,
    num_frames: int = NUM_FRAMES,
) -> SdfVideo:
    """Simulates one SDF video whose quadrants q1..q4 have the given flow scores.

    Args:
      rng: the random generator; the flows use a stream spawned from it, the scene another.
      scores: flow score per quadrant, 3 continuous, 2 sluggish, 1 intermittent, 0 none.
      size: (height, width) of the frames.
      num_frames: number of frames.

    Returns:
      The frames and their ground truth (see `SdfVideo`).
    """
    height, width = size
    scores = tuple(int(s) for s in scores)
    if len(scores) != 4 or not all(s in FLOW_NAMES for s in scores):
        raise ValueError(f"scores must be four of {sorted(FLOW_NAMES)}, got {scores}.")
    scene_rng, flow_rng = rng.spawn(2)
    scale = min(height, width) / REFERENCE_SIZE
    margin = int(math.ceil(MAX_JITTER * scale)) + 2
    padded_w, padded_h = width + 2 * margin, height + 2 * margin

    vessels = _vessel_network(scene_rng, padded_w, padded_h, scale)
    pieces = _cells(scene_rng, vessels, margin, width, height, scale)

    # Background: bright diffuse tissue with smooth and fine texture; darker vessel lumen.
    level = scene_rng.uniform(150.0, 190.0)
    coarse = cv2.resize(
        scene_rng.standard_normal((8, 8)).astype(np.float32),
        (padded_w, padded_h),
        interpolation=cv2.INTER_CUBIC,
    )
    fine = cv2.GaussianBlur(
        scene_rng.standard_normal((padded_h, padded_w)).astype(np.float32), (0, 0), 1.0
    )
    tissue = level * (1.0 + 0.06 * coarse / (coarse.std() + 1e-6) + 0.08 * fine)
    lumen_canvas = np.zeros((padded_h, padded_w), np.uint8)
    for vessel in vessels:
        cv2.polylines(
            lumen_canvas,
            [np.round(vessel.points * 16).astype(np.int32)],
            False,
            255,
            thickness=max(1, int(round(vessel.width))),
            lineType=cv2.LINE_AA,
            shift=4,
        )
    lumen = cv2.GaussianBlur(lumen_canvas.astype(np.float32) / 255.0, (0, 0), 0.6)
    scene = tissue * (1.0 - scene_rng.uniform(0.2, 0.3) * lumen)
    cell_darkness = scene_rng.uniform(0.55, 0.7)

    # Nuisances, drawn before the flows so that they do not depend on them.
    t = np.arange(num_frames)
    gain = 1.0 + scene_rng.uniform(0.03, 0.08) * np.sin(
        2 * math.pi * t / scene_rng.uniform(60, 200) + scene_rng.uniform(0, 2 * math.pi)
    )
    gradient_angle = scene_rng.uniform(0, 2 * math.pi) + scene_rng.uniform(-0.01, 0.01) * t
    gradient_strength = scene_rng.uniform(0.05, 0.15)
    jitter = np.cumsum(scene_rng.normal(0.0, 0.35 * scale, (2, num_frames)), axis=1)
    jitter = _smooth(jitter - jitter[:, :1], 3.0)
    jitter = np.clip(jitter - jitter[:, :1], -MAX_JITTER * scale, MAX_JITTER * scale)
    blur = scene_rng.uniform(0.5, 1.0) * scale
    noise = scene_rng.normal(0.0, scene_rng.uniform(2.0, 4.0), (num_frames, height, width))

    # Cells: arc positions advance by the integrated speed of their piece, wrapping around.
    velocities = _piece_velocities(
        flow_rng, np.array(scores)[pieces.piece_quadrant], num_frames, scale
    )
    displacement = np.concatenate(
        [np.zeros((len(velocities), 1)), np.cumsum(velocities[:, :-1], axis=1)], axis=1
    )
    length = pieces.piece_length[pieces.cell_piece]
    arc = np.mod(pieces.cell_position[None, :] + displacement[pieces.cell_piece].T, length)
    index = np.minimum(np.floor(arc).astype(int), (length - 1).astype(int))
    fraction = (arc - index)[..., None]
    global_index = pieces.piece_start[pieces.cell_piece] + index
    xy = (1 - fraction) * pieces.points[global_index] + fraction * pieces.points[global_index + 1]
    xy = xy + pieces.cell_offset[None, :, None] * pieces.normals[global_index]
    density = np.zeros((num_frames, padded_h, padded_w), np.float32)
    _splat(density, xy[..., 0], xy[..., 1])

    sigma = CELL_SIGMA * scale
    peak = 1.0 / (2 * math.pi * sigma**2)  # Blurred unit mass at its centre.
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = np.empty((num_frames, height, width), np.uint8)
    for f in range(num_frames):
        cells = 1.0 - np.exp(-1.5 * cv2.GaussianBlur(density[f], (0, 0), sigma) / peak)
        tissue_frame = (scene * (1.0 - cell_darkness * cells)).astype(np.float32)
        shift = np.float32([[1, 0, margin + jitter[0, f]], [0, 1, margin + jitter[1, f]]])
        view = cv2.warpAffine(
            tissue_frame,
            shift,
            (width, height),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REFLECT,
        )
        along = (xx - width / 2) * math.cos(gradient_angle[f]) + (yy - height / 2) * math.sin(
            gradient_angle[f]
        )
        lit = view * gain[f] * (1.0 + gradient_strength * along / max(width, height))
        image = cv2.GaussianBlur(lit, (0, 0), blur) + noise[f]
        frames[f] = np.clip(np.round(image), 0, 255).astype(np.uint8)

    speeds = np.abs(velocities).mean(axis=1)
    mean_speeds = np.array(
        [
            speeds[pieces.piece_quadrant == q].mean() if (pieces.piece_quadrant == q).any() else 0.0
            for q in range(4)
        ]
    )
    vessel_mask = lumen[margin : margin + height, margin : margin + width] > 0.5
    return SdfVideo(frames, scores, mean_speeds, vessel_mask)


def _base_states(rng: np.random.Generator, num: int) -> np.ndarray:
    """Per-video base perfusion score, stratified over BASE_STATE_PROBABILITIES."""
    quantiles = (rng.permutation(num) + rng.uniform(size=num)) / num
    states = np.array(list(BASE_STATE_PROBABILITIES))
    edges = np.cumsum(list(BASE_STATE_PROBABILITIES.values()))[:-1]
    return states[np.searchsorted(edges, quantiles, side="right")]


def _quadrant_scores(rng: np.random.Generator, base: int) -> list[int]:
    """Four quadrant scores around a base state: most equal to it, some one step off."""
    scores = [int(base)] * 4
    num_off = int(
        rng.choice(len(DEVIATING_QUADRANTS_PROBABILITIES), p=DEVIATING_QUADRANTS_PROBABILITIES)
    )
    for quadrant in rng.choice(4, size=num_off, replace=False):
        step = int(rng.choice([-1, 1]))
        if not 0 <= base + step <= 3:
            step = -step
        scores[quadrant] = int(base) + step
    return scores


def _patients(rng: np.random.Generator, num: int) -> list[str]:
    """Patient id per video: about num/3 patients with 1-4 videos each."""
    count = max(math.ceil(num / MAX_VIDEOS_PER_PATIENT), round(num / 3), 1)
    videos = np.ones(count, int)
    for _ in range(num - count):
        open_patients = np.flatnonzero(videos < MAX_VIDEOS_PER_PATIENT)
        videos[rng.choice(open_patients)] += 1
    ids = [f"PT{n:05d}" for n in sorted(rng.choice(100_000, size=count, replace=False))]
    return [pid for pid, n in zip(ids, videos) for _ in range(n)]


def synthesize(
    out_dir: str | os.PathLike,
    num: int,
    seed: int,
    *,
    size: tuple[int, int] = SIZE,
    num_frames: int = NUM_FRAMES,
    fps: float = FPS,
) -> None:
    """Writes `num` synthetic SDF videos and their labels in the raw layout into `out_dir`.

    See the module docstring for what is drawn. labels.csv is written last.

    Args:
      out_dir: a new or empty directory.
      num: number of videos (at least 1).
      seed: random seed; the same seed gives the same files.
      size: (height, width) of the frames.
      num_frames: frames per video.
      fps: frame rate stored in the AVI files.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}.")
    if min(size) < 16 or num_frames < 2:
        raise ValueError(
            f"size must be at least 16x16 and num_frames >= 2, got {size}, {num_frames}."
        )
    out_dir = new_output_dir(out_dir, ("videos",))

    rng = np.random.default_rng(seed)
    patients = _patients(rng, num)
    video_ids = random_hex_ids(rng, num, "SDF", 4)
    bases = _base_states(rng, num)
    rows = []
    for video_id, patient, base, video_rng in zip(video_ids, patients, bases, rng.spawn(num)):
        scores = _quadrant_scores(video_rng, int(base))
        video = render_video(video_rng, tuple(scores), size=size, num_frames=num_frames)
        write_video_gray(os.path.join(out_dir, "videos", f"{video_id}.avi"), video.frames, fps)
        unscored = np.flatnonzero(video_rng.uniform(size=4) < UNSCORED_QUADRANT_SHARE)[:2]
        cells = ["" if q in unscored else str(s) for q, s in enumerate(scores)]
        rows.append((video_id, patient, *cells))

    with open(os.path.join(out_dir, "labels.csv"), "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(LABEL_COLUMNS)
        writer.writerows(rows)
