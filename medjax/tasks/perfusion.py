"""Perfusion: flow class and per-quadrant MFI of sidestream dark-field (SDF) videos.

Data: the `sdf_perfusion` TFDS dataset (built with `config.data.frame_size`, `num_frames`,
`frame_stride`), one example per video: gray frames (T, S, S, 1) uint8, the four quadrant
scores (0 no flow .. 3 continuous, -1 not scored), the video MFI (mean of the scored
quadrants) and the flow class (their most frequent score). Splits are the builder's, by patient.

Input: gray frames, and with `data.motion_channel` (the default for both neural models) a
second channel of absolute frame differences times `data.motion_gain`, since flow is motion
(`scale_frames`).

Models (`config.model.name`):
- `convlstm` (`PerfusionTask`): `ConvLSTMClassifier` on frames / 255. Training augmentation:
  a random window of `data.clip_frames` frames when the stored clip is longer, random
  horizontal / vertical flips with the quadrant labels permuted to match (a horizontal flip
  swaps q1<->q2 and q3<->q4, a vertical one q1<->q3 and q2<->q4).
- `cnn_rnn`: InceptionV3 features of every quadrant crop of every frame (`"crops"`, or of the
  whole frame with `"sequence"`), then an LSTM, in two stages sharing an experiment directory
  DIR. `frozen` (`PerfusionFeatureTask`, DIR/frozen/): the backbone (ImageNet weights from the
  local file `model.init_from`, or random with its BatchNorm statistics estimated on training
  frames) is applied once to every video of every split (jit, `train.feature_batch_size`
  frames per call); the features are cached in the run directory as `features_<split>.npy` with the backbone's
  variables in `backbone.msgpack`, and only the `SequenceHead` trains on them. `finetune`
  (`PerfusionTask`, DIR/finetune/): the whole `CnnRnnClassifier`, its backbone from
  DIR/frozen/backbone.msgpack and its head from the frozen stage's best checkpoint, on frames
  scaled to [-1, 1] (`model.backbone_lr_multiplier` slows the backbone).
- `classical`: PCA features and scikit-learn classifiers, see
  `medjax.tasks.perfusion_classical`.

Loss: `loss.video_weight` x cross-entropy of the flow class + `loss.quadrant_weight` x the
per-quadrant loss (ordinal head: binary cross-entropy per threshold against
`ordinal_targets`; softmax head: cross-entropy), unscored quadrants masked out.

Flow class. With `model.flow_class_rule="quadrants"` (the default) a video's class
probabilities follow from its predicted quadrant score distributions by the label's own rule
(the most frequent score of the scored quadrants, ties to the lower; exact under independent
quadrants, `mode_class_probs`), so the class is as good as the quadrant scores are; `"head"`
reads the video head instead (trained either way, by the `loss.video_weight` term).

Metrics (`finalize_metrics`): flow class `accuracy`, `macro_f1` (over the classes present in the
labels or predictions), `kappa` (quadratic-weighted Cohen's kappa), `balanced_accuracy`,
`majority_accuracy` (the split's most common class, for reference), `confusion_matrix`; MFI:
`mfi_mae` and `mfi_rmse`, the predicted MFI being the mean expected score of the quadrants the
reader scored (all four for a new video); quadrants (scored ones only): `quadrant_accuracy`,
`quadrant_mae` (expected vs true score), `quadrant_kappa`, and `accuracy_q1` .. `accuracy_q4`.
`write_evaluation` writes `predictions.csv` (one row per video) and `confusion_matrix.png`.

Inference on a user's video (`predict_video_files`, `python -m medjax.predict`): the AVI is
decoded, its frames kept and resized as the builder does, and the model prints and writes the
expected MFI score per quadrant, the video MFI and the flow class.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Sequence

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from medjax_datasets.sdf_perfusion import sdf_perfusion as dataset

from medjax import data as data_lib
from medjax import models, parallel, plots, writers
from medjax.input import pipeline
from medjax.models import convlstm
from medjax.models.inception import frame_features
from medjax.tasks.base import DatasetAccess, Task, apply_model

NUM_CLASSES = dataset.MAX_SCORE + 1
NUM_QUADRANTS = 4
FLOW_CLASSES = ("no flow", "intermittent", "sluggish", "continuous")
# Quadrant order after a flip: new quadrant i shows old quadrant ORDER[i].
HORIZONTAL_FLIP_ORDER = (1, 0, 3, 2)
VERTICAL_FLIP_ORDER = (2, 3, 0, 1)
INDEX_VERSION = 1
FEATURES_VERSION = 2  # 2: crops mode caches the quadrant crops only.
BACKBONE_FILE = "backbone.msgpack"
FEATURES_KEY_FILE = "features.json"
CONFIG_FILE = "configs/perfusion.py"
HOST_KEYS = ("video_id", "patient_id")
BUILD_OPTIONS = ("frame_size", "num_frames", "frame_stride", "skip_missing_videos")
# Batches of training frames that estimate a random backbone's BatchNorm statistics (its
# momentum is 0.9: 0.9**50 of the initial values remain).
BN_CALIBRATION_BATCHES = 50


# ============================================================================ data
def _index_fields(record: dict) -> dict:
    return {
        "video_id": pipeline.decode_text(record["video_id"]),
        "patient_id": pipeline.decode_text(record["patient_id"]),
        "flow_class": int(record["flow_class"]),
        "mfi": float(record["mfi"]),
        "quadrant_scores": [int(s) for s in record["quadrant_scores"]],
    }


class PerfusionData(DatasetAccess):
    """The sdf_perfusion dataset built with the config's options, and a per-split index."""

    BUILD_OPTIONS = BUILD_OPTIONS
    _index: dict | None = None

    def index(self) -> dict:
        """Per split: lists video_id, patient_id, flow_class, mfi, quadrant_scores."""
        if self._index is None:
            self._index = data_lib.cached_index(
                self.builder(), _index_fields, name="perfusion_index", version=INDEX_VERSION
            )
        return self._index

    def split_index(self, split: str) -> dict:
        self.source(split)  # A clear error for a missing split.
        return self.index()[split]

    def num_examples(self, split):
        return len(self.sources()[split]) if split in self.sources() else 0

    def clip_frames(self) -> int:
        """Frames the model reads: data.clip_frames, or every stored frame when 0."""
        cfg = self.config.data
        if cfg.clip_frames < 0 or cfg.clip_frames > cfg.num_frames:
            raise ValueError(
                f"config.data.clip_frames={cfg.clip_frames} must be 0 (all) or at most "
                f"config.data.num_frames={cfg.num_frames}, the frames the dataset stores."
            )
        return cfg.clip_frames or cfg.num_frames


