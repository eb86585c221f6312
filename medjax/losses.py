"""Training losses for binary segmentation as pure `jax.numpy` functions.

All losses take raw logits (before the sigmoid) and targets in [0, 1] of the same shape
(B, ...), compute in float32 whatever the input dtype, and return a float32 scalar.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["sigmoid_binary_cross_entropy", "soft_dice_loss", "dice_bce_loss"]


def _as_float32(logits, targets):
    """Casts logits and targets to float32 and checks their shapes agree.

    Args:
      logits: raw scores, shape (B, ...).
      targets: values in [0, 1], same shape.

    Returns:
      Tuple (logits, targets) as float32 arrays.

    Raises:
      ValueError: if the shapes differ.
    """
    logits = jnp.asarray(logits, jnp.float32)
    targets = jnp.asarray(targets, jnp.float32)
    if logits.shape != targets.shape:
        raise ValueError(f"logits and targets shapes differ: {logits.shape} vs {targets.shape}")
    return logits, targets


def sigmoid_binary_cross_entropy(logits, targets) -> jnp.ndarray:
    """Mean binary cross-entropy of sigmoid(logits) against targets, numerically stable.

    Args:
      logits: raw scores, shape (B, ...).
      targets: values in [0, 1], same shape.

    Returns:
      float32 scalar: the mean over all elements.
    """
    logits, targets = _as_float32(logits, targets)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets))


def soft_dice_loss(logits, targets, smooth: float = 1.0) -> jnp.ndarray:
    """Soft Dice loss 1 - (2 Σ p t + smooth) / (Σ p + Σ t + smooth), with p = sigmoid.

    Sums run over all non-batch axes of each sample; the per-sample losses are then
    averaged over the batch. ``smooth`` keeps empty targets well defined (an empty
    target with an all-background prediction gives a loss near 0).

    Args:
      logits: raw scores, shape (B, ...).
      targets: values in [0, 1], same shape.
      smooth: additive smoothing in numerator and denominator.

    Returns:
      float32 scalar.
    """
    logits, targets = _as_float32(logits, targets)
    probs = jax.nn.sigmoid(logits)
    axes = tuple(range(1, logits.ndim))
    inter = jnp.sum(probs * targets, axis=axes)
    total = jnp.sum(probs, axis=axes) + jnp.sum(targets, axis=axes)
    dice = (2.0 * inter + smooth) / (total + smooth)
    return jnp.mean(1.0 - dice)


def dice_bce_loss(
    logits, targets, dice_weight: float = 1.0, bce_weight: float = 1.0
) -> jnp.ndarray:
    """Weighted sum of `soft_dice_loss` (smooth=1) and `sigmoid_binary_cross_entropy`.

    Args:
      logits: raw scores, shape (B, ...).
      targets: values in [0, 1], same shape.
      dice_weight: weight of the soft Dice term.
      bce_weight: weight of the binary cross-entropy term.

    Returns:
      float32 scalar ``dice_weight * dice + bce_weight * bce``.
    """
    return dice_weight * soft_dice_loss(logits, targets) + bce_weight * (
        sigmoid_binary_cross_entropy(logits, targets)
    )
