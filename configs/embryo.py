"""Embryo time-lapse: a frame embedder (VAE or denoising AE), then an LSTM or SVM classifier.

Two stages share one experiment directory; classify finds the embedder in DIR/embed/:
  python -m medjax.main --config=configs/embryo.py --workdir=runs/embryo                 # VAE
  python -m medjax.main --config=configs/embryo.py:stage=classify --workdir=runs/embryo  # LSTM
  python -m medjax.main --config=configs/embryo.py:stage=classify,classifier=svm \
      --workdir=runs/embryo          # SVM on single frames, fitted by scikit-learn
Variants (they compose): embedder=vae|dae (stage=embed), classifier=lstm|svm, phase_head (a
16-phase per-frame head next to the outcome, LSTM only), finetune (the LSTM and the encoder
trained together on frames, initialised from the embed stage), smoke. Seconds on a CPU:
  python -m medjax.main --config=configs/embryo.py:smoke --workdir=/tmp/embryo_smoke
  python -m medjax.main --config=configs/embryo.py:stage=classify,smoke --workdir=/tmp/embryo_smoke
  python -m medjax.main --config=configs/embryo.py:stage=classify,classifier=svm,smoke \
      --workdir=/tmp/embryo_smoke
Evaluate a checkpoint again, and classify your own videos (folders of frames):
  python -m medjax.evaluate --config=configs/embryo.py:stage=classify --workdir=runs/embryo
  python -m medjax.predict --config=configs/embryo.py --workdir=runs/embryo VIDEO_DIR ...

Run directories: DIR/embed/, DIR/classify/ (LSTM) and DIR/classify_svm/ (SVM; its own folder so
both classifiers of one experiment can be compared). The SVM has no checkpoint: main fits and
evaluates it (DIR/classify_svm/eval/<split>/), medjax.evaluate does not apply to it.
Synthetic videos (the Gomez et al. 2022 layout plus a synthetic outcomes.csv) unless
--config.data.manual_dir points at real data; see datasets/embryo_timelapse.

Defaults are sized for a CPU: 64 px crops, at most 64 frames per video, a 3-level embedder of
width 16 with a 32-d latent, a 64-unit LSTM, a few hundred steps. `bash launch/embryo_all.sh`
on the 200 synthetic videos (34 in the test split, the commonest class 35 % of them), 2 CPU
cores shared with other work: 13 min for the three stages, data built included; test accuracy
0.71 (LSTM) and 0.56 (SVM), macro F1 0.71 and 0.56, one-vs-rest AUC 0.85 and 0.74.
"""

import ml_collections

from medjax import config_lib

# Stages that train on their own (tests/test_config.py smoke-trains each in a fresh directory):
# classify needs a trained embed stage in the same experiment directory, so it is not listed.
STAGES = ("embed",)
STAGE_VARIANT = "stage"
ALL_STAGES = ("embed", "classify")
EMBEDDERS = ("vae", "dae")
CLASSIFIERS = ("lstm", "svm")


