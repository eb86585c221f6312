"""Binary segmentation, shared by the tasks that segment one structure (fetus, hemorrhage, LV).

Loss: soft Dice + BCE on logits. Evaluation: per-image Dice and IoU (MONAI semantics: an
image with an empty target is left out of the mean), pixel precision / recall / F1 from
counts summed over the split, and the loss. Reports: a PNG grid of image / ground truth /
prediction overlays.
"""

from __future__ import annotations

import os

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from medjax import losses, metrics
from medjax.tasks.base import Batch, Task, Variables, apply_model


def normalize_image(image_uint8: jax.Array) -> jax.Array:
    return image_uint8.astype(jnp.float32) / 255.0


class SegmentationTask(Task):
    """A task whose batches hold 'image' (B,H,W,C uint8) and 'mask' (B,H,W,1 uint8 0/1)."""

    def model_inputs(self, batch: Batch) -> jax.Array:
        return normalize_image(batch["image"])

    def _apply(self, variables: Variables, batch: Batch, train: bool, rng=None):
        return apply_model(self.model, variables, self.model_inputs(batch), train=train, rng=rng)

    def loss(self, variables, batch, rng):
        logits, model_state = self._apply(variables, batch, train=True, rng=rng)
        target = batch["mask"].astype(jnp.float32)
        cfg = self.config.loss
        loss = losses.dice_bce_loss(
            logits, target, dice_weight=cfg.dice_weight, bce_weight=cfg.bce_weight
        )
        pred = logits > 0
        batch_metrics = {"train_dice": jnp.nanmean(metrics.dice_score(pred, target))}
        return loss, (batch_metrics, dict(model_state))

    def eval_step(self, variables, batch):
        logits, _ = self._apply(variables, batch, train=False)
        target = batch["mask"].astype(jnp.float32)
        valid = batch["valid"].astype(jnp.float32)
        threshold = self.config.eval.threshold
        pred = jax.nn.sigmoid(logits) > threshold
        out = {}
        for name, per_sample in (
            ("dice", metrics.dice_score(pred, target)),
            ("iou", metrics.iou_score(pred, target)),
        ):
            counted = valid * ~jnp.isnan(per_sample)
            out[name] = (jnp.sum(jnp.where(counted > 0, per_sample, 0.0)), jnp.sum(counted))
        counts = metrics.confusion_counts(pred, target)
        for name in ("tp", "fp", "fn", "tn"):
            out[name] = (jnp.sum(counts[name] * valid), jnp.sum(valid))
        per_sample_loss = jax.vmap(
            lambda l, t: losses.dice_bce_loss(
                l[None],
                t[None],
                dice_weight=self.config.loss.dice_weight,
                bce_weight=self.config.loss.bce_weight,
            )
        )(logits, target)
        out["loss"] = (jnp.sum(per_sample_loss * valid), jnp.sum(valid))
        return out

    def finalize_metrics(self, totals, gathered):
        result = {
            k: (s / c if c else float("nan"))
            for k, (s, c) in totals.items()
            if k in ("dice", "iou", "loss")
        }
        tp, fp, fn = (totals[k][0] for k in ("tp", "fp", "fn"))
        result.update(
            {f"pixel_{k}": float(v) for k, v in metrics.precision_recall_f1(tp, fp, fn).items()}
        )
        result["num_examples"] = int(totals["loss"][1])
        result["num_with_target"] = int(totals["dice"][1])
        return result

    def predict(self, variables, batch):
        logits, _ = self._apply(variables, batch, train=False)
        prob = jax.nn.sigmoid(logits)
        return {"prob": prob, "mask": prob > self.config.eval.threshold}

    def write_report(self, out_dir, samples):
        rows = [
            overlay_row(example["image"], example["mask"], output["mask"], host.get("id", str(n)))
            for n, (example, host, output) in enumerate(samples)
        ]
        if not rows:
            return []
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "overlays.png")
        cv2.imwrite(path, np.concatenate(rows, axis=0))
        return [path]


def overlay_row(
    image: np.ndarray, target: np.ndarray, pred: np.ndarray, title: str, scale: int = 2
) -> np.ndarray:
    """One grid row: image | ground truth (green) | prediction (red), with the sample's Dice."""
    gray = np.asarray(image)[..., 0]
    if gray.dtype != np.uint8:
        gray = np.clip(gray * 255, 0, 255).astype(np.uint8)
    base = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    target = np.asarray(target)[..., 0] > 0
    pred = np.asarray(pred)[..., 0] > 0

    def tint(mask, bgr):
        out = base.astype(np.float32)
        out[mask] = 0.5 * out[mask] + 0.5 * np.asarray(bgr, np.float32)
        return out.astype(np.uint8)

    denom = target.sum() + pred.sum()
    dice = 2.0 * np.logical_and(target, pred).sum() / denom if denom else 1.0
    panels = [base, tint(target, (0, 200, 0)), tint(pred, (0, 0, 230))]
    row = np.concatenate(panels, axis=1)
    row = cv2.resize(row, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    cv2.putText(
        row,
        f"{title}  dice={dice:.3f}",
        (4, 14),
        cv2.FONT_HERSHEY_SIMPLEX,
        0.4,
        (255, 255, 255),
        1,
        cv2.LINE_AA,
    )
    return row
