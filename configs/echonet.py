"""EchoNet-Dynamic: echocardiogram video -> ejection fraction, LV segmentation, beat-to-beat EF.

Two stages share one experiment directory (each trains in DIR/<stage>/):
  python -m medjax.main --config=configs/echonet.py --workdir=runs/echonet               # EF
  python -m medjax.main --config=configs/echonet.py:task=segment --workdir=runs/echonet  # LV
Seconds on a CPU (variants compose):
  python -m medjax.main --config=configs/echonet.py:smoke --workdir=/tmp/echo_smoke
  python -m medjax.main --config=configs/echonet.py:task=segment,smoke --workdir=/tmp/echo_smoke
The paper's recipe (R(2+1)D-18, 112x112, SGD lr 1e-4 x0.1 every 15 epochs, 45 epochs, batch 20;
DeepLabv3-ResNet50) with real data:
  python -m medjax.main --config=configs/echonet.py:paper \
      --config.data.manual_dir=/data/EchoNet-Dynamic --workdir=runs/echonet_paper
Evaluate (EF with all-clips averaging; LV Dice; beat-to-beat EF from both stages):
  python -m medjax.evaluate --config=configs/echonet.py --workdir=runs/echonet --split=test
  python -m medjax.evaluate --config=configs/echonet.py:task=segment --workdir=runs/echonet
  python -m medjax.evaluate --config=configs/echonet.py --workdir=runs/echonet --end_to_end

Synthetic videos (the EchoNet-Dynamic layout, EF from the drawn ventricle) unless
--config.data.manual_dir points at the real dataset. bfloat16 compute: --config.model.dtype=bfloat16.
"""

import ml_collections

from medjax import config_lib

STAGES = ("ef", "segment")
STAGE_VARIANT = "task"  # The variant that picks the stage: configs/echonet.py:task=segment.


