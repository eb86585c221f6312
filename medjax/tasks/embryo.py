"""Embryo time-lapse: a frame embedder (VAE or denoising AE), then an outcome classifier.

The project this follows classified embryo videos into liveborn, no implantation and
miscarriage in two steps: an unsupervised embedding of single frames, then a classifier over
the embeddings. The stages share one experiment directory DIR:

- `embed` (`EmbryoEmbedder`, DIR/embed/): a convolutional VAE or stacked denoising
  autoencoder (`medjax.models.vae`) trained on single frames of the training videos, without
  labels (videos without an outcome count too when the dataset keeps them). A training
  example is one (video, frame) pair, drawn uniformly over all frames; augmentation is a small
  random rotation, shift, zoom and flip (edge pixels repeated), as the project did. Frames are
  scaled to [0, 1]. The loss is the per-pixel negative ELBO (VAE: reconstruction + beta KL,
  divided by the pixel count) or the per-pixel reconstruction loss of the clean frame from a
  corrupted one (DAE). Evaluation runs on every frame of the split (or `eval.frames_per_video`
  evenly spread ones) and reports `recon_mse` (per pixel), `recon_bce` (per pixel), and for
  the VAE `kl` and `elbo` (nats per frame), for the DAE `denoise_mse` (the reconstruction of a
  corrupted frame, per pixel). Reports: `reconstructions.png` (frame | reconstruction, and for
  the DAE corrupted | denoised), `embedding_pca.png` (the first two principal components of
  each video's mean embedding, coloured by outcome) and `embedding_pca.csv`.
- `classify` (`EmbryoClassifier`, DIR/classify/): an LSTM (`medjax.models.sequence`) over each
  video's per-frame embeddings, the embedder frozen. The embedder is restored from DIR/embed/
  (`classify.embedder_checkpoint`, or `classify.embedder_dir` for another place); every frame
  of the dataset is embedded once (jit, in batches of `classify.embed_batch_size`) and the
  embeddings cached in the run directory (`embeddings_<split>.npz`, recomputed when the
  embedder step or the dataset changes), so training steps never run the encoder. Features per
  frame: the embedding standardised by the training frames' mean and standard deviation, then
  the frame's time / `data.max_hours` (`classify.use_hours`). Sequences are zero-padded to
  `data.max_frames` and the LSTM reads each up to its length. Loss: cross-entropy on the
  outcome, classes weighted by inverse training frequency (`classify.class_weights`), plus
  `classify.phase_weight` times the per-frame cross-entropy of the 16 annotated phases
  (unannotated frames ignored) when the phase head is on. Training adds Gaussian noise of
  `classify.feature_noise` to the standardised embeddings. With
  `classify.finetune_embedder`, the model is the encoder followed by the LSTM, trained end to
  end on frames (encoder initialised from the embed stage; `model.freeze_backbone_steps` and
  `model.backbone_lr_multiplier` apply to it); no embeddings are cached then.
- `classify` with `classifier=svm` (`fit_svm`, DIR/classify_svm/): no gradient training. A
  scikit-learn SVC (`model.kernel`, `model.C`, every feature standardised, the time too) is
  fitted on single frames (the same features as the LSTM's) labelled with their video's
  outcome, its probabilities Platt-scaled on 3-fold cross-validated decision values (what
  `SVC(probability=True)`, deprecated in scikit-learn 1.9, does). A video's class
  probabilities are the mean of its frames' (`model.video_rule="mean"`) or their votes
  (`"vote"`); with `classify.class_weights="balanced"` they are divided by the training
  frames' class frequencies and renormalised (single frames say little, so averaged frame
  probabilities stay near those frequencies and would otherwise always name the commonest
  class). A small C suits: frames of one video look alike, and a large C memorises videos.
  `python -m medjax.main` calls `fit_svm` (through `medjax.tasks.fit_without_gradients`); it
  writes `svm.pkl` (a pickle: load only runs you trust) and evaluates the validation split
  and `eval.split`; `python -m medjax.evaluate` does not apply (no checkpoint).

Classification metrics (both classifiers): accuracy, balanced accuracy, macro F1 (over the
classes present in the labels or predictions), one-vs-rest ROC AUC per class and their mean
(`auc`), the confusion matrix (rows true, columns predicted, in `OUTCOMES` order), the
majority-class accuracy of the split for reference, and `phase_accuracy` with a phase head.
Reports: `predictions.csv` (video_id, patient_id, outcome, one probability per class,
predicted), `confusion_matrix.png` and `roc_<class>.png`.

Inference on a user's video (`predict_video_folders`, `python -m medjax.predict`): a folder of
frames (`*RUN<k>.jpeg`, k sorted numerically, or any images sorted by name) is read, its
times taken from a time-elapsed CSV when one is found, frames selected and cropped exactly as
the dataset builder does, embedded and classified.

The classify stage finds DIR/embed/ as the sibling of its run directory, which the trainer
tells a task through `save_artifacts` (process 0) and `load_artifacts`. A multi-process
training run must therefore name the embedder with `--config.classify.embedder_dir`.
"""

from __future__ import annotations

import functools
import glob
import json
import math
import os
import pickle
from typing import Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from medjax_datasets.embryo_timelapse import embryo_timelapse as dataset

from medjax import checkpoint as ckpt_lib
from medjax import data as data_lib
from medjax import metrics, models, parallel, plots, writers
from medjax.input import augment as aug
from medjax.input import pipeline
from medjax.models import sequence, vae
from medjax.preprocess.embryo import LOCALIZE_FRAMES, crop_video
from medjax.preprocess.image import ImageReadError, read_grayscale
from medjax.tasks.base import DatasetAccess, Task, apply_model
from medjax.tasks.stages import MissingStageError, load_stage, stage_config

OUTCOMES = dataset.OUTCOMES
PHASES = dataset.PHASES
CONFIG_FILE = "configs/embryo.py"
CLASSIFY_STAGES = {"classify": "stage=classify", "classify_svm": "stage=classify,classifier=svm"}
INDEX_VERSION = 1
EMBEDDINGS_VERSION = 1
EMBEDDER_FILE = "embedder.json"
STATS_FILE = "embedding_stats.json"
SVM_FILE = "svm.pkl"
HOST_KEYS = ("video_id", "patient_id")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".tif", ".tiff", ".bmp")
# BGR colours of the outcomes in pictures; grey for an unknown outcome.
OUTCOME_COLOURS = ((60, 160, 40), (40, 40, 210), (0, 140, 255))


# ============================================================================ data
class EmbryoData(DatasetAccess):
    """The embryo_timelapse dataset, built with the config's options, and a per-split index."""

    BUILD_OPTIONS = dataset.BUILD_OPTIONS
    _index: dict | None = None

    def data_path(self) -> str:
        return os.fspath(self.builder().data_path)

    def index(self) -> dict:
        """Per split: lists `video_id`, `patient_id`, `outcome`, `num_frames`, one per record;
        read once and cached as JSON next to the built dataset."""
        if self._index is None:
            self._index = data_lib.cached_index(
                self.builder(), _index_fields, name="embryo_index", version=INDEX_VERSION
            )
        return self._index

    def split_index(self, split: str) -> dict:
        self.source(split)  # A clear error for a missing split.
        return self.index()[split]

    def labelled(self, split: str) -> list[int]:
        """Records of `split` with a known outcome."""
        return [i for i, o in enumerate(self.split_index(split)["outcome"]) if o >= 0]