def _labels(record: dict) -> dict:
    return {
        "flow_class": np.int32(record["flow_class"]),
        "quadrant_scores": np.asarray(record["quadrant_scores"], np.int32),
        "mfi": np.float32(record["mfi"]),
    }


def _eval_clip(record: dict, *, frames: int) -> dict:
    """A record -> its first `frames` frames, labels and position in the split."""
    return {
        "video": np.asarray(record["video"], np.uint8)[:frames],
        **_labels(record),
        "position": np.int32(record["position"]),
    }


def _train_clip(record: dict) -> dict:
    return {"video": np.asarray(record["video"], np.uint8), **_labels(record)}


def flip_example(example: dict, *, horizontal: bool, vertical: bool) -> dict:
    """Flips a clip (T, H, W, C) and permutes its quadrant scores to match."""
    video, scores = example["video"], np.asarray(example["quadrant_scores"])
    if horizontal:
        video, scores = video[:, :, ::-1], scores[list(HORIZONTAL_FLIP_ORDER)]
    if vertical:
        video, scores = video[:, ::-1], scores[list(VERTICAL_FLIP_ORDER)]
    return {**example, "video": np.ascontiguousarray(video), "quadrant_scores": scores}


def _augment(example: dict, rng: np.random.Generator, *, frames: int, hflip: bool, vflip: bool):
    video = example["video"]
    start = int(rng.integers(0, len(video) - frames + 1))
    example = {**example, "video": video[start : start + frames]}
    return flip_example(
        example,
        horizontal=hflip and bool(rng.integers(2)),
        vertical=vflip and bool(rng.integers(2)),
    )


def _temporal_crop(example: dict, rng: np.random.Generator, *, frames: int, key: str) -> dict:
    values = example[key]
    start = int(rng.integers(0, len(values) - frames + 1))
    return {**example, key: values[start : start + frames]}


