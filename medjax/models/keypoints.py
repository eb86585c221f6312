"""Keypoint networks: a ResNet backbone with a heatmap head (SimpleBaseline-style).

The head upsamples the stride-32 features with `num_deconv` transposed convolutions (stride 2
each), adding after each a 1x1 projection of the backbone feature map of the same stride
(c4, c3, c2: the fine detail a stride-32 map has lost), and predicts one heatmap per keypoint
at stride 32 / 2**num_deconv. Heatmap logits are
decoded to sub-pixel coordinates by a spatial soft-argmax (integral regression), which is
differentiable, so the network trains directly on coordinate error.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medjax.models.resnet import ResNet


class HeatmapResNet(nn.Module):
    """ResNet-{18,34,50} backbone + deconvolution head -> (B, H/s, W/s, num_keypoints) logits.

    Attributes:
      depth: ResNet depth (18, 34 or 50).
      width: backbone stem channels (64 for the standard network).
      num_keypoints: heatmaps to predict.
      head_channels: channels of each deconvolution layer.
      num_deconv: transposed convolutions after the backbone (3 gives stride 4).
      norm: normalisation of backbone and head ('batch', 'group' or 'none').
      dtype: computation dtype.
    """

    depth: int = 34
    width: int = 64
    num_keypoints: int = 2
    head_channels: int = 256
    num_deconv: int = 3
    norm: str = "batch"
    dtype: Any = jnp.float32

    @property
    def stride(self) -> int:
        return 32 // 2**self.num_deconv

    @nn.compact
    def __call__(self, x, *, train: bool):
        features = ResNet(
            depth=self.depth, width=self.width, norm=self.norm, dtype=self.dtype, name="backbone"
        )(x, train=train)
        y = features["c5"]
        skips = ("c4", "c3", "c2")
        for i in range(self.num_deconv):
            y = nn.ConvTranspose(
                self.head_channels,
                (4, 4),
                strides=(2, 2),
                use_bias=False,
                dtype=self.dtype,
                name=f"deconv{i}",
            )(y)
            if i < len(skips):
                skip = features[skips[i]]
                # Odd sizes (e.g. 48 px: c4 is 3x3, c5 2x2) make the upsampled map one pixel
                # larger than the skip: crop it, as the backbone's convolutions padded it.
                y = y[:, : skip.shape[1], : skip.shape[2]]
                y = y + nn.Conv(
                    self.head_channels, (1, 1), use_bias=False, dtype=self.dtype, name=f"lateral{i}"
                )(skip)
            if self.norm == "batch":
                y = nn.BatchNorm(
                    use_running_average=not train,
                    momentum=0.9,
                    dtype=self.dtype,
                    name=f"deconv{i}_bn",
                )(y)
            elif self.norm == "group":
                y = nn.GroupNorm(
                    num_groups=min(32, self.head_channels), dtype=self.dtype, name=f"deconv{i}_gn"
                )(y)
            y = nn.relu(y)
        return nn.Conv(self.num_keypoints, (1, 1), dtype=jnp.float32, name="heatmaps")(y)
