"""R(2+1)D and DeepLabv3: torchvision's parameter counts, shapes, strides, the EF bias, dtype."""

from __future__ import annotations

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
