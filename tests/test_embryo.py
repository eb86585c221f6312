"""Embryo task: a VAE embeds frames of synthetic time-lapse videos, then an LSTM and an SVM
classify the outcome of held-out videos well above the majority class; reports, metrics,
predict on a video folder, and the errors a user can meet."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from medjax_datasets.embryo_timelapse import OUTCOMES
from medjax_datasets.embryo_timelapse.synthetic import synthesize
from sklearn import metrics as skm

from medjax import evaluate, train
from medjax.models.sequence import LSTMClassifier
from medjax.tasks import embryo
from medjax.tasks.stages import MissingStageError
from tests.conftest import REPO, load_config

CONFIG = os.path.join(REPO, "configs", "embryo.py")
NUM_VIDEOS = 100
DATA = dict(data__frame_size=32, data__max_frames=24, data__min_frames=8)
EMBED = dict(
    model__latent_dim=16,
    model__width=8,
    model__levels=3,
    model__blocks=0,
    loss__beta=0.1,
    train__steps=300,
    train__batch_size=32,
    train__learning_rate=3e-3,
    train__warmup_steps=20,
    train__log_every=100,
    train__eval_every=300,
    train__checkpoint_every=300,
    eval__batch_size=256,
    eval__num_plot=4,
)
LSTM = dict(
    model__hidden=16,
    train__steps=300,
    train__batch_size=16,
    train__warmup_steps=20,
    train__log_every=100,
    train__eval_every=300,
    train__checkpoint_every=300,
    eval__batch_size=64,
)


def write_splits(raw) -> None:
    """Puts 4 of every 10 patients in the test split and 1 in validation, in outcomes.csv's
    `split` column: a held-out split of about 40 videos, for a stable accuracy."""
    path = os.path.join(raw, "outcomes.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    patients = list(dict.fromkeys(r["patient_id"] for r in rows))
    splits = {
        p: "test" if i % 5 in (1, 3) else "validation" if i % 10 == 5 else "train"
        for i, p in enumerate(patients)
    }
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["video", "patient_id", "outcome", "split"])
        writer.writeheader()
        writer.writerows({**r, "split": splits[r["patient_id"]]} for r in rows)


def stage_config(arg: str, root, **overrides):
    data = dict(data__manual_dir=str(root / "raw"), data__data_dir=str(root / "data"), **DATA)
    return load_config(CONFIG, arg, **{**data, **overrides})


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("embryo")
    synthesize(root / "raw", NUM_VIDEOS, 0, image_size=96, num_frames=40)
    write_splits(root / "raw")
    workdir = root / "run"
    embed = stage_config("stage=embed", root, **EMBED)
    train.train_and_evaluate(embed, str(workdir / "embed"))
    embed_result = evaluate.evaluate_checkpoint(embed, str(workdir / "embed"), split="test")
    lstm = stage_config("stage=classify", root, classify__embedder_checkpoint="latest", **LSTM)
    train.train_and_evaluate(lstm, str(workdir / "classify"))
    # The validation split (about 8 videos) is too small to pick a checkpoint by.
    lstm_result = evaluate.evaluate_checkpoint(
        lstm, str(workdir / "classify"), checkpoint="latest", split="test"
    )
    svm = stage_config(
        "stage=classify,classifier=svm", root, classify__embedder_checkpoint="latest"
    )
    svm_result = embryo.fit_svm(svm, str(workdir / "classify_svm"))
    return {
        "root": root,
        "workdir": workdir,
        "results": {"embed": embed_result, "lstm": lstm_result, "svm": svm_result},
    }


def majority_macro_f1(labels) -> float:
    counts = np.bincount(labels, minlength=len(OUTCOMES))
    return float(skm.f1_score(labels, np.full(len(labels), np.argmax(counts)), average="macro"))


def read_predictions(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("classifier", ["lstm", "svm"])
def test_classifier_beats_the_majority_class_on_held_out_videos(experiment, classifier):
    result = experiment["results"][classifier]
    assert result["num_videos"] >= 35
    labels = np.repeat(np.arange(len(OUTCOMES)), np.sum(result["confusion_matrix"], axis=1))
    # Always predicting the commonest class scores 1/3 balanced accuracy and this macro-F1.
    assert result["balanced_accuracy"] >= 1 / 3 + 0.15, result
    assert result["macro_f1"] >= majority_macro_f1(labels) + 0.2, result
    assert result["accuracy"] >= result["majority_accuracy"] + 0.15, result
    assert result["auc"] >= 0.7, result


@pytest.mark.parametrize("classifier,stage", [("lstm", "classify"), ("svm", "classify_svm")])
def test_metrics_match_scikit_learn_on_the_predictions_table(experiment, classifier, stage):
    result = experiment["results"][classifier]
    out = experiment["workdir"] / stage / "eval" / "test"
    rows = read_predictions(out / "predictions.csv")
    assert len(rows) == result["num_videos"]
    labels = np.array([OUTCOMES.index(r["outcome"]) for r in rows])
    probs = np.array([[float(r[f"p_{name}"]) for name in OUTCOMES] for r in rows])
    pred = np.array([OUTCOMES.index(r["predicted"]) for r in rows])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(pred, probs.argmax(axis=1))
    assert result["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert result["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, pred))
    assert result["macro_f1"] == pytest.approx(skm.f1_score(labels, pred, average="macro"))
    assert (
        result["confusion_matrix"] == skm.confusion_matrix(labels, pred, labels=[0, 1, 2]).tolist()
    )
    for k, name in enumerate(OUTCOMES):
        expected = skm.roc_auc_score(labels == k, probs[:, k])
        assert result[f"auc_{name}"] == pytest.approx(expected, abs=2e-3)
        assert os.path.getsize(out / f"roc_{name}.png") > 1000
    with open(out / "metrics.json") as f:
        assert json.load(f)["macro_f1"] == pytest.approx(result["macro_f1"])
    assert os.path.getsize(out / "confusion_matrix.png") > 1000


def test_embedder_reconstructs_and_reports(experiment):
    result = experiment["results"]["embed"]
    out = experiment["workdir"] / "embed" / "eval" / "test"
    # A constant gray frame would score the pixel variance (about 0.01 for these crops).
    assert result["recon_mse"] < 0.008, result
    assert result["kl"] > 1.0 and result["elbo"] < 0  # The code is used, and is a bound.
    with open(out / "embedding_pca.csv", newline="") as f:
        pca = list(csv.DictReader(f))
    assert len(pca) == result["num_videos"] == experiment["results"]["lstm"]["num_videos"]
    coords = np.array([[float(r["pc1"]), float(r["pc2"])] for r in pca])
    assert coords.std(axis=0)[0] >= coords.std(axis=0)[1] > 0
    for name in ("reconstructions.png", "embedding_pca.png"):
        assert os.path.getsize(out / name) > 1000, name


@pytest.mark.parametrize("stage", ["classify", "classify_svm"])
def test_predict_on_a_video_folder_repeats_the_evaluation(experiment, stage, tmp_path):
    """The folder's frames are selected and cropped as the builder did, so the probabilities
    are those the evaluation computed for the same video."""
    out = experiment["workdir"] / stage / "eval" / "test"
    row = read_predictions(out / "predictions.csv")[0]
    folder = experiment["root"] / "raw" / "embryo_dataset" / row["video_id"]
    (report,) = embryo.predict_video_folders(
        str(experiment["workdir"]), [str(folder)], str(tmp_path), checkpoint="latest", stage=stage
    )
    for name in OUTCOMES:
        assert report["probabilities"][name] == pytest.approx(float(row[f"p_{name}"]), abs=1e-3)
    assert report["predicted"] == row["predicted"]
    assert report["time_file"] and report["localization"] == "hough" and not report["warnings"]
    with open(tmp_path / f"{row['video_id']}.json") as f:
        assert json.load(f)["predicted"] == row["predicted"]
    assert row["predicted"] in embryo.summary(report)


def test_classify_without_an_embed_stage_names_the_command(experiment, tmp_path):
    config = stage_config("stage=classify", experiment["root"], **LSTM)
    task = embryo.EmbryoClassifier(config)
    with pytest.raises(MissingStageError, match="stage=embed"):
        task.save_artifacts(str(tmp_path / "classify"))


def test_frame_size_must_match_the_embedder(experiment, tmp_path):
    embed_dir = str(experiment["workdir"] / "embed")
    overrides = {**LSTM, "data__frame_size": 64, "classify__embedder_dir": embed_dir}
    config = stage_config("stage=classify", experiment["root"], **overrides)
    with pytest.raises(ValueError, match="data.frame_size=64 differs"):
        embryo.EmbryoClassifier(config).save_artifacts(str(tmp_path / "classify"))


def test_svm_has_no_checkpoint_to_evaluate():
    config = load_config(CONFIG, "stage=classify,classifier=svm,smoke")
    with pytest.raises(ValueError, match="medjax.main"):
        embryo.make_task(config)


def test_lstm_ignores_padding_steps():
    import jax

    rng = np.random.default_rng(0)
    features = rng.normal(size=(2, 7, 5)).astype(np.float32)
    lengths = np.array([7, 3], np.int32)
    changed = features.copy()
    changed[1, 3:] = 100.0
    for kwargs in ({}, {"bidirectional": True, "num_phases": 4, "pooling": "mean"}):
        model = LSTMClassifier(hidden=8, **kwargs)
        apply = jax.jit(model.apply)
        variables = jax.jit(model.init)(
            jax.random.key(0, impl="rbg"), {"features": features, "lengths": lengths}
        )
        a = apply(variables, {"features": features, "lengths": lengths})
        b = apply(variables, {"features": changed, "lengths": lengths})
        np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-5)
        assert not np.allclose(a["logits"][0], a["logits"][1])


def test_classification_metrics_against_scikit_learn():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 50)
    probs = rng.dirichlet(np.ones(3), 50) + np.eye(3)[labels] * 0.3
    probs /= probs.sum(axis=1, keepdims=True)
    pred = probs.argmax(axis=1)
    result = embryo.classification_metrics(probs, labels)
    assert result["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert result["macro_f1"] == pytest.approx(skm.f1_score(labels, pred, average="macro"))
    assert result["auc"] == pytest.approx(
        skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"), abs=1e-5
    )
    # A class missing from the labels has no AUC; F1 averages over the classes seen.
    only_two = np.where(labels == 2, 0, labels)
    result = embryo.classification_metrics(probs, only_two)
    assert np.isnan(result["auc_miscarriage"]) and np.isfinite(result["auc"])
    assert result["macro_f1"] == pytest.approx(
        skm.f1_score(only_two, probs.argmax(axis=1), average="macro")
    )
