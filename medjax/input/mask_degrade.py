"""Plausible-but-wrong segmentation masks, as negatives for a mask-quality model.

Pure numpy / OpenCV and deterministic given a ``np.random.Generator``. `degrade_mask`
turns a good mask into a clearly wrong one in one of five ways:

* ``erode`` / ``dilate``: morphology with a random elliptical kernel (aspect ratio 0.5-1,
  random orientation), grown until the target overlap is reached, so the change scales
  with the object's size and shape;
* ``shift``: translation in a random direction, by the smallest distance that reaches the
  target overlap (about 15-30 % of the object's extent along that direction for a disc);
* ``truncate``: everything beyond a random straight line is cut away;
* ``swap``: another image's mask (only when it differs enough from this one).

Severity is set by one number drawn uniformly from ``dice_range`` (default 0.6-0.85): the
Dice between the degraded and the original mask is at most that target (and as close
to it as the discrete kernel / shift allows). In area terms, erosion and truncation
remove 26-57 % of the object, dilation adds 35-133 %. For ``swap`` the Dice is whatever
the two masks share, at most ``dice_range``'s upper bound.

Masks are (H, W, 1) or (H, W) uint8 arrays of 0/1 (any non-zero value counts as
foreground); outputs are uint8 0/1 of the input's shape.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import cv2
import numpy as np

__all__ = ["KINDS", "DEFAULT_DICE_RANGE", "degrade_mask", "mask_overlap_dice"]

KINDS = ("erode", "dilate", "shift", "truncate", "swap")
DEFAULT_DICE_RANGE = (0.6, 0.85)


def mask_overlap_dice(a, b) -> float:
    """Dice coefficient 2|A∩B| / (|A| + |B|) of two binary masks.

    Args:
      a: mask of any shape; non-zero is foreground.
      b: mask of the same shape.

    Returns:
      Dice in [0, 1]; 1.0 when both masks are empty.

    Raises:
      ValueError: if the shapes differ.
    """
    a = np.asarray(a) != 0
    b = np.asarray(b) != 0
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def _as_2d(mask, name: str) -> np.ndarray:
    """Validates a mask and returns it as a 2-D uint8 0/1 array.

    Args:
      mask: (H, W) or (H, W, 1) array.
      name: argument name for error messages.

    Returns:
      (H, W) uint8 array of 0/1.

    Raises:
      ValueError: for any other shape.
    """
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[:, :, 0]
    if mask.ndim != 2:
        raise ValueError(f"{name} must have shape (H, W) or (H, W, 1), got {mask.shape}")
    return (mask != 0).astype(np.uint8)


def _smallest_passing(passes: Callable[[int], bool], limit: int) -> int:
    """Smallest n in [1, limit] with ``passes(n)``, for ``passes`` monotone in n.

    Doubles n until it passes, then bisects, so the largest n tried is under twice the
    answer (the morphology kernels stay small).

    Args:
      passes: predicate, False at 0 and (assumed) monotone non-decreasing in n.
      limit: the largest n to try.

    Returns:
      The smallest passing n, or ``limit`` if none passes.
    """
    lo, hi = 0, 1
    while not passes(hi):
        if hi >= limit:
            return limit
        lo, hi = hi, min(2 * hi, limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _elliptical_kernel(semi_major: int, aspect: float, angle: float) -> np.ndarray:
    """A filled, rotated ellipse as a morphology kernel.

    Kernels with the same ``aspect`` and ``angle`` are nested as ``semi_major`` grows,
    so erosion and dilation change monotonically with it.

    Args:
      semi_major: semi-major axis in pixels (>= 1).
      aspect: minor / major axis ratio in (0, 1].
      angle: orientation of the major axis in radians.

    Returns:
      (2 * semi_major + 1) square uint8 kernel of 0/1.
    """
    a = float(semi_major)
    b = aspect * a
    yy, xx = np.mgrid[-semi_major : semi_major + 1, -semi_major : semi_major + 1]
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    return ((u / a) ** 2 + (v / b) ** 2 <= 1.0).astype(np.uint8)


def _morphology(mask: np.ndarray, rng: np.random.Generator, target: float, dilate: bool):
    """Erodes or dilates with the smallest random elliptical kernel reaching ``target``.

    Args:
      mask: (H, W) uint8 0/1, non-empty.
      rng: random generator (draws the kernel's aspect ratio and angle).
      target: the Dice with ``mask`` to reach or go below.
      dilate: dilate if True, else erode.

    Returns:
      (H, W) uint8 0/1 mask. If even a frame-sized kernel cannot reach the target (a mask
      filling the frame), the frame-sized result.
    """
    aspect = rng.uniform(0.5, 1.0)
    angle = rng.uniform(0.0, math.pi)
    op = cv2.dilate if dilate else cv2.erode

    def apply(semi_major: int) -> np.ndarray:
        return op(mask, _elliptical_kernel(semi_major, aspect, angle))

    size = _smallest_passing(lambda n: mask_overlap_dice(apply(n), mask) <= target, max(mask.shape))
    return apply(size)


def _translate(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Moves a mask by whole pixels; what leaves the frame is lost, new pixels are 0.

    Args:
      mask: (H, W) array.
      dx: shift to the right in pixels.
      dy: shift down in pixels.

    Returns:
      The shifted (H, W) array.
    """
    h, w = mask.shape
    out = np.zeros_like(mask)
    if abs(dx) >= w or abs(dy) >= h:
        return out
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _shift(mask: np.ndarray, rng: np.random.Generator, target: float) -> np.ndarray:
    """Translates in a random direction by the smallest distance reaching ``target``.

    Args:
      mask: (H, W) uint8 0/1, non-empty.
      rng: random generator (draws the direction).
      target: the Dice with ``mask`` to reach or go below.

    Returns:
      (H, W) uint8 0/1 mask.
    """
    angle = rng.uniform(0.0, 2.0 * math.pi)
    cos, sin = math.cos(angle), math.sin(angle)
    rows, cols = np.nonzero(mask)
    projection = cols * cos + rows * sin
    # Past the object's extent along the direction the copies no longer overlap (the
    # rounding of the shift to whole pixels moves it by at most 0.71 px).
    limit = int(math.ceil(projection.max() - projection.min())) + 2

    def apply(distance: int) -> np.ndarray:
        return _translate(mask, int(round(distance * cos)), int(round(distance * sin)))

    distance = _smallest_passing(lambda n: mask_overlap_dice(apply(n), mask) <= target, limit)
    return apply(distance)


def _truncate(mask: np.ndarray, rng: np.random.Generator, target: float) -> np.ndarray:
    """Cuts away the part of the object beyond a random straight line.

    Removing a fraction f of the object gives Dice 2(1 - f) / (2 - f), so
    f = (2 - 2 target) / (2 - target), rounded up to whole pixels.

    Args:
      mask: (H, W) uint8 0/1, non-empty.
      rng: random generator (draws the cut's direction).
      target: the Dice with ``mask`` to reach or go below.

    Returns:
      (H, W) uint8 0/1 mask.
    """
    angle = rng.uniform(0.0, 2.0 * math.pi)
    rows, cols = np.nonzero(mask)
    fraction = (2.0 - 2.0 * target) / (2.0 - target)
    remove = min(rows.size, int(math.ceil(fraction * rows.size - 1e-9)))
    projection = cols * math.cos(angle) + rows * math.sin(angle)
    # The pixels furthest along the direction go; ties keep the row-major order.
    cut = np.argsort(projection, kind="stable")[rows.size - remove :]
    out = mask.copy()
    out[rows[cut], cols[cut]] = 0
    return out


def degrade_mask(
    mask,
    rng: np.random.Generator,
    *,
    other_mask=None,
    kinds: Sequence[str] = KINDS,
    dice_range: tuple[float, float] = DEFAULT_DICE_RANGE,
) -> tuple[np.ndarray, str]:
    """Makes a clearly wrong version of a segmentation mask.

    Draws, in this order: the kind (uniformly among ``kinds``), the target Dice (uniform
    in ``dice_range``), then the kind's own parameters; so the output is a deterministic
    function of the generator state. See the module docstring for what each kind does.
    ``"swap"`` is left out of the draw when ``other_mask`` is None or its Dice with
    ``mask`` is above ``dice_range[1]`` (e.g. the same image's mask drawn by chance).

    Nothing is drawn from ``rng`` and the mask is returned unchanged (as uint8 0/1) with
    kind ``"none"`` when it is empty (nothing to degrade), or when ``kinds`` is only
    ``("swap",)`` and ``other_mask`` is too similar.

    Args:
      mask: (H, W, 1) or (H, W) uint8 mask (non-zero is foreground).
      rng: random generator.
      other_mask: another image's mask of the same (H, W), used by ``"swap"``.
      kinds: the kinds to choose from, a non-empty subset of `KINDS`.
      dice_range: (low, high) bounds of the target Dice with the original mask, within
        [0, 1).

    Returns:
      Tuple (new_mask, kind): uint8 0/1 array of ``mask``'s shape, and the kind applied
      (one of ``kinds``, or ``"none"`` when the mask was returned unchanged).

    Raises:
      ValueError: for an unknown or empty ``kinds``, ``kinds=("swap",)`` without
        ``other_mask``, a bad ``dice_range``, or mismatched shapes.
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {tuple(kinds)}")
    low, high = dice_range
    if not 0.0 <= low <= high < 1.0:
        raise ValueError(f"dice_range must satisfy 0 <= low <= high < 1, got {dice_range}")
    original = np.asarray(mask)
    binary = _as_2d(original, "mask")
    other = None
    if other_mask is not None:
        other = _as_2d(other_mask, "other_mask")
        if other.shape != binary.shape:
            raise ValueError(f"other_mask shape {other.shape} differs from mask {binary.shape}")
    if other is None and all(k == "swap" for k in kinds):
        raise ValueError('kinds=("swap",) needs other_mask')
    if not binary.any():
        return binary.reshape(original.shape), "none"
    # A swap is only wrong enough when the other mask differs as much as the other kinds.
    swap_ok = other is not None and mask_overlap_dice(other, binary) <= high
    candidates = [k for k in kinds if k != "swap" or swap_ok]
    if not candidates:
        return binary.reshape(original.shape), "none"

    kind = candidates[rng.integers(len(candidates))]
    target = rng.uniform(low, high)
    if kind == "erode":
        out = _morphology(binary, rng, target, dilate=False)
    elif kind == "dilate":
        out = _morphology(binary, rng, target, dilate=True)
    elif kind == "shift":
        out = _shift(binary, rng, target)
    elif kind == "truncate":
        out = _truncate(binary, rng, target)
    else:
        out = other.copy()
    return out.reshape(original.shape), kind
