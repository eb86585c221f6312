"""Tests for medjax.input.transforms: exact op values, joint image/mask geometry, Keras
semantics of RandomAffine, fill modes, dtypes, pickling and the spec parser."""

import math
import pickle

import cv2
import numpy as np
import pytest

from medjax.input import transforms as T


def _example(image, mask=None):
    out = {"image": image, "label": 7}
    if mask is not None:
        out["mask"] = mask
    return out


def _square_scene(size=32, box=(5, 9, 20, 26), dtype=np.float32, low=0.0, high=1.0):
    """An image with a bright axis-aligned block and a mask marking exactly that block.

    Args:
      size: side of the square image.
      box: (top, bottom, left, right) of the block, end exclusive.
      dtype: image dtype.
      low, high: background and block values.

    Returns:
      (image (size, size, 1), mask (size, size, 1) uint8).
    """
    top, bottom, left, right = box
    image = np.full((size, size, 1), low, dtype)
    image[top:bottom, left:right] = high
    mask = np.zeros((size, size, 1), np.uint8)
    mask[top:bottom, left:right] = 1
    return image, mask


# ---------------------------------------------------------------------------------------------
# Deterministic ops: exact values
# ---------------------------------------------------------------------------------------------


def test_resize_exact_values_and_mask_nearest():
    """2x2 -> 4x4 bilinear at pixel centres; 4x4 -> 2x2 is the 2x2 block mean; mask blocks."""
    image = np.array([[0, 4], [8, 12]], np.float32)[:, :, None]
    mask = np.array([[1, 0], [0, 1]], np.uint8)[:, :, None]
    out = T.Resize(4)(_example(image, mask))
    f = np.array([0.0, 0.25, 0.75, 1.0])  # source offsets of the 4 output centres, clamped
    np.testing.assert_allclose(out["image"][:, :, 0], 4 * f[None, :] + 8 * f[:, None])
    np.testing.assert_array_equal(out["mask"][:, :, 0], np.kron(mask[:, :, 0], np.ones((2, 2))))
    assert out["label"] == 7 and out["mask"].dtype == np.uint8

    big = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    small = T.Resize((2, 2))(_example(big))["image"][:, :, 0]
    np.testing.assert_allclose(small, [[2.5, 4.5], [10.5, 12.5]])

    hu = (np.arange(16, dtype=np.int16).reshape(4, 4, 1) * 100) - 1000
    out16 = T.Resize((2, 3))(_example(hu))["image"]
    assert out16.dtype == np.int16 and out16.shape == (2, 3, 1)


def test_center_random_and_content_crops_move_mask_with_image():
    """Crops take the same window of image and mask; the random one is seed-reproducible."""
    image = np.arange(10 * 12, dtype=np.float32).reshape(10, 12, 1)
    mask = (np.arange(10 * 12).reshape(10, 12, 1) % 7).astype(np.uint8)
    out = T.CenterCrop((4, 6))(_example(image, mask))
    np.testing.assert_array_equal(out["image"], image[3:7, 3:9])
    np.testing.assert_array_equal(out["mask"], mask[3:7, 3:9])

    crop = T.RandomCrop(5)
    out = crop(_example(image, mask), np.random.default_rng(4))
    top, left = divmod(int(out["image"][0, 0, 0]), 12)
    np.testing.assert_array_equal(out["image"], image[top : top + 5, left : left + 5])
    np.testing.assert_array_equal(out["mask"], mask[top : top + 5, left : left + 5])
    again = crop(_example(image, mask), np.random.default_rng(4))
    np.testing.assert_array_equal(again["image"], out["image"])
    with pytest.raises(ValueError, match="larger than the image"):
        T.CenterCrop(11)(_example(image))

    hu, head = _square_scene(20, (5, 10, 3, 13), np.int16, -1024, 40)
    out = T.CropToContent(threshold=-500, margin=2)(_example(hu, head))
    assert out["image"].shape == (5 + 4, 10 + 4, 1) and out["image"].dtype == np.int16
    assert out["mask"].sum() == head.sum() and out["mask"][2:-2, 2:-2].all()


