"""Tests for medjax.models.inception and its weight import: InceptionV3's size against
torchvision's architecture, shapes and padding modes, torchvision (.npz) and Keras (.h5) files
loading strictly, and the CNN-RNN's cached-feature head equalling the full model.

The reference architecture below is written from torchvision's ``Inception3`` (channel counts
of every BasicConv2d, in module order, which is also Keras' layer creation order), independently
of the model and mapping under test. Variables come from `jax.eval_shape` filled with random
values: an eager or jitted `init` of ~100 randomly initialised convs takes tens of seconds to
compile on a CPU, and these tests need only the structure.
"""

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from medjax import models
from medjax.models import pretrained
from medjax.models.inception import (
    BasicConv2d,
    CnnRnnClassifier,
    InceptionV3,
    frame_features,
    inception_feature_dim,
)

# ------------------------------------------------------------------------------------------
# torchvision's Inception3: (module path, in channels, out channels, kernel h, kernel w).


def _reference_convs(width=32, in_channels=3):
    """Every BasicConv2d of torchvision's Inception3 (no AuxLogits), channels scaled by
    width / 32; returns the conv list and the final channel count."""

    def s(c):
        return max(1, c * width // 32)

    convs = [
        ("Conv2d_1a_3x3", in_channels, s(32), 3, 3),
        ("Conv2d_2a_3x3", s(32), s(32), 3, 3),
        ("Conv2d_2b_3x3", s(32), s(64), 3, 3),
        ("Conv2d_3b_1x1", s(64), s(80), 1, 1),
        ("Conv2d_4a_3x3", s(80), s(192), 3, 3),
    ]
    c = s(192)

    def block(name, spec):
        for conv, cin, cout, kh, kw in spec:
            convs.append((f"{name}.{conv}", cin, cout, kh, kw))

    for name, pool in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
        block(
            name,
            [
                ("branch1x1", c, s(64), 1, 1),
                ("branch5x5_1", c, s(48), 1, 1),
                ("branch5x5_2", s(48), s(64), 5, 5),
                ("branch3x3dbl_1", c, s(64), 1, 1),
                ("branch3x3dbl_2", s(64), s(96), 3, 3),
                ("branch3x3dbl_3", s(96), s(96), 3, 3),
                ("branch_pool", c, s(pool), 1, 1),
            ],
        )
        c = s(64) + s(64) + s(96) + s(pool)
    block(
        "Mixed_6a",
        [
            ("branch3x3", c, s(384), 3, 3),
            ("branch3x3dbl_1", c, s(64), 1, 1),
            ("branch3x3dbl_2", s(64), s(96), 3, 3),
            ("branch3x3dbl_3", s(96), s(96), 3, 3),
        ],
    )
    c = s(384) + s(96) + c
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        c7 = s(c7)
        block(
            name,
            [
                ("branch1x1", c, s(192), 1, 1),
                ("branch7x7_1", c, c7, 1, 1),
                ("branch7x7_2", c7, c7, 1, 7),
                ("branch7x7_3", c7, s(192), 7, 1),
                ("branch7x7dbl_1", c, c7, 1, 1),
                ("branch7x7dbl_2", c7, c7, 7, 1),
                ("branch7x7dbl_3", c7, c7, 1, 7),
                ("branch7x7dbl_4", c7, c7, 7, 1),
                ("branch7x7dbl_5", c7, s(192), 1, 7),
                ("branch_pool", c, s(192), 1, 1),
            ],
        )
        c = 4 * s(192)
    block(
        "Mixed_7a",
        [
            ("branch3x3_1", c, s(192), 1, 1),
            ("branch3x3_2", s(192), s(320), 3, 3),
            ("branch7x7x3_1", c, s(192), 1, 1),
            ("branch7x7x3_2", s(192), s(192), 1, 7),
            ("branch7x7x3_3", s(192), s(192), 7, 1),
            ("branch7x7x3_4", s(192), s(192), 3, 3),
        ],
    )
    c = s(320) + s(192) + c
    for name in ("Mixed_7b", "Mixed_7c"):
        block(
            name,
            [
                ("branch1x1", c, s(320), 1, 1),
                ("branch3x3_1", c, s(384), 1, 1),
                ("branch3x3_2a", s(384), s(384), 1, 3),
                ("branch3x3_2b", s(384), s(384), 3, 1),
                ("branch3x3dbl_1", c, s(448), 1, 1),
                ("branch3x3dbl_2", s(448), s(384), 3, 3),
                ("branch3x3dbl_3a", s(384), s(384), 1, 3),
                ("branch3x3dbl_3b", s(384), s(384), 3, 1),
                ("branch_pool", c, s(192), 1, 1),
            ],
        )
        c = s(320) + 2 * s(384) + 2 * s(384) + s(192)
    return convs, c


def _torchvision_shapes(width, num_classes):
    """Key -> shape of torchvision's inception_v3 state dict (AuxLogits included)."""
    convs, features = _reference_convs(width)
    shapes = {}

    def conv(name, cin, cout, kh, kw):
        shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{suffix}"] = (cout,)
        shapes[f"{name}.bn.num_batches_tracked"] = ()

    for spec in convs:
        conv(*spec)
    conv("AuxLogits.conv0", 4 * max(1, 192 * width // 32), 128, 1, 1)
    conv("AuxLogits.conv1", 128, 768, 5, 5)
    shapes["AuxLogits.fc.weight"] = (num_classes, 768)
    shapes["AuxLogits.fc.bias"] = (num_classes,)
    shapes["fc.weight"] = (num_classes, features)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def _torchvision_state_dict(width, num_classes, seed=0):
    """torchvision's inception_v3 state dict with random values (BN variances positive)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for key, shape in _torchvision_shapes(width, num_classes).items():
        if key.endswith("num_batches_tracked"):
            arrays[key] = np.array(7, np.int64)
        elif key.endswith(("running_var", "bn.weight")):
            arrays[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            arrays[key] = rng.normal(size=shape).astype(np.float32)
    return arrays


def _filled(model, x, seed=1, **kwargs):
    """Variables of `model` with random values that keep the signal alive through ~100 layers
    (He-scaled kernels, BatchNorm close to the identity)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False, **kwargs))
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(flax.core.unfreeze(shapes))
    filled = {}
    for key, leaf in flat.items():
        noise = rng.normal(size=leaf.shape)
        if key[-1] == "kernel":
            values = noise * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
        elif key[-1] in ("scale", "var"):
            values = 1.0 + 0.1 * np.abs(noise)
        else:
            values = 0.1 * noise
        filled[key] = jnp.asarray(values, leaf.dtype)
    return traverse_util.unflatten_dict(filled)


def _num_params(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------------------


def test_full_size_model_has_torchvision_parameter_count():
    convs, features = _reference_convs()
    backbone = sum(cout * cin * kh * kw + 2 * cout for _, cin, cout, kh, kw in convs)
    assert features == 2048 == inception_feature_dim()
    assert backbone == 21_785_568
    assert backbone + 2048 * 1000 + 1000 == 23_834_568  # torchvision's 27,161,264 less AuxLogits.

    x = jnp.zeros((1, 299, 299, 3))
    shapes = jax.eval_shape(lambda: InceptionV3().init(jax.random.key(0), x, train=False))
    assert _num_params(shapes["params"]) == 23_834_568
    assert _num_params(shapes["batch_stats"]) == 2 * sum(spec[2] for spec in convs)
    no_head = InceptionV3(num_classes=0)
    shapes = jax.eval_shape(lambda: no_head.init(jax.random.key(0), x, train=False))
    assert _num_params(shapes["params"]) == 21_785_568
    out = jax.eval_shape(lambda v: no_head.apply(v, x, train=False), shapes)
    assert out.shape == (1, 2048)
    assert inception_feature_dim(4) == 256


def test_mappings_cover_exactly_the_torchvision_and_keras_keys():
    shapes = _torchvision_shapes(32, 1000)
    parameters = [
        shape
        for key, shape in shapes.items()
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked"))
    ]
    assert sum(int(np.prod(shape)) for shape in parameters) == 27_161_264  # torchvision's count.
    mapping = pretrained.inception_mapping()
    expected = {key for key in shapes if not key.endswith("num_batches_tracked")}
    assert sorted(entry.source_key for entry in mapping) == sorted(expected)

    keras = pretrained.inception_mapping(source="keras")
    layers = {f"conv2d_{k}/kernel" for k in range(1, 95)} | {
        "predictions/kernel",
        "predictions/bias",
    }
    for k in range(1, 95):
        layers |= {
            f"batch_normalization_{k}/{w}" for w in ("beta", "moving_mean", "moving_variance")
        }
    assert {e.source_key for e in keras if e.layout != pretrained.ONES} == layers
    assert sum(e.layout == pretrained.ONES for e in keras) == 94


def test_padding_modes_and_minimum_size():
    valid = InceptionV3(width=4, num_classes=0)
    small = jnp.zeros((1, 75, 75, 1))
    shapes = jax.eval_shape(lambda: valid.init(jax.random.key(0), small, train=False))
    assert jax.eval_shape(lambda v: valid.apply(v, small, train=False), shapes).shape == (1, 256)
    with pytest.raises(ValueError, match="at least 75x75"):
        jax.eval_shape(
            lambda: valid.init(jax.random.key(0), jnp.zeros((1, 74, 80, 1)), train=False)
        )

    same = InceptionV3(width=4, num_classes=0, padding="same")  # Computed in the CNN-RNN test.
    x = jnp.zeros((2, 5, 5, 1))
    shapes = jax.eval_shape(lambda: same.init(jax.random.key(0), x, train=False))
    out = jax.eval_shape(lambda v: same.apply(v, x, train=False), shapes)
    assert out.shape == (2, 256) and out.dtype == jnp.float32
    with pytest.raises(ValueError, match="padding"):
        InceptionV3(padding="full").init(jax.random.key(0), x, train=False)


def test_basic_conv_uses_batchnorm_epsilon_of_torchvision():
    layer = BasicConv2d(2, (1, 1))
    x = jnp.array([[[[1.0, -2.0]]]])
    variables = {
        "params": {
            "conv": {"kernel": jnp.eye(2)[None, None]},
            "bn": {"scale": jnp.ones(2), "bias": jnp.zeros(2)},
        },
        "batch_stats": {"bn": {"mean": jnp.zeros(2), "var": jnp.full(2, 0.001)}},
    }
    out = layer.apply(variables, x, train=False)
    np.testing.assert_allclose(out[0, 0, 0], [1.0 / np.sqrt(0.002), 0.0], rtol=1e-5)


def test_torchvision_file_loads_strictly_with_layouts_and_statistics(tmp_path):
    arrays = _torchvision_state_dict(width=4, num_classes=10)
    path = tmp_path / "inception_v3.npz"
    np.savez(path, **arrays)
    model = InceptionV3(width=4, num_classes=10)
    variables = _filled(model, jnp.zeros((1, 75, 75, 1)))
    loaded, report = pretrained.load_pretrained(variables, path, model_name="inception_v3")

    params, stats = loaded["params"], loaded["batch_stats"]
    np.testing.assert_allclose(  # RGB kernel summed for the grey model, OIHW -> HWIO.
        params["Conv2d_1a_3x3"]["conv"]["kernel"],
        arrays["Conv2d_1a_3x3.conv.weight"].sum(axis=1, keepdims=True).transpose(2, 3, 1, 0),
        rtol=1e-6,
    )
    kernel = params["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
    assert kernel.shape[:2] == (1, 7)
    np.testing.assert_array_equal(
        kernel, arrays["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        params["Mixed_7b"]["branch3x3_2b"]["conv"]["kernel"],
        arrays["Mixed_7b.branch3x3_2b.conv.weight"].transpose(2, 3, 1, 0),
    )
    bn = "Mixed_7c.branch_pool.bn"
    np.testing.assert_array_equal(
        params["Mixed_7c"]["branch_pool"]["bn"]["scale"], arrays[f"{bn}.weight"]
    )
    np.testing.assert_array_equal(
        stats["Mixed_7c"]["branch_pool"]["bn"]["mean"], arrays[f"{bn}.running_mean"]
    )
    np.testing.assert_array_equal(
        stats["Mixed_7c"]["branch_pool"]["bn"]["var"], arrays[f"{bn}.running_var"]
    )
    np.testing.assert_array_equal(params["head"]["kernel"], arrays["fc.weight"].T)
    assert report.reinitialized == [] and not report.head_reinitialized
    assert any(item.startswith("AuxLogits.conv1.conv.weight") for item in report.skipped)
    assert any("[-1, 1]" in note for note in report.notes)

    broken = dict(arrays)
    del broken["Mixed_5c.branch5x5_2.bn.running_var"]
    np.savez(tmp_path / "broken.npz", **broken)
    with pytest.raises(ValueError, match="Mixed_5c.branch5x5_2.bn.running_var"):
        pretrained.load_pretrained(variables, tmp_path / "broken.npz", model_name="inception_v3")

    # The CNN-RNN holds the network as `backbone`; its sequence head is not ImageNet's fc.
    cnn_rnn = CnnRnnClassifier(width=4, hidden=8)
    cnn_variables = _filled(cnn_rnn, jnp.zeros((1, 2, 16, 16, 1)))
    loaded, report = pretrained.load_pretrained(cnn_variables, path, model_name="inception_v3")
    np.testing.assert_array_equal(
        loaded["batch_stats"]["backbone"]["Mixed_5b"]["branch1x1"]["bn"]["mean"],
        arrays["Mixed_5b.branch1x1.bn.running_mean"],
    )
    assert report.reinitialized and all(k.startswith("params/head/") for k in report.reinitialized)
    assert any(item.startswith("fc.weight") for item in report.skipped)


def _write_keras_h5(path, arrays):
    """Writes "layer/weight" arrays in the layout of Keras' save_weights (.h5)."""
    h5py = pytest.importorskip("h5py")
    layers = {"input_1": []}
    for key, array in arrays.items():
        layer, weight = key.split("/")
        layers.setdefault(layer, []).append((f"{layer}/{weight}:0", array))
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([name.encode() for name in layers])
        for layer, weights in layers.items():
            group = f.create_group(layer)
            group.attrs["weight_names"] = np.array([name.encode() for name, _ in weights])
            for name, array in weights:
                group.create_dataset(name, data=array)


def test_keras_file_maps_layers_by_creation_order_and_sets_scales_to_one(tmp_path):
    rng = np.random.default_rng(0)
    convs, features = _reference_convs(width=4)
    assert len(convs) == 94
    arrays = {}
    for k, (_, cin, cout, kh, kw) in enumerate(convs, start=1):
        arrays[f"conv2d_{k}/kernel"] = rng.normal(size=(kh, kw, cin, cout)).astype(np.float32)
        for weight in ("beta", "moving_mean", "moving_variance"):
            arrays[f"batch_normalization_{k}/{weight}"] = rng.uniform(0.5, 1.5, cout).astype(
                np.float32
            )
    arrays["predictions/kernel"] = rng.normal(size=(features, 10)).astype(np.float32)
    arrays["predictions/bias"] = rng.normal(size=10).astype(np.float32)
    path = tmp_path / "inception_v3_weights.h5"
    _write_keras_h5(path, arrays)

    model = InceptionV3(width=4, num_classes=10, pool_count_include_pad=False)
    variables = _filled(model, jnp.zeros((1, 75, 75, 3)))
    loaded, report = pretrained.load_pretrained(variables, path, model_name="inception_v3")
    params = loaded["params"]
    # Keras' 31st conv is the first of Mixed_6b (stem 5, Mixed_5b-5d 3 x 7, Mixed_6a 4).
    np.testing.assert_array_equal(
        params["Mixed_6b"]["branch1x1"]["conv"]["kernel"], arrays["conv2d_31/kernel"]
    )
    np.testing.assert_array_equal(
        params["Mixed_7c"]["branch3x3dbl_3a"]["conv"]["kernel"], arrays["conv2d_92/kernel"]
    )
    np.testing.assert_array_equal(
        loaded["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"],
        arrays["batch_normalization_94/moving_variance"],
    )
    scales = [v for k, v in traverse_util.flatten_dict(params).items() if k[-1] == "scale"]
    assert len(scales) == 94 and all(bool(jnp.all(s == 1.0)) for s in scales)
    assert report.reinitialized == []
    assert any("pool_count_include_pad=False" in note for note in report.notes)


def test_cached_feature_head_equals_the_full_model_and_crops_are_quadrants():
    model = CnnRnnClassifier(width=4, hidden=8, projection_dim=6, quadrant_mode="crops")
    rng = np.random.default_rng(0)
    patch = rng.normal(size=(2, 3, 8, 8, 1)).astype(np.float32)
    frames = np.zeros((2, 3, 16, 16, 1), np.float32)
    frames[:, :, :8, :8] = patch  # q1 and q4 show the same content, q2 and q3 are empty.
    frames[:, :, 8:, 8:] = patch
    frames = jnp.asarray(frames)
    variables = _filled(model, frames)

    head = model.sequence_head()
    head_params = _filled(head, jnp.zeros((2, 3, 4, 256)), seed=7)["params"]
    assert jax.tree.structure(head_params) == jax.tree.structure(variables["params"]["head"])
    combined = {
        "params": {"backbone": variables["params"]["backbone"], "head": head_params},
        "batch_stats": variables["batch_stats"],
    }

    @jax.jit
    def cache_then_full_model(variables, frames):
        features = frame_features(model, variables, frames)
        full, updates = model.apply(variables, frames, train=True, mutable=["batch_stats"])
        return features, full, updates

    features, full, updates = cache_then_full_model(combined, frames)
    assert features.shape == (2, 3, 4, 256)  # q1 .. q4, row by row.
    np.testing.assert_allclose(features[:, :, 0], features[:, :, 3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(features[:, :, 1], features[:, :, 2], rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(features[:, :, 0] - features[:, :, 1]))) > 1e-3

    from_cache = head.apply({"params": head_params}, features, train=False)
    assert full["video_logits"].shape == (2, 4) and full["quadrant_logits"].shape == (2, 4, 3)
    for key in ("video_logits", "quadrant_logits"):
        np.testing.assert_allclose(full[key], from_cache[key], rtol=1e-4, atol=1e-5)
    # Frozen BatchNorm: training does not move the ImageNet statistics.
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])

    with pytest.raises(ValueError, match=r"\(B, T, 1, F\)"):
        CnnRnnClassifier(quadrant_mode="sequence").sequence_head().init(
            jax.random.key(0), features, train=False
        )


def test_crops_training_statistics_are_one_pass_over_the_crops():
    """A backbone trained or calibrated on crops keeps statistics of crops only: its running
    averages move once per call, by the statistics of the batch of all quadrant crops."""
    model = CnnRnnClassifier(width=4, hidden=8, quadrant_mode="crops", freeze_backbone_bn=False)
    frames = jnp.asarray(np.random.default_rng(3).normal(size=(2, 3, 16, 16, 1)), jnp.float32)
    variables = _filled(model, frames)
    _, updates = model.apply(variables, frames, train=True, mutable=["batch_stats"])
    crops = jnp.stack(
        [frames[:, :, r : r + 8, c : c + 8] for r in (0, 8) for c in (0, 8)], axis=2
    ).reshape(-1, 8, 8, 1)
    backbone = InceptionV3(width=4, num_classes=0, padding="SAME")
    _, expected = backbone.apply(
        {
            "params": variables["params"]["backbone"],
            "batch_stats": variables["batch_stats"]["backbone"],
        },
        crops,
        train=True,
        method=InceptionV3.features,
        mutable=["batch_stats"],
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        updates["batch_stats"]["backbone"],
        expected["batch_stats"],
    )
    moved = jax.tree.leaves(
        jax.tree.map(
            lambda a, b: float(jnp.max(jnp.abs(a - b))),
            updates["batch_stats"],
            variables["batch_stats"],
        )
    )
    assert max(moved) > 1e-3


def test_registry_and_finetuning_groups():
    config = ml_collections.ConfigDict(
        {"name": "cnn_rnn", "width": 4, "hidden": 8, "init_from": "", "freeze_backbone_steps": 5}
    )
    model = models.build_model(config)
    assert isinstance(model, CnnRnnClassifier) and model.hidden == 8
    assert models.pretrained_name(config) == "inception_v3"
    inception = ml_collections.ConfigDict({"name": "inception_v3", "width": 4, "num_classes": 0})
    assert isinstance(models.build_model(inception), InceptionV3)
    assert models.pretrained_name(inception) == "inception_v3"

    variables = _filled(model, jnp.zeros((1, 2, 16, 16, 1)))
    mask = pretrained.backbone_mask(variables["params"])
    assert all(jax.tree.leaves(mask["backbone"])) and not any(jax.tree.leaves(mask["head"]))
