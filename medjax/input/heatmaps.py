"""Keypoint heatmaps: Gaussian training targets and decoding back to (x, y) coordinates.

Pure, jit-able `jax.numpy`. Heatmaps are channels-last, (B, H, W, K) for K keypoints;
points are (B, K, 2) arrays of (x, y).

Coordinates follow `medjax.input.augment`: pixel CENTRES are at integer coordinates, so
heatmap pixel [r, c] is centred at (x=c, y=r). A heatmap may be coarser than the network
input by an integer or float ``stride`` (e.g. 4 for a 1/4-resolution head); heatmap pixel
c then covers input pixels [c * stride, (c + 1) * stride), so

    x_input = (x_heatmap + 0.5) * stride - 0.5      (likewise for y),

see `to_input_xy` / `to_heatmap_xy`. Every function here takes points in, or returns
points in, INPUT pixels; ``sigma`` is in heatmap pixels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "to_heatmap_xy",
    "to_input_xy",
    "gaussian_heatmaps",
    "soft_argmax",
    "argmax_subpixel",
]


def to_heatmap_xy(points_xy, stride: float = 1) -> jnp.ndarray:
    """Maps (x, y) in input pixels to heatmap pixels: (x + 0.5) / stride - 0.5.

    Args:
      points_xy: (..., 2) coordinates in input pixels.
      stride: input pixels per heatmap pixel.

    Returns:
      float32 array of the same shape, in heatmap pixels.
    """
    return (jnp.asarray(points_xy, jnp.float32) + 0.5) / stride - 0.5


def to_input_xy(points_xy, stride: float = 1) -> jnp.ndarray:
    """Maps (x, y) in heatmap pixels to input pixels: (x + 0.5) * stride - 0.5.

    Args:
      points_xy: (..., 2) coordinates in heatmap pixels.
      stride: input pixels per heatmap pixel.

    Returns:
      float32 array of the same shape, in input pixels.
    """
    return (jnp.asarray(points_xy, jnp.float32) + 0.5) * stride - 0.5


def gaussian_heatmaps(points_xy, height: int, width: int, sigma: float, *, stride: float = 1):
    """Renders one unnormalised Gaussian per keypoint as a training target.

    Each map is exp(-((X - x)**2 + (Y - y)**2) / (2 sigma**2)) over the pixel centres,
    with the continuous peak value 1 at the (sub-pixel) point; a pixel holds exactly 1
    only when the point falls on its centre. A point with a NaN or infinite coordinate
    (a missing keypoint) gives an all-zero map.

    Args:
      points_xy: (B, K, 2) keypoints (x, y) in input pixels.
      height: heatmap height H (heatmap pixels).
      width: heatmap width W (heatmap pixels).
      sigma: Gaussian standard deviation in heatmap pixels.
      stride: input pixels per heatmap pixel.

    Returns:
      float32 array of shape (B, H, W, K) with values in [0, 1].
    """
    points = to_heatmap_xy(points_xy, stride)
    present = jnp.all(jnp.isfinite(points), axis=-1)  # (B, K)
    points = jnp.where(present[..., None], points, 0.0)
    xs = jnp.arange(width, dtype=jnp.float32)
    ys = jnp.arange(height, dtype=jnp.float32)
    scale = -0.5 / (sigma * sigma)
    # The 2-D Gaussian is separable: (B, K, H, 1) * (B, K, 1, W).
    gy = jnp.exp(scale * (ys - points[..., 1:2]) ** 2)[..., :, None]
    gx = jnp.exp(scale * (xs - points[..., 0:1]) ** 2)[..., None, :]
    maps = jnp.where(present[..., None, None], gy * gx, 0.0)
    return jnp.transpose(maps, (0, 2, 3, 1))


def soft_argmax(heatmap_logits, beta: float = 1.0, *, stride: float = 1) -> jnp.ndarray:
    """Expected (x, y) under a spatial softmax of each channel (integral regression).

    Differentiable everywhere, for training keypoints end to end. ``beta`` is an inverse
    temperature: larger values concentrate the softmax on the highest logits. The result
    always lies inside the image, and a distribution cut by the border is biased inwards.

    Args:
      heatmap_logits: (B, H, W, K) unnormalised log-probabilities.
      beta: inverse temperature multiplying the logits before the softmax.
      stride: input pixels per heatmap pixel.

    Returns:
      float32 array (B, K, 2) of (x, y) in input pixels.
    """
    logits = jnp.asarray(heatmap_logits, jnp.float32)
    b, h, w, k = logits.shape
    probs = jax.nn.softmax(beta * logits.reshape(b, h * w, k), axis=1).reshape(b, h, w, k)
    x = jnp.einsum("bhwk,w->bk", probs, jnp.arange(w, dtype=jnp.float32))
    y = jnp.einsum("bhwk,h->bk", probs, jnp.arange(h, dtype=jnp.float32))
    return to_input_xy(jnp.stack([x, y], axis=-1), stride)


def _peak_offset(left, centre, right, has_both) -> jnp.ndarray:
    """Sub-pixel position of the vertex of the parabola through three samples.

    Fits the log of the values when all three are positive (exact for a Gaussian), else
    the values themselves. Because ``centre`` is the maximum the vertex lies within half
    a pixel; a flat triple, or a peak on the border (no two neighbours), gives 0.

    Args:
      left: value at offset -1.
      centre: value at offset 0 (the arg max).
      right: value at offset +1.
      has_both: whether both neighbours exist.

    Returns:
      Offsets in [-0.5, 0.5], same shape as the inputs.
    """
    positive = (left > 0) & (centre > 0) & (right > 0)
    safe = jnp.where(positive, jnp.stack([left, centre, right]), 1.0)
    log_l, log_c, log_r = jnp.log(safe)
    l = jnp.where(positive, log_l, left)
    c = jnp.where(positive, log_c, centre)
    r = jnp.where(positive, log_r, right)
    curvature = l + r - 2.0 * c  # <= 0 since c is the maximum.
    peaked = has_both & (curvature < 0)
    offset = 0.5 * (l - r) / jnp.where(peaked, curvature, -1.0)
    return jnp.where(peaked, offset, 0.0)


def argmax_subpixel(heatmaps, *, stride: float = 1) -> jnp.ndarray:
    """Hard arg max of each channel refined by a local quadratic fit, for inference.

    The peak pixel's offset along x (from its left and right neighbours) and along y
    (from those above and below) is the vertex of the parabola through the three values,
    fitted to their logarithms when all are positive, so a Gaussian peak is located
    exactly. Offsets are within half a pixel; at the image border that axis is not
    refined. Not differentiable in the peak location; train with `soft_argmax` or a
    heatmap loss.

    Args:
      heatmaps: (B, H, W, K) heatmaps or logits (any real values).
      stride: input pixels per heatmap pixel.

    Returns:
      float32 array (B, K, 2) of (x, y) in input pixels.
    """
    maps = jnp.asarray(heatmaps, jnp.float32)
    b, h, w, k = maps.shape
    flat = jnp.transpose(maps, (0, 3, 1, 2)).reshape(b, k, h * w)
    index = jnp.argmax(flat, axis=-1)  # (B, K)
    row, col = index // w, index % w

    def value_at(r, c):
        flat_index = jnp.clip(r, 0, h - 1) * w + jnp.clip(c, 0, w - 1)
        return jnp.take_along_axis(flat, flat_index[..., None], axis=-1)[..., 0]

    centre = value_at(row, col)
    dx = _peak_offset(
        value_at(row, col - 1), centre, value_at(row, col + 1), (col > 0) & (col < w - 1)
    )
    dy = _peak_offset(
        value_at(row - 1, col), centre, value_at(row + 1, col), (row > 0) & (row < h - 1)
    )
    xy = jnp.stack([col + dx, row + dy], axis=-1)
    return to_input_xy(xy, stride)