class _Numbered:
    """A source whose records also carry their index as "position" (picklable)."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        return {**self.source[int(i)], "position": np.int32(i)}


# ============================================================================ losses, outputs
def quadrant_probs(logits: jnp.ndarray) -> jnp.ndarray:
    """(B, Q, K - 1) cumulative or (B, Q, K) softmax logits -> (B, Q, K) probabilities."""
    if logits.shape[-1] == NUM_CLASSES - 1:
        return convlstm.ordinal_to_probs(logits)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def perfusion_loss(outputs: dict, flow_class, quadrant_scores, loss_cfg) -> jnp.ndarray:
    """Per-example loss (B,): weighted video cross-entropy + masked per-quadrant loss.

    Args:
      outputs: {"video_logits": (B, K), "quadrant_logits": (B, Q, K - 1) or (B, Q, K)}.
      flow_class: (B,) int labels.
      quadrant_scores: (B, Q) int scores, -1 where not scored (masked out).
      loss_cfg: config.loss (video_weight, quadrant_weight).

    Returns:
      (B,) float32 losses; the quadrant term is the mean over each video's scored quadrants.
    """
    video = optax.softmax_cross_entropy_with_integer_labels(
        outputs["video_logits"].astype(jnp.float32), flow_class
    )
    logits = outputs["quadrant_logits"].astype(jnp.float32)
    scored = (quadrant_scores >= 0).astype(jnp.float32)
    if logits.shape[-1] == NUM_CLASSES - 1:
        targets = convlstm.ordinal_targets(quadrant_scores, NUM_CLASSES)
        per_quadrant = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, targets), axis=-1)
    else:
        per_quadrant = optax.softmax_cross_entropy_with_integer_labels(
            logits, jnp.maximum(quadrant_scores, 0)
        )
    quadrant = jnp.sum(per_quadrant * scored, axis=-1) / jnp.maximum(jnp.sum(scored, -1), 1.0)
    return loss_cfg.video_weight * video + loss_cfg.quadrant_weight * quadrant


FLOW_CLASS_RULES = ("quadrants", "head")


def flow_class_rule(config) -> str:
    """How the flow class is read from the outputs: `model.flow_class_rule`, checked;
    "quadrants" when the key is absent (runs saved before the option)."""
    rule = config.model.get("flow_class_rule", "quadrants")
    if rule not in FLOW_CLASS_RULES:
        raise ValueError(
            f"config.model.flow_class_rule={rule!r}: choose one of {', '.join(FLOW_CLASS_RULES)}."
        )
    return rule


def mode_class_probs(quadrant_probs: jnp.ndarray, scored: jnp.ndarray | None = None):
    """P(flow class = k): the distribution of the label rule's class (the most frequent score
    of the scored quadrants, ties to the lower) when each quadrant's score is drawn
    independently from its predicted distribution.

    Exact: sums the joint probability of all K**Q score assignments by their mode.

    Args:
      quadrant_probs: (B, Q, K) per-quadrant score probabilities.
      scored: (B, Q) bool, the quadrants the label counts; None: all of them. A video with no
        scored quadrant gets the mode over all of them.

    Returns:
      (B, K) probabilities.
    """
    b, q, k = quadrant_probs.shape
    assignments = np.stack(np.meshgrid(*[np.arange(k)] * q, indexing="ij"), -1).reshape(-1, q)
    onehot = jnp.asarray(np.eye(k, dtype=np.float32)[assignments])  # (A, Q, K)
    if scored is None:
        scored = jnp.ones((b, q), bool)
    scored = jnp.where(jnp.any(scored, axis=1, keepdims=True), scored, True)
    counts = jnp.einsum("bq,aqk->bak", scored.astype(jnp.float32), onehot)
    mode = jax.nn.one_hot(jnp.argmax(counts, axis=-1), k)  # argmax: the first (lower) of ties.
    # log P(assignment) = sum_q log p[q, a_q]; unscored quadrants sum out to 1 either way.
    log_probs = jnp.log(jnp.clip(quadrant_probs.astype(jnp.float32), 1e-12, 1.0))
    joint = jnp.exp(jnp.einsum("bqk,aqk->ba", log_probs, onehot))  # (B, A)
    return jnp.einsum("ba,bak->bk", joint, mode)


def predictions(outputs: dict, rule: str = "quadrants", scored=None) -> dict:
    """Model outputs -> video_probs (B, K), quadrant_probs (B, Q, K), quadrant_expected (B, Q).

    `rule` "quadrants": the flow class distribution follows from the quadrant predictions by
    the label's own rule (`mode_class_probs`, over the `scored` quadrants); "head": the video
    head's softmax.
    """
    probs = quadrant_probs(outputs["quadrant_logits"])
    expected = jnp.sum(probs * jnp.arange(NUM_CLASSES, dtype=jnp.float32), axis=-1)
    if rule == "quadrants":
        video = mode_class_probs(probs, scored)
    elif rule == "head":
        video = jax.nn.softmax(outputs["video_logits"].astype(jnp.float32), axis=-1)
    else:
        raise ValueError(f"flow_class_rule={rule!r}: choose one of {FLOW_CLASS_RULES}.")
    return {"video_probs": video, "quadrant_probs": probs, "quadrant_expected": expected}


# ============================================================================ metrics
def predicted_mfi(quadrant_expected, quadrant_scores=None) -> np.ndarray:
    """The video MFI of expected quadrant scores (N, Q): their mean over the quadrants the
    reader scored (quadrant_scores >= 0), or over all quadrants without scores."""
    expected = np.asarray(quadrant_expected, np.float64)
    if quadrant_scores is None:
        return expected.mean(axis=1)
    scored = np.asarray(quadrant_scores) >= 0
    return np.sum(expected * scored, axis=1) / np.maximum(scored.sum(axis=1), 1)


def perfusion_metrics(
    video_probs, flow_class, quadrant_expected, quadrant_pred, quadrant_scores, mfi
) -> dict:
    """The perfusion metrics of a split (see the module docstring).

    Args:
      video_probs: (N, K) flow class probabilities (or one-hot predictions).
      flow_class: (N,) true classes.
      quadrant_expected: (N, Q) expected quadrant scores.
      quadrant_pred: (N, Q) predicted quadrant classes.
      quadrant_scores: (N, Q) true scores, -1 where not scored.
      mfi: (N,) true video MFI.

    Returns:
      A dict of floats (and `confusion_matrix`, a K x K list, rows true).
    """
    from sklearn import metrics as skm

    labels = np.asarray(flow_class, np.int64)
    pred = np.argmax(np.asarray(video_probs), axis=1)
    classes = list(range(NUM_CLASSES))
    confusion = skm.confusion_matrix(labels, pred, labels=classes)
    present = confusion.sum(axis=1) > 0
    recall = np.diag(confusion)[present] / confusion.sum(axis=1)[present]
    seen = sorted(set(labels.tolist()) | set(pred.tolist()))
    result = {
        "accuracy": float(np.mean(pred == labels)),
        "balanced_accuracy": float(np.mean(recall)),
        "macro_f1": float(skm.f1_score(labels, pred, labels=seen, average="macro")),
        "kappa": _kappa(labels, pred),
        "majority_accuracy": float(confusion.sum(axis=1).max() / max(len(labels), 1)),
        "confusion_matrix": confusion.tolist(),
        "num_videos": int(len(labels)),
    }
    scores = np.asarray(quadrant_scores, np.int64)
    expected = np.asarray(quadrant_expected, np.float64)
    qpred = np.asarray(quadrant_pred, np.int64)
    scored = scores >= 0
    mfi_error = predicted_mfi(expected, scores) - np.asarray(mfi, np.float64)
    result["mfi_mae"] = float(np.mean(np.abs(mfi_error)))
    result["mfi_rmse"] = float(np.sqrt(np.mean(mfi_error**2)))
    result["quadrant_accuracy"] = float(np.mean(qpred[scored] == scores[scored]))
    result["quadrant_mae"] = float(np.mean(np.abs(expected[scored] - scores[scored])))
    result["quadrant_kappa"] = _kappa(scores[scored], qpred[scored])
    for q in range(scores.shape[1]):
        mask = scored[:, q]
        result[f"accuracy_q{q + 1}"] = (
            float(np.mean(qpred[mask, q] == scores[mask, q])) if mask.any() else math.nan
        )
    return result


def _kappa(labels, pred) -> float:
    """Quadratic-weighted Cohen's kappa; NaN when undefined (one class in both)."""
    from sklearn.metrics import cohen_kappa_score

    if len(set(np.asarray(labels).tolist()) | set(np.asarray(pred).tolist())) < 2:
        return math.nan
    return float(cohen_kappa_score(labels, pred, weights="quadratic", labels=range(NUM_CLASSES)))


