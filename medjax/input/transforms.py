"""Composable CT preprocessing and augmentation ops on example dicts, and a spec parser.

An example is a dict with an ``"image"`` of shape (H, W, C) (Hounsfield units as float32 or
int16, or a windowed float32 image in [0, 1]) and optionally a ``"mask"`` of shape (H, W, 1)
uint8; other keys pass through untouched. Geometric ops move image and mask together (the mask
always with nearest-neighbour sampling, the image linearly); intensity ops touch the image only.

* Deterministic ops are callables ``op(example) -> example``; random ops (``op.random`` is
  True) are ``op(example, rng) -> example`` with a ``np.random.Generator``, and draw the same
  number of values on every call, so a pipeline is reproducible from the generator's state.
* Every op is a small class holding plain values, so ops and `Compose` pickle (grain runs them
  in worker processes). Ops never modify the example they are given.
* `parse` builds a `Compose` from a string, so a config can name a pipeline::

    parse("window(brain,subdural,bone)|resize(128)|clahe(2.0,8)|normalize(zscore)")
    parse("random_affine(rotation_deg=15, width_shift=0.1, zoom=0.1, fill_mode='nearest')")

  Ops are separated by ``|``; each is ``name`` or ``name(args)`` with positional and
  ``key=value`` arguments. Each argument is read with `ast.literal_eval` (numbers, quoted
  strings, tuples, lists, True/False/None); anything else that is a bare word such as
  ``brain``, ``zscore`` or ``40/80`` is taken as a string. Nothing is ever evaluated as code.

The steps of the ICH reference project map to: resize -> `Resize`; crop -> `CenterCrop`,
`RandomCrop`, `CropToContent`; windowing -> `Window`; normalize -> `Normalize`; histogram
equalizer -> `EqualizeHist`, `Clahe`; contrast stretching -> `ContrastStretch`; offline and
online (Keras ``ImageDataGenerator``) augmentation -> `RandomAffine`.
"""

from __future__ import annotations

import ast
import inspect
import math
from typing import Any, Callable, Optional, Sequence

import cv2
import numpy as np

from medjax.input import augment
from medjax.preprocess import ct

__all__ = [
    "Op",
    "Resize",
    "CenterCrop",
    "RandomCrop",
    "CropToContent",
    "Window",
    "Normalize",
    "EqualizeHist",
    "Clahe",
    "ContrastStretch",
    "RandomAffine",
    "Compose",
    "OPS",
    "parse",
]

Example = dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _image(example: Example, op: str) -> np.ndarray:
    """Returns ``example["image"]`` as an (H, W, C) array, with an error naming ``op``."""
    if "image" not in example:
        raise ValueError(f"{op}: the example has no 'image' key (keys: {sorted(example)}).")
    image = np.asarray(example["image"])
    if image.ndim != 3:
        raise ValueError(
            f"{op}: 'image' must have shape (H, W, C), got {image.shape}; add a channel axis "
            "(image[..., None])."
        )
    return image


def _mask(example: Example, image: np.ndarray, op: str) -> Optional[np.ndarray]:
    """Returns ``example["mask"]`` (or None) after checking it matches the image's H and W."""
    mask = example.get("mask")
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape[:2] != image.shape[:2]:
        raise ValueError(
            f"{op}: 'mask' shape {mask.shape} does not match 'image' shape {image.shape}."
        )
    return mask


def _updated(example: Example, image: np.ndarray, mask: Optional[np.ndarray]) -> Example:
    """A shallow copy of ``example`` with a new image and, if given, a new mask."""
    out = dict(example)
    out["image"] = image
    if mask is not None:
        out["mask"] = mask
    return out


