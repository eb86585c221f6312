"""The CRL chain: segment -> quality -> keypoints -> crown-rump length -> gestational age.

`CrlChain` loads the best checkpoint of each stage from one experiment directory (each stage's
own saved config.json says which model it trained), and measures images of any size: each
stage letterboxes the original image to its own input size, and points come back in the
original image's pixels, where the pixel spacing applies.

`evaluate_end_to_end` runs the chain over a test split and compares the measured CRL and GA
with the truth (mean, SD, Bland-Altman plots), next to each stage's own metrics.
"""

from __future__ import annotations

import os

import cv2
import jax
import numpy as np
from absl import logging

from medjax import evaluate as eval_lib
from medjax import parallel, plots, writers
from medjax.clinical import crl as clinical
from medjax.input import augment as aug
from medjax.tasks.stages import MissingStageError, data_from, load_stage  # noqa: F401

STAGES = ("segment", "quality", "keypoints")


class CrlChain:
    """The three trained stages, ready to measure images.

    Args:
      workdir: the experiment directory holding segment/, quality/ and keypoints/.
      checkpoint: 'best', 'latest' or a step, for every stage.
      overrides: callable(config) applied to each stage's config (e.g. a different data_dir).
    """

    def __init__(self, workdir: str, checkpoint: str = "best", overrides=None):
        self.stages = {
            stage: load_stage(
                workdir,
                stage,
                config_file="configs/crl.py",
                variant=f"stage={stage}",
                checkpoint=checkpoint,
                overrides=overrides,
            )
            for stage in STAGES
        }
        self._predict = {
            stage: parallel.jit(task.predict) for stage, (_, task, _, _) in self.stages.items()
        }
        self.quality_threshold = self.stages["quality"][0].eval.threshold

    def _run(self, stage: str, batch: dict) -> dict:
        _, _, variables, _ = self.stages[stage]
        return jax.device_get(self._predict[stage](variables, batch))

    def measure(self, image: np.ndarray, pixel_spacing_mm: float | None) -> dict:
        """Measures one (H, W) or (H, W, 1) uint8 image.

        Returns:
          dict with the fetus mask (H, W, 1), quality verdict and P(bad), crown and rump (x, y)
          in image pixels, CRL in mm, GA by Robinson and by INTERGROWTH-21st, warnings.
        """
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[..., None]
        height, width = image.shape[:2]
        warnings = []

        seg_size = self.stages["segment"][0].data.image_size
        boxed, _, _, _ = aug.letterbox(image, None, None, seg_size)
        seg = self._run("segment", {"image": boxed[None]})
        mask = aug.unletterbox_mask(largest_component(seg["mask"][0]), height, width)
        if not mask.any():
            warnings.append("No fetus found by the segmentation stage.")

        q_size = self.stages["quality"][0].data.image_size
        q_image, q_mask, _, _ = aug.letterbox(image, mask, None, q_size)
        score = float(self._run("quality", {"image": (q_image * q_mask)[None]})["score"][0])
        verdict = "bad" if score > self.quality_threshold else "good"
        if verdict == "bad":
            warnings.append(
                f"Quality check: segmentation judged bad (P(bad)={score:.2f}); "
                "the measurement below is unreliable."
            )

        k_config = self.stages["keypoints"][0]
        k_image, k_mask, _, _ = aug.letterbox(image, mask, None, k_config.data.image_size)
        k_input = k_image * k_mask if k_config.keypoints.masked_input else k_image
        points = self._run("keypoints", {"image": k_input[None]})["points"][0]
        crown, rump = aug.unletterbox_points(points, height, width, k_config.data.image_size)

        result = {
            "image_size": [int(width), int(height)],
            "quality": {"verdict": verdict, "p_bad": score},
            "crown_xy": [float(v) for v in crown],
            "rump_xy": [float(v) for v in rump],
            "crl_px": float(np.linalg.norm(crown - rump)),
            "pixel_spacing_mm": pixel_spacing_mm,
            "crl_mm": None,
            "ga_days": {},
            "warnings": warnings,
            "mask": mask,
        }
        if pixel_spacing_mm is None:
            warnings.append(
                "No pixel spacing: CRL is given in pixels only and GA is not "
                "estimated (pass --pixel_spacing_mm, or a DICOM with PixelSpacing)."
            )
            return result
        crl = float(clinical.crl_mm(crown, rump, pixel_spacing_mm))
        result["crl_mm"] = crl
        for name, formula in (
            ("robinson", clinical.ga_robinson_days),
            ("intergrowth21", clinical.ga_intergrowth_days),
        ):
            ga = formula(crl)
            result["ga_days"][name] = {
                "days": None if np.isnan(ga.days) else float(ga.days),
                "weeks_days": clinical.format_ga(ga.days),
                "valid": bool(ga.valid),
            }
            if ga.warning:
                warnings.append(ga.warning)
        return result


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keeps the largest 8-connected component of a binary (H, W, 1) mask (uint8 0/1)."""
    binary = (np.asarray(mask)[..., 0] > 0).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if count <= 2:
        return binary[..., None]
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return (labels == largest).astype(np.uint8)[..., None]


def overlay(image: np.ndarray, result: dict, scale: int = 3) -> np.ndarray:
    """The image with the fetus contour, crown (circle), rump (square) and the measurement."""
    gray = np.asarray(image).reshape(image.shape[0], image.shape[1])
    canvas = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    canvas = cv2.resize(canvas, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(
        result["mask"][..., 0], None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST
    )
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    good = result["quality"]["verdict"] == "good"
    cv2.drawContours(canvas, contours, -1, (0, 200, 0) if good else (0, 140, 255), 1)
    crown = tuple(int((v + 0.5) * scale) for v in result["crown_xy"])
    rump = tuple(int((v + 0.5) * scale) for v in result["rump_xy"])
    cv2.line(canvas, crown, rump, (0, 220, 255), 1)
    cv2.circle(canvas, crown, 5, (0, 0, 255), 2)
    cv2.rectangle(canvas, (rump[0] - 5, rump[1] - 5), (rump[0] + 5, rump[1] + 5), (255, 0, 0), 2)
    lines = [f"quality: {result['quality']['verdict']} (P(bad)={result['quality']['p_bad']:.2f})"]
    if result["crl_mm"] is not None:
        robinson = result["ga_days"]["robinson"]["weeks_days"]
        intergrowth = result["ga_days"]["intergrowth21"]["weeks_days"]
        lines.append(
            f"CRL {result['crl_mm']:.1f} mm  GA {robinson} (Robinson), "
            f"{intergrowth} (INTERGROWTH-21st)"
        )
    else:
        lines.append(f"CRL {result['crl_px']:.1f} px (no pixel spacing)")
    for i, text in enumerate(lines):
        cv2.putText(
            canvas,
            text,
            (4, 14 + 14 * i),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.4,
            (255, 255, 255),
            1,
            cv2.LINE_AA,
        )
    return canvas


def evaluate_end_to_end(
    config, workdir: str, *, split: str = "test", checkpoint: str = "best"
) -> dict:
    """Runs the chain on every image of `split` and writes DIR/eval/<split>/.

    The data come from `config.data` (so --config.data.* overrides apply). Writes metrics.json
    (CRL error in mm and GA error in days: mean, SD, mean absolute; the quality verdicts; each
    stage's own metrics) and Bland-Altman plots of CRL and GA.
    """

    chain = CrlChain(workdir, checkpoint, overrides=data_from(config))
    segment_task = chain.stages["segment"][1]
    source = segment_task.source(split)
    crl_true, crl_pred, ga_true, ga_pred, verdicts = [], [], [], [], []
    for i in range(len(source)):
        element = source[i]
        result = chain.measure(element["image"], float(element["pixel_spacing_mm"]))
        crl_true.append(
            float(clinical.crl_mm(element["crown"], element["rump"], element["pixel_spacing_mm"]))
        )
        crl_pred.append(result["crl_mm"])
        ga_true.append(float(element["ga_days"]))
        ga_pred.append(clinical.ga_robinson_days(result["crl_mm"], extrapolate=True).days)
        verdicts.append(result["quality"]["verdict"])
    crl_true, crl_pred = np.array(crl_true), np.array(crl_pred, dtype=np.float64)
    ga_true, ga_pred = np.array(ga_true), np.array(ga_pred, dtype=np.float64)
    good = np.array(verdicts) == "good"

    out_dir = os.path.join(workdir, "eval", split)
    os.makedirs(out_dir, exist_ok=True)
    result = {
        "split": split,
        "checkpoint": checkpoint,
        "num_images": int(len(crl_true)),
        "num_judged_good": int(good.sum()),
        "stage_steps": {s: int(v[3]) for s, v in chain.stages.items()},
    }
    for name, truth, measured, units in (
        ("crl", crl_true, crl_pred, "mm"),
        ("ga", ga_true, ga_pred, "days"),
    ):
        error = measured - truth
        result[f"{name}_error_mean_{units}"] = float(np.nanmean(error))
        result[f"{name}_error_sd_{units}"] = float(np.nanstd(error, ddof=1))
        result[f"{name}_abs_error_mean_{units}"] = float(np.nanmean(np.abs(error)))
        result[f"{name}_abs_error_mean_{units}_judged_good"] = (
            float(np.nanmean(np.abs(error[good]))) if good.any() else None
        )
        result[f"{name}_bland_altman"] = plots.bland_altman_png(
            os.path.join(out_dir, f"bland_altman_{name}.png"),
            truth,
            measured,
            title=f"{name.upper()}: chain vs truth ({split})",
            units=units,
        )

    stage_metrics = {}
    for stage, (stage_cfg, _, _, _) in chain.stages.items():
        stage_metrics[stage] = eval_lib.evaluate_checkpoint(
            stage_cfg, os.path.join(workdir, stage), checkpoint=checkpoint, split=split
        )
    result["stages"] = stage_metrics
    writers.write_json(os.path.join(out_dir, "metrics.json"), result)
    logging.info(
        "End-to-end %s: CRL error %.2f ± %.2f mm, GA error %.2f ± %.2f days; wrote %s",
        split,
        result["crl_error_mean_mm"],
        result["crl_error_sd_mm"],
        result["ga_error_mean_days"],
        result["ga_error_sd_days"],
        out_dir,
    )
    return result
