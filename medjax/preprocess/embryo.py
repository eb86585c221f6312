"""Embryo localisation in time-lapse incubator frames, shared by the dataset builder and inference.

A time-lapse frame (EmbryoScope-like, e.g. 500x500 gray JPEG) shows one culture well with one
embryo in it, and a burned-in text banner (time stamp, well number) near the top or bottom
edge. The embryo is found as the outer edge of its zona pellucida, a circle, then cropped:

1. `strip_banner`: text is detected, not blanked at fixed margins (a fixed margin would also
   blank any embryo lying near the edge). In the top and bottom `BANNER_BAND` of the rows,
   pixels that are near-white or near-black and sit on a strong horizontal step are text
   candidates; they are merged into words, and every word no taller than half the band is
   filled with the median gray of a thin frame around it. A frame without text is unchanged.
2. CLAHE (`cv2.createCLAHE`) evens out the illumination, for localisation only: the stored
   crops keep the frame's own gray levels.
3. `cv2.HoughCircles` on a copy resized to `WORK_SIZE` pixels wide (a zona only a few pixels
   thick in a small frame would not survive the median filter), with radii between
   `RADIUS_RANGE` times the shorter frame side (excluding the culture well, which is larger).
   Of the candidates whose circumference lies at least `MIN_EDGE_SUPPORT` on edges (the
   strongest `EDGE_SHARE` of the gradient), the largest of the best supported is taken (cells
   and pronuclei are smaller than the zona; arcs of the well wall are poorly supported).
4. Fallback when Hough finds nothing: the largest round textured region (local standard
   deviation; Otsu threshold, which must be `MIN_TEXTURE_CONTRAST` times the median deviation;
   a small closing; the convex hull of the outline must have circularity >= `MIN_CIRCULARITY`,
   fill `MIN_ROUNDNESS` of its enclosing circle and have a radius in range), as its centroid
   and area-equivalent radius.
   Either rough circle is then moved onto the zona's outer edge: first out to the largest ring
   concentric with it (edges at one radius on most rays from its centre: the zona about a
   round zygote found first), then a circle is fitted, robustly, to the outermost edge near
   that ring on every ray.
5. Last resort: the frame centre with radius `DEFAULT_RADIUS_FRACTION` of the shorter side,
   logged as a warning.

`localize_embryo` returns an `EmbryoCircle` (cx, cy, r, method), method "hough", "contour" or
"centre"; pixel (row i, column j) has its centre at (x, y) = (j, i). `localize_video` localises a
few frames spread over a video and returns their median circle: the embryo barely moves in its
well, and one crop window for all frames avoids the jitter of per-frame crops. `crop_embryo`
cuts a square of side 2 r margin about the circle (edge pixels repeated where it leaves the
frame) and resizes it with `cv2.INTER_AREA`.
"""

import collections
import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

import cv2
import numpy as np

BANNER_BAND = 0.15  # Fraction of the rows at the top and at the bottom searched for text.
TEXT_BRIGHT, TEXT_DARK = 225, 30  # Gray levels of text pixels (white or black text).
TEXT_STEP = 60  # Minimum horizontal gray step next to a text pixel.
WORK_SIZE = 256  # Localisation runs on a copy resized to this many pixels on its longer side.
RADIUS_RANGE = (0.1, 0.36)  # Zona radius, as fractions of the shorter frame side.
MIN_EDGE_SUPPORT = 0.6  # Fraction of a Hough circle that must lie on edges.
STRONG_SUPPORT_RATIO = 0.85  # Circles with this share of the best support compete on size.
HOUGH_CANDIDATES = 40  # Hough circles checked, by votes; the well wall collects many.
EDGE_SHARE = 0.12  # Share of the pixels counted as edges when checking a Hough circle.
MIN_CIRCULARITY = 0.8  # 4 pi area / perimeter^2 of the convex hull of an accepted contour.
MIN_ROUNDNESS = 0.6  # Its area over that of its smallest enclosing circle.
MIN_TEXTURE_CONTRAST = 2.0  # Textured pixels: local deviation this many times the median.
DEFAULT_RADIUS_FRACTION = 0.25
DEFAULT_MARGIN = 1.15
METHODS = ("hough", "contour")
RAYS = 72
RING_FLOOR = 0.3  # An edge must reach this share of the strongest edge on its ray to count.
RING_RAYS = 0.5  # A ring needs edges on this share of the rays.
LOCALIZE_FRAMES = 5

logger = logging.getLogger(__name__)