def _index_fields(record: dict) -> dict:
    return {
        "video_id": pipeline.decode_text(record["video_id"]),
        "patient_id": pipeline.decode_text(record["patient_id"]),
        "outcome": int(record["outcome"]),
        "num_frames": int(record["frames"].shape[0]),
    }


def _frame_pairs(num_frames: Sequence[int], videos: Sequence[int], per_video: int) -> list:
    """(video, frame) pairs: every frame of each video, or `per_video` evenly spread ones."""
    pairs = []
    for v in videos:
        count = num_frames[v]
        if 0 < per_video < count:
            frames = np.unique(np.linspace(0, count - 1, per_video).round().astype(int))
        else:
            frames = np.arange(count)
        pairs += [(int(v), int(t)) for t in frames]
    return pairs


class _Frames:
    """Single frames of a split's videos as random-access records (picklable)."""

    def __init__(self, source, pairs: Sequence[tuple[int, int]], outcomes: Sequence[int]):
        self.source, self.pairs, self.outcomes = source, list(pairs), list(outcomes)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        video, frame = self.pairs[int(i)]
        return {
            "frame": np.asarray(self.source[video]["frames"][frame], np.uint8),
            "video": np.int32(video),
            "outcome": np.int32(self.outcomes[video]),
        }

    def __repr__(self) -> str:
        return f"_Frames({len(self.pairs)} frames of {len(self.source)} videos)"


def _frame_only(example: dict) -> dict:
    return {"frame": example["frame"]}


def _augment_frame(example: dict, rng: np.random.Generator, *, cfg: dict) -> dict:
    frame, _, _ = aug.random_affine(
        example["frame"],
        None,
        None,
        rng,
        flip_prob=cfg["flip_prob"],
        max_rotate_deg=cfg["rotation_deg"],
        scale_range=(cfg["scale_low"], cfg["scale_high"]),
        max_shift_frac=cfg["shift"],
        border_mode="nearest",
    )
    return {"frame": frame}


