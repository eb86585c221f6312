"""Classical perfusion baselines: PCA features of frames and frame differences, then KNN, LDA
and NCA+KNN (scikit-learn), on the same patient splits as the neural models.

Features. Each video's first `data.clip_frames` frames (all stored frames when 0) are scaled to
[0, 1] and area-downsampled to `classical.pool_size` pixels a side. Two PCAs, fitted on the
training videos only (unsupervised): one of the frames (appearance, `frame_components`) and
one of the absolute differences of consecutive frames (motion, `motion_components`). A video's
feature vector is the mean and the standard deviation over time of both projections. For the
quadrant scores the same is done on each quadrant's crop (the PCAs fitted on the crops of all
four quadrants), and one classifier, trained on every scored (video, quadrant) pair, scores
each quadrant.

Methods (`classical.methods`, comma-separated):
- `knn`: standardised features, k = `classical.neighbours` nearest neighbours, distance-weighted.
- `lda`: linear discriminant analysis (least squares with shrinkage; copes with few videos).
- `nca_knn`: standardised features, neighbourhood components analysis to
  `classical.nca_components` dimensions, then the KNN.

Each method writes DIR/<method>/config.json (model.name "pca+<method>") and
DIR/<method>/eval/<split>/metrics.json, predictions.csv and confusion_matrix.png for the
validation split and `eval.split`, with the metrics of the neural models
(`medjax.tasks.perfusion.perfusion_metrics`; the expected quadrant score is the class
probabilities' mean), so `python -m medjax.compare --workdirs DIR/knn DIR/lda ...` lists
them with the others; DIR/comparison.md is that table for the methods. Run it with
  python -m medjax.main --config=configs/perfusion.py:model=classical --workdir=DIR
or, the same, python -m medjax.tasks.perfusion_classical with those flags.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import cv2
import jax
import numpy as np
from absl import app, flags, logging

from medjax import writers
from medjax.tasks import perfusion

METHODS = ("knn", "lda", "nca_knn")


# ============================================================================ features
def pooled_clip(video: np.ndarray, frames: int, size: int) -> np.ndarray:
    """The first `frames` frames of a (T, S, S[, 1]) uint8 clip in [0, 1], area-resized to
    (frames, size, size) float32."""
    video = np.asarray(video)[:frames]
    if video.ndim == 4:
        video = video[..., 0]
    out = [
        cv2.resize(f.astype(np.float32) / 255.0, (size, size), interpolation=cv2.INTER_AREA)
        for f in video
    ]
    return np.stack(out)


def regions(clips: np.ndarray, quadrant: int | None) -> np.ndarray:
    """(N, T, s, s) clips -> the whole frames (quadrant None) or one quadrant's crops."""
    if quadrant is None:
        return clips
    half = clips.shape[-1] // 2
    row, col = divmod(quadrant, 2)
    return clips[:, :, row * half : (row + 1) * half, col * half : (col + 1) * half]


class PcaFeatures:
    """Two PCAs (frames, absolute frame differences) fitted on training regions; a video's
    features are the mean and standard deviation over time of both projections.

    Args:
      frame_components, motion_components: PCA dimensions (capped by the training data).
      seed: PCA's random state.
    """

    def __init__(self, frame_components: int, motion_components: int, seed: int = 0):
        self.frame_components, self.motion_components, self.seed = (
            frame_components,
            motion_components,
            seed,
        )

    def _pca(self, components: int, rows: np.ndarray):
        from sklearn.decomposition import PCA

        components = max(1, min(components, rows.shape[0] - 1, rows.shape[1]))
        return PCA(components, random_state=self.seed).fit(rows)

    def fit(self, clips: np.ndarray) -> "PcaFeatures":
        """Fits both PCAs on (N, T, h, w) training clips (several regions may be stacked on N)."""
        frames = clips.reshape(-1, clips.shape[2] * clips.shape[3])
        motion = np.abs(np.diff(clips, axis=1)).reshape(len(frames) - len(clips), -1)
        self.frames_pca = self._pca(self.frame_components, frames)
        self.motion_pca = self._pca(self.motion_components, motion)
        return self

    def transform(self, clips: np.ndarray) -> np.ndarray:
        """(N, T, h, w) clips -> (N, 2 * (frame + motion components)) features."""
        n, t = clips.shape[:2]
        frames = self.frames_pca.transform(clips.reshape(n * t, -1)).reshape(n, t, -1)
        diffs = np.abs(np.diff(clips, axis=1)).reshape(n * (t - 1), -1)
        motion = self.motion_pca.transform(diffs).reshape(n, t - 1, -1)
        return np.concatenate(
            [frames.mean(1), frames.std(1), motion.mean(1), motion.std(1)], axis=1
        ).astype(np.float32)