class EmbryoCircle(NamedTuple):
    """The zona pellucida's outer edge in frame pixels, and how it was found."""

    cx: float
    cy: float
    r: float
    method: str  # "hough", "contour" or "centre" (nothing found).


def _check_frame(frame: np.ndarray) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if frame.ndim != 2 or frame.dtype != np.uint8 or min(frame.shape) < 16:
        raise ValueError(
            f"Expected a (H, W) uint8 grayscale frame of at least 16x16 pixels, got shape "
            f"{frame.shape} and dtype {frame.dtype}; convert it with cv2.cvtColor first."
        )
    return frame


def strip_banner(frame: np.ndarray) -> np.ndarray:
    """Removes burned-in text (time stamp, well number) near the top and bottom edges.

    Args:
      frame: (H, W) uint8 grayscale frame.

    Returns:
      A copy of the frame with every detected text word filled with the median gray around it;
      the frame itself (not a copy) when it has no text.
    """
    frame = _check_frame(frame)
    height, width = frame.shape
    band = max(4, int(round(BANNER_BAND * height)))
    signed = frame.astype(np.int16)
    step = np.zeros_like(signed)
    step[:, 1:-1] = np.maximum(
        np.abs(signed[:, 2:] - signed[:, 1:-1]), np.abs(signed[:, 1:-1] - signed[:, :-2])
    )
    text = ((frame >= TEXT_BRIGHT) | (frame <= TEXT_DARK)) & (step >= TEXT_STEP)
    text[band : height - band] = False
    if not text.any():
        return frame
    glyph = max(2, height // 100)
    words = cv2.dilate(text.astype(np.uint8), np.ones((glyph, 3 * glyph), np.uint8))
    count, _, stats, _ = cv2.connectedComponentsWithStats(words, connectivity=8)
    out = frame.copy()
    pad = glyph
    for x, y, w, h, pixels in stats[1:count]:
        if h > band // 2 or pixels < glyph * glyph:
            continue  # Taller than a text line (a structure crossing the band), or a speck.
        x0, y0 = max(0, x - pad), max(0, y - pad)
        x1, y1 = min(width, x + w + pad), min(height, y + h + pad)
        ring = np.concatenate(
            [
                frame[max(0, y0 - pad) : y0, x0:x1].ravel(),
                frame[y1 : y1 + pad, x0:x1].ravel(),
                frame[y0:y1, max(0, x0 - pad) : x0].ravel(),
                frame[y0:y1, x1 : x1 + pad].ravel(),
            ]
        )
        ring = ring[(ring < TEXT_BRIGHT) & (ring > TEXT_DARK)]
        out[y0:y1, x0:x1] = np.median(ring) if ring.size else np.median(frame)
    return out


def _radius_bounds(shape: tuple[int, int]) -> tuple[float, float]:
    side = min(shape)
    return RADIUS_RANGE[0] * side, RADIUS_RANGE[1] * side


def _gradient(image: np.ndarray) -> np.ndarray:
    gx = cv2.Sobel(image, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(image, cv2.CV_32F, 0, 1, ksize=3)
    return cv2.GaussianBlur(np.hypot(gx, gy), (0, 0), 1.0)


def _edge_support(edges: np.ndarray, cx: float, cy: float, r: float) -> float:
    """Fraction of points on the circle that lie on edges; 0 if half of it leaves the image."""
    angles = np.linspace(0.0, 2.0 * math.pi, 120, endpoint=False)
    xs = np.round(cx + r * np.cos(angles)).astype(int)
    ys = np.round(cy + r * np.sin(angles)).astype(int)
    inside = (xs >= 0) & (xs < edges.shape[1]) & (ys >= 0) & (ys < edges.shape[0])
    if inside.sum() < len(angles) // 2:
        return 0.0
    return float(edges[ys[inside], xs[inside]].mean())


def _sample_rays(
    gradient: np.ndarray, cx: float, cy: float, radii: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradient along `RAYS` rays from (cx, cy): angles, (RAYS, radii) profiles, and which
    rays stay inside the image."""
    angles = np.linspace(0.0, 2.0 * math.pi, RAYS, endpoint=False)
    map_x = (cx + np.outer(np.cos(angles), radii)).astype(np.float32)
    map_y = (cy + np.outer(np.sin(angles), radii)).astype(np.float32)
    profiles = cv2.remap(gradient, map_x, map_y, cv2.INTER_LINEAR, borderValue=0.0)
    inside = (map_x >= 0) & (map_x <= gradient.shape[1] - 1)
    inside &= (map_y >= 0) & (map_y <= gradient.shape[0] - 1)
    return angles, profiles, inside.all(axis=1)


def _peaks(profile: np.ndarray, floor: float) -> np.ndarray:
    """Indices of the local maxima of `profile` that reach `floor`, in increasing order."""
    inner = profile[1:-1]
    return np.flatnonzero((inner >= profile[:-2]) & (inner >= profile[2:]) & (inner >= floor)) + 1


def _outermost_ring(gradient: np.ndarray, cx: float, cy: float, r: float, r_max: float) -> float:
    """The largest radius, up to 1.8 r, of a ring concentric with (cx, cy); r if there is none.

    A ring is a radius within 4 % of which at least `RING_RAYS` of the rays have an edge (a local
    gradient maximum reaching `RING_FLOOR` of the ray's strongest): the zona's outer edge about
    a round zygote, say. Structures not centred on (cx, cy), like the well wall, have their
    edges at different radii on different rays.
    """
    radii = np.arange(0.6 * r, min(1.8 * r, 1.1 * r_max), 0.5)
    if len(radii) < 5:
        return r
    _, profiles, inside = _sample_rays(gradient, cx, cy, radii)
    if inside.sum() < RAYS // 3:
        return r
    hits = np.zeros(len(radii))
    window = np.ones(2 * max(2, round(0.08 * r)) + 1)  # Radii are 0.5 px apart: +-4 % of r.
    for profile in profiles[inside]:
        peaks = np.zeros(len(radii))
        peaks[_peaks(profile, RING_FLOOR * profile.max())] = 1.0
        hits += np.convolve(peaks, window, mode="same") > 0
    rings = _peaks(np.concatenate([[0.0], hits, [0.0]]), RING_RAYS * inside.sum()) - 1
    return float(radii[rings[-1]]) if len(rings) else r


def _fit_circle(points: np.ndarray) -> tuple[float, float, float]:
    """Least-squares (Kasa) circle through (N, 2) points: centre x, y and radius."""
    x, y = points[:, 0], points[:, 1]
    design = np.stack([x, y, np.ones_like(x)], axis=1)
    (a, b, c), *_ = np.linalg.lstsq(design, x * x + y * y, rcond=None)
    cx, cy = a / 2.0, b / 2.0
    return float(cx), float(cy), float(math.sqrt(max(c + cx * cx + cy * cy, 0.0)))


def _fit_outer_edge(
    gradient: np.ndarray, cx: float, cy: float, r: float
) -> tuple[float, float, float] | None:
    """A circle fitted to the outermost edge near radius r on each ray about (cx, cy).

    On each of `RAYS` rays, between 0.85 r and 1.2 r, the outermost local gradient maximum
    reaching `RING_FLOOR` of the ray's strongest is an edge point. A circle is fitted to them;
    points off it by more than 2.5 robust standard deviations (other structures, e.g. a
    hatching blastocyst) are dropped and it is fitted again. None with too few points.
    """
    radii = np.arange(0.85 * r, 1.2 * r, 0.5)
    angles, profiles, inside = _sample_rays(gradient, cx, cy, radii)
    points = []
    for angle, profile in zip(angles[inside], profiles[inside]):
        peaks = _peaks(profile, RING_FLOOR * profile.max())
        if len(peaks):
            edge = radii[peaks[-1]]
            points.append((cx + edge * math.cos(angle), cy + edge * math.sin(angle)))
    if len(points) < RAYS // 3:
        return None
    points = np.array(points)
    circle = _fit_circle(points)
    residual = np.abs(np.hypot(points[:, 0] - circle[0], points[:, 1] - circle[1]) - circle[2])
    kept = points[residual <= max(1.0, 2.5 * 1.4826 * float(np.median(residual)))]
    return _fit_circle(kept) if len(kept) >= RAYS // 3 else circle


def _zona(
    image: np.ndarray, cx: float, cy: float, r: float, r_min: float, r_max: float
) -> tuple[float, float, float]:
    """Moves a rough embryo circle onto the zona's outer edge (unchanged if none is found)."""
    gradient = _gradient(image)
    r = _outermost_ring(gradient, cx, cy, r, r_max)
    fitted = _fit_outer_edge(gradient, cx, cy, r)
    if fitted is not None and r_min <= fitted[2] <= r_max:
        return fitted
    return cx, cy, r


def _hough(image: np.ndarray, r_min: float, r_max: float) -> tuple[float, float, float] | None:
    blurred = cv2.medianBlur(image, 5)
    circles = cv2.HoughCircles(
        blurred,
        cv2.HOUGH_GRADIENT,
        dp=1.0,
        minDist=r_min,
        param1=80,
        param2=20,
        minRadius=int(r_min),
        maxRadius=int(math.ceil(r_max)),
    )
    if circles is None:
        return None
    circles = circles[0][:HOUGH_CANDIDATES]
    # Edges: the strongest EDGE_SHARE of the gradient, a threshold that follows the contrast.
    gradient = _gradient(image)
    edges = gradient >= np.percentile(gradient, 100.0 * (1.0 - EDGE_SHARE))
    edges = cv2.dilate(edges.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    support = np.array([_edge_support(edges, cx, cy, r) for cx, cy, r in circles])
    if support.max() < MIN_EDGE_SUPPORT:
        return None
    # Of the well-supported circles (the zona, cells, pronuclei), the zona is the largest.
    strong = circles[support >= max(MIN_EDGE_SUPPORT, STRONG_SUPPORT_RATIO * support.max())]
    cx, cy, r = (float(v) for v in strong[np.argmax(strong[:, 2])])
    return _zona(image, cx, cy, r, r_min, r_max)


def _contour(image: np.ndarray, r_min: float, r_max: float) -> tuple[float, float, float] | None:
    smooth = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 1.5)
    window = (max(3, int(r_min / 3)) | 1,) * 2
    mean = cv2.blur(smooth, window)
    std = np.sqrt(np.maximum(cv2.blur(smooth * smooth, window) - mean * mean, 0.0))
    low, high = float(std.min()), float(std.max())
    std8 = np.round((std - low) * (255.0 / max(high - low, 1e-6))).astype(np.uint8)
    threshold, mask = cv2.threshold(std8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    if low + threshold * (high - low) / 255.0 < MIN_TEXTURE_CONTRAST * float(np.median(std)):
        return None  # Texture nowhere stands out from the background's noise.
    # A small closing: a larger one would join an embryo near the well wall to the wall.
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (int(r_min / 4) | 1,) * 2)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    # Outer boundaries at every depth (RETR_CCOMP): the embryo lies in the well ring's hole.
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    best = None  # (area, cx, cy)
    for contour, (_, _, _, parent) in zip(contours, hierarchy[0] if contours else []):
        if parent >= 0:
            continue  # A hole's boundary.
        hull = cv2.convexHull(contour)
        area, perimeter = cv2.contourArea(hull), cv2.arcLength(hull, True)
        if area <= 0 or not r_min <= math.sqrt(area / math.pi) <= r_max:
            continue
        (cx, cy), enclosing = cv2.minEnclosingCircle(hull)
        roundness = area / (math.pi * enclosing**2)
        circularity = 4.0 * math.pi * area / perimeter**2
        if circularity >= MIN_CIRCULARITY and roundness >= MIN_ROUNDNESS:
            if best is None or area > best[0]:
                best = (area, cx, cy)
    if best is None:
        return None
    area, cx, cy = best
    # The blob is widened by the deviation window; its area-equivalent radius is a start.
    return _zona(image, cx, cy, math.sqrt(area / math.pi), r_min, r_max)


def localize_embryo(
    frame: np.ndarray, *, methods: Sequence[str] = METHODS, warn: bool = True
) -> EmbryoCircle:
    """Finds the embryo's zona pellucida in one frame (see the module docstring).

    Args:
      frame: (H, W) uint8 grayscale frame, banner included or not.
      methods: the detectors to try, in order: "hough" and/or "contour".
      warn: log a warning when nothing is found and the frame centre is returned.

    Returns:
      EmbryoCircle(cx, cy, r, method) in the frame's pixels; method "centre" when no detector
      found a circle.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown localisation method(s) {unknown}; use {list(METHODS)}.")
    frame = strip_banner(_check_frame(frame))
    height, width = frame.shape
    scale = WORK_SIZE / max(height, width)
    work = frame
    if scale != 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        shrink = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
        work = cv2.resize(frame, size, interpolation=shrink)
    enhanced = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(work)
    r_min, r_max = _radius_bounds(enhanced.shape)
    detectors = {"hough": _hough, "contour": _contour}
    for method in methods:
        found = detectors[method](enhanced, r_min, r_max)
        if found is not None:
            cx, cy, r = found
            # Pixel centres at integer coordinates: x = (x_work + 1/2) / scale - 1/2.
            return EmbryoCircle(
                (cx + 0.5) / scale - 0.5, (cy + 0.5) / scale - 0.5, r / scale, method
            )
    if warn:
        logger.warning("No embryo found in a %dx%d frame; using the frame centre.", width, height)
    return EmbryoCircle(
        (width - 1) / 2.0,
        (height - 1) / 2.0,
        DEFAULT_RADIUS_FRACTION * min(height, width),
        "centre",
    )


def localize_video(
    frames: Sequence[np.ndarray] | np.ndarray,
    *,
    num_frames: int = LOCALIZE_FRAMES,
    methods: Sequence[str] = METHODS,
) -> EmbryoCircle:
    """One embryo circle for a whole video: the median over a few frames spread over it.

    Args:
      frames: (T, H, W) uint8 frames of one video, in time order.
      num_frames: how many frames, evenly spaced from first to last, are localised.
      methods: passed to `localize_embryo`.

    Returns:
      EmbryoCircle with the per-coordinate median of the circles found and the most common
      method among them; the frame centre (method "centre", logged) when none was found.
    """
    if len(frames) == 0:
        raise ValueError("localize_video needs at least one frame.")
    picks = np.unique(np.linspace(0, len(frames) - 1, max(1, num_frames)).round().astype(int))
    circles = [localize_embryo(frames[i], methods=methods, warn=False) for i in picks]
    found = [c for c in circles if c.method != "centre"]
    if not found:
        height, width = np.asarray(frames[0]).shape[:2]
        logger.warning(
            "No embryo found in any of %d frames of a %dx%d video; using the frame centre.",
            len(picks),
            width,
            height,
        )
        return circles[0]
    cx, cy, r = np.median(np.array([c[:3] for c in found]), axis=0)
    method = collections.Counter(c.method for c in found).most_common(1)[0][0]
    return EmbryoCircle(float(cx), float(cy), float(r), method)


def crop_embryo(
    frame: np.ndarray,
    circle: EmbryoCircle | Sequence[float],
    out_size: int,
    margin: float = DEFAULT_MARGIN,
) -> np.ndarray:
    """Cuts the square about the embryo and resizes it.

    Args:
      frame: (H, W) uint8 grayscale frame.
      circle: (cx, cy, r, ...) in frame pixels, e.g. an `EmbryoCircle`.
      out_size: side of the returned square, in pixels.
      margin: the square's side is 2 r margin, so 1.15 keeps 15 % of the radius around the zona.

    Returns:
      (out_size, out_size) uint8; where the square leaves the frame, edge pixels are repeated.
    """
    frame = _check_frame(frame)
    if out_size < 1 or margin <= 0:
        raise ValueError(f"out_size must be >= 1 and margin > 0, got {out_size} and {margin}.")
    cx, cy, r = (float(v) for v in tuple(circle)[:3])
    side = max(2, int(round(2.0 * r * margin)))
    x0 = int(round(cx + 0.5 - side / 2.0))
    y0 = int(round(cy + 0.5 - side / 2.0))
    height, width = frame.shape
    pad_left, pad_top = max(0, -x0), max(0, -y0)
    pad_right, pad_bottom = max(0, x0 + side - width), max(0, y0 + side - height)
    if pad_left or pad_top or pad_right or pad_bottom:
        frame = cv2.copyMakeBorder(
            frame, pad_top, pad_bottom, pad_left, pad_right, cv2.BORDER_REPLICATE
        )
        x0, y0 = x0 + pad_left, y0 + pad_top
    crop = frame[y0 : y0 + side, x0 : x0 + side]
    interpolation = cv2.INTER_AREA if side >= out_size else cv2.INTER_LINEAR
    return cv2.resize(crop, (out_size, out_size), interpolation=interpolation)


def crop_video(
    frames: Sequence[np.ndarray] | np.ndarray,
    out_size: int,
    *,
    margin: float = DEFAULT_MARGIN,
    num_localize: int = LOCALIZE_FRAMES,
) -> tuple[np.ndarray, EmbryoCircle]:
    """Banner-stripped embryo crops of a whole video with one crop window.

    Args:
      frames: (T, H, W) uint8 frames of one video, in time order, all of one size.
      out_size: side of the crops.
      margin: see `crop_embryo`.
      num_localize: frames localised for the median circle (see `localize_video`).

    Returns:
      ((T, out_size, out_size) uint8 crops, the circle used).
    """
    stripped = [strip_banner(f) for f in frames]
    circle = localize_video(stripped, num_frames=num_localize)
    crops = np.stack([crop_embryo(f, circle, out_size, margin) for f in stripped])
    return crops, circle
