"""Tests for medjax.input.augment: geometry of letterbox / affine on masks and points."""

import numpy as np
import pytest

from medjax.input import augment


def _disc(shape, centre, radius):
    """Draws a filled disc in a zero (H, W, 1) uint8 array.

    Args:
      shape: (H, W).
      centre: (x, y) in pixel-centre coordinates.
      radius: disc radius in pixels.

    Returns:
      (H, W, 1) uint8 array, 1 inside the disc.
    """
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inside = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= radius**2
    return inside.astype(np.uint8)[:, :, None]


def _value_at(arr, point):
    """Reads the pixel nearest to a point.

    Args:
      arr: (H, W, 1) array.
      point: (x, y).

    Returns:
      The value at row round(y), column round(x).
    """
    return arr[int(round(point[1])), int(round(point[0])), 0]


@pytest.mark.parametrize("hw,size", [((20, 30), 64), ((50, 37), 64), ((45, 90), 32)])
def test_letterbox_maps_points_onto_mask(hw, size):
    """Points on marked mask blocks land on marked pixels; shapes, scale, padding right."""
    h, w = hw
    rng = np.random.default_rng(0)
    image = rng.integers(1, 255, (h, w, 1), dtype=np.uint8)
    mask = np.zeros((h, w, 1), np.uint8)
    pts = []
    for x, y in [(2, 3), (w - 4, h - 3), (w // 2, h // 3)]:
        mask[y - 2 : y + 3, x - 2 : x + 3] = 1  # 5x5 block, survives shrinking by 1/2.8
        pts.append((x, y))
    pts = np.array(pts, np.float32)

    out_img, out_mask, out_pts, scale = augment.letterbox(image, mask, pts, size)
    assert out_img.shape == out_mask.shape == (size, size, 1)
    assert out_img.dtype == out_mask.dtype == np.uint8
    assert out_pts.dtype == np.float32 and out_pts.shape == (3, 2)
    assert scale == pytest.approx(size / max(h, w))
    for p in out_pts:
        assert _value_at(out_mask, p) == 1
    # Centred: the padding (zero image rows/cols) is split evenly.
    filled = (
        np.nonzero(out_img[:, :, 0].any(axis=1))[0]
        if h < w
        else np.nonzero(out_img[:, :, 0].any(axis=0))[0]
    )
    short_new = int(round(min(h, w) * scale))
    pad = (size - short_new) // 2
    assert filled[0] == pad and filled[-1] == pad + short_new - 1
    # The image centre maps to the canvas centre.
    _, _, c, _ = augment.letterbox(image, None, [[(w - 1) / 2, (h - 1) / 2]], size)
    np.testing.assert_allclose(c[0], [(size - 1) / 2] * 2, atol=0.5)


def test_letterbox_exact_upscale_and_none_points():
    """Doubling a 2x4 image: x' = 2x + 0.5, y' = 2y + 0.5 + pad; None/empty points pass."""
    image = np.arange(8, dtype=np.uint8).reshape(2, 4, 1)
    out_img, out_mask, pts, scale = augment.letterbox(image, image, [[0, 0], [3, 1]], 8)
    assert scale == 2.0
    np.testing.assert_allclose(pts, [[0.5, 2.5], [6.5, 4.5]])
    # Nearest mask: each source pixel becomes a 2x2 block, rows 2..5 of the canvas.
    np.testing.assert_array_equal(
        out_mask[2:6, :, 0], np.repeat(np.repeat(image[:, :, 0], 2, 0), 2, 1)
    )
    assert (out_mask[:2] == 0).all() and (out_mask[6:] == 0).all()
    assert augment.letterbox(image, None, None, 8)[2] is None
    assert augment.letterbox(image, None, np.zeros((0, 2)), 8)[2].shape == (0, 2)


def test_random_affine_keeps_keypoints_on_their_discs():
    """For many draws the transformed point lies in the transformed disc (mask and image)."""
    shape = (64, 80)
    centres = [(20.3, 15.7), (60.0, 45.2), (41.5, 30.0)]
    mask = np.zeros(shape + (1,), np.uint8)
    for c in centres:
        mask |= _disc(shape, c, 4)
    image = mask * 200
    pts = np.array(centres, np.float32)
    flips = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        out_img, out_mask, out_pts = augment.random_affine(
            image,
            mask,
            pts,
            rng,
            max_rotate_deg=30.0,
            scale_range=(0.8, 1.2),
            max_shift_frac=0.1,
        )
        assert out_img.shape == out_mask.shape == shape + (1,)
        assert out_img.dtype == out_mask.dtype == np.uint8
        assert set(np.unique(out_mask)) <= {0, 1}
        for p in out_pts:
            assert _value_at(out_mask, p) == 1
            assert _value_at(out_img, p) > 150
        # Keypoint labels are not reordered: each point still sits in its own disc.
        flips += out_pts[0, 0] > out_pts[1, 0]
    assert 5 < flips < 35  # flips do happen, roughly half the time


def test_flip_convention():
    """Pure flip: image[:, ::-1] exactly, and x -> W - 1 - x, y unchanged."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (7, 10, 1), dtype=np.uint8)
    mask = (image > 128).astype(np.uint8)
    pts = np.array([[0.0, 0.0], [2.25, 3.5], [9.0, 6.0]], np.float32)
    out_img, out_mask, out_pts = augment.random_affine(
        image,
        mask,
        pts,
        np.random.default_rng(1),
        flip_prob=1.0,
        max_rotate_deg=0.0,
        scale_range=(1.0, 1.0),
        max_shift_frac=0.0,
    )
    np.testing.assert_array_equal(out_img, image[:, ::-1])
    np.testing.assert_array_equal(out_mask, mask[:, ::-1])
    np.testing.assert_allclose(out_pts, [[9.0, 0.0], [6.75, 3.5], [0.0, 6.0]], atol=1e-5)
    # No flip, no motion: identity.
    same = augment.random_affine(
        image,
        mask,
        pts,
        np.random.default_rng(1),
        flip_prob=0.0,
        max_rotate_deg=0.0,
        scale_range=(1.0, 1.0),
        max_shift_frac=0.0,
    )
    np.testing.assert_array_equal(same[0], image)
    np.testing.assert_allclose(same[2], pts, atol=1e-5)


def test_rotation_direction_and_shift():
    """+90 degrees equals np.rot90 (counter-clockwise on screen); shift moves by (dx, dy)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (9, 9, 1), dtype=np.uint8)
    m = augment.affine_matrix(image.shape, angle_deg=90.0)
    out, _, pts = augment.warp_affine(image, None, [[8.0, 0.0]], m)
    np.testing.assert_array_equal(out, np.rot90(image))
    np.testing.assert_allclose(pts, [[0.0, 0.0]], atol=1e-5)  # top-right -> top-left
    m = augment.affine_matrix(image.shape, shift=(2.0, -1.0))
    out, _, pts = augment.warp_affine(image, None, [[3.0, 4.0]], m)
    np.testing.assert_array_equal(out[:8, 2:], image[1:, :7])
    assert (out[:, :2] == 0).all() and (out[8] == 0).all()
    np.testing.assert_allclose(pts, [[5.0, 3.0]], atol=1e-5)


def test_deterministic_for_same_seed():
    """Same generator seed -> identical outputs; different seeds -> different outputs."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 1), dtype=np.uint8)
    mask = (image > 100).astype(np.uint8)
    pts = np.array([[5.0, 7.0]], np.float32)

    def run(seed):
        """Runs both random ops with one generator.

        Args:
          seed: generator seed.

        Returns:
          Tuple (image, mask, points).
        """
        g = np.random.default_rng(seed)
        img, msk, p = augment.random_affine(image, mask, pts, g)
        return augment.random_brightness_contrast(img, g), msk, p

    a, b, c = run(3), run(3), run(4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[2], c[2])


def test_brightness_contrast_dtype_range_and_formula():
    """uint8 in/out, same shape, clipped, and equal to the documented formula."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 1), dtype=np.uint8)
    out = augment.random_brightness_contrast(
        image, np.random.default_rng(5), max_brightness=0.5, contrast_range=(1.5, 2.0)
    )
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert out.min() == 0 and out.max() == 255  # strong contrast saturates both ends
    g = np.random.default_rng(5)
    b, c = g.uniform(-0.5, 0.5), g.uniform(1.5, 2.0)
    x = image.astype(np.float32)
    ref = np.clip(np.rint((x - x.mean()) * c + x.mean() + b * 255), 0, 255)
    np.testing.assert_array_equal(out, ref.astype(np.uint8))
    # Neutral settings leave the image unchanged.
    same = augment.random_brightness_contrast(
        image, np.random.default_rng(0), max_brightness=0.0, contrast_range=(1.0, 1.0)
    )
    np.testing.assert_array_equal(same, image)


def test_unletterbox_inverts_letterbox_for_points_and_masks():
    rng = np.random.default_rng(0)
    h, w, size = 70, 130, 48
    points = rng.uniform([0, 0], [w - 1, h - 1], size=(5, 2)).astype(np.float32)
    mask = np.zeros((h, w, 1), np.uint8)
    mask[20:50, 30:100] = 1
    _, boxed_mask, boxed_points, _ = augment.letterbox(
        np.zeros((h, w, 1), np.uint8), mask, points, size
    )
    np.testing.assert_allclose(
        augment.unletterbox_points(boxed_points, h, w, size), points, atol=1e-4
    )
    restored = augment.unletterbox_mask(boxed_mask, h, w)
    assert restored.shape == (h, w, 1)
    overlap = (
        np.logical_and(restored > 0, mask > 0).sum() / np.logical_or(restored > 0, mask > 0).sum()
    )
    assert overlap > 0.9
