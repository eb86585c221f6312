"""Tests for medjax.models.resnet and medjax.models.vgg: feature shapes and strides, logits,
torchvision parameter counts, adaptive pooling, dropout, and the model registry."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medjax import models
from medjax.models.resnet import ResNet, ResNetClassifier
from medjax.models.vgg import VGG, adaptive_avg_pool

# XLA:CPU compiles the default threefry PRNG slowly; "rbg" keeps real initialisation fast.
_INIT_KEY = jax.random.key(0, impl="rbg")

# torchvision's parameter counts (sum of numel over model.parameters()).
_TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "vgg11": 132_863_336,
    "vgg11_bn": 132_868_840,
    "vgg13": 133_047_848,
    "vgg13_bn": 133_053_736,
    "vgg16": 138_357_544,
    "vgg16_bn": 138_365_992,
    "vgg19": 143_667_240,
    "vgg19_bn": 143_678_248,
}


def _abstract(model, x, train=False):
    """Initialises and applies `model` abstractly (shapes only, no compute).

    Args:
      model: a Flax module.
      x: input array.
      train: forwarded to the model.

    Returns:
      Tuple (variables, output) of ShapeDtypeStruct trees.
    """
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    mutable = ["batch_stats"] if train else False
    out = jax.eval_shape(
        lambda v, x: model.apply(
            v, x, train=train, mutable=mutable, rngs={"dropout": jax.random.key(1)}
        ),
        variables,
        x,
    )
    return variables, (out[0] if train else out)


def _num_params(variables):
    """Number of scalars in the ``params`` collection.

    Args:
      variables: variables (arrays or ShapeDtypeStructs).

    Returns:
      The count.
    """
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_resnet_feature_shapes_and_strides(depth):
    """Every feature map has the documented stride and channel count."""
    model = ResNet(depth=depth, width=8)
    _, features = _abstract(model, jnp.ones((2, 64, 96, 3)))
    expansion = 4 if depth == 50 else 1
    expected_strides = {"stem": 2, "c2": 4, "c3": 8, "c4": 16, "c5": 32}
    expected_channels = {
        "stem": 8,
        "c2": 8 * expansion,
        "c3": 16 * expansion,
        "c4": 32 * expansion,
        "c5": 64 * expansion,
    }
    assert model.feature_strides() == expected_strides
    assert model.feature_channels() == expected_channels
    assert set(features) == set(expected_strides)
    for key, stride in expected_strides.items():
        assert features[key].shape == (2, 64 // stride, 96 // stride, expected_channels[key])
        assert features[key].dtype == jnp.float32


def test_resnet_odd_input_follows_pytorch_arithmetic():
    """Sizes follow PyTorch's floor((n + 2p - k) / s) + 1 with symmetric padding."""
    _, features = _abstract(ResNet(depth=18, width=4), jnp.ones((1, 33, 50, 1)))
    # 33 -> conv1 17 -> maxpool 9 -> 5 -> 3 -> 2;  50 -> 25 -> 13 -> 7 -> 4 -> 2.
    assert features["stem"].shape[1:3] == (17, 25)
    assert [features[k].shape[1:3] for k in ("c2", "c3", "c4", "c5")] == [
        (9, 13),
        (5, 7),
        (3, 4),
        (2, 2),
    ]


