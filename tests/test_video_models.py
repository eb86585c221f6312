"""R(2+1)D and DeepLabv3: torchvision's parameter counts, shapes, strides, the EF bias, dtype."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import models
from medjax.models.deeplabv3 import DeepLabV3
from medjax.models.r2plus1d import EFRegressor, R2Plus1D, midplanes


def _num_params(module, shape):
    variables = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros(shape), train=False)
    )
    return sum(x.size for x in jax.tree.leaves(variables["params"]))


def test_r2plus1d_18_has_torchvisions_parameter_count():
    # torchvision.models.video.r2plus1d_18(num_classes=1): 31,300,638 parameters (the
    # 400-class Kinetics model has 31,505,325 = this - 513 + 512 * 400 + 400).
    assert _num_params(EFRegressor(), (1, 4, 16, 16, 3)) == 31_300_638
    assert _num_params(R2Plus1D(num_outputs=400), (1, 4, 16, 16, 3)) == 31_505_325
    assert midplanes(3, 64) == 23 and midplanes(64, 64) == 144


def test_deeplabv3_resnet50_has_torchvisions_parameter_count():
    # torchvision.models.segmentation.deeplabv3_resnet50(num_classes=1, aux_loss=False).
    assert _num_params(DeepLabV3(), (1, 32, 32, 3)) == 39_633_729


def test_r2plus1d_halves_time_and_space_and_starts_at_the_mean_ef():
    model = EFRegressor(depth=10, width=4, mean_ef=57.5)
    clips = jax.random.uniform(jax.random.key(1), (2, 8, 32, 32, 1))
    variables = model.init(jax.random.key(0), clips, train=False)
    out = model.apply(variables, clips, train=False)
    assert out.shape == (2,) and out.dtype == jnp.float32
    head = variables["params"]["backbone"]["head"]
    assert float(head["bias"][0]) == 57.5 and not np.allclose(out, 57.5)
    # Stage 4 sees time and space divided by 8 (strides of stages 2-4), after the stem's /2.
    _, state = model.apply(
        variables, clips, train=False, capture_intermediates=True, mutable=["intermediates"]
    )
    last = state["intermediates"]["backbone"]["layer4_0"]["__call__"][0]
    assert last.shape == (2, 1, 2, 2, 32)


def test_r2plus1d_bfloat16_compute_keeps_float32_params():
    model = R2Plus1D(depth=10, width=4, dtype=jnp.bfloat16)
    clips = jnp.ones((1, 4, 16, 16, 1))
    variables = model.init(jax.random.key(0), clips, train=False)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables["params"]))
    reference = R2Plus1D(depth=10, width=4).apply(variables, clips, train=False)
    out = model.apply(variables, clips, train=False)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, reference, rtol=0.1, atol=0.05)


@pytest.mark.parametrize("output_stride, size", [(8, 4), (16, 2)])
def test_deeplabv3_output_stride_and_full_size_logits(output_stride, size):
    model = DeepLabV3(depth=18, width=4, aspp_channels=8, output_stride=output_stride)
    images = jax.random.uniform(jax.random.key(2), (2, 32, 32, 1))
    variables = model.init(jax.random.key(0), images, train=False)
    logits = model.apply(variables, images, train=False)
    assert logits.shape == (2, 32, 32, 1) and logits.dtype == jnp.float32
    _, state = model.apply(
        variables, images, train=False, capture_intermediates=True, mutable=["intermediates"]
    )
    aspp = state["intermediates"]["aspp"]["__call__"][0]
    assert aspp.shape == (2, size, size, 8)


def test_registry_builds_both_and_resnet_weights_go_to_the_deeplab_backbone():
    import ml_collections

    cfg = ml_collections.ConfigDict(
        {"name": "deeplabv3", "depth": 18, "width": 4, "aspp_channels": 8, "init_from": ""}
    )
    assert isinstance(models.build_model(cfg), DeepLabV3)
    assert models.pretrained_name(cfg) == "resnet18"
    cfg = ml_collections.ConfigDict({"name": "r2plus1d_ef", "depth": 10, "width": 4})
    assert isinstance(models.build_model(cfg), EFRegressor)
    with pytest.raises(ValueError, match="does not fit model"):
        models.build_model(ml_collections.ConfigDict({"name": "r2plus1d_ef", "depht": 10}))


# ---------------------------------------------------------------- fastconv reformulations
_DN_3D = ("NDHWC", "DHWIO", "NDHWC")


def _value_and_grads(conv, x, kernel):
    """Output and (input, kernel) gradients of sum(sin(conv(x, kernel))), jitted."""

    def loss(x, kernel):
        return jnp.sum(jnp.sin(conv(x, kernel)))

    return jax.jit(conv)(x, kernel), jax.jit(jax.grad(loss, argnums=(0, 1)))(x, kernel)


@pytest.mark.parametrize("weight_grad", ["taps", "xla"])
@pytest.mark.parametrize(
    "kernel_size, strides",
    [
        ((1, 3, 3), (1, 2, 2)),  # the spatial half of a factorised conv
        ((3, 1, 1), (2, 1, 1)),  # its temporal half
        ((3, 1, 1), (2, 2, 2)),
        ((1, 1, 1), (2, 2, 2)),  # the strided shortcut
        ((1, 7, 7), (1, 2, 2)),  # the stem
        ((3, 3, 3), (1, 1, 1)),  # not factorised: XLA's own
    ],
)
def test_conv3d_equals_lax_conv_forward_and_gradients(kernel_size, strides, weight_grad):
    from jax import lax

    from medjax.models.fastconv import conv3d

    x = jax.random.normal(jax.random.key(0), (2, 5, 9, 10, 3))
    kernel = jax.random.normal(jax.random.key(1), (*kernel_size, 3, 4))
    padding = tuple((k // 2, k // 2) for k in kernel_size)

    def reference(x, kernel):
        return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DN_3D)

    def fast(x, kernel):
        return conv3d(x, kernel, strides, padding, weight_grad=weight_grad)

    y_ref, grads_ref = _value_and_grads(reference, x, kernel)
    y, grads = _value_and_grads(fast, x, kernel)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-4)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kernel_size, strides, padding",
    [
        ((2, 2), (2, 2), "VALID"),
        ((3, 2), (2, 3), ((1, 0), (0, 2))),  # uneven strides and padding
        ((3, 3), (3, 3), "VALID"),  # rows no tap reaches are cropped
        ((5, 5), (1, 1), "SAME"),
    ],
)
def test_conv2d_tap_kernel_gradient_equals_xlas(kernel_size, strides, padding):
    from jax import lax

    from medjax.models.fastconv import conv2d

    x = jax.random.normal(jax.random.key(2), (2, 9, 8, 3))
    kernel = jax.random.normal(jax.random.key(3), (*kernel_size, 3, 5))

    def reference(x, kernel):
        return lax.conv_general_dilated(
            x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    y_ref, grads_ref = _value_and_grads(reference, x, kernel)
    y, grads = _value_and_grads(
        lambda x, k: conv2d(x, k, strides, padding, weight_grad="taps"), x, kernel
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


def test_conv2d_rejects_bad_arguments_by_value():
    from medjax.models.fastconv import conv2d

    x, kernel = jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 2, 5))
    with pytest.raises(ValueError, match="3 channels.*expects 2"):
        conv2d(x, kernel)
    with pytest.raises(ValueError, match="weight_grad 'fast'"):
        conv2d(x, jnp.ones((3, 3, 3, 5)), weight_grad="fast")
    with pytest.raises(ValueError, match="padding"):
        conv2d(x, jnp.ones((3, 3, 3, 5)), padding=((1, 1),))


@pytest.mark.parametrize("kernel_size, strides", [((1, 3, 3), (1, 2, 2)), ((3, 3), (1, 1))])
def test_fast_conv_module_is_flax_conv(kernel_size, strides):
    import flax.linen as nn

    from medjax.models.fastconv import Conv

    shape = (2, 4, 8, 8, 3) if len(kernel_size) == 3 else (2, 8, 8, 3)
    x = jax.random.normal(jax.random.key(4), shape)
    padding = tuple((k // 2, k // 2) for k in kernel_size)
    kwargs = dict(features=6, kernel_size=kernel_size, strides=strides, padding=padding)
    reference = nn.Conv(**kwargs, name="conv")
    fast = Conv(**kwargs, name="conv")
    variables = reference.init(jax.random.key(5), x)
    # Same names, shapes and initial values from the same key: checkpoints carry over.
    fast_variables = fast.init(jax.random.key(5), x)
    assert jax.tree.structure(variables) == jax.tree.structure(fast_variables)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(fast_variables)):
        np.testing.assert_array_equal(a, b)
    variables["params"]["bias"] = jnp.arange(6.0)
    np.testing.assert_allclose(
        fast.apply(variables, x), reference.apply(variables, x), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("relu", [False, True])
def test_fast_batch_norm_is_flax_batch_norm(relu):
    import flax.linen as nn

    from medjax.models.fastconv import BatchNorm

    x = 3.0 * jax.random.normal(jax.random.key(6), (4, 3, 5, 7)) + 1.0
    weights = jax.random.normal(jax.random.key(7), x.shape)

    def reference(train):
        bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn")
        return (lambda x: nn.relu(bn(x))) if relu else bn

    class Reference(nn.Module):
        train: bool

        @nn.compact
        def __call__(self, x):
            return reference(self.train)(x)

    class Fast(nn.Module):
        train: bool

        @nn.compact
        def __call__(self, x):
            bn = BatchNorm(not self.train, momentum=0.9, epsilon=1e-5, relu=relu, name="bn")
            return bn(x)

    variables = Reference(True).init(jax.random.key(8), x)
    assert jax.tree.structure(variables) == jax.tree.structure(
        Fast(True).init(jax.random.key(8), x)
    )
    variables = jax.tree.map(lambda v: v + 0.3, variables)  # Non-trivial scale, bias, stats.

    def loss(module, params, x):
        y, state = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(y * weights), (y, state)

    results = [
        jax.jit(jax.value_and_grad(functools.partial(loss, m), argnums=(0, 1), has_aux=True))(
            variables["params"], x
        )
        for m in (Reference(True), Fast(True))
    ]
    (_, (y_ref, state_ref)), grads_ref = results[0]
    (_, (y, state)), grads = results[1]
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves((state, grads)), jax.tree.leaves((state_ref, grads_ref))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        Fast(False).apply(variables, x), Reference(False).apply(variables, x), rtol=1e-5, atol=1e-5
    )
