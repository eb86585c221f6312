"""ConvLSTM video classifier (Shi et al., 2015) in Flax Linen, with per-quadrant perfusion heads.

Layout is NTHWC (batch, frames, height, width, channels). `ConvLSTMClassifier` reads a clip of
sidestream dark-field frames and returns the video class and a score per image quadrant (the
Microvascular Flow Index is scored per quadrant: 0 no flow, 1 intermittent, 2 sluggish,
3 continuous)::

    frame -> strided conv stem -> ConvLSTM layer 1 -> 2x2 max-pool -> ConvLSTM layer 2 -> ...
    final hidden state (B, h, w, width) -> mean over each quadrant -> shared quadrant head
                                        -> mean over the map, concatenated with the
                                           quadrant features -> video head

The recurrence runs through `flax.linen.RNN` (a `flax.linen.scan` over time), so the compiled
program does not grow with the number of frames.

`ConvLSTMCell` is the cell of Shi et al. with optional peephole connections; without them it
computes exactly what `flax.linen.ConvLSTMCell` computes (same parameter names, gate order and
forget-gate offset), so the two are interchangeable.

Quadrant heads. ``quadrant_head="softmax"`` gives 4-way logits per quadrant.
``quadrant_head="ordinal"`` gives cumulative logits ``logit P(score > k)`` for
k = 0 .. num_classes - 2, a cumulative-link (proportional-odds) model as in CORAL (Cao et al.,
2020): one weight vector shared by all thresholds plus one bias per threshold. The biases are
kept in decreasing order by construction (the first is free, each next one is the previous minus
a softplus), so P(score > k) never increases with k and `ordinal_to_probs` always gives a
proper distribution. They start at ``logit((K - 1 - k) / K)``: uniform class probabilities.
Train the ordinal head with a binary cross-entropy per threshold against `ordinal_targets`.

Quadrants follow the dataset's convention: q1 top-left, q2 top-right, q3 bottom-left,
q4 bottom-right (rows before columns). More generally ``num_quadrants`` = n * n regions of an
n x n grid in row-major order; when a side does not divide by n, neighbouring regions share
the boundary row or column (a 5-row map splits into rows 0-2 and 2-4).

Example::

    model = ConvLSTMClassifier(width=16, num_layers=2)
    variables = model.init(key, clips, train=False)        # clips: (B, T, 64, 64, 1) float
    out = model.apply(variables, clips, train=False)
    out["video_logits"]     # (B, 4)
    out["quadrant_logits"]  # (B, 4, 3) ordinal, or (B, 4, 4) softmax
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ConvLSTMCell",
    "ConvLSTMClassifier",
    "OrdinalHead",
    "PerfusionHeads",
    "QUADRANT_HEADS",
    "ordinal_to_probs",
    "ordinal_expected_score",
    "ordinal_targets",
    "quadrant_bounds",
    "quadrant_mean",
]

QUADRANT_HEADS = ("ordinal", "softmax")
TEMPORAL_POOLS = ("last", "mean")


# ---------------------------------------------------------------------------------------------
# Ordinal helpers.


def ordinal_to_probs(logits: jnp.ndarray) -> jnp.ndarray:
    """Class probabilities from cumulative logits ``logit P(score > k)``.

    P(score = 0) = 1 - P(> 0), P(score = k) = P(> k - 1) - P(> k), P(score = K - 1) =
    P(> K - 2). Logits from `OrdinalHead` are ordered, so every term is >= 0; logits from
    elsewhere that are not ordered are clipped at 0 and renormalised.

    Args:
      logits: (..., K - 1) cumulative logits.

    Returns:
      float32 probabilities of shape (..., K) that sum to 1 over the last axis.
    """
    exceed = jax.nn.sigmoid(logits.astype(jnp.float32))
    ones = jnp.ones(exceed.shape[:-1] + (1,), jnp.float32)
    cumulative = jnp.concatenate([ones, exceed, jnp.zeros_like(ones)], axis=-1)
    probs = jnp.clip(cumulative[..., :-1] - cumulative[..., 1:], 0.0, None)
    return probs / jnp.sum(probs, axis=-1, keepdims=True)


def ordinal_expected_score(logits: jnp.ndarray) -> jnp.ndarray:
    """Expected score E[score] = sum_k P(score > k) of cumulative logits.

    Args:
      logits: (..., K - 1) cumulative logits.

    Returns:
      float32 expected scores of shape (...), in [0, K - 1].
    """
    return jnp.sum(jax.nn.sigmoid(logits.astype(jnp.float32)), axis=-1)


def ordinal_targets(labels: jnp.ndarray, num_classes: int) -> jnp.ndarray:
    """Binary targets [label > k] for k = 0 .. num_classes - 2, for a per-threshold BCE loss.

    A negative label (the dataset's -1, "not scored") gives all zeros: mask it out of the loss.

    Args:
      labels: integer scores of any shape, 0 .. num_classes - 1.
      num_classes: number of ordered classes K (>= 2).

    Returns:
      float32 targets of shape labels.shape + (num_classes - 1,).
    """
    thresholds = jnp.arange(num_classes - 1)
    return (jnp.asarray(labels)[..., None] > thresholds).astype(jnp.float32)


def _ordinal_bias_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """Raw threshold parameters whose biases give uniform class probabilities.

    Args:
      key: unused (the initialisation is deterministic).
      shape: (K - 1,).
      dtype: parameter dtype.

    Returns:
      Raw parameters: the first bias, then the softplus-inverse of each decrement.
    """
    del key
    (num_thresholds,) = shape
    num_classes = num_thresholds + 1
    exceed = (num_classes - 1 - np.arange(num_thresholds)) / num_classes
    biases = np.log(exceed / (1.0 - exceed))
    decrements = biases[:-1] - biases[1:]
    raw = np.concatenate([biases[:1], np.log(np.expm1(decrements))])
    return jnp.asarray(raw, dtype)


class OrdinalHead(nn.Module):
    """Cumulative-link head: ``logit P(score > k) = w . x + b_k`` with b_0 > b_1 > ...

    Attributes:
      num_classes: number of ordered classes K; the head returns K - 1 logits.
    """

    num_classes: int = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Applies the head to the last axis.

        Args:
          x: features (..., F).

        Returns:
          float32 cumulative logits (..., num_classes - 1), decreasing along the last axis.
        """
        if self.num_classes < 2:
            raise ValueError(f"An ordinal head needs num_classes >= 2, got {self.num_classes}")
        score = nn.Dense(1, use_bias=False, dtype=jnp.float32, name="score")(x.astype(jnp.float32))
        raw = self.param("thresholds", _ordinal_bias_init, (self.num_classes - 1,))
        biases = raw[0] - jnp.concatenate(
            [jnp.zeros((1,), raw.dtype), jnp.cumsum(jax.nn.softplus(raw[1:]))]
        )
        return score + biases


class PerfusionHeads(nn.Module):
    """Video-class head and a per-quadrant score head shared by all quadrants.

    Attributes:
      num_classes: classes of the video and of each quadrant (4: MFI 0-3).
      quadrant_head: ``"ordinal"`` (K - 1 cumulative logits per quadrant, see `OrdinalHead`)
        or ``"softmax"`` (K logits per quadrant).
    """

    num_classes: int = 4
    quadrant_head: str = "ordinal"

    @nn.compact
    def __call__(
        self, video_features: jnp.ndarray, quadrant_features: jnp.ndarray
    ) -> dict[str, jnp.ndarray]:
        """Applies both heads.

        Args:
          video_features: (B, Fv) features of the whole video.
          quadrant_features: (B, Q, Fq) features of each quadrant.

        Returns:
          ``{"video_logits": (B, num_classes), "quadrant_logits": (B, Q, num_classes - 1)
          (ordinal) or (B, Q, num_classes) (softmax)}``, float32.
        """
        if self.quadrant_head not in QUADRANT_HEADS:
            raise ValueError(f"quadrant_head={self.quadrant_head!r} is not one of {QUADRANT_HEADS}")
        dense = functools.partial(nn.Dense, dtype=jnp.float32, param_dtype=jnp.float32)
        video_logits = dense(self.num_classes, name="video_head")(
            video_features.astype(jnp.float32)
        )
        quadrant_features = quadrant_features.astype(jnp.float32)
        if self.quadrant_head == "ordinal":
            quadrant_logits = OrdinalHead(self.num_classes, name="quadrant_head")(quadrant_features)
        else:
            quadrant_logits = dense(self.num_classes, name="quadrant_head")(quadrant_features)
        return {"video_logits": video_logits, "quadrant_logits": quadrant_logits}


# ---------------------------------------------------------------------------------------------
# Quadrants.


def quadrant_grid(num_quadrants: int) -> int:
    """Side n of the n x n grid of ``num_quadrants`` regions.

    Args:
      num_quadrants: a perfect square (4 for the image quadrants).

    Returns:
      n.

    Raises:
      ValueError: ``num_quadrants`` is not a positive perfect square.
    """
    side = math.isqrt(num_quadrants) if num_quadrants > 0 else 0
    if side < 1 or side * side != num_quadrants:
        raise ValueError(
            f"num_quadrants={num_quadrants} must be a perfect square (4 for the image "
            "quadrants q1 top-left .. q4 bottom-right)"
        )
    return side


def quadrant_bounds(size: int, side: int) -> list[tuple[int, int]]:
    """[start, stop) of each of ``side`` regions along an axis of length ``size``.

    Region i covers [floor(i * size / side), ceil((i + 1) * size / side)), so regions that do
    not divide evenly share their boundary row or column.

    Args:
      size: length of the axis.
      side: number of regions along it.

    Returns:
      ``side`` (start, stop) pairs.
    """
    return [((i * size) // side, -((-(i + 1) * size) // side)) for i in range(side)]


def quadrant_mean(x: jnp.ndarray, num_quadrants: int = 4) -> jnp.ndarray:
    """Mean of a feature map over each quadrant (row-major: q1 top-left, q2 top-right, ...).

    Args:
      x: (..., H, W, C) feature maps.
      num_quadrants: regions of an n x n grid (4: the image quadrants).

    Returns:
      (..., num_quadrants, C) float32 means.

    Raises:
      ValueError: the map is smaller than the grid, or ``num_quadrants`` is not a square.
    """
    side = quadrant_grid(num_quadrants)
    height, width = x.shape[-3], x.shape[-2]
    if height < side or width < side:
        raise ValueError(
            f"A {height}x{width} feature map cannot be split into {side}x{side} quadrants; "
            "use larger frames or less down-sampling (stem_stride, pool_between_layers)."
        )
    x = x.astype(jnp.float32)
    means = [
        jnp.mean(x[..., r0:r1, c0:c1, :], axis=(-3, -2))
        for r0, r1 in quadrant_bounds(height, side)
        for c0, c1 in quadrant_bounds(width, side)
    ]
    return jnp.stack(means, axis=-2)


# ---------------------------------------------------------------------------------------------
# ConvLSTM.


class ConvLSTMCell(nn.RNNCellBase):
    """Convolutional LSTM cell (Shi et al., 2015) with optional peephole connections.

    With X the input and (C, H) the carry, '*' a 'SAME'-padded convolution and 'o' the
    element-wise product::

        i = sigmoid(W_xi * X + W_hi * H + b_i + w_ci o C)
        f = sigmoid(W_xf * X + W_hf * H + b_f + w_cf o C + 1)
        g = tanh(W_xg * X + W_hg * H + b_g)
        C' = f o C + i o g
        o = sigmoid(W_xo * X + W_ho * H + b_o + w_co o C')
        H' = o o tanh(C')

    The input and hidden convolutions are the modules ``ih`` and ``hh`` with 4 * features
    outputs in the gate order i, g, f, o and the +1 forget-gate offset of
    `flax.linen.ConvLSTMCell`; with ``peephole=False`` the two cells are the same function of
    the same parameters.

    Peepholes: Shi et al. write them as Hadamard products with weight tensors as large as the
    state. Here each peephole weight is one value per channel (``peephole_i``, ``peephole_f``,
    ``peephole_o`` of shape (features,)), shared over positions: the cell stays independent of
    the frame size and, like the convolutions, treats every position alike. They start at 0,
    so an initialised cell with peepholes computes what one without them computes.

    Attributes:
      features: channels of the hidden and cell states.
      kernel_size: spatial size of both convolutions.
      peephole: add the peephole terms.
      use_bias: biases on both convolutions (as flax's cell, the two biases add up).
      dtype: computation dtype of the convolutions and gates; the carry stays float32.
      param_dtype: parameter dtype.
    """

    features: int
    kernel_size: Sequence[int] = (3, 3)
    peephole: bool = True
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, carry: tuple[jnp.ndarray, jnp.ndarray], inputs: jnp.ndarray
    ) -> tuple[tuple[jnp.ndarray, jnp.ndarray], jnp.ndarray]:
        """One time step.

        Args:
          carry: (C, H), each (B, H, W, features), from `initialize_carry` or the last step.
          inputs: (B, H, W, C_in) frame features.

        Returns:
          ((C', H'), H').
        """
        c, h = carry
        conv = functools.partial(
            nn.Conv,
            features=4 * self.features,
            kernel_size=tuple(self.kernel_size),
            padding="SAME",
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        gates = conv(name="ih")(inputs) + conv(name="hh")(h)
        i, g, f, o = jnp.split(gates, 4, axis=-1)
        if self.peephole:
            peephole = functools.partial(
                self.param, init_fn=nn.initializers.zeros, shape=(self.features,)
            )
            w_ci, w_cf, w_co = (
                peephole(name) for name in ("peephole_i", "peephole_f", "peephole_o")
            )
            i = i + w_ci * c
            f = f + w_cf * c
        new_c = nn.sigmoid(f + 1) * c + nn.sigmoid(i) * jnp.tanh(g)
        if self.peephole:
            o = o + w_co * new_c
        new_h = nn.sigmoid(o) * jnp.tanh(new_c)
        new_c, new_h = new_c.astype(c.dtype), new_h.astype(h.dtype)
        return (new_c, new_h), new_h

    @nn.nowrap
    def initialize_carry(
        self, rng: jax.Array, input_shape: tuple[int, ...]
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Zero cell and hidden states for inputs of ``input_shape``.

        Args:
          rng: unused (zero initialisation).
          input_shape: (*batch, H, W, C_in) shape of one step's input.

        Returns:
          (C, H), each (*batch, H, W, features) float32 zeros.
        """
        del rng
        shape = tuple(input_shape[:-1]) + (self.features,)
        return jnp.zeros(shape, self.param_dtype), jnp.zeros(shape, self.param_dtype)

    @property
    def num_feature_axes(self) -> int:
        """Axes of one step's input that are not batch axes: H, W and channels."""
        return len(self.kernel_size) + 1


class ConvLSTMClassifier(nn.Module):
    """ConvLSTM over frame sequences with a video-class head and per-quadrant score heads.

    Attributes:
      width: hidden channels of the stem and of every ConvLSTM layer.
      num_layers: stacked ConvLSTM layers.
      kernel_size: kernel of the ConvLSTM convolutions (square).
      stem_stride: stride of the per-frame stem conv (kernel 2 * stem_stride + 1, ReLU);
        1 keeps the resolution.
      pool_between_layers: 2x2 max-pool each frame's map between ConvLSTM layers.
      peephole: peephole connections in the cells (see `ConvLSTMCell`).
      num_quadrants: regions scored separately (4: q1 top-left .. q4 bottom-right).
      num_classes: classes of the video and of each quadrant.
      quadrant_head: ``"ordinal"`` or ``"softmax"`` (see `PerfusionHeads`).
      temporal_pool: ``"last"`` (the final hidden state) or ``"mean"`` (hidden states
        averaged over time) as the clip's feature map.
      dropout_rate: dropout on the pooled features before the heads.
      dtype: computation dtype (``bfloat16`` for mixed precision); parameters and the
        recurrent state are float32, the heads run in float32.
    """

    width: int = 16
    num_layers: int = 2
    kernel_size: int = 3
    stem_stride: int = 2
    pool_between_layers: bool = True
    peephole: bool = True
    num_quadrants: int = 4
    num_classes: int = 4
    quadrant_head: str = "ordinal"
    temporal_pool: str = "last"
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> dict[str, jnp.ndarray]:
        """Classifies clips.

        Args:
          x: (B, T, H, W, C) frames, float (normalised by the caller).
          train: True in training mode (dropout on; needs a ``"dropout"`` rng when
            ``dropout_rate`` > 0).

        Returns:
          ``{"video_logits": (B, num_classes), "quadrant_logits": (B, num_quadrants,
          num_classes - 1) for "ordinal" or (B, num_quadrants, num_classes) for "softmax"}``,
          float32.

        Raises:
          ValueError: a non-5-D input, an unknown option, or frames too small for the
            down-sampling and the quadrant grid.
        """
        if x.ndim != 5:
            raise ValueError(f"ConvLSTMClassifier expects clips (B, T, H, W, C), got {x.shape}")
        if self.temporal_pool not in TEMPORAL_POOLS:
            raise ValueError(f"temporal_pool={self.temporal_pool!r} is not one of {TEMPORAL_POOLS}")
        if self.num_layers < 1 or self.stem_stride < 1:
            raise ValueError(
                f"num_layers={self.num_layers} and stem_stride={self.stem_stride} must be >= 1"
            )
        quadrant_grid(self.num_quadrants)
        x = x.astype(self.dtype)
        stem_kernel = 2 * self.stem_stride + 1
        x = nn.Conv(
            self.width,
            kernel_size=(stem_kernel, stem_kernel),
            strides=(self.stem_stride, self.stem_stride),
            padding="SAME",
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="stem",
        )(x)
        x = nn.relu(x)
        for layer in range(self.num_layers):
            if layer > 0 and self.pool_between_layers:
                x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
            cell = ConvLSTMCell(
                features=self.width,
                kernel_size=(self.kernel_size, self.kernel_size),
                peephole=self.peephole,
                dtype=self.dtype,
                name=f"convlstm{layer + 1}",
            )
            x = nn.RNN(cell, name=f"rnn{layer + 1}")(x)
        state = x[:, -1] if self.temporal_pool == "last" else jnp.mean(x, axis=1)
        quadrant_features = quadrant_mean(state, self.num_quadrants)
        global_features = jnp.mean(state.astype(jnp.float32), axis=(1, 2))
        video_features = jnp.concatenate(
            [global_features, quadrant_features.reshape(quadrant_features.shape[0], -1)], axis=-1
        )
        dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
        return PerfusionHeads(self.num_classes, self.quadrant_head, name="heads")(
            dropout(video_features), dropout(quadrant_features)
        )
