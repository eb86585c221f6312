"""Perfusion: flips keep quadrant labels right, the loss masks unscored quadrants, the metrics
agree with scikit-learn, the ConvLSTM and the CNN-RNN (frozen random backbone) learn the flow
on held-out synthetic videos, the CNN-RNN's two stages hand over exactly, the classical
baselines beat chance, and predict reads an AVI."""

from __future__ import annotations

import csv
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from medjax_datasets.sdf_perfusion.sdf_perfusion import flow_class
from sklearn import metrics as skm

from medjax import compare, evaluate, train
from medjax.tasks import perfusion, perfusion_classical
from tests.conftest import REPO, load_config

PERFUSION_CONFIG = os.path.join(REPO, "configs", "perfusion.py")
# Every third native frame: cells of continuous flow move 2-4 px between kept 32-px frames.
DATA = dict(
    data__synthetic_num=60,
    data__frame_size=32,
    data__num_frames=12,
    data__frame_stride=3,
)
CONVLSTM = dict(
    model__width=8,
    model__temporal_pool="mean",
    train__steps=200,
    train__eval_every=200,
    train__checkpoint_every=200,
    train__warmup_steps=20,
    train__learning_rate=5e-3,
    train__log_every=50,
)

# The CNN-RNN's backbone (random: the frozen stage estimates its BatchNorm statistics) and head.
CNN_RNN = dict(
    model__width=16,
    model__hidden=32,
    model__projection_dim=32,
    model__quadrant_mode="crops",
)
CNN_RNN_HEAD = dict(
    train__steps=300,
    train__eval_every=300,
    train__checkpoint_every=300,
    train__warmup_steps=20,
    train__log_every=100,
)


def perfusion_config(arg: str, data_dir: str, **extra):
    return load_config(PERFUSION_CONFIG, arg=arg, data__data_dir=data_dir, **{**DATA, **extra})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("perfusion_data"))


@pytest.fixture(scope="module")
def convlstm_run(data_dir, tmp_path_factory):
    config = perfusion_config("model=convlstm", data_dir, **CONVLSTM)
    workdir = str(tmp_path_factory.mktemp("perfusion_convlstm"))
    train.train_and_evaluate(config, workdir)
    result = evaluate.evaluate_checkpoint(config, workdir, checkpoint="latest", split="test")
    return config, workdir, result


# ============================================================================ units
def test_flips_permute_the_quadrant_scores_with_the_pixels():
    video = np.zeros((2, 8, 8, 1), np.uint8)
    for q, (r, c) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
        video[:, r : r + 4, c : c + 4] = 10 * (q + 1)  # Quadrant q shows 10 (q + 1).
    example = {"video": video, "quadrant_scores": np.array([0, 1, 2, 3], np.int32)}
    for horizontal, vertical, expected in [
        (True, False, [1, 0, 3, 2]),
        (False, True, [2, 3, 0, 1]),
        (True, True, [3, 2, 1, 0]),
    ]:
        flipped = perfusion.flip_example(example, horizontal=horizontal, vertical=vertical)
        assert flipped["quadrant_scores"].tolist() == expected
        shown = [
            flipped["video"][0, r, c, 0] // 10 - 1 for r, c in [(0, 0), (0, 4), (4, 0), (4, 4)]
        ]
        assert shown == expected  # The score follows the pixels it was given for.


def test_loss_ignores_unscored_quadrants():
    cfg = load_config(PERFUSION_CONFIG, arg="model=convlstm").loss
    rng = np.random.default_rng(0)
    outputs = {
        "video_logits": jnp.asarray(rng.normal(size=(2, 4)), jnp.float32),
        "quadrant_logits": jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32),
    }
    scores = jnp.array([[3, -1, 2, 1], [0, 0, -1, -1]])
    classes = jnp.array([3, 0])
    loss = perfusion.perfusion_loss(outputs, classes, scores, cfg)
    changed = dict(outputs)
    changed["quadrant_logits"] = outputs["quadrant_logits"].at[0, 1].add(5.0).at[1, 3].add(-7.0)
    np.testing.assert_allclose(perfusion.perfusion_loss(changed, classes, scores, cfg), loss)
    changed["quadrant_logits"] = outputs["quadrant_logits"].at[0, 0].add(-3.0)
    assert float(perfusion.perfusion_loss(changed, classes, scores, cfg)[0]) > float(loss[0])


