"""Perfusion: sidestream dark-field microcirculation video -> flow class and MFI per quadrant.

Three model families on the same patient splits (see medjax/tasks/perfusion.py):
  python -m medjax.main --config=configs/perfusion.py:model=convlstm --workdir=runs/perf_convlstm
CNN-RNN (InceptionV3 per frame -> LSTM) in two stages sharing one experiment directory: the
LSTM head on cached backbone features (DIR/frozen/), then the whole network (DIR/finetune/):
  python -m medjax.main --config=configs/perfusion.py:model=cnn_rnn,stage=frozen \
      --workdir=runs/perf_cnn_rnn
  python -m medjax.main --config=configs/perfusion.py:model=cnn_rnn,stage=finetune \
      --workdir=runs/perf_cnn_rnn
  (ImageNet weights: --config.model.init_from=inception_v3.pth (torchvision) or .h5 (Keras),
  a local file, never downloaded; use model.width=32 with them.)
Classical baselines, PCA features then KNN, LDA and NCA+KNN (scikit-learn, no gradient
training; one run directory per method under DIR, fitted and evaluated by one command):
  python -m medjax.main --config=configs/perfusion.py:model=classical --workdir=runs/perf_classical
  (the same: python -m medjax.tasks.perfusion_classical --config=... --workdir=...)
Seconds on a CPU (variants compose): add `,smoke`, e.g.
  python -m medjax.main --config=configs/perfusion.py:model=convlstm,smoke --workdir=/tmp/perf
Compare every model on the test split; evaluate again; predict on your own AVI:
  python -m medjax.compare --workdirs runs/perf_convlstm runs/perf_cnn_rnn/finetune \
      runs/perf_classical/knn runs/perf_classical/lda runs/perf_classical/nca_knn
  python -m medjax.evaluate --config=configs/perfusion.py --workdir=runs/perf_convlstm
  python -m medjax.predict --config=configs/perfusion.py --workdir=runs/perf_convlstm video.avi

Synthetic SDF videos (labels.csv + videos/*.avi, per-quadrant simulated flow) unless
--config.data.manual_dir points at a hospital export in that layout.
"""

import ml_collections

from medjax import config_lib

MODELS = ("convlstm", "cnn_rnn", "classical")
CNN_RNN_STAGES = ("frozen", "finetune")
# Stages tests/test_config.py smoke-trains one by one: none (the plain :smoke is the ConvLSTM;
# tests/test_perfusion.py trains both CNN-RNN stages and the classical baselines).
STAGES = ()


