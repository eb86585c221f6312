"""ICH: intracranial hemorrhage segmentation on head-CT slices (U-Net or DeepLabv3).

Data: the `ct_ich` TFDS dataset (PhysioNet CT-ICH layout, or the Kaggle JPG variant, or
synthetic scans in the same layout), one example per slice with its HU image and hemorrhage
mask. Each slice goes through `config.data.preprocess`, a pipeline of `medjax.input.transforms`
ops written as a string (e.g. ``"resize(96)|window(brain,subdural,bone)"``: HU windows as
channels), then, for training, Keras-style online augmentation (`config.augment`).

Splits are by patient: the builder's train / validation / test (80/20, then 80/20 of train,
like the reference project), or, with `config.data.num_folds` = k > 0, k-fold cross-validation
by subject: the patients of all three splits are shuffled (`data.fold_seed`) and dealt into k
folds; fold `data.fold` is the test set, a share `data.validation_share` of the other
patients the validation set, the rest the training set. Most slices show no hemorrhage; the
imbalance is handled by drawing each hemorrhage slice `data.positive_oversample` times per
training epoch, and optionally a focal loss term (`loss.focal_weight`).

Metrics (`finalize_metrics`), named so that conventions are never mixed:
- `dice_positive_slices`, `iou_positive_slices`: the mean over slices WITH hemorrhage only
  (Hssayeni et al.'s convention); `dice_all_slices`, `iou_all_slices`: the mean over every
  slice, an empty slice scoring 1 when nothing is predicted on it and 0 otherwise;
  `dice_pooled`, `iou_pooled`: from pixel counts summed over the split.
- The reference project's table: pixel precision / recall / F1 for class 0 (background) and
  class 1 (hemorrhage), pixel ROC AUC (from 1024-bin histograms of the logits), IoU.
- Slice-level detection: P(hemorrhage) of a slice is its largest pixel probability; ROC AUC,
  and sensitivity / specificity / accuracy at `eval.threshold`.
`write_evaluation` adds per-slice and per-patient CSVs, a slice-detection ROC plot and
overlay PNGs of the worst and best hemorrhage slices.

`IchPredictor` loads a trained run for inference on a user's slice (medjax.predict,
medjax.serve).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from medjax import data as data_lib
from medjax import losses, metrics, models, parallel, plots, writers
from medjax.input import pipeline, transforms
from medjax.tasks.base import DatasetAccess
from medjax.tasks.segmentation import SegmentationTask, overlay_row

INDEX_VERSION = 1
SOURCE_SPLITS = ("train", "validation", "test")
HISTOGRAM_BINS = 1024  # Pixel AUC: logits binned over [-LOGIT_RANGE, LOGIT_RANGE].
LOGIT_RANGE = 16.0
HOST_KEYS = ("id", "patient_id")


# ============================================================================ data
class _Records:
    """Records picked from several splits of a dataset: (split, index) pairs, random access.
    With `number`, each record also gets its position in the list as "position"."""

    def __init__(self, sources: dict, picks: Sequence[tuple[str, int]], number: bool = False):
        self.sources = {split: sources[split] for split in {s for s, _ in picks}}
        self.picks = [(s, int(i)) for s, i in picks]
        self.number = number

    def __len__(self) -> int:
        return len(self.picks)

    def __getitem__(self, i: int):
        split, index = self.picks[int(i)]
        record = self.sources[split][index]
        return {**record, "position": np.int32(i)} if self.number else record

    def __repr__(self) -> str:
        return f"_Records({len(self.picks)})"


def slice_preprocess(record: dict, *, spec: str) -> dict:
    """A ct_ich record -> model example: preprocessed image (float32 (h, w, C)), mask, label,
    and the area of one model pixel in cm² (NaN when the scan's pixel spacing is unknown)."""
    hu = np.asarray(record["image"], np.float32)
    height = hu.shape[0]
    example = transforms.parse(spec)({"image": hu, "mask": np.asarray(record["mask"], np.uint8)})
    spacing = float(record["pixel_spacing_mm"])
    scale = height / example["image"].shape[0]
    return {
        "image": np.asarray(example["image"], np.float32),
        "mask": (np.asarray(example["mask"]) > 0).astype(np.uint8),
        "label": np.int32(record["any_hemorrhage"]),
        "pixel_area_cm2": np.float32((spacing * scale) ** 2 / 100.0),
    }


def _eval_preprocess(record: dict, *, spec: str) -> dict:
    example = slice_preprocess(record, spec=spec)
    patient = pipeline.decode_text(record["patient_id"])
    example["patient_id"] = patient
    example["id"] = f"{patient}/{int(record['slice_number'])}"
    example["position"] = np.int32(record["position"])
    return example


def _train_preprocess(record: dict, *, spec: str) -> dict:
    return slice_preprocess(record, spec=spec)


def _index_fields(record: dict) -> dict:
    return {
        "patient_id": pipeline.decode_text(record["patient_id"]),
        "slice_number": int(record["slice_number"]),
        "label": int(record["any_hemorrhage"]),
    }


class IchData(DatasetAccess):
    """The ct_ich dataset: builder, per-split index, patient splits and k-fold by subject."""

    BUILD_OPTIONS = ("offline_augment_copies",)
    _index: dict | None = None
    _splits: dict | None = None

    def index(self) -> dict:
        """Per builder split: lists `patient_id`, `slice_number`, `label` (one per record),
        read once and cached as JSON next to the built dataset."""
        if self._index is None:
            self._index = data_lib.cached_index(
                self.builder(), _index_fields, version=INDEX_VERSION
            )
        return self._index

    def split_picks(self) -> dict[str, list[tuple[str, int]]]:
        """{train, validation, test: [(builder split, record index), ...]}, by patient."""
        if self._splits is not None:
            return self._splits
        cfg = self.config.data
        index = self.index()
        missing = [s for s in SOURCE_SPLITS if s not in index]
        if missing:
            raise ValueError(
                f"The ct_ich build has no {', '.join(missing)} split; it has {', '.join(index)}."
            )
        if cfg.num_folds <= 0:
            train_split = "train_augmented" if cfg.offline_augment_copies > 0 else "train"
            splits = {
                name: [(source, i) for i in range(len(index[source]["label"]))]
                for name, source in (
                    ("train", train_split),
                    ("validation", "validation"),
                    ("test", "test"),
                )
            }
        else:
            splits = self._fold_picks(index)
        self._splits = splits
        return splits

    def _fold_picks(self, index: dict) -> dict:
        cfg = self.config.data
        if cfg.offline_augment_copies > 0:
            raise ValueError(
                "config.data.offline_augment_copies > 0 augments the builder's train split "
                "only and cannot be combined with k-fold (config.data.num_folds > 0); set one."
            )
        if not 0 <= cfg.fold < cfg.num_folds:
            raise ValueError(
                f"config.data.fold={cfg.fold} is not in 0..{cfg.num_folds - 1} "
                f"(config.data.num_folds={cfg.num_folds})."
            )
        by_patient: dict[str, list[tuple[str, int]]] = {}
        for source in SOURCE_SPLITS:
            for i, patient in enumerate(index[source]["patient_id"]):
                by_patient.setdefault(patient, []).append((source, i))
        patients = sorted(by_patient)
        if len(patients) < cfg.num_folds:
            raise ValueError(
                f"{len(patients)} patients cannot be dealt into {cfg.num_folds} folds."
            )
        order = np.random.default_rng(cfg.fold_seed).permutation(len(patients))
        shuffled = [patients[i] for i in order]
        test = set(shuffled[cfg.fold :: cfg.num_folds])
        rest = [p for p in shuffled if p not in test]
        num_val = max(1, int(round(cfg.validation_share * len(rest))))
        validation = set(rest[:num_val])
        groups = {"test": test, "validation": validation, "train": set(rest[num_val:])}
        return {
            name: [pick for p in sorted(members) for pick in by_patient[p]]
            for name, members in groups.items()
        }

    def records(self, split: str) -> _Records:
        picks = self.split_picks()
        if split not in picks:
            raise ValueError(f"Split {split!r} does not exist; available: {', '.join(picks)}.")
        return _Records(self.sources(), picks[split], number=True)

    def record_info(self, split: str) -> list[dict]:
        """patient_id, slice_number and label of each record of `split`, in record order."""
        index = self.index()
        return [
            {k: index[source][k][i] for k in ("patient_id", "slice_number", "label")}
            for source, i in self.split_picks()[split]
        ]

    def num_examples(self, split):
        return len(self.split_picks()[split]) if split in self.split_picks() else 0

    def train_records(self) -> _Records:
        """The training records, hemorrhage slices repeated `data.positive_oversample` times."""
        picks = self.split_picks()["train"]
        repeat = max(1, int(self.config.data.positive_oversample))
        index = self.index()
        weighted = []
        for source, i in picks:
            times = repeat if index[source]["label"][i] else 1
            weighted.extend([(source, i)] * times)
        return _Records(self.sources(), weighted)


def _augment(example: dict, rng: np.random.Generator, *, op) -> dict:
    return op(example, rng)


# ============================================================================ task
class IchSegmentation(IchData, SegmentationTask):
    """Hemorrhage segmentation of head-CT slices; `config.model.name` is unet or deeplabv3."""

    def __init__(self, config):
        super().__init__(config)
        if config.model.name == "deeplabv3":
            self.model = models.build_model(config.model, num_classes=1)
        else:
            self.model = models.build_model(config.model, out_channels=1)
        self._preprocess = transforms.parse(config.data.preprocess)

    # ---------------------------------------------------------------- shapes and inputs
    def input_shape(self) -> tuple[int, int, int]:
        """(h, w, C) of a preprocessed slice, found by running the pipeline on a blank one."""
        size = self.config.data.probe_size
        probe = {
            "image": np.full((size, size, 1), -1000.0, np.float32),
            "mask": np.zeros((size, size, 1), np.uint8),
        }
        return tuple(self._preprocess(probe)["image"].shape)

    def example_batch(self, batch_size):
        h, w, c = self.input_shape()
        return {
            "image": np.zeros((batch_size, h, w, c), np.float32),
            "mask": np.zeros((batch_size, h, w, 1), np.uint8),
        }

    def model_inputs(self, batch):
        return jnp.asarray(batch["image"], jnp.float32)

    # ---------------------------------------------------------------- training
    def loss(self, variables, batch, rng):
        logits, model_state = self._apply(variables, batch, train=True, rng=rng)
        target = batch["mask"].astype(jnp.float32)
        loss = losses.segmentation_loss(logits, target, self.config.loss)
        pred = logits > 0
        batch_metrics = {"train_dice": jnp.nanmean(metrics.dice_score(pred, target))}
        return loss, (batch_metrics, dict(model_state))

    # ---------------------------------------------------------------- evaluation
    def eval_step(self, variables, batch):
        logits, _ = self._apply(variables, batch, train=False)
        prob = jax.nn.sigmoid(logits.astype(jnp.float32))
        target = batch["mask"].astype(jnp.float32)
        pred = prob > self.config.eval.threshold
        valid = batch["valid"].astype(jnp.float32)
        counts = metrics.confusion_counts(pred, target)
        out = {k: (jnp.sum(counts[k] * valid), jnp.sum(valid)) for k in ("tp", "fp", "fn", "tn")}
        out["loss"] = (
            jnp.sum(
                jax.vmap(lambda l, t: losses.segmentation_loss(l[None], t[None], self.config.loss))(
                    logits, target
                )
                * valid
            ),
            jnp.sum(valid),
        )
        foreground, background = metrics.score_histograms(
            logits.astype(jnp.float32),
            target,
            bins=HISTOGRAM_BINS,
            low=-LOGIT_RANGE,
            high=LOGIT_RANGE,
        )
        out.update(
            target_px=jnp.sum(target, axis=(1, 2, 3)),
            pred_px=jnp.sum(pred, axis=(1, 2, 3), dtype=jnp.float32),
            inter_px=counts["tp"],
            p_hemorrhage=jnp.max(prob, axis=(1, 2, 3)),
            label=batch["label"],
            position=batch["position"],
            pixel_area_cm2=batch["pixel_area_cm2"],
            hist_foreground=foreground,
            hist_background=background,
        )
        return out

    def finalize_metrics(self, totals, gathered):
        tp, fp, fn, tn = (totals[k][0] for k in ("tp", "fp", "fn", "tn"))
        result = {"loss": totals["loss"][0] / max(totals["loss"][1], 1.0)}
        result.update(segmentation_table(tp, fp, fn, tn))
        result["pixel_auc"] = metrics.auc_from_histograms(
            gathered["hist_foreground"].sum(0), gathered["hist_background"].sum(0)
        )
        result.update(
            slice_overlap_means(gathered["inter_px"], gathered["pred_px"], gathered["target_px"])
        )
        result.update(
            detection_metrics(
                gathered["p_hemorrhage"], gathered["label"], self.config.eval.threshold
            )
        )
        result["num_slices"] = int(len(gathered["label"]))
        result["num_hemorrhage_slices"] = int(np.sum(gathered["target_px"] > 0))
        return result

    def predict(self, variables, batch):
        logits, _ = self._apply(variables, batch, train=False)
        prob = jax.nn.sigmoid(logits.astype(jnp.float32))
        return {
            "prob": prob,
            "mask": prob > self.config.eval.threshold,
            "p_hemorrhage": jnp.max(prob, axis=(1, 2, 3)),
        }

    # ---------------------------------------------------------------- data
    def train_loader(self, batch_size, seed):
        cfg = self.config
        augment = None
        if cfg.augment.enabled:
            a = cfg.augment
            op = transforms.RandomAffine(
                rotation_deg=a.rotation_deg,
                width_shift=a.width_shift,
                height_shift=a.height_shift,
                shear_deg=a.shear_deg,
                zoom=a.zoom,
                horizontal_flip=a.horizontal_flip,
                fill_mode=a.fill_mode,
            )
            augment = functools.partial(_augment, op=op)
        return pipeline.train_loader(
            self.train_records(),
            preprocess=functools.partial(_train_preprocess, spec=cfg.data.preprocess),
            augment=augment,
            batch_size=batch_size,
            seed=seed,
            num_workers=cfg.data.num_workers,
        )

    def eval_batches(self, split, batch_size):
        return pipeline.eval_batches(
            self.records(split),
            preprocess=functools.partial(_eval_preprocess, spec=self.config.data.preprocess),
            batch_size=batch_size,
            host_keys=HOST_KEYS,
        )

    # ---------------------------------------------------------------- reports
    def write_evaluation(self, out_dir, split, gathered, variables=None):
        os.makedirs(out_dir, exist_ok=True)
        info = self.record_info(split)
        rows = slice_rows(info, gathered)
        paths = [os.path.join(out_dir, "slices.csv"), os.path.join(out_dir, "patients.csv")]
        writers.write_csv(paths[0], rows)
        writers.write_csv(paths[1], patient_rows(rows, self.config.eval.threshold))
        roc = os.path.join(out_dir, "slice_detection_roc.png")
        labels = np.asarray(gathered["label"])
        if 0 < labels.sum() < len(labels):
            plots.roc_png(
                roc, gathered["p_hemorrhage"], labels, title=f"Slice ICH detection ({split})"
            )
            paths.append(roc)
        if variables is not None:
            paths += self._worst_and_best(out_dir, split, rows, variables)
        return paths

    def _worst_and_best(self, out_dir, split, rows, variables) -> list[str]:
        """Overlay PNGs of the `eval.num_plot` worst and best hemorrhage slices by Dice."""
        positive = [i for i, r in enumerate(rows) if r["target_px"] > 0]
        if not positive:
            return []
        ranked = sorted(positive, key=lambda i: (rows[i]["dice"], i))
        count = max(1, min(self.config.eval.num_plot, len(ranked) // 2 or 1))
        local = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), variables)
        predict = parallel.jit(self.predict)
        records = self.records(split)
        paths = []
        for name, picks in (("worst", ranked[:count]), ("best", ranked[::-1][:count])):
            examples = [
                _eval_preprocess(records[rows[i]["position"]], spec=self.config.data.preprocess)
                for i in picks
            ]
            batch = {"image": np.stack([e["image"] for e in examples])}
            masks = np.asarray(jax.device_get(predict(local, batch))["mask"])
            grid = [
                overlay_row(_display(e["image"]), e["mask"], m, e["id"])
                for e, m in zip(examples, masks)
            ]
            path = os.path.join(out_dir, f"{name}_slices.png")
            cv2.imwrite(path, np.concatenate(grid, axis=0))
            paths.append(path)
        return paths

    def write_report(self, out_dir, samples):
        shown = [
            ({**example, "image": _display(example["image"])}, host, output)
            for example, host, output in samples
        ]
        return super().write_report(out_dir, shown)


def _display(image: np.ndarray) -> np.ndarray:
    """The first channel of a preprocessed slice, min-max scaled to [0, 1], (h, w, 1)."""
    channel = np.asarray(image, np.float32)[..., :1]
    low, high = float(channel.min()), float(channel.max())
    return (channel - low) / (high - low) if high > low else np.zeros_like(channel)


# ============================================================================ metrics
def segmentation_table(tp, fp, fn, tn) -> dict[str, float]:
    """The reference project's pixel table from summed confusion counts: precision, recall
    and F1 of class 1 (hemorrhage) and of class 0 (background), pixel accuracy, and the pooled
    Dice and IoU of class 1 (zero_division=0, as scikit-learn's classification_report)."""
    one = metrics.precision_recall_f1(tp, fp, fn)
    zero = metrics.precision_recall_f1(tn, fn, fp)  # Background as the positive class.
    total = tp + fp + fn + tn
    result = {f"pixel_{k}_1": float(v) for k, v in one.items()}
    result.update({f"pixel_{k}_0": float(v) for k, v in zero.items()})
    result["pixel_accuracy"] = float((tp + tn) / total) if total else float("nan")
    result["dice_pooled"] = float(one["f1"])
    result["iou_pooled"] = float(tp / (tp + fp + fn)) if (tp + fp + fn) else float("nan")
    return result


def slice_overlap_means(inter, pred, target) -> dict[str, float]:
    """Mean Dice / IoU over slices with hemorrhage only, and over all slices (an empty slice
    scores 1 if nothing is predicted on it, else 0)."""
    inter, pred, target = (np.asarray(x, np.float64) for x in (inter, pred, target))
    union = pred + target - inter
    empty = (pred + target) == 0
    dice = np.where(empty, 1.0, 2 * inter / np.maximum(pred + target, 1))
    iou = np.where(empty, 1.0, inter / np.maximum(union, 1))
    positive = target > 0
    result = {}
    for name, values in (("dice", dice), ("iou", iou)):
        result[f"{name}_positive_slices"] = (
            float(values[positive].mean()) if positive.any() else float("nan")
        )
        result[f"{name}_all_slices"] = float(values.mean()) if len(values) else float("nan")
    return result


def detection_metrics(scores, labels, threshold: float) -> dict[str, float]:
    """Slice-level hemorrhage detection: ROC AUC, and sensitivity, specificity, accuracy of
    `score > threshold`."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels).astype(bool)
    pred = scores > threshold
    tp, tn = np.sum(pred & labels), np.sum(~pred & ~labels)
    pos, neg = labels.sum(), (~labels).sum()
    return {
        "slice_auc": float(metrics.roc_auc(scores, labels)),
        "slice_sensitivity": float(tp / pos) if pos else float("nan"),
        "slice_specificity": float(tn / neg) if neg else float("nan"),
        "slice_accuracy": float((tp + tn) / len(labels)) if len(labels) else float("nan"),
    }


def slice_rows(info: list[dict], gathered: dict) -> list[dict]:
    """One row per slice: ids, label, P(hemorrhage), pixel counts, Dice, areas in cm²."""
    rows = []
    for k in np.argsort(gathered["position"], kind="stable"):
        meta = info[int(gathered["position"][k])]
        inter, pred, target = (float(gathered[n][k]) for n in ("inter_px", "pred_px", "target_px"))
        area = float(gathered["pixel_area_cm2"][k])
        denom = pred + target
        rows.append(
            {
                "position": int(gathered["position"][k]),
                "patient_id": meta["patient_id"],
                "slice_number": meta["slice_number"],
                "label": int(gathered["label"][k]),
                "p_hemorrhage": round(float(gathered["p_hemorrhage"][k]), 5),
                "target_px": int(target),
                "pred_px": int(pred),
                "inter_px": int(inter),
                "dice": round(2 * inter / denom, 5) if denom else 1.0,
                "target_area_cm2": round(target * area, 4) if math.isfinite(area) else "",
                "pred_area_cm2": round(pred * area, 4) if math.isfinite(area) else "",
            }
        )
    return rows


def patient_rows(rows: list[dict], threshold: float) -> list[dict]:
    """Per patient: slice counts, pooled Dice over the scan, mean Dice over hemorrhage slices,
    summed hemorrhage area, and patient-level detection (any slice above threshold)."""
    by_patient: dict[str, list[dict]] = {}
    for row in rows:
        by_patient.setdefault(row["patient_id"], []).append(row)
    out = []
    for patient, slices in sorted(by_patient.items()):
        inter = sum(r["inter_px"] for r in slices)
        total = sum(r["pred_px"] + r["target_px"] for r in slices)
        positive = [r["dice"] for r in slices if r["target_px"] > 0]
        areas = [r["target_area_cm2"] for r in slices]
        pred_areas = [r["pred_area_cm2"] for r in slices]
        out.append(
            {
                "patient_id": patient,
                "slices": len(slices),
                "hemorrhage_slices": sum(r["label"] for r in slices),
                "dice_pooled": round(2 * inter / total, 5) if total else 1.0,
                "dice_positive_slices": round(float(np.mean(positive)), 5) if positive else "",
                "target_area_cm2": round(sum(areas), 3) if "" not in areas else "",
                "pred_area_cm2": round(sum(pred_areas), 3) if "" not in pred_areas else "",
                "has_hemorrhage": int(any(r["label"] for r in slices)),
                "p_hemorrhage": max(r["p_hemorrhage"] for r in slices),
                "detected": int(max(r["p_hemorrhage"] for r in slices) > threshold),
            }
        )
    return out


# ============================================================================ inference
class IchPredictor:
    """A trained ICH run, loaded once, segmenting slices of any size.

    Args:
      workdir: the run directory (holding config.json and checkpoints/).
      checkpoint: 'best', 'latest' or a step.
    """

    def __init__(self, workdir: str, checkpoint: str = "best"):
        from medjax.tasks.stages import load_stage

        self.config, self.task, variables, self.step = load_stage(
            workdir, "", config_file="configs/ich.py", variant="model=unet", checkpoint=checkpoint
        )
        self.variables = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), variables)
        self._predict = parallel.jit(self.task.predict)
        self.threshold = float(self.config.eval.threshold)

    def segment(self, hu: np.ndarray, pixel_spacing_mm=None) -> dict:
        """Segments one slice.

        Args:
          hu: (H, W) or (H, W, 1) Hounsfield units.
          pixel_spacing_mm: (row, column) spacing in mm, a single number, or None.

        Returns:
          dict: prob (H, W) float32 per-pixel probability, mask (H, W) bool, p_hemorrhage
          (the slice's largest pixel probability), area_px, and area_cm2 (None when the
          spacing is unknown).
        """
        hu = np.asarray(hu, np.float32)
        if hu.ndim == 3 and hu.shape[-1] == 1:
            hu = hu[..., 0]
        if hu.ndim != 2:
            raise ValueError(f"Expected one slice (H, W); got an array of shape {hu.shape}.")
        height, width = hu.shape
        example = self.task._preprocess({"image": hu[..., None]})
        out = jax.device_get(self._predict(self.variables, {"image": example["image"][None]}))
        prob = cv2.resize(
            np.asarray(out["prob"][0, ..., 0], np.float32),
            (width, height),
            interpolation=cv2.INTER_LINEAR,
        )
        mask = prob > self.threshold
        area_cm2 = None
        if pixel_spacing_mm is not None:
            row, col = np.broadcast_to(np.asarray(pixel_spacing_mm, np.float64), (2,))
            area_cm2 = float(mask.sum() * row * col / 100.0)
        return {
            "prob": prob,
            "mask": mask,
            "p_hemorrhage": float(prob.max()),
            "area_px": int(mask.sum()),
            "area_cm2": area_cm2,
        }


def overlay(hu: np.ndarray, mask: np.ndarray, window="brain") -> np.ndarray:
    """A BGR picture of one slice at a window, with the mask tinted red and outlined."""
    from medjax.preprocess import ct

    gray = ct.window_uint8(np.asarray(hu, np.float32), window)
    picture = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    mask = np.asarray(mask).astype(bool)
    if mask.any():
        red = np.array([0, 0, 255], np.float32)
        picture[mask] = (0.55 * picture[mask] + 0.45 * red).astype(np.uint8)
        contours, _ = cv2.findContours(
            mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
        )
        cv2.drawContours(picture, contours, -1, (0, 0, 255), 1)
    return picture


def predict_ct_files(
    workdir: str, paths: list[str], out_dir: str, *, checkpoint: str = "best", window="brain"
) -> list[dict]:
    """Segments every slice of each file (DICOM slice, NIfTI volume or slice, PNG/JPEG);
    writes <out_dir>/<name>.json (per-slice P(hemorrhage) and area, the largest slice, and the
    volume in ml when the slice spacing is known) and <name>.png (the slice with the largest
    P(hemorrhage), windowed, mask overlaid); returns the reports."""
    from medjax.preprocess import ct

    predictor = IchPredictor(workdir, checkpoint)
    os.makedirs(out_dir, exist_ok=True)
    reports = []
    for path in paths:
        image = ct.read_ct_file(path)
        volume = image.hu if image.hu.ndim == 3 else image.hu[..., None]
        results = [
            predictor.segment(volume[..., s], image.pixel_spacing_mm)
            for s in range(volume.shape[-1])
        ]
        top = int(np.argmax([r["p_hemorrhage"] for r in results]))
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem.endswith(".nii"):
            stem = stem[: -len(".nii")]
        cv2.imwrite(
            os.path.join(out_dir, f"{stem}.png"),
            overlay(volume[..., top], results[top]["mask"], window),
        )
        areas = [r["area_cm2"] for r in results]
        volume_ml = None
        if image.slice_spacing_mm and None not in areas:
            volume_ml = float(sum(areas) * image.slice_spacing_mm / 10.0)
        report = {
            "file": os.path.abspath(path),
            "slices": [
                {
                    "slice": s + 1,
                    "p_hemorrhage": round(r["p_hemorrhage"], 5),
                    "area_px": r["area_px"],
                    "area_cm2": None if r["area_cm2"] is None else round(r["area_cm2"], 4),
                }
                for s, r in enumerate(results)
            ],
            "p_hemorrhage": round(results[top]["p_hemorrhage"], 5),
            "hemorrhage": bool(results[top]["p_hemorrhage"] > predictor.threshold),
            "hemorrhage_slices": int(sum(r["p_hemorrhage"] > predictor.threshold for r in results)),
            "largest_slice": top + 1,
            "volume_ml": volume_ml,
            "warnings": list(image.warnings),
        }
        writers.write_json(os.path.join(out_dir, f"{stem}.json"), report)
        reports.append(report)
    return reports


def summary(report: dict) -> str:
    """One line about a predicted file."""
    verdict = "hemorrhage" if report["hemorrhage"] else "no hemorrhage"
    text = f"{verdict} (P={report['p_hemorrhage']:.2f}"
    if len(report["slices"]) > 1:
        text += f", {report['hemorrhage_slices']} of {len(report['slices'])} slices"
    top = report["slices"][report["largest_slice"] - 1]
    if top["area_cm2"] is not None and report["hemorrhage"]:
        text += f", {top['area_cm2']:.2f} cm2 on slice {report['largest_slice']}"
    if report["volume_ml"] is not None and report["hemorrhage"]:
        text += f", {report['volume_ml']:.1f} ml"
    return text + ")"


__all__ = [
    "IchPredictor",
    "overlay",
    "predict_ct_files",
    "IchSegmentation",
    "detection_metrics",
    "patient_rows",
    "segmentation_table",
    "slice_overlap_means",
]