def test_flow_class_probabilities_follow_the_label_rule():
    rng = np.random.default_rng(2)
    scores = rng.integers(-1, 4, (64, 4))
    scores[:3] = [[3, 3, 0, 0], [2, -1, 3, -1], [-1, -1, -1, -1]]
    onehot = np.eye(4)[np.maximum(scores, 0)]
    probs = perfusion.mode_class_probs(jnp.asarray(onehot, jnp.float32), jnp.asarray(scores >= 0))
    expected = [flow_class(s) if flow_class(s) >= 0 else flow_class([0] * 4) for s in scores]
    np.testing.assert_array_equal(np.argmax(probs, axis=1), expected)
    np.testing.assert_allclose(probs.max(axis=1), 1.0, atol=1e-5)
    # Soft quadrant predictions: the exact sum matches sampling scores from them.
    soft = rng.dirichlet(np.ones(4), size=(2, 4))
    scored = np.array([[True, True, True, True], [True, False, True, True]])
    exact = np.asarray(perfusion.mode_class_probs(jnp.asarray(soft, jnp.float32), scored))
    np.testing.assert_allclose(exact.sum(axis=1), 1.0, atol=1e-5)
    for b in range(2):
        draws = np.stack([rng.choice(4, 20000, p=soft[b, q]) for q in range(4)], axis=1)
        draws[:, ~scored[b]] = -1
        sampled = np.bincount([flow_class(d) for d in draws], minlength=4) / len(draws)
        np.testing.assert_allclose(exact[b], sampled, atol=0.015)