def prediction_rows(index: dict, gathered: dict) -> list[dict]:
    """predictions.csv rows, one per video of the split, in split order."""
    rows = []
    order = np.argsort(gathered["position"])
    for k in order:
        i = int(gathered["position"][k])
        probs = gathered["video_probs"][k]
        expected = gathered["quadrant_expected"][k]
        scores = index["quadrant_scores"][i]
        row = {
            "video_id": index["video_id"][i],
            "patient_id": index["patient_id"][i],
            "flow_class": index["flow_class"][i],
            "predicted_class": int(np.argmax(probs)),
            **{f"p_{c}": round(float(p), 5) for c, p in enumerate(probs)},
            "mfi": round(float(index["mfi"][i]), 4),
            "predicted_mfi": round(float(predicted_mfi(expected[None], [scores])[0]), 4),
        }
        for q in range(NUM_QUADRANTS):
            row[f"q{q + 1}"] = scores[q] if scores[q] >= 0 else ""
            row[f"predicted_q{q + 1}"] = round(float(expected[q]), 4)
        rows.append(row)
    return rows


def write_classification_files(out_dir: str, split: str, rows: list[dict], confusion) -> list:
    """predictions.csv and confusion_matrix.png of a split."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "predictions.csv")
    writers.write_csv(csv_path, rows)
    png = os.path.join(out_dir, "confusion_matrix.png")
    plots.confusion_png(
        png, confusion, FLOW_CLASSES, title=f"Flow class ({split}, {len(rows)} videos)"
    )
    return [csv_path, png]


# ============================================================================ tasks
class _PerfusionEvaluation:
    """eval_step / finalize_metrics / predict / write_evaluation shared by the tasks, given
    `_outputs(variables, batch, train)`."""

    config: Any

    def _outputs(self, variables, batch, *, train: bool, rng=None):
        raise NotImplementedError

    def loss(self, variables, batch, rng):
        outputs, model_state = self._outputs(variables, batch, train=True, rng=rng)
        per_example = perfusion_loss(
            outputs, batch["flow_class"], batch["quadrant_scores"], self.config.loss
        )
        pred = jnp.argmax(outputs["video_logits"], axis=-1)
        batch_metrics = {"train_accuracy": jnp.mean(pred == batch["flow_class"])}
        return jnp.mean(per_example), (batch_metrics, dict(model_state))

    def eval_step(self, variables, batch):
        outputs, _ = self._outputs(variables, batch, train=False)
        valid = batch["valid"].astype(jnp.float32)
        per_example = perfusion_loss(
            outputs, batch["flow_class"], batch["quadrant_scores"], self.config.loss
        )
        out = predictions(outputs, self._rule(), batch["quadrant_scores"] >= 0)
        out.update(
            loss=(jnp.sum(per_example * valid), jnp.sum(valid)),
            flow_class=batch["flow_class"],
            quadrant_scores=batch["quadrant_scores"],
            mfi=batch["mfi"],
            position=batch["position"],
        )
        return out

    def finalize_metrics(self, totals, gathered):
        result = {"loss": totals["loss"][0] / max(totals["loss"][1], 1.0)}
        result.update(
            perfusion_metrics(
                gathered["video_probs"],
                gathered["flow_class"],
                gathered["quadrant_expected"],
                np.argmax(gathered["quadrant_probs"], axis=-1),
                gathered["quadrant_scores"],
                gathered["mfi"],
            )
        )
        return result

    def predict(self, variables, batch):
        outputs, _ = self._outputs(variables, batch, train=False)
        return predictions(outputs, self._rule())

    def _rule(self) -> str:
        return flow_class_rule(self.config)

    def write_evaluation(self, out_dir, split, gathered, variables=None):
        rows = prediction_rows(self.split_index(split), gathered)
        labels = [r["flow_class"] for r in rows]
        pred = [r["predicted_class"] for r in rows]
        confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
        np.add.at(confusion, (labels, pred), 1)
        return write_classification_files(out_dir, split, rows, confusion)


class PerfusionTask(_PerfusionEvaluation, PerfusionData, Task):
    """Flow class and quadrant scores from frames: the ConvLSTM, or the whole CNN-RNN (the
    fine-tune stage)."""

    def __init__(self, config):
        super().__init__(config)
        if config.model.name not in ("convlstm", "cnn_rnn"):
            raise ValueError(
                f"config.model.name={config.model.name!r}: the perfusion task trains 'convlstm' "
                "or 'cnn_rnn' ('classical' is fitted by medjax.tasks.perfusion_classical)."
            )
        if config.model.name == "cnn_rnn" and config.stage != "finetune":
            raise ValueError(
                f"config.stage={config.stage!r}: the cnn_rnn frames task is the 'finetune' stage."
            )
        self.model = models.build_model(config.model, num_classes=NUM_CLASSES)
        self._run_dir: str | None = None
        self._frozen: dict | None = None

    def example_batch(self, batch_size):
        size, frames = self.config.data.frame_size, self.clip_frames()
        return {
            "video": np.zeros((batch_size, frames, size, size, 1), np.uint8),
            "flow_class": np.zeros((batch_size,), np.int32),
            "quadrant_scores": np.zeros((batch_size, NUM_QUADRANTS), np.int32),
            "mfi": np.zeros((batch_size,), np.float32),
        }

    def model_inputs(self, batch):
        return model_frames(self.config, batch["video"])

    def _outputs(self, variables, batch, *, train, rng=None):
        return apply_model(self.model, variables, self.model_inputs(batch), train=train, rng=rng)

    def init_variables(self, rng, batch):
        variables = dict(super().init_variables(rng, batch))
        if self.config.model.name == "cnn_rnn":  # Backbone and head of the frozen stage.
            variables = self._frozen_stage_variables(variables)
        return variables

    def _frozen_stage_variables(self, variables: dict) -> dict:
        frozen = self._load_frozen_stage()
        params = dict(variables["params"])
        params["backbone"] = frozen["params"]["backbone"]
        params["head"] = frozen["head"]
        result = {**variables, "params": params}
        if "batch_stats" in frozen:
            result["batch_stats"] = frozen["batch_stats"]
        return jax.tree.map(jnp.asarray, result)

    def _load_frozen_stage(self) -> dict:
        """{params: backbone params, batch_stats, head: trained head params} of the frozen
        stage (numpy; loaded once, before the trainer traces `init_variables`)."""
        if self._frozen is None:
            from medjax.tasks.stages import load_stage

            frozen_dir = self._frozen_dir()
            _, task, head_variables, _ = load_stage(
                os.path.dirname(frozen_dir),
                "frozen",
                config_file=CONFIG_FILE,
                variant="model=cnn_rnn,stage=frozen",
                checkpoint=self.config.eval.checkpoint,
            )
            head = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), head_variables)
            self._frozen = {**task._backbone, "head": head["params"]}
        return self._frozen

    def _frozen_dir(self) -> str:
        if self._run_dir is None:
            raise ValueError(
                "The cnn_rnn finetune stage needs its experiment directory to find the frozen "
                "stage (DIR/frozen); train it with medjax.main on one process."
            )
        return os.path.join(os.path.dirname(os.path.abspath(self._run_dir)), "frozen")

    def save_artifacts(self, run_dir):
        self._run_dir = run_dir
        if self.config.model.name == "cnn_rnn":
            self._load_frozen_stage()

    def load_artifacts(self, run_dir):
        self._run_dir = run_dir

    def train_loader(self, batch_size, seed):
        augment = None
        frames = self.clip_frames()
        a = self.config.augment
        if a.enabled:
            augment = functools.partial(
                _augment, frames=frames, hflip=a.horizontal_flip, vflip=a.vertical_flip
            )
        elif frames < self.config.data.num_frames:
            augment = functools.partial(_temporal_crop, frames=frames, key="video")
        return pipeline.train_loader(
            self.source("train"),
            preprocess=_train_clip,
            augment=augment,
            batch_size=batch_size,
            seed=seed,
            num_workers=self.config.data.num_workers,
        )

    def eval_batches(self, split, batch_size):
        return pipeline.eval_batches(
            _Numbered(self.source(split)),
            preprocess=functools.partial(_eval_clip, frames=self.clip_frames()),
            batch_size=batch_size,
        )


def scale_frames(video, model_name: str, motion_gain: float = 0.0) -> jnp.ndarray:
    """uint8 clips (B, T, S, S, 1) -> model input: [0, 1] for the ConvLSTM, [-1, 1] (what
    ImageNet InceptionV3 weights expect) for the CNN-RNN. With `motion_gain` > 0, a second
    channel holds motion_gain x |frame t - frame t-1| in [0, 1] units (0 for the first frame);
    ImageNet weights give it the first conv's grey kernel too (see medjax.models.pretrained)."""
    x = jnp.asarray(video, jnp.float32) / 255.0
    motion = motion_gain * jnp.abs(jnp.diff(x, axis=1, prepend=x[:, :1]))
    if model_name != "convlstm":
        x = x * 2.0 - 1.0  # Motion stays >= 0: a still frame adds nothing to the first conv.
    if motion_gain <= 0:
        return x
    return jnp.concatenate([x, motion], axis=-1)


