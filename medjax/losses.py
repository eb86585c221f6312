"""Training losses for binary segmentation as pure `jax.numpy` functions.

All losses take raw logits (before the sigmoid) and targets in [0, 1] of the same shape
(B, ...), compute in float32 whatever the input dtype, and return a float32 scalar.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "soft_dice_loss",
    "dice_bce_loss",
    "segmentation_loss",
]


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


def soft_dice_loss(
    logits, targets, smooth: float = 1.0, *, over_batch: bool = False
) -> jnp.ndarray:
    """Soft Dice loss 1 - (2 Σ p t + smooth) / (Σ p + Σ t + smooth), with p = sigmoid.

    Sums run over all non-batch axes of each sample; the per-sample losses are then
    averaged over the batch. ``smooth`` keeps empty targets well defined (an empty
    target with an all-background prediction gives a loss near 0). With ``over_batch``
    the sums run over the whole batch instead (one Dice of all its pixels): when most
    samples have an empty target (CT slices without hemorrhage), their per-sample terms
    would otherwise pull every prediction towards empty.

    Args:
      logits: raw scores, shape (B, ...).
      targets: values in [0, 1], same shape.
      smooth: additive smoothing in numerator and denominator.
      over_batch: one Dice over all pixels of the batch rather than a mean of per-sample ones.

    Returns:
      float32 scalar.
    """
    logits, targets = _as_float32(logits, targets)
    probs = jax.nn.sigmoid(logits)
    axes = tuple(range(0 if over_batch else 1, logits.ndim))
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


def sigmoid_focal_loss(logits, targets, alpha: float = 0.25, gamma: float = 2.0) -> jnp.ndarray:
    """Focal loss (Lin et al. 2017) averaged over all elements.

    ``-a_t (1 - p_t)**gamma log(p_t)`` with ``p_t = p`` for target 1 and ``1 - p`` for
    target 0, ``a_t = alpha`` for target 1 and ``1 - alpha`` for target 0 (``alpha < 0``:
    no class weighting). Down-weights the many easy background pixels of mostly empty slices.

    Args:
      logits: raw scores, shape (B, ...).
      targets: values in [0, 1], same shape.
      alpha: weight of the positive class in [0, 1], or negative for none.
      gamma: focusing exponent (0 gives weighted binary cross-entropy).

    Returns:
      float32 scalar.
    """
    logits, targets = _as_float32(logits, targets)
    ce = optax.sigmoid_binary_cross_entropy(logits, targets)
    p = jax.nn.sigmoid(logits)
    p_t = p * targets + (1.0 - p) * (1.0 - targets)
    loss = ce * (1.0 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1.0 - alpha) * (1.0 - targets))
    return jnp.mean(loss)


def segmentation_loss(logits, targets, cfg) -> jnp.ndarray:
    """The weighted sum of soft Dice, BCE and focal terms a segmentation config names.

    Args:
      logits: raw scores, shape (B, ...).
      targets: values in [0, 1], same shape.
      cfg: mapping with ``dice_weight``, ``bce_weight`` and optionally ``dice_over_batch``
        (see `soft_dice_loss`), ``focal_weight``, ``focal_alpha``, ``focal_gamma`` (a focal
        term with weight 0 is not computed).

    Returns:
      float32 scalar.
    """
    total = cfg["dice_weight"] * soft_dice_loss(
        logits, targets, over_batch=cfg.get("dice_over_batch", False)
    ) + cfg["bce_weight"] * sigmoid_binary_cross_entropy(logits, targets)
    focal_weight = cfg.get("focal_weight", 0.0)
    if focal_weight:
        total = total + focal_weight * sigmoid_focal_loss(
            logits, targets, alpha=cfg.get("focal_alpha", 0.25), gamma=cfg.get("focal_gamma", 2.0)
        )
    return total
