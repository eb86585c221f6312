"""CRL: first-trimester ultrasound -> fetus segmentation, quality check, crown/rump, CRL and GA.

Three stages share one experiment directory (each trains in DIR/<stage>/):
  python -m medjax.main --config=configs/crl.py --workdir=runs/crl                   # segment (U-Net)
  python -m medjax.main --config=configs/crl.py:stage=quality --workdir=runs/crl     # VGG-16
  python -m medjax.main --config=configs/crl.py:stage=keypoints --workdir=runs/crl   # ResNet-34
Seconds on a CPU (variants compose):
  python -m medjax.main --config=configs/crl.py:smoke --workdir=/tmp/crl_smoke
  python -m medjax.main --config=configs/crl.py:stage=keypoints,smoke --workdir=/tmp/crl_smoke
Evaluate one stage, or the chain end to end; predict on your own images:
  python -m medjax.evaluate --config=configs/crl.py --workdir=runs/crl --checkpoint=best --split=test
  python -m medjax.evaluate --config=configs/crl.py --workdir=runs/crl --end_to_end
  python -m medjax.predict --config=configs/crl.py --workdir=runs/crl scan1.png scan2.dcm

Synthetic data unless --config.data.manual_dir points at a real export. ImageNet weights for
the VGG-16 / ResNet-34 stages come from a local file: --config.model.width=64
--config.model.init_from=/path/resnet34.pth (torchvision state dict, .npz, .safetensors or a
Keras applications .h5), with --config.model.freeze_backbone_steps=N to train the head first.
"""

import ml_collections

from medjax import config_lib

STAGES = ("segment", "quality", "keypoints")


def get_config(arg=None):
    variants = config_lib.parse_variants(arg, smoke=False, stage="segment")
    config_lib.check_choice("stage", variants.stage, STAGES)
    stage = variants.stage

    config = ml_collections.ConfigDict()
    config.task = "crl"
    config.stage = stage
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "crl_ultrasound"
    config.data.manual_dir = ""  # A real export in the CRL layout; empty: synthetic data.
    config.data.data_dir = "data"  # Built TFDS datasets (and generated raw data) go here.
    config.data.synthetic_num = 400
    config.data.synthetic_seed = 0
    config.data.image_size = 96  # Letterboxed square input side.
    config.data.num_workers = 0  # grain worker processes; 0 reads in the main process.

    config.augment = ml_collections.ConfigDict()
    config.augment.enabled = True
    config.augment.flip_prob = 0.5
    config.augment.max_rotate_deg = 15.0
    config.augment.scale_min = 0.9
    config.augment.scale_max = 1.1
    config.augment.max_shift_frac = 0.05
    config.augment.max_brightness = 0.1
    config.augment.contrast_min = 0.85
    config.augment.contrast_max = 1.15

    config.model = ml_collections.ConfigDict()
    config.model.init_from = ""  # Local ImageNet weights for VGG/ResNet stages; never downloaded.
    config.model.freeze_backbone_steps = 0  # Train only the head for this many steps first.
    config.model.backbone_lr_multiplier = 1.0  # Backbone learning rate after unfreezing.
    if stage == "segment":
        config.model.name = "unet"
        config.model.width = 16
        config.model.depth = 4
        config.model.norm = "batch"
    elif stage == "quality":
        config.model.name = "vgg16_bn"
        config.model.width = 16  # 64 for the standard VGG-16 (and ImageNet weights).
        config.model.classifier = "gap"
        config.model.dropout_rate = 0.5
    else:
        config.model.name = "heatmap_resnet"
        config.model.depth = 34
        config.model.width = 16  # 64 for the standard ResNet-34 (and ImageNet weights).
        config.model.head_channels = 64
        config.model.num_deconv = 3
        config.model.norm = "batch"

    config.loss = ml_collections.ConfigDict()
    config.loss.dice_weight = 1.0
    config.loss.bce_weight = 1.0

    config.quality = ml_collections.ConfigDict()
    config.quality.degrade_prob = 0.5  # Share of masks degraded (-> labelled bad).

    config.keypoints = ml_collections.ConfigDict()
    config.keypoints.masked_input = True  # Feed the segmented fetus, as the CRL project does.
    config.keypoints.softmax_beta = 1.0  # Soft-argmax temperature (on logits).
    config.keypoints.decode = "argmax"  # Inference decoding: argmax (sub-pixel) or soft.
    config.keypoints.heatmap_sigma = 1.5  # Target Gaussian width, in heatmap pixels.
    config.keypoints.heatmap_loss_weight = 1.0  # Heatmap cross-entropy next to the L1 loss.

    # The quality check gates the chain at a fixed threshold, so its checkpoint is chosen by
    # validation cross-entropy (ranking and calibration), not AUC (ranking only): a high-AUC
    # checkpoint can still put every image on one side of the threshold.
    best_metric, best_mode = {
        "segment": ("val_dice", "max"),
        "quality": ("val_loss", "min"),
        "keypoints": ("val_point_error_mm", "min"),
    }[stage]
    config.train = config_lib.train_config(
        steps={"segment": 300, "quality": 400, "keypoints": 600}[stage],
        batch_size=16,
        learning_rate={"segment": 3e-3, "quality": 1e-3, "keypoints": 2e-3}[stage],
        eval_every=100,
        best_metric=best_metric,
        best_mode=best_mode,
    )

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 32
    config.eval.split = "test"  # Split evaluated by medjax.main after training.
    config.eval.checkpoint = "best"
    config.eval.threshold = 0.5  # Segmentation probability / P(bad) threshold.
    config.eval.num_plot = 8

    if variants.smoke:
        config.data.synthetic_num = 24
        config.data.image_size = 32
        config.model.width = 4
        if stage == "segment":
            config.model.depth = 2
        elif stage == "keypoints":
            config.model.depth = 18
            config.model.head_channels = 8
        config.train.steps = 6
        config.train.batch_size = 8
        config.train.warmup_steps = 2
        config.train.log_every = 2
        config.train.eval_every = 3
        config.train.checkpoint_every = 3
        config.eval.batch_size = 8
        config.eval.num_plot = 4
    return config
