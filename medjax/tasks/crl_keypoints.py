"""CRL stage `keypoints`: find the crown and the rump, then the crown-rump length.

A ResNet-34 with a heatmap head (medjax.models.keypoints) sees the image masked by the fetus
segmentation, as in the CRL project, and predicts one heatmap per landmark, decoded by a
spatial soft-argmax to sub-pixel coordinates (integral regression) and trained on their L1
error. Crown and rump keep their identity under flips (augmentation never swaps the labels),
so the network must tell head from body, not left from right.

Metrics: point error in pixels (of the letterboxed input) and in mm, per landmark; PCK at 2 and
5 mm; CRL absolute error in mm; gathered true/predicted CRL for Bland-Altman analysis.
"""

from __future__ import annotations

import functools

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from medjax import metrics, models
from medjax.input import heatmaps
from medjax.tasks.base import Task
from medjax.tasks.crl import CrlData, masked_image

LANDMARKS = ("crown", "rump")
PCK_THRESHOLDS_MM = (2.0, 5.0)


def keypoint_example(example: dict, rng: np.random.Generator | None = None, *, masked: bool):
    """Model input for the keypoint stage: the (masked) image, the points, the spacing."""
    del rng
    out = {k: v for k, v in example.items() if k not in ("image", "mask", "quality")}
    out["image"] = masked_image(example) if masked else example["image"]
    return out