def get_config(arg=None):
    variants = config_lib.parse_variants(arg, smoke=False, paper=False, task="ef")
    config_lib.check_choice("task", variants.task, STAGES)
    stage = variants.task

    config = ml_collections.ConfigDict()
    config.task = "echonet"
    config.stage = stage
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "echonet_dynamic"
    config.data.manual_dir = ""  # The real dataset's folder (FileList.csv, ...); empty: synthetic.
    config.data.data_dir = "data"
    config.data.synthetic_num = 160
    config.data.synthetic_seed = 0
    config.data.skip_missing_videos = False  # True: FileList rows without a video are skipped.
    # CPU-sized defaults; `:paper` sets the protocol's 112 px, 32 frames every 2nd, pad 12.
    config.data.frame_size = {"ef": 48, "segment": 112}[stage]  # Frames resized to this side.
    config.data.clip_length = 8  # Frames per clip,
    config.data.clip_period = 4  # taken every `clip_period` frames (8 x 4: about a beat).
    config.data.pad = 4  # Training augmentation: zero-pad by this much, random crop back.
    config.data.num_workers = 0
    config.data.stats_videos = 128  # Train videos sampled for the per-channel mean / std.
    config.data.channels = 1  # Model input channels: gray, or repeated to 3 as EchoNet does.

    config.model = ml_collections.ConfigDict()
    config.model.init_from = ""
    config.model.freeze_backbone_steps = 0
    config.model.backbone_lr_multiplier = 1.0
    config.model.dtype = "float32"  # "bfloat16": mixed-precision compute, float32 parameters.
    if stage == "ef":
        config.model.name = "r2plus1d_ef"
        config.model.depth = 10  # 18 for the paper's R(2+1)D-18.
        config.model.width = 8  # 64 for the paper's R(2+1)D-18.
        config.model.stem_width = 0  # 0: 45 * width / 64, as torchvision.
        config.model.dropout_rate = 0.0
    else:
        config.model.name = "deeplabv3"
        config.model.depth = 18  # 50 for the paper's DeepLabv3-ResNet50.
        config.model.width = 8  # 64 for the paper's model.
        config.model.output_stride = 8
        config.model.aspp_channels = 32  # 256 for the paper's model.
        config.model.dropout_rate = 0.5

    config.loss = ml_collections.ConfigDict()
    config.loss.dice_weight = 0.0  # EchoNet trains the LV mask with BCE only.
    config.loss.bce_weight = 1.0

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adamw"  # or "sgd" (momentum 0.9, step decay): the paper's.
    config.optimizer.momentum = 0.9
    config.optimizer.lr_step_every = 0  # SGD: multiply the lr by lr_step_gamma every N steps.
    config.optimizer.lr_step_gamma = 0.1

    best_metric, best_mode = {"ef": ("val_mae", "min"), "segment": ("val_dice_overall", "max")}[
        stage
    ]
    config.train = config_lib.train_config(
        steps={"ef": 600, "segment": 400}[stage],
        batch_size=16,
        learning_rate={"ef": 2e-3, "segment": 3e-3}[stage],
        warmup_steps=30,
        best_metric=best_metric,
        best_mode=best_mode,
    )

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 16
    config.eval.split = "test"
    config.eval.checkpoint = "best"
    config.eval.threshold = 0.5
    config.eval.num_plot = 8
    config.eval.clip_stride = 4  # All-clips test-time averaging: every `clip_stride`-th start
    # (1: every start, the paper's).
    config.eval.max_clips = 0  # >0: at most this many clips per video (evenly spread).
    config.eval.bootstrap_samples = 10000
    config.eval.hfref_threshold = 50.0  # EF < this is heart failure with reduced EF.
    config.eval.beat_min_distance_s = 0.4  # Beat detection: minimum time between end-systoles.
    config.eval.beat_prominence = 0.5  # ... and their prominence, as a share of the area range.

    if variants.paper:
        config.data.synthetic_num = 400
        config.data.frame_size = 112
        config.data.clip_length = 32
        config.data.clip_period = 2
        config.data.pad = 12
        config.data.channels = 3
        config.eval.clip_stride = 1
        if stage == "ef":
            config.model.depth = 18
            config.model.width = 64
        else:
            config.model.depth = 50
            config.model.width = 64
            config.model.aspp_channels = 256
        config.optimizer.name = "sgd"
        config.train.warmup_steps = 0
        config.train.grad_clip = 0.0
        if stage == "ef":
            # 45 epochs of the 7,465 training videos, batch 20, lr 1e-4 x0.1 every 15 epochs.
            steps_per_epoch = 7465 // 20
            config.train.batch_size = 20
            config.train.learning_rate = 1e-4
            config.train.weight_decay = 1e-4
            config.train.steps = 45 * steps_per_epoch
            config.optimizer.lr_step_every = 15 * steps_per_epoch
        else:
            # 50 epochs, 20 videos (40 traced frames) a batch, lr 1e-5, no decay.
            steps_per_epoch = 2 * 7465 // 40
            config.train.batch_size = 40
            config.train.learning_rate = 1e-5
            config.train.weight_decay = 0.0
            config.train.steps = 50 * steps_per_epoch
        config.train.eval_every = steps_per_epoch
        config.train.checkpoint_every = steps_per_epoch
    if variants.smoke:
        config.data.synthetic_num = 16
        config.data.frame_size = 32
        config.data.clip_length = 8
        config.data.clip_period = 2
        config.data.pad = 3
        config.data.stats_videos = 8
        config.model.width = 4
        if stage == "ef":
            config.model.depth = 10
        else:
            config.model.aspp_channels = 8
        config.train.steps = 4
        config.train.batch_size = 4
        config.train.warmup_steps = 1
        config.train.log_every = 2
        config.train.eval_every = 2
        config.train.checkpoint_every = 2
        config.eval.batch_size = 8
        config.eval.num_plot = 2
        config.eval.clip_stride = 8
        config.eval.bootstrap_samples = 200
    return config
