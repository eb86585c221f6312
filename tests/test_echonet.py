"""EchoNet stages learn on synthetic videos; beats are found; evaluation and predict report."""

from __future__ import annotations

import csv
import json
import os

import cv2
import numpy as np
import pytest

from medjax import data as data_lib
from medjax import evaluate, tasks, train
from medjax.clinical import echo
from medjax.preprocess.video import read_video_gray
from medjax.tasks import echonet_chain
from tests.conftest import REPO, load_config

ECHONET_CONFIG = os.path.join(REPO, "configs", "echonet.py")
COMMON = dict(data__synthetic_num=96, train__batch_size=16, train__warmup_steps=20)
STAGE_OVERRIDES = {
    # 8 frames every 4th span 29 frames: at least half a beat (14-30 frames) of contraction.
    "ef": dict(
        data__clip_length=8,
        data__clip_period=4,
        model__width=8,
        train__steps=300,
        train__eval_every=100,
        train__checkpoint_every=100,
        train__learning_rate=2e-3,
    ),
    "segment": dict(
        data__frame_size=48,
        data__pad=4,
        model__width=8,
        model__aspp_channels=16,
        train__steps=200,
        train__eval_every=100,
        train__checkpoint_every=100,
        train__learning_rate=3e-3,
    ),
}


def stage_config(stage, data_dir, **extra):
    return load_config(
        ECHONET_CONFIG,
        arg=f"task={stage},smoke",
        data__data_dir=data_dir,
        **COMMON,
        **STAGE_OVERRIDES[stage],
        **extra,
    )


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("echonet")
    workdir, data_dir = str(root / "run"), str(root / "data")
    results = {}
    for stage in STAGE_OVERRIDES:
        config = stage_config(stage, data_dir)
        train.train_and_evaluate(config, tasks.run_dir(config, workdir))
        results[stage] = evaluate.evaluate_checkpoint(
            config, tasks.run_dir(config, workdir), checkpoint="best", split="test"
        )
    return workdir, data_dir, results