# ============================================================================ embed stage
class EmbryoEmbedder(EmbryoData, Task):
    """The frame embedder: `config.model.name` is vae or dae."""

    def __init__(self, config):
        super().__init__(config)
        if config.model.name not in ("vae", "dae"):
            raise ValueError(
                f"config.model.name={config.model.name!r}: the embed stage trains 'vae' or 'dae'."
            )
        self.model = models.build_model(config.model, image_size=config.data.frame_size)
        self.is_vae = config.model.name == "vae"

    def example_batch(self, batch_size):
        size = self.config.data.frame_size
        return {"frame": np.zeros((batch_size, size, size, 1), np.uint8)}

    def model_inputs(self, batch):
        return jnp.asarray(batch["frame"], jnp.float32) / 255.0

    def loss(self, variables, batch, rng):
        x = self.model_inputs(batch)
        latent_rng, noise_rng = jax.random.split(rng)
        out = self.model.apply(
            variables, x, train=True, rngs={"latent": latent_rng, "noise": noise_rng}
        )
        pixels = math.prod(x.shape[1:])
        recon = vae.reconstruction_loss(out["logits"], x, self.config.loss.reconstruction)
        batch_metrics = {"train_recon": jnp.mean(recon) / pixels}
        total = recon
        if self.is_vae:
            kl = vae.gaussian_kl(out["mean"], out["logvar"])
            total = recon + self.config.loss.beta * kl
            batch_metrics["train_kl"] = jnp.mean(kl)
        return jnp.mean(total) / pixels, (batch_metrics, {})

    def eval_step(self, variables, batch):
        x = self.model_inputs(batch)
        out = self.model.apply(variables, x, train=False)
        valid = batch["valid"].astype(jnp.float32)
        pixels = math.prod(x.shape[1:])
        bce = vae.reconstruction_loss(out["logits"], x, "bce")
        mse = vae.reconstruction_loss(out["logits"], x, "mse")
        recon = bce if self.config.loss.reconstruction == "bce" else mse

        def pair(per_example, scale=1.0):
            return jnp.sum(per_example * valid) * scale, jnp.sum(valid)

        result = {
            "recon_bce": pair(bce, 1.0 / pixels),
            "recon_mse": pair(mse, 1.0 / pixels),
            "video": batch["video"],
            "outcome": batch["outcome"],
        }
        if self.is_vae:
            kl = vae.gaussian_kl(out["mean"], out["logvar"])
            result["kl"] = pair(kl)
            result["elbo"] = pair(-(bce + kl))
            result["loss"] = pair(recon + self.config.loss.beta * kl, 1.0 / pixels)
            result["embedding"] = out["mean"]
        else:
            noisy = self._corrupted(x)
            denoised = self.model.apply(variables, noisy, train=False)["logits"]
            result["denoise_mse"] = pair(vae.reconstruction_loss(denoised, x, "mse"), 1 / pixels)
            result["loss"] = pair(recon, 1.0 / pixels)
            result["embedding"] = out["z"]
        return result

    def _corrupted(self, x):
        """The DAE's corruption with a fixed key: evaluation is deterministic."""
        m = self.config.model
        return vae.corrupt(jax.random.key(0), x, m.noise_std, m.mask_prob)

    def finalize_metrics(self, totals, gathered):
        result = super().finalize_metrics(totals, {})
        result["num_frames"] = int(len(gathered["video"]))
        result["num_videos"] = int(len(np.unique(gathered["video"])))
        return result

    def predict(self, variables, batch):
        x = self.model_inputs(batch)
        out = self.model.apply(variables, x, train=False)
        result = {"reconstruction": jax.nn.sigmoid(out["logits"])}
        result["embedding"] = out["mean"] if self.is_vae else out["z"]
        if not self.is_vae:
            noisy = self._corrupted(x)
            result["corrupted"] = noisy
            result["denoised"] = jax.nn.sigmoid(self.model.apply(variables, noisy)["logits"])
        return result

    def train_loader(self, batch_size, seed):
        index = self.split_index("train")
        pairs = _frame_pairs(index["num_frames"], range(len(index["num_frames"])), 0)
        augment = None
        if self.config.augment.enabled:
            a = self.config.augment
            cfg = {
                k: a[k] for k in ("flip_prob", "rotation_deg", "scale_low", "scale_high", "shift")
            }
            augment = functools.partial(_augment_frame, cfg=cfg)
        return pipeline.train_loader(
            _Frames(self.source("train"), pairs, index["outcome"]),
            preprocess=_frame_only,
            augment=augment,
            batch_size=batch_size,
            seed=seed,
            num_workers=self.config.data.num_workers,
        )

    def _eval_frames(self, split: str) -> _Frames:
        """The evaluated frames in a fixed shuffled order, so that the first ones (pictured in
        the report) come from several videos and stages."""
        index = self.split_index(split)
        pairs = _frame_pairs(
            index["num_frames"],
            range(len(index["num_frames"])),
            self.config.eval.frames_per_video,
        )
        order = np.random.default_rng(0).permutation(len(pairs))
        return _Frames(self.source(split), [pairs[i] for i in order], index["outcome"])

    def eval_batches(self, split, batch_size):
        return pipeline.eval_batches(
            self._eval_frames(split), preprocess=lambda r: r, batch_size=batch_size
        )

    def num_examples(self, split):
        return len(self._eval_frames(split)) if split in self.sources() else 0

    def write_report(self, out_dir, samples):
        if not samples:
            return []
        columns = ["frame", "reconstruction"]
        if not self.is_vae:
            columns += ["corrupted", "denoised"]
        rows = []
        for example, _, output in samples:
            images = [example["frame"]] + [output[k] for k in columns[1:]]
            rows.append(np.concatenate([_gray_uint8(image) for image in images], axis=1))
        grid = np.concatenate(rows, axis=0)
        scale = max(1, 96 // self.config.data.frame_size)
        grid = cv2.resize(grid, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        header = np.full((20, grid.shape[1]), 255, np.uint8)
        width = grid.shape[1] // len(columns)
        for i, name in enumerate(columns):
            cv2.putText(header, name, (i * width + 3, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.35, 0, 1)
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "reconstructions.png")
        cv2.imwrite(path, np.concatenate([header, grid], axis=0))
        return [path]

    def write_evaluation(self, out_dir, split, gathered, variables=None):
        index = self.split_index(split)
        videos = np.asarray(gathered["video"])
        embeddings = np.asarray(gathered["embedding"], np.float64)
        order = np.unique(videos)
        means = np.stack([embeddings[videos == v].mean(axis=0) for v in order])
        outcomes = np.array([index["outcome"][v] for v in order])
        coords, explained = pca_2d(means)
        os.makedirs(out_dir, exist_ok=True)
        csv_path = os.path.join(out_dir, "embedding_pca.csv")
        writers.write_csv(
            csv_path,
            [
                {
                    "video_id": index["video_id"][v],
                    "outcome": OUTCOMES[o] if o >= 0 else "",
                    "pc1": round(float(c[0]), 5),
                    "pc2": round(float(c[1]), 5),
                }
                for v, o, c in zip(order, outcomes, coords)
            ],
        )
        png = os.path.join(out_dir, "embedding_pca.png")
        outcome_scatter_png(
            png,
            coords,
            outcomes,
            title=f"Mean embedding per video ({split}, {len(order)} videos)",
            xlabel=f"PC1 ({100 * explained[0]:.0f}% of variance)",
            ylabel=f"PC2 ({100 * explained[1]:.0f}%)",
        )
        return [csv_path, png]


def _gray_uint8(image) -> np.ndarray:
    image = np.asarray(image)[..., 0]
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return image


def pca_2d(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of `points` (N, D) on their first two principal components, and the share
    of the variance each explains (zeros where there is none, e.g. N < 2 or D < 2)."""
    points = np.asarray(points, np.float64)
    centred = points - points.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    coords = np.zeros((len(points), 2))
    k = min(2, vt.shape[0])
    coords[:, :k] = centred @ vt[:k].T
    total = float(np.sum(singular**2))
    explained = np.zeros(2)
    if total > 0:
        explained[:k] = singular[:k] ** 2 / total
    return coords, explained


# ============================================================================ pictures
def outcome_scatter_png(path: str, coords, outcomes, *, title: str, xlabel: str, ylabel: str):
    """A scatter of (N, 2) points coloured by outcome index (-1: unknown), with a legend."""
    plots.group_scatter_png(
        path,
        coords,
        outcomes,
        names=OUTCOMES,
        colours=OUTCOME_COLOURS,
        title=title,
        xlabel=xlabel,
        ylabel=ylabel,
    )


# ============================================================================ metrics
def classification_metrics(probs, labels, num_classes: int = len(OUTCOMES)) -> dict:
    """Video-level metrics from class probabilities (N, K) and true labels (N,).

    Returns:
      accuracy, balanced_accuracy (mean recall over the classes present), macro_f1 (mean F1
      over the classes present in the labels or the predictions, as scikit-learn's
      f1_score(average='macro')), auc_<class> (one-vs-rest ROC AUC, NaN when the split lacks
      the class or has only it), auc (mean of the defined ones), confusion_matrix (K x K
      list, rows true), majority_accuracy (the share of the split's most common class),
      num_videos.
    """
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels, np.int64)
    pred = np.argmax(probs, axis=1)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, pred), 1)
    true_counts, pred_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    hits = np.diag(confusion)
    present = true_counts > 0
    seen = present | (pred_counts > 0)
    denom = true_counts + pred_counts
    f1 = np.where(denom > 0, 2.0 * hits / np.maximum(denom, 1), 0.0)
    result = {
        "accuracy": float(hits.sum() / max(len(labels), 1)),
        "balanced_accuracy": float(np.mean(hits[present] / true_counts[present])),
        "macro_f1": float(np.mean(f1[seen])),
        "confusion_matrix": confusion.tolist(),
        "majority_accuracy": float(true_counts.max() / max(len(labels), 1)),
        "num_videos": int(len(labels)),
    }
    aucs = []
    for k, name in enumerate(OUTCOMES[:num_classes]):
        auc = float(metrics.roc_auc(probs[:, k], labels == k)) if len(labels) else math.nan
        result[f"auc_{name}"] = auc
        if math.isfinite(auc):
            aucs.append(auc)
    result["auc"] = float(np.mean(aucs)) if aucs else math.nan
    return result


def prediction_rows(videos: Sequence[dict], probs) -> list[dict]:
    """predictions.csv rows: video_id, patient_id, outcome, p_<class> ..., predicted."""
    rows = []
    for video, p in zip(videos, np.asarray(probs)):
        row = {
            "video_id": video["video_id"],
            "patient_id": video["patient_id"],
            "outcome": OUTCOMES[int(video["outcome"])],
        }
        row.update({f"p_{name}": round(float(q), 5) for name, q in zip(OUTCOMES, p)})
        row["predicted"] = OUTCOMES[int(np.argmax(p))]
        rows.append(row)
    return rows


def write_classification_report(
    out_dir: str, split: str, videos: Sequence[dict], probs, confusion
) -> list[str]:
    """predictions.csv, confusion_matrix.png and one-vs-rest roc_<class>.png per class."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "predictions.csv")
    writers.write_csv(csv_path, prediction_rows(videos, probs))
    png = os.path.join(out_dir, "confusion_matrix.png")
    plots.confusion_png(png, confusion, OUTCOMES, title=f"Outcome ({split}, {len(videos)} videos)")
    paths = [csv_path, png]
    labels = np.array([int(v["outcome"]) for v in videos])
    for k, name in enumerate(OUTCOMES):
        if 0 < np.sum(labels == k) < len(labels):
            path = os.path.join(out_dir, f"roc_{name}.png")
            plots.roc_png(path, np.asarray(probs)[:, k], labels == k, title=f"{name} ({split})")
            paths.append(path)
    return paths


# ============================================================================ embeddings
class FrameEmbedder:
    """A trained embed stage, loaded for computing frame embeddings.

    Args:
      embed_dir: the embed stage's run directory (DIR/embed).
      checkpoint: 'best', 'latest' or a step.
      batch_size: frames per jit call (the last batch is padded: one compilation).
    """

    def __init__(self, embed_dir: str, checkpoint: str = "best", batch_size: int = 256):
        experiment, stage = os.path.split(os.path.normpath(os.path.abspath(embed_dir)))
        self.config, self.task, variables, self.step = load_stage(
            experiment, stage, config_file=CONFIG_FILE, variant="stage=embed", checkpoint=checkpoint
        )
        self.embed_dir = os.path.join(experiment, stage)
        self.variables = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), variables)
        self.batch_size = int(batch_size)
        model = self.task.model
        self._embed = parallel.jit(
            lambda v, frames: model.apply(
                v, jnp.asarray(frames, jnp.float32) / 255.0, method="embed"
            )
        )

    @property
    def frame_size(self) -> int:
        return int(self.config.data.frame_size)

    @property
    def latent_dim(self) -> int:
        return int(self.config.model.latent_dim)

    def __call__(self, frames) -> np.ndarray:
        """(N, S, S) or (N, S, S, 1) uint8 frames -> (N, latent_dim) float32 embeddings."""
        frames = np.asarray(frames, np.uint8)
        if frames.ndim == 3:
            frames = frames[..., None]
        size = self.frame_size
        if frames.shape[1:] != (size, size, 1):
            raise ValueError(
                f"The embedder in {self.embed_dir} takes {size}x{size} frames; got frames of "
                f"shape {frames.shape[1:]}. Build the dataset with the embed stage's "
                f"data.frame_size={size}."
            )
        batch = self.batch_size  # Always this many rows (zero-padded): one compilation.
        out = []
        # Concrete values even when called while the trainer traces a function (e.g. the
        # feature statistics needed by `example_batch`).
        with jax.ensure_compile_time_eval():
            for start in range(0, len(frames), batch):
                chunk = frames[start : start + batch]
                pad = np.zeros((batch - len(chunk),) + chunk.shape[1:], np.uint8)
                embedded = self._embed(self.variables, np.concatenate([chunk, pad]))
                out.append(np.asarray(embedded)[: len(chunk)])
        if not out:
            return np.zeros((0, self.latent_dim), np.float32)
        return np.concatenate(out).astype(np.float32)


class EmbeddedVideos(EmbryoData):
    """Each labelled video of a split as its per-frame embeddings, from the experiment's
    embed stage; shared by the LSTM and the SVM classifiers."""

    _run_dir: str | None = None
    _embedder: FrameEmbedder | None = None
    _embedder_record: dict | None = None  # EMBEDDER_FILE of the run: which embedder, which step.
    _stats: dict | None = None
    _videos: dict | None = None
    _model = None  # The fine-tuning model, built on the embedder.

    # ---------------------------------------------------------------- the embedder
    def embed_dir(self) -> str:
        """The embed stage's run directory: classify.embedder_dir, or DIR/embed."""
        if self._embedder_record is not None:
            return os.path.normpath(os.path.join(self._run_dir, self._embedder_record["embed_dir"]))
        if self.config.classify.embedder_dir:
            return os.path.abspath(self.config.classify.embedder_dir)
        if self._run_dir is None:
            raise ValueError(
                "The embryo classify stage does not know where its embedder is: pass "
                "--config.classify.embedder_dir=DIR/embed (needed when training with several "
                "processes, where only process 0 is told the run directory)."
            )
        return os.path.join(os.path.dirname(os.path.abspath(self._run_dir)), "embed")

    def embedder(self) -> FrameEmbedder:
        if self._embedder is None:
            checkpoint = self.config.classify.embedder_checkpoint
            if self._embedder_record is not None:
                checkpoint = str(self._embedder_record["step"])
            with jax.ensure_compile_time_eval():  # Restored arrays, even inside a trace.
                self._embedder = FrameEmbedder(
                    self.embed_dir(), checkpoint, self.config.classify.embed_batch_size
                )
            if self._embedder.frame_size != self.config.data.frame_size:
                raise ValueError(
                    f"config.data.frame_size={self.config.data.frame_size} differs from the "
                    f"embed stage's {self._embedder.frame_size} "
                    f"({os.path.join(self._embedder.embed_dir, 'config.json')}); classify "
                    "frames of the size the embedder was trained on."
                )
        return self._embedder

    def _record_path(self, run_dir: str) -> str:
        return os.path.join(run_dir, EMBEDDER_FILE)

    def _attach(self, run_dir: str, resuming: bool) -> None:
        """Remembers the run directory. A trained or resumed run keeps the embedder (and step)
        and the feature statistics it was trained with."""
        self._run_dir = os.path.abspath(run_dir)
        path = self._record_path(run_dir)
        if not (resuming and os.path.isfile(path)):
            return
        with open(path) as f:
            self._embedder_record = json.load(f)
        loaded = self._embedder
        if loaded is not None and (
            loaded.embed_dir != self.embed_dir() or loaded.step != self._embedder_record["step"]
        ):
            self._embedder = self._stats = self._videos = self._model = None
        stats = os.path.join(run_dir, STATS_FILE)
        if os.path.isfile(stats):
            with open(stats) as f:
                self._stats = json.load(f)

    def save_artifacts(self, run_dir):
        checkpoints = os.path.join(run_dir, "checkpoints")
        resuming = os.path.isdir(checkpoints) and bool(
            ckpt_lib.Checkpointer(checkpoints, read_only=True).all_steps()
        )
        self._attach(run_dir, resuming=resuming)
        embedder = self.embedder()
        self._embedder_record = {
            "embed_dir": os.path.relpath(embedder.embed_dir, self._run_dir),
            "step": int(embedder.step),
        }
        writers.write_json(self._record_path(run_dir), self._embedder_record)
        writers.write_json(os.path.join(run_dir, STATS_FILE), self.feature_stats())

    def load_artifacts(self, run_dir):
        if not os.path.isfile(self._record_path(run_dir)):
            raise MissingStageError(
                f"{self._record_path(run_dir)} is missing: {run_dir} is not a trained embryo "
                "classify stage."
            )
        self._attach(run_dir, resuming=True)

    def without_data(self):
        self._stats = {"mean": [0.0] * 32, "std": [1.0] * 32}

    # ---------------------------------------------------------------- embeddings
    def _cache_path(self, split: str) -> str | None:
        return os.path.join(self._run_dir, f"embeddings_{split}.npz") if self._run_dir else None

    def frame_embeddings(self, split: str) -> dict:
        """Every frame of `split` embedded: {'embeddings' (N, D), 'hours' (N,), 'phase' (N,),
        'offsets' (V + 1,)} over the split's records in order; cached in the run directory."""
        embedder = self.embedder()
        key = {
            "version": EMBEDDINGS_VERSION,
            "embed_dir": embedder.embed_dir,
            "step": int(embedder.step),
            "data_path": self.data_path(),
        }
        path = self._cache_path(split)
        if path and os.path.isfile(path):
            with np.load(path) as cached:
                if json.loads(str(cached["key"])) == key:
                    return {k: cached[k] for k in ("embeddings", "hours", "phase", "offsets")}
        source = self.source(split)
        embeddings, frames, hours, phase, offsets = [], [], [], [], [0]
        for i in range(len(source)):
            record = source[i]
            frames.append(np.asarray(record["frames"], np.uint8))
            hours.append(np.asarray(record["hours"], np.float32))
            phase.append(np.asarray(record["phase"], np.int32))
            offsets.append(offsets[-1] + len(hours[-1]))
            if sum(len(f) for f in frames) >= 16 * embedder.batch_size or i == len(source) - 1:
                embeddings.append(embedder(np.concatenate(frames)))
                frames = []
        result = {
            "embeddings": np.concatenate(embeddings),
            "hours": np.concatenate(hours),
            "phase": np.concatenate(phase),
            "offsets": np.asarray(offsets, np.int64),
        }
        if path and jax.process_index() == 0:
            tmp = f"{path}.tmp-{os.getpid()}.npz"
            np.savez(tmp, key=json.dumps(key), **result)
            os.replace(tmp, path)
        logging.info("Embedded %d frames of the %s split.", len(result["hours"]), split)
        return result

    def feature_stats(self) -> dict:
        """Mean and standard deviation of the embeddings over all training frames."""
        if self._stats is None:
            train = self.frame_embeddings("train")
            emb = train["embeddings"].astype(np.float64)
            self._stats = {
                "mean": emb.mean(axis=0).tolist(),
                "std": np.maximum(emb.std(axis=0), 1e-6).tolist(),
            }
        return self._stats

    def features(self, embeddings, hours) -> np.ndarray:
        """Classifier inputs of frames: see `medjax.models.sequence.sequence_features`."""
        stats = self.feature_stats()
        return np.asarray(
            sequence.sequence_features(
                embeddings,
                hours,
                stats["mean"],
                stats["std"],
                max_hours=self.config.data.max_hours,
                use_hours=self.config.classify.use_hours,
            )
        )

    def videos(self, split: str) -> list[dict]:
        """The labelled videos of `split`: video_id, patient_id, outcome, position (their order
        in this list), features (T, F), hours (T,), phase (T,)."""
        if self._videos is None:
            self._videos = {}
        if split not in self._videos:
            index = self.split_index(split)
            frames = self.frame_embeddings(split)
            offsets = frames["offsets"]
            videos = []
            for i in self.labelled(split):
                part = slice(int(offsets[i]), int(offsets[i + 1]))
                videos.append(
                    {
                        "video_id": index["video_id"][i],
                        "patient_id": index["patient_id"][i],
                        "outcome": np.int32(index["outcome"][i]),
                        "position": np.int32(len(videos)),
                        "record": np.int32(i),
                        "features": self.features(
                            frames["embeddings"][part], frames["hours"][part]
                        ).astype(np.float32),
                        "hours": frames["hours"][part],
                        "phase": frames["phase"][part],
                    }
                )
            if not videos:
                raise ValueError(
                    f"The {split} split has no video with a known outcome: nothing to classify."
                )
            self._videos[split] = videos
        return self._videos[split]

    def class_weights_choice(self) -> str:
        choice = self.config.classify.class_weights
        if choice not in ("balanced", "none"):
            raise ValueError(
                f"config.classify.class_weights={choice!r} is not 'balanced' or 'none'."
            )
        return choice

    def class_weights(self) -> np.ndarray:
        """(K,) loss weights: inverse training frequency scaled to average 1 over the videos
        (scikit-learn's 'balanced'), or ones."""
        k = len(OUTCOMES)
        if self.class_weights_choice() == "none":
            return np.ones(k, np.float32)
        outcomes = [self.split_index("train")["outcome"][i] for i in self.labelled("train")]
        counts = np.bincount(outcomes, minlength=k).astype(np.float64)
        weights = np.where(counts > 0, len(outcomes) / (k * np.maximum(counts, 1)), 0.0)
        return weights.astype(np.float32)


# ============================================================================ LSTM classifier
def _pad_sequence(video: dict, *, length: int, host: bool) -> dict:
    """A video's features, phases and length, zero- (phase: -1-) padded to `length` steps."""
    features = np.asarray(video["features"], np.float32)
    steps = len(features)
    if steps > length:
        raise ValueError(
            f"Video {video['video_id']} has {steps} frames, more than data.max_frames={length}."
        )
    example = {
        "features": np.pad(features, ((0, length - steps), (0, 0))),
        "phase": np.pad(
            np.asarray(video["phase"], np.int32), (0, length - steps), constant_values=-1
        ),
        "lengths": np.int32(steps),
        "outcome": np.int32(video["outcome"]),
    }
    if host:
        example.update(
            position=np.int32(video["position"]),
            video_id=video["video_id"],
            patient_id=video["patient_id"],
        )
    return example


def _pad_record(record: dict, *, length: int, positions: dict | None = None) -> dict:
    """A dataset record as frames, hours, phases and length, zero- (phase: -1-) padded to
    `length` steps; with `positions` ({video_id: position}), also the host fields."""
    frames = np.asarray(record["frames"], np.uint8)
    steps = len(frames)
    if steps > length:
        raise ValueError(f"A video has {steps} frames, more than data.max_frames={length}.")
    pad = length - steps
    example = {
        "frames": np.pad(frames, ((0, pad), (0, 0), (0, 0), (0, 0))),
        "hours": np.pad(np.asarray(record["hours"], np.float32), (0, pad)),
        "phase": np.pad(np.asarray(record["phase"], np.int32), (0, pad), constant_values=-1),
        "lengths": np.int32(steps),
        "outcome": np.int32(record["outcome"]),
    }
    if positions is not None:
        video_id = pipeline.decode_text(record["video_id"])
        example.update(
            position=np.int32(positions[video_id]),
            video_id=video_id,
            patient_id=pipeline.decode_text(record["patient_id"]),
        )
    return example


def _noisy_features(example: dict, rng: np.random.Generator, *, std: float, dims: int) -> dict:
    """Gaussian noise on the embedding columns (not the time column) of the valid steps."""
    features = example["features"].copy()
    steps = int(example["lengths"])
    features[:steps, :dims] += rng.normal(0.0, std, (steps, dims)).astype(np.float32)
    return {**example, "features": features}


class EmbryoClassifier(EmbeddedVideos, Task):
    """Outcome (and optionally per-frame phase) of embryo videos with an LSTM over frame
    embeddings; with classify.finetune_embedder, the encoder and the LSTM end to end."""

    def __init__(self, config):
        super().__init__(config)
        if config.model.num_phases not in (0, len(PHASES)):
            raise ValueError(
                f"config.model.num_phases={config.model.num_phases}: use 0 (no phase head) or "
                f"{len(PHASES)}, the annotated phases."
            )
        if (config.classify.phase_weight > 0) != (config.model.num_phases > 0):
            raise ValueError(
                f"config.classify.phase_weight={config.classify.phase_weight} and "
                f"config.model.num_phases={config.model.num_phases} disagree: the phase head "
                "needs both (the phase_head variant sets them)."
            )
        self.head = models.build_model(config.model)
        self.finetune = bool(config.classify.finetune_embedder)

    @property
    def model(self):
        if not self.finetune:
            return self.head
        if self._model is None:
            stats = self.feature_stats()
            self._model = sequence.FrameSequenceClassifier(
                backbone=self.embedder().task.model,
                head=self.head,
                feature_mean=tuple(stats["mean"]),
                feature_std=tuple(stats["std"]),
                max_hours=self.config.data.max_hours,
                use_hours=self.config.classify.use_hours,
            )
        return self._model

    def _num_features(self) -> int:
        return len(self.feature_stats()["mean"]) + int(self.config.classify.use_hours)

    def example_batch(self, batch_size):
        steps = self.config.data.max_frames
        batch = {
            "lengths": np.full((batch_size,), steps, np.int32),
            "outcome": np.zeros((batch_size,), np.int32),
            "phase": np.full((batch_size, steps), -1, np.int32),
        }
        if self.finetune:
            size = self.config.data.frame_size
            batch["frames"] = np.zeros((batch_size, steps, size, size, 1), np.uint8)
            batch["hours"] = np.zeros((batch_size, steps), np.float32)
        else:
            batch["features"] = np.zeros((batch_size, steps, self._num_features()), np.float32)
        return batch

    def init_variables(self, rng, batch):
        variables = dict(super().init_variables(rng, batch))
        if self.finetune:  # The encoder starts as the embed stage's.
            params = dict(variables["params"])
            encoder = self.embedder().variables["params"]["encoder"]
            params["backbone"] = {"encoder": jax.tree.map(jnp.asarray, encoder)}
            variables["params"] = params
        return variables

    def model_inputs(self, batch):
        if self.finetune:
            return {
                "frames": jnp.asarray(batch["frames"], jnp.float32) / 255.0,
                "hours": batch["hours"],
                "lengths": batch["lengths"],
            }
        return {"features": batch["features"], "lengths": batch["lengths"]}

    def _apply(self, variables, batch, train, rng=None):
        return apply_model(self.model, variables, self.model_inputs(batch), train=train, rng=rng)

    def _phase_terms(self, out, batch):
        """Per-example summed phase cross-entropy, correct predictions and annotated steps."""
        phase = batch["phase"]
        annotated = (phase >= 0) & sequence.step_mask(batch["lengths"], phase.shape[1])
        ce = optax.softmax_cross_entropy_with_integer_labels(
            out["phase_logits"].astype(jnp.float32), jnp.maximum(phase, 0)
        )
        correct = jnp.argmax(out["phase_logits"], axis=-1) == phase
        weight = annotated.astype(jnp.float32)
        return (
            jnp.sum(ce * weight, axis=1),
            jnp.sum(correct * weight, axis=1),
            jnp.sum(weight, axis=1),
        )

    def loss(self, variables, batch, rng):
        out, model_state = self._apply(variables, batch, train=True, rng=rng)
        logits = out["logits"].astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["outcome"])
        weights = jnp.asarray(self.class_weights())[batch["outcome"]]
        loss = jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1e-6)
        batch_metrics = {
            "train_accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["outcome"]),
            "train_outcome_loss": loss,
        }
        if "phase_logits" in out:
            phase_ce, correct, count = self._phase_terms(out, batch)
            total = jnp.maximum(jnp.sum(count), 1.0)
            phase_loss = jnp.sum(phase_ce) / total
            loss = loss + self.config.classify.phase_weight * phase_loss
            batch_metrics["train_phase_loss"] = phase_loss
            batch_metrics["train_phase_accuracy"] = jnp.sum(correct) / total
        return loss, (batch_metrics, dict(model_state))

    def eval_step(self, variables, batch):
        out, _ = self._apply(variables, batch, train=False)
        logits = out["logits"].astype(jnp.float32)
        valid = batch["valid"].astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["outcome"])
        result = {
            "loss": (jnp.sum(ce * valid), jnp.sum(valid)),
            "probs": jax.nn.softmax(logits),
            "outcome": batch["outcome"],
            "position": batch["position"],
        }
        if "phase_logits" in out:
            _, correct, count = self._phase_terms(out, batch)
            result["phase_accuracy"] = (jnp.sum(correct * valid), jnp.sum(count * valid))
        return result

    def finalize_metrics(self, totals, gathered):
        result = classification_metrics(gathered["probs"], gathered["outcome"])
        result.update(super().finalize_metrics(totals, {}))
        return result

    def predict(self, variables, batch):
        out, _ = self._apply(variables, batch, train=False)
        result = {"probs": jax.nn.softmax(out["logits"].astype(jnp.float32))}
        if "phase_logits" in out:
            result["phase"] = jnp.argmax(out["phase_logits"], axis=-1)
        return result

    def _finetune_records(self, split: str) -> pipeline.Subset:
        return pipeline.Subset(self.source(split), self.labelled(split))

    def train_loader(self, batch_size, seed):
        length = self.config.data.max_frames
        if self.finetune:
            source = self._finetune_records("train")
            preprocess = functools.partial(_pad_record, length=length)
            augment = None
        else:
            source = self.videos("train")
            preprocess = functools.partial(_pad_sequence, length=length, host=False)
            augment = None
            if self.config.classify.feature_noise > 0:
                augment = functools.partial(
                    _noisy_features,
                    std=self.config.classify.feature_noise,
                    dims=len(self.feature_stats()["mean"]),
                )
        return pipeline.train_loader(
            source,
            preprocess=preprocess,
            augment=augment,
            batch_size=batch_size,
            seed=seed,
            num_workers=self.config.data.num_workers,
        )

    def eval_batches(self, split, batch_size):
        length = self.config.data.max_frames
        if self.finetune:
            index = self.split_index(split)
            positions = {index["video_id"][i]: p for p, i in enumerate(self.labelled(split))}
            return pipeline.eval_batches(
                self._finetune_records(split),
                preprocess=functools.partial(_pad_record, length=length, positions=positions),
                batch_size=batch_size,
                host_keys=HOST_KEYS,
            )
        return pipeline.eval_batches(
            self.videos(split),
            preprocess=functools.partial(_pad_sequence, length=length, host=True),
            batch_size=batch_size,
            host_keys=HOST_KEYS,
        )

    def _video_info(self, split: str) -> list[dict]:
        index = self.split_index(split)
        return [
            {k: index[k][i] for k in ("video_id", "patient_id", "outcome")}
            for i in self.labelled(split)
        ]

    def num_examples(self, split):
        return len(self.labelled(split)) if split in self.sources() else 0

    def write_evaluation(self, out_dir, split, gathered, variables=None):
        order = np.argsort(gathered["position"], kind="stable")
        info = self._video_info(split)
        videos = [info[int(gathered["position"][k])] for k in order]
        probs = np.asarray(gathered["probs"])[order]
        result = classification_metrics(probs, [v["outcome"] for v in videos])
        return write_classification_report(
            out_dir, split, videos, probs, result["confusion_matrix"]
        )