def _size_hw(size, op: str) -> tuple[int, int]:
    """Reads a square int or an (h, w) pair of positive ints."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        pair = (int(size), int(size))
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        pair = tuple(size)
    else:
        raise ValueError(f"{op}: size must be an int or an (h, w) pair, got {size!r}.")
    if not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in pair
    ):
        raise ValueError(f"{op}: size must be positive integers, got {size!r}.")
    return int(pair[0]), int(pair[1])


def _resize(arr: np.ndarray, hw: tuple[int, int], interp: int) -> np.ndarray:
    """cv2.resize to (h, w) keeping dtype and channel axis (see `augment.keep_dtype`)."""
    return augment.keep_dtype(arr, lambda a: cv2.resize(a, (hw[1], hw[0]), interpolation=interp))


def _crop(example: Example, top: int, left: int, hw: tuple[int, int], op: str) -> Example:
    """Crops image and mask to rows [top, top + h) and columns [left, left + w)."""
    image = _image(example, op)
    mask = _mask(example, image, op)
    rows, cols = slice(top, top + hw[0]), slice(left, left + hw[1])
    return _updated(
        example,
        np.ascontiguousarray(image[rows, cols]),
        None if mask is None else np.ascontiguousarray(mask[rows, cols]),
    )


def _check_crop_fits(image: np.ndarray, hw: tuple[int, int], op: str) -> None:
    if hw[0] > image.shape[0] or hw[1] > image.shape[1]:
        raise ValueError(
            f"{op}: crop size {hw} is larger than the image {image.shape[:2]}; resize first "
            "(e.g. 'resize(...)|...') or choose a smaller crop."
        )


def _unit_to_uint8(image: np.ndarray, op: str) -> np.ndarray:
    """A float image in [0, 1] as uint8 (round(x * 255)); uint8 passes through."""
    if image.dtype == np.uint8:
        return image
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(
            f"{op}: expects a windowed float image in [0, 1] or a uint8 image, got dtype "
            f"{image.dtype}; put window(...) before it."
        )
    lo, hi = (float(image.min()), float(image.max())) if image.size else (0.0, 0.0)
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(
            f"{op}: expects a windowed image in [0, 1], got values in [{lo:g}, {hi:g}]; put "
            "window(...) (or contrast_stretch) before it."
        )
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _per_channel_uint8(image: np.ndarray, fn: Callable[[np.ndarray], np.ndarray], op: str):
    """Applies a uint8 (H, W) -> (H, W) function to each channel; float [0, 1] in and out."""
    as_uint8 = _unit_to_uint8(image, op)
    out = np.stack([fn(np.ascontiguousarray(as_uint8[:, :, c])) for c in range(image.shape[2])], -1)
    if image.dtype == np.uint8:
        return out
    return out.astype(np.float32) / np.float32(255.0)


# ----------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------


class Op:
    """Base of all ops: ``random`` says whether ``__call__`` takes an rng.

    Subclasses store their constructor arguments as plain attributes, so they pickle, and
    `__repr__` shows them in spec-like form.
    """

    random = False

    def _args(self) -> dict:
        params = inspect.signature(type(self).__init__).parameters
        return {k: getattr(self, k) for k in params if k != "self" and hasattr(self, k)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._args().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self._args() == other._args()

    def __hash__(self) -> int:
        return hash((type(self).__name__, repr(self)))


class Resize(Op):
    """Resizes image and mask to ``size``: the image with area averaging when shrinking
    (``cv2.INTER_AREA``) and bilinear otherwise, the mask with nearest-neighbour sampling at
    pixel centres (``cv2.INTER_NEAREST_EXACT``). dtype is kept (int16 is resized as float32 and
    rounded back).

    Args:
      size: side of a square output, or (h, w).
    """

    def __init__(self, size):
        self.size = size
        self._hw = _size_hw(size, "resize")

    def __call__(self, example: Example) -> Example:
        image = _image(example, "resize")
        mask = _mask(example, image, "resize")
        h, w = image.shape[:2]
        shrink = self._hw[0] <= h and self._hw[1] <= w
        out = _resize(image, self._hw, cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        if mask is not None:
            mask = _resize(mask, self._hw, cv2.INTER_NEAREST_EXACT)
        return _updated(example, out, mask)


class CenterCrop(Op):
    """Crops the central ``size`` region of image and mask (an odd surplus puts the extra
    pixel at the bottom / right).

    Args:
      size: side of a square crop, or (h, w); must fit inside the image.
    """

    def __init__(self, size):
        self.size = size
        self._hw = _size_hw(size, "center_crop")

    def __call__(self, example: Example) -> Example:
        image = _image(example, "center_crop")
        _check_crop_fits(image, self._hw, "center_crop")
        top = (image.shape[0] - self._hw[0]) // 2
        left = (image.shape[1] - self._hw[1]) // 2
        return _crop(example, top, left, self._hw, "center_crop")


class RandomCrop(Op):
    """Crops a ``size`` region at a uniformly random position of image and mask.

    Draws two integers on every call: ``top ~ U{0..H-h}``, then ``left ~ U{0..W-w}``.
    For evaluation use `CenterCrop` of the same size.

    Args:
      size: side of a square crop, or (h, w); must fit inside the image.
    """

    random = True

    def __init__(self, size):
        self.size = size
        self._hw = _size_hw(size, "random_crop")

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        image = _image(example, "random_crop")
        _check_crop_fits(image, self._hw, "random_crop")
        top = int(rng.integers(0, image.shape[0] - self._hw[0] + 1))
        left = int(rng.integers(0, image.shape[1] - self._hw[1] + 1))
        return _crop(example, top, left, self._hw, "random_crop")


class CropToContent(Op):
    """Crops image and mask to the bounding box of pixels above ``threshold`` (the head in a
    CT slice: air is about -1000 HU), widened by ``margin`` pixels on each side and clipped
    to the image. Channel 0 is thresholded, in the image's own units, so put it before
    `Window`. An image with no pixel above the threshold is returned unchanged. The output
    size varies: follow it with `Resize`.

    Args:
      threshold: intensity above which a pixel counts as content (default -500 HU).
      margin: pixels kept around the box on each side.
    """

    def __init__(self, threshold: float = -500.0, margin: int = 0):
        if not isinstance(margin, (int, np.integer)) or isinstance(margin, bool) or margin < 0:
            raise ValueError(f"crop_to_content: margin must be an int >= 0, got {margin!r}.")
        self.threshold, self.margin = float(threshold), int(margin)

    def __call__(self, example: Example) -> Example:
        image = _image(example, "crop_to_content")
        rows = np.flatnonzero((image[:, :, 0] > self.threshold).any(axis=1))
        cols = np.flatnonzero((image[:, :, 0] > self.threshold).any(axis=0))
        if rows.size == 0:
            return dict(example)
        top = max(0, int(rows[0]) - self.margin)
        left = max(0, int(cols[0]) - self.margin)
        bottom = min(image.shape[0], int(rows[-1]) + 1 + self.margin)
        right = min(image.shape[1], int(cols[-1]) + 1 + self.margin)
        return _crop(example, top, left, (bottom - top, right - left), "crop_to_content")


class Window(Op):
    """Maps a single-channel HU image to float32 [0, 1] channels, one per window, with
    `medjax.preprocess.ct.window_channels`: ``clip((hu - (level - width / 2)) / width, 0, 1)``.

    Args:
      windows: a window or a sequence of them; each a name from
        `medjax.preprocess.ct.WINDOWS` ("brain", "subdural", "soft_tissue", "bone") or a
        "level/width" string such as "40/80" (see `medjax.preprocess.ct.parse_window`).
    """

    def __init__(self, windows=("brain",)):
        if isinstance(windows, str):
            windows = (windows,)
        windows = tuple(windows)
        if not windows:
            raise ValueError("window: give at least one window, e.g. window(brain).")
        for spec in windows:
            ct.parse_window(spec)  # fails early, naming a bad window
        self.windows = windows

    def __call__(self, example: Example) -> Example:
        image = _image(example, "window")
        if image.shape[2] != 1:
            raise ValueError(
                f"window: expects a single-channel HU image, got {image.shape[2]} channels "
                f"(shape {image.shape}); is it already windowed?"
            )
        return _updated(example, ct.window_channels(image[:, :, 0], self.windows), None)


_NORMALIZE_MODES = ("zscore", "minmax", "fixed")


class Normalize(Op):
    """Normalises the image intensities; float32 out.

    * ``"zscore"``: ``(x - mean(x)) / max(std(x), eps)`` over the image (all channels, or
      each channel when ``per_channel``); a flat image becomes 0.
    * ``"minmax"``: ``(x - min) / (max - min)`` into [0, 1]; a flat image becomes 0.
    * ``"fixed"``: ``(x - mean) / std`` with the given ``mean`` and ``std`` (scalars, or one
      value per channel), e.g. statistics of the training set.

    Args:
      mode: "zscore", "minmax" or "fixed".
      mean: for "fixed": value(s) subtracted.
      std: for "fixed": value(s) divided by, > 0.
      per_channel: for "zscore" and "minmax": statistics per channel instead of per image.
      eps: smallest std used by "zscore".
    """

    def __init__(
        self,
        mode: str = "zscore",
        mean=0.0,
        std=1.0,
        per_channel: bool = False,
        eps: float = 1e-6,
    ):
        if mode not in _NORMALIZE_MODES:
            raise ValueError(f"normalize: mode={mode!r} is not one of {list(_NORMALIZE_MODES)}.")
        if np.any(np.asarray(std, np.float64) <= 0):
            raise ValueError(f"normalize: std must be > 0, got {std!r}.")
        self.mode, self.mean, self.std = mode, mean, std
        self.per_channel, self.eps = bool(per_channel), float(eps)

    def __call__(self, example: Example) -> Example:
        x = _image(example, "normalize").astype(np.float32)
        if self.mode == "fixed":
            mean = np.asarray(self.mean, np.float32)
            std = np.asarray(self.std, np.float32)
            if mean.size not in (1, x.shape[2]) or std.size not in (1, x.shape[2]):
                raise ValueError(
                    f"normalize: mean={self.mean!r} / std={self.std!r} must be scalars or have "
                    f"one value per channel ({x.shape[2]})."
                )
            return _updated(example, ((x - mean) / std).astype(np.float32), None)
        axes = (0, 1) if self.per_channel else None
        if self.mode == "zscore":
            mean = x.mean(axis=axes, keepdims=True, dtype=np.float64)
            std = x.std(axis=axes, keepdims=True, dtype=np.float64)
            out = (x - mean) / np.maximum(std, self.eps)
        else:
            lo = x.min(axis=axes, keepdims=True)
            span = x.max(axis=axes, keepdims=True) - lo
            out = np.where(span > 0, (x - lo) / np.where(span > 0, span, 1), 0.0)
        return _updated(example, out.astype(np.float32), None)


class EqualizeHist(Op):
    """Global histogram equalisation of each channel with ``cv2.equalizeHist``.

    A float image in [0, 1] is quantised to uint8 (``round(x * 255)``), equalised and mapped
    back to float32 [0, 1]; a uint8 image stays uint8. Other ranges (raw HU) are an error:
    window first.
    """

    def __call__(self, example: Example) -> Example:
        image = _image(example, "equalize_hist")
        return _updated(example, _per_channel_uint8(image, cv2.equalizeHist, "equalize_hist"), None)


class Clahe(Op):
    """Contrast-limited adaptive histogram equalisation (``cv2.createCLAHE``) per channel,
    with the same [0, 1] <-> uint8 conversion as `EqualizeHist`.

    Args:
      clip_limit: contrast limit (cv2 ``clipLimit``; higher is stronger).
      tile_grid: tiles per side (int) or (rows, cols) of tiles.
    """

    def __init__(self, clip_limit: float = 2.0, tile_grid=8):
        if not clip_limit > 0:
            raise ValueError(f"clahe: clip_limit must be > 0, got {clip_limit!r}.")
        self.clip_limit, self.tile_grid = float(clip_limit), tile_grid
        self._grid = _size_hw(tile_grid, "clahe")

    def __call__(self, example: Example) -> Example:
        image = _image(example, "clahe")
        # cv2's CLAHE object does not pickle, so it is made per call (microseconds).
        clahe = cv2.createCLAHE(clipLimit=self.clip_limit, tileGridSize=self._grid[::-1])
        return _updated(example, _per_channel_uint8(image, clahe.apply, "clahe"), None)


class ContrastStretch(Op):
    """Linear contrast stretch per channel: the ``low_pct`` and ``high_pct`` percentiles of
    the channel map to 0 and 1, values beyond are clipped; float32 out. A channel whose two
    percentiles are equal becomes 0.

    Args:
      low_pct: lower percentile in [0, 100).
      high_pct: upper percentile in (low_pct, 100].
    """

    def __init__(self, low_pct: float = 2.0, high_pct: float = 98.0):
        if not 0 <= low_pct < high_pct <= 100:
            raise ValueError(
                f"contrast_stretch: need 0 <= low_pct < high_pct <= 100, got {low_pct!r}, "
                f"{high_pct!r}."
            )
        self.low_pct, self.high_pct = float(low_pct), float(high_pct)

    def __call__(self, example: Example) -> Example:
        x = _image(example, "contrast_stretch").astype(np.float32)
        lo, hi = np.percentile(x, [self.low_pct, self.high_pct], axis=(0, 1), keepdims=True)
        span = hi - lo
        out = np.where(span > 0, (x - lo) / np.where(span > 0, span, 1), 0.0)
        return _updated(example, np.clip(out, 0.0, 1.0).astype(np.float32), None)


def _zoom_range(zoom) -> tuple[float, float]:
    """Keras' zoom_range: a float z gives [1 - z, 1 + z], a pair is taken as is."""
    if isinstance(zoom, (int, float)) and not isinstance(zoom, bool):
        lo, hi = 1.0 - float(zoom), 1.0 + float(zoom)
    elif isinstance(zoom, (tuple, list)) and len(zoom) == 2:
        lo, hi = float(zoom[0]), float(zoom[1])
    else:
        raise ValueError(
            f"random_affine: zoom must be a float or a (low, high) pair, got {zoom!r}."
        )
    if not 0 < lo <= hi:
        raise ValueError(f"random_affine: zoom range must satisfy 0 < low <= high, got {(lo, hi)}.")
    return lo, hi


