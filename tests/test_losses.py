"""Tests for medjax.losses: hand-computed values, limits and gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import losses


def _sigmoid(x):
    """Reference logistic function.

    Args:
      x: float.

    Returns:
      1 / (1 + exp(-x)).
    """
    return 1.0 / (1.0 + math.exp(-x))


def test_bce_hand_values():
    """BCE is the mean of -t log p - (1 - t) log(1 - p), stable for large logits."""
    logits = jnp.array([[0.0, 2.0], [-1.0, 100.0]])
    targets = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    expected = np.mean(
        [
            -math.log(0.5),
            -math.log(1 - _sigmoid(2.0)),
            -math.log(1 - _sigmoid(-1.0)),
            0.0,  # log(sigmoid(100)) ~ -4e-44
        ]
    )
    value = losses.sigmoid_binary_cross_entropy(logits, targets)
    assert value.dtype == jnp.float32
    assert float(value) == pytest.approx(expected, rel=1e-6)
    huge = losses.sigmoid_binary_cross_entropy(jnp.array([[-1e4]]), jnp.array([[1.0]]))
    assert float(huge) == pytest.approx(1e4, rel=1e-6)


def test_soft_dice_hand_values():
    """Per-sample soft Dice with smoothing, averaged over the batch."""
    logits = jnp.array([[0.0, 0.0], [0.0, 0.0]])  # p = 0.5 everywhere
    targets = jnp.array([[1.0, 0.0], [1.0, 1.0]])
    # sample 0: (2*0.5 + 1) / (1 + 1 + 1) = 2/3; sample 1: (2*1 + 1) / (1 + 2 + 1) = 3/4
    expected = np.mean([1 - 2 / 3, 1 - 3 / 4])
    assert float(losses.soft_dice_loss(logits, targets)) == pytest.approx(expected, rel=1e-6)
    # smooth=0: sample 0 -> 1/2, sample 1 -> 2/3
    expected0 = np.mean([1 - 1 / 2, 1 - 2 / 3])
    assert float(losses.soft_dice_loss(logits, targets, smooth=0.0)) == pytest.approx(
        expected0, rel=1e-6
    )


def test_dice_bce_is_weighted_sum():
    """dice_bce_loss = dice_weight * dice + bce_weight * bce."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 4, 4, 1)), jnp.float32)
    targets = jnp.asarray(rng.random((3, 4, 4, 1)) > 0.5, jnp.float32)
    dice = float(losses.soft_dice_loss(logits, targets))
    bce = float(losses.sigmoid_binary_cross_entropy(logits, targets))
    value = losses.dice_bce_loss(logits, targets, dice_weight=0.3, bce_weight=2.0)
    assert float(value) == pytest.approx(0.3 * dice + 2.0 * bce, rel=1e-6)
    assert float(losses.dice_bce_loss(logits, targets)) == pytest.approx(dice + bce, rel=1e-6)


def test_perfect_prediction_gives_near_zero_loss():
    """Confident correct logits give ~0 Dice and BCE, including an empty target."""
    targets = jnp.zeros((2, 8, 8, 1)).at[0, 2:5, 3:6].set(1.0)
    logits = jnp.where(targets > 0, 20.0, -20.0)
    assert float(losses.soft_dice_loss(logits, targets)) < 1e-6
    assert float(losses.dice_bce_loss(logits, targets)) < 1e-6
    wrong = losses.soft_dice_loss(-logits, targets)
    assert float(wrong) > 0.45  # sample 0 ~1, empty sample 1 ~ 1 - 1/65


def test_gradients_finite():
    """Gradients are finite, even at extreme logits and in bfloat16."""
    targets = jnp.array([[1.0, 0.0, 1.0, 0.0]])
    for logits in (jnp.array([[0.3, -0.2, 1e4, -1e4]]), jnp.array([[-1e4, 1e4, 0.0, 0.0]])):
        for dtype in (jnp.float32, jnp.bfloat16):
            grad = jax.grad(losses.dice_bce_loss)(logits.astype(dtype), targets)
            assert np.isfinite(np.asarray(grad, np.float32)).all()
    # The gradient pushes logits towards the targets.
    grad = jax.grad(losses.dice_bce_loss)(jnp.zeros((1, 4)), targets)
    assert (np.sign(np.asarray(grad)) == np.array([[-1, 1, -1, 1]])).all()


def test_shape_mismatch_raises():
    """Mismatched shapes raise ValueError naming both."""
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        losses.soft_dice_loss(jnp.zeros((2, 3)), jnp.zeros((3, 2)))