# ============================================================================ SVM classifier
class SvmVideos(EmbeddedVideos):
    """The embedded videos of an SVM classify run (no gradient training)."""

    def __init__(self, config):
        self.config = config


def _svm_video_probabilities(svm: dict, videos: Sequence[dict], rule: str) -> np.ndarray:
    """(V, K) class probabilities of videos from their frames' (see `fit_svm`).

    Args:
      svm: {'classifier': the fitted scikit-learn classifier, 'weights': (K,) multipliers of
        the video probabilities (the prior shift), renormalised after}.
      videos: dicts with 'features' (T, F).
      rule: 'mean' (frame probabilities averaged) or 'vote' (shares of the frames' argmax).
    """
    k = len(OUTCOMES)
    classifier, weights = svm["classifier"], np.asarray(svm["weights"], np.float64)
    out = np.zeros((len(videos), k))
    for v, video in enumerate(videos):
        frame_probs = np.zeros((len(video["features"]), k))
        frame_probs[:, classifier.classes_] = classifier.predict_proba(video["features"])
        if rule == "vote":
            probs = np.bincount(frame_probs.argmax(axis=1), minlength=k) / len(frame_probs)
        else:
            probs = frame_probs.mean(axis=0)
        probs = probs * weights
        out[v] = probs / max(probs.sum(), 1e-12)
    return out