class CrlKeypoints(CrlData, Task):
    """Crown and rump localisation by heatmap regression."""

    def __init__(self, config):
        super().__init__(config)
        self.model = models.build_model(config.model, num_keypoints=len(LANDMARKS))

    # ------------------------------------------------------------------ data
    def train_transform(self):
        return functools.partial(keypoint_example, masked=self.config.keypoints.masked_input)

    def eval_transform(self, split):
        return functools.partial(keypoint_example, masked=self.config.keypoints.masked_input)

    def example_batch(self, batch_size):
        size = self.config.data.image_size
        return {
            "image": np.zeros((batch_size, size, size, 1), np.uint8),
            "points": np.zeros((batch_size, len(LANDMARKS), 2), np.float32),
        }

    # ------------------------------------------------------------------ model
    def model_inputs(self, batch):
        return batch["image"].astype(jnp.float32) / 255.0

    def _heatmaps(self, variables, batch, train):
        mutable = ["batch_stats"] if (train and "batch_stats" in variables) else False
        out = self.model.apply(variables, self.model_inputs(batch), train=train, mutable=mutable)
        return out if mutable else (out, {})

    def _decode(self, logits, train: bool):
        """Soft-argmax in training (differentiable); at inference, `keypoints.decode`:
        'argmax' (the heatmap's peak, sub-pixel refined: not pulled towards the map's centre
        when the heatmap is spread out) or 'soft'."""
        cfg = self.config.keypoints
        if not train and cfg.decode == "argmax":
            return heatmaps.argmax_subpixel(logits, stride=self.model.stride)
        return heatmaps.soft_argmax(logits, beta=cfg.softmax_beta, stride=self.model.stride)

    def _points(self, variables, batch, train):
        logits, model_state = self._heatmaps(variables, batch, train)
        return self._decode(logits, train), model_state

    def loss(self, variables, batch, rng):
        """L1 coordinate error of the soft-argmax (in % of the image side) plus the
        cross-entropy between each heatmap's spatial softmax and a Gaussian at the true point,
        which keeps the heatmaps unimodal: an expectation over a diffuse map is pulled to its
        centre on unseen images."""
        del rng
        cfg = self.config.keypoints
        logits, model_state = self._heatmaps(variables, batch, True)
        points = self._decode(logits, train=True)
        size = self.config.data.image_size
        coord_loss = jnp.mean(jnp.abs(points - batch["points"])) / size * 100.0
        _, h, w, k = logits.shape
        target = heatmaps.gaussian_heatmaps(
            batch["points"], h, w, cfg.heatmap_sigma, stride=self.model.stride
        )
        target = target / jnp.maximum(target.sum(axis=(1, 2), keepdims=True), 1e-6)
        log_probs = jax.nn.log_softmax(logits.reshape(-1, h * w, k) * cfg.softmax_beta, axis=1)
        heatmap_loss = -jnp.mean(jnp.sum(target.reshape(-1, h * w, k) * log_probs, axis=1))
        loss = coord_loss + cfg.heatmap_loss_weight * heatmap_loss
        error_px = jnp.mean(metrics.point_errors(points, batch["points"]))
        return loss, (
            {"train_point_error_px": error_px, "train_heatmap_loss": heatmap_loss},
            dict(model_state),
        )

    def eval_step(self, variables, batch):
        points, _ = self._points(variables, batch, False)
        valid = batch["valid"].astype(jnp.float32)
        spacing = batch["pixel_spacing_mm"]
        errors_px = metrics.point_errors(points, batch["points"])  # (B, K)
        errors_mm = errors_px * spacing[:, None]
        crl_true = _crl_px(batch["points"]) * spacing
        crl_pred = _crl_px(points) * spacing
        n = jnp.sum(valid)

        def mean_of(per_sample):
            return jnp.sum(per_sample * valid), n

        out = {
            "point_error_px": mean_of(errors_px.mean(-1)),
            "point_error_mm": mean_of(errors_mm.mean(-1)),
            "crl_abs_error_mm": mean_of(jnp.abs(crl_pred - crl_true)),
            "crl_true_mm": crl_true,
            "crl_pred_mm": crl_pred,
        }
        for k, name in enumerate(LANDMARKS):
            out[f"{name}_error_mm"] = mean_of(errors_mm[:, k])
        for t in PCK_THRESHOLDS_MM:
            out[f"pck_{t:g}mm"] = mean_of(jnp.mean(errors_mm <= t, axis=-1))
        return out

    def finalize_metrics(self, totals, gathered):
        result = {k: (s / c if c else float("nan")) for k, (s, c) in totals.items()}
        diff = gathered["crl_pred_mm"] - gathered["crl_true_mm"]
        result["crl_error_mean_mm"] = float(np.mean(diff))
        result["crl_error_sd_mm"] = float(np.std(diff, ddof=1)) if len(diff) > 1 else float("nan")
        result["num_examples"] = int(len(diff))
        return result

    def predict(self, variables, batch):
        points, _ = self._points(variables, batch, False)
        return {"points": points}

    def write_report(self, out_dir, samples):
        rows = [
            _points_row(example["image"], example["points"], output["points"], host.get("id", ""))
            for example, host, output in samples
        ]
        if not rows:
            return []
        path = f"{out_dir}/keypoints.png"
        cv2.imwrite(path, np.concatenate(rows, axis=0))
        return [path]


def _crl_px(points):
    return jnp.linalg.norm(points[:, 0] - points[:, 1], axis=-1)


def _points_row(image, true_points, pred_points, title, scale=3):
    """The image with true (green) and predicted (red) crown (circle) and rump (square)."""
    gray = np.asarray(image)[..., 0]
    canvas = cv2.cvtColor(cv2.resize(gray, None, fx=scale, fy=scale), cv2.COLOR_GRAY2BGR)
    for points, color in ((true_points, (0, 200, 0)), (pred_points, (0, 0, 230))):
        (cx, cy), (rx, ry) = ((np.asarray(p) + 0.5) * scale for p in points)
        cv2.circle(canvas, (int(cx), int(cy)), 4, color, 2)
        cv2.rectangle(canvas, (int(rx) - 4, int(ry) - 4), (int(rx) + 4, int(ry) + 4), color, 2)
        cv2.line(canvas, (int(cx), int(cy)), (int(rx), int(ry)), color, 1)
    cv2.putText(canvas, title, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
    return canvas
