"""DeepLabv3 (Chen et al., 2017) in Flax Linen: a dilated ResNet backbone and an ASPP head.

The architecture is torchvision's ``deeplabv3_resnet50`` (the LV segmentation model of
EchoNet-Dynamic, there with a one-channel last layer), NHWC:

- backbone: `medjax.models.resnet.ResNet` with the strides of layer3/layer4 (output stride 8)
  or of layer4 only (output stride 16) replaced by dilation;
- ASPP on the last feature map: a 1x1 conv, three 3x3 atrous convs (rates 12/24/36 at output
  stride 8, 6/12/18 at 16, as in the paper) and an image-pooling branch, each to
  ``aspp_channels`` with batch norm and ReLU; concatenated, projected by a 1x1 conv with batch
  norm, ReLU and dropout;
- a 3x3 conv with batch norm and ReLU, then a 1x1 conv to ``num_classes`` logits;
- bilinear up-sampling of the logits to the input size (half-pixel centres, as PyTorch's
  ``align_corners=False``).

With ``decoder_channels > 0`` the head is DeepLabv3+'s (Chen et al., 2018) instead, a second
branch from the encoder: the ASPP output is up-sampled to the stride-4 features of layer1,
concatenated with their 1x1 projection to ``low_level_channels`` (batch norm, ReLU), then two
3x3 convs of ``decoder_channels`` (batch norm, ReLU) and the 1x1 classifier. It recovers the
small structures (thin bleeds, a few pixels wide) that the stride-8 head blurs away.

The backbone is the submodule ``backbone``, so ImageNet ResNet weights load into it with
`medjax.models.pretrained` (``config.model.init_from``).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models.resnet import ResNet, batch_norm

__all__ = ["DeepLabV3", "ASPP", "DEFAULT_RATES"]

DEFAULT_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}
_DILATION = {8: (False, True, True), 16: (False, False, True)}


def _conv(features: int, kernel: int, dilation: int, dtype: Any, name: str) -> nn.Conv:
    pad = dilation * (kernel - 1) // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=(dilation, dilation),
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: parallel atrous convs + image pooling, projected."""

    rates: Sequence[int]
    channels: int = 256
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        branches = [
            nn.relu(
                batch_norm(train, self.dtype, "b0_bn")(
                    _conv(self.channels, 1, 1, self.dtype, "b0_conv")(x)
                )
            )
        ]
        for i, rate in enumerate(self.rates, start=1):
            y = _conv(self.channels, 3, rate, self.dtype, f"b{i}_conv")(x)
            branches.append(nn.relu(batch_norm(train, self.dtype, f"b{i}_bn")(y)))
        pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
        pooled = _conv(self.channels, 1, 1, self.dtype, "pool_conv")(pooled)
        pooled = nn.relu(batch_norm(train, self.dtype, "pool_bn")(pooled))
        branches.append(jnp.broadcast_to(pooled, x.shape[:3] + (self.channels,)))
        y = jnp.concatenate(branches, axis=-1)
        y = nn.relu(
            batch_norm(train, self.dtype, "project_bn")(
                _conv(self.channels, 1, 1, self.dtype, "project_conv")(y)
            )
        )
        return nn.Dropout(self.dropout_rate, deterministic=not train)(y)


class DeepLabV3(nn.Module):
    """DeepLabv3 segmentation network.

    Attributes:
      depth: backbone ResNet depth (18, 34 or 50; 50 for the standard model).
      width: backbone stem channels (64 for the standard model and ImageNet weights).
      output_stride: 8 (torchvision's default, EchoNet's model) or 16.
      aspp_rates: atrous rates; empty means `DEFAULT_RATES[output_stride]`.
      aspp_channels: channels of the ASPP branches and the head (256 standard).
      num_classes: output logit channels (1 for a binary mask).
      dropout_rate: dropout after the ASPP projection (0.5 standard).
      decoder_channels: 0 for DeepLabv3's head; > 0 for DeepLabv3+'s decoder of this width
        (256 in the paper).
      low_level_channels: the decoder's projection of the layer1 features (48 in the paper).
      dtype: computation dtype; logits come back in float32.
    """

    depth: int = 50
    width: int = 64
    output_stride: int = 8
    aspp_rates: Sequence[int] = ()
    aspp_channels: int = 256
    num_classes: int = 1
    dropout_rate: float = 0.5
    decoder_channels: int = 0
    low_level_channels: int = 48
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        """Maps images (B, H, W, C) to float32 logits (B, H, W, num_classes)."""
        if self.output_stride not in _DILATION:
            raise ValueError(f"DeepLabV3 output_stride={self.output_stride} is not 8 or 16")
        feature_maps = ResNet(
            depth=self.depth,
            width=self.width,
            replace_stride_with_dilation=_DILATION[self.output_stride],
            dtype=self.dtype,
            name="backbone",
        )(x, train=train)
        rates = tuple(self.aspp_rates) or DEFAULT_RATES[self.output_stride]
        y = ASPP(rates, self.aspp_channels, self.dropout_rate, self.dtype, name="aspp")(
            feature_maps["c5"], train=train
        )
        if self.decoder_channels:
            low = _conv(self.low_level_channels, 1, 1, self.dtype, "decoder_low_conv")(
                feature_maps["c2"]
            )
            low = nn.relu(batch_norm(train, self.dtype, "decoder_low_bn")(low))
            y = jax.image.resize(
                y, low.shape[:3] + (y.shape[-1],), method="bilinear", antialias=False
            )
            y = jnp.concatenate([y, low.astype(y.dtype)], axis=-1)
            for i in range(2):
                y = _conv(self.decoder_channels, 3, 1, self.dtype, f"decoder_conv{i}")(y)
                y = nn.relu(batch_norm(train, self.dtype, f"decoder_bn{i}")(y))
        else:
            y = _conv(self.aspp_channels, 3, 1, self.dtype, "head_conv")(y)
            y = nn.relu(batch_norm(train, self.dtype, "head_bn")(y))
        logits = nn.Conv(
            self.num_classes, (1, 1), dtype=jnp.float32, param_dtype=jnp.float32, name="classifier"
        )(y.astype(jnp.float32))
        size = x.shape[:3] + (self.num_classes,)
        return jax.image.resize(logits, size, method="bilinear", antialias=False)
