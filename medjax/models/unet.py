"""A 2-D U-Net (Ronneberger et al., 2015) in Flax Linen for segmentation logits.

Layout is NHWC. Each level has two (3x3 conv -> norm -> ReLU) blocks; channels double at
every one of the ``depth`` max-pool down-samplings, a 2x2 stride-2 transposed conv goes
back up, the matching encoder features are concatenated, and a 1x1 conv head returns
float32 logits of shape (B, H, W, out_channels). The max pooling and the batch norm (with
its ReLU) are `medjax.models.fastconv`'s: `nn.max_pool` / `nn.BatchNorm`'s outputs and
variables, with backward passes that are faster on CPUs.

Example::

    model = UNet(width=16, depth=4, norm="batch")
    variables = model.init(key, images, train=False)
    logits, updates = model.apply(variables, images, train=True,
                                  mutable=["batch_stats"])
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from medjax.models.fastconv import BatchNorm, max_pool_2x2

__all__ = ["UNet", "NORMS"]

NORMS = ("batch", "group", "layer", "none")

# Upper bound on GroupNorm groups; the group count is gcd(channels, this).
_MAX_GROUPS = 8


def _check_norm(norm: str) -> None:
    """Raises ValueError for a normalisation name that is not in `NORMS`.

    Args:
      norm: the requested normalisation name.

    Returns:
      None.
    """
    if norm not in NORMS:
        raise ValueError(f"Unknown norm {norm!r}; expected one of {NORMS}")


class _ConvBlock(nn.Module):
    """Two (3x3 conv -> norm -> ReLU) layers with the same number of output channels.

    Attributes:
      features: output channels of both convolutions.
      norm: one of `NORMS`.
      dtype: computation dtype (parameters stay float32).
    """

    features: int
    norm: str
    dtype: Any = jnp.float32

    def _make_norm(self, train: bool, name: str) -> Callable:
        """Builds the normalisation layer for one conv.

        Args:
          train: True to normalise with (and update) batch statistics.
          name: submodule name.

        Returns:
          A callable taking and returning an NHWC array (for "batch", ReLU included).
        """
        if self.norm == "batch":
            # nn.BatchNorm's variables and outputs, with the ReLU fused into its backward pass.
            return BatchNorm(
                use_running_average=not train,
                momentum=0.9,
                epsilon=1e-5,
                relu=True,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=name,
            )
        if self.norm == "group":
            return nn.GroupNorm(
                num_groups=math.gcd(self.features, _MAX_GROUPS),
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=name,
            )
        if self.norm == "layer":
            # Normalises over the channel axis of each pixel.
            return nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, name=name)
        return lambda x: x

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        """Applies the block.

        Args:
          x: NHWC input.
          train: True in training mode (BatchNorm uses and updates batch stats).

        Returns:
          NHWC output with ``features`` channels and the same spatial size.
        """
        _check_norm(self.norm)
        for i in range(2):
            x = nn.Conv(
                self.features,
                kernel_size=(3, 3),
                padding="SAME",
                # The bias is redundant before a normalisation with its own offset.
                use_bias=self.norm == "none",
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=f"conv{i}",
            )(x)
            x = self._make_norm(train, f"norm{i}")(x)
            if self.norm != "batch":  # The batch norm applies the ReLU itself.
                x = nn.relu(x)
        return x


class Upsample2x(nn.Module):
    """A 2x2 transposed convolution with stride 2, computed as one matrix product and a
    depth-to-space rearrangement.

    It is `nn.ConvTranspose(features, (2, 2), strides=(2, 2))` exactly (same parameters
    ``kernel`` (2, 2, C_in, features) and ``bias``, same initialisation, same outputs): as the
    kernel equals the stride, every output pixel comes from one input pixel, so no zeros need
    inserting between input pixels (what a generic transposed convolution does, and what
    makes it slow on CPUs).
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (2, 2, x.shape[-1], self.features),
            jnp.float32,
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        # out[2h + i, 2w + j] = x[h, w] @ kernel[1 - i, 1 - j] (flax flips the kernel).
        y = jnp.einsum("bhwc,ijcd->bhiwjd", x, kernel[::-1, ::-1])
        b, h, _, w, _, d = y.shape
        return y.reshape(b, 2 * h, 2 * w, d) + bias


class UNet(nn.Module):
    """2-D U-Net returning per-pixel logits.

    Attributes:
      width: channels at the first (full-resolution) level; level i has
        ``width * 2**i`` channels, the bottleneck ``width * 2**depth``.
      depth: number of 2x down-samplings; input H and W must be divisible by
        ``2**depth``.
      out_channels: channels of the returned logits.
      norm: ``"batch"`` (BatchNorm, momentum 0.9, running stats in the
        ``batch_stats`` collection), ``"group"`` (GroupNorm with gcd(channels, 8)
        groups), ``"layer"`` (LayerNorm over channels) or ``"none"``.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters are float32 and
        the logits are returned in float32.
    """

    width: int = 16
    depth: int = 4
    out_channels: int = 1
    norm: str = "batch"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        """Runs the network.

        Args:
          x: images of shape (B, H, W, C) with H and W divisible by ``2**depth``.
          train: True in training mode; with ``norm="batch"`` pass
            ``mutable=["batch_stats"]`` to `apply` to get the updated statistics.

        Returns:
          float32 logits of shape (B, H, W, out_channels).

        Raises:
          ValueError: for an unknown ``norm``, a non-4-D input, or H/W not divisible
            by ``2**depth``.
        """
        _check_norm(self.norm)
        if x.ndim != 4:
            raise ValueError(f"UNet expects NHWC input (B, H, W, C), got shape {x.shape}")
        factor = 2**self.depth
        h, w = x.shape[1], x.shape[2]
        if h % factor or w % factor:
            raise ValueError(
                f"UNet input shape {x.shape}: H={h} and W={w} must be divisible by "
                f"2**depth = {factor} (depth={self.depth})"
            )

        x = x.astype(self.dtype)
        skips = []
        for level in range(self.depth):
            x = _ConvBlock(self.width * 2**level, self.norm, self.dtype, name=f"down{level}")(
                x, train=train
            )
            skips.append(x)
            x = max_pool_2x2(x)

        x = _ConvBlock(self.width * 2**self.depth, self.norm, self.dtype, name="bottleneck")(
            x, train=train
        )

        for level in reversed(range(self.depth)):
            features = self.width * 2**level
            x = Upsample2x(features, dtype=self.dtype, name=f"upsample{level}")(x)
            x = jnp.concatenate([skips[level], x], axis=-1)
            x = _ConvBlock(features, self.norm, self.dtype, name=f"up{level}")(x, train=train)

        logits = nn.Conv(
            self.out_channels,
            kernel_size=(1, 1),
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            name="head",
        )(x.astype(jnp.float32))
        return logits
