"""Tests for the CT extensions of medjax.input.augment: border modes and fill values, int16
images, shear and anisotropic zoom in `affine_matrix`, and unchanged defaults."""

import math

import numpy as np
import pytest

from medjax.input import augment


def _old_affine_matrix(shape, flip=False, angle_deg=0.0, scale=1.0, shift=(0.0, 0.0)):
    """The matrix `affine_matrix` built before shear and zoom existed, written out."""
    h, w = shape[:2]
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    flip_m = np.eye(3)
    if flip:
        flip_m[0, 0], flip_m[0, 2] = -1.0, w - 1.0
    t = math.radians(angle_deg)
    a, b = scale * math.cos(t), scale * math.sin(t)
    rot = np.array([[a, b, cx - a * cx - b * cy], [-b, a, cy + b * cx - a * cy], [0, 0, 1.0]])
    move = np.eye(3)
    move[0, 2], move[1, 2] = shift
    return (move @ rot @ flip_m)[:2]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"flip": True},
        {"angle_deg": 17.0, "scale": 1.1},
        {"flip": True, "angle_deg": -33.0, "scale": 0.8, "shift": (2.5, -1.25)},
    ],
)
def test_affine_matrix_defaults_unchanged(kwargs):
    """Without shear/zoom (or with their defaults) the matrix is bit-for-bit the old one."""
    shape = (31, 40, 1)
    old = _old_affine_matrix(shape, **kwargs)
    np.testing.assert_array_equal(augment.affine_matrix(shape, **kwargs), old)
    np.testing.assert_array_equal(
        augment.affine_matrix(shape, shear_deg=0.0, zoom=(1.0, 1.0), **kwargs), old
    )


def test_shear_is_the_inverse_of_keras_shear():
    """x' = x + tan(s) y, y' = y / cos(s) about the centre; undoes Keras' [[1, -sin], [0, cos]]."""
    shape = (21, 41)
    cx, cy = 20.0, 10.0
    m = augment.affine_matrix(shape, shear_deg=30.0)
    p = m @ np.array([cx + 3.0, cy + 8.0, 1.0])
    np.testing.assert_allclose(
        p, [cx + 3.0 + 8.0 * math.tan(math.radians(30)), cy + 8.0 / math.cos(math.radians(30))]
    )
    # Keras' output->input shear matrix about the centre composed with ours is the identity.
    s = math.radians(30.0)
    centre, back = np.eye(3), np.eye(3)
    centre[:2, 2], back[:2, 2] = (-cx, -cy), (cx, cy)
    keras = back @ np.array([[1, -math.sin(s), 0], [0, math.cos(s), 0], [0, 0, 1]]) @ centre
    np.testing.assert_allclose(np.vstack([m, [0, 0, 1]]) @ keras, np.eye(3), atol=1e-12)


def test_anisotropic_zoom_about_centre_and_bad_arguments():
    """zoom=(2, 0.5) doubles x offsets from the centre and halves y offsets."""
    m = augment.affine_matrix((11, 21), zoom=(2.0, 0.5))
    np.testing.assert_allclose(m @ [10.0 + 4, 5.0 + 2, 1.0], [10.0 + 8, 5.0 + 1])
    with pytest.raises(ValueError, match="shear_deg"):
        augment.affine_matrix((8, 8), shear_deg=90.0)
    with pytest.raises(ValueError, match="zoom"):
        augment.affine_matrix((8, 8), zoom=(0.0, 1.0))


def _row_image(dtype):
    """A (3, 6, 1) image whose columns are 10, 20, ..., 60 (-1000 offset for int16)."""
    row = np.arange(1, 7) * 10 - (1000 if dtype == np.int16 else 0)
    return np.repeat(row[None, :], 3, axis=0).astype(dtype)[:, :, None]


