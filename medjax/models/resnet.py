"""ResNet-18/34/50 (He et al., 2016) in Flax Linen: a multi-scale backbone and a classifier.

Layout is NHWC. The architecture is torchvision's ``resnet18/34/50`` (ResNet v1.5: a
down-sampling Bottleneck strides in its 3x3 conv; every padding is explicit and symmetric, as
in PyTorch), so torchvision ImageNet weights load one-to-one with
`medjax.models.pretrained.load_pretrained`. Module names follow torchvision's state-dict keys;
norm layers keep the ``bn`` names whatever ``norm`` is::

    torchvision key                   Flax variable (inside `ResNet`)
    conv1.weight                      params/conv1/kernel
    bn1.weight, bn1.bias              params/bn1/scale, params/bn1/bias
    bn1.running_mean, .running_var    batch_stats/bn1/mean, batch_stats/bn1/var
    layer2.0.conv1.weight             params/layer2_0/conv1/kernel
    layer2.0.downsample.0.weight      params/layer2_0/downsample_conv/kernel
    layer2.0.downsample.1.*           params|batch_stats/layer2_0/downsample_bn/*
    fc.weight, fc.bias                params/head/kernel, params/head/bias  (`ResNetClassifier`)

`ResNetClassifier` holds the backbone as its submodule ``backbone`` (paths
``params/backbone/conv1/kernel``, ...) next to the Dense ``head``.

`ResNet` returns a dict of feature maps (``FEATURE_KEYS``); without dilation their strides are
``stem`` 2 (conv1 -> norm -> ReLU, before the max-pool), ``c2`` 4 (layer1), ``c3`` 8 (layer2),
``c4`` 16 (layer3) and ``c5`` 32 (layer4). `ResNet.feature_strides` and
`ResNet.feature_channels` give the values for any configuration.

Example::

    backbone = ResNet(depth=34, width=64)
    variables = backbone.init(key, images, train=False)
    features = backbone.apply(variables, images, train=False)  # features["c5"]: stride 32
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "ResNetClassifier",
    "batch_norm",
    "FEATURE_KEYS",
    "NORMS",
]

NORMS = ("batch", "group", "none")
STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}
FEATURE_KEYS = ("stem", "c2", "c3", "c4", "c5")

# Upper bound on GroupNorm groups (Wu & He, 2018); the group count is gcd(channels, this).
_MAX_GROUPS = 32
# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", nonlinearity="relu").
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _check_norm(norm: str) -> None:
    """Raises ValueError for a normalisation name that is not in `NORMS`.

    Args:
      norm: the requested normalisation name.

    Returns:
      None.
    """
    if norm not in NORMS:
        raise ValueError(f"Unknown norm {norm!r}; expected one of {NORMS}")


def batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults (momentum 0.1, i.e. 0.9 here; eps 1e-5), float32
    statistics and parameters, so torchvision weights and running statistics carry over."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _make_norm(norm: str, features: int, train: bool, dtype: Any, name: str) -> Callable:
    """Builds the normalisation layer that follows a convolution.

    Args:
      norm: one of `NORMS`.
      features: channels of the normalised map.
      train: True to normalise with (and update) batch statistics.
      dtype: computation dtype.
      name: submodule name.

    Returns:
      A callable taking and returning an NHWC array.
    """
    if norm == "batch":
        return batch_norm(train, dtype, name)
    if norm == "group":
        return nn.GroupNorm(
            num_groups=math.gcd(features, _MAX_GROUPS),
            dtype=dtype,
            param_dtype=jnp.float32,
            name=name,
        )
    return lambda x: x


def _conv(
    features: int, kernel: int, stride: int, dilation: int, norm: str, dtype: Any, name: str
) -> nn.Conv:
    """A square convolution padded like PyTorch's ``padding=dilation * (kernel - 1) // 2``.

    Args:
      features: output channels.
      kernel: kernel size (1, 3 or 7).
      stride: spatial stride.
      dilation: kernel dilation.
      norm: the normalisation that follows; the conv has a bias only when it is ``"none"``.
      dtype: computation dtype.
      name: submodule name.

    Returns:
      The `nn.Conv` module.
    """
    pad = dilation * (kernel - 1) // 2
    return nn.Conv(
        features,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=(dilation, dilation),
        use_bias=norm == "none",
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_CONV_INIT,
        name=name,
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34).

    Attributes:
      features: channels of both convs (and of the output; the expansion is 1).
      stride: stride of the first conv (and of the shortcut projection).
      dilation: dilation of both 3x3 convs.
      norm: one of `NORMS`.
      dtype: computation dtype (parameters stay float32).
    """

    features: int
    stride: int = 1
    dilation: int = 1
    norm: str = "batch"
    dtype: Any = jnp.float32

    expansion = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        """Applies the block.

        Args:
          x: NHWC input.
          train: True in training mode (BatchNorm uses and updates batch stats).

        Returns:
          NHWC output with ``features`` channels, spatially down-sampled by ``stride``.
        """
        y = _conv(self.features, 3, self.stride, self.dilation, self.norm, self.dtype, "conv1")(x)
        y = nn.relu(_make_norm(self.norm, self.features, train, self.dtype, "bn1")(y))
        y = _conv(self.features, 3, 1, self.dilation, self.norm, self.dtype, "conv2")(y)
        y = _make_norm(self.norm, self.features, train, self.dtype, "bn2")(y)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = _conv(
                self.features, 1, self.stride, 1, self.norm, self.dtype, "downsample_conv"
            )(x)
            shortcut = _make_norm(self.norm, self.features, train, self.dtype, "downsample_bn")(
                shortcut
            )
        return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 convs with a residual connection (ResNet-50).

    Attributes:
      features: channels of the two inner convs; the output has ``4 * features``.
      stride: spatial stride of the block.
      dilation: dilation of the 3x3 conv.
      stride_in_1x1: False (torchvision, ResNet v1.5) puts the stride on the 3x3 conv; True
        (original ResNet v1, Caffe and Keras) on the first 1x1 conv.
      norm: one of `NORMS`.
      dtype: computation dtype (parameters stay float32).
    """

    features: int
    stride: int = 1
    dilation: int = 1
    stride_in_1x1: bool = False
    norm: str = "batch"
    dtype: Any = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        """Applies the block.

        Args:
          x: NHWC input.
          train: True in training mode (BatchNorm uses and updates batch stats).

        Returns:
          NHWC output with ``4 * features`` channels, spatially down-sampled by ``stride``.
        """
        out_features = self.features * self.expansion
        stride_1x1, stride_3x3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
        y = _conv(self.features, 1, stride_1x1, 1, self.norm, self.dtype, "conv1")(x)
        y = nn.relu(_make_norm(self.norm, self.features, train, self.dtype, "bn1")(y))
        y = _conv(self.features, 3, stride_3x3, self.dilation, self.norm, self.dtype, "conv2")(y)
        y = nn.relu(_make_norm(self.norm, self.features, train, self.dtype, "bn2")(y))
        y = _conv(out_features, 1, 1, 1, self.norm, self.dtype, "conv3")(y)
        y = _make_norm(self.norm, out_features, train, self.dtype, "bn3")(y)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != out_features:
            shortcut = _conv(
                out_features, 1, self.stride, 1, self.norm, self.dtype, "downsample_conv"
            )(x)
            shortcut = _make_norm(self.norm, out_features, train, self.dtype, "downsample_bn")(
                shortcut
            )
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """ResNet backbone returning a dict of multi-scale feature maps.

    Attributes:
      depth: 18 or 34 (BasicBlock) or 50 (Bottleneck).
      width: channels of the stem; stage i (0-based) has ``width * 2**i`` inner channels
        (64 for the standard models and ImageNet weights).
      norm: ``"batch"`` (BatchNorm with PyTorch's momentum and epsilon, running stats in
        ``batch_stats``), ``"group"`` (GroupNorm with gcd(channels, 32) groups) or ``"none"``
        (convs get a bias instead).
      replace_stride_with_dilation: for layer2, layer3 and layer4, whether to replace the
        stride 2 by dilation, as torchvision does for DeepLab: ``(False, True, True)`` gives
        output stride 8, ``(False, False, True)`` output stride 16. The first block of a
        dilated stage keeps the previous dilation, as in torchvision.
      stride_in_1x1: ResNet-50 only: stride on the first 1x1 conv of a down-sampling block
        (ResNet v1, as Keras' ResNet50) instead of the 3x3 conv (v1.5, torchvision).
      dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters are float32 and the
        feature maps come back in this dtype.
    """

    depth: int = 50
    width: int = 64
    norm: str = "batch"
    replace_stride_with_dilation: Sequence[bool] = (False, False, False)
    stride_in_1x1: bool = False
    dtype: Any = jnp.float32

    def _stage_plan(self) -> list[tuple[int, int, int]]:
        """Stride and dilations of layer1..layer4.

        Returns:
          For each stage, (stride of its first block, dilation of its first block,
          dilation of its other blocks).

        Raises:
          ValueError: ``replace_stride_with_dilation`` does not have 3 entries.
        """
        dilate_flags = tuple(self.replace_stride_with_dilation)
        if len(dilate_flags) != 3:
            raise ValueError(
                "replace_stride_with_dilation needs 3 flags (layer2, layer3, layer4), got "
                f"{self.replace_stride_with_dilation!r}"
            )
        plan = [(1, 1, 1)]
        dilation = 1
        for dilate in dilate_flags:
            previous = dilation
            stride = 2
            if dilate:
                dilation *= 2
                stride = 1
            plan.append((stride, previous, dilation))
        return plan

    def _check(self) -> None:
        """Validates ``depth`` and ``norm``.

        Returns:
          None.

        Raises:
          ValueError: an unsupported depth or norm.
        """
        if self.depth not in STAGE_SIZES:
            raise ValueError(f"ResNet depth={self.depth} is not one of {sorted(STAGE_SIZES)}")
        _check_norm(self.norm)

    def feature_strides(self) -> dict[str, int]:
        """Stride of each returned feature map relative to the input.

        Returns:
          Dict from `FEATURE_KEYS` to strides, e.g. {"stem": 2, "c2": 4, ..., "c5": 32}.
        """
        strides = {"stem": 2}
        total = 4
        for key, (stride, _, _) in zip(FEATURE_KEYS[1:], self._stage_plan()):
            total *= stride
            strides[key] = total
        return strides

    def feature_channels(self) -> dict[str, int]:
        """Channels of each returned feature map.

        Returns:
          Dict from `FEATURE_KEYS` to channel counts, e.g. for ResNet-50 at width 64
          {"stem": 64, "c2": 256, "c3": 512, "c4": 1024, "c5": 2048}.
        """
        self._check()
        expansion = Bottleneck.expansion if self.depth == 50 else BasicBlock.expansion
        channels = {"stem": self.width}
        for stage, key in enumerate(FEATURE_KEYS[1:]):
            channels[key] = self.width * 2**stage * expansion
        return channels

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> dict[str, jnp.ndarray]:
        """Runs the backbone.

        Args:
          x: images of shape (B, H, W, C), any C.
          train: True in training mode; with ``norm="batch"`` pass
            ``mutable=["batch_stats"]`` to `apply` to get the updated statistics.

        Returns:
          Dict with the feature maps ``stem``, ``c2``, ``c3``, ``c4``, ``c5`` (NHWC, in
          ``dtype``); spatial sizes follow PyTorch's floor arithmetic, strides are
          `feature_strides`.

        Raises:
          ValueError: an unknown depth or norm, or a non-4-D input.
        """
        self._check()
        if x.ndim != 4:
            raise ValueError(f"ResNet expects NHWC input (B, H, W, C), got shape {x.shape}")
        x = x.astype(self.dtype)
        x = _conv(self.width, 7, 2, 1, self.norm, self.dtype, "conv1")(x)
        x = nn.relu(_make_norm(self.norm, self.width, train, self.dtype, "bn1")(x))
        features = {"stem": x}
        x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        if self.depth == 50:
            block_cls = functools.partial(Bottleneck, stride_in_1x1=self.stride_in_1x1)
        else:
            block_cls = BasicBlock
        plan = self._stage_plan()
        for stage, (num_blocks, key) in enumerate(zip(STAGE_SIZES[self.depth], FEATURE_KEYS[1:])):
            stride, first_dilation, dilation = plan[stage]
            for index in range(num_blocks):
                x = block_cls(
                    features=self.width * 2**stage,
                    stride=stride if index == 0 else 1,
                    dilation=first_dilation if index == 0 else dilation,
                    norm=self.norm,
                    dtype=self.dtype,
                    name=f"layer{stage + 1}_{index}",
                )(x, train=train)
            features[key] = x
        return features


class ResNetClassifier(nn.Module):
    """ResNet backbone + global average pooling + a Dense ``head`` (torchvision's ``fc``).

    Attributes:
      depth: 18, 34 or 50.
      width: stem channels of the backbone (64 for the standard models).
      num_classes: number of logits.
      norm: backbone normalisation, see `ResNet`.
      stride_in_1x1: see `ResNet`.
      dtype: computation dtype of the backbone; pooling and the head run in float32.
    """

    depth: int = 50
    width: int = 64
    num_classes: int = 1000
    norm: str = "batch"
    stride_in_1x1: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        """Classifies a batch of images.

        Args:
          x: images of shape (B, H, W, C).
          train: True in training mode (see `ResNet`).

        Returns:
          float32 logits of shape (B, num_classes).
        """
        features = ResNet(
            depth=self.depth,
            width=self.width,
            norm=self.norm,
            stride_in_1x1=self.stride_in_1x1,
            dtype=self.dtype,
            name="backbone",
        )(x, train=train)
        pooled = jnp.mean(features["c5"].astype(jnp.float32), axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32, name="head")(
            pooled
        )