def _svm_training_frames(videos: Sequence[dict], per_video: int) -> tuple[np.ndarray, np.ndarray]:
    features, labels = [], []
    for video in videos:
        count = len(video["features"])
        picks = np.arange(count)
        if 0 < per_video < count:
            picks = np.unique(np.linspace(0, count - 1, per_video).round().astype(int))
        features.append(video["features"][picks])
        labels.append(np.full(len(picks), int(video["outcome"])))
    return np.concatenate(features), np.concatenate(labels)


def fit_svm(config, workdir: str) -> dict:
    """Fits the SVM classify stage in run directory `workdir` and evaluates it.

    Writes config.json, embedder.json, embedding_stats.json, the embeddings cache, svm.pkl,
    and eval/<split>/ (metrics.json, predictions.csv, confusion_matrix.png, roc_<class>.png)
    for the validation split (when there is one) and `config.eval.split`.

    Returns:
      The metrics of `config.eval.split` (with 'split', 'classifier' and 'embedder_step').
    """
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if config.model.video_rule not in ("mean", "vote"):
        raise ValueError(
            f"config.model.video_rule={config.model.video_rule!r} is not 'mean' or 'vote'."
        )
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        writers.write_json(
            os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort())
        )
    videos = SvmVideos(config)
    if config.eval.split not in videos.sources():
        raise ValueError(
            f"config.eval.split={config.eval.split!r} is not a split of the dataset "
            f"({', '.join(videos.sources())})."
        )
    videos.save_artifacts(workdir)
    features, labels = _svm_training_frames(videos.videos("train"), config.model.frames_per_video)
    # Platt-scaled probabilities (what SVC(probability=True) gives, which scikit-learn 1.9
    # deprecates): sigmoids fitted on 3-fold cross-validated decision values, then one SVC
    # fitted on all frames. The scaler standardises every column, the time too, so that it
    # weighs in the kernel like each (already standardised) embedding dimension.
    classifier = CalibratedClassifierCV(
        make_pipeline(
            StandardScaler(), SVC(C=config.model.C, kernel=config.model.kernel, gamma="scale")
        ),
        method="sigmoid",
        cv=3,
        ensemble=False,
    )
    logging.info(
        "Fitting an SVM on %d frames of %d videos.", len(labels), len(videos.videos("train"))
    )
    classifier.fit(features, labels)
    # Calibrated frame probabilities carry the training class frequencies; 'balanced' divides
    # them out of a video's probabilities, the decision a balanced training set would give.
    weights = np.ones(len(OUTCOMES))
    if videos.class_weights_choice() == "balanced":
        frequency = np.bincount(labels, minlength=len(OUTCOMES)) / len(labels)
        weights = np.where(frequency > 0, 1.0 / np.maximum(frequency, 1e-12), 0.0)
    svm = {"classifier": classifier, "weights": weights.tolist()}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, SVM_FILE), "wb") as f:
            pickle.dump(svm, f)
    result = {}
    splits = [s for s in ("validation", config.eval.split) if s in videos.sources()]
    for split in dict.fromkeys(splits):
        split_videos = videos.videos(split)
        probs = _svm_video_probabilities(svm, split_videos, config.model.video_rule)
        result = classification_metrics(probs, [v["outcome"] for v in split_videos])
        result.update(
            split=split, classifier="svm", embedder_step=int(videos.embedder().step), step=0
        )
        if jax.process_index() == 0:
            out_dir = os.path.join(workdir, "eval", split)
            writers.write_json(os.path.join(out_dir, "metrics.json"), result)
            write_classification_report(
                out_dir, split, split_videos, probs, result["confusion_matrix"]
            )
            logging.info("SVM on %s: %s", split, _metric_line(result))
    if jax.process_index() == 0:
        print(
            f"\nDone. SVM on {config.eval.split}: {_metric_line(result)}\n"
            f"  model:   {os.path.join(workdir, SVM_FILE)}\n"
            f"  metrics: {os.path.join(workdir, 'eval', config.eval.split, 'metrics.json')}"
        )
    return result


