"""EchoNet inference with both stages: all-clips EF, LV area per frame, beat-to-beat EF.

`EchonetChain` loads the `ef` and `segment` stages trained in one experiment directory and
measures a video (T, H, W) or (T, H, W, 1) uint8 at its frame rate:

1. LV segmentation of every frame (DeepLabv3) -> LV area per frame (pixels);
2. end-systoles = peaks of the negative area (`medjax.clinical.echo.end_systoles`);
3. EF on the clip of `clip_length` frames every `clip_period` centred on each end-systole,
   and their mean (beat-to-beat EF); EF averaged over all clips (test-time augmentation).

`evaluate_beat_to_beat` runs it over a split (MAE, RMSE, R² of the beat-to-beat EF, with
bootstrap CIs; per-video CSV; an area-curve PNG per video for the first few) into
DIR/eval/<split>/beat_to_beat/. `predict_video_files` serves `medjax.predict` for echo videos
(AVI, or multi-frame echo DICOM).
"""

from __future__ import annotations

import csv
import os

import cv2
import jax
import numpy as np
from absl import logging

from medjax import parallel, plots, writers
from medjax.clinical import echo
from medjax.input import clips as clip_lib
from medjax.input import pipeline
from medjax.tasks import echonet
from medjax.tasks.stages import data_from, load_stage

STAGES = ("ef", "segment")


