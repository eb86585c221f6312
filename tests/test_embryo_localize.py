"""Tests of embryo localisation and cropping (medjax.preprocess.embryo) on synthetic frames."""

import logging

import cv2
import numpy as np
import pytest
from medjax_datasets.embryo_timelapse import synthetic

from medjax.preprocess import embryo

# (frame size, hours): 1 cell with pronuclei, 2 cells, 8 cells, morula/early blastocyst.
CASES = [(128, 12.0), (128, 30.0), (256, 60.0), (256, 95.0), (500, 30.0), (500, 70.0)]


def jpeg_round_trip(frame: np.ndarray) -> np.ndarray:
    ok, encoded = cv2.imencode(".jpeg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)


def make_frame(size: int, hours: float, seed: int, *, banner: bool = True, **scene_kwargs):
    """(frame after JPEG, scene) of a liveborn embryo at `hours`; the zona is scene.centre,
    scene.radius."""
    rng = np.random.default_rng(seed)
    scene = synthetic.make_scene(rng, size, **scene_kwargs)
    development = synthetic.simulate(rng, "liveborn")
    frame = synthetic.draw_frame(scene, development, hours, rng, banner=banner)
    return jpeg_round_trip(frame), scene


@pytest.fixture(scope="module")
def frames():
    return [make_frame(size, hours, seed) for seed, (size, hours) in enumerate(CASES)]


def assert_found(circle, scene, size):
    error = np.hypot(circle.cx - scene.centre[0], circle.cy - scene.centre[1])
    assert error <= 1.0 + 0.01 * size, (circle, scene.centre, scene.radius)
    assert circle.r == pytest.approx(scene.radius, rel=0.05), (circle, scene.radius)


def test_hough_finds_the_zona(frames):
    for frame, scene in frames:
        circle = embryo.localize_embryo(frame)
        assert circle.method == "hough"
        assert_found(circle, scene, frame.shape[0])


def test_contour_method_finds_the_zona(frames):
    for frame, scene in frames:
        circle = embryo.localize_embryo(frame, methods=("contour",))
        assert circle.method == "contour"
        assert_found(circle, scene, frame.shape[0])


def test_contour_is_the_fallback_when_hough_fails(frames, monkeypatch):
    monkeypatch.setattr(embryo, "_hough", lambda *args: None)
    frame, scene = frames[2]
    circle = embryo.localize_embryo(frame)
    assert circle.method == "contour"
    assert_found(circle, scene, frame.shape[0])


def test_embryo_near_the_well_wall_is_found():
    frame, scene = make_frame(256, 40.0, 11, centre=(70.0, 120.0), radius=44.0)
    assert_found(embryo.localize_embryo(frame), scene, 256)
    assert_found(embryo.localize_embryo(frame, methods=("contour",)), scene, 256)


def test_frame_centre_when_nothing_is_found(caplog):
    rng = np.random.default_rng(0)
    flat = np.clip(150 + rng.normal(0, 3, (120, 160)), 0, 255).astype(np.uint8)
    with caplog.at_level(logging.WARNING, logger=embryo.__name__):
        circle = embryo.localize_embryo(flat)
    assert circle == (79.5, 59.5, embryo.DEFAULT_RADIUS_FRACTION * 120, "centre")
    assert "No embryo found in a 160x120 frame" in caplog.text


def test_unknown_method_and_bad_frames_are_errors():
    frame = np.zeros((64, 64), np.uint8)
    with pytest.raises(ValueError, match="Unknown localisation method"):
        embryo.localize_embryo(frame, methods=("ransac",))
    with pytest.raises(ValueError, match=r"\(H, W\) uint8"):
        embryo.localize_embryo(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(H, W\) uint8"):
        embryo.localize_embryo(np.zeros((64, 64), np.float32))


def test_strip_banner_removes_the_text():
    rng = np.random.default_rng(3)
    scene = synthetic.make_scene(rng, 256)
    development = synthetic.simulate(rng, "liveborn")
    with_text = synthetic.draw_frame(scene, development, 77.7, np.random.default_rng(1))
    plain = synthetic.draw_frame(scene, development, 77.7, np.random.default_rng(1), banner=False)
    stripped = embryo.strip_banner(with_text)
    band = int(embryo.BANNER_BAND * 256)
    rows = np.r_[0:band, 256 - band : 256]
    before = np.abs(with_text[rows].astype(int) - plain[rows])
    after = np.abs(stripped[rows].astype(int) - plain[rows])
    assert (before > 60).sum() > 100  # The text is there...
    assert (after > 60).sum() < 0.05 * (before > 60).sum()  # ...and then gone.
    np.testing.assert_array_equal(stripped[band:-band], with_text[band:-band])
    assert embryo.strip_banner(plain) is plain  # Nothing to strip: the frame itself.


def test_crop_is_centred_on_the_circle():
    frame = np.full((200, 300), 100, np.uint8)
    cv2.circle(frame, (180, 90), 40, 220, -1)
    crop = embryo.crop_embryo(frame, (180.0, 90.0, 40.0), 48, margin=1.25)
    assert crop.shape == (48, 48) and crop.dtype == np.uint8
    ys, xs = np.nonzero(crop > 160)
    assert xs.mean() == pytest.approx(23.5, abs=0.3) and ys.mean() == pytest.approx(23.5, abs=0.3)
    # The disc spans 2 r of the square's 2 r margin.
    assert (crop[24] > 160).sum() == pytest.approx(48 / 1.25, abs=2)
    assert crop[0, 0] == 100 and crop.max() >= 215


def test_crop_leaving_the_frame_repeats_the_edge():
    frame = np.tile(np.arange(100, dtype=np.uint8), (80, 1))  # Gray level = column.
    crop = embryo.crop_embryo(frame, (5.0, 40.0, 20.0), 23, margin=1.0)
    assert crop.shape == (23, 23)
    assert np.all(crop[:, :7] <= 1)  # Columns left of the frame repeat column 0.
    assert crop[11, -1] >= 20
    with pytest.raises(ValueError, match="out_size"):
        embryo.crop_embryo(frame, (5.0, 40.0, 20.0), 0)


def test_video_circle_is_a_median_robust_to_a_bad_frame():
    rng = np.random.default_rng(5)
    scene = synthetic.make_scene(rng, 128)
    development = synthetic.simulate(rng, "miscarriage")
    video = [
        jpeg_round_trip(synthetic.draw_frame(scene, development, h, rng))
        for h in np.linspace(5, 100, 9)
    ]
    video[4] = np.full_like(video[4], 150)  # No embryo in one of the localised frames.
    circle = embryo.localize_video(video, num_frames=5)
    assert circle.method == "hough"
    assert_found(circle, scene, 128)
    crops, used = embryo.crop_video(video, 24)
    assert crops.shape == (9, 24, 24) and crops.dtype == np.uint8
    assert used == circle
