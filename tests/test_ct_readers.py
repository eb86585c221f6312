"""Tests for medjax.preprocess.ct: DICOM/NIfTI/PNG readers in HU, writers, HU windowing."""

import os
import shutil

import cv2
import nibabel as nib
import numpy as np
import pydicom
import pytest

from medjax.preprocess import ct
from medjax.preprocess.dicom import DicomReadError


def _volume(shape=(6, 5, 3), low=-1024, high=2000, seed=0):
    """A non-symmetric integer-valued HU volume."""
    rng = np.random.default_rng(seed)
    return rng.integers(low, high, shape).astype(np.float32)


# --- DICOM slices ------------------------------------------------------------------------------


def test_slope_and_intercept_give_exact_hu(tmp_path):
    hu = np.arange(-1000.0, -1000.0 + 0.5 * 40, 0.5, dtype=np.float32).reshape(5, 8, 1)
    (path,) = ct.write_dicom_series(
        tmp_path, hu, (0.5, 0.7), 3.0, rescale_slope=0.5, rescale_intercept=-1000.0
    )
    ds = pydicom.dcmread(path)
    assert float(ds.RescaleSlope) == 0.5 and float(ds.RescaleIntercept) == -1000.0
    np.testing.assert_array_equal(ds.pixel_array, np.arange(40).reshape(5, 8))
    image = ct.read_dicom_slice(path)
    assert image.hu.dtype == np.float32 and image.hu.shape == (5, 8)
    np.testing.assert_array_equal(image.hu, hu[:, :, 0])
    assert image.pixel_spacing_mm == (0.5, 0.7)
    assert image.slice_spacing_mm == 3.0
    assert image.warnings == []


def test_missing_rescale_in_ct_uses_identity_with_warning(tmp_path):
    (path,) = ct.write_dicom_series(tmp_path, _volume((4, 3, 1), 0, 500), (1, 1), 1.0)
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array.copy()
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.save_as(path)
    image = ct.read_dicom_slice(path)
    np.testing.assert_array_equal(image.hu, stored)
    assert any("without RescaleSlope/RescaleIntercept" in w for w in image.warnings)


def test_window_center_width_multi_single_and_absent(tmp_path):
    hu = _volume((4, 4, 1))
    (multi,) = ct.write_dicom_series(tmp_path / "a", hu, (1, 1), 1, window=((40, 80), (600, 2800)))
    assert isinstance(pydicom.dcmread(multi).WindowCenter, pydicom.multival.MultiValue)
    image = ct.read_dicom_slice(multi)
    assert image.window_centers == (40.0, 600.0)
    assert image.window_widths == (80.0, 2800.0)
    (single,) = ct.write_dicom_series(tmp_path / "b", hu, (1, 1), 1, window=((35, 90),))
    image = ct.read_dicom_slice(single)
    assert (image.window_centers, image.window_widths) == ((35.0,), (90.0,))
    (none,) = ct.write_dicom_series(tmp_path / "c", hu, (1, 1), 1, window=())
    image = ct.read_dicom_slice(none)
    assert (image.window_centers, image.window_widths) == ((), ())


def test_bad_intercept_pattern_is_corrected(tmp_path):
    # Stored unsigned 12-bit values as such scanners write them, with intercept 1.
    stored = np.array([[0, 100, 3095, 3096], [4095, 3072, 2048, 40]], np.float32)[:, :, None]
    (path,) = ct.write_dicom_series(
        tmp_path, stored + 1, (1, 1), 1, bits_stored=12, rescale_intercept=1.0
    )
    ds = pydicom.dcmread(path)
    assert (ds.BitsStored, ds.PixelRepresentation, float(ds.RescaleIntercept)) == (12, 0, 1.0)
    image = ct.read_dicom_slice(path)
    # HU = ((stored + 1000) mod 4096) - 1000: stored 3096..4095 wrap to -1000..-1 HU; 2048..3095
    # stay positive (a two's-complement reading would make 3072 -1024 and 2048 -2048).
    expected = np.array([[0, 100, 3095, -1000], [-1, 3072, 2048, 40]], np.float32)
    np.testing.assert_array_equal(image.hu, expected)
    assert any("bad-intercept" in w for w in image.warnings)


def test_ordinary_12_bit_file_is_not_corrected(tmp_path):
    hu = np.array([[-1024, 0], [3071, 40]], np.float32)[:, :, None]
    (path,) = ct.write_dicom_series(tmp_path, hu, (1, 1), 1, bits_stored=12)
    image = ct.read_dicom_slice(path)
    np.testing.assert_array_equal(image.hu, hu[:, :, 0])
    assert image.warnings == []


