"""Tests for medjax.input.heatmaps: rendering, decoding, stride mapping and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.input import augment, heatmaps


def _random_points(seed=0, batch=3, num_points=2, low=14.0, high=26.0):
    """Random sub-pixel points well inside a 40 x 48 (H x W) map.

    Returns:
      float32 array (batch, num_points, 2).
    """
    rng = np.random.default_rng(seed)
    return rng.uniform(low, high, (batch, num_points, 2)).astype(np.float32)


def test_gaussian_heatmaps_values_and_shape():
    """Channels-last shape, peak 1 on a pixel centre, exact values next to it."""
    points = np.array([[[5.0, 3.0], [np.nan, np.nan]]], np.float32)
    maps = np.asarray(heatmaps.gaussian_heatmaps(points, 8, 10, sigma=2.0))
    assert maps.shape == (1, 8, 10, 2) and maps.dtype == np.float32
    # Point (x=5, y=3) is the centre of pixel [row 3, col 5].
    assert maps[0, 3, 5, 0] == pytest.approx(1.0)
    assert np.unravel_index(np.argmax(maps[0, :, :, 0]), (8, 10)) == (3, 5)
    # One pixel right: exp(-1 / (2 * 4)) = exp(-0.125) = 0.8824969.
    assert maps[0, 3, 6, 0] == pytest.approx(0.8824969, rel=1e-6)
    # Two down, one left: exp(-(4 + 1) / 8) = exp(-0.625) = 0.5352614.
    assert maps[0, 5, 4, 0] == pytest.approx(0.5352614, rel=1e-6)
    # A missing keypoint renders as zeros.
    assert np.all(maps[..., 1] == 0.0)


def test_soft_argmax_recovers_subpixel_points():
    """Log-Gaussian logits decode to the point; so do the Gaussians themselves at a high
    beta when sigma is wide enough for the sharpened peak to span several pixels."""
    points = _random_points()
    maps = heatmaps.gaussian_heatmaps(points, 40, 48, sigma=2.0)
    decoded = heatmaps.soft_argmax(jnp.log(jnp.maximum(maps, 1e-30)))
    assert decoded.shape == (3, 2, 2)
    np.testing.assert_allclose(np.asarray(decoded), points, atol=0.05)
    # Near the peak beta * g ~ beta * (1 - d**2 / (2 sigma**2)): an effective sigma of
    # 6 / sqrt(30) = 1.1 px, and far pixels weigh exp(-30) relative to the peak.
    wide = heatmaps.gaussian_heatmaps(points, 40, 48, sigma=6.0)
    np.testing.assert_allclose(np.asarray(heatmaps.soft_argmax(wide, beta=30.0)), points, atol=0.05)


def test_soft_argmax_uniform_is_centre():
    """Equal logits give the image centre ((W - 1) / 2, (H - 1) / 2)."""
    decoded = heatmaps.soft_argmax(jnp.zeros((1, 5, 8, 1)))
    np.testing.assert_allclose(np.asarray(decoded), [[[3.5, 2.0]]], atol=1e-6)


def test_argmax_subpixel_recovers_subpixel_points():
    """Gaussian maps decode almost exactly (log fit); shifted below zero (plain quadratic
    fit) they still decode within a quarter pixel."""
    points = _random_points(seed=1)
    maps = heatmaps.gaussian_heatmaps(points, 40, 48, sigma=1.5)
    decoded = jax.jit(heatmaps.argmax_subpixel)(maps)
    assert decoded.shape == (3, 2, 2)
    np.testing.assert_allclose(np.asarray(decoded), points, atol=1e-3)
    shifted = heatmaps.argmax_subpixel(maps - 1.0)
    np.testing.assert_allclose(np.asarray(shifted), points, atol=0.25)


def test_argmax_subpixel_border_and_flat():
    """A peak on the border is not refined along that axis; a flat plateau gives no shift."""
    maps = np.zeros((1, 4, 5, 1), np.float32)
    maps[0, 2, 0, 0] = 1.0
    maps[0, 1, 0, 0] = 0.5  # Above the peak: y moves up by the quadratic fit.
    decoded = np.asarray(heatmaps.argmax_subpixel(maps))
    # x stays 0 (left border). y: values 0.5, 1, 0 -> raw fit (a 0 blocks the log):
    # offset = 0.5 * (0.5 - 0) / (0.5 + 0 - 2) = -1/6.
    np.testing.assert_allclose(decoded, [[[0.0, 2.0 - 1.0 / 6.0]]], atol=1e-6)
    flat = np.asarray(heatmaps.argmax_subpixel(np.ones((1, 3, 3, 1), np.float32)))
    np.testing.assert_allclose(flat, [[[0.0, 0.0]]])


def test_stride_mapping():
    """Stride 4: input (5.5, 9.5) is heatmap pixel (1, 2); decoders map back."""
    np.testing.assert_allclose(
        np.asarray(heatmaps.to_heatmap_xy(np.array([5.5, 9.5]), stride=4)), [1.0, 2.0]
    )
    np.testing.assert_allclose(
        np.asarray(heatmaps.to_input_xy(np.array([1.0, 2.0]), stride=4)), [5.5, 9.5]
    )
    points = np.array([[[5.5, 9.5]]], np.float32)
    maps = np.asarray(heatmaps.gaussian_heatmaps(points, 16, 16, sigma=1.0, stride=4))
    assert maps[0, 2, 1, 0] == pytest.approx(1.0)
    np.testing.assert_allclose(np.asarray(heatmaps.argmax_subpixel(maps, stride=4)), points)
    # Sub-pixel points survive the round trip through a 1/4-resolution map.
    points = _random_points(seed=2, low=20.0, high=44.0)
    maps = heatmaps.gaussian_heatmaps(points, 16, 16, sigma=1.5, stride=4)
    np.testing.assert_allclose(
        np.asarray(heatmaps.argmax_subpixel(maps, stride=4)), points, atol=4e-3
    )
    np.testing.assert_allclose(
        np.asarray(heatmaps.soft_argmax(jnp.log(jnp.maximum(maps, 1e-30)), stride=4)),
        points,
        atol=0.05,
    )


def test_stride_matches_letterbox_resampling():
    """Downscaling a 64 px image to 16 px with `augment.letterbox` moves points exactly as
    `to_heatmap_xy` with stride 4 does."""
    points = np.array([[0.0, 0.0], [10.3, 50.2], [63.0, 31.5]], np.float32)
    image = np.zeros((64, 64, 1), np.uint8)
    _, _, moved, scale = augment.letterbox(image, None, points, 16)
    assert scale == 0.25
    np.testing.assert_allclose(
        np.asarray(heatmaps.to_heatmap_xy(points, stride=4)), moved, atol=1e-6
    )


def test_gradients_are_finite():
    """soft_argmax and gaussian_heatmaps have finite gradients, even for large logits and
    missing points."""
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(2, 6, 7, 3)) * 1e3, jnp.float32)

    def loss_from_logits(x):
        return jnp.sum(heatmaps.soft_argmax(x, beta=2.0, stride=4) ** 2)

    grad = jax.jit(jax.grad(loss_from_logits))(logits)
    assert grad.shape == logits.shape and bool(jnp.all(jnp.isfinite(grad)))

    points = jnp.array([[[2.3, 3.1], [jnp.nan, 1.0]]], jnp.float32)

    def loss_from_points(p):
        return jnp.sum(heatmaps.gaussian_heatmaps(p, 6, 7, sigma=1.5))

    grad_points = jax.jit(jax.grad(loss_from_points))(points)
    assert bool(jnp.all(jnp.isfinite(grad_points)))
    assert float(jnp.abs(grad_points[0, 0]).sum()) > 0.0
