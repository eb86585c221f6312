"""R(2+1)D video networks (Tran et al., 2018) in Flax Linen, and the EchoNet EF regressor.

Layout is NTHWC (batch, frames, height, width, channels). The architecture is torchvision's
``r2plus1d_18``, the model of EchoNet-Dynamic: every 3x3x3 convolution is factorised into a
spatial 1x3x3 convolution, batch norm, ReLU and a temporal 3x1x1 convolution, with the
intermediate width chosen so that the pair has the parameter count of the full 3D kernel::

    mid = (in * out * 3 * 3 * 3) // (in * 3 * 3 + 3 * out)

Stem: 1x7x7 conv (stride 1x2x2) to ``stem_width`` (45 in torchvision), BN, ReLU, 3x1x1 conv to
``width``, BN, ReLU. Then four stages of BasicBlocks with ``width * 2**i`` channels; stages 2-4
halve time, height and width (the spatial conv strides in space, the temporal one in time),
with a 1x1x1 strided projection shortcut. Global average pooling and a Dense head.

Module names follow torchvision's state-dict keys (``stem_conv1``, ``layer2_0/conv1_spatial``
...). Batch norm uses PyTorch's momentum 0.1 and epsilon 1e-5.

The layers run as `medjax.models.fastconv` computes them, with `nn.Conv` / `nn.BatchNorm`'s
parameters and outputs: the factorised convolutions as 2-D convolutions (with tap-wise
kernel gradients on CPU), batch norm + ReLU with one hand-written backward pass.

`R2Plus1D` is configurable: ``depth`` 10/18/34 (blocks per stage), ``width`` (64 for the
paper's model), ``stem_width``. `EFRegressor` sets its single output's bias to the training
mean EF, as EchoNet-Dynamic does, so training starts from the mean predictor.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from medjax.models.fastconv import BatchNorm, Conv

__all__ = ["R2Plus1D", "EFRegressor", "STAGE_SIZES", "midplanes"]

STAGE_SIZES = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def midplanes(in_planes: int, out_planes: int) -> int:
    """Width between the spatial and temporal convs of a factorised 3x3x3 convolution."""
    return (in_planes * out_planes * 3 * 3 * 3) // (in_planes * 3 * 3 + 3 * out_planes)


def _conv3d(
    features: int, kernel: Sequence[int], stride: Sequence[int], dtype: Any, name: str
) -> Conv:
    """A bias-free 3D conv padded like PyTorch's ``padding=kernel // 2`` per axis.

    `fastconv.Conv` (`nn.Conv`'s parameters and outputs): the factorised kernels run as 2-D
    convolutions, with tap-wise kernel gradients on CPU.
    """
    return Conv(
        features,
        kernel_size=tuple(kernel),
        strides=tuple(stride),
        padding=tuple((k // 2, k // 2) for k in kernel),
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_CONV_INIT,
        name=name,
    )


def batch_norm(train: bool, dtype: Any, name: str, relu: bool = False) -> BatchNorm:
    """`medjax.models.resnet.batch_norm`'s layer (PyTorch's momentum and epsilon, float32
    statistics and parameters, the same variables) as `fastconv.BatchNorm`, optionally with
    the ReLU that follows it fused into its backward pass."""
    return BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        relu=relu,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class Conv2Plus1D(nn.Module):
    """1x3x3 spatial conv -> BN -> ReLU -> 3x1x1 temporal conv (no norm after the last)."""

    features: int
    mid_features: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        s = self.stride
        x = _conv3d(self.mid_features, (1, 3, 3), (1, s, s), self.dtype, "spatial")(x)
        x = batch_norm(train, self.dtype, "spatial_bn", relu=True)(x)
        return _conv3d(self.features, (3, 1, 1), (s, 1, 1), self.dtype, "temporal")(x)


class BasicBlock3D(nn.Module):
    """Two factorised convolutions with batch norm and a residual connection."""

    features: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        in_planes = x.shape[-1]
        # As torchvision: one intermediate width, from the block's input, for both convs.
        mid = midplanes(in_planes, self.features)
        y = Conv2Plus1D(self.features, mid, self.stride, self.dtype, name="conv1")(x, train=train)
        y = batch_norm(train, self.dtype, "bn1", relu=True)(y)
        y = Conv2Plus1D(self.features, mid, 1, self.dtype, name="conv2")(y, train=train)
        y = batch_norm(train, self.dtype, "bn2")(y)
        shortcut = x
        if self.stride != 1 or in_planes != self.features:
            s = self.stride
            shortcut = _conv3d(self.features, (1, 1, 1), (s, s, s), self.dtype, "downsample_conv")(
                x
            )
            shortcut = batch_norm(train, self.dtype, "downsample_bn")(shortcut)
        return nn.relu(y + shortcut)


class R2Plus1D(nn.Module):
    """R(2+1)D backbone + global average pooling + Dense head.

    Attributes:
      depth: 10, 18 (torchvision ``r2plus1d_18``) or 34: blocks per stage `STAGE_SIZES`.
      width: channels of stage 1; stage i has ``width * 2**i`` (64 for the paper's model).
      stem_width: channels between the stem's spatial and temporal convs; 0 means
        ``round(45 * width / 64)`` (45 at width 64, as torchvision).
      num_outputs: outputs of the head.
      head_bias_init: initial value of the head's bias (e.g. the training mean EF).
      dropout_rate: dropout before the head (0 in EchoNet-Dynamic).
      dtype: computation dtype (``bfloat16`` for mixed precision); parameters are float32,
        the pooled features and the head run in float32.
    """

    depth: int = 18
    width: int = 64
    stem_width: int = 0
    num_outputs: int = 1
    head_bias_init: float = 0.0
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        """Maps clips (B, T, H, W, C) to float32 outputs (B, num_outputs)."""
        if self.depth not in STAGE_SIZES:
            raise ValueError(f"R2Plus1D depth={self.depth} is not one of {sorted(STAGE_SIZES)}")
        if x.ndim != 5:
            raise ValueError(f"R2Plus1D expects clips (B, T, H, W, C), got shape {x.shape}")
        stem_width = self.stem_width or max(1, round(45 * self.width / 64))
        x = x.astype(self.dtype)
        x = _conv3d(stem_width, (1, 7, 7), (1, 2, 2), self.dtype, "stem_conv1")(x)
        x = batch_norm(train, self.dtype, "stem_bn1", relu=True)(x)
        x = _conv3d(self.width, (3, 1, 1), (1, 1, 1), self.dtype, "stem_conv2")(x)
        x = batch_norm(train, self.dtype, "stem_bn2", relu=True)(x)
        for stage, num_blocks in enumerate(STAGE_SIZES[self.depth]):
            for index in range(num_blocks):
                x = BasicBlock3D(
                    features=self.width * 2**stage,
                    stride=2 if (stage > 0 and index == 0) else 1,
                    dtype=self.dtype,
                    name=f"layer{stage + 1}_{index}",
                )(x, train=train)
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2, 3))
        pooled = nn.Dropout(self.dropout_rate, deterministic=not train)(pooled)
        return nn.Dense(
            self.num_outputs,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            bias_init=nn.initializers.constant(self.head_bias_init),
            name="head",
        )(pooled)


class EFRegressor(nn.Module):
    """Ejection fraction (%) from a clip: an R(2+1)D with one output, bias at the mean EF.

    Attributes: as `R2Plus1D`; ``mean_ef`` is the head's initial bias.
    """

    depth: int = 18
    width: int = 64
    stem_width: int = 0
    mean_ef: float = 55.0
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        """Returns float32 EF predictions of shape (B,)."""
        out = R2Plus1D(
            depth=self.depth,
            width=self.width,
            stem_width=self.stem_width,
            num_outputs=1,
            head_bias_init=self.mean_ef,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            name="backbone",
        )(x, train=train)
        return out[:, 0]