@pytest.mark.parametrize("compress", ["rle", "jpeg2000"])
def test_compressed_round_trip_is_exact(tmp_path, compress):
    hu = _volume((32, 33, 2), seed=3)
    paths = ct.write_dicom_series(tmp_path, hu, (0.5, 0.5), 5.0, compress=compress)
    syntax = pydicom.dcmread(paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert syntax.is_compressed
    np.testing.assert_array_equal(ct.read_dicom_series(tmp_path).hu, hu)
    np.testing.assert_array_equal(ct.read_dicom_slice(paths[1]).hu, hu[:, :, 1])


def test_signed_stored_values_round_trip(tmp_path):
    hu = _volume((4, 5, 2), -2000, 2000, seed=4)
    paths = ct.write_dicom_series(tmp_path, hu, (1, 1), 1, rescale_intercept=0.0, compress="rle")
    assert pydicom.dcmread(paths[0]).PixelRepresentation == 1
    np.testing.assert_array_equal(ct.read_dicom_series(tmp_path).hu, hu)


def test_multi_frame_file_is_a_volume(tmp_path):
    hu = _volume((4, 3, 3), seed=5)
    paths = ct.write_dicom_series(tmp_path / "s", hu, (1, 1), 2.0)
    ds = pydicom.dcmread(paths[0])
    ds.NumberOfFrames = 3
    stored = np.stack([pydicom.dcmread(p).pixel_array for p in paths])
    ds.PixelData = stored.tobytes()
    path = tmp_path / "multi.dcm"
    ds.save_as(path)
    image = ct.read_dicom_slice(path)
    np.testing.assert_array_equal(image.hu, hu)
    assert image.slice_spacing_mm == 2.0
    assert any("file order" in w for w in image.warnings)


def test_bad_dicom_files_are_rejected_by_name(tmp_path):
    (good,) = ct.write_dicom_series(tmp_path / "s", _volume((6, 5, 1)), (1, 1), 1)
    data = open(good, "rb").read()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[:-20])
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    text = tmp_path / "notes.dcm"
    text.write_text("not a DICOM file\n" * 20)
    no_pixels = tmp_path / "no_pixels.dcm"
    ds = pydicom.dcmread(good)
    del ds.PixelData
    ds.save_as(no_pixels)
    for path, reason in [
        (truncated, "truncated pixel data"),
        (empty, "empty file"),
        (text, "not a readable DICOM"),
        (no_pixels, "without pixel data"),
    ]:
        with pytest.raises(ct.CtReadError, match=reason) as error:
            ct.read_dicom_slice(path)
        assert str(path) in str(error.value)
        assert isinstance(error.value, DicomReadError)
    with pytest.raises(ct.CtReadError, match="truncated pixel data"):
        ct.read_ct_file(truncated)
    with pytest.raises(ct.CtReadError, match="empty file"):
        ct.read_ct_file(empty)
    with pytest.raises(ct.CtReadError, match="accepted formats: DICOM .*NIfTI.*PNG or JPEG"):
        ct.read_ct_file(text)


# --- read_ct_file dispatch on content ------------------------------------------------------------


def test_png_named_dcm_is_read_as_png(tmp_path):
    gray = np.array([[0, 255, 51], [102, 204, 153]], np.uint8)
    path = tmp_path / "slice.dcm"
    cv2.imwrite(str(tmp_path / "slice.png"), gray)
    os.replace(tmp_path / "slice.png", path)
    image = ct.read_ct_file(path)
    # Brain window 40/80: HU = 0 + gray / 255 * 80.
    np.testing.assert_allclose(image.hu, gray / 255.0 * 80.0, atol=1e-5)
    np.testing.assert_array_equal(ct.window_uint8(image.hu, "brain"), gray)
    assert image.pixel_spacing_mm is None
    assert any("approximate" in w for w in image.warnings)


def test_dicom_named_png_is_read_as_dicom(tmp_path):
    hu = _volume((4, 6, 1))
    (path,) = ct.write_dicom_series(tmp_path, hu, (0.8, 0.9), 1)
    renamed = tmp_path / "photo.png"
    shutil.copy(path, renamed)
    image = ct.read_ct_file(renamed)
    np.testing.assert_array_equal(image.hu, hu[:, :, 0])
    assert image.pixel_spacing_mm == (0.8, 0.9)


