"""Tests for medjax.input.mask_degrade: each kind is clearly wrong, shapes and determinism."""

import cv2
import numpy as np
import pytest

from medjax.input import mask_degrade

SHAPE_KINDS = ("erode", "dilate", "shift", "truncate")


def _ellipse_mask(size=96, centre=(48, 50), axes=(25, 14), angle=20):
    """A filled rotated ellipse as an (H, W, 1) uint8 0/1 mask.

    Returns:
      uint8 array (size, size, 1).
    """
    mask = np.zeros((size, size, 1), np.uint8)
    cv2.ellipse(mask, centre, axes, angle, 0, 360, 1, -1)
    return mask


def test_mask_overlap_dice_hand_values():
    """3 and 2 foreground pixels sharing 1: 2 * 1 / 5; both empty: 1."""
    a = np.array([[1, 1, 1, 0]], np.uint8)
    b = np.array([[0, 0, 1, 1]], np.uint8)
    assert mask_degrade.mask_overlap_dice(a, b) == pytest.approx(0.4)
    assert mask_degrade.mask_overlap_dice(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    with pytest.raises(ValueError):
        mask_degrade.mask_overlap_dice(a, b.T)


@pytest.mark.parametrize("kind", SHAPE_KINDS)
@pytest.mark.parametrize("mask", [_ellipse_mask(), _ellipse_mask(40, (20, 18), (5, 4), 0)])
def test_each_kind_is_clearly_wrong(kind, mask):
    """Over several seeds, large and small objects: Dice within (0, 0.85], shape and dtype
    kept, 0/1 values, and the kind's geometry (erosion/truncation inside, dilation
    around, a shift keeps the area)."""
    for seed in range(8):
        out, got_kind = mask_degrade.degrade_mask(mask, np.random.default_rng(seed), kinds=(kind,))
        assert got_kind == kind
        assert out.shape == mask.shape and out.dtype == np.uint8
        assert set(np.unique(out)) <= {0, 1}
        dice = mask_degrade.mask_overlap_dice(out, mask)
        assert 0.0 < dice <= 0.85, (kind, seed, dice)
        if kind in ("erode", "truncate"):
            assert np.all(out <= mask)
        elif kind == "dilate":
            assert np.all(out >= mask)
        else:
            assert out.sum() == mask.sum()  # Far from the border: nothing leaves the frame.


def test_truncate_is_a_straight_cut():
    """Some direction puts every removed pixel beyond every kept one (within half a pixel,
    for the 0.1 degree angle grid); an erosion, which removes a rim, has no such
    direction."""

    def separable(original, degraded):
        rows, cols = np.nonzero(original[:, :, 0])
        removed = degraded[rows, cols, 0] == 0
        angles = np.deg2rad(np.arange(0.0, 360.0, 0.1))
        proj = cols[None, :] * np.cos(angles)[:, None] + rows[None, :] * np.sin(angles)[:, None]
        gap = proj[:, removed].min(axis=1) - proj[:, ~removed].max(axis=1)
        return removed.mean(), gap.max() > -0.5

    mask = _ellipse_mask()
    for seed in range(3):
        out, _ = mask_degrade.degrade_mask(mask, np.random.default_rng(seed), kinds=("truncate",))
        fraction, ok = separable(mask, out)
        assert ok and 0.25 <= fraction <= 0.6
    eroded, _ = mask_degrade.degrade_mask(mask, np.random.default_rng(0), kinds=("erode",))
    assert not separable(mask, eroded)[1]


def test_dice_range_controls_severity():
    """A narrow dice_range lands the Dice just under it."""
    mask = _ellipse_mask()
    for kind in SHAPE_KINDS:
        out, _ = mask_degrade.degrade_mask(
            mask, np.random.default_rng(0), kinds=(kind,), dice_range=(0.7, 0.7)
        )
        assert 0.6 < mask_degrade.mask_overlap_dice(out, mask) <= 0.7


def test_swap_and_kind_choice():
    """swap returns the other mask; without one, swap is never chosen; all kinds occur."""
    mask = _ellipse_mask()
    other = _ellipse_mask(centre=(30, 30), axes=(10, 20), angle=0)
    out, kind = mask_degrade.degrade_mask(
        mask, np.random.default_rng(0), other_mask=other, kinds=("swap",)
    )
    assert kind == "swap" and np.array_equal(out, other)
    seen_without, seen_with = set(), set()
    for seed in range(40):
        seen_without.add(mask_degrade.degrade_mask(mask, np.random.default_rng(seed))[1])
        seen_with.add(
            mask_degrade.degrade_mask(mask, np.random.default_rng(seed), other_mask=other)[1]
        )
    assert seen_without == set(SHAPE_KINDS)
    assert seen_with == set(mask_degrade.KINDS)
    with pytest.raises(ValueError, match="other_mask"):
        mask_degrade.degrade_mask(mask, np.random.default_rng(0), kinds=("swap",))


def test_swap_skips_a_too_similar_mask():
    """An other mask with Dice above dice_range[1] is never swapped in."""
    mask = _ellipse_mask()
    similar = _ellipse_mask(centre=(49, 50))  # One pixel to the right: Dice about 0.97.
    assert mask_degrade.mask_overlap_dice(mask, similar) > 0.85
    kinds = {
        mask_degrade.degrade_mask(mask, np.random.default_rng(s), other_mask=similar)[1]
        for s in range(40)
    }
    assert kinds == set(SHAPE_KINDS)
    out, kind = mask_degrade.degrade_mask(
        mask, np.random.default_rng(0), other_mask=similar, kinds=("swap",)
    )
    assert kind == "none" and np.array_equal(out, mask)


def test_deterministic_given_seed():
    """Same seed, same mask and kind; different seeds differ."""
    mask = _ellipse_mask()
    outputs = [mask_degrade.degrade_mask(mask, np.random.default_rng(s)) for s in (7, 7, 8)]
    assert np.array_equal(outputs[0][0], outputs[1][0]) and outputs[0][1] == outputs[1][1]
    assert not np.array_equal(outputs[0][0], outputs[2][0])


def test_empty_and_two_dimensional_masks():
    """An empty mask comes back unchanged with kind 'none'; (H, W) stays (H, W)."""
    empty = np.zeros((32, 32, 1), np.uint8)
    out, kind = mask_degrade.degrade_mask(empty, np.random.default_rng(0))
    assert kind == "none" and out.shape == empty.shape and not out.any()
    flat = _ellipse_mask()[:, :, 0] * 255  # Non-zero counts as foreground.
    out, kind = mask_degrade.degrade_mask(flat, np.random.default_rng(0), kinds=("dilate",))
    assert out.shape == flat.shape and out.max() == 1 and kind == "dilate"


def test_bad_arguments_raise():
    """Unknown kinds, bad ranges and mismatched shapes are errors."""
    mask = _ellipse_mask()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="kinds"):
        mask_degrade.degrade_mask(mask, rng, kinds=("blur",))
    with pytest.raises(ValueError, match="dice_range"):
        mask_degrade.degrade_mask(mask, rng, dice_range=(0.9, 0.8))
    with pytest.raises(ValueError, match="other_mask"):
        mask_degrade.degrade_mask(mask, rng, other_mask=np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        mask_degrade.degrade_mask(np.zeros((4, 4, 3), np.uint8), rng)