class RandomAffine(Op):
    """Random rotation, shift, shear, zoom and horizontal flip with the semantics of Keras'
    ``ImageDataGenerator`` (``rotation_range``, ``width_shift_range``, ``height_shift_range``,
    ``shear_range``, ``zoom_range``, ``horizontal_flip``, ``fill_mode``, ``cval``), applied as
    ONE warp to image (linear) and mask (nearest).

    Draws, in Keras' order and always all seven values (so the stream does not depend on
    which ranges are zero): ``theta ~ U(-rotation_deg, rotation_deg)``;
    ``ty ~ U(-height_shift, height_shift)``; ``tx ~ U(-width_shift, width_shift)``;
    ``shear ~ U(-shear_deg, shear_deg)``; ``(zx, zy) ~ U(low, high)`` twice (one call of size
    2) with ``(low, high) = (1 - zoom, 1 + zoom)``; then ``u ~ U(0, 1)``, flipped when
    ``horizontal_flip and u < 0.5``. A shift below 1 is a fraction of the width (tx) or height
    (ty), 1 or more is in pixels.

    As in Keras, these define the map from output to input pixels about the image centre,
    ``input = R(theta) T(tx, ty) Sh(shear) Z(zx, zy) output``, and the flip is applied after
    the warp. So a zoom factor above 1 shows MORE of the image (the content shrinks), a shift
    ``tx`` moves the content by ``-tx`` pixels, and positive ``theta`` and ``shear`` turn the
    content counter-clockwise on screen. Differences from Keras: the centre is the true
    centre ((W - 1) / 2, (H - 1) / 2) also for non-square images (Keras swaps H and W there),
    the width shift always moves columns and the height shift rows (the Keras versions that
    build the matrix in (x, y) order apply them the other way round), every value is drawn
    even when its range is 0, the mask uses nearest-neighbour sampling rather than linear, and
    "wrap" is OpenCV's periodic border (see `medjax.input.augment.warp_affine`).

    Args:
      rotation_deg: largest absolute rotation in degrees.
      width_shift: largest horizontal shift, fraction of width if < 1, else pixels.
      height_shift: largest vertical shift, fraction of height if < 1, else pixels.
      shear_deg: largest absolute shear angle in degrees (< 90).
      zoom: float z for the range [1 - z, 1 + z], or a (low, high) pair.
      horizontal_flip: flip left-right with probability 0.5.
      fill_mode: "nearest" (Keras' default), "constant", "reflect" or "wrap".
      fill_value: image value outside the input with "constant" (e.g. -1024 for HU air);
        the mask is filled with 0.
    """

    random = True

    def __init__(
        self,
        rotation_deg: float = 0.0,
        width_shift: float = 0.0,
        height_shift: float = 0.0,
        shear_deg: float = 0.0,
        zoom=0.0,
        horizontal_flip: bool = True,
        fill_mode: str = "nearest",
        fill_value: float = 0.0,
    ):
        for name, value in [
            ("rotation_deg", rotation_deg),
            ("width_shift", width_shift),
            ("height_shift", height_shift),
            ("shear_deg", shear_deg),
        ]:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"random_affine: {name} must be a number >= 0, got {value!r}.")
        if shear_deg >= 90:
            raise ValueError(f"random_affine: shear_deg must be < 90, got {shear_deg!r}.")
        if fill_mode not in augment.BORDER_MODES:
            raise ValueError(
                f"random_affine: fill_mode={fill_mode!r} is not one of "
                f"{sorted(augment.BORDER_MODES)}."
            )
        self.rotation_deg, self.width_shift = float(rotation_deg), float(width_shift)
        self.height_shift, self.shear_deg = float(height_shift), float(shear_deg)
        self.zoom, self.horizontal_flip = zoom, bool(horizontal_flip)
        self.fill_mode, self.fill_value = fill_mode, float(fill_value)
        self._zoom_range = _zoom_range(zoom)

    def draw(self, shape, rng: np.random.Generator) -> dict:
        """Draws one set of Keras parameters for an image of ``shape`` (see the class doc).

        Args:
          shape: image shape; (H, W) = shape[:2] converts fractional shifts to pixels.
          rng: advanced by 7 draws.

        Returns:
          dict with theta, tx, ty (pixels), shear (degrees), zx, zy and flip (bool).
        """
        h, w = shape[:2]
        theta = float(rng.uniform(-self.rotation_deg, self.rotation_deg))
        ty = float(rng.uniform(-self.height_shift, self.height_shift))
        tx = float(rng.uniform(-self.width_shift, self.width_shift))
        shear = float(rng.uniform(-self.shear_deg, self.shear_deg))
        zx, zy = (float(z) for z in rng.uniform(*self._zoom_range, size=2))
        flip = bool(rng.random() < 0.5) and self.horizontal_flip
        if self.height_shift < 1:
            ty *= h
        if self.width_shift < 1:
            tx *= w
        return dict(theta=theta, tx=tx, ty=ty, shear=shear, zx=zx, zy=zy, flip=flip)

    @staticmethod
    def matrix(shape, theta=0.0, tx=0.0, ty=0.0, shear=0.0, zx=1.0, zy=1.0, flip=False):
        """The 2x3 input-to-output matrix of one set of Keras parameters.

        It inverts Keras' output-to-input map: ``Z^-1 Sh^-1 T^-1 R^-1`` about the centre,
        built with `augment.affine_matrix` (rotation, then shear, then zoom ``1 / z``, then the
        shift ``-Z^-1 Sh^-1 t``), followed by the flip.

        Args:
          shape: image shape; (H, W) = shape[:2].
          theta, tx, ty, shear, zx, zy, flip: as returned by `draw`.

        Returns:
          float64 (2, 3) matrix from input (x, y) to output (x, y).
        """
        s = math.radians(shear)
        # Shift after the shear and zoom: the linear part applied to -t.
        shift_x = (-tx - math.tan(s) * ty) / zx
        shift_y = -ty / (math.cos(s) * zy)
        m = augment.affine_matrix(
            shape,
            angle_deg=theta,
            shear_deg=shear,
            zoom=(1.0 / zx, 1.0 / zy),
            shift=(shift_x, shift_y),
        )
        if flip:
            f = np.vstack([augment.affine_matrix(shape, flip=True), [0.0, 0.0, 1.0]])
            m = (f @ np.vstack([m, [0.0, 0.0, 1.0]]))[:2]
        return m

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        image = _image(example, "random_affine")
        mask = _mask(example, image, "random_affine")
        m = self.matrix(image.shape, **self.draw(image.shape, rng))
        out, mask, _ = augment.warp_affine(
            image, mask, None, m, border_mode=self.fill_mode, fill_value=self.fill_value
        )
        return _updated(example, out, mask)


