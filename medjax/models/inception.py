"""InceptionV3 (Szegedy et al., 2016) in Flax Linen, and the CNN-RNN perfusion classifier.

Layout is NHWC. `InceptionV3` is the architecture of torchvision's ``inception_v3`` and of
Keras' ``InceptionV3`` (the same network; torchvision's weights are ported from TensorFlow),
without the auxiliary classifier, which only adds a training loss on ImageNet::

    Conv2d_1a_3x3 (stride 2, valid) -> Conv2d_2a_3x3 (valid) -> Conv2d_2b_3x3 -> max-pool 3/2
    -> Conv2d_3b_1x1 -> Conv2d_4a_3x3 (valid) -> max-pool 3/2
    -> Mixed_5b, 5c, 5d (InceptionA) -> Mixed_6a (B) -> Mixed_6b .. 6e (C) -> Mixed_7a (D)
    -> Mixed_7b, 7c (E) -> global average pool (2048) -> dropout -> Dense ``head`` (fc)

Every conv is a `BasicConv2d`: conv without bias, BatchNorm (epsilon 0.001, PyTorch momentum
0.1), ReLU. Module names are torchvision's (``Mixed_5b/branch5x5_1/conv``,
``Mixed_5b/branch5x5_1/bn``), so `medjax.models.pretrained.inception_mapping` reads as a list.
At the standard width the model has torchvision's parameter count without ``AuxLogits``:
23,834,568 with the 1000-class head, 21,785,568 without (``num_classes=0``).

Options:

- ``width``: channels of the first conv, 32 in the standard model; every conv has
  ``c * width // 32`` channels (c its standard count), so ``width=4`` gives a network with
  1/8 of the channels and a 256-d feature, for tests and CPUs. Use an even width.
- ``padding``: ``"VALID"`` (the original) needs inputs of at least 75x75 (the 8x8 map of a
  299x299 input is 1x1 at 75x75); ``"SAME"`` pads the down-sampling convs and pools instead,
  so any size works (64x64 frames give a 2x2 final map, their 32x32 quadrants 1x1). The
  weights are the same; only border handling changes.
- ``pool_count_include_pad``: the 3x3 average pools of the branches divide by 9 at the
  border too in torchvision (True); Keras divides by the number of pixels inside the image
  (False). Use the one of the weights you load.

Pretrained weights (see `medjax.models.pretrained.load_pretrained`, ``model_name=
"inception_v3"``) expect RGB in [-1, 1] (``x / 127.5 - 1``) for both sources; for a 1-channel
model the first kernel is summed over R, G, B, which is the RGB network on a grey image in
[-1, 1].

`CnnRnnClassifier` is the CNN-RNN of the perfusion task: `InceptionV3` features of every frame
(``backbone``), then `SequenceHead` (``head``): an optional projection, an LSTM over time and
the video and per-quadrant heads of `medjax.models.convlstm.PerfusionHeads`. With
``quadrant_mode="crops"`` the backbone reads each quadrant crop of every frame and one LSTM
(shared weights) runs over each quadrant's sequence, as a clinician scores each quadrant on its
own; the video's state is the quadrants' states together. The crops have the area of the frame
and go through the backbone as one batch, so its BatchNorm statistics (estimated or trained)
describe one population of inputs. With ``"sequence"`` only the full frame is read and the
quadrant scores come from the video's sequence feature through a quadrant-specific embedding.

Frozen stage and feature cache: ``model.apply(variables, frames, method="frame_features")``
gives the per-frame features (B, T, V, F) (V = num_quadrants with crops, q1 .. q4; 1, the
full frame, with "sequence"). `SequenceHead` built by `CnnRnnClassifier.sequence_head` trains on cached
features; its ``params`` are exactly ``params["head"]`` of the full model, so
``{"backbone": backbone params, "head": trained head params}`` fine-tunes end to end. The
backbone's BatchNorm uses its running statistics in training too by default
(``freeze_backbone_bn``), so the features the full model sees while fine-tuning are the cached
ones.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from medjax.models.convlstm import PerfusionHeads, quadrant_bounds, quadrant_grid

__all__ = [
    "BasicConv2d",
    "InceptionV3",
    "CnnRnnClassifier",
    "SequenceHead",
    "INCEPTION_BLOCKS",
    "STANDARD_WIDTH",
    "frame_features",
]

# Channels of the first conv in the standard model; `width` scales every conv by width / 32.
STANDARD_WIDTH = 32
# Smallest input side with padding="VALID".
MIN_VALID_SIZE = 75
PADDINGS = ("VALID", "SAME")
QUADRANT_MODES = ("crops", "sequence")

# The convs of each block in creation order (torchvision's module order, which is also the
# order Keras creates, and numbers, its conv2d_N / batch_normalization_N layers).
_STEM = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3")
_BLOCK_CONVS = {
    "A": (
        "branch1x1",
        "branch5x5_1",
        "branch5x5_2",
        "branch3x3dbl_1",
        "branch3x3dbl_2",
        "branch3x3dbl_3",
        "branch_pool",
    ),
    "B": ("branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
    "C": (
        "branch1x1",
        "branch7x7_1",
        "branch7x7_2",
        "branch7x7_3",
        "branch7x7dbl_1",
        "branch7x7dbl_2",
        "branch7x7dbl_3",
        "branch7x7dbl_4",
        "branch7x7dbl_5",
        "branch_pool",
    ),
    "D": (
        "branch3x3_1",
        "branch3x3_2",
        "branch7x7x3_1",
        "branch7x7x3_2",
        "branch7x7x3_3",
        "branch7x7x3_4",
    ),
    "E": (
        "branch1x1",
        "branch3x3_1",
        "branch3x3_2a",
        "branch3x3_2b",
        "branch3x3dbl_1",
        "branch3x3dbl_2",
        "branch3x3dbl_3a",
        "branch3x3dbl_3b",
        "branch_pool",
    ),
}
_BLOCKS = (
    ("Mixed_5b", "A"),
    ("Mixed_5c", "A"),
    ("Mixed_5d", "A"),
    ("Mixed_6a", "B"),
    ("Mixed_6b", "C"),
    ("Mixed_6c", "C"),
    ("Mixed_6d", "C"),
    ("Mixed_6e", "C"),
    ("Mixed_7a", "D"),
    ("Mixed_7b", "E"),
    ("Mixed_7c", "E"),
)
# (module path, ...) of every BasicConv2d in creation order: ("Conv2d_1a_3x3",),
# ("Mixed_5b", "branch1x1"), ...
INCEPTION_BLOCKS: tuple[tuple[str, ...], ...] = tuple((name,) for name in _STEM) + tuple(
    (block, conv) for block, kind in _BLOCKS for conv in _BLOCK_CONVS[kind]
)
# Pool-branch channels of the three InceptionA blocks and 7x7 channels of the four InceptionC.
_POOL_FEATURES = {"Mixed_5b": 32, "Mixed_5c": 64, "Mixed_5d": 64}
_CHANNELS_7X7 = {"Mixed_6b": 128, "Mixed_6c": 160, "Mixed_6d": 160, "Mixed_6e": 192}
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _scaled(channels: int, width: int) -> int:
    """Channels of a conv with ``channels`` in the standard model, at ``width``.

    Args:
      channels: the standard channel count.
      width: channels of the first conv (32 standard).

    Returns:
      ``max(1, channels * width // 32)``.
    """
    return max(1, channels * width // STANDARD_WIDTH)


def _check_padding(padding: str) -> str:
    """Normalises and validates the ``padding`` option.

    Args:
      padding: ``"VALID"`` or ``"SAME"``, any case.

    Returns:
      The upper-case name.

    Raises:
      ValueError: another value.
    """
    name = str(padding).upper()
    if name not in PADDINGS:
        raise ValueError(f"InceptionV3 padding={padding!r} is not one of {PADDINGS}")
    return name


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (epsilon 0.001) -> ReLU.

    Attributes:
      features: output channels.
      kernel_size: (height, width) of the kernel.
      strides: spatial stride.
      padding: ``"VALID"``, ``"SAME"``, or ``None`` for the symmetric padding of an odd kernel
        at stride 1 (PyTorch's ``padding=k // 2``).
      dtype: computation dtype (parameters and statistics are float32).
    """

    features: int
    kernel_size: Sequence[int] = (1, 1)
    strides: int = 1
    padding: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        """Applies the conv, norm and ReLU.

        Args:
          x: NHWC input.
          train: True to normalise with (and update) batch statistics.

        Returns:
          NHWC output with ``features`` channels.
        """
        kh, kw = self.kernel_size
        padding = self.padding or ((kh // 2, kh // 2), (kw // 2, kw // 2))
        x = nn.Conv(
            self.features,
            kernel_size=(kh, kw),
            strides=(self.strides, self.strides),
            padding=padding,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=_CONV_INIT,
            name="conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-3,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="bn",
        )(x)
        return nn.relu(x)


class _InceptionBlock(nn.Module):
    """One Mixed block (kind A to E); conv names and channels as torchvision's.

    Attributes:
      kind: ``"A"`` .. ``"E"``.
      width: channels of the network's first conv (32 standard).
      pool_features: pool-branch channels (A only).
      channels_7x7: inner channels of the 7x7 branches (C only).
      padding: padding of the down-sampling convs and pools (B, D): ``"VALID"`` or ``"SAME"``.
      pool_count_include_pad: see `InceptionV3`.
      dtype: computation dtype.
    """

    kind: str
    width: int = STANDARD_WIDTH
    pool_features: int = 0
    channels_7x7: int = 0
    padding: str = "VALID"
    pool_count_include_pad: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        """Applies the block.

        Args:
          x: NHWC input.
          train: see `BasicConv2d`.

        Returns:
          The branches concatenated along channels, in torchvision's order.
        """

        def conv(name, channels, kernel=(1, 1), strides=1, padding=None):
            return BasicConv2d(
                _scaled(channels, self.width),
                kernel,
                strides,
                padding,
                self.dtype,
                name=name,
            )

        def avg_pool(y):
            return nn.avg_pool(
                y,
                (3, 3),
                strides=(1, 1),
                padding=((1, 1), (1, 1)),
                count_include_pad=self.pool_count_include_pad,
            )

        def max_pool(y):
            return nn.max_pool(y, (3, 3), strides=(2, 2), padding=self.padding)

        def t(module, y):
            return module(y, train=train)

        if self.kind == "A":
            b1 = t(conv("branch1x1", 64), x)
            b5 = t(conv("branch5x5_2", 64, (5, 5)), t(conv("branch5x5_1", 48), x))
            b3 = t(conv("branch3x3dbl_1", 64), x)
            b3 = t(conv("branch3x3dbl_2", 96, (3, 3)), b3)
            b3 = t(conv("branch3x3dbl_3", 96, (3, 3)), b3)
            bp = t(conv("branch_pool", self.pool_features), avg_pool(x))
            return jnp.concatenate([b1, b5, b3, bp], axis=-1)
        if self.kind == "B":
            b3 = t(conv("branch3x3", 384, (3, 3), 2, self.padding), x)
            bd = t(conv("branch3x3dbl_1", 64), x)
            bd = t(conv("branch3x3dbl_2", 96, (3, 3)), bd)
            bd = t(conv("branch3x3dbl_3", 96, (3, 3), 2, self.padding), bd)
            return jnp.concatenate([b3, bd, max_pool(x)], axis=-1)
        if self.kind == "C":
            c7 = self.channels_7x7
            b1 = t(conv("branch1x1", 192), x)
            b7 = t(conv("branch7x7_1", c7), x)
            b7 = t(conv("branch7x7_2", c7, (1, 7)), b7)
            b7 = t(conv("branch7x7_3", 192, (7, 1)), b7)
            bd = t(conv("branch7x7dbl_1", c7), x)
            bd = t(conv("branch7x7dbl_2", c7, (7, 1)), bd)
            bd = t(conv("branch7x7dbl_3", c7, (1, 7)), bd)
            bd = t(conv("branch7x7dbl_4", c7, (7, 1)), bd)
            bd = t(conv("branch7x7dbl_5", 192, (1, 7)), bd)
            bp = t(conv("branch_pool", 192), avg_pool(x))
            return jnp.concatenate([b1, b7, bd, bp], axis=-1)
        if self.kind == "D":
            b3 = t(conv("branch3x3_1", 192), x)
            b3 = t(conv("branch3x3_2", 320, (3, 3), 2, self.padding), b3)
            b7 = t(conv("branch7x7x3_1", 192), x)
            b7 = t(conv("branch7x7x3_2", 192, (1, 7)), b7)
            b7 = t(conv("branch7x7x3_3", 192, (7, 1)), b7)
            b7 = t(conv("branch7x7x3_4", 192, (3, 3), 2, self.padding), b7)
            return jnp.concatenate([b3, b7, max_pool(x)], axis=-1)
        if self.kind == "E":
            b1 = t(conv("branch1x1", 320), x)
            b3 = t(conv("branch3x3_1", 384), x)
            b3 = jnp.concatenate(
                [
                    t(conv("branch3x3_2a", 384, (1, 3)), b3),
                    t(conv("branch3x3_2b", 384, (3, 1)), b3),
                ],
                axis=-1,
            )
            bd = t(conv("branch3x3dbl_1", 448), x)
            bd = t(conv("branch3x3dbl_2", 384, (3, 3)), bd)
            bd = jnp.concatenate(
                [
                    t(conv("branch3x3dbl_3a", 384, (1, 3)), bd),
                    t(conv("branch3x3dbl_3b", 384, (3, 1)), bd),
                ],
                axis=-1,
            )
            bp = t(conv("branch_pool", 192), avg_pool(x))
            return jnp.concatenate([b1, b3, bd, bp], axis=-1)
        raise ValueError(f"Unknown Inception block kind {self.kind!r}")


def inception_feature_dim(width: int = STANDARD_WIDTH) -> int:
    """Channels of the pooled InceptionV3 feature at ``width`` (2048 at the standard 32).

    Args:
      width: channels of the first conv.

    Returns:
      The feature size, the channels of Mixed_7c.
    """
    return _scaled(320, width) + 4 * _scaled(384, width) + _scaled(192, width)


class InceptionV3(nn.Module):
    """InceptionV3 without the auxiliary classifier: logits, or the pooled feature.

    Attributes:
      width: channels of the first conv; every conv scales by width / 32 (32 standard).
      num_classes: logits of the Dense ``head`` (torchvision's ``fc``); 0 returns the
        globally average-pooled feature of `inception_feature_dim` channels instead.
      dropout_rate: dropout before the head (0.5 in torchvision).
      padding: ``"VALID"`` (original; inputs >= 75x75) or ``"SAME"`` (any size).
      pool_count_include_pad: True as torchvision's branch average pools, False as Keras'.
      dtype: computation dtype; parameters are float32, the pooled feature and the head
        float32.
    """

    width: int = STANDARD_WIDTH
    num_classes: int = 1000
    dropout_rate: float = 0.5
    padding: str = "VALID"
    pool_count_include_pad: bool = True
    dtype: Any = jnp.float32

    def setup(self) -> None:
        """Creates the stem convs, the Mixed blocks and the head with torchvision's names."""
        padding = _check_padding(self.padding)
        self._padding = padding
        stem = functools.partial(BasicConv2d, dtype=self.dtype)
        w = self.width
        self.Conv2d_1a_3x3 = stem(_scaled(32, w), (3, 3), 2, padding)
        self.Conv2d_2a_3x3 = stem(_scaled(32, w), (3, 3), 1, padding)
        self.Conv2d_2b_3x3 = stem(_scaled(64, w), (3, 3))
        self.Conv2d_3b_1x1 = stem(_scaled(80, w), (1, 1))
        self.Conv2d_4a_3x3 = stem(_scaled(192, w), (3, 3), 1, padding)
        for name, kind in _BLOCKS:
            # Linen names a submodule created in setup after the attribute it is stored in.
            setattr(
                self,
                name,
                _InceptionBlock(
                    kind,
                    width=w,
                    pool_features=_POOL_FEATURES.get(name, 0),
                    channels_7x7=_CHANNELS_7X7.get(name, 0),
                    padding=padding,
                    pool_count_include_pad=self.pool_count_include_pad,
                    dtype=self.dtype,
                ),
            )
        if self.num_classes > 0:
            self.dropout = nn.Dropout(self.dropout_rate)
            self.head = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32)

    def features(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        """Globally average-pooled Mixed_7c features.

        Args:
          x: images (B, H, W, C), any C, scaled to [-1, 1] for pretrained weights.
          train: True to use (and, with ``mutable=["batch_stats"]``, update) batch statistics.

        Returns:
          float32 features (B, `inception_feature_dim`).

        Raises:
          ValueError: a non-4-D input, or one smaller than 75x75 with padding "VALID".
        """
        if x.ndim != 4:
            raise ValueError(f"InceptionV3 expects images (B, H, W, C), got shape {x.shape}")
        if self._padding == "VALID" and min(x.shape[1:3]) < MIN_VALID_SIZE:
            raise ValueError(
                f"InceptionV3 with padding='VALID' needs inputs of at least "
                f"{MIN_VALID_SIZE}x{MIN_VALID_SIZE}, got {x.shape[1]}x{x.shape[2]}; resize the "
                "images or set padding='SAME'."
            )
        x = x.astype(self.dtype)
        x = self.Conv2d_1a_3x3(x, train=train)
        x = self.Conv2d_2a_3x3(x, train=train)
        x = self.Conv2d_2b_3x3(x, train=train)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=self._padding)
        x = self.Conv2d_3b_1x1(x, train=train)
        x = self.Conv2d_4a_3x3(x, train=train)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=self._padding)
        for name, _ in _BLOCKS:
            x = getattr(self, name)(x, train=train)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))

    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        """Classifies images, or returns their features when ``num_classes`` is 0.

        Args:
          x: images (B, H, W, C); see `features`.
          train: True in training mode (batch statistics, dropout with a ``"dropout"`` rng).

        Returns:
          float32 logits (B, num_classes), or features (B, F) when ``num_classes`` is 0.
        """
        pooled = self.features(x, train=train)
        if self.num_classes <= 0:
            return pooled
        return self.head(self.dropout(pooled, deterministic=not train))