# ---------------------------------------------------------------------------- CNN-RNN frozen
def motion_gain(config) -> float:
    """The motion channel's gain, or 0 without one (`data.motion_channel`, `data.motion_gain`)."""
    data = config.data
    if not data.get("motion_channel", False):
        return 0.0
    gain = float(data.motion_gain)
    if not gain > 0 or not math.isfinite(gain):
        raise ValueError(
            f"config.data.motion_gain={data.motion_gain!r} must be a positive number (the scale "
            "of |frame t - frame t-1|), or set config.data.motion_channel=False."
        )
    return gain


def model_frames(config, video) -> jnp.ndarray:
    """uint8 clips -> the input of `config.model` (see `scale_frames`)."""
    return scale_frames(video, config.model.name, motion_gain(config))


def init_backbone(config) -> dict:
    """Variables of the full `CnnRnnClassifier` (seed `config.seed`), with ImageNet weights
    from the local file `config.model.init_from` when set."""
    model = models.build_model(config.model, num_classes=NUM_CLASSES)
    size = config.data.frame_size
    channels = 2 if config.data.get("motion_channel", False) else 1
    example = jnp.zeros((1, 1, size, size, channels), jnp.float32)
    variables = parallel.jit(lambda key: model.init(key, example, train=False))(
        jax.random.key(config.seed, impl="rbg")
    )
    variables = jax.device_get(variables)
    if config.model.init_from:
        from medjax.models import pretrained

        variables, report = pretrained.load_pretrained(
            variables, config.model.init_from, model_name="inception_v3"
        )
        for line in report.summary().splitlines():
            logging.info("%s", line)
    return dict(variables)