def test_window_values_per_channel():
    """brain (40/80) and subdural (80/200): clip((hu - (L - W/2)) / W, 0, 1)."""
    hu = np.array([[-1000, 0, 40, 80, 1000]], np.int16)[:, :, None]
    out = T.Window(("brain", "subdural"))(_example(hu))["image"]
    assert out.shape == (1, 5, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 0], [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(out[0, :, 1], [0, 0.1, 0.3, 0.5, 1])
    np.testing.assert_allclose(
        T.Window("0/100")(_example(hu))["image"][0, :, 0], [0, 0.5, 0.9, 1, 1]
    )
    with pytest.raises(ValueError, match="single-channel"):
        T.Window()(_example(np.zeros((2, 2, 3), np.float32)))


def test_normalize_modes():
    """zscore: mean 0, std 1 (flat image -> 0); minmax: [0, 1]; fixed: (x - m) / s."""
    rng = np.random.default_rng(0)
    x = rng.normal(30.0, 7.0, (16, 16, 2)).astype(np.float32)
    z = T.Normalize("zscore")(_example(x))["image"]
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.std()) - 1) < 1e-5
    zc = T.Normalize("zscore", per_channel=True)(_example(x))["image"]
    np.testing.assert_allclose(zc.std(axis=(0, 1)), [1, 1], atol=1e-5)
    flat = T.Normalize("zscore")(_example(np.full((4, 4, 1), 5.0, np.float32)))["image"]
    np.testing.assert_array_equal(flat, 0.0)
    mm = T.Normalize("minmax")(_example(x))["image"]
    assert mm.min() == 0.0 and mm.max() == 1.0
    fixed = T.Normalize("fixed", mean=[10.0, 20.0], std=2.0)(_example(x))["image"]
    np.testing.assert_allclose(fixed[3, 4], (x[3, 4] - [10.0, 20.0]) / 2.0, rtol=1e-6)


def test_contrast_stretch_endpoints():
    """The 2nd percentile maps to 0, the 98th to 1, values between linearly, beyond clipped."""
    x = np.arange(100, dtype=np.float32).reshape(10, 10, 1)
    out = T.ContrastStretch(2, 98)(_example(x))["image"][:, :, 0]
    lo, hi = np.percentile(x, [2, 98])
    assert out.min() == 0.0 and out.max() == 1.0
    assert out.flat[1] == 0.0 and out.flat[98] == 1.0  # 1 < lo = 1.98 and 98 > hi = 97.02
    np.testing.assert_allclose(out.flat[50], (50 - lo) / (hi - lo), rtol=1e-6)


def test_equalize_hist_matches_cv2_and_clahe_raises_contrast():
    """Per channel equalizeHist of round(x * 255); CLAHE widens a low-contrast image."""
    rng = np.random.default_rng(1)
    u8 = rng.integers(90, 140, (24, 24, 2)).astype(np.uint8)
    x = u8.astype(np.float32) / 255.0
    out = T.EqualizeHist()(_example(x))["image"]
    for c in range(2):
        np.testing.assert_array_equal(np.rint(out[:, :, c] * 255), cv2.equalizeHist(u8[:, :, c]))
    np.testing.assert_array_equal(
        T.EqualizeHist()(_example(u8))["image"][:, :, 0], cv2.equalizeHist(u8[:, :, 0])
    )
    smooth = cv2.GaussianBlur(rng.random((64, 64)).astype(np.float32), (0, 0), 3)
    low = (0.45 + 0.1 * (smooth - smooth.min()) / np.ptp(smooth))[:, :, None]
    out = T.Clahe(2.0, 8)(_example(low))["image"]
    assert out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    assert out.std() > 2 * low.std()
    with pytest.raises(ValueError, match="window"):
        T.Clahe()(_example(np.full((8, 8, 1), 40.0, np.float32)))


# ---------------------------------------------------------------------------------------------
# RandomAffine: joint geometry, Keras semantics, fill modes
# ---------------------------------------------------------------------------------------------


def _apply(params, image, mask, **op_kwargs):
    """Warps with one fixed set of Keras parameters through RandomAffine.matrix."""
    from medjax.input import augment

    op = T.RandomAffine(**op_kwargs)
    m = T.RandomAffine.matrix(image.shape, **params)
    out, out_mask, _ = augment.warp_affine(
        image, mask, None, m, border_mode=op.fill_mode, fill_value=op.fill_value
    )
    return out, out_mask


@pytest.mark.parametrize(
    "params,expected",
    [
        ({"flip": True}, lambda a: a[:, ::-1]),
        ({"theta": 90.0}, lambda a: np.rot90(a)),  # counter-clockwise, as Keras
        ({"tx": 3.0, "ty": -2.0}, lambda a: np.roll(np.roll(a, -3, 1), 2, 0)),  # moves by -t
    ],
)
def test_exact_moves_keep_mask_on_image(params, expected):
    """Flip, quarter turn and whole-pixel shifts move image and mask exactly."""
    image, mask = _square_scene()
    out, out_mask = _apply(params, image, mask, fill_mode="constant")
    np.testing.assert_array_equal(out_mask, expected(mask))
    np.testing.assert_allclose(out, expected(image), atol=1e-5)