def get_config(arg=None):
    variants = config_lib.parse_variants(
        arg,
        stage="embed",
        embedder="vae",
        classifier="lstm",
        phase_head=False,
        finetune=False,
        smoke=False,
    )
    config_lib.check_choice("stage", variants.stage, ALL_STAGES)
    config_lib.check_choice("embedder", variants.embedder, EMBEDDERS)
    config_lib.check_choice("classifier", variants.classifier, CLASSIFIERS)
    svm = variants.stage == "classify" and variants.classifier == "svm"
    if svm and (variants.phase_head or variants.finetune):
        raise ValueError(
            "Variants phase_head and finetune apply to the LSTM, not to classifier=svm."
        )

    config = ml_collections.ConfigDict()
    config.task = "embryo"
    config.stage = "classify_svm" if svm else variants.stage
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "embryo_timelapse"
    config.data.manual_dir = ""  # The dataset's folder (embryo_dataset/, ...); empty: synthetic.
    config.data.data_dir = "data"
    config.data.synthetic_num = 200  # 30 videos in each of the validation and test splits.
    config.data.synthetic_seed = 0
    # Build options (see datasets/embryo_timelapse): crop side, frames kept per video, the
    # hours considered, the fewest frames a video must keep, and videos without an outcome.
    config.data.frame_size = 64
    config.data.max_frames = 64
    config.data.max_hours = 140.0
    config.data.min_frames = 16
    config.data.allow_unlabelled = False  # True: keep them (outcome -1) for the embedder.
    config.data.num_workers = 0

    config.eval = ml_collections.ConfigDict()
    config.eval.split = "test"
    config.eval.checkpoint = "best"

    if variants.stage == "embed":
        config.model = ml_collections.ConfigDict()
        config.model.name = variants.embedder
        config.model.latent_dim = 32
        config.model.width = 16
        config.model.levels = 3  # frame_size must divide by 2**levels.
        config.model.blocks = 1  # 3x3 convolutions per level besides the resampling one.
        config.model.norm = True  # GroupNorm after each convolution.
        if variants.embedder == "dae":
            config.model.noise_std = 0.1  # Additive Gaussian noise (image in [0, 1]).
            config.model.mask_prob = 0.2  # Masking noise: share of pixels set to 0.

        config.loss = ml_collections.ConfigDict()
        config.loss.reconstruction = "bce"  # or "mse".
        # Weight of the KL term (VAE only); 1 is the ELBO, whose KL pressure on these low-contrast
        # frames leaves little but the zona in the code. `elbo` is reported with weight 1.
        config.loss.beta = 0.1

        # The project's augmentation: small rotations, translations, flips (and a little zoom).
        config.augment = ml_collections.ConfigDict()
        config.augment.enabled = True
        config.augment.rotation_deg = 15.0
        config.augment.shift = 0.05  # Fraction of the side.
        config.augment.flip_prob = 0.5
        config.augment.scale_low = 0.95
        config.augment.scale_high = 1.05

        config.train = _train(steps=600, batch_size=64, learning_rate=2e-3)
        config.eval.batch_size = 128
        config.eval.num_plot = 8  # Frames in the reconstruction grid.
        config.eval.frames_per_video = 0  # Evaluated frames per video, evenly spread; 0: all.
    else:
        config.classify = ml_collections.ConfigDict()
        config.classify.embedder_dir = ""  # The embed stage's run dir; empty: DIR/embed.
        config.classify.embedder_checkpoint = "best"  # best, latest or a step.
        config.classify.embed_batch_size = 256  # Frames per batch when computing embeddings.
        config.classify.use_hours = True  # Each frame's time (hours / max_hours) as a feature.
        config.classify.class_weights = "balanced"  # or "none".
        if svm:
            config.model = ml_collections.ConfigDict()
            config.model.name = "svm"  # scikit-learn's SVC, fitted by medjax.tasks.embryo.fit_svm.
            config.model.C = 0.1  # Small: frames of one video look alike, a large C memorises them.
            config.model.kernel = "rbf"  # SVC kernels: rbf, linear, poly, sigmoid.
            config.model.frames_per_video = 0  # Training frames per video, evenly spread; 0: all.
            config.model.video_rule = "mean"  # A video's class: "mean" frame probability, "vote".
        else:
            config.classify.phase_weight = 0.5 if variants.phase_head else 0.0
            config.classify.finetune_embedder = variants.finetune
            config.classify.feature_noise = 0.1  # Training: Gaussian noise on the embeddings.

            config.model = ml_collections.ConfigDict()
            config.model.name = "lstm_classifier"
            config.model.num_classes = 3
            config.model.hidden = 64
            config.model.num_layers = 1
            config.model.bidirectional = False
            config.model.pooling = "last"  # or "mean" over the valid steps.
            config.model.dropout_rate = 0.1
            config.model.num_phases = 16 if variants.phase_head else 0
            # finetune: the encoder ('backbone') gets no update for this many steps, then updates
            # scaled by the multiplier.
            config.model.freeze_backbone_steps = 0
            config.model.backbone_lr_multiplier = 1.0

            config.train = _train(steps=400, batch_size=16, learning_rate=3e-3)
            config.train.eval_every = 100
            config.train.checkpoint_every = 100
            if variants.finetune:
                config.train.batch_size = 8
                config.train.learning_rate = 1e-3
                config.model.freeze_backbone_steps = 100
                config.model.backbone_lr_multiplier = 0.1
            config.eval.batch_size = 32
            config.eval.num_plot = 0

    if variants.smoke:
        config.data.synthetic_num = 16
        config.data.frame_size = 32
        config.data.max_frames = 12
        config.data.min_frames = 8
        if variants.stage == "embed":
            config.model.latent_dim = 8
            config.model.width = 4
            config.model.levels = 2
            config.model.blocks = 0
            config.eval.num_plot = 2
        elif not svm:
            config.model.hidden = 8
        if "train" in config:
            config.train.steps = 4
            config.train.batch_size = 4
            config.train.warmup_steps = 1
            config.train.log_every = 2
            config.train.eval_every = 2
            config.train.checkpoint_every = 2
            config.eval.batch_size = 8
        if variants.finetune:
            config.model.freeze_backbone_steps = 2
    return config


def _train(*, steps: int, batch_size: int, learning_rate: float) -> ml_collections.ConfigDict:
    return config_lib.train_config(
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=30,
        log_every=50,
        eval_every=300,
        best_metric="val_loss",
        best_mode="min",
    )