def _metric_line(result: dict) -> str:
    names = ("accuracy", "macro_f1", "auc", "majority_accuracy")
    return ", ".join(f"{k}={result[k]:.4f}" for k in names)


# ============================================================================ task registry
def make_task(config):
    """The Task of an embryo config (medjax.tasks.TASKS['embryo'])."""
    if config.stage == "embed":
        return EmbryoEmbedder(config)
    if config.stage == "classify":
        return EmbryoClassifier(config)
    if config.stage == "classify_svm":
        raise ValueError(
            "The embryo SVM (stage=classify,classifier=svm) is fitted without the gradient "
            "trainer and has no checkpoint: `python -m medjax.main --config=configs/embryo.py:"
            "stage=classify,classifier=svm --workdir=DIR` fits and evaluates it into "
            "DIR/classify_svm/."
        )
    raise ValueError(
        f"config.stage={config.stage!r} is not an embryo stage (embed, classify, classify_svm)."
    )


# ============================================================================ inference
def _find_time_file(folder: str, video: str) -> str | None:
    """A time-elapsed CSV for a video folder: in the folder, or in the public layout's
    embryo_dataset_time_elapsed/ next to the folder's parent."""
    candidates = sorted(glob.glob(os.path.join(folder, "*timeElapsed*.csv")))
    candidates.append(
        os.path.join(os.path.dirname(folder), "..", dataset.TIMES_DIR, f"{video}_timeElapsed.csv")
    )
    for path in candidates:
        if os.path.isfile(path):
            return os.path.normpath(path)
    return None


