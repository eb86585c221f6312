"""CRL quality and keypoint stages learn; the chain measures PNG and DICOM images end to end."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest

from medjax import evaluate, predict, tasks, train
from medjax.clinical import crl as clinical
from medjax.preprocess.dicom import DicomReadError
from medjax.preprocess.image import ImageReadError
from medjax.tasks import crl_chain
from tests.conftest import load_config

COMMON = dict(
    data__synthetic_num=400,  # test and validation splits of ~60 images: AUCs of 30 were noisy
    train__batch_size=16,
    train__warmup_steps=10,
    train__log_every=100,
    eval__batch_size=16,
)
# Each stage has its own input size; the chain letterboxes the original image for each.
STAGE_OVERRIDES = {
    "segment": dict(
        data__image_size=48,
        model__width=8,
        train__steps=300,
        train__eval_every=300,
        train__checkpoint_every=300,
        train__learning_rate=3e-3,
    ),
    # Validation metrics move a lot between checkpoints of this tiny VGG: keep the best of three
    # (by validation loss, the config's choice).
    "quality": dict(
        data__image_size=48,
        model__width=8,
        train__steps=300,
        train__eval_every=100,
        train__checkpoint_every=100,
        train__learning_rate=1e-3,
    ),
    "keypoints": dict(
        data__image_size=64,
        model__width=8,
        model__head_channels=32,
        train__steps=800,
        train__eval_every=800,
        train__checkpoint_every=800,
        train__learning_rate=3e-3,
    ),
}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """One experiment directory with the three stages trained on shared synthetic data."""
    root = tmp_path_factory.mktemp("crl_experiment")
    workdir, data_dir = str(root / "run"), str(root / "data")
    results = {}
    for stage, overrides in STAGE_OVERRIDES.items():
        config = load_config(
            arg=f"stage={stage},smoke", data__data_dir=data_dir, **COMMON, **overrides
        )
        train.train_and_evaluate(config, tasks.run_dir(config, workdir))
        results[stage] = evaluate.evaluate_checkpoint(
            config, tasks.run_dir(config, workdir), checkpoint="best", split="test"
        )
    return workdir, data_dir, results


def _stage_task(stage, data_dir):
    return tasks.get_task(
        load_config(
            arg=f"stage={stage},smoke", data__data_dir=data_dir, **COMMON, **STAGE_OVERRIDES[stage]
        )
    )


def test_keypoints_beat_the_mean_point_predictor(experiment):
    _, data_dir, results = experiment
    task = _stage_task("keypoints", data_dir)
    train_points = np.concatenate(
        [b["points"][b["valid"]] for b, _ in task.eval_batches("train", 16)]
    )
    mean_points = train_points.mean(axis=0)  # The best fixed guess for (crown, rump).
    errors_mm = []
    for batch, _ in task.eval_batches("test", 16):
        valid = batch["valid"]
        err_px = np.linalg.norm(batch["points"][valid] - mean_points, axis=-1).mean(-1)
        errors_mm.append(err_px * batch["pixel_spacing_mm"][valid])
    baseline_mm = float(np.mean(np.concatenate(errors_mm)))
    model_mm = results["keypoints"]["point_error_mm"]
    assert model_mm < 0.6 * baseline_mm, (model_mm, baseline_mm)
    assert results["keypoints"]["pck_5mm"] > 0.3, results["keypoints"]


def test_quality_beats_the_majority_class(experiment):
    """A majority-class (or any constant) classifier has AUC 0.5 and balanced accuracy 0.5."""
    _, _, results = experiment
    quality = results["quality"]
    assert quality["auc"] > 0.75, quality
    assert quality["balanced_accuracy"] > 0.6, quality
    (tn, fp), (fn, tp) = quality["confusion_matrix"]
    assert tn + fp + fn + tp == quality["num_examples"]
    assert tp + fn == quality["num_bad"] > 0


def _test_examples(data_dir, count):
    """The first `count` test images with their true CRL (mm)."""
    source = _stage_task("segment", data_dir).source("test")
    elements = [source[i] for i in range(count)]
    return [
        (e, float(clinical.crl_mm(e["crown"], e["rump"], e["pixel_spacing_mm"]))) for e in elements
    ]


def _write_dicom(path, image, spacing_mm):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality = "US"
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelSpacing = [f"{spacing_mm:.6f}", f"{spacing_mm:.6f}"]
    ds.PixelData = np.ascontiguousarray(image, np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_predict_measures_png_and_dicom(experiment, tmp_path):
    workdir, data_dir, _ = experiment
    # Several scans, as one can be missed by a network this small: most must be measured well.
    examples = _test_examples(data_dir, 5)
    dicoms = []
    for i, (element, _) in enumerate(examples):
        dicoms.append(str(tmp_path / f"scan{i}.dcm"))
        _write_dicom(dicoms[-1], element["image"][..., 0], float(element["pixel_spacing_mm"]))
    png = str(tmp_path / "scan.png")
    cv2.imwrite(png, examples[0][0]["image"][..., 0])
    out = str(tmp_path / "out")
    *dcm_reports, png_report = predict.predict_files(
        workdir, [*dicoms, png], out, pixel_spacing_mm=None
    )
    errors = []
    for (element, truth_mm), dcm_report in zip(examples, dcm_reports):
        # The DICOM carries its spacing; the PNG has none, so CRL is in pixels only.
        assert dcm_report["pixel_spacing_mm"] == pytest.approx(
            float(element["pixel_spacing_mm"]), rel=1e-5
        )
        assert dcm_report["ga_days"]["robinson"]["days"] == pytest.approx(
            clinical.ga_robinson_days(dcm_report["crl_mm"]).days
        )
        errors.append(abs(dcm_report["crl_mm"] - truth_mm) / truth_mm)
    assert np.median(errors) < 0.2, (errors, dcm_reports)
    assert png_report["crl_mm"] is None and any(
        "pixel spacing" in w for w in png_report["warnings"]
    )
    assert png_report["crl_px"] == pytest.approx(dcm_reports[0]["crl_px"], rel=1e-4)
    for stem in ("scan", "scan0"):
        saved = json.load(open(os.path.join(out, f"{stem}.json")))
        assert saved["quality"]["verdict"] in ("good", "bad")
        assert 0.0 <= saved["quality"]["p_bad"] <= 1.0
        assert cv2.imread(os.path.join(out, f"{stem}.png")) is not None


def test_predict_rejects_garbage_with_the_file_named(experiment, tmp_path):
    workdir, _, _ = experiment
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    fake_dicom = tmp_path / "fake.dcm"
    fake_dicom.write_text("not a dicom")
    for path, error in (
        (text, ImageReadError),
        (empty, ImageReadError),
        (fake_dicom, DicomReadError),
    ):
        with pytest.raises(error, match=path.name):
            predict.predict_files(workdir, [str(path)], str(tmp_path / "out"))


def test_missing_stage_names_the_command(experiment, tmp_path):
    workdir, _, _ = experiment
    partial = tmp_path / "partial"
    partial.mkdir()
    os.symlink(os.path.join(workdir, "segment"), partial / "segment")
    with pytest.raises(crl_chain.MissingStageError, match="stage=quality"):
        crl_chain.CrlChain(str(partial))


def test_end_to_end_evaluation_reports_crl_and_ga_errors(experiment):
    workdir, data_dir, results = experiment
    config = load_config(arg="smoke", data__data_dir=data_dir, **COMMON)
    metrics = crl_chain.evaluate_end_to_end(config, workdir, split="test")
    out_dir = os.path.join(workdir, "eval", "test")
    saved = json.load(open(os.path.join(out_dir, "metrics.json")))
    assert saved["num_images"] == results["segment"]["num_examples"]
    # The trivial baseline is the best constant guess: the median of the test split's own
    # CRL (and GA), which no model is told. The chain must beat it clearly on both.
    source = _stage_task("segment", data_dir).source("test")
    crl_true, ga_true = [], []
    for i in range(len(source)):
        element = source[i]
        crl_true.append(
            clinical.crl_mm(element["crown"], element["rump"], element["pixel_spacing_mm"])
        )
        ga_true.append(element["ga_days"])
    crl_true, ga_true = np.array(crl_true, np.float64), np.array(ga_true, np.float64)
    crl_baseline = float(np.mean(np.abs(crl_true - np.median(crl_true))))
    ga_baseline = float(np.mean(np.abs(ga_true - np.median(ga_true))))
    assert saved["crl_abs_error_mean_mm"] < 0.6 * crl_baseline, (saved, crl_baseline)
    assert saved["ga_abs_error_mean_days"] < 0.6 * ga_baseline, (saved, ga_baseline)
    assert saved["crl_error_sd_mm"] > 0 and saved["ga_error_sd_days"] > 0
    assert set(saved["stages"]) == {"segment", "quality", "keypoints"}
    assert saved["stages"]["segment"]["dice"] == pytest.approx(results["segment"]["dice"])
    for name in ("crl", "ga"):
        assert cv2.imread(os.path.join(out_dir, f"bland_altman_{name}.png")) is not None
    assert metrics["crl_bland_altman"]["n"] == saved["num_images"]
