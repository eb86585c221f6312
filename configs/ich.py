"""ICH: head-CT intracranial hemorrhage segmentation with U-Net or DeepLabv3.

Train and evaluate one model per experiment directory:
  python -m medjax.main --config=configs/ich.py:model=unet --workdir=runs/ich_unet
  python -m medjax.main --config=configs/ich.py:model=deeplabv3 --workdir=runs/ich_deeplabv3
Seconds on a CPU (variants compose):
  python -m medjax.main --config=configs/ich.py:model=deeplabv3,smoke --workdir=/tmp/ich_smoke
Compare the models' test tables; evaluate again; segment your own slices; serve the web page:
  python -m medjax.compare --workdirs runs/ich_unet runs/ich_deeplabv3
  python -m medjax.evaluate --config=configs/ich.py --workdir=runs/ich_unet --split=test
  python -m medjax.predict --config=configs/ich.py --workdir=runs/ich_unet slice.dcm scan.nii
  python -m medjax.serve --config=configs/ich.py --workdir=runs/ich_unet
Five-fold cross-validation by subject (the dataset paper's protocol), fold k of 5:
  python -m medjax.main --config=configs/ich.py --config.data.num_folds=5 \
      --config.data.fold=k --workdir=runs/ich_unet_fold_k
Focal loss next to Dice (class imbalance): configs/ich.py:loss=focal.

Synthetic scans (the PhysioNet CT-ICH layout, masks exactly the drawn blood) unless
--config.data.manual_dir points at PhysioNet CT-ICH v1.3.1 (or the Kaggle JPG variant).
"""

import ml_collections

from medjax import config_lib

MODELS = ("unet", "deeplabv3")
LOSSES = ("dice_bce", "focal")


def get_config(arg=None):
    variants = config_lib.parse_variants(arg, smoke=False, model="unet", loss="dice_bce")
    config_lib.check_choice("model", variants.model, MODELS)
    config_lib.check_choice("loss", variants.loss, LOSSES)

    config = ml_collections.ConfigDict()
    config.task = "ich"
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "ct_ich"
    config.data.manual_dir = ""  # PhysioNet CT-ICH (ct_scans/, masks/, CSV); empty: synthetic.
    config.data.data_dir = "data"
    config.data.synthetic_num = 40  # Synthetic patients (the real dataset has 82).
    config.data.synthetic_seed = 0
    config.data.offline_augment_copies = 0  # >0: train on the builder's augmented split.
    # Preprocessing ops (medjax.input.transforms), on HU, applied to image and mask together.
    config.data.preprocess = "resize(96)|window(brain,subdural,bone)"
    config.data.probe_size = 128  # Side of the blank slice used to find the input shape.
    config.data.positive_oversample = 3  # Hemorrhage slices drawn this many times per epoch.
    config.data.num_folds = 0  # >0: k-fold cross-validation by subject instead of the splits.
    config.data.fold = 0  # The test fold.
    config.data.fold_seed = 0
    config.data.validation_share = 0.2  # Of the non-test patients, in k-fold mode.
    config.data.num_workers = 0

    # Online augmentation, Keras ImageDataGenerator semantics (as the reference project).
    config.augment = ml_collections.ConfigDict()
    config.augment.enabled = True
    config.augment.rotation_deg = 15.0
    config.augment.width_shift = 0.05
    config.augment.height_shift = 0.05
    config.augment.shear_deg = 5.0
    config.augment.zoom = 0.1
    config.augment.horizontal_flip = True
    config.augment.fill_mode = "nearest"

    config.model = ml_collections.ConfigDict()
    config.model.name = variants.model
    config.model.init_from = ""  # DeepLabv3: local ImageNet ResNet weights; never downloaded.
    config.model.freeze_backbone_steps = 0
    config.model.backbone_lr_multiplier = 1.0
    if variants.model == "unet":
        config.model.width = 16
        config.model.depth = 4  # The reference project's 4 down / 4 up levels.
        config.model.norm = "batch"
    else:
        config.model.depth = 18  # ResNet backbone depth (50 for torchvision's model).
        config.model.width = 16  # 64 for the standard backbone (and ImageNet weights).
        config.model.output_stride = 8
        config.model.aspp_channels = 64  # 256 for torchvision's model.
        config.model.dropout_rate = 0.1
        # DeepLabv3+'s decoder (the project's "two branches"); 0: torchvision's DeepLabv3 head.
        config.model.decoder_channels = 32  # 256 in the paper.
        config.model.low_level_channels = 16  # 48 in the paper.

    config.loss = ml_collections.ConfigDict()
    config.loss.dice_weight = 1.0
    config.loss.dice_over_batch = True  # One soft Dice over the batch: most slices are empty.
    config.loss.bce_weight = 1.0 if variants.loss == "dice_bce" else 0.0
    config.loss.focal_weight = 0.0 if variants.loss == "dice_bce" else 10.0
    config.loss.focal_alpha = 0.75  # Weight of hemorrhage pixels in the focal term.
    config.loss.focal_gamma = 2.0

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adamw"

    config.train = config_lib.train_config(
        steps=800,
        batch_size=16,
        learning_rate=3e-3,
        best_metric="val_dice_pooled",
        best_mode="max",
    )

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 32
    config.eval.split = "test"
    config.eval.checkpoint = "best"
    config.eval.threshold = 0.5  # Pixel probability threshold; a slice is positive above it.
    config.eval.num_plot = 6

    if variants.smoke:
        config.data.synthetic_num = 6
        config.data.preprocess = "resize(32)|window(brain,subdural,bone)"
        config.model.width = 4
        if variants.model == "unet":
            config.model.depth = 2
        else:
            config.model.aspp_channels = 8
            config.model.decoder_channels = 8
            config.model.low_level_channels = 4
        config.train.steps = 6
        config.train.batch_size = 8
        config.train.warmup_steps = 2
        config.train.log_every = 2
        config.train.eval_every = 3
        config.train.checkpoint_every = 3
        config.eval.batch_size = 8
        config.eval.num_plot = 2
    return config
