"""Inference on your own files with a trained experiment directory.

CRL images (segment -> quality -> keypoints -> CRL -> GA):
  python -m medjax.predict --config=configs/crl.py --workdir=runs/crl scan.dcm scan2.png \
      [--pixel_spacing_mm=0.25] [--out=runs/crl/predict] [--checkpoint=best]
Echo videos (AVI, or multi-frame echo DICOM): EF over all clips, LV area per frame, beats and
beat-to-beat EF; writes <name>.json, <name>_area.png and <name>_overlay.avi:
  python -m medjax.predict --config=configs/echonet.py --workdir=runs/echonet video.avi
SDF microcirculation videos (AVI): expected MFI score per quadrant, video MFI and flow class;
writes <name>.json:
  python -m medjax.predict --config=configs/perfusion.py --workdir=runs/perf_convlstm video.avi
Head CT (DICOM slice, NIfTI volume, PNG/JPEG): hemorrhage mask, P(hemorrhage), area and volume
per file; writes <name>.json and <name>.png (the most likely slice, windowed, mask overlaid):
  python -m medjax.predict --config=configs/ich.py --workdir=runs/ich_unet slice.dcm scan.nii
Embryo time-lapse videos (a folder of frames each: *RUN<k>.jpeg, or images sorted by name):
outcome probabilities (liveborn, no implantation, miscarriage); writes <video>.json; the LSTM
stage, or the SVM with --config=configs/embryo.py:stage=classify,classifier=svm:
  python -m medjax.predict --config=configs/embryo.py --workdir=runs/embryo VIDEO_DIR

Loads the best checkpoint of each stage trained in --workdir and writes, per image,
`<out>/<name>.json` (quality verdict and P(bad), crown and rump points in image pixels, CRL in
mm, GA in days by Robinson and by INTERGROWTH-21st, warnings) and `<out>/<name>.png` (overlay).
DICOM files give their own pixel spacing; PNG/JPEG need --pixel_spacing_mm for CRL in mm.
"""

from __future__ import annotations

import os

import cv2
from absl import app, flags, logging
from ml_collections import config_flags

from medjax import cli, parallel, writers
from medjax.preprocess.dicom import read_dicom_image
from medjax.preprocess.image import read_grayscale
from medjax.tasks import crl_chain

DICOM_SUFFIXES = (".dcm", ".dicom")


def load_image(path: str, pixel_spacing_mm: float | None):
    """(image (H, W) uint8, spacing mm or None, warnings) from a PNG/JPEG or DICOM file."""
    if path.lower().endswith(DICOM_SUFFIXES):
        image, spacing, warnings = read_dicom_image(path)
        if pixel_spacing_mm is not None:
            spacing = pixel_spacing_mm
        return image, spacing, warnings
    return read_grayscale(path), pixel_spacing_mm, []


def predict_files(
    workdir: str,
    paths: list[str],
    out_dir: str,
    *,
    checkpoint: str = "best",
    pixel_spacing_mm: float | None = None,
) -> list[dict]:
    """Measures each image file; writes <out_dir>/<stem>.json and .png; returns the reports."""
    chain = crl_chain.CrlChain(workdir, checkpoint)
    os.makedirs(out_dir, exist_ok=True)
    reports = []
    for path in paths:
        image, spacing, warnings = load_image(path, pixel_spacing_mm)
        result = chain.measure(image, spacing)
        result["warnings"] = warnings + result["warnings"]
        stem = os.path.splitext(os.path.basename(path))[0]
        cv2.imwrite(os.path.join(out_dir, f"{stem}.png"), crl_chain.overlay(image, result))
        report = {k: v for k, v in result.items() if k != "mask"}
        report["file"] = os.path.abspath(path)
        writers.write_json(os.path.join(out_dir, f"{stem}.json"), report)
        logging.info("%s: %s", path, _summary(report))
        reports.append(report)
    return reports


def _summary(report: dict) -> str:
    quality = f"quality {report['quality']['verdict']} (P(bad)={report['quality']['p_bad']:.2f})"
    if report["crl_mm"] is None:
        return f"{quality}, CRL {report['crl_px']:.1f} px"
    ga = report["ga_days"]["robinson"]["weeks_days"]
    return f"{quality}, CRL {report['crl_mm']:.1f} mm, GA {ga} (Robinson)"


def _define_flags():
    config_flags.DEFINE_config_file(
        "config", None, "Task config file (configs/crl.py).", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "The experiment directory the stages trained in.")
    flags.DEFINE_string("out", None, "Output directory (default <workdir>/predict).")
    flags.DEFINE_string("checkpoint", "best", "best, latest, or a step number.")
    flags.DEFINE_float("pixel_spacing_mm", None, "Pixel spacing for PNG/JPEG inputs.")
    flags.DEFINE_string("window", "brain", "ICH overlays: a CT window name or LEVEL/WIDTH.")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("Name at least one file (image, echo video AVI, or DICOM).")
    writers.quiet_library_logs()
    parallel.maybe_initialize_distributed()
    f = flags.FLAGS
    out = f.out or os.path.join(f.workdir, "predict")
    if f.config.task == "echonet":
        from medjax.tasks import echonet_chain

        for report in echonet_chain.predict_video_files(
            f.workdir, paths, out, checkpoint=f.checkpoint
        ):
            print(f"{report['file']}: {echonet_chain.summary(report)}")
            for warning in report["warnings"]:
                print(f"  warning: {warning}")
        print(f"Reports, area curves and overlay videos in {out}")
        return
    if f.config.task == "ich":
        from medjax.tasks import ich

        for report in ich.predict_ct_files(
            f.workdir, paths, out, checkpoint=f.checkpoint, window=f.window
        ):
            print(f"{report['file']}: {ich.summary(report)}")
            for warning in report["warnings"]:
                print(f"  warning: {warning}")
        print(f"Reports and overlays in {out}")
        return
    if f.config.task == "embryo":
        from medjax.tasks import embryo

        stage = f.config.stage if f.config.stage in embryo.CLASSIFY_STAGES else None
        for report in embryo.predict_video_folders(
            f.workdir, paths, out, checkpoint=f.checkpoint, stage=stage
        ):
            print(f"{report['file']}: {embryo.summary(report)}")
            for warning in report["warnings"]:
                print(f"  warning: {warning}")
        print(f"Reports in {out}")
        return
    if f.config.task == "perfusion":
        from medjax.tasks import perfusion

        for report in perfusion.predict_video_files(f.workdir, paths, out, checkpoint=f.checkpoint):
            print(f"{report['file']}: {perfusion.summary(report)}")
        print(f"Reports in {out}")
        return
    if f.config.task != "crl":
        raise app.UsageError(
            f"medjax.predict serves crl, echonet, ich, embryo and perfusion, not {f.config.task!r}."
        )
    for report in predict_files(
        f.workdir, paths, out, checkpoint=f.checkpoint, pixel_spacing_mm=f.pixel_spacing_mm
    ):
        print(f"{report['file']}: {_summary(report)}")
        for warning in report["warnings"]:
            print(f"  warning: {warning}")
    print(f"Reports and overlays in {out}")


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