@pytest.mark.parametrize(
    "flags,strides",
    [
        ((False, True, True), {"c3": 8, "c4": 8, "c5": 8}),
        ((False, False, True), {"c3": 8, "c4": 16, "c5": 16}),
    ],
)
@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_dilation_sets_output_stride(depth, flags, strides):
    """replace_stride_with_dilation keeps the resolution of the dilated stages."""
    model = ResNet(depth=depth, width=4, replace_stride_with_dilation=flags)
    variables, features = _abstract(model, jnp.ones((1, 64, 64, 3)))
    assert {k: model.feature_strides()[k] for k in strides} == strides
    for key, stride in strides.items():
        assert features[key].shape[1:3] == (64 // stride, 64 // stride)
    plain, _ = _abstract(ResNet(depth=depth, width=4), jnp.ones((1, 64, 64, 3)))
    # Dilation changes no parameter shape: the same (pretrained) weights fit.
    assert jax.tree.map(lambda a: a.shape, variables) == jax.tree.map(lambda a: a.shape, plain)


def test_resnet_bad_configuration_raises():
    """Unknown depth, norm or a wrong dilation tuple raise ValueError naming the value."""
    x = jnp.ones((1, 32, 32, 3))
    with pytest.raises(ValueError, match="depth=101"):
        _abstract(ResNet(depth=101, width=4), x)
    with pytest.raises(ValueError, match="layer"):
        _abstract(ResNet(depth=18, width=4, norm="layer"), x)
    with pytest.raises(ValueError, match="3 flags"):
        _abstract(ResNet(depth=18, width=4, replace_stride_with_dilation=(True,)), x)
    with pytest.raises(ValueError, match=r"\(32, 32, 3\)"):
        _abstract(ResNet(depth=18, width=4), jnp.ones((32, 32, 3)))


@pytest.mark.parametrize("norm", ["group", "none"])
def test_resnet_other_norms(norm):
    """GroupNorm and no norm have no batch_stats; without norm the convs get a bias."""
    variables, features = _abstract(ResNet(depth=18, width=8, norm=norm), jnp.ones((1, 32, 32, 2)))
    assert "batch_stats" not in variables
    assert ("bias" in variables["params"]["conv1"]) == (norm == "none")
    assert features["c5"].shape == (1, 1, 1, 64)


def test_stride_in_1x1_keeps_parameter_shapes():
    """Keras-style ResNet v1 strides differently but has the same parameters and outputs."""
    x = jnp.ones((1, 64, 64, 3))
    v1, f1 = _abstract(ResNet(depth=50, width=4, stride_in_1x1=True), x)
    v15, f15 = _abstract(ResNet(depth=50, width=4), x)
    assert jax.tree.map(lambda a: a.shape, v1) == jax.tree.map(lambda a: a.shape, v15)
    assert jax.tree.map(lambda a: a.shape, f1) == jax.tree.map(lambda a: a.shape, f15)


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_resnet_classifier_logits_and_names(depth):
    """Logits are (B, num_classes) float32 with bf16 compute; names mirror torchvision."""
    model = ResNetClassifier(depth=depth, width=8, num_classes=5, dtype=jnp.bfloat16)
    variables, logits = _abstract(model, jnp.ones((3, 32, 32, 1)), train=True)
    assert logits.shape == (3, 5) and logits.dtype == jnp.float32
    params = variables["params"]
    assert set(params) == {"backbone", "head"}
    assert params["head"]["kernel"].shape == (64 * (4 if depth == 50 else 1), 5)
    assert params["backbone"]["conv1"]["kernel"].shape == (7, 7, 1, 8)
    assert "downsample_conv" in params["backbone"]["layer2_0"]
    assert ("downsample_conv" in params["backbone"]["layer1_0"]) == (depth == 50)
    assert "layer4_1" in params["backbone"] and "layer1_0" in variables["batch_stats"]["backbone"]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))


@pytest.mark.parametrize("name", sorted(_TORCHVISION_PARAMS))
def test_full_size_parameter_counts_equal_torchvision(name):
    """The standard-width models have exactly torchvision's number of parameters."""
    if name.startswith("resnet"):
        model = ResNetClassifier(depth=int(name[6:]), num_classes=1000)
    else:
        depth = int(name[3:5])
        model = VGG(depth=depth, batch_norm=name.endswith("_bn"), classifier="fc")
    variables, logits = _abstract(model, jnp.ones((1, 32, 32, 3)))
    assert logits.shape == (1, 1000)
    assert _num_params(variables) == _TORCHVISION_PARAMS[name]


@pytest.mark.parametrize("classifier", ["gap", "fc"])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg_logits_and_names(classifier, batch_norm):
    """VGG logits are (B, num_classes) float32; Keras-style names; BN only for _bn."""
    model = VGG(
        depth=16,
        batch_norm=batch_norm,
        width=8,
        num_classes=3,
        classifier=classifier,
        fc_features=32,
        dtype=jnp.bfloat16,
    )
    variables, logits = _abstract(model, jnp.ones((2, 40, 48, 1)), train=batch_norm)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    params = variables["params"]
    assert params["block1_conv1"]["kernel"].shape == (3, 3, 1, 8)
    assert params["block5_conv3"]["kernel"].shape == (3, 3, 64, 64)
    assert ("block5_bn3" in params) == batch_norm
    assert ("batch_stats" in variables) == batch_norm
    if classifier == "fc":
        assert params["fc1"]["kernel"].shape == (7 * 7 * 64, 32)
        assert params["head"]["kernel"].shape == (32, 3)
    else:
        assert "fc1" not in params and params["head"]["kernel"].shape == (64, 3)