@pytest.mark.parametrize(
    "mode,expected_cols",
    [
        ("nearest", [0, 0, 0, 1, 2, 3]),  # aaa|abc...
        ("reflect", [1, 0, 0, 1, 2, 3]),  # ba|ab...: edge repeated, as Keras' 'reflect'
        ("wrap", [4, 5, 0, 1, 2, 3]),
    ],
)
def test_border_modes_move_image_and_mask_alike(mode, expected_cols):
    """A shift right by 2: the uncovered columns come from the named border rule, for the
    int16 image and the mask alike."""
    image = _row_image(np.int16)
    mask = (np.arange(6)[None, :, None] % 2 == 0).repeat(3, 0).astype(np.uint8)
    m = augment.affine_matrix(image.shape, shift=(2.0, 0.0))
    out, out_mask, _ = augment.warp_affine(image, mask, None, m, border_mode=mode)
    assert out.dtype == np.int16 and out_mask.dtype == np.uint8
    np.testing.assert_array_equal(out[0, :, 0], image[0, expected_cols, 0])
    np.testing.assert_array_equal(out_mask[0, :, 0], mask[0, expected_cols, 0])


def test_constant_fill_value_for_hu_and_zero_mask():
    """Constant mode fills the image with fill_value (-1024 HU air) and the mask with 0,
    in every channel (cv2 would fill only channel 0 given a plain number)."""
    image = _row_image(np.int16)
    mask = np.ones_like(image, np.uint8)
    m = augment.affine_matrix(image.shape, shift=(2.0, 0.0))
    out, out_mask, _ = augment.warp_affine(image, mask, None, m, fill_value=-1024)
    np.testing.assert_array_equal(out[0, :, 0], [-1024, -1024, -990, -980, -970, -960])
    np.testing.assert_array_equal(out_mask[0, :, 0], [0, 0, 1, 1, 1, 1])
    three = np.full((4, 5, 3), 0.5, np.float32)
    out3, _, _ = augment.warp_affine(three, None, None, m, fill_value=-5.0)
    np.testing.assert_array_equal(out3[:, :2], -5.0)
    six = np.full((4, 5, 6), 0.5, np.float32)
    out6, _, _ = augment.warp_affine(six, None, None, m, fill_value=-5.0)
    assert out6.shape == (4, 5, 6)
    np.testing.assert_array_equal(out6[:, :2], -5.0)
    np.testing.assert_array_equal(out6[:, 2:], 0.5)


def test_int16_is_warped_accurately():
    """int16 output equals the float32 warp rounded (cv2's own int16 path is off by tens)."""
    rng = np.random.default_rng(0)
    image = rng.integers(-1024, 3000, (24, 24, 1)).astype(np.int16)
    m = augment.affine_matrix(image.shape, angle_deg=17.0, scale=1.1)
    out, _, _ = augment.warp_affine(image, None, None, m, border_mode="nearest")
    ref, _, _ = augment.warp_affine(image.astype(np.float32), None, None, m, border_mode="nearest")
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, np.rint(ref).astype(np.int16))


def test_random_affine_same_draws_and_border_passthrough():
    """Defaults reproduce the old call; border_mode reaches the warp; draws are unchanged."""
    image = np.full((16, 16, 1), 200, np.uint8)
    old_out = augment.random_affine(image, None, None, np.random.default_rng(3))[0]
    g = np.random.default_rng(3)
    new_out = augment.random_affine(image, None, None, g, border_mode="constant", fill_value=0)[0]
    np.testing.assert_array_equal(new_out, old_out)
    g_ref = np.random.default_rng(3)
    g_ref.random(5)
    assert g.random() == g_ref.random()  # still exactly 5 draws
    assert (old_out == 0).any()  # rotation/shift exposes the zero border
    near = augment.random_affine(image, None, None, np.random.default_rng(3), border_mode="nearest")
    np.testing.assert_array_equal(near[0], 200)
    with pytest.raises(ValueError, match="border_mode='mirror'"):
        augment.warp_affine(image, None, None, np.eye(2, 3), border_mode="mirror")