class EchonetChain:
    """The trained EF and LV segmentation stages of an experiment directory."""

    def __init__(self, workdir: str, checkpoint: str = "best", overrides=None):
        self.stages = {
            stage: load_stage(
                workdir,
                stage,
                config_file="configs/echonet.py",
                variant=f"task={stage}",
                checkpoint=checkpoint,
                overrides=overrides,
            )
            for stage in STAGES
        }
        self._predict = {
            s: parallel.jit(task.predict) for s, (_, task, _, _) in self.stages.items()
        }

    def _run(self, stage: str, batch: dict) -> dict:
        _, _, variables, _ = self.stages[stage]
        return jax.device_get(self._predict[stage](variables, batch))

    def _batches(self, stage: str, arrays: np.ndarray, key: str):
        """Runs `stage` over `arrays` in fixed-size batches (one compile); yields outputs."""
        batch_size = self.stages[stage][0].eval.batch_size
        for begin in range(0, len(arrays), batch_size):
            chunk = arrays[begin : begin + batch_size]
            padded = np.concatenate(
                [chunk, np.repeat(chunk[:1], batch_size - len(chunk), axis=0)], axis=0
            )
            out = self._run(stage, {key: padded})
            yield {k: v[: len(chunk)] for k, v in out.items()}

    def segment(self, video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(LV masks (T, S, S) bool at the segment stage's frame size, areas (T,) in pixels)."""
        size = self.stages["segment"][0].data.frame_size
        frames = clip_lib.resize_frames(video, size)
        masks = np.concatenate(
            [out["mask"][..., 0] for out in self._batches("segment", frames, "image")]
        )
        return masks, masks.reshape(len(masks), -1).sum(axis=1).astype(np.float64)

    def ef_of_clips(self, video: np.ndarray, starts: list[int]) -> np.ndarray:
        d = self.stages["ef"][0].data
        clips = np.stack(
            [
                clip_lib.resize_frames(
                    clip_lib.take_clip(video, s, d.clip_length, d.clip_period), d.frame_size
                )
                for s in starts
            ]
        )
        return np.concatenate([out["ef"] for out in self._batches("ef", clips, "clip")])

    def measure(self, video: np.ndarray, fps: float) -> dict:
        """All-clips EF, beat-to-beat EF and the LV area curve of one video.

        Returns:
          dict: ef_all_clips, ef_beat_to_beat (NaN without a detected beat), beats (list of
          {end_systole_frame, clip_start, ef}), areas (per frame), masks, warnings.
        """
        video = np.asarray(video)
        if video.ndim == 3:
            video = video[..., None]
        ef_cfg, e = self.stages["ef"][0], self.stages["ef"][0].eval
        d = ef_cfg.data
        count = clip_lib.num_starts(len(video), d.clip_length, d.clip_period)
        starts = list(range(0, count, max(1, e.clip_stride)))
        ef_all = float(self.ef_of_clips(video, starts).mean())
        masks, areas = self.segment(video)
        systoles = echo.end_systoles(
            areas, fps, min_distance_s=e.beat_min_distance_s, prominence=e.beat_prominence
        )
        warnings = []
        beats = []
        if len(systoles):
            beat_starts = [
                echo.beat_clip_start(int(s), len(video), d.clip_length, d.clip_period)
                for s in systoles
            ]
            efs = self.ef_of_clips(video, beat_starts)
            beats = [
                {"end_systole_frame": int(s), "clip_start": int(b), "ef": float(v)}
                for s, b, v in zip(systoles, beat_starts, efs)
            ]
        else:
            warnings.append("No heartbeat found in the LV area curve; beat-to-beat EF is empty.")
        if len(video) < d.clip_length * d.clip_period:
            warnings.append(
                f"The video has {len(video)} frames, fewer than one clip spans "
                f"({d.clip_length * d.clip_period}); it was zero-padded."
            )
        return {
            "num_frames": int(len(video)),
            "fps": float(fps),
            "ef_all_clips": ef_all,
            "ef_beat_to_beat": float(np.mean([b["ef"] for b in beats])) if beats else None,
            "num_clips": len(starts),
            "beats": beats,
            "areas": areas,
            "masks": masks,
            "warnings": warnings,
        }


def area_curve_png(path: str, result: dict, title: str) -> None:
    marks = [b["end_systole_frame"] for b in result["beats"]]
    plots.curve_png(
        path,
        result["areas"],
        marks=marks,
        title=title,
        xlabel="frame",
        ylabel="LV area (pixels)",
    )


def overlay_video(path: str, video: np.ndarray, masks: np.ndarray, fps: float) -> None:
    """Writes the video with the LV contour drawn on every frame (MJPG AVI, colour)."""
    height, width = video.shape[1:3]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    if not writer.isOpened():
        raise OSError(f"Cannot write the overlay video {path}.")
    try:
        for frame, mask in zip(video, masks):
            canvas = cv2.cvtColor(np.ascontiguousarray(frame[..., 0]), cv2.COLOR_GRAY2BGR)
            mask = cv2.resize(mask.astype(np.uint8), (width, height), cv2.INTER_NEAREST)
            contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(canvas, contours, -1, (0, 0, 255), 1)
            writer.write(canvas)
    finally:
        writer.release()


def evaluate_beat_to_beat(
    config, workdir: str, *, split: str = "test", checkpoint: str = "best", num_plots: int = 4
) -> dict:
    """Beat-to-beat EF over the labelled videos of `split`; writes DIR/eval/<split>/."""

    chain = EchonetChain(workdir, checkpoint, overrides=data_from(config))
    task = chain.stages["ef"][1]
    source = task.source(split)
    out_dir = os.path.join(workdir, "eval", split)
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for n, v in enumerate(task.labelled(split)):
        record = source[v]
        result = chain.measure(record["video"], float(record["fps"]))
        name = pipeline.decode_text(record["filename"])
        rows.append((name, float(record["ef"]), result))
        if n < num_plots:
            area_curve_png(
                os.path.join(out_dir, f"area_{name}.png"), result, f"{name}: LV area, beats"
            )
    truth = np.array([r[1] for r in rows])
    beat = np.array(
        [np.nan if r[2]["ef_beat_to_beat"] is None else r[2]["ef_beat_to_beat"] for r in rows]
    )
    all_clips = np.array([r[2]["ef_all_clips"] for r in rows])
    e = chain.stages["ef"][0].eval
    found = np.isfinite(beat)
    result = {
        "split": split,
        "num_videos": len(rows),
        "num_with_beats": int(found.sum()),
        "beats_per_video_mean": float(np.mean([len(r[2]["beats"]) for r in rows])),
        "stage_steps": {s: int(v[3]) for s, v in chain.stages.items()},
    }
    for prefix, pred in (
        ("beat_to_beat", np.where(found, beat, all_clips)),
        ("all_clips", all_clips),
    ):
        metrics = echonet.ef_metrics(
            truth, pred, threshold=e.hfref_threshold, samples=e.bootstrap_samples
        )
        result.update({f"{prefix}_{k}": v for k, v in metrics.items()})
    csv_path = os.path.join(out_dir, "beat_to_beat.csv")
    with open(csv_path + ".tmp", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["FileName", "EF", "EF_beat_to_beat", "EF_all_clips", "beats", "beat_EFs"])
        for name, ef, r in rows:
            writer.writerow(
                [
                    name,
                    f"{ef:.4f}",
                    "" if r["ef_beat_to_beat"] is None else f"{r['ef_beat_to_beat']:.4f}",
                    f"{r['ef_all_clips']:.4f}",
                    len(r["beats"]),
                    " ".join(f"{b['ef']:.2f}" for b in r["beats"]),
                ]
            )
    os.replace(csv_path + ".tmp", csv_path)
    writers.write_json(os.path.join(out_dir, "beat_to_beat_metrics.json"), result)
    logging.info(
        "Beat-to-beat on %s: MAE %.2f, RMSE %.2f, R2 %.3f over %d videos (%d with beats)",
        split,
        result["beat_to_beat_mae"],
        result["beat_to_beat_rmse"],
        result["beat_to_beat_r2"],
        len(rows),
        result["num_with_beats"],
    )
    return result


DICOM_SUFFIXES = (".dcm", ".dicom")


def load_echo_video(path: str) -> tuple[np.ndarray, float]:
    """(frames (T, 112, 112, 1) uint8, fps) from an AVI (EchoNet layout) or an echo DICOM.

    A DICOM is cropped to its scan sector, blanked outside it and resized to 112, as
    `python -m medjax.preprocess.echo_dicom` converts it; an AVI of another size is resized.
    """
    from medjax.preprocess import echo_dicom, video

    if path.lower().endswith(DICOM_SUFFIXES):
        echo_video = echo_dicom.read_echo_dicom(path)
        mask = echo_dicom.sector_mask(echo_video.frames, echo_video.regions)
        frames, _ = echo_dicom.crop_sector(echo_video.frames, mask, 112)
        fps = echo_video.fps
    else:
        frames, fps = video.read_video_gray(path)
    frames = np.asarray(frames)[..., None]
    return clip_lib.resize_frames(frames, 112), float(fps)


def predict_video_files(
    workdir: str, paths: list[str], out_dir: str, *, checkpoint: str = "best"
) -> list[dict]:
    """Measures each echo video; writes <stem>.json, <stem>_area.png, <stem>_overlay.avi."""
    chain = EchonetChain(workdir, checkpoint)
    os.makedirs(out_dir, exist_ok=True)
    reports = []
    for path in paths:
        frames, fps = load_echo_video(path)
        result = chain.measure(frames, fps)
        stem = os.path.splitext(os.path.basename(path))[0]
        area_curve_png(os.path.join(out_dir, f"{stem}_area.png"), result, f"{stem}: LV area")
        overlay_video(os.path.join(out_dir, f"{stem}_overlay.avi"), frames, result["masks"], fps)
        report = {k: v for k, v in result.items() if k not in ("masks",)}
        report["areas"] = [float(a) for a in result["areas"]]
        report["file"] = os.path.abspath(path)
        report["hfref"] = bool(result["ef_all_clips"] < chain.stages["ef"][0].eval.hfref_threshold)
        writers.write_json(os.path.join(out_dir, f"{stem}.json"), report)
        reports.append(report)
    return reports


def summary(report: dict) -> str:
    beat = report["ef_beat_to_beat"]
    beat_text = "no beat found" if beat is None else f"beat-to-beat {beat:.1f}%"
    return (
        f"EF {report['ef_all_clips']:.1f}% (all {report['num_clips']} clips), {beat_text} over "
        f"{len(report['beats'])} beats{' - HFrEF (EF < 50%)' if report['hfref'] else ''}"
    )
