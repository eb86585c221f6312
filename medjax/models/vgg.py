"""VGG-11/13/16/19 (Simonyan & Zisserman, 2015), with or without BatchNorm, in Flax Linen.

Layout is NHWC. The convolutional part is torchvision's ``vgg{depth}`` / ``vgg{depth}_bn``
(3x3 convs with bias and padding 1, optional BatchNorm, ReLU, 2x2 max-pool after each of the
five blocks). Two classifiers:

- ``classifier="gap"`` (default, cheap for small images): global average pool -> dropout ->
  Dense ``head``.
- ``classifier="fc"`` (torchvision's): adaptive average pool to 7x7 -> flatten (H, W, C
  order) -> ``fc1`` -> ReLU -> dropout -> ``fc2`` -> ReLU -> dropout -> ``head``. With
  ``width=64``, ``fc_features=4096`` and 1000 classes the parameter count is torchvision's.

Module names are Keras' (``block{b}_conv{i}``, 1-based), with ``block{b}_bn{i}`` for the
BatchNorm after ``block{b}_conv{i}``, and ``fc1``, ``fc2``, ``head`` for torchvision's
``classifier.0``, ``classifier.3``, ``classifier.6`` (Keras' ``fc1``, ``fc2``,
``predictions``); `medjax.models.pretrained.vgg_mapping` lists the torchvision
``features.N`` indices. Any input of at least 32x32 pixels works.

Example::

    model = VGG(depth=16, batch_norm=True, num_classes=2)
    variables = model.init(key, images, train=False)
    logits = model.apply(variables, images, train=True, rngs={"dropout": key},
                         mutable=["batch_stats"])[0]
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

__all__ = ["VGG", "BLOCK_CONVS", "BLOCK_CHANNELS", "CLASSIFIERS", "adaptive_avg_pool"]

# Number of 3x3 convs in each of the five blocks, per depth (torchvision configs A, B, D, E).
BLOCK_CONVS = {
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}
# Channels of each block at width 64.
BLOCK_CHANNELS = (64, 128, 256, 512, 512)
CLASSIFIERS = ("gap", "fc")
# Spatial size of torchvision's adaptive average pool before the first fully connected layer.
FC_POOL_SIZE = 7
# Smallest input side: five 2x2 max-pools must leave at least one pixel.
MIN_INPUT_SIZE = 32

# torchvision's VGG initialisation: kaiming_normal_(fan_out) convs, N(0, 0.01) linears, zero
# biases.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_DENSE_INIT = nn.initializers.normal(0.01)


def _average_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Averaging weights of PyTorch's adaptive average pooling along one axis.

    Output cell i averages inputs floor(i * in / out) to ceil((i + 1) * in / out) - 1.

    Args:
      in_size: input length.
      out_size: output length.

    Returns:
      float32 array of shape (out_size, in_size) whose rows sum to 1.
    """
    weights = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -(-((i + 1) * in_size) // out_size)
        weights[i, start:end] = 1.0 / (end - start)
    return weights


def adaptive_avg_pool(x: jnp.ndarray, output_size: tuple[int, int]) -> jnp.ndarray:
    """PyTorch's ``adaptive_avg_pool2d`` for NHWC arrays.

    Args:
      x: array of shape (B, H, W, C).
      output_size: (out_h, out_w).

    Returns:
      Array of shape (B, out_h, out_w, C); ``x`` itself when the sizes already match.
    """
    out_h, out_w = output_size
    if x.shape[1:3] == (out_h, out_w):
        return x
    rows = jnp.asarray(_average_matrix(x.shape[1], out_h), x.dtype)
    cols = jnp.asarray(_average_matrix(x.shape[2], out_w), x.dtype)
    return jnp.einsum("ih,bhwc,jw->bijc", rows, x, cols)


class VGG(nn.Module):
    """VGG classifier.

    Attributes:
      depth: 11, 13, 16 or 19.
      batch_norm: True for the ``_bn`` variants (BatchNorm after every conv, PyTorch's
        momentum and epsilon, running stats in ``batch_stats``).
      width: channels of the first block; block b has ``BLOCK_CHANNELS[b] * width // 64``
        (64 for the standard models and ImageNet weights).
      num_classes: number of logits.
      classifier: ``"gap"`` or ``"fc"`` (see the module docstring).
      fc_features: units of ``fc1`` and ``fc2`` when ``classifier="fc"`` (4096 in VGG).
      dropout_rate: dropout before ``fc2`` and ``head`` (``"fc"``) or before ``head``
        (``"gap"``); active only with ``train=True``, using the ``"dropout"`` rng.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters are float32 and the
        head computes float32 logits.
    """

    depth: int = 16
    batch_norm: bool = False
    width: int = 64
    num_classes: int = 1000
    classifier: str = "gap"
    fc_features: int = 4096
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32

    def _dense(self, features: int, name: str, dtype: Any) -> nn.Dense:
        """A Dense layer with torchvision's VGG initialisation.

        Args:
          features: output units.
          name: submodule name.
          dtype: computation dtype.

        Returns:
          The `nn.Dense` module.
        """
        return nn.Dense(
            features, dtype=dtype, param_dtype=jnp.float32, kernel_init=_DENSE_INIT, name=name
        )

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        """Classifies a batch of images.

        Args:
          x: images of shape (B, H, W, C) with H, W >= 32, any C.
          train: True in training mode: dropout is active (pass ``rngs={"dropout": key}``)
            and, with ``batch_norm``, batch statistics are used and updated (pass
            ``mutable=["batch_stats"]``).

        Returns:
          float32 logits of shape (B, num_classes).

        Raises:
          ValueError: an unknown depth or classifier, a non-4-D input or an input smaller
            than 32x32.
        """
        if self.depth not in BLOCK_CONVS:
            raise ValueError(f"VGG depth={self.depth} is not one of {sorted(BLOCK_CONVS)}")
        if self.classifier not in CLASSIFIERS:
            raise ValueError(
                f"Unknown classifier {self.classifier!r}; expected one of {CLASSIFIERS}"
            )
        if x.ndim != 4:
            raise ValueError(f"VGG expects NHWC input (B, H, W, C), got shape {x.shape}")
        if min(x.shape[1:3]) < MIN_INPUT_SIZE:
            raise ValueError(
                f"VGG input shape {x.shape}: H and W must be at least {MIN_INPUT_SIZE}"
            )

        x = x.astype(self.dtype)
        for block, (num_convs, channels) in enumerate(
            zip(BLOCK_CONVS[self.depth], BLOCK_CHANNELS), start=1
        ):
            features = channels * self.width // 64
            for index in range(1, num_convs + 1):
                x = nn.Conv(
                    features,
                    kernel_size=(3, 3),
                    padding=((1, 1), (1, 1)),
                    dtype=self.dtype,
                    param_dtype=jnp.float32,
                    kernel_init=_CONV_INIT,
                    name=f"block{block}_conv{index}",
                )(x)
                if self.batch_norm:
                    x = nn.BatchNorm(
                        use_running_average=not train,
                        momentum=0.9,
                        epsilon=1e-5,
                        dtype=self.dtype,
                        param_dtype=jnp.float32,
                        name=f"block{block}_bn{index}",
                    )(x)
                x = nn.relu(x)
            x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))

        if self.classifier == "gap":
            x = jnp.mean(x, axis=(1, 2))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        else:
            x = adaptive_avg_pool(x, (FC_POOL_SIZE, FC_POOL_SIZE))
            x = x.reshape(x.shape[0], -1)
            for name in ("fc1", "fc2"):
                x = nn.relu(self._dense(self.fc_features, name, self.dtype)(x))
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return self._dense(self.num_classes, "head", jnp.float32)(x.astype(jnp.float32))