# ----------------------------------------------------------------------------------------------
# Composition and specs
# ----------------------------------------------------------------------------------------------


class Compose:
    """Applies a sequence of ops in order; picklable when its ops are.

    ``compose(example, rng)`` passes ``rng`` to the random ops (those with ``random = True``)
    and calls the others with the example alone. Without an rng, a pipeline that contains a
    random op raises a ValueError naming it: augmentation is never skipped silently. For
    evaluation, `deterministic_part` gives the same pipeline without its random ops (replace
    a `RandomCrop` by a `CenterCrop` yourself if the size matters).

    A Compose works as grain's ``preprocess(example)`` (no random ops) and as its
    ``augment(example, rng)``.

    Args:
      ops: a sequence of ops (callables as described in the module doc).
    """

    def __init__(self, ops: Sequence[Callable]):
        self.ops = tuple(ops)
        for op in self.ops:
            if not callable(op):
                raise ValueError(f"Compose: {op!r} is not callable.")

    @property
    def random(self) -> bool:
        """True when any op is random (then calls need an rng)."""
        return any(getattr(op, "random", False) for op in self.ops)

    def deterministic_part(self) -> "Compose":
        """The same ops without the random ones, in order."""
        return Compose([op for op in self.ops if not getattr(op, "random", False)])

    def __call__(self, example: Example, rng: Optional[np.random.Generator] = None) -> Example:
        for op in self.ops:
            if getattr(op, "random", False):
                if rng is None:
                    raise ValueError(
                        f"{op!r} is random and needs an rng: call the pipeline as "
                        "pipeline(example, np.random.default_rng(...)), or use "
                        "pipeline.deterministic_part() for evaluation."
                    )
                example = op(example, rng)
            else:
                example = op(example)
        return example

    def __len__(self) -> int:
        return len(self.ops)

    def __repr__(self) -> str:
        return f"Compose({list(self.ops)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Compose) and self.ops == other.ops

    __hash__ = None