def get_config(arg=None):
    variants = config_lib.parse_variants(arg, smoke=False, model="convlstm", stage="frozen")
    config_lib.check_choice("model", variants.model, MODELS)
    config_lib.check_choice("stage", variants.stage, CNN_RNN_STAGES)

    config = ml_collections.ConfigDict()
    config.task = "perfusion"
    # Only the CNN-RNN has stages; each trains in DIR/<stage>/.
    config.stage = variants.stage if variants.model == "cnn_rnn" else ""
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "sdf_perfusion"
    config.data.manual_dir = ""  # labels.csv + videos/*.avi; empty: synthetic videos.
    config.data.data_dir = "data"
    config.data.synthetic_num = 120
    config.data.synthetic_seed = 0
    config.data.skip_missing_videos = False  # True: labels.csv rows without a video are skipped.
    # Build options of the dataset (decoded and resized once, by the builder).
    # Every third native frame (30 fps): continuous flow moves cells a few pixels per kept frame.
    config.data.frame_size = 48
    config.data.num_frames = 16
    config.data.frame_stride = 3
    # Frames the model reads; a random window in training when the stored clip is longer,
    # the first ones in evaluation and prediction. 0: all stored frames.
    config.data.clip_frames = 0
    config.data.num_workers = 0
    # A second input channel with |frame t - frame t-1| (flow is motion).
    config.data.motion_channel = variants.model != "classical"
    # Its scale: frame differences are small (flow moves few, faint cells). The CNN-RNN's
    # first conv also sees the grey frame in [-1, 1]; with a small gain the motion drowns in
    # it (measured on the synthetic videos: 4 left the frozen stage at the majority class).
    config.data.motion_gain = 40.0 if variants.model == "cnn_rnn" else 4.0

    config.augment = ml_collections.ConfigDict()
    config.augment.enabled = variants.model == "convlstm"  # Cached features cannot be flipped.
    config.augment.horizontal_flip = True  # Quadrant labels follow: q1<->q2, q3<->q4.
    config.augment.vertical_flip = True  # q1<->q3, q2<->q4.

    config.model = ml_collections.ConfigDict()
    config.model.name = variants.model
    config.model.init_from = ""  # cnn_rnn: a local InceptionV3 weight file (.pth / .h5).
    # The flow class from the quadrant predictions by the label's rule, or "head" (see
    # medjax/tasks/perfusion.py).
    config.model.flow_class_rule = "quadrants"
    config.model.freeze_backbone_steps = 0
    config.model.backbone_lr_multiplier = 1.0
    if variants.model == "convlstm":
        config.model.width = 8
        config.model.num_layers = 2
        config.model.kernel_size = 3
        config.model.stem_stride = 2
        config.model.quadrant_head = "ordinal"  # or "softmax" (4-way per quadrant).
        config.model.temporal_pool = "mean"
        config.model.dropout_rate = 0.1
        config.model.dtype = "float32"
    elif variants.model == "cnn_rnn":
        config.model.width = 8  # 32: the standard InceptionV3 (ImageNet weights need it).
        config.model.backbone_padding = "SAME"
        config.model.pool_count_include_pad = True  # False for Keras weights.
        config.model.hidden = 64
        config.model.projection_dim = 64
        config.model.quadrant_head = "ordinal"
        config.model.quadrant_mode = "crops"  # or "sequence" (full frames only, cheaper).
        config.model.dropout_rate = 0.1
        # The fine-tune stage lowers the backbone's learning rate.
        config.model.backbone_lr_multiplier = 0.1 if variants.stage == "finetune" else 1.0

    config.loss = ml_collections.ConfigDict()
    config.loss.video_weight = 1.0  # Cross-entropy of the video flow class.
    config.loss.quadrant_weight = 1.0  # Per-quadrant ordinal BCE (or CE), unscored masked.

    # Classical baselines (model=classical): PCA features, then each method.
    config.classical = ml_collections.ConfigDict()
    config.classical.methods = "knn,lda,nca_knn"
    config.classical.pool_size = 16  # Frames are area-downsampled to this side first.
    config.classical.frame_components = 4  # PCA components of the frames (appearance),
    config.classical.motion_components = 8  # and of absolute frame differences (motion).
    config.classical.neighbours = 5  # k of KNN (and of NCA+KNN).
    config.classical.nca_components = 8

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adamw"

    config.train = config_lib.train_config(
        steps={"convlstm": 1000, "cnn_rnn": 1000, "classical": 0}[variants.model],
        batch_size=8,
        learning_rate=2e-3,
        eval_every=250,
        best_metric="val_kappa",
        best_mode="max",
    )
    # cnn_rnn: frames per jit call when filling the frozen stage's feature cache.
    config.train.feature_batch_size = 16
    if variants.model == "cnn_rnn" and variants.stage == "finetune":
        config.train.steps = 300
        config.train.learning_rate = 3e-4

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 8
    config.eval.split = "test"
    config.eval.checkpoint = "best"
    config.eval.num_plot = 0

    if variants.smoke:
        config.data.synthetic_num = 24
        config.data.frame_size = 32
        config.data.num_frames = 8
        config.train.steps = 4 if variants.model != "classical" else 0
        config.train.batch_size = 4
        config.train.warmup_steps = 1
        config.train.log_every = 2
        config.train.eval_every = 2
        config.train.checkpoint_every = 2
        config.eval.batch_size = 4
        config.classical.frame_components = 4
        config.classical.motion_components = 4
        config.classical.neighbours = 3
        config.classical.nca_components = 4
        if variants.model == "convlstm":
            config.model.width = 4
        if variants.model == "cnn_rnn":
            config.model.width = 8
            config.model.hidden = 8
            config.model.projection_dim = 8
    return config