class SequenceHead(nn.Module):
    """Projection, LSTM over time and the perfusion heads, on per-frame features.

    Attributes:
      hidden: LSTM units.
      projection_dim: a Dense + ReLU to this size before the LSTM; 0 for none.
      num_quadrants: quadrants scored (4: q1 top-left .. q4 bottom-right).
      num_classes: classes of the video and of each quadrant.
      quadrant_head: ``"ordinal"`` or ``"softmax"`` (see `PerfusionHeads`).
      quadrant_mode: ``"crops"`` (features (B, T, num_quadrants, F): one LSTM with shared
        weights over each quadrant's crops; the video reads the quadrants' final states) or ``"sequence"`` (features
        (B, T, 1, F): quadrant features from the frame sequence's final state).
      dropout_rate: dropout on the LSTM's final states before the heads.
    """

    hidden: int = 256
    projection_dim: int = 0
    num_quadrants: int = 4
    num_classes: int = 4
    quadrant_head: str = "ordinal"
    quadrant_mode: str = "crops"
    dropout_rate: float = 0.0

    def num_views(self) -> int:
        """Views per frame the features must have: num_quadrants with crops, else 1."""
        if self.quadrant_mode not in QUADRANT_MODES:
            raise ValueError(f"quadrant_mode={self.quadrant_mode!r} is not one of {QUADRANT_MODES}")
        return self.num_quadrants if self.quadrant_mode == "crops" else 1

    @nn.compact
    def __call__(self, features: jnp.ndarray, *, train: bool) -> dict[str, jnp.ndarray]:
        """Classifies clips from their per-frame features.

        Args:
          features: (B, T, V, F) per-frame features, V = `num_views` (q1 .. q4 with crops,
            the full frame with "sequence"), as `CnnRnnClassifier.frame_features` returns.
          train: True in training mode (dropout, with a ``"dropout"`` rng when
            ``dropout_rate`` > 0).

        Returns:
          ``{"video_logits": (B, num_classes), "quadrant_logits": (B, num_quadrants, K - 1 or
          K)}``, float32 (see `PerfusionHeads`).

        Raises:
          ValueError: features of the wrong rank or number of views.
        """
        views = self.num_views()
        if features.ndim != 4 or features.shape[2] != views:
            raise ValueError(
                f"SequenceHead with quadrant_mode={self.quadrant_mode!r} expects features "
                f"(B, T, {views}, F), got shape {features.shape}"
            )
        x = features.astype(jnp.float32)
        if self.projection_dim > 0:
            x = nn.relu(nn.Dense(self.projection_dim, name="projection")(x))
        # (B, V, T, F): nn.RNN scans the axis before the features and batches the others.
        outputs = nn.RNN(nn.OptimizedLSTMCell(self.hidden), name="lstm")(x.transpose(0, 2, 1, 3))
        final = nn.Dropout(self.dropout_rate, deterministic=not train)(outputs[:, :, -1])
        batch = final.shape[0]
        if self.quadrant_mode == "crops":
            quadrants = final
            video = quadrants.reshape(batch, -1)
        else:
            video = final[:, 0]
            quadrants = nn.relu(
                nn.Dense(self.num_quadrants * self.hidden, name="quadrant_embedding")(video)
            ).reshape(batch, self.num_quadrants, self.hidden)
        return PerfusionHeads(self.num_classes, self.quadrant_head, name="heads")(video, quadrants)


