"""CRL tasks: first-trimester ultrasound, in three stages chained at inference.

- `segment`: U-Net fetus segmentation (`CrlSegmentation`).
- `quality`: VGG-16 good/bad classifier of the image masked by a segmentation (`CrlQuality`,
  in crl_quality.py).
- `keypoints`: ResNet-34 heatmap network finding the crown and the rump (`CrlKeypoints`, in
  crl_keypoints.py); the crown-rump length and gestational age follow (medjax.clinical.crl).

Data, shared by all stages: the `crl_ultrasound` TFDS dataset (built from
`config.data.manual_dir`, or from synthetic data in the same layout when none is given). Each
example is letterboxed to `config.data.image_size` (crown/rump points and pixel spacing
follow), then augmented jointly (flip, rotation, scale, shift; brightness/contrast on the image
only) for training. Augmentation does not change `pixel_spacing_mm`: training losses are in
pixels, and millimetre metrics are computed on unaugmented evaluation data.
"""

from __future__ import annotations

import functools

import numpy as np

from medjax import models
from medjax.input import augment as aug
from medjax.input import pipeline
from medjax.tasks.base import DatasetAccess
from medjax.tasks.segmentation import SegmentationTask

HOST_KEYS = ("id", "patient_id")


def preprocess(element: dict, *, image_size: int) -> dict:
    """A TFDS example -> fixed-size arrays: image, mask, points (crown, rump), spacing."""
    points = np.stack([element["crown"], element["rump"]]).astype(np.float32)
    image, mask, points, scale = aug.letterbox(
        element["image"], element["mask"], points, image_size
    )
    return {
        "id": pipeline.decode_text(element["id"]),
        "patient_id": pipeline.decode_text(element["patient_id"]),
        "image": image,
        "mask": mask,
        "points": points.astype(np.float32),
        "pixel_spacing_mm": np.float32(element["pixel_spacing_mm"] / scale),
        "quality": np.int32(element["quality"]),  # 1 good, 0 bad, -1 unknown.
    }


def _drop_host_keys(example: dict) -> dict:
    return {k: v for k, v in example.items() if k not in HOST_KEYS}


def train_preprocess(element: dict, *, image_size: int) -> dict:
    return _drop_host_keys(preprocess(element, image_size=image_size))


def augment(example: dict, rng: np.random.Generator, *, cfg: dict) -> dict:
    """Joint random augmentation of image, mask and points."""
    image, mask, points = aug.random_affine(
        example["image"],
        example["mask"],
        example["points"],
        rng,
        flip_prob=cfg["flip_prob"],
        max_rotate_deg=cfg["max_rotate_deg"],
        scale_range=(cfg["scale_min"], cfg["scale_max"]),
        max_shift_frac=cfg["max_shift_frac"],
    )
    image = aug.random_brightness_contrast(
        image,
        rng,
        max_brightness=cfg["max_brightness"],
        contrast_range=(cfg["contrast_min"], cfg["contrast_max"]),
    )
    return {**example, "image": image, "mask": mask, "points": points.astype(np.float32)}


def masked_image(example: dict) -> np.ndarray:
    """The image with everything outside the (fetus) mask set to 0, as the CRL project feeds
    its quality and keypoint networks."""
    return example["image"] * (example["mask"] > 0).astype(np.uint8)


class CrlData(DatasetAccess):
    """The CRL dataset, shared by the three stages. Stages set `train_transform` (a random
    example function applied after the joint augmentation) and `eval_transform`."""

    def num_examples(self, split):
        return len(self.source(split))

    def train_transform(self):
        """(example, rng) -> example after augmentation, or None. Must be picklable."""
        return None

    def eval_transform(self, split: str):
        """example -> example after preprocessing, or None. Must be picklable."""
        return None

    def train_loader(self, batch_size, seed):
        cfg = self.config
        steps = []
        if cfg.augment.enabled:
            steps.append(functools.partial(augment, cfg=cfg.augment.to_dict()))
        if self.train_transform() is not None:
            steps.append(self.train_transform())
        return pipeline.train_loader(
            self.source("train"),
            preprocess=functools.partial(train_preprocess, image_size=cfg.data.image_size),
            augment=functools.partial(_chain, steps=tuple(steps)) if steps else None,
            batch_size=batch_size,
            seed=seed,
            num_workers=cfg.data.num_workers,
        )

    def eval_batches(self, split, batch_size):
        base = functools.partial(preprocess, image_size=self.config.data.image_size)
        transform = self.eval_transform(split)
        return pipeline.eval_batches(
            self.source(split),
            preprocess=(
                functools.partial(_then, first=base, second=transform) if transform else base
            ),
            batch_size=batch_size,
            host_keys=HOST_KEYS,
        )


def _chain(example: dict, rng: np.random.Generator, *, steps: tuple) -> dict:
    for step in steps:
        example = step(example, rng)
    return example


def _then(element: dict, *, first, second) -> dict:
    return second(first(element))


class CrlSegmentation(CrlData, SegmentationTask):
    """U-Net fetus segmentation on first-trimester ultrasound."""

    def __init__(self, config):
        super().__init__(config)
        self.model = models.build_model(config.model, out_channels=1)

    def example_batch(self, batch_size):
        size = self.config.data.image_size
        return {
            "image": np.zeros((batch_size, size, size, 1), np.uint8),
            "mask": np.zeros((batch_size, size, size, 1), np.uint8),
        }