def test_nifti_with_one_slice_is_read_as_a_slice(tmp_path):
    hu = _volume((5, 7, 1))
    ct.write_nifti_volume(tmp_path / "one.nii.gz", hu, (1, 1), 2)
    renamed = tmp_path / "upload.bin"
    shutil.copy(tmp_path / "one.nii.gz", renamed)
    image = ct.read_ct_file(renamed)
    np.testing.assert_array_equal(image.hu, hu[:, :, 0])


# --- DICOM series ------------------------------------------------------------------------------


def test_series_sorted_by_position_despite_names_and_instance_numbers(tmp_path):
    hu = _volume((4, 3, 5), seed=7)
    source = tmp_path / "src"
    paths = ct.write_dicom_series(
        source, hu, (0.5, 0.6), 2.5, series_uid="1.2.826.0.1.3680043.8.498.1"
    )
    folder = tmp_path / "series"
    folder.mkdir()
    names = ["e.dcm", "a.dcm", "d.dcm", "b.dcm", "c.dcm"]
    instance_numbers = [3, 5, 1, 2, 4]
    for path, name, number in zip(paths, names, instance_numbers):
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = number
        ds.save_as(folder / name)
    (folder / "README.txt").write_text("series notes")
    image = ct.read_dicom_series(folder)
    np.testing.assert_array_equal(image.hu, hu)
    assert image.slice_spacing_mm == pytest.approx(2.5)
    assert image.pixel_spacing_mm == (0.5, 0.6)
    assert any("README.txt" in w for w in image.warnings)


def test_series_without_positions_falls_back_to_instance_number(tmp_path):
    hu = _volume((3, 3, 3), seed=8)
    paths = ct.write_dicom_series(tmp_path / "src", hu, (1, 1), 4.0)
    folder = tmp_path / "series"
    folder.mkdir()
    for path, name in zip(paths, ["z.dcm", "y.dcm", "x.dcm"]):
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        ds.save_as(folder / name)
    image = ct.read_dicom_series(folder)
    np.testing.assert_array_equal(image.hu, hu)
    assert image.slice_spacing_mm == 4.0
    assert any("sorted by InstanceNumber" in w for w in image.warnings)


