"""EchoNet-Dynamic tasks: ejection fraction from echo video, and LV segmentation.

- `ef` stage (`EchonetEF`): an R(2+1)D regressor on clips of `data.clip_length` frames taken
  every `data.clip_period` frames (32 and 2 in the paper). Training: a random start per video,
  short videos zero-padded, the clip zero-padded by `data.pad` pixels and randomly cropped
  back, per-channel normalisation by the mean / std measured on the training split, MSE loss,
  the head's bias starting at the training mean EF. Evaluation: one clip per video (at a
  start drawn once per video from a fixed seed) and the average over all clips (every
  `eval.clip_stride`-th start; 1 = all, the paper's test-time augmentation); MAE, RMSE, R²
  (the usual coefficient of determination, and the squared Pearson correlation that the
  EchoNet code reports), each with a bootstrap 95 % CI, and the AUC of detecting EF <
  `eval.hfref_threshold` (HFrEF). Reports: per-video predictions CSV, scatter, Bland-Altman
  and ROC plots.
- `segment` stage (`EchonetSegmentation`): DeepLabv3 on the traced end-diastolic (large) and
  end-systolic (small) frames; Dice per image, and pooled over all pixels of the split overall,
  at ED and at ES (as the EchoNet code reports it).

Both read the `echonet_dynamic` TFDS dataset (decoded once at build time) built from
`data.manual_dir`, or from synthetic videos in the same layout. A small per-split index (EF,
frame count, traced or not) and the training statistics are cached as JSON next to the built
dataset, so nothing re-reads every video twice. Videos without an EF (converted from a
user's DICOM, say) are left out of EF training and evaluation; videos without two tracings
are left out of segmentation.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medjax import data as data_lib
from medjax import models, parallel, plots, writers
from medjax.input import clips as clip_lib
from medjax.input import pipeline
from medjax.tasks.base import DatasetAccess, Task, apply_model
from medjax.tasks.segmentation import SegmentationTask

INDEX_VERSION = 1
_BOOTSTRAP_SEED = 0


# ============================================================================ data
class _TracedFrames:
    """Each traced video as two records, its large (ED) and small (ES) traced frame."""

    def __init__(self, source, indices: Sequence[int]):
        self.source, self.indices = source, [int(i) for i in indices]

    def __len__(self) -> int:
        return 2 * len(self.indices)

    def __getitem__(self, i: int) -> dict:
        video_index, phase = divmod(int(i), 2)
        record = self.source[self.indices[video_index]]
        which = "large" if phase == 0 else "small"
        return {
            "image": record["video"][int(record[f"{which}_frame"])],
            "mask": record[f"{which}_mask"],
            "phase": np.int32(phase),  # 0: end-diastole (large), 1: end-systole (small).
            "video_index": np.int32(self.indices[video_index]),
            "filename": record["filename"],
        }

    def __repr__(self) -> str:
        return f"_TracedFrames({len(self)} frames of {len(self.source)} videos)"


def _index_fields(record: dict) -> dict:
    return {
        "ef": float(record["ef"]),
        "num_frames": int(record["video"].shape[0]),
        "traced": bool(record["has_tracings"]),
        "filename": pipeline.decode_text(record["filename"]),
    }


class EchonetData(DatasetAccess):
    """The echonet_dynamic dataset with its per-split index and training statistics."""

    BUILD_OPTIONS = ("skip_missing_videos",)
    _index: dict | None = None

    def _cache_path(self, name: str) -> str:
        return os.path.join(os.fspath(self.builder().data_path), f"medjax_{name}.json")

    def index(self) -> dict:
        """Per split: lists `ef`, `num_frames`, `traced`, `filename` (one entry per record)."""
        if self._index is None:
            self._index = data_lib.cached_index(
                self.builder(), _index_fields, version=INDEX_VERSION
            )
        return self._index

    def labelled(self, split: str) -> list[int]:
        """Records of `split` with a finite EF."""
        return [i for i, ef in enumerate(self.index()[split]["ef"]) if math.isfinite(ef)]

    def traced(self, split: str) -> list[int]:
        return [i for i, traced in enumerate(self.index()[split]["traced"]) if traced]

    _stats: dict | None = None
    STATS_FILE = "train_stats.json"

    def save_artifacts(self, run_dir):
        writers.write_json(os.path.join(run_dir, self.STATS_FILE), self.train_stats())

    def without_data(self):
        self._stats = {"mean": [128.0], "std": [64.0], "mean_ef": 55.0}

    def load_artifacts(self, run_dir):
        path = os.path.join(run_dir, self.STATS_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                self._stats = json.load(f)

    def train_stats(self) -> dict:
        """Per-channel pixel mean / std (0-255 scale) over sampled training videos, and the
        training mean EF; computed once, then read from the cache next to the dataset. A run
        keeps its own copy (`save_artifacts`), which evaluation and inference use."""
        if self._stats is not None:
            return self._stats
        cfg = self.config.data
        path = self._cache_path(f"stats_{cfg.stats_videos}")
        if os.path.isfile(path):
            with open(path) as f:
                self._stats = json.load(f)
            return self._stats
        labelled = self.labelled("train")
        if not labelled:
            raise ValueError("The training split has no video with an EF: nothing to train on.")
        source = self.source("train")
        picks = np.unique(np.linspace(0, len(source) - 1, min(cfg.stats_videos, len(source))))
        total, total_sq, count = 0.0, 0.0, 0
        for i in picks.astype(int):
            video = source[int(i)]["video"].astype(np.float64)
            total += video.sum(axis=(0, 1, 2))
            total_sq += np.square(video).sum(axis=(0, 1, 2))
            count += video.shape[0] * video.shape[1] * video.shape[2]
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-6))
        efs = np.array(self.index()["train"]["ef"])[labelled]
        stats = {
            "mean": np.atleast_1d(mean).tolist(),
            "std": np.atleast_1d(std).tolist(),
            "mean_ef": float(efs.mean()),
        }
        if jax.process_index() == 0:
            writers.write_json(path, stats)
        self._stats = stats
        return stats

    def num_examples(self, split):
        return len(self.labelled(split))


# ============================================================================ EF regression
def _ef_train_preprocess(record: dict) -> dict:
    return {"video": record["video"], "ef": np.float32(record["ef"])}


def _ef_augment(example: dict, rng: np.random.Generator, *, cfg: dict) -> dict:
    """Random clip start, then resize and the random pad-and-crop shift."""
    video = example["video"]
    length, period = cfg["clip_length"], cfg["clip_period"]
    start = int(rng.integers(clip_lib.num_starts(video.shape[0], length, period)))
    clip = clip_lib.take_clip(video, start, length, period)
    clip = clip_lib.resize_frames(clip, cfg["frame_size"])
    clip = clip_lib.random_pad_crop(clip, cfg["pad"], rng)
    return {"clip": clip, "ef": example["ef"]}


def eval_clip_starts(
    num_frames: int, video_index: int, *, length: int, period: int, stride: int, max_clips: int
) -> tuple[int, list[int]]:
    """(single-clip start, all-clips starts) of one video in evaluation.

    The single clip starts at a position drawn once per video from a fixed seed (the
    reference draws it at random each time); all-clips uses every `stride`-th start, at most
    `max_clips` of them evenly spread when `max_clips` > 0.
    """
    count = clip_lib.num_starts(num_frames, length, period)
    single = int(np.random.default_rng([_BOOTSTRAP_SEED, video_index]).integers(count))
    starts = list(range(0, count, max(1, stride)))
    if max_clips > 0 and len(starts) > max_clips:
        starts = [starts[int(i)] for i in np.linspace(0, len(starts) - 1, max_clips).round()]
    return single, starts


def bootstrap_ci(
    y_true: np.ndarray, y_pred: np.ndarray, fn, samples: int, seed: int = _BOOTSTRAP_SEED
) -> tuple[float, float, float]:
    """`fn(y_true, y_pred)` and its bootstrap 95 % interval (2.5th, 97.5th percentiles) over
    `samples` resamples of the pairs with replacement (EchoNet-Dynamic's `bootstrap`)."""
    value = float(fn(y_true, y_pred))
    n = len(y_true)
    if n < 2 or samples <= 0:
        return value, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats = []
    for chunk in np.array_split(np.arange(samples), max(1, samples * n // 2_000_000)):
        picks = rng.integers(0, n, size=(len(chunk), n))
        stats.append(fn(y_true[picks], y_pred[picks]))
    stats = np.concatenate(stats)
    stats = stats[np.isfinite(stats)]
    low, high = np.percentile(stats, [2.5, 97.5]) if stats.size else (np.nan, np.nan)
    return value, float(low), float(high)


def mae(y, p):
    return np.mean(np.abs(p - y), axis=-1)


def rmse(y, p):
    return np.sqrt(np.mean(np.square(p - y), axis=-1))


def r2_score(y, p):
    """Coefficient of determination 1 - SS_res / SS_tot (scikit-learn's r2_score)."""
    ss_res = np.sum(np.square(y - p), axis=-1)
    ss_tot = np.sum(np.square(y - np.mean(y, axis=-1, keepdims=True)), axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 - ss_res / ss_tot


def pearson_r2(y, p):
    """Squared Pearson correlation of truth and prediction."""
    yc = y - np.mean(y, axis=-1, keepdims=True)
    pc = p - np.mean(p, axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.sum(yc * pc, axis=-1) / np.sqrt(np.sum(yc * yc, axis=-1) * np.sum(pc * pc, axis=-1))
    return r * r


def auc_score(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney, ties counted half); NaN when a class is missing."""
    labels = labels.astype(bool)
    pos, neg = scores[labels], scores[~labels]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (pos.size * neg.size))


def ef_metrics(y: np.ndarray, p: np.ndarray, *, threshold: float, samples: int) -> dict:
    """MAE, RMSE, R², squared Pearson (each with a bootstrap CI) and HFrEF AUC."""
    out = {}
    for name, fn in (("mae", mae), ("rmse", rmse), ("r2", r2_score), ("r2_pearson", pearson_r2)):
        value, low, high = bootstrap_ci(y, p, fn, samples)
        out[name], out[f"{name}_ci_low"], out[f"{name}_ci_high"] = value, low, high
    out["auc_hfref"] = auc_score(-p, y < threshold)  # A lower predicted EF means HFrEF.
    return out


def group_clip_predictions(gathered: dict) -> dict:
    """Per video (sorted by record index): truth, the single-clip and the all-clips mean."""
    index = gathered["video_index"].astype(np.int64)
    single = gathered["single"].astype(bool)
    videos = np.unique(index)
    position = np.searchsorted(videos, index)
    sums = np.bincount(position[~single], gathered["pred"][~single], minlength=len(videos))
    counts = np.bincount(position[~single], minlength=len(videos))
    single_pred = np.full(len(videos), np.nan)
    single_pred[position[single]] = gathered["pred"][single]
    truth = np.full(len(videos), np.nan)
    truth[position] = gathered["ef"]
    with np.errstate(invalid="ignore"):
        all_clips = sums / counts
    return {
        "video_index": videos,
        "ef": truth,
        "pred_single": single_pred,
        "pred_all": all_clips,
        "num_clips": counts,
    }


class EchonetEF(EchonetData, Task):
    """Ejection fraction (%) from echo clips with an R(2+1)D regressor."""

    def __init__(self, config):
        super().__init__(config)
        self.model = models.build_model(config.model)

    def _clip_shape(self) -> tuple[int, int, int, int]:
        d = self.config.data
        return (d.clip_length, d.frame_size, d.frame_size, 1)

    def example_batch(self, batch_size):
        return {
            "clip": np.zeros((batch_size,) + self._clip_shape(), np.uint8),
            "ef": np.zeros((batch_size,), np.float32),
        }

    def init_variables(self, rng, batch):
        variables = dict(super().init_variables(rng, batch))
        stats = self.train_stats()
        params = jax.tree.map(lambda x: x, variables["params"])  # A copy to edit.
        head = params["backbone"]["head"]
        head["bias"] = jnp.full_like(head["bias"], stats["mean_ef"])
        variables["params"] = params
        return variables

    def model_inputs(self, batch):
        stats = self.train_stats()
        mean = jnp.asarray(stats["mean"], jnp.float32)
        std = jnp.asarray(stats["std"], jnp.float32)
        clips = (batch["clip"].astype(jnp.float32) - mean) / std
        channels = self.config.data.get("channels", 1)
        if channels != clips.shape[-1]:  # Gray repeated, as EchoNet feeds its 3-channel AVIs.
            clips = jnp.broadcast_to(clips, clips.shape[:-1] + (channels,))
        return clips

    def _apply(self, variables, batch, train: bool, rng=None):
        return apply_model(self.model, variables, self.model_inputs(batch), train=train, rng=rng)

    def loss(self, variables, batch, rng):
        pred, model_state = self._apply(variables, batch, train=True, rng=rng)
        error = pred - batch["ef"]
        loss = jnp.mean(jnp.square(error))
        return loss, ({"train_mae": jnp.mean(jnp.abs(error))}, dict(model_state))

    def eval_step(self, variables, batch):
        pred, _ = self._apply(variables, batch, train=False)
        valid = batch["valid"].astype(jnp.float32)
        single = batch["single"].astype(jnp.float32) * valid
        return {
            "pred": pred,
            "ef": batch["ef"],
            "video_index": batch["video_index"],
            "single": batch["single"],
            "clip_mse": (jnp.sum(jnp.square(pred - batch["ef"]) * single), jnp.sum(single)),
        }

    def finalize_metrics(self, totals, gathered):
        per_video = group_clip_predictions(gathered)
        cfg = self.config.eval
        y = per_video["ef"]
        result = {"num_videos": int(len(y)), "loss": totals["clip_mse"][0] / totals["clip_mse"][1]}
        for suffix, pred in (("", per_video["pred_all"]), ("_single", per_video["pred_single"])):
            metrics = ef_metrics(
                y, pred, threshold=cfg.hfref_threshold, samples=cfg.bootstrap_samples
            )
            result.update({f"{k}{suffix}": v for k, v in metrics.items()})
        result["num_clips_mean"] = float(per_video["num_clips"].mean())
        return result

    def predict(self, variables, batch):
        pred, _ = self._apply(variables, batch, train=False)
        return {"ef": pred}

    def train_loader(self, batch_size, seed):
        d = self.config.data
        cfg = {k: d[k] for k in ("clip_length", "clip_period", "frame_size", "pad")}
        return pipeline.train_loader(
            pipeline.Subset(self.source("train"), self.labelled("train")),
            preprocess=_ef_train_preprocess,
            augment=functools.partial(_ef_augment, cfg=cfg),
            batch_size=batch_size,
            seed=seed,
            num_workers=d.num_workers,
        )

    def _starts(self, split: str, video: int) -> tuple[int, list[int]]:
        d, e = self.config.data, self.config.eval
        return eval_clip_starts(
            self.index()[split]["num_frames"][video],
            video,
            length=d.clip_length,
            period=d.clip_period,
            stride=e.clip_stride,
            max_clips=e.max_clips,
        )

    def _rows(self, split: str, video_indices: Sequence[int]):
        """Evaluation rows (clip, ef, video_index, single) of the given videos, in order."""
        d = self.config.data
        source = self.source(split)
        for v in video_indices:
            single, starts = self._starts(split, v)
            record = source[v]
            video, ef = record["video"], np.float32(record["ef"])
            for start, is_single in [(single, True)] + [(s, False) for s in starts]:
                clip = clip_lib.take_clip(video, start, d.clip_length, d.clip_period)
                yield {
                    "clip": clip_lib.resize_frames(clip, d.frame_size),
                    "ef": ef,
                    "video_index": np.int32(v),
                    "single": np.bool_(is_single),
                }

    def eval_batches(self, split, batch_size):
        """Clip rows of this process's videos (every process_count-th labelled video), in
        batches padded with `valid` False; every process yields the same number of batches.
        One video is decoded at a time, so memory does not grow with the video length."""
        videos = self.labelled(split)[jax.process_index() :: jax.process_count()]
        rows = sum(1 + len(self._starts(split, v)[1]) for v in videos)
        num_batches = math.ceil(parallel.max_over_processes(rows) / batch_size)
        iterator = self._rows(split, videos)
        filler = None
        for _ in range(num_batches):
            chunk = [row for _, row in zip(range(batch_size), iterator)]
            num_valid = len(chunk)
            if num_valid < batch_size:  # Padding rows: any clip, marked invalid.
                filler = filler or (
                    chunk[0] if chunk else next(self._rows(split, self.labelled(split)[:1]))
                )
                chunk += [filler] * (batch_size - num_valid)
            device = {k: np.stack([row[k] for row in chunk]) for k in chunk[0]}
            device["valid"] = np.arange(batch_size) < num_valid
            yield device, {}

    def num_examples(self, split):
        return len(self.labelled(split))

    def write_evaluation(
        self, out_dir: str, split: str, gathered: dict, variables=None
    ) -> list[str]:
        """Per-video predictions CSV, scatter, Bland-Altman and ROC plots."""
        per_video = group_clip_predictions(gathered)
        names = self.index()[split]["filename"]
        os.makedirs(out_dir, exist_ok=True)
        csv_path = os.path.join(out_dir, "predictions.csv")
        writers.write_csv(
            csv_path,
            [
                {
                    "FileName": names[int(v)],
                    "EF": f"{y:.4f}",
                    "EF_pred_all_clips": f"{p_all:.4f}",
                    "EF_pred_one_clip": f"{p_one:.4f}",
                    "clips": n,
                }
                for v, y, p_all, p_one, n in zip(
                    per_video["video_index"],
                    per_video["ef"],
                    per_video["pred_all"],
                    per_video["pred_single"],
                    per_video["num_clips"],
                )
            ],
        )
        y, p = per_video["ef"], per_video["pred_all"]
        paths = [csv_path]
        path = os.path.join(out_dir, "ef_scatter.png")
        plots.scatter_png(
            path,
            y,
            p,
            title=f"EF ({split}, all clips)",
            xlabel="true EF (%)",
            ylabel="predicted EF (%)",
        )
        paths.append(path)
        path = os.path.join(out_dir, "ef_bland_altman.png")
        plots.bland_altman_png(path, y, p, title=f"EF ({split}, all clips)", units="%")
        paths.append(path)
        path = os.path.join(out_dir, "hfref_roc.png")
        threshold = self.config.eval.hfref_threshold
        plots.roc_png(path, -p, y < threshold, title=f"EF < {threshold:g}% ({split})")
        paths.append(path)
        return paths


# ============================================================================ LV segmentation
def _seg_preprocess(record: dict, *, size: int) -> dict:
    image = clip_lib.resize_frames(record["image"][None], size)[0]
    mask = record["mask"]
    if mask.shape[0] != size:
        import cv2

        mask = cv2.resize(mask[..., 0], (size, size), interpolation=cv2.INTER_NEAREST)[..., None]
    return {
        "image": image,
        "mask": (mask > 0).astype(np.uint8),
        "phase": np.int32(record["phase"]),
        "video_index": np.int32(record["video_index"]),
    }


def _seg_augment(example: dict, rng: np.random.Generator, *, pad: int) -> dict:
    image, mask = clip_lib.random_pad_crop(
        example["image"][None], pad, rng, masks=example["mask"][None]
    )
    return {**example, "image": image[0], "mask": mask[0]}


class EchonetSegmentation(EchonetData, SegmentationTask):
    """Left-ventricle segmentation of the traced ED and ES frames with DeepLabv3."""

    def __init__(self, config):
        super().__init__(config)
        self.model = models.build_model(config.model, num_classes=1)

    def example_batch(self, batch_size):
        size = self.config.data.frame_size
        return {
            "image": np.zeros((batch_size, size, size, 1), np.uint8),
            "mask": np.zeros((batch_size, size, size, 1), np.uint8),
        }

    def eval_step(self, variables, batch):
        out = super().eval_step(variables, batch)
        logits, _ = self._apply(variables, batch, train=False)
        pred = (jax.nn.sigmoid(logits) > self.config.eval.threshold).astype(jnp.float32)
        target = batch["mask"].astype(jnp.float32)
        valid = batch["valid"].astype(jnp.float32)
        inter = jnp.sum(pred * target, axis=(1, 2, 3)) * valid
        total = jnp.sum(pred + target, axis=(1, 2, 3)) * valid
        for name, phase in (("ed", 0), ("es", 1)):
            keep = (batch["phase"] == phase).astype(jnp.float32)
            out[f"inter_{name}"] = (jnp.sum(inter * keep), jnp.sum(valid * keep))
            out[f"total_{name}"] = (jnp.sum(total * keep), jnp.sum(valid * keep))
        return out

    def finalize_metrics(self, totals, gathered):
        pooled = {k: totals.pop(k) for k in list(totals) if k.startswith(("inter_", "total_"))}
        result = super().finalize_metrics(totals, gathered)

        def dice(*phases):
            inter = sum(pooled[f"inter_{p}"][0] for p in phases)
            total = sum(pooled[f"total_{p}"][0] for p in phases)
            return 2.0 * inter / total if total else float("nan")

        result["dice_overall"] = dice("ed", "es")
        result["dice_ed"] = dice("ed")
        result["dice_es"] = dice("es")
        return result

    def num_examples(self, split):
        return 2 * len(self.traced(split))

    def train_loader(self, batch_size, seed):
        d = self.config.data
        return pipeline.train_loader(
            _TracedFrames(self.source("train"), self.traced("train")),
            preprocess=functools.partial(_seg_preprocess, size=d.frame_size),
            augment=functools.partial(_seg_augment, pad=d.pad),
            batch_size=batch_size,
            seed=seed,
            num_workers=d.num_workers,
        )

    def eval_batches(self, split, batch_size):
        return pipeline.eval_batches(
            _TracedFrames(self.source(split), self.traced(split)),
            preprocess=functools.partial(_with_id, size=self.config.data.frame_size),
            batch_size=batch_size,
            host_keys=("id",),
        )


def _with_id(record: dict, *, size: int) -> dict:
    example = _seg_preprocess(record, size=size)
    phase = "ED" if int(record["phase"]) == 0 else "ES"
    example["id"] = f"{pipeline.decode_text(record['filename'])} {phase}"
    return example


__all__ = [
    "EchonetEF",
    "EchonetSegmentation",
    "bootstrap_ci",
    "ef_metrics",
    "eval_clip_starts",
    "group_clip_predictions",
]
