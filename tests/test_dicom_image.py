"""Single-image DICOM reading: YBR colour data is converted to RGB once, then to gray."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import convert_color_space
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medjax.preprocess.dicom import read_dicom_image


def test_ybr_full_image_reads_as_its_rgb_luminance(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 50, 10
    rgb[4:, :, 1] = 240
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = convert_color_space(rgb, "RGB", "YBR_FULL").tobytes()
    path = tmp_path / "colour.dcm"
    ds.save_as(path, enforce_file_format=True)
    image, _, _ = read_dicom_image(str(path))
    expected = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    assert np.abs(image.astype(np.float32) - expected).max() <= 2