class CnnRnnClassifier(nn.Module):
    """Per-frame InceptionV3 features (``backbone``) -> `SequenceHead` (``head``).

    Attributes:
      width: first-conv channels of the backbone (32 standard, for ImageNet weights).
      backbone_padding: ``"SAME"`` (default: 64x64 frames and their 32x32 quadrants work) or
        ``"VALID"`` (the original; frames, and crops, of at least 75x75).
      pool_count_include_pad: see `InceptionV3` (True for torchvision weights, False for
        Keras').
      freeze_backbone_bn: the backbone's BatchNorm always uses its running statistics, also
        with ``train=True`` (its parameters still get gradients); keeps fine-tuning on small
        video batches from disturbing ImageNet statistics and makes training features equal
        to cached ones. Set False to train a backbone from scratch.
      hidden, projection_dim, num_quadrants, num_classes, quadrant_head, quadrant_mode,
        dropout_rate: see `SequenceHead`.
      dtype: computation dtype of the backbone; the head runs in float32.
    """

    width: int = STANDARD_WIDTH
    backbone_padding: str = "SAME"
    pool_count_include_pad: bool = True
    freeze_backbone_bn: bool = True
    hidden: int = 256
    projection_dim: int = 0
    num_quadrants: int = 4
    num_classes: int = 4
    quadrant_head: str = "ordinal"
    quadrant_mode: str = "crops"
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    def _head_attributes(self) -> dict[str, Any]:
        """The attributes this model gives its `SequenceHead`."""
        return dict(
            hidden=self.hidden,
            projection_dim=self.projection_dim,
            num_quadrants=self.num_quadrants,
            num_classes=self.num_classes,
            quadrant_head=self.quadrant_head,
            quadrant_mode=self.quadrant_mode,
            dropout_rate=self.dropout_rate,
        )

    def sequence_head(self) -> SequenceHead:
        """A `SequenceHead` configured as this model's ``head``, for training on cached features.

        Returns:
          A new top-level (unbound) module; its params are interchangeable with
          ``params["head"]`` of this model.
        """
        return SequenceHead(**self._head_attributes(), parent=None)

    def setup(self) -> None:
        """Creates the ``backbone`` and the ``head``."""
        self.backbone = InceptionV3(
            width=self.width,
            num_classes=0,
            padding=self.backbone_padding,
            pool_count_include_pad=self.pool_count_include_pad,
            dtype=self.dtype,
        )
        self.head = SequenceHead(**self._head_attributes())

    def frame_features(self, frames: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        """Backbone features of every frame, or of its quadrant crops with ``"crops"``.

        Args:
          frames: (B, T, H, W, C) clips, scaled to [-1, 1] for pretrained weights; with
            ``"crops"`` H and W must divide by sqrt(num_quadrants).
          train: training mode of the backbone's BatchNorm (ignored with
            ``freeze_backbone_bn``).

        Returns:
          float32 features (B, T, V, F): V = num_quadrants with ``"crops"`` (q1 .. q4, row by
          row), 1 (the full frame) with ``"sequence"``.

        Raises:
          ValueError: a non-5-D input, or frames whose sides do not divide into quadrants.
        """
        if frames.ndim != 5:
            raise ValueError(f"CnnRnnClassifier expects clips (B, T, H, W, C), got {frames.shape}")
        batch, time, height, width, channels = frames.shape
        bn_train = train and not self.freeze_backbone_bn
        flat = frames.reshape(batch * time, height, width, channels)
        if self.head.num_views() == 1:
            return self.backbone.features(flat, train=bn_train).reshape(batch, time, 1, -1)
        side = quadrant_grid(self.num_quadrants)
        if height % side or width % side:
            raise ValueError(
                f"quadrant_mode='crops' needs frame sides that divide by {side}, got "
                f"{height}x{width}; resize the frames or use quadrant_mode='sequence'."
            )
        crops = jnp.stack(
            [
                flat[:, r0:r1, c0:c1]
                for r0, r1 in quadrant_bounds(height, side)
                for c0, c1 in quadrant_bounds(width, side)
            ],
            axis=1,
        )
        features = self.backbone.features(crops.reshape(-1, *crops.shape[2:]), train=bn_train)
        return features.reshape(batch, time, self.num_quadrants, -1)

    def __call__(self, frames: jnp.ndarray, *, train: bool) -> dict[str, jnp.ndarray]:
        """Classifies clips.

        Args:
          frames: (B, T, H, W, C) clips; see `frame_features`.
          train: True in training mode (see `frame_features` and `SequenceHead`).

        Returns:
          The outputs of `SequenceHead`.
        """
        return self.head(self.frame_features(frames, train=train), train=train)


def frame_features(model: CnnRnnClassifier, variables: Any, frames: jnp.ndarray) -> jnp.ndarray:
    """Per-frame backbone features for a feature cache (inference mode; jit it for speed).

    Args:
      model: the `CnnRnnClassifier`.
      variables: its variables (``params`` and ``batch_stats``; only the backbone's are used).
      frames: (B, T, H, W, C) clips.

    Returns:
      float32 features (B, T, V, F), see `CnnRnnClassifier.frame_features`.
    """
    return model.apply(variables, frames, train=False, method=CnnRnnClassifier.frame_features)
