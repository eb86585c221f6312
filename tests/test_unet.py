"""Tests for medjax.models.unet.UNet: shapes, validation, BatchNorm state, overfitting."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax import losses, metrics
from medjax.models.unet import UNet

# XLA:CPU compiles the default threefry PRNG slowly (~5 s for a whole UNet init); the
# "rbg" generator keeps the tests that really initialise parameters fast.
_INIT_KEY = jax.random.key(0, impl="rbg")


def _shapes(model, x, train=False):
    """Initialises and applies `model` abstractly (no compute, so the test is fast).

    Args:
      model: a UNet.
      x: input array or ShapeDtypeStruct.
      train: forwarded to the model.

    Returns:
      Tuple (variables, logits) of ShapeDtypeStruct trees.
    """
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    mutable = ["batch_stats"] if train else False
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=train, mutable=mutable), variables, x)
    logits = out[0] if train else out
    return variables, logits


@pytest.mark.parametrize(
    "depth,norm,out_channels,hw",
    [
        (1, "batch", 1, (8, 12)),
        (2, "group", 3, (16, 8)),
        (3, "layer", 2, (8, 16)),
        (2, "none", 1, (4, 12)),
    ],
)
def test_output_shape_and_dtype(depth, norm, out_channels, hw):
    """Logits are (B, H, W, out_channels) float32 for several depths and norms."""
    model = UNet(width=4, depth=depth, out_channels=out_channels, norm=norm)
    variables, y = _shapes(model, jnp.ones((2, *hw, 1)))
    assert ("batch_stats" in variables) == (norm == "batch")
    assert y.shape == (2, *hw, out_channels)
    assert y.dtype == jnp.float32


def test_bfloat16_compute_keeps_float32_params_and_logits():
    """dtype=bfloat16 computes in bf16 but params and logits stay float32."""
    model = UNet(width=4, depth=2, norm="batch", dtype=jnp.bfloat16)
    variables, y = _shapes(model, jnp.ones((1, 8, 8, 1)), train=True)
    leaves = jax.tree_util.tree_leaves(variables["params"])
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)
    assert y.dtype == jnp.float32 and y.shape == (1, 8, 8, 1)


def test_bad_norm_raises_with_name():
    """An unknown norm raises ValueError naming it."""
    model = UNet(width=4, depth=1, norm="instance")
    with pytest.raises(ValueError, match="instance"):
        model.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)), train=False)


def test_bad_shape_raises_with_shape_and_depth():
    """H or W not divisible by 2**depth raises ValueError with the shape and depth."""
    model = UNet(width=4, depth=3)
    with pytest.raises(ValueError, match=r"\(1, 16, 12, 1\).*depth=3"):
        model.init(jax.random.key(0), jnp.ones((1, 16, 12, 1)), train=False)
    with pytest.raises(ValueError, match=r"\(16, 16\)"):
        model.init(jax.random.key(0), jnp.ones((16, 16)), train=False)


def test_batch_stats_updated_only_in_train_mode():
    """Train mode changes the running statistics; eval mode leaves them as they are."""
    model = UNet(width=4, depth=2, norm="batch")
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1)) * 3.0 + 2.0
    variables = jax.jit(lambda x: model.init(_INIT_KEY, x, train=False))(x)
    stats = variables["batch_stats"]

    _, train_upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
    _, eval_upd = model.apply(variables, x, train=False, mutable=["batch_stats"])

    def max_change(new):
        """Largest absolute difference to the initial stats.

        Args:
          new: batch_stats tree with the structure of `stats`.

        Returns:
          float.
        """
        diffs = jax.tree_util.tree_map(lambda a, b: jnp.max(jnp.abs(a - b)), new, stats)
        return max(float(d) for d in jax.tree_util.tree_leaves(diffs))

    assert max_change(train_upd["batch_stats"]) > 1e-3
    assert max_change(eval_upd["batch_stats"]) == 0.0
    # Momentum 0.9: first conv's running mean = 0.9 * 0 + 0.1 * batch mean.
    first = train_upd["batch_stats"]["down0"]["norm0"]
    assert first["mean"].shape == (4,)
    conv = variables["params"]["down0"]["conv0"]["kernel"]
    h = jax.lax.conv_general_dilated(
        x, conv, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(first["mean"], 0.1 * h.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)


def test_overfits_one_image():
    """A few Adam steps on one 32x32 image+mask reach Dice > 0.9 (eval mode)."""
    yy, xx = np.mgrid[:32, :32]
    mask = ((yy - 12) ** 2 + (xx - 18) ** 2 <= 36).astype(np.float32)
    square = (np.abs(yy - 24) <= 3) & (np.abs(xx - 7) <= 3)  # a distractor
    rng = np.random.default_rng(0)
    image = 0.8 * mask + 0.8 * square + 0.1 * rng.normal(size=mask.shape)
    x = jnp.asarray(image[None, :, :, None], jnp.float32)
    y = jnp.asarray(mask[None, :, :, None])

    model = UNet(width=4, depth=2, norm="batch")
    variables = jax.jit(lambda x: model.init(_INIT_KEY, x, train=False))(x)
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(3e-2)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, stats, opt_state):
        """One training step.

        Args:
          params: model parameters.
          stats: BatchNorm statistics.
          opt_state: Adam state.

        Returns:
          Updated (params, stats, opt_state, loss).
        """

        def loss_fn(p):
            logits, upd = model.apply(
                {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            return losses.dice_bce_loss(logits, y), upd["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    for _ in range(80):
        params, stats, opt_state, loss = step(params, stats, opt_state)
    logits = model.apply({"params": params, "batch_stats": stats}, x, train=False)
    dice = metrics.dice_score(logits > 0, y)
    assert float(loss) < 0.3
    assert float(dice[0]) > 0.9


def test_upsample2x_is_the_stride_2_transposed_convolution():
    import flax.linen as nn

    from medjax.models.unet import Upsample2x

    class Reference(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.ConvTranspose(8, (2, 2), strides=(2, 2), name="up")(x)

    class Fast(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Upsample2x(8, name="up")(x)

    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
    reference = Reference().init(jax.random.key(1), x)
    fast = Fast().init(jax.random.key(1), x)
    # Same parameter names, shapes and initial values: checkpoints and seeds carry over.
    assert jax.tree.structure(reference) == jax.tree.structure(fast)
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(fast)):
        np.testing.assert_array_equal(a, b)
    reference["params"]["up"]["bias"] = jnp.arange(8.0)
    np.testing.assert_allclose(
        Fast().apply(reference, x), Reference().apply(reference, x), rtol=1e-5, atol=1e-5
    )


def test_max_pool_2x2_equals_flax_max_pool_with_its_gradient_on_ties():
    import flax.linen as nn

    from medjax.models.fastconv import max_pool_2x2

    # Rounded values: many windows hold tied maxima, whose gradient goes to the first one.
    x = jnp.round(1.5 * jax.random.normal(jax.random.key(0), (2, 9, 8, 3)))
    dy = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
    y_ref, vjp_ref = jax.vjp(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)), x)
    y, vjp = jax.jit(lambda x: jax.vjp(max_pool_2x2, x))(x)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(vjp(dy)[0], vjp_ref(dy)[0])
    with pytest.raises(ValueError, match=r"\(2, 8, 3\)"):
        max_pool_2x2(jnp.ones((2, 8, 3)))
