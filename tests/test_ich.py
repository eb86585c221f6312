"""ICH: U-Net and DeepLabv3 learn hemorrhage masks on synthetic CT; splits, reports, compare,
predict on a NIfTI volume, and the web page with a trained model."""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil

import numpy as np
import pytest
from sklearn import metrics as skm

from medjax import compare, evaluate, tasks, train
from medjax.preprocess import ct
from medjax.tasks import ich
from tests.conftest import REPO, load_config

ICH_CONFIG = os.path.join(REPO, "configs", "ich.py")
COMMON = dict(
    data__synthetic_num=18,
    data__preprocess="resize(64)|window(brain,subdural,bone)",
    train__batch_size=16,
    train__warmup_steps=20,
    train__learning_rate=3e-3,
    eval__batch_size=32,
    eval__num_plot=3,
)
MODEL_OVERRIDES = {
    "unet": dict(
        model__width=16,
        model__depth=4,
        train__steps=300,
        train__eval_every=150,
        train__checkpoint_every=150,
    ),
    "deeplabv3": dict(
        model__width=8,
        model__aspp_channels=16,
        model__decoder_channels=16,
        model__low_level_channels=8,
        train__steps=800,
        train__eval_every=400,
        train__checkpoint_every=400,
    ),
}


def model_config(model, data_dir, **extra):
    return load_config(
        ICH_CONFIG,
        arg=f"model={model},smoke",
        data__data_dir=data_dir,
        **{**COMMON, **MODEL_OVERRIDES[model], **extra},
    )


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("ich")
    data_dir = str(root / "data")
    runs = {}
    for model in MODEL_OVERRIDES:
        config = model_config(model, data_dir)
        workdir = str(root / model)
        train.train_and_evaluate(config, workdir)
        # The validation split (3 patients) is too small to pick a checkpoint by.
        result = evaluate.evaluate_checkpoint(config, workdir, checkpoint="latest", split="test")
        runs[model] = (workdir, result)
    return data_dir, runs


@pytest.mark.parametrize("model", list(MODEL_OVERRIDES))
def test_model_segments_hemorrhage_on_held_out_patients(experiment, model):
    _, runs = experiment
    _, result = runs[model]
    assert result["num_hemorrhage_slices"] >= 5
    # Predicting no hemorrhage (right on most slices) scores 0 on every one of these.
    assert result["dice_positive_slices"] > 0.45, result
    assert result["dice_pooled"] > 0.55, result
    assert result["pixel_f1_1"] == pytest.approx(result["dice_pooled"])
    assert result["slice_auc"] > 0.85, result
    assert result["pixel_precision_0"] > 0.99 and result["pixel_recall_0"] > 0.99


def test_evaluation_writes_tables_and_pictures(experiment):
    _, runs = experiment
    workdir, result = runs["unet"]
    out = os.path.join(workdir, "eval", "test")
    with open(os.path.join(out, "slices.csv")) as f:
        slices = list(csv.DictReader(f))
    assert len(slices) == result["num_slices"]
    assert sum(int(r["target_px"]) > 0 for r in slices) == result["num_hemorrhage_slices"]
    labels = np.array([int(r["label"]) for r in slices])
    scores = np.array([float(r["p_hemorrhage"]) for r in slices])
    assert result["slice_auc"] == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-3)
    with open(os.path.join(out, "patients.csv")) as f:
        patients = list(csv.DictReader(f))
    assert sum(int(p["slices"]) for p in patients) == len(slices)
    assert {p["patient_id"] for p in patients} == {r["patient_id"] for r in slices}
    for name in ("worst_slices.png", "best_slices.png", "slice_detection_roc.png", "overlays.png"):
        assert os.path.getsize(os.path.join(out, name)) > 1000, name