@pytest.mark.parametrize(
    "params", [{"shear": 20.0}, {"zx": 0.7, "zy": 1.3}, {"theta": 30.0, "shear": -15.0, "zx": 1.2}]
)
def test_shear_and_zoom_keep_mask_on_image(params):
    """Under shear / zoom the thresholded image and the nearest-sampled mask agree up to a
    few boundary pixels, and the block really moved."""
    image, mask = _square_scene()
    out, out_mask = _apply(params, image, mask)
    disagree = np.count_nonzero((out > 0.5) != (out_mask > 0))
    assert disagree <= 0.1 * mask.sum()
    assert np.count_nonzero(out_mask != mask) > 0.1 * mask.sum()


def test_keras_semantics_spot_checks():
    """The matrix inverts Keras' output->input map R T Sh Z about the centre, so a pixel goes
    where Keras' formula sends it; zoom 2 halves distances from the centre."""
    shape = (33, 33)
    c = 16.0
    theta, tx, ty, shear, zx, zy = 25.0, 3.0, -4.0, 12.0, 1.25, 0.8
    th, s = math.radians(theta), math.radians(shear)
    rot = np.array([[math.cos(th), -math.sin(th), 0], [math.sin(th), math.cos(th), 0], [0, 0, 1]])
    shift = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1.0]])
    shear_m = np.array([[1, -math.sin(s), 0], [0, math.cos(s), 0], [0, 0, 1]])
    zoom = np.diag([zx, zy, 1.0])
    offset, reset = np.eye(3), np.eye(3)
    offset[:2, 2], reset[:2, 2] = (c, c), (-c, -c)
    keras = offset @ rot @ shift @ shear_m @ zoom @ reset
    ours = T.RandomAffine.matrix(shape, theta=theta, tx=tx, ty=ty, shear=shear, zx=zx, zy=zy)
    for out_point in [(0.0, 0.0), (20.0, 5.0), (c, c)]:
        in_point = keras @ [*out_point, 1.0]
        np.testing.assert_allclose(ours @ in_point, out_point, atol=1e-9)
    # Shear alone: Keras reads output (x, y) from input (x - sin(s) (y - c), ...): a point
    # 10 px below the centre moves right by 10 tan(s) and down to 10 / cos(s).
    m = T.RandomAffine.matrix(shape, shear=shear)
    np.testing.assert_allclose(m @ [c, c + 10, 1], [c + 10 * math.tan(s), c + 10 / math.cos(s)])
    m = T.RandomAffine.matrix(shape, zx=2.0, zy=2.0)
    np.testing.assert_allclose(m @ [c + 8, c - 4, 1], [c + 4, c - 2])


def test_random_affine_draws_in_keras_order():
    """theta, height shift, width shift, shear, (zx, zy), flip coin: always 7 draws."""
    op = T.RandomAffine(10.0, width_shift=0.1, height_shift=0.2, shear_deg=5.0, zoom=0.25)
    got = op.draw((40, 50, 1), np.random.default_rng(9))
    g = np.random.default_rng(9)
    theta, ty, tx, shear = (g.uniform(-r, r) for r in (10.0, 0.2, 0.1, 5.0))
    zx, zy = g.uniform(0.75, 1.25, size=2)
    flip = g.random() < 0.5
    assert got == pytest.approx(
        dict(theta=theta, tx=tx * 50, ty=ty * 40, shear=shear, zx=zx, zy=zy, flip=flip)
    )
    quiet = T.RandomAffine(horizontal_flip=False)
    g1 = np.random.default_rng(9)
    assert quiet.draw((8, 8), g1)["flip"] is False
    g2 = np.random.default_rng(9)
    g2.random(7)
    assert g1.random() == g2.random()
    assert T.RandomAffine(width_shift=3.0).draw((8, 8), np.random.default_rng(0))["tx"] <= 3.0


def test_random_affine_call_keeps_mask_on_image_and_dtype():
    """Random draws: the warped disc and its mask overlap; int16 HU stays int16."""
    size = 48
    yy, xx = np.mgrid[:size, :size]
    disc = ((xx - 20) ** 2 + (yy - 26) ** 2 <= 81)[:, :, None]
    hu = np.where(disc, 60, -1000).astype(np.int16)
    op = T.RandomAffine(30.0, 0.1, 0.1, 15.0, 0.2, fill_mode="constant", fill_value=-1024)
    for seed in range(3):
        out = op(_example(hu, disc.astype(np.uint8)), np.random.default_rng(seed))
        assert out["image"].dtype == np.int16 and out["mask"].dtype == np.uint8
        inside = out["image"] > -470
        inter = np.count_nonzero(inside & (out["mask"] > 0))
        union = np.count_nonzero(inside | (out["mask"] > 0))
        assert inter / union > 0.9
        assert out["label"] == 7


