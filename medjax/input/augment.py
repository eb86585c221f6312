"""Joint geometric and photometric augmentation of an image, its mask and keypoints.

Pure numpy / OpenCV, for use inside a grain pipeline: every random op takes a
``np.random.Generator`` and draws the same number of values on every call, so outputs
are deterministic given the generator state.

Conventions
-----------
* Images and masks are (H, W, 1) uint8; the affine ops also take int16 / float32 images
  (e.g. CT in Hounsfield units) and any channel count. The channel axis is kept (OpenCV
  drops it for single-channel arrays; it is restored). A 2-D (H, W) input gives a 2-D
  output.
* Keypoints are (N, 2) float32 arrays of (x, y) = (column, row) in pixels, with pixel
  CENTRES at integer coordinates: the pixel ``image[r, c]`` covers
  [c - 0.5, c + 0.5] x [r - 0.5, r + 0.5] and its centre is (x=c, y=r). This is
  the convention of ``cv2.warpAffine``. ``points`` may be None (returned as None) or
  empty (shape (0, 2)).
* Masks are resampled with nearest-neighbour, images with (bi)linear interpolation
  (area averaging when `letterbox` shrinks), pixels outside the source are 0 (the
  affine ops can also fill with another value or replicate / reflect / wrap the edge).
* Keypoints are only moved, never relabelled or dropped: a horizontal flip keeps every
  label (the anatomy does not change sides), and a keypoint pushed out of the frame
  keeps its out-of-range coordinates.
"""

from __future__ import annotations

import math
from typing import Optional

import cv2
import numpy as np

__all__ = [
    "letterbox",
    "affine_matrix",
    "warp_affine",
    "random_affine",
    "random_brightness_contrast",
    "keep_dtype",
    "BORDER_MODES",
]