# ============================================================================ classifiers
def make_classifier(method: str, cfg: Any, seed: int):
    """An unfitted scikit-learn classifier for `method` (see the module docstring)."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.neighbors import KNeighborsClassifier, NeighborhoodComponentsAnalysis
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    knn = KNeighborsClassifier(cfg.neighbours, weights="distance")
    if method == "knn":
        return make_pipeline(StandardScaler(), knn)
    if method == "lda":
        return LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")
    if method == "nca_knn":
        nca = NeighborhoodComponentsAnalysis(cfg.nca_components, random_state=seed, max_iter=100)
        return make_pipeline(StandardScaler(), nca, knn)
    raise ValueError(
        f"config.classical.methods names {method!r}; known methods: {', '.join(METHODS)}."
    )


def class_probabilities(classifier, features: np.ndarray) -> np.ndarray:
    """(N, 4) probabilities over all flow classes (zero for classes absent from training)."""
    probs = np.zeros((len(features), perfusion.NUM_CLASSES))
    probs[:, classifier.classes_] = classifier.predict_proba(features)
    return probs


# ============================================================================ fit + evaluate
def _split_clips(data: perfusion.PerfusionData, split: str, size: int) -> np.ndarray:
    source = data.source(split)
    frames = data.clip_frames()
    return np.stack([pooled_clip(source[i]["video"], frames, size) for i in range(len(source))])


def _methods(cfg) -> list[str]:
    methods = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    for method in methods:
        if method not in METHODS:
            raise ValueError(
                f"config.classical.methods={cfg.methods!r} names {method!r}; known methods: "
                f"{', '.join(METHODS)}."
            )
    if not methods:
        raise ValueError("config.classical.methods is empty; name at least one of knn,lda,nca_knn.")
    return methods


def fit_and_evaluate_classical(config, workdir: str) -> dict[str, dict]:
    """Fits every method of `config.classical.methods` on the training split and evaluates it
    on the validation split and `config.eval.split` (see the module docstring).

    Args:
      config: a configs/perfusion.py:model=classical config.
      workdir: the experiment directory; each method writes DIR/<method>/.

    Returns:
      {method: metrics of config.eval.split}.
    """
    cfg = config.classical
    methods = _methods(cfg)
    if cfg.pool_size % 2:
        raise ValueError(f"config.classical.pool_size={cfg.pool_size} must be even (quadrants).")
    data = perfusion.PerfusionData()
    data.config = config
    if config.eval.split not in data.sources():
        raise ValueError(
            f"config.eval.split={config.eval.split!r} is not a split of the dataset "
            f"({', '.join(data.sources())})."
        )
    splits = list(
        dict.fromkeys(s for s in ("validation", config.eval.split) if s in data.sources())
    )
    clips = {s: _split_clips(data, s, cfg.pool_size) for s in ["train", *splits]}
    index = {s: data.split_index(s) for s in clips}

    video_pca = PcaFeatures(cfg.frame_components, cfg.motion_components, config.seed)
    video_pca.fit(clips["train"])
    quadrant_pca = PcaFeatures(cfg.frame_components, cfg.motion_components, config.seed)
    quadrant_pca.fit(np.concatenate([regions(clips["train"], q) for q in range(4)]))
    video_features = {s: video_pca.transform(c) for s, c in clips.items()}
    quadrant_features = {
        s: np.stack([quadrant_pca.transform(regions(c, q)) for q in range(4)], axis=1)
        for s, c in clips.items()
    }  # (N, 4, F)

    train_scores = np.asarray(index["train"]["quadrant_scores"])
    scored = train_scores >= 0
    base = json.loads(config.to_json_best_effort())
    results = {}
    for method in methods:
        video_clf = make_classifier(method, cfg, config.seed)
        video_clf.fit(video_features["train"], index["train"]["flow_class"])
        quadrant_clf = make_classifier(method, cfg, config.seed)
        quadrant_clf.fit(quadrant_features["train"][scored], train_scores[scored])
        run_dir = os.path.join(workdir, method)
        if jax.process_index() == 0:
            saved = json.loads(json.dumps(base))
            saved["model"]["name"] = f"pca+{method}"
            writers.write_json(os.path.join(run_dir, "config.json"), saved)
        for split in splits:
            result = _evaluate(video_clf, quadrant_clf, video_features[split],
                               quadrant_features[split], index[split])  # fmt: skip
            result.update(split=split, method=method, step=0, checkpoint="fit")
            if jax.process_index() == 0:
                out_dir = os.path.join(run_dir, "eval", split)
                writers.write_json(os.path.join(out_dir, "metrics.json"), result)
                gathered = result.pop("_gathered")
                rows = perfusion.prediction_rows(index[split], gathered)
                perfusion.write_classification_files(
                    out_dir, split, rows, result["confusion_matrix"]
                )
            else:
                result.pop("_gathered")
            logging.info("%s on %s: %s", method, split, _metric_line(result))
        results[method] = result
    if jax.process_index() == 0:
        from medjax import compare

        table = compare.compare([os.path.join(workdir, m) for m in methods], config.eval.split)
        with open(os.path.join(workdir, "comparison.md"), "w") as f:
            f.write(table)
        print(f"\nDone. Classical baselines on {config.eval.split}:\n{table}")
    return results


def _evaluate(video_clf, quadrant_clf, video_features, quadrant_features, index: dict) -> dict:
    video_probs = class_probabilities(video_clf, video_features)
    n = len(video_features)
    q_probs = class_probabilities(quadrant_clf, quadrant_features.reshape(n * 4, -1)).reshape(
        n, 4, -1
    )
    expected = np.sum(q_probs * np.arange(perfusion.NUM_CLASSES), axis=-1)
    scores = np.asarray(index["quadrant_scores"])
    result = perfusion.perfusion_metrics(
        video_probs,
        index["flow_class"],
        expected,
        np.argmax(q_probs, axis=-1),
        scores,
        index["mfi"],
    )
    result["_gathered"] = {
        "position": np.arange(n),
        "video_probs": video_probs,
        "quadrant_expected": expected,
    }
    return result


def _metric_line(result: dict) -> str:
    names = ("accuracy", "macro_f1", "kappa", "mfi_mae", "majority_accuracy")
    return ", ".join(f"{k}={result[k]:.4f}" for k in names)


# ============================================================================ command line
def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    writers.quiet_library_logs()
    config = flags.FLAGS.config
    if config.task != "perfusion" or config.model.name != "classical":
        raise app.UsageError(
            "medjax.tasks.perfusion_classical fits the classical baselines: pass "
            "--config=configs/perfusion.py:model=classical."
        )
    fit_and_evaluate_classical(config, flags.FLAGS.workdir)


if __name__ == "__main__":
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "configs/perfusion.py:model=classical", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "Experiment directory; each method writes DIR/<method>/.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