def load_backbone(frozen_dir: str, template: dict) -> dict:
    """The backbone variables the frozen stage in `frozen_dir` cached its features with."""
    path = os.path.join(frozen_dir, BACKBONE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing; train the frozen stage first: python -m medjax.main "
            f"--config={CONFIG_FILE}:model=cnn_rnn,stage=frozen "
            f"--workdir={os.path.dirname(frozen_dir)}"
        )
    with open(path, "rb") as f:
        return flax.serialization.from_bytes(jax.device_get(template), f.read())


class PerfusionFeatureTask(_PerfusionEvaluation, PerfusionData, Task):
    """The CNN-RNN's frozen stage: `SequenceHead` trained on cached backbone features."""

    def __init__(self, config):
        super().__init__(config)
        self.full_model = models.build_model(config.model, num_classes=NUM_CLASSES)
        self.model = self.full_model.sequence_head()
        self._run_dir: str | None = None
        self._features: dict[str, np.ndarray] = {}
        self._backbone: dict | None = None

    def _feature_shape(self) -> tuple[int, int]:
        from medjax.models.inception import inception_feature_dim

        return self.model.num_views(), inception_feature_dim(self.config.model.width)

    def example_batch(self, batch_size):
        views, dim = self._feature_shape()
        return {
            "features": np.zeros((batch_size, self.clip_frames(), views, dim), np.float32),
            "flow_class": np.zeros((batch_size,), np.int32),
            "quadrant_scores": np.zeros((batch_size, NUM_QUADRANTS), np.int32),
            "mfi": np.zeros((batch_size,), np.float32),
        }

    def model_inputs(self, batch):
        return jnp.asarray(batch["features"], jnp.float32)

    def _outputs(self, variables, batch, *, train, rng=None):
        return apply_model(self.model, variables, self.model_inputs(batch), train=train, rng=rng)

    # ---------------------------------------------------------------- backbone and cache
    def save_artifacts(self, run_dir):
        self._run_dir = run_dir
        path = os.path.join(run_dir, BACKBONE_FILE)
        if os.path.isfile(path):  # A resumed run keeps its backbone (and its cache).
            self._backbone = load_backbone(run_dir, init_backbone(self.config))
        else:
            self._backbone = init_backbone(self.config)
            if not self.config.model.init_from:
                self._backbone = self._calibrated(self._backbone)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(flax.serialization.to_bytes(self._backbone))
            os.replace(tmp, path)
        for split in self.sources():
            self.split_features(split)

    def load_artifacts(self, run_dir):
        self._run_dir = run_dir
        self._backbone = load_backbone(run_dir, init_backbone(self.config))

    def _calibrated(self, variables: dict) -> dict:
        """A random backbone's BatchNorm statistics estimated on training frames.

        Freshly initialised statistics (mean 0, variance 1) fit no layer's real activations,
        so a random backbone in inference mode gives badly scaled features that the frozen
        head and the fine-tune stage (whose backbone BatchNorm stays in inference mode) can
        hardly use. The training videos are run through the backbone in training mode,
        `BN_CALIBRATION_BATCHES` times, updating only the running statistics (AdaBN-style).
        """
        source = self.source("train")
        model = self.full_model.clone(freeze_backbone_bn=False)
        videos_per_batch = max(
            1, self.config.train.feature_batch_size // self.config.data.num_frames
        )

        @parallel.jit
        def update(variables, frames):
            _, state = model.apply(
                variables,
                frames,
                train=True,
                method=type(model).frame_features,
                mutable=["batch_stats"],
            )
            return {**variables, "batch_stats": state["batch_stats"]}

        rng = np.random.default_rng(self.config.seed)
        for _ in range(BN_CALIBRATION_BATCHES):
            picks = rng.choice(len(source), size=min(videos_per_batch, len(source)), replace=False)
            videos = np.stack([source[int(i)]["video"] for i in picks])
            variables = update(variables, model_frames(self.config, videos))
        logging.info(
            "Estimated the random backbone's BatchNorm statistics on %d batches of training "
            "frames.",
            BN_CALIBRATION_BATCHES,
        )
        return jax.device_get(variables)

    def without_data(self):
        pass

    def _cache_key(self) -> dict:
        return {"version": FEATURES_VERSION, "data_path": os.fspath(self.builder().data_path)}

    def split_features(self, split: str) -> np.ndarray:
        """(N, T, V, F) backbone features of every video of `split`, cached in the run dir."""
        if split in self._features:
            return self._features[split]
        if self._run_dir is None or self._backbone is None:
            raise ValueError(
                "The cnn_rnn frozen stage has no run directory yet: features are cached there "
                "by save_artifacts (medjax.main / train.train_and_evaluate)."
            )
        path = os.path.join(self._run_dir, f"features_{split}.npy")
        key_path = os.path.join(self._run_dir, FEATURES_KEY_FILE)
        keys = {}
        if os.path.isfile(key_path):
            with open(key_path) as f:
                keys = json.load(f)
        if os.path.isfile(path) and keys.get(split) == self._cache_key():
            self._features[split] = np.load(path)
            return self._features[split]
        source = self.source(split)
        apply = parallel.jit(functools.partial(frame_features, self.full_model))
        batch = max(1, self.config.train.feature_batch_size // self.config.data.num_frames)
        chunks = []
        for start in range(0, len(source), batch):
            videos = np.stack(
                [source[i]["video"] for i in range(start, min(start + batch, len(source)))]
            )
            padded = np.concatenate(
                [videos, np.zeros((batch - len(videos), *videos.shape[1:]), np.uint8)]
            )
            out = apply(
                self._backbone,
                model_frames(self.config, padded),
            )
            chunks.append(np.asarray(out)[: len(videos)])
        features = np.concatenate(chunks).astype(np.float32)
        if jax.process_index() == 0:
            tmp = f"{path}.tmp-{os.getpid()}.npy"
            np.save(tmp, features)
            os.replace(tmp, path)
            keys[split] = self._cache_key()
            writers.write_json(key_path, keys)
        logging.info("Cached backbone features of %d %s videos: %s", len(features), split, path)
        self._features[split] = features
        return features

    # ---------------------------------------------------------------- data
    def train_loader(self, batch_size, seed):
        frames = self.clip_frames()
        augment = None
        if frames < self.config.data.num_frames:
            augment = functools.partial(_temporal_crop, frames=frames, key="features")
        return pipeline.train_loader(
            _FeatureRecords(self.split_features("train"), self.split_index("train")),
            preprocess=_drop_position,
            augment=augment,
            batch_size=batch_size,
            seed=seed,
            num_workers=self.config.data.num_workers,
        )

    def eval_batches(self, split, batch_size):
        frames = self.clip_frames()
        return pipeline.eval_batches(
            _FeatureRecords(self.split_features(split), self.split_index(split)),
            preprocess=functools.partial(_first_features, frames=frames),
            batch_size=batch_size,
        )


class _FeatureRecords:
    """Cached features of a split with their labels, as random-access records."""

    def __init__(self, features: np.ndarray, index: dict):
        self.features, self.index = features, index

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        return {
            "features": self.features[i],
            "flow_class": np.int32(self.index["flow_class"][i]),
            "quadrant_scores": np.asarray(self.index["quadrant_scores"][i], np.int32),
            "mfi": np.float32(self.index["mfi"][i]),
            "position": np.int32(i),
        }

    def __repr__(self) -> str:
        return f"_FeatureRecords({len(self.features)})"


def _drop_position(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "position"}


def _first_features(record: dict, *, frames: int) -> dict:
    return {**record, "features": record["features"][:frames]}


def make_task(config):
    """The Task of a perfusion config (medjax.tasks.TASKS['perfusion'])."""
    if config.model.name == "classical":
        raise ValueError(
            "The perfusion classical baselines (model=classical) are fitted without the "
            "gradient trainer: python -m medjax.tasks.perfusion_classical "
            f"--config={CONFIG_FILE}:model=classical --workdir=DIR"
        )
    if config.model.name == "cnn_rnn" and config.stage == "frozen":
        return PerfusionFeatureTask(config)
    return PerfusionTask(config)


# ============================================================================ inference
def read_clip(path: str, data_cfg) -> tuple[np.ndarray, float]:
    """Decodes an AVI and keeps, resizes and crops its frames as the builder and evaluation
    do: frames 0, s, 2s, ... (s = frame_stride), num_frames of them, resized to frame_size,
    the first clip_frames (all when 0) kept.

    Returns:
      (clip (T, S, S, 1) uint8, fps).

    Raises:
      VideoReadError: the file is missing, unreadable, or has too few frames.
    """
    from medjax_datasets.common import resize_frames

    from medjax.preprocess.video import read_video_gray

    needed = (data_cfg.num_frames - 1) * data_cfg.frame_stride + 1
    video, fps = read_video_gray(path, expected_frames=needed)
    video = video[: needed : data_cfg.frame_stride]
    size = data_cfg.frame_size
    if video.shape[1:] != (size, size):
        video = resize_frames(video, size)
    frames = data_cfg.clip_frames or data_cfg.num_frames
    return video[:frames, ..., None], fps


class PerfusionPredictor:
    """A trained perfusion run (ConvLSTM, or a CNN-RNN stage) loaded for inference.

    Args:
      workdir: the run directory (config.json + checkpoints/), or a CNN-RNN experiment
        directory (its finetune stage is used when trained, else its frozen stage).
      checkpoint: 'best', 'latest' or a step.
    """

    def __init__(self, workdir: str, checkpoint: str = "best"):
        from medjax.tasks.stages import load_stage

        workdir = os.path.abspath(workdir)
        if not os.path.isfile(os.path.join(workdir, "config.json")):
            staged = [
                s for s in ("finetune", "frozen")
                if os.path.isfile(os.path.join(workdir, s, "config.json"))
            ]  # fmt: skip
            if not staged:
                raise FileNotFoundError(
                    f"{workdir} holds no trained perfusion run (no config.json, nor "
                    "finetune/ or frozen/ stages); train one with python -m medjax.main "
                    f"--config={CONFIG_FILE} --workdir={workdir}"
                )
            workdir = os.path.join(workdir, staged[0])
        experiment, stage = os.path.split(workdir)
        self.config, self.task, variables, self.step = load_stage(
            experiment, stage, config_file=CONFIG_FILE, variant="", checkpoint=checkpoint
        )
        variables = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), variables)
        if isinstance(self.task, PerfusionFeatureTask):  # Backbone file + trained head.
            backbone = self.task._backbone
            params = dict(backbone["params"])
            params["head"] = variables["params"]
            variables = {**backbone, "params": params}
            model = self.task.full_model
        else:
            model = self.task.model
        self.variables = variables
        self.run_dir = workdir
        config = self.config
        self._predict = parallel.jit(
            lambda v, video: predictions(
                model.apply(v, model_frames(config, video), train=False),
                flow_class_rule(self.config),
            )
        )

    def predict(self, clip: np.ndarray) -> dict:
        """Flow class and MFI of one clip (T, S, S, 1) uint8.

        Returns:
          {flow_class, flow_name, probabilities {name: p}, quadrant_mfi [q1..q4 expected
          scores], mfi (their mean)}.
        """
        out = jax.device_get(self._predict(self.variables, np.asarray(clip, np.uint8)[None]))
        probs = np.asarray(out["video_probs"][0], np.float64)
        expected = np.asarray(out["quadrant_expected"][0], np.float64)
        flow = int(np.argmax(probs))
        return {
            "flow_class": flow,
            "flow_name": FLOW_CLASSES[flow],
            "probabilities": {n: round(float(p), 5) for n, p in zip(FLOW_CLASSES, probs)},
            "quadrant_mfi": [round(float(e), 4) for e in expected],
            "mfi": round(float(predicted_mfi(expected[None])[0]), 4),
        }