# Spec names -> op classes. Window gathers its positional arguments into `windows`.
OPS: dict[str, type] = {
    "resize": Resize,
    "center_crop": CenterCrop,
    "random_crop": RandomCrop,
    "crop_to_content": CropToContent,
    "window": Window,
    "normalize": Normalize,
    "equalize_hist": EqualizeHist,
    "clahe": Clahe,
    "contrast_stretch": ContrastStretch,
    "random_affine": RandomAffine,
}
_GATHER_POSITIONAL = {"window": "windows"}


def _split_top(text: str, sep: str) -> list[str]:
    """Splits on ``sep`` outside brackets and quotes."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _literal(token: str, op: str, spec: str) -> Any:
    """A Python literal, or the token itself when it is a bare word (no quotes/brackets)."""
    try:
        return ast.literal_eval(token)
    except (ValueError, SyntaxError):
        if token and not any(ch in token for ch in "'\"()[]{}=,"):
            return token
        raise ValueError(f"{op}: cannot read argument {token!r} in spec {spec!r}.") from None


def _parse_op(text: str, spec: str):
    """Builds one op from ``name`` or ``name(args)``."""
    text = text.strip()
    if "(" in text:
        if not text.endswith(")"):
            raise ValueError(f"op {text!r} in spec {spec!r} must look like name(arg, key=value).")
        name, body = text[: text.index("(")].strip(), text[text.index("(") + 1 : -1].strip()
    else:
        name, body = text, ""
    if name not in OPS:
        raise ValueError(
            f"Unknown op {name!r} in spec {spec!r}; known ops: {', '.join(sorted(OPS))}."
        )
    args, kwargs = [], {}
    for token in _split_top(body, ",") if body else []:
        token = token.strip()
        key, eq, value = token.partition("=")
        if eq and key.strip().isidentifier():
            kwargs[key.strip()] = _literal(value.strip(), name, spec)
        elif kwargs:
            raise ValueError(f"{name}: positional argument {token!r} after key=value in {spec!r}.")
        else:
            args.append(_literal(token, name, spec))
    if name in _GATHER_POSITIONAL and len(args) > 1:
        args = [tuple(args)]
    try:
        return OPS[name](*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"Bad arguments for op {name!r} in spec {spec!r}: {str(e).rstrip('.')}. "
            f"It takes {name}({_signature(OPS[name])})."
        ) from None


def _signature(cls: type) -> str:
    """``a, b=1`` for the constructor of ``cls`` (no annotations, no self)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return ", ".join(
        p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
        for p in params
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    )


def parse(spec: str) -> Compose:
    """Builds a `Compose` from a spec string such as
    ``"window(brain,subdural,bone)|resize(128)|clahe(2.0,8)|normalize(zscore)"``.

    Args:
      spec: ops separated by ``|``; each ``name`` or ``name(args)`` where ``name`` is a key
        of `OPS` and args are positional or ``key=value``, each a Python literal or a bare
        word (read as a string). An empty spec gives an empty pipeline.

    Returns:
      The Compose of the ops in order.

    Raises:
      ValueError: for an unknown op (the message lists the known ones), an argument that
        cannot be read, or arguments the op rejects (the message names the op).
    """
    if not isinstance(spec, str):
        raise ValueError(f"A pipeline spec must be a string, got {spec!r}.")
    if not spec.strip():
        return Compose([])
    parts = _split_top(spec, "|")
    if any(not p.strip() for p in parts):
        raise ValueError(f"Empty op in spec {spec!r} (two '|' in a row, or one at an end).")
    return Compose([_parse_op(p, spec) for p in parts])