def test_random_affine_fill_modes():
    """nearest replicates the edge; constant writes fill_value (-1024 HU) into the image."""
    hu, head = _square_scene(16, (0, 16, 0, 16), np.int16, -1024, 40)  # all 40 HU
    shifted = {"tx": 5.0}
    near, near_mask = _apply(shifted, hu, head, fill_mode="nearest")
    np.testing.assert_array_equal(near, 40)
    np.testing.assert_array_equal(near_mask, 1)
    const, const_mask = _apply(shifted, hu, head, fill_mode="constant", fill_value=-1024)
    np.testing.assert_array_equal(const[:, -5:], -1024)
    np.testing.assert_array_equal(const[:, :-5], 40)
    np.testing.assert_array_equal(const_mask[:, -5:], 0)


# ---------------------------------------------------------------------------------------------
# Compose, pickling, specs
# ---------------------------------------------------------------------------------------------


ALL_OPS = [
    T.Resize((8, 10)),
    T.CenterCrop(6),
    T.RandomCrop(5),
    T.CropToContent(-500, 1),
    T.Window(("brain", "40/80")),
    T.Normalize("fixed", mean=1.0, std=2.0),
    T.EqualizeHist(),
    T.Clahe(3.0, (2, 4)),
    T.ContrastStretch(5, 95),
    T.RandomAffine(10, 0.1, 0.1, 5, 0.1, fill_mode="constant", fill_value=-1024),
]


@pytest.mark.parametrize("op", ALL_OPS, ids=lambda op: type(op).__name__)
def test_every_op_pickles_and_behaves_the_same(op):
    """A pickle round trip gives an equal op with identical output."""
    copy = pickle.loads(pickle.dumps(op))
    assert copy == op and repr(copy) == repr(op)
    hu = (np.random.default_rng(0).normal(0, 300, (12, 12, 1))).astype(np.int16)
    example = _example(hu)
    if isinstance(op, (T.EqualizeHist, T.Clahe)):
        example = T.Window("brain")(example)
    args = (np.random.default_rng(5),) if op.random else ()
    copy_args = (np.random.default_rng(5),) if op.random else ()
    np.testing.assert_array_equal(op(example, *args)["image"], copy(example, *copy_args)["image"])


def test_compose_rng_rules_and_deterministic_part():
    """Random ops need an rng (error names the op); deterministic_part drops them."""
    pipe = T.Compose([T.Window("brain"), T.RandomAffine(10.0), T.Resize(8)])
    hu, mask = _square_scene(16, dtype=np.int16, low=-1000, high=40)
    assert pipe.random and not pipe.deterministic_part().random
    with pytest.raises(ValueError, match="RandomAffine"):
        pipe(_example(hu, mask))
    a = pipe(_example(hu, mask), np.random.default_rng(2))
    b = pickle.loads(pickle.dumps(pipe))(_example(hu, mask), np.random.default_rng(2))
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["image"].shape == (8, 8, 1) and a["mask"].shape == (8, 8, 1)
    det = pipe.deterministic_part()
    assert det == T.Compose([T.Window("brain"), T.Resize(8)])
    np.testing.assert_array_equal(
        det(_example(hu, mask))["image"], T.Resize(8)(T.Window("brain")(_example(hu)))["image"]
    )


def test_parse_good_specs():
    """Positional, key=value, bare words, tuples; same ops as built by hand."""
    pipe = T.parse("window(brain,subdural,bone)|resize(128)|clahe(2.0,8)|normalize(zscore)")
    assert pipe == T.Compose(
        [
            T.Window(("brain", "subdural", "bone")),
            T.Resize(128),
            T.Clahe(2.0, 8),
            T.Normalize("zscore"),
        ]
    )
    pipe = T.parse(
        " crop_to_content(margin=4) | window(40/80) | equalize_hist | random_crop((6, 8))"
        " | random_affine(rotation_deg=15, zoom=(0.9, 1.2), fill_mode='constant', fill_value=-1)"
    )
    assert pipe.ops[1].windows == ("40/80",)
    assert isinstance(pipe.ops[2], T.EqualizeHist) and pipe.ops[3].size == (6, 8)
    assert pipe.ops[4] == T.RandomAffine(15, zoom=(0.9, 1.2), fill_mode="constant", fill_value=-1)
    assert len(T.parse("")) == 0


@pytest.mark.parametrize(
    "spec,match",
    [
        ("window(brain)|sharpen(2)", r"Unknown op 'sharpen'.*known ops: center_crop, clahe"),
        ("resize(big)", "op 'resize'"),
        ("normalize(mode=median)", "op 'normalize'"),
        ("window(brian)", "op 'window'"),
        ("random_affine(spin=3)", "op 'random_affine'"),
        ("resize(__import__('os').getcwd())", "resize"),
        ("resize(8)||clahe", "Empty op"),
        ("resize(8", "name\\(arg"),
    ],
)
def test_parse_bad_specs(spec, match):
    """Unknown ops list the known ones; bad arguments name the op; nothing is evaluated."""
    with pytest.raises(ValueError, match=match):
        T.parse(spec)