def predict_video_files(
    workdir: str, paths: Sequence[str], out_dir: str, *, checkpoint: str = "best"
) -> list[dict]:
    """Predicts each AVI; writes <out_dir>/<name>.json; returns the reports (file, model,
    step, frames, fps and the `PerfusionPredictor.predict` fields)."""
    predictor = PerfusionPredictor(workdir, checkpoint)
    os.makedirs(out_dir, exist_ok=True)
    reports = []
    for path in paths:
        clip, fps = read_clip(path, predictor.config.data)
        report = {
            "file": os.path.abspath(path),
            "model": predictor.config.model.name,
            "run": predictor.run_dir,
            "step": int(predictor.step),
            "num_frames": int(len(clip)),
            "fps": None if not math.isfinite(fps) else round(fps, 3),
            **predictor.predict(clip),
        }
        stem = os.path.splitext(os.path.basename(path))[0]
        writers.write_json(os.path.join(out_dir, f"{stem}.json"), report)
        reports.append(report)
    return reports


def summary(report: dict) -> str:
    """One line about a predicted video: MFI, per-quadrant scores and flow class."""
    quadrants = ", ".join(f"q{i + 1} {s:.2f}" for i, s in enumerate(report["quadrant_mfi"]))
    p = report["probabilities"][report["flow_name"]]
    return f"MFI {report['mfi']:.2f} ({quadrants}); flow class {report['flow_name']} (P={p:.2f})"