def test_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 40)
    probs = rng.random((40, 4)) + 2.0 * np.eye(4)[labels] * (rng.random(40) < 0.6)[:, None]
    scores = rng.integers(-1, 4, (40, 4))
    scores[:, 0] = np.maximum(scores[:, 0], 0)
    expected = np.clip(scores + rng.normal(0, 0.4, scores.shape), 0, 3)
    mfi = np.array([s[s >= 0].mean() for s in scores])
    result = perfusion.perfusion_metrics(
        probs, labels, expected, np.rint(expected).astype(int), scores, mfi
    )
    pred = probs.argmax(1)
    assert result["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert result["macro_f1"] == pytest.approx(skm.f1_score(labels, pred, average="macro"))
    assert result["kappa"] == pytest.approx(
        skm.cohen_kappa_score(labels, pred, weights="quadratic")
    )
    scored = scores >= 0
    assert result["quadrant_mae"] == pytest.approx(np.abs(expected - scores)[scored].mean())
    own = np.array([e[s >= 0].mean() for e, s in zip(expected, scores)])
    assert result["mfi_mae"] == pytest.approx(np.abs(own - mfi).mean())
    assert np.sum(result["confusion_matrix"]) == 40


def test_a_bad_motion_gain_is_named():
    config = load_config(PERFUSION_CONFIG, arg="model=cnn_rnn", data__motion_gain=float("nan"))
    with pytest.raises(ValueError, match=r"config.data.motion_gain=nan must be a positive"):
        perfusion.model_frames(config, np.zeros((1, 2, 4, 4, 1), np.uint8))
    config = load_config(PERFUSION_CONFIG, arg="model=convlstm")
    frames = np.zeros((1, 2, 4, 4, 1), np.uint8)
    frames[0, 1] = 51  # 0.2 in [0, 1] units.
    np.testing.assert_allclose(perfusion.model_frames(config, frames)[0, 1, 0, 0], [0.2, 0.8])


# ============================================================================ learning
def test_convlstm_learns_the_flow_class_on_held_out_videos(convlstm_run):
    config, workdir, result = convlstm_run
    assert result["num_videos"] >= 8
    # Baselines: the majority flow class, the commonest quadrant score, the training mean MFI.
    assert result["accuracy"] >= result["majority_accuracy"] + 0.2, result
    assert result["quadrant_accuracy"] >= _majority_quadrant_accuracy(config) + 0.2, result
    assert result["quadrant_kappa"] > 0.5, result
    assert result["mfi_mae"] < 0.7 * _mean_mfi_baseline(config), result
    out = os.path.join(workdir, "eval", "test")
    with open(os.path.join(out, "predictions.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == result["num_videos"]
    accuracy = np.mean([r["flow_class"] == r["predicted_class"] for r in rows])
    assert accuracy == pytest.approx(result["accuracy"])
    assert os.path.getsize(os.path.join(out, "confusion_matrix.png")) > 1000


def _majority_quadrant_accuracy(config) -> float:
    """Accuracy on the test split's scored quadrants of always predicting their commonest score."""
    data = perfusion.PerfusionData()
    data.config = config
    scores = np.asarray(data.split_index("test")["quadrant_scores"])
    return float(np.bincount(scores[scores >= 0]).max() / np.sum(scores >= 0))


def _mean_mfi_baseline(config) -> float:
    """MAE of the test MFI when always predicting the training videos' mean MFI."""
    data = perfusion.PerfusionData()
    data.config = config
    train_mean = np.mean(data.split_index("train")["mfi"])
    return float(np.mean(np.abs(np.asarray(data.split_index("test")["mfi"]) - train_mean)))


@pytest.fixture(scope="module")
def cnn_rnn_run(data_dir, tmp_path_factory):
    """The CNN-RNN's frozen stage on a random backbone (BatchNorm statistics estimated on
    training frames), evaluated on the test split; DIR/frozen of an experiment directory."""
    config = perfusion_config("model=cnn_rnn,stage=frozen", data_dir, **CNN_RNN, **CNN_RNN_HEAD)
    experiment = tmp_path_factory.mktemp("perfusion_cnn_rnn")
    train.train_and_evaluate(config, str(experiment / "frozen"))
    result = evaluate.evaluate_checkpoint(
        config, str(experiment / "frozen"), checkpoint="latest", split="test"
    )
    return config, experiment, result


def test_cnn_rnn_frozen_stage_learns_the_flow_on_held_out_videos(cnn_rnn_run):
    config, experiment, result = cnn_rnn_run
    task = perfusion.PerfusionFeatureTask(config)
    task.load_artifacts(str(experiment / "frozen"))
    stats = jax.tree.leaves(task._backbone["batch_stats"])
    assert any(np.abs(np.asarray(leaf)).max() > 1e-3 for leaf in stats[::2])  # Not the init.
    features = np.load(experiment / "frozen" / "features_train.npy")
    assert features.shape[2] == 4  # One view per quadrant crop.
    assert np.isfinite(features).all() and 0.05 < features.std() < 20
    # Baselines: the majority class; a constant quadrant score (kappa 0); the train mean MFI.
    # (Measured over backbone seeds 0-3: accuracy +0.11..+0.22 over the majority, quadrant
    # kappa 0.59-0.65, MFI MAE 0.54-0.68 against 1.07 for the mean.)
    assert result["num_videos"] >= 8
    assert result["accuracy"] >= result["majority_accuracy"] + 0.1, result
    assert result["quadrant_kappa"] > 0.45, result
    assert result["mfi_mae"] < 0.75 * _mean_mfi_baseline(config), result


def test_cnn_rnn_fine_tuning_starts_from_the_frozen_stage(cnn_rnn_run, data_dir):
    """The fine-tune stage starts from exactly the frozen stage's backbone and trained head:
    with a zero learning rate its validation repeats the frozen stage's."""
    _, experiment, _ = cnn_rnn_run
    finetune = perfusion_config(
        "model=cnn_rnn,stage=finetune",
        data_dir,
        **CNN_RNN,
        train__steps=1,
        train__batch_size=2,
        train__eval_every=1,
        train__checkpoint_every=1,
        train__warmup_steps=1,
        train__learning_rate=0.0,
    )
    train.train_and_evaluate(finetune, str(experiment / "finetune"))
    before, after = (_last_validation(experiment / stage) for stage in ("frozen", "finetune"))
    for key in ("val_loss", "val_mfi_mae", "val_quadrant_mae"):
        assert after[key] == pytest.approx(before[key], rel=1e-4, abs=1e-5), key


def _last_validation(run_dir) -> dict:
    with open(run_dir / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if "val_loss" in r][-1]


def test_classical_baselines_beat_chance(data_dir, tmp_path):
    config = perfusion_config(
        "model=classical",
        data_dir,
        classical__pool_size=16,
        classical__frame_components=2,
        classical__motion_components=4,
        classical__neighbours=3,
    )
    results = perfusion_classical.fit_and_evaluate_classical(config, str(tmp_path))
    assert set(results) == {"knn", "lda", "nca_knn"}
    for method, result in results.items():
        present = sum(1 for row in result["confusion_matrix"] if sum(row) > 0)
        assert result["accuracy"] > 1 / present + 0.1 or result["kappa"] > 0.2, (method, result)
        with open(tmp_path / method / "eval" / "test" / "metrics.json") as f:
            assert json.load(f)["accuracy"] == pytest.approx(result["accuracy"])
    table = compare.compare([str(tmp_path / m) for m in results])
    assert "pca+lda" in table and "kappa" in table.splitlines()[0]
    assert (tmp_path / "comparison.md").read_text() == table


# ============================================================================ inference
def test_predict_on_a_synthetic_avi_matches_the_evaluation(convlstm_run, data_dir, tmp_path):
    _, workdir, _ = convlstm_run
    with open(os.path.join(workdir, "eval", "test", "predictions.csv")) as f:
        # All four quadrants scored: the evaluation's flow class then counts all of them too.
        row = next(r for r in csv.DictReader(f) if all(r[f"q{q}"] != "" for q in range(1, 5)))
    (raw,) = glob.glob(os.path.join(data_dir, "raw", "sdf_perfusion_synthetic_*"))
    avi = os.path.join(raw, "videos", f"{row['video_id']}.avi")
    (report,) = perfusion.predict_video_files(workdir, [avi], str(tmp_path), checkpoint="latest")
    assert report["num_frames"] == DATA["data__num_frames"]
    assert report["flow_class"] == int(row["predicted_class"])
    assert len(report["quadrant_mfi"]) == 4
    for q in range(4):  # The same frames as the dataset's, so the same scores.
        assert report["quadrant_mfi"][q] == pytest.approx(
            float(row[f"predicted_q{q + 1}"]), abs=2e-3
        )
    assert report["mfi"] == pytest.approx(np.mean(report["quadrant_mfi"]), abs=1e-3)
    with open(tmp_path / f"{row['video_id']}.json") as f:
        assert json.load(f)["mfi"] == report["mfi"]
    assert "MFI" in perfusion.summary(report) and "q4" in perfusion.summary(report)