def test_vgg_bad_configuration_raises():
    """Small inputs, unknown depth and classifier raise ValueError."""
    with pytest.raises(ValueError, match="at least 32"):
        _abstract(VGG(width=4), jnp.ones((1, 31, 64, 3)))
    with pytest.raises(ValueError, match="depth=15"):
        _abstract(VGG(depth=15, width=4), jnp.ones((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="'mlp'"):
        _abstract(VGG(width=4, classifier="mlp"), jnp.ones((1, 32, 32, 3)))


def test_adaptive_avg_pool_matches_pytorch_bins():
    """Cell i averages rows floor(i*n/7) .. ceil((i+1)*n/7)-1, as torch's adaptive pool."""
    x = np.random.default_rng(0).normal(size=(2, 10, 3, 4)).astype(np.float32)
    y = np.asarray(adaptive_avg_pool(jnp.asarray(x), (7, 7)))
    expected = np.zeros((2, 7, 7, 4), np.float32)
    for i in range(7):
        r0, r1 = (i * 10) // 7, -(-((i + 1) * 10) // 7)
        for j in range(7):
            c0, c1 = (j * 3) // 7, -(-((j + 1) * 3) // 7)
            expected[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    same_size = jnp.asarray(x)
    assert adaptive_avg_pool(same_size, (10, 3)) is same_size


def test_vgg_dropout_uses_dropout_rng_only_in_train_mode():
    """train=True draws dropout masks from the 'dropout' rng; eval is deterministic."""
    model = VGG(depth=11, width=4, num_classes=4, dropout_rate=0.5)
    x = jax.random.normal(_INIT_KEY, (2, 32, 32, 3))
    variables = model.init(_INIT_KEY, x, train=False)
    apply = jax.jit(
        lambda key: model.apply(variables, x, train=True, rngs={"dropout": key}),
    )
    a, b = apply(jax.random.key(1, impl="rbg")), apply(jax.random.key(2, impl="rbg"))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(
        model.apply(variables, x, train=False), model.apply(variables, x, train=False)
    )


def test_resnet_train_mode_updates_batch_stats():
    """A real train-mode step on a tiny ResNet-18 updates the running statistics."""
    model = ResNetClassifier(depth=18, width=4, num_classes=2)
    x = jax.random.normal(_INIT_KEY, (2, 32, 32, 3))
    variables = model.init(_INIT_KEY, x, train=False)
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert np.isfinite(np.asarray(logits)).all()
    before = variables["batch_stats"]["backbone"]["bn1"]["mean"]
    after = updates["batch_stats"]["backbone"]["bn1"]["mean"]
    assert not np.allclose(before, after)


@pytest.mark.parametrize(
    "name,cls,attrs",
    [
        ("resnet18", ResNetClassifier, {"depth": 18}),
        ("resnet34", ResNetClassifier, {"depth": 34}),
        ("resnet50", ResNetClassifier, {"depth": 50}),
        ("vgg16", VGG, {"depth": 16, "batch_norm": False}),
        ("vgg16_bn", VGG, {"depth": 16, "batch_norm": True}),
    ],
)
def test_registry_builds_models_and_drops_trainer_keys(name, cls, attrs):
    """build_model knows the new names and drops init_from & co. (not module attributes)."""
    config = ml_collections.ConfigDict(
        {
            "name": name,
            "width": 8,
            "init_from": "/data/weights.npz",
            "freeze_backbone_steps": 10,
            "backbone_lr_multiplier": 0.1,
        }
    )
    model = models.build_model(config, num_classes=3)
    assert isinstance(model, cls)
    assert model.width == 8 and model.num_classes == 3
    for attr, value in attrs.items():
        assert getattr(model, attr) == value
    config.unlock()
    config.colour = "red"
    with pytest.raises(ValueError, match="colour"):
        models.build_model(config)