def read_video_folder(folder: str, data_cfg) -> dict:
    """Reads, selects and crops the frames of one video folder as the dataset builder does.

    Frames are the files named `*RUN<k>.jpeg` (or .jpg), k sorted numerically, or when there
    are none, every image file sorted by name. Times come from a time-elapsed CSV (see
    `_find_time_file`); without one, frames are taken as evenly spaced over the first
    `max_hours` hours (with a warning). Truncated JPEGs and undecodable or odd-sized frames
    are skipped with a warning naming them.

    Returns:
      {video_id, frames (T, S, S) uint8, hours (T,), frame_numbers (T,), circle, localization,
      time_file, warnings}.

    Raises:
      ValueError: the folder does not exist or holds no usable frame.
    """
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} is not a folder of video frames (*RUN<k>.jpeg or images).")
    video = os.path.basename(folder)
    warnings: list[str] = []
    numbered, _ = dataset.list_frames(folder)
    duplicates = {k: paths for k, paths in numbered.items() if len(paths) > 1}
    if duplicates:
        k, paths = min(duplicates.items())
        raise ValueError(
            f"{folder}: frame number RUN{k} has several files ({', '.join(paths)}); keep one."
        )
    if numbered:
        numbers = sorted(numbered)
        paths = [numbered[k][0] for k in numbers]
    else:
        paths = sorted(
            os.path.join(folder, name)
            for name in os.listdir(folder)
            if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")
        )
        numbers = list(range(1, len(paths) + 1))
    if not paths:
        raise ValueError(f"{folder} holds no frames (*RUN<k>.jpeg files or images).")

    time_file = _find_time_file(folder, video) if numbered else None
    max_hours = float(data_cfg.max_hours)
    if time_file:
        times = dataset.read_times(time_file)
        untimed = [k for k in numbers if k not in times]
        if untimed:
            warnings.append(f"{len(untimed)} frames have no time in {time_file}; skipped.")
        keep = [i for i, k in enumerate(numbers) if k in times]
        paths, numbers = [paths[i] for i in keep], [numbers[i] for i in keep]
        hours = np.array([times[k] for k in numbers], np.float64)
        if np.any(np.diff(hours) < 0):
            raise ValueError(f"{time_file}: times decrease with the frame number; fix the file.")
    else:
        # Spread by frame number (a missing frame leaves a gap), or by position.
        steps = np.asarray(numbers, np.float64) - numbers[0]
        hours = steps / max(steps[-1], 1.0) * max_hours
        warnings.append(
            f"No time-elapsed file found for {folder}: its {len(paths)} frames are taken as "
            f"evenly spaced over the first {max_hours:g} h."
        )
    within = hours <= max_hours
    paths = [p for p, w in zip(paths, within) if w]
    numbers = [k for k, w in zip(numbers, within) if w]
    hours = hours[within]
    complete = []
    for i, path in enumerate(paths):
        if path.lower().endswith((".jpg", ".jpeg")) and not dataset.jpeg_is_complete(path):
            warnings.append(f"Skipped truncated JPEG {path}.")
        else:
            complete.append(i)
    chosen = [complete[i] for i in dataset.select_frames(hours[complete], data_cfg.max_frames)]
    decoded, kept = [], []
    for i in chosen:
        try:
            decoded.append(read_grayscale(paths[i]))
            kept.append(i)
        except ImageReadError as e:
            warnings.append(f"Skipped frame: {e}")
    if not decoded:
        raise ValueError(f"{folder}: no frame within {max_hours:g} h could be read.")
    shape = max({f.shape for f in decoded}, key=[f.shape for f in decoded].count)
    same = [j for j, f in enumerate(decoded) if f.shape == shape]
    for j, f in enumerate(decoded):
        if f.shape != shape:
            warnings.append(
                f"Skipped {paths[kept[j]]}: {f.shape[1]}x{f.shape[0]}, unlike the others."
            )
    if len(same) < data_cfg.min_frames:
        warnings.append(
            f"Only {len(same)} usable frames, fewer than the {data_cfg.min_frames} the training "
            "videos had at least; the prediction is less reliable."
        )
    crops, circle = crop_video(
        [decoded[j] for j in same], data_cfg.frame_size, num_localize=LOCALIZE_FRAMES
    )
    if circle.method == "centre":
        warnings.append("No embryo was found in the frames; they were cropped at the centre.")
    kept = [kept[j] for j in same]
    return {
        "video_id": video,
        "frames": crops,
        "hours": hours[kept].astype(np.float32),
        "frame_numbers": [int(numbers[i]) for i in kept],
        "circle": [float(v) for v in circle[:3]],
        "localization": circle.method,
        "time_file": time_file,
        "warnings": warnings,
    }