def test_mixed_or_empty_series_folders_are_rejected(tmp_path):
    first = ct.write_dicom_series(tmp_path / "a", _volume((4, 4, 2)), (1, 1), 1, series_uid="1.2.3")
    second = ct.write_dicom_series(
        tmp_path / "b", _volume((4, 4, 1)), (1, 1), 1, series_uid="1.2.4"
    )
    shutil.copy(second[0], tmp_path / "a" / "other.dcm")
    with pytest.raises(ct.CtReadError, match=r"2 series .*1\.2\.3: 2 files.*1\.2\.4: 1 files") as e:
        ct.read_dicom_series(tmp_path / "a")
    assert str(tmp_path / "a") in str(e.value)

    ct.write_dicom_series(tmp_path / "c", _volume((5, 4, 1)), (1, 1), 1, series_uid="1.2.3")
    os.remove(tmp_path / "a" / "other.dcm")
    shutil.copy(tmp_path / "c" / "slice_0001.dcm", tmp_path / "a" / "big.dcm")
    with pytest.raises(ct.CtReadError, match="different sizes.*4x4.*5x4"):
        ct.read_dicom_series(tmp_path / "a")

    shutil.copy(first[0], tmp_path / "b" / "copy.dcm")
    os.remove(second[0])
    shutil.copy(first[0], tmp_path / "b" / "copy2.dcm")
    with pytest.raises(ct.CtReadError, match="same position"):
        ct.read_dicom_series(tmp_path / "b")

    (tmp_path / "empty").mkdir()
    with pytest.raises(ct.CtReadError, match="no DICOM file") as e:
        ct.read_dicom_series(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(e.value)


# --- NIfTI -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vol.nii", "vol.nii.gz"])
def test_nifti_round_trip_exact_with_orientation_and_spacing(tmp_path, name):
    hu = _volume((6, 4, 3), seed=9)
    path = tmp_path / name
    ct.write_nifti_volume(path, hu, (0.4, 0.6), 5.0)
    image = ct.read_nifti_volume(path)
    np.testing.assert_array_equal(image.hu, hu)
    assert image.hu.dtype == np.float32
    assert image.pixel_spacing_mm == (0.4, 0.6)
    assert image.slice_spacing_mm == 5.0
    # The stored layout is the CT-ICH one: display = np.rot90(voxels), voxel (c, J-1-r) = (r, c).
    voxels = np.asanyarray(nib.load(path).dataobj)
    assert voxels.shape == (4, 6, 3) and voxels.dtype == np.int16
    assert nib.load(path).header.get_zooms() == pytest.approx((0.6, 0.4, 5.0))
    np.testing.assert_array_equal(voxels[2, 6 - 1 - 1, 0], hu[1, 2, 0])
    np.testing.assert_array_equal(np.rot90(voxels, axes=(0, 1)), hu)


def test_nifti_mask_and_header_scaling(tmp_path):
    mask = (np.arange(24).reshape(4, 3, 2) % 5 == 0).astype(np.float32)
    ct.write_nifti_volume(tmp_path / "mask.nii", mask, (1, 1), 1, dtype=np.uint8)
    np.testing.assert_array_equal(ct.read_nifti_volume(tmp_path / "mask.nii").hu, mask)

    voxels = np.array([[[0], [1]], [[2], [3]]], np.int16)
    image = nib.Nifti1Image(voxels, np.eye(4))
    image.header.set_slope_inter(2.0, -1000.0)
    nib.save(image, tmp_path / "scaled.nii")
    hu = ct.read_nifti_volume(tmp_path / "scaled.nii").hu
    np.testing.assert_array_equal(hu, np.rot90(voxels * 2.0 - 1000.0, axes=(0, 1)))


def test_nifti_errors(tmp_path):
    with pytest.raises(ValueError, match="out.img"):
        ct.write_nifti_volume(tmp_path / "out.img", np.zeros((2, 2, 1)), (1, 1), 1)
    with pytest.raises(ValueError, match="do not fit int16"):
        ct.write_nifti_volume(tmp_path / "v.nii", np.full((2, 2, 1), 40000.0), (1, 1), 1)
    (tmp_path / "bad.nii").write_bytes(b"\x00" * 400)
    with pytest.raises(ct.CtReadError, match="bad.nii: not a NIfTI"):
        ct.read_nifti_volume(tmp_path / "bad.nii")


# --- windowing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ct.WINDOWS))
def test_window_edges_exact(name):
    level, width = ct.WINDOWS[name]
    hu = np.array([level - width / 2 - 1, level - width / 2, level, level + width / 2, 1e4])
    np.testing.assert_array_equal(ct.apply_window(hu, level, width), [0, 0, 0.5, 1, 1])
    assert ct.apply_window(hu, level, width).dtype == np.float32
    np.testing.assert_array_equal(ct.window_uint8(hu, name), [0, 0, 128, 255, 255])
    assert ct.window_uint8(hu, name).dtype == np.uint8
    quarter = ct.apply_window(np.array([level - width / 4]), level, width)
    np.testing.assert_allclose(quarter, [0.25])


def test_window_channels_shape_and_order():
    hu = np.array([[-10.0, 40.0, 100.0], [180.0, 600.0, 3000.0]])
    channels = ct.window_channels(hu)
    assert channels.shape == (2, 3, 3) and channels.dtype == np.float32
    np.testing.assert_array_equal(channels[..., 0], ct.apply_window(hu, 40, 80))
    np.testing.assert_array_equal(channels[..., 1], ct.apply_window(hu, 80, 200))
    np.testing.assert_array_equal(channels[..., 2], ct.apply_window(hu, 600, 2800))
    custom = ct.window_channels(hu, ["bone", "40/80"])
    np.testing.assert_array_equal(custom[..., 0], channels[..., 2])
    np.testing.assert_array_equal(custom[..., 1], channels[..., 0])


def test_parse_window_specs():
    assert ct.parse_window("brain") == (40.0, 80.0)
    assert ct.parse_window(" Subdural ") == (80.0, 200.0)
    assert ct.parse_window("soft_tissue") == (40.0, 380.0)
    assert ct.parse_window("40/80") == (40.0, 80.0)
    assert ct.parse_window("-600/1500") == (-600.0, 1500.0)
    assert ct.parse_window((50, 150)) == (50.0, 150.0)
    for bad, message in [
        ("lung", "'lung'.*brain, subdural, soft_tissue, bone"),
        ("40", "'40'"),
        ("a/b", "'a/b' is not two numbers"),
        ("40/0", "width must be > 0"),
        ((40, -5), "width must be > 0"),
        ((1, 2, 3), r"\(1, 2, 3\)"),
        (None, "None"),
        ("nan/80", "non-finite"),
    ]:
        with pytest.raises(ValueError, match=message):
            ct.parse_window(bad)