def test_compare_prints_both_models(experiment, tmp_path):
    _, runs = experiment
    table = compare.compare([runs["unet"][0], runs["deeplabv3"][0]])
    lines = table.strip().splitlines()
    assert "pixel_precision_1" in lines[0] and "iou_pooled" in lines[0]
    assert lines[2].startswith("| unet |") and lines[3].startswith("| deeplabv3 |")
    value = float(lines[2].split("|")[lines[0].split("|").index(" iou_pooled ")])
    assert value == pytest.approx(runs["unet"][1]["iou_pooled"], abs=5e-4)
    with pytest.raises(compare.CompareError, match="no config.json"):
        compare.compare([os.path.dirname(runs["unet"][0])])
    unevaluated = tmp_path / "unevaluated"
    unevaluated.mkdir()
    shutil.copy(os.path.join(runs["unet"][0], "config.json"), unevaluated)
    with pytest.raises(compare.CompareError, match="evaluate it first"):
        compare.compare([str(unevaluated)])


def test_predict_on_a_nifti_volume_finds_its_hemorrhage(experiment, tmp_path):
    data_dir, runs = experiment
    workdir, _ = runs["unet"]
    task = tasks.get_task(model_config("unet", data_dir))
    test_patients = sorted({r["patient_id"] for r in task.record_info("test")})
    raw = glob.glob(os.path.join(data_dir, "raw", "ct_ich_synthetic_*"))[0]
    truth = None
    for patient in test_patients:
        masks = ct.read_nifti_volume(os.path.join(raw, "masks", f"{patient}.nii")).hu
        if masks.any():
            truth = masks
            break
    assert truth is not None
    scan = os.path.join(raw, "ct_scans", f"{patient}.nii")
    (report,) = ich.predict_ct_files(workdir, [scan], str(tmp_path), checkpoint="latest")
    assert len(report["slices"]) == truth.shape[-1]
    labels = truth.reshape(-1, truth.shape[-1]).any(axis=0)
    scores = [s["p_hemorrhage"] for s in report["slices"]]
    assert skm.roc_auc_score(labels, scores) > 0.8
    assert report["hemorrhage"] and report["volume_ml"] > 0
    assert os.path.isfile(tmp_path / f"{patient}.png")
    with open(tmp_path / f"{patient}.json") as f:
        assert json.load(f)["largest_slice"] == report["largest_slice"]


def test_web_page_serves_the_trained_model(experiment, tmp_path):
    from medjax import serve

    _, runs = experiment
    predictor = ich.IchPredictor(runs["unet"][0], checkpoint="latest")
    hu = np.full((40, 40, 1), -1000.0, np.float32)
    path = tmp_path / "slice.nii"
    ct.write_nifti_volume(str(path), hu, pixel_spacing_mm=(0.5, 0.5), slice_spacing_mm=5.0)
    client = serve.create_app(predictor).test_client()
    with open(path, "rb") as f:
        response = client.post("/api/segment", data={"file": (f, "slice.nii"), "window": "brain"})
    assert response.status_code == 200, response.data
    body = response.get_json()
    assert 0.0 <= body["p_hemorrhage"] < 0.5  # Air only: no hemorrhage.


def test_kfold_by_subject_partitions_patients(experiment):
    data_dir, _ = experiment
    seen_test = []
    for fold in range(3):
        config = model_config("unet", data_dir, data__num_folds=3, data__fold=fold)
        task = tasks.get_task(config)
        groups = {
            split: {r["patient_id"] for r in task.record_info(split)}
            for split in ("train", "validation", "test")
        }
        assert all(groups.values())
        assert not groups["train"] & groups["test"]
        assert not groups["validation"] & (groups["train"] | groups["test"])
        seen_test.append(groups["test"])
    everyone = set().union(*seen_test)
    assert sum(len(t) for t in seen_test) == len(everyone) == 18
    with pytest.raises(ValueError, match="fold=3"):
        tasks.get_task(model_config("unet", data_dir, data__num_folds=3, data__fold=3)).records(
            "test"
        )


def test_positive_slices_are_oversampled(experiment):
    data_dir, _ = experiment
    task = tasks.get_task(model_config("unet", data_dir, data__positive_oversample=4))
    train_info = task.record_info("train")
    positives = sum(r["label"] for r in train_info)
    assert positives > 0
    assert len(task.train_records()) == len(train_info) + 3 * positives
