"""CRL stage `quality`: is this segmentation of this image good enough to measure on?

As in the CRL project, a VGG-16 classifies the image masked by a fetus segmentation as good or
bad. Positive class = bad (what quality control must catch); the score is P(bad).

Labels: an example is bad when metadata.csv says `bad`, or when its mask was degraded. For
training, each mask is degraded on the fly with probability `quality.degrade_prob` (eroded,
dilated, shifted, truncated, or swapped with another image's mask). For evaluation the same
happens deterministically per example id, so every run scores the same evaluation set.
"""

from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax import metrics, models
from medjax.input import augment as aug
from medjax.input import mask_degrade
from medjax.tasks.base import Task, apply_model
from medjax.tasks.crl import CrlData, masked_image


def _other_mask(source, rng: np.random.Generator, image_size: int) -> np.ndarray:
    element = source[int(rng.integers(len(source)))]
    _, mask, _, _ = aug.letterbox(element["image"], element["mask"], None, image_size)
    return mask


def quality_example(
    example: dict, rng: np.random.Generator, *, degrade_prob: float, source, image_size: int
) -> dict:
    """Degrades the mask with probability `degrade_prob`, then masks the image; label 1 = bad."""
    bad = int(example.get("quality", 1) == 0)
    mask = example["mask"]
    if rng.random() < degrade_prob:
        other = _other_mask(source, rng, image_size)
        mask, kind = mask_degrade.degrade_mask(mask, rng, other_mask=other)
        bad = 1 if kind != "none" else bad
    example = {**example, "mask": mask}
    out = {k: v for k, v in example.items() if k not in ("image", "quality")}
    out["image"] = masked_image(example)
    out["label"] = np.int32(bad)
    return out


def _seeded_by_id(example: dict, *, fn, salt: str) -> dict:
    digest = hashlib.sha256(f"{salt}/{example['id']}".encode()).digest()
    return fn(example, np.random.default_rng(int.from_bytes(digest[:8], "little")))


class CrlQuality(CrlData, Task):
    """VGG-16 good/bad classifier of masked CRL images."""

    def __init__(self, config):
        super().__init__(config)
        self.model = models.build_model(config.model, num_classes=2)

    # ------------------------------------------------------------------ data
    def _quality_fn(self, split: str):
        return functools.partial(
            quality_example,
            degrade_prob=self.config.quality.degrade_prob,
            source=self.source(split),
            image_size=self.config.data.image_size,
        )

    def train_transform(self):
        return self._quality_fn("train")

    def eval_transform(self, split):
        return functools.partial(_seeded_by_id, fn=self._quality_fn(split), salt="crl-quality-eval")

    def example_batch(self, batch_size):
        size = self.config.data.image_size
        return {
            "image": np.zeros((batch_size, size, size, 1), np.uint8),
            "label": np.zeros((batch_size,), np.int32),
        }

    # ------------------------------------------------------------------ model
    def model_inputs(self, batch):
        return batch["image"].astype(jnp.float32) / 255.0

    def _logits(self, variables, batch, train, rng=None):
        return apply_model(self.model, variables, self.model_inputs(batch), train=train, rng=rng)

    def loss(self, variables, batch, rng):
        logits, model_state = self._logits(variables, batch, True, rng)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, ({"train_accuracy": accuracy}, dict(model_state))

    def eval_step(self, variables, batch):
        logits, _ = self._logits(variables, batch, False)
        valid = batch["valid"].astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return {
            "loss": (jnp.sum(losses * valid), jnp.sum(valid)),
            "score": jax.nn.softmax(logits)[:, 1],
            "label": batch["label"],
        }

    def finalize_metrics(self, totals, gathered):
        scores, labels = gathered["score"], gathered["label"]
        pred = (scores > self.config.eval.threshold).astype(np.int32)
        counts = {k: int(v) for k, v in metrics.binary_confusion(pred, labels).items()}
        result = {
            "loss": totals["loss"][0] / totals["loss"][1],
            "accuracy": float(metrics.accuracy(**counts)),
            "sensitivity": float(metrics.sensitivity(counts["tp"], counts["fn"])),
            "specificity": float(metrics.specificity(counts["tn"], counts["fp"])),
            "auc": float(metrics.roc_auc(scores, labels)),
            "num_examples": int(len(labels)),
            "num_bad": int(labels.sum()),
        }
        result["balanced_accuracy"] = (result["sensitivity"] + result["specificity"]) / 2
        # Rows: true good, true bad; columns: predicted good, predicted bad.
        result["confusion_matrix"] = [[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]]
        return result

    def predict(self, variables, batch):
        logits, _ = self._logits(variables, batch, False)
        return {"score": jax.nn.softmax(logits)[:, 1]}