def test_ef_regressor_beats_the_train_mean(experiment):
    workdir, data_dir, results = experiment
    task = tasks.get_task(stage_config("ef", data_dir))
    index = task.index()
    train_mean = np.mean([index["train"]["ef"][i] for i in task.labelled("train")])
    test_ef = np.array([index["test"]["ef"][i] for i in task.labelled("test")])
    baseline_mae = float(np.mean(np.abs(test_ef - train_mean)))
    ef = results["ef"]
    assert ef["num_videos"] == len(test_ef) >= 10
    assert ef["mae"] < 0.6 * baseline_mae, (ef, baseline_mae)
    assert ef["r2"] > 0.5 and ef["mae_single"] < 0.75 * baseline_mae, ef
    assert ef["mae_ci_low"] <= ef["mae"] <= ef["mae_ci_high"]
    # The run keeps its normalisation statistics: evaluation needs no recomputation.
    stats = json.load(open(os.path.join(workdir, "ef", "train_stats.json")))
    assert stats["mean_ef"] == pytest.approx(train_mean, rel=1e-6)
    out = os.path.join(workdir, "ef", "eval", "test")
    with open(os.path.join(out, "predictions.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(test_ef)
    assert sorted(float(r["EF"]) for r in rows) == pytest.approx(sorted(test_ef), abs=1e-3)
    predicted = np.array([float(r["EF_pred_all_clips"]) for r in rows])
    truth = np.array([float(r["EF"]) for r in rows])
    assert np.mean(np.abs(predicted - truth)) == pytest.approx(ef["mae"], rel=1e-3)
    for name in ("ef_scatter.png", "ef_bland_altman.png", "hfref_roc.png"):
        assert cv2.imread(os.path.join(out, name)) is not None


def _mean_mask_baseline(task):
    """Pooled Dice of the training frames' majority mask, the same for every test frame."""
    masks = np.concatenate([b["mask"][b["valid"]] for b, _ in task.eval_batches("train", 16)])
    guess = masks.astype(np.float64).mean(axis=0) > 0.5
    test = np.concatenate([b["mask"][b["valid"]] for b, _ in task.eval_batches("test", 16)])
    test = test.astype(bool)
    return 2.0 * (test & guess).sum() / (test.sum() + guess.sum() * len(test))


def test_lv_segmentation_beats_the_mean_mask_and_tells_ed_from_es(experiment):
    workdir, data_dir, results = experiment
    seg = results["segment"]
    task = tasks.get_task(stage_config("segment", data_dir))
    baseline = _mean_mask_baseline(task)
    assert seg["dice_overall"] > min(baseline + 0.05, 0.95), (seg, baseline)
    assert seg["dice_ed"] > 0.75 and seg["dice_es"] > 0.7, seg
    assert seg["num_examples"] == 2 * len(task.traced("test"))
    # The mean mask cannot tell end-diastole from end-systole; the model's areas must.
    chain = echonet_chain.EchonetChain(workdir)
    source = task.source("test")
    ordered = []
    for v in task.traced("test"):
        record = source[v]
        frames = record["video"][[record["large_frame"], record["small_frame"]]]
        _, areas = chain.segment(frames)
        ordered.append(areas[0] > areas[1])
    assert np.mean(ordered) >= 0.9, ordered


def _true_end_systoles(record) -> np.ndarray:
    """The synthetic heart contracts with period 2h from ED (large) to ES (small) frames."""
    large, small = int(record["large_frame"]), int(record["small_frame"])
    half = small - large
    assert half > 0
    frames = small + 2 * half * np.arange(-10, 11)
    return frames[(frames >= 0) & (frames < len(record["video"]))]


def test_beats_are_found_in_synthetic_videos(experiment):
    workdir, data_dir, _ = experiment
    chain = echonet_chain.EchonetChain(workdir)
    task = chain.stages["segment"][1]  # Its saved config names the experiment's data_dir.
    source = task.source("test")
    misses = []
    for v in task.traced("test"):
        record = source[v]
        _, areas = chain.segment(record["video"])
        found = echo.end_systoles(areas, float(record["fps"]))
        truth = _true_end_systoles(record)
        # Beats at the very ends of the video may be cut off: most counts within +-1.
        misses.append(abs(len(found) - len(truth)))
    # (Measured with one CPU thread: mean 0.58 over 12 videos, one of them off by 2.)
    assert max(misses) <= 2 and np.mean(misses) <= 0.75, misses


def test_beat_to_beat_evaluation_and_predict_on_an_avi(experiment, tmp_path):
    workdir, data_dir, results = experiment
    config = load_config(ECHONET_CONFIG, arg="smoke", data__data_dir=data_dir, **COMMON)
    metrics = echonet_chain.evaluate_beat_to_beat(config, workdir, split="test", num_plots=1)
    assert metrics["num_videos"] == results["ef"]["num_videos"]
    assert metrics["num_with_beats"] == metrics["num_videos"]
    assert metrics["beats_per_video_mean"] >= 1.5
    # Beat-to-beat EF is as good as the clip average, within noise.
    assert metrics["beat_to_beat_mae"] < 1.5 * results["ef"]["mae"] + 2.0, metrics
    out_dir = os.path.join(workdir, "eval", "test")
    with open(os.path.join(out_dir, "beat_to_beat.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == metrics["num_videos"] and all(int(r["beats"]) >= 1 for r in rows)
    assert any(name.startswith("area_") for name in os.listdir(out_dir))

    raw = data_lib.synthetic_raw_dir("echonet_dynamic", data_dir, 96, 0)
    name = rows[0]["FileName"]
    avi = os.path.join(raw, "Videos", f"{name}.avi")
    out = str(tmp_path / "predict")
    (report,) = echonet_chain.predict_video_files(workdir, [avi], out)
    frames, _ = read_video_gray(avi)
    assert report["num_frames"] == len(frames) and len(report["areas"]) == len(frames)
    assert report["ef_all_clips"] == pytest.approx(float(rows[0]["EF_all_clips"]), abs=0.5)
    assert len(report["beats"]) == int(rows[0]["beats"])
    assert report["hfref"] == (report["ef_all_clips"] < 50)
    saved = json.load(open(os.path.join(out, f"{name}.json")))
    assert saved["ef_beat_to_beat"] == pytest.approx(report["ef_beat_to_beat"])
    overlay, _ = read_video_gray(os.path.join(out, f"{name}_overlay.avi"))
    assert len(overlay) == len(frames)
    assert cv2.imread(os.path.join(out, f"{name}_area.png")) is not None


def test_missing_stage_names_the_training_command(experiment, tmp_path):
    workdir, _, _ = experiment
    partial = tmp_path / "partial"
    partial.mkdir()
    os.symlink(os.path.join(workdir, "ef"), partial / "ef")
    from medjax.tasks.stages import MissingStageError

    with pytest.raises(MissingStageError, match="configs/echonet.py:task=segment"):
        echonet_chain.EchonetChain(str(partial))