def _restore_channels(out: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Puts back the trailing channel axis OpenCV drops for single-channel images.

    Args:
      out: OpenCV result, (h, w) or (h, w, C).
      like: the array given to OpenCV.

    Returns:
      ``out`` with ndim equal to ``like.ndim``.
    """
    if like.ndim == 3 and out.ndim == 2:
        out = out[:, :, None]
    return out


def _as_points(points) -> Optional[np.ndarray]:
    """Validates keypoints and returns them as an (N, 2) float32 array.

    Args:
      points: None, or an array-like of shape (N, 2) (N may be 0) of (x, y).

    Returns:
      None, or a new float32 array of shape (N, 2).

    Raises:
      ValueError: if the shape is not (N, 2).
    """
    if points is None:
        return None
    pts = np.asarray(points, dtype=np.float32)
    if pts.size == 0:
        return np.zeros((0, 2), np.float32)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2), got {pts.shape}")
    return pts.copy()


def _transform_points(points: Optional[np.ndarray], matrix: np.ndarray):
    """Applies a 2x3 affine matrix to (x, y) points.

    Args:
      points: None or (N, 2) float32.
      matrix: 2x3 affine map from input to output pixel coordinates.

    Returns:
      None, or float32 (N, 2) transformed points.
    """
    if points is None:
        return None
    m = np.asarray(matrix, np.float64)
    out = points.astype(np.float64) @ m[:, :2].T + m[:, 2]
    return out.astype(np.float32)


def letterbox(image, mask, points, size: int):
    """Resizes keeping the aspect ratio so the longer side is ``size``, then zero-pads.

    The resized content is centred in a (size, size) canvas (when the padding is odd,
    the extra pixel goes to the bottom / right). Points follow the exact resampling
    geometry: ``x' = (x + 0.5) * sx - 0.5 + pad_x`` with ``sx = new_w / W`` (likewise
    for y), which differs from ``scale`` on the shorter side only by the rounding of
    its new length to whole pixels.

    Args:
      image: (H, W, 1) uint8 image.
      mask: (H, W, 1) uint8 mask (nearest interpolation), or None.
      points: None or (N, 2) float32 (x, y) keypoints in input pixels.
      size: side of the square output.

    Returns:
      Tuple (image, mask, points, scale): (size, size, 1) image and mask (mask None if
      given None), transformed float32 (N, 2) points (None if given None), and the
      float ``scale = size / max(H, W)`` = new pixels per old pixel, so a pixel
      spacing of ``s`` mm becomes ``s / scale`` mm.
    """
    image = np.asarray(image)
    h, w = image.shape[:2]
    if mask is not None and np.shape(mask)[:2] != (h, w):
        raise ValueError(f"mask shape {np.shape(mask)} does not match image {image.shape}")
    pts = _as_points(points)
    scale, (new_w, new_h), (pad_x, pad_y), matrix = letterbox_geometry(h, w, size)

    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = _restore_channels(cv2.resize(image, (new_w, new_h), interpolation=interp), image)
    out_image = np.zeros((size, size) + image.shape[2:], image.dtype)
    out_image[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = resized

    out_mask = None
    if mask is not None:
        mask = np.asarray(mask)
        # INTER_NEAREST_EXACT samples at pixel centres (plain INTER_NEAREST is shifted by
        # half a pixel), consistent with the point mapping below.
        rmask = _restore_channels(
            cv2.resize(mask, (new_w, new_h), interpolation=cv2.INTER_NEAREST_EXACT), mask
        )
        out_mask = np.zeros((size, size) + mask.shape[2:], mask.dtype)
        out_mask[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = rmask

    return out_image, out_mask, _transform_points(pts, matrix), float(scale)


def letterbox_geometry(height: int, width: int, size: int):
    """Where `letterbox` puts an (height, width) image in a (size, size) canvas.

    Returns:
      (scale, (new_w, new_h), (pad_x, pad_y), matrix): the 2x3 matrix maps input points to
      output points.
    """
    scale = size / max(height, width)
    new_w = max(1, min(size, int(round(width * scale))))
    new_h = max(1, min(size, int(round(height * scale))))
    pad_x, pad_y = (size - new_w) // 2, (size - new_h) // 2
    sx, sy = new_w / width, new_h / height
    matrix = np.array([[sx, 0.0, 0.5 * sx - 0.5 + pad_x], [0.0, sy, 0.5 * sy - 0.5 + pad_y]])
    return float(scale), (new_w, new_h), (pad_x, pad_y), matrix


def unletterbox_points(points, height: int, width: int, size: int) -> np.ndarray:
    """Maps (N, 2) points of a letterboxed (size, size) image back to the (height, width) one."""
    _, _, _, matrix = letterbox_geometry(height, width, size)
    pts = np.asarray(points, np.float64)
    return ((pts - matrix[:, 2]) / np.diag(matrix[:, :2])).astype(np.float32)


def unletterbox_mask(mask, height: int, width: int) -> np.ndarray:
    """Maps a letterboxed (size, size[, 1]) mask back to (height, width, 1), nearest."""
    mask = np.asarray(mask)
    size = mask.shape[0]
    _, (new_w, new_h), (pad_x, pad_y), _ = letterbox_geometry(height, width, size)
    crop = np.ascontiguousarray(mask[pad_y : pad_y + new_h, pad_x : pad_x + new_w])
    out = cv2.resize(crop, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)
    return out.reshape(height, width, 1)


def affine_matrix(
    shape,
    *,
    flip: bool = False,
    angle_deg: float = 0.0,
    scale: float = 1.0,
    shift=(0.0, 0.0),
    shear_deg: float = 0.0,
    zoom=(1.0, 1.0),
) -> np.ndarray:
    """Builds the 2x3 matrix: horizontal flip, then rotation and scaling about the
    image centre, then shear, then per-axis zoom about the centre, then a shift.

    With pixel centres at integer coordinates the flip is ``x -> W - 1 - x`` and the
    centre is ((W - 1) / 2, (H - 1) / 2). A positive angle rotates counter-clockwise
    as the image is displayed (y pointing down), like ``cv2.getRotationMatrix2D``;
    a 90 degree turn of a square image equals ``np.rot90(image)``.

    The shear is the inverse of Keras' ``apply_affine_transform`` shear (Keras builds
    the output-to-input map ``[[1, -sin(s)], [0, cos(s)]]``), so in centred
    coordinates ``x' = x + tan(s) * y`` and ``y' = y / cos(s)``: the image's vertical
    axis turns counter-clockwise on screen by ``s`` while horizontal lines stay
    horizontal. The zoom maps ``x' = zx * x``, ``y' = zy * y`` (> 1 enlarges, like
    ``scale``). With ``shear_deg=0`` and ``zoom=(1, 1)`` the matrix is exactly the one
    built without these two arguments.

    Args:
      shape: image shape; only (H, W) = shape[:2] is used.
      flip: mirror left-right first.
      angle_deg: rotation angle in degrees.
      scale: isotropic zoom factor (> 1 enlarges).
      shift: (dx, dy) translation in output pixels, applied last.
      shear_deg: shear angle in degrees (counter-clockwise), |shear_deg| < 90.
      zoom: (zx, zy) zoom factors along x (columns) and y (rows), both > 0.

    Returns:
      float64 array of shape (2, 3) mapping input (x, y) to output (x, y).

    Raises:
      ValueError: if ``shear_deg`` is not in (-90, 90) or a zoom factor is not > 0.
    """
    h, w = shape[:2]
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    flip_m = np.eye(3)
    if flip:
        flip_m[0, 0], flip_m[0, 2] = -1.0, w - 1.0
    theta = math.radians(angle_deg)
    a, b = scale * math.cos(theta), scale * math.sin(theta)
    # y points down, so [[cos, sin], [-sin, cos]] turns counter-clockwise on screen.
    rot = np.array(
        [
            [a, b, cx - a * cx - b * cy],
            [-b, a, cy + b * cx - a * cy],
            [0.0, 0.0, 1.0],
        ]
    )
    move = np.eye(3)
    move[0, 2], move[1, 2] = shift
    linear = rot
    if shear_deg != 0.0:
        if not -90.0 < shear_deg < 90.0:
            raise ValueError(f"shear_deg must be in (-90, 90) degrees, got {shear_deg}")
        s = math.radians(shear_deg)
        shear = np.array([[1.0, math.tan(s), 0.0], [0.0, 1.0 / math.cos(s), 0.0], [0, 0, 1.0]])
        linear = _about_centre(shear, cx, cy) @ linear
    zx, zy = (float(z) for z in zoom)
    if (zx, zy) != (1.0, 1.0):
        if not (zx > 0 and zy > 0):
            raise ValueError(f"zoom factors must be > 0, got zoom={tuple(zoom)}")
        linear = _about_centre(np.diag([zx, zy, 1.0]), cx, cy) @ linear
    return (move @ linear @ flip_m)[:2]


def _about_centre(linear: np.ndarray, cx: float, cy: float) -> np.ndarray:
    """Conjugates a 3x3 linear map so that it acts about (cx, cy) instead of the origin.

    Args:
      linear: 3x3 matrix whose last column is (0, 0, 1).
      cx, cy: the fixed point.

    Returns:
      3x3 matrix ``T(c) @ linear @ T(-c)``.
    """
    to_origin, back = np.eye(3), np.eye(3)
    to_origin[:2, 2] = (-cx, -cy)
    back[:2, 2] = (cx, cy)
    return back @ linear @ to_origin


# cv2 border modes under the names of Keras' fill_mode (whose "reflect" repeats the edge
# pixel, abcddcba|abcd|dcbaabcd, which is BORDER_REFLECT, not BORDER_REFLECT_101).
BORDER_MODES = {
    "constant": cv2.BORDER_CONSTANT,
    "nearest": cv2.BORDER_REPLICATE,
    "reflect": cv2.BORDER_REFLECT,
    "wrap": cv2.BORDER_WRAP,
}


def _warp(arr: np.ndarray, m: np.ndarray, interp: int, border: int, fill: float) -> np.ndarray:
    """cv2.warpAffine to the input's size for any channel count and dtype.

    dtypes as in `keep_dtype` (int16 is warped as float32 and rounded back); more than 4
    channels are warped 4 at a time.

    Args:
      arr: (H, W) or (H, W, C) array.
      m: 2x3 float64 matrix from input to output pixels.
      interp: cv2 interpolation flag.
      border: cv2 border mode.
      fill: value of outside pixels in constant mode, for every channel.

    Returns:
      The warped array, same shape and dtype.
    """
    h, w = arr.shape[:2]
    if arr.ndim == 3 and arr.shape[2] > 4:
        parts = [
            _warp(arr[:, :, i : i + 4], m, interp, border, fill) for i in range(0, arr.shape[2], 4)
        ]
        return np.concatenate(parts, axis=2)
    return keep_dtype(
        arr,
        lambda src: cv2.warpAffine(
            np.ascontiguousarray(src),
            m,
            (w, h),
            flags=interp,
            borderMode=border,
            borderValue=(float(fill),) * 4,
        ),
    )


def keep_dtype(arr: np.ndarray, cv2_fn) -> np.ndarray:
    """Runs an OpenCV image function so that the result has the input's dtype and ndim.

    uint8, uint16, float32 and float64 go to OpenCV as they are; other dtypes (int16, int32,
    ...) go as float32 and come back rounded and clipped to the dtype's range (OpenCV's
    fixed-point interpolation of int16 is off by tens of units). A channel axis OpenCV drops
    is restored.

    Args:
      arr: (H, W) or (H, W, C) array.
      cv2_fn: function of one array returning the OpenCV result.

    Returns:
      The result with ``arr``'s dtype and number of dimensions.
    """
    native = arr.dtype in (np.uint8, np.uint16, np.float32, np.float64)
    out = _restore_channels(cv2_fn(arr if native else arr.astype(np.float32)), arr)
    if not native:
        if np.issubdtype(arr.dtype, np.integer):
            info = np.iinfo(arr.dtype)
            out = np.clip(np.rint(out), info.min, info.max)
        out = out.astype(arr.dtype)
    return out


def warp_affine(image, mask, points, matrix, *, border_mode: str = "constant", fill_value=0):
    """Applies one 2x3 affine matrix to an image (linear), mask (nearest) and points.

    The output has the input's size. Pixels mapped from outside the input are filled by
    ``border_mode``: "constant" (the image gets ``fill_value``, the mask 0), "nearest"
    (the edge pixel is repeated, ``aaa|abcd|ddd``), "reflect" (mirrored with the edge
    pixel repeated, ``cba|abcd|dcb``) or "wrap" (periodic, ``bcd|abcd|abc``), the
    patterns of Keras' ``fill_mode``; the mask follows the same mode except in
    "constant", where it is always 0.

    Args:
      image: (H, W, C) or (H, W) image; uint8, int16, float32 and other numeric dtypes.
      mask: (H, W, 1) uint8 mask, or None.
      points: None or (N, 2) float32 (x, y) keypoints.
      matrix: 2x3 affine map from input to output pixel coordinates.
      border_mode: one of "constant", "nearest", "reflect", "wrap".
      fill_value: image value outside the input in "constant" mode (e.g. -1024 HU for
        air in a CT slice).

    Returns:
      Tuple (image, mask, points) with the same shapes and dtypes (None stays None).

    Raises:
      ValueError: for an unknown ``border_mode`` or a mask of another height/width.
    """
    if border_mode not in BORDER_MODES:
        raise ValueError(f"border_mode={border_mode!r} is not one of {sorted(BORDER_MODES)}")
    border = BORDER_MODES[border_mode]
    image = np.asarray(image)
    h, w = image.shape[:2]
    m = np.asarray(matrix, np.float64)

    out_image = _warp(image, m, cv2.INTER_LINEAR, border, fill_value)
    out_mask = None
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape[:2] != (h, w):
            raise ValueError(f"mask shape {mask.shape} does not match image {image.shape}")
        out_mask = _warp(mask, m, cv2.INTER_NEAREST, border, 0)
    return out_image, out_mask, _transform_points(_as_points(points), m)


def random_affine(
    image,
    mask,
    points,
    rng: np.random.Generator,
    *,
    flip_prob: float = 0.5,
    max_rotate_deg: float = 15.0,
    scale_range=(0.9, 1.1),
    max_shift_frac: float = 0.05,
    border_mode: str = "constant",
    fill_value=0,
):
    """Random flip + rotation + scale + shift, applied as ONE affine warp to all inputs.

    Draws, in this order and always all of them: flip (``rng.random() < flip_prob``),
    angle ~ U(-max_rotate_deg, max_rotate_deg), scale ~ U(*scale_range),
    (dx, dy) ~ U(-1, 1)**2 times ``max_shift_frac * (W, H)``; the matrix is
    `affine_matrix` of these. Keypoint labels are not swapped on a flip.

    Args:
      image: (H, W, 1) uint8 image.
      mask: (H, W, 1) uint8 mask, or None.
      points: None or (N, 2) float32 (x, y) keypoints.
      rng: numpy random generator (advanced by 5 draws).
      flip_prob: probability of a horizontal flip.
      max_rotate_deg: largest absolute rotation in degrees.
      scale_range: (low, high) zoom factors.
      max_shift_frac: largest shift as a fraction of width (x) and height (y).
      border_mode: how pixels from outside the input are filled, see `warp_affine`.
      fill_value: image value outside the input in "constant" mode.

    Returns:
      Tuple (image, mask, points) as from `warp_affine`.
    """
    image = np.asarray(image)
    h, w = image.shape[:2]
    flip = bool(rng.random() < flip_prob)
    angle = float(rng.uniform(-max_rotate_deg, max_rotate_deg))
    scale = float(rng.uniform(scale_range[0], scale_range[1]))
    u, v = rng.uniform(-1.0, 1.0, size=2)
    shift = (float(u) * max_shift_frac * w, float(v) * max_shift_frac * h)
    matrix = affine_matrix(image.shape, flip=flip, angle_deg=angle, scale=scale, shift=shift)
    return warp_affine(image, mask, points, matrix, border_mode=border_mode, fill_value=fill_value)


def random_brightness_contrast(
    image,
    rng: np.random.Generator,
    *,
    max_brightness: float = 0.1,
    contrast_range=(0.9, 1.1),
) -> np.ndarray:
    """Random contrast about the image mean, then a brightness offset; uint8 in/out.

    ``out = clip(round((x - mean) * c + mean + b * 255), 0, 255)`` with
    b ~ U(-max_brightness, max_brightness) drawn first and c ~ U(*contrast_range).

    Args:
      image: uint8 image, e.g. (H, W, 1).
      rng: numpy random generator (advanced by 2 draws).
      max_brightness: largest absolute offset as a fraction of 255.
      contrast_range: (low, high) contrast factors.

    Returns:
      uint8 array of the same shape.
    """
    image = np.asarray(image)
    brightness = float(rng.uniform(-max_brightness, max_brightness))
    contrast = float(rng.uniform(contrast_range[0], contrast_range[1]))
    x = image.astype(np.float32)
    mean = float(x.mean()) if x.size else 0.0
    out = (x - mean) * contrast + mean + brightness * 255.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