class EmbryoPredictor:
    """A trained classify stage (LSTM or SVM) and its embedder, loaded for inference.

    Args:
      workdir: the experiment directory (holding embed/ and classify/ or classify_svm/).
      checkpoint: 'best', 'latest' or a step of the LSTM stage.
      stage: 'classify' or 'classify_svm'; None takes classify when trained, else classify_svm.
    """

    def __init__(self, workdir: str, checkpoint: str = "best", stage: str | None = None):
        if stage is None:
            trained = [
                s
                for s in CLASSIFY_STAGES
                if os.path.isfile(os.path.join(workdir, s, "config.json"))
            ]
            stage = trained[0] if trained else "classify"
        if stage not in CLASSIFY_STAGES:
            raise ValueError(f"stage={stage!r} is not one of {', '.join(CLASSIFY_STAGES)}.")
        self.stage = stage
        run_dir = os.path.join(workdir, stage)
        if stage == "classify":
            self.config, self.task, variables, self.step = load_stage(
                workdir,
                stage,
                config_file=CONFIG_FILE,
                variant=CLASSIFY_STAGES[stage],
                checkpoint=checkpoint,
            )
            self.variables = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), variables)
            self._predict = parallel.jit(self.task.predict)
            self.classifier = "lstm"
        else:
            self.config = stage_config(workdir, stage, CONFIG_FILE, CLASSIFY_STAGES[stage])
            self.task = SvmVideos(self.config)
            path = os.path.join(run_dir, SVM_FILE)
            if not os.path.isfile(path):
                raise MissingStageError(
                    f"{path} is missing; fit it with: python -m medjax.main "
                    f"--config={CONFIG_FILE}:{CLASSIFY_STAGES[stage]} --workdir={workdir}"
                )
            self.task.load_artifacts(run_dir)
            with open(path, "rb") as f:
                self.svm = pickle.load(f)
            self.step = 0
            self.classifier = "svm"
        self.embedder = self.task.embedder()

    def classify(self, frames: np.ndarray, hours: np.ndarray) -> dict:
        """Class probabilities of one video.

        Args:
          frames: (T, S, S) uint8 embryo crops of side data.frame_size, in time order.
          hours: (T,) their times since insemination.

        Returns:
          {'probabilities': {outcome: p}, 'predicted': outcome, and with a phase head
          'phases': the predicted phase name of each frame}.
        """
        frames = np.asarray(frames, np.uint8)
        hours = np.asarray(hours, np.float32)
        phases = None
        if self.classifier == "svm":
            features = self.task.features(self.embedder(frames), hours)
            video = {"features": features}
            probs = _svm_video_probabilities(self.svm, [video], self.config.model.video_rule)[0]
        else:
            length = self.config.data.max_frames
            video = {
                "video_id": "input",
                "outcome": 0,
                "phase": np.full(len(frames), -1, np.int32),
            }
            if self.task.finetune:
                record = {**video, "frames": frames[..., None], "hours": hours}
                batch = _pad_record(record, length=length)
            else:
                video["features"] = self.task.features(self.embedder(frames), hours)
                batch = _pad_sequence(video, length=length, host=False)
            batch = {k: np.asarray(v)[None] for k, v in batch.items()}
            out = jax.device_get(self._predict(self.variables, batch))
            probs = np.asarray(out["probs"][0], np.float64)
            if "phase" in out:
                phases = [PHASES[int(p)] for p in out["phase"][0][: len(frames)]]
        result = {
            "probabilities": {name: round(float(p), 5) for name, p in zip(OUTCOMES, probs)},
            "predicted": OUTCOMES[int(np.argmax(probs))],
        }
        if phases is not None:
            result["phases"] = phases
        return result


def predict_video_folders(
    workdir: str,
    folders: Sequence[str],
    out_dir: str,
    *,
    checkpoint: str = "best",
    stage: str | None = None,
) -> list[dict]:
    """Classifies each video folder; writes <out_dir>/<video>.json; returns the reports.

    A report holds the folder, the classifier (lstm or svm) and its stage, the class
    probabilities and the predicted outcome, the frames used (numbers and hours), the crop
    circle and how it was found, and warnings.
    """
    missing = [folder for folder in folders if not os.path.isdir(folder)]
    if missing:
        raise ValueError(
            f"Not a folder of video frames: {', '.join(missing)}. Name folders holding a "
            "video's frames (*RUN<k>.jpeg, or images sorted by name)."
        )
    predictor = EmbryoPredictor(workdir, checkpoint, stage)
    os.makedirs(out_dir, exist_ok=True)
    reports = []
    for folder in folders:
        video = read_video_folder(folder, predictor.config.data)
        result = predictor.classify(video["frames"], video["hours"])
        report = {
            "file": os.path.abspath(folder),
            "video_id": video["video_id"],
            "classifier": predictor.classifier,
            "stage": predictor.stage,
            "step": int(predictor.step),
            "embedder_step": int(predictor.embedder.step),
            **result,
            "num_frames": len(video["frame_numbers"]),
            "frame_numbers": video["frame_numbers"],
            "hours": [round(float(h), 3) for h in video["hours"]],
            "time_file": video["time_file"],
            "circle": video["circle"],
            "localization": video["localization"],
            "warnings": video["warnings"],
        }
        writers.write_json(os.path.join(out_dir, f"{video['video_id']}.json"), report)
        reports.append(report)
    return reports


def summary(report: dict) -> str:
    """One line about a predicted video."""
    probs = ", ".join(f"{name} {p:.2f}" for name, p in report["probabilities"].items())
    return f"{report['predicted']} ({probs}; {report['classifier']}, {report['num_frames']} frames)"
