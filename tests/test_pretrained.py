"""Tests for medjax.models.pretrained: torchvision (.npz, .safetensors) and Keras (.h5) files with
the real key names and shapes load into ResNet / VGG, strict errors, and fine-tuning helpers.

The weight files are written here with random values; their key lists are generated from the
torchvision and Keras architectures independently of the mapping under test (and checked
against torchvision's parameter counts).
"""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax.models import pretrained
from medjax.models.resnet import ResNet, ResNetClassifier
from medjax.models.vgg import VGG

_RESNET_STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}
_VGG_CONVS = {16: (2, 2, 3, 3, 3)}
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


# ------------------------------------------------------------------------------------------
# Key lists of the reference architectures.


def _torch_bn(shapes, name, channels):
    """Adds the five entries of a torch BatchNorm2d state dict."""
    for suffix in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{name}.{suffix}"] = (channels,)
    shapes[f"{name}.num_batches_tracked"] = ()


def _torchvision_resnet(depth, width=64, in_channels=3, num_classes=1000):
    """Key -> shape of torchvision's resnet{depth} state dict (scaled by width / 64)."""
    shapes = {"conv1.weight": (width, in_channels, 7, 7)}
    _torch_bn(shapes, "bn1", width)
    expansion = 4 if depth == 50 else 1
    inplanes = width
    for stage, num_blocks in enumerate(_RESNET_STAGES[depth]):
        planes = width * 2**stage
        for index in range(num_blocks):
            block = f"layer{stage + 1}.{index}"
            if depth == 50:
                convs = [(planes, inplanes, 1), (planes, planes, 3), (planes * 4, planes, 1)]
            else:
                convs = [(planes, inplanes, 3), (planes, planes, 3)]
            for k, (out_c, in_c, size) in enumerate(convs, start=1):
                shapes[f"{block}.conv{k}.weight"] = (out_c, in_c, size, size)
                _torch_bn(shapes, f"{block}.bn{k}", out_c)
            if index == 0 and (stage > 0 or inplanes != planes * expansion):
                shapes[f"{block}.downsample.0.weight"] = (planes * expansion, inplanes, 1, 1)
                _torch_bn(shapes, f"{block}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    shapes["fc.weight"] = (num_classes, inplanes)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def _torchvision_vgg16(batch_norm, width=64, fc_features=4096, num_classes=1000, in_channels=3):
    """Key -> shape of torchvision's vgg16 / vgg16_bn state dict (scaled)."""
    shapes, layer, in_c = {}, 0, in_channels
    for block, num_convs in enumerate(_VGG_CONVS[16]):
        out_c = (64, 128, 256, 512, 512)[block] * width // 64
        for _ in range(num_convs):
            shapes[f"features.{layer}.weight"] = (out_c, in_c, 3, 3)
            shapes[f"features.{layer}.bias"] = (out_c,)
            layer += 1
            if batch_norm:
                _torch_bn(shapes, f"features.{layer}", out_c)
                layer += 1
            layer += 1  # ReLU
            in_c = out_c
        layer += 1  # MaxPool
    for index, (out_f, in_f) in zip(
        (0, 3, 6),
        ((fc_features, in_c * 49), (fc_features, fc_features), (num_classes, fc_features)),
    ):
        shapes[f"classifier.{index}.weight"] = (out_f, in_f)
        shapes[f"classifier.{index}.bias"] = (out_f,)
    return shapes


def _keras_vgg16(width=8, fc_features=32, num_classes=10, include_top=True):
    """Key ("layer/weight") -> shape of keras.applications.VGG16 (scaled)."""
    shapes, in_c = {}, 3
    for block, num_convs in enumerate(_VGG_CONVS[16], start=1):
        out_c = (64, 128, 256, 512, 512)[block - 1] * width // 64
        for index in range(1, num_convs + 1):
            shapes[f"block{block}_conv{index}/kernel"] = (3, 3, in_c, out_c)
            shapes[f"block{block}_conv{index}/bias"] = (out_c,)
            in_c = out_c
    if include_top:
        dense = {"fc1": (49 * in_c, fc_features), "fc2": (fc_features, fc_features)}
        dense["predictions"] = (fc_features, num_classes)
        for name, (in_f, out_f) in dense.items():
            shapes[f"{name}/kernel"] = (in_f, out_f)
            shapes[f"{name}/bias"] = (out_f,)
    return shapes


def _keras_resnet50(width=8, num_classes=1000):
    """Key ("layer/weight") -> shape of keras.applications.ResNet50 (scaled)."""
    shapes = {}

    def conv_bn(name, size, in_c, out_c):
        shapes[f"{name}_conv/kernel"] = (size, size, in_c, out_c)
        shapes[f"{name}_conv/bias"] = (out_c,)
        for weight in ("gamma", "beta", "moving_mean", "moving_variance"):
            shapes[f"{name}_bn/{weight}"] = (out_c,)

    conv_bn("conv1", 7, 3, width)
    in_c = width
    for stage, num_blocks in enumerate(_RESNET_STAGES[50]):
        filters = width * 2**stage
        for index in range(1, num_blocks + 1):
            name = f"conv{stage + 2}_block{index}"
            if index == 1:
                conv_bn(f"{name}_0", 1, in_c, 4 * filters)
            conv_bn(f"{name}_1", 1, in_c, filters)
            conv_bn(f"{name}_2", 3, filters, filters)
            conv_bn(f"{name}_3", 1, filters, 4 * filters)
            in_c = 4 * filters
    shapes["predictions/kernel"] = (in_c, num_classes)
    shapes["predictions/bias"] = (num_classes,)
    return shapes


# ------------------------------------------------------------------------------------------
# Files and variables.


def _random_arrays(shapes, seed=0, keras=False):
    """Random weights of the given shapes, He-scaled so deep activations stay moderate."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            arrays[key] = np.array(7, np.int64)
        elif key.endswith(("running_var", "moving_variance")):
            arrays[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif len(shape) >= 2:
            fan_in = int(np.prod(shape[:-1] if keras else shape[1:]))
            arrays[key] = (rng.normal(size=shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        else:
            arrays[key] = rng.normal(scale=0.1, size=shape).astype(np.float32)
    return arrays


def _write_safetensors(path, arrays):
    """Writes `arrays` in the safetensors format (header length, JSON header, raw bytes)."""
    names = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for key, array in arrays.items():
        raw = np.ascontiguousarray(array).tobytes()
        header[key] = {
            "dtype": names[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + b"".join(blobs))
    return path


def _write_npz(path, arrays):
    """Writes `arrays` with numpy.savez under their exact key names."""
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def _write_keras_h5(path, arrays):
    """Writes `arrays` ("layer/weight" keys) in the layout of Keras' save_weights (.h5)."""
    h5py = pytest.importorskip("h5py")
    layers = {"input_1": []}  # Keras lists weightless layers too.
    for key, array in arrays.items():
        layer, weight = key.split("/")
        layers.setdefault(layer, []).append((f"{layer}/{weight}:0", array))
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([name.encode() for name in layers])
        f.attrs["backend"] = b"tensorflow"
        for layer, weights in layers.items():
            group = f.create_group(layer)
            group.attrs["weight_names"] = np.array([name.encode() for name, _ in weights])
            for name, array in weights:
                group.create_dataset(name, data=array)
    return path


def _initialised(model, x, seed=1):
    """Stand-in for `model.init`: variables of the right shapes with random values.

    (A real eager `init` of a full-size ResNet takes seconds on CPU; loading only needs the
    structure, shapes and dtypes.)
    """
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)


def _torch_conv2d(x, weight, bias=None, stride=1, padding=0):
    """PyTorch's conv2d (cross-correlation, symmetric zero padding) in numpy, NHWC input."""
    n, h, w, _ = x.shape
    out_c, _, kh, kw = weight.shape
    padded = np.pad(x.astype(np.float64), ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    oh, ow = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    out = np.zeros((n, oh, ow, out_c))
    for i in range(kh):
        for j in range(kw):
            patch = padded[
                :, i : i + stride * (oh - 1) + 1 : stride, j : j + stride * (ow - 1) + 1 : stride
            ]
            out += patch @ weight[:, :, i, j].T.astype(np.float64)
    return out if bias is None else out + bias


def _captured(model, variables, x, names):
    """Outputs of the submodules called `names`, from a forward pass in eval mode."""
    _, state = model.apply(
        variables,
        x,
        train=False,
        capture_intermediates=lambda module, _: module.name in names,
        mutable=["intermediates"],
    )
    return state["intermediates"]


def _close(actual, expected):
    """Asserts equality up to float32 rounding relative to the largest magnitude."""
    expected = np.asarray(expected)
    np.testing.assert_allclose(
        np.asarray(actual), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
    )


@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory):
    """Full-size resnet18 state dict (random values) as .npz and .safetensors."""
    arrays = _random_arrays(_torchvision_resnet(18))
    folder = tmp_path_factory.mktemp("resnet18")
    return (
        arrays,
        _write_npz(folder / "resnet18.npz", arrays),
        _write_safetensors(folder / "resnet18.safetensors", arrays),
    )


@pytest.fixture(scope="module")
def small_resnet18():
    """Width-8 resnet18 state dict (random values) and matching variables."""
    model = ResNetClassifier(depth=18, width=8, num_classes=1000)
    return _random_arrays(_torchvision_resnet(18, width=8)), model


# ------------------------------------------------------------------------------------------
# Mapping completeness.


@pytest.mark.parametrize(
    "name,count",
    [
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
        ("vgg16", 138_357_544),
        ("vgg16_bn", 138_365_992),
    ],
)
def test_mapping_covers_exactly_the_torchvision_keys(name, count):
    """The generated key lists are torchvision's (parameter counts), and the mapping knows
    exactly those keys (num_batches_tracked aside)."""
    if name.startswith("resnet"):
        shapes = _torchvision_resnet(int(name[6:]))
        mapping = pretrained.resnet_mapping(int(name[6:]))
    else:
        shapes = _torchvision_vgg16(batch_norm=name.endswith("_bn"))
        mapping = pretrained.vgg_mapping(16, batch_norm=name.endswith("_bn"))
    parameters = [s for k, s in shapes.items() if not k.endswith(_BN_BUFFERS)]
    assert sum(int(np.prod(s)) for s in parameters) == count
    expected = {k for k in shapes if not k.endswith("num_batches_tracked")}
    assert sorted(e.source_key for e in mapping) == sorted(expected)


def test_keras_mappings_cover_exactly_the_keras_keys():
    """Keras VGG16 and ResNet50 layer names are all known to the mapping."""
    vgg = {e.source_key for e in pretrained.vgg_mapping(16, source="keras")}
    assert vgg == set(_keras_vgg16())
    resnet = {e.source_key for e in pretrained.resnet_mapping(50, source="keras")}
    assert resnet == set(_keras_resnet50())
    with pytest.raises(ValueError, match="ResNet-18"):
        pretrained.resnet_mapping(18, source="keras")


# ------------------------------------------------------------------------------------------
# torchvision ResNet.


def test_resnet18_npz_loads_and_conv1_matches_numpy(resnet18_files):
    """Every array lands where torchvision's would act: conv1 output equals a numpy
    stride-2 / padding-3 convolution, bn1 applies the running statistics, the head is fc."""
    arrays, npz_path, _ = resnet18_files
    model = ResNetClassifier(depth=18, num_classes=1000)
    x = np.random.default_rng(2).normal(size=(1, 20, 18, 3)).astype(np.float32)
    variables, report = pretrained.load_pretrained(
        _initialised(model, x), npz_path, model_name="resnet18", num_classes=1000
    )
    assert report.reinitialized == [] and not report.head_reinitialized
    assert len(report.loaded) == len([k for k in arrays if not k.endswith("tracked")])
    assert str(npz_path) in report.summary()

    params, stats = variables["params"]["backbone"], variables["batch_stats"]["backbone"]
    np.testing.assert_array_equal(stats["bn1"]["mean"], arrays["bn1.running_mean"])
    np.testing.assert_array_equal(
        stats["layer3_1"]["bn2"]["var"], arrays["layer3.1.bn2.running_var"]
    )
    np.testing.assert_array_equal(
        stats["layer2_0"]["downsample_bn"]["mean"], arrays["layer2.0.downsample.1.running_mean"]
    )
    np.testing.assert_array_equal(params["layer4_1"]["bn1"]["scale"], arrays["layer4.1.bn1.weight"])
    np.testing.assert_array_equal(
        params["layer4_0"]["downsample_conv"]["kernel"],
        arrays["layer4.0.downsample.0.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(variables["params"]["head"]["kernel"], arrays["fc.weight"].T)
    np.testing.assert_array_equal(variables["params"]["head"]["bias"], arrays["fc.bias"])

    captured = _captured(model, variables, x, ("conv1", "bn1"))["backbone"]
    conv = _torch_conv2d(x, arrays["conv1.weight"], stride=2, padding=3)
    assert conv.shape == (1, 10, 9, 64)
    _close(captured["conv1"]["__call__"][0], conv)
    bn = (conv - arrays["bn1.running_mean"]) / np.sqrt(arrays["bn1.running_var"] + 1e-5)
    _close(captured["bn1"]["__call__"][0], bn * arrays["bn1.weight"] + arrays["bn1.bias"])


def test_safetensors_loads_the_same_variables_as_npz(resnet18_files):
    """The hand-parsed safetensors file yields exactly the .npz result."""
    _, npz_path, safetensors_path = resnet18_files
    model = ResNetClassifier(depth=18, num_classes=1000)
    initial = _initialised(model, jnp.ones((1, 32, 32, 3)))
    from_npz, _ = pretrained.load_pretrained(initial, npz_path, model_name="resnet18")
    from_st, report = pretrained.load_pretrained(initial, safetensors_path, model_name="resnet18")
    assert report.source == "torchvision"
    jax.tree.map(np.testing.assert_array_equal, from_npz, from_st)


def test_head_reinitialised_when_class_count_differs(resnet18_files):
    """A 5-class model keeps its own head; the report says why; the backbone still loads."""
    arrays, npz_path, _ = resnet18_files
    model = ResNetClassifier(depth=18, num_classes=5)
    initial = _initialised(model, jnp.ones((1, 32, 32, 3)))
    variables, report = pretrained.load_pretrained(initial, npz_path, model_name="resnet18")
    assert report.head_reinitialized
    assert report.reinitialized == ["params/head/bias", "params/head/kernel"]
    assert any("1000 classes" in note and "5" in note for note in report.notes)
    np.testing.assert_array_equal(
        variables["params"]["head"]["kernel"], initial["params"]["head"]["kernel"]
    )
    np.testing.assert_array_equal(
        variables["params"]["backbone"]["conv1"]["kernel"],
        arrays["conv1.weight"].transpose(2, 3, 1, 0),
    )
    with pytest.raises(ValueError, match="num_classes=7.*5 outputs"):
        pretrained.load_pretrained(initial, npz_path, model_name="resnet18", num_classes=7)


def test_bare_backbone_skips_the_fc_keys(resnet18_files):
    """A ResNet without head loads everything else and reports fc.* as skipped."""
    _, npz_path, _ = resnet18_files
    initial = _initialised(ResNet(depth=18), jnp.ones((1, 32, 32, 3)))
    variables, report = pretrained.load_pretrained(initial, npz_path, model_name="resnet18")
    assert report.reinitialized == [] and not report.head_reinitialized
    assert sorted(report.skipped) == [
        "fc.bias (the model has no head)",
        "fc.weight (the model has no head)",
    ]
    assert set(variables) == {"params", "batch_stats"}


def test_one_channel_model_sums_the_rgb_kernel(tmp_path, small_resnet18):
    """A 1-channel model gets conv1 summed over R, G, B (reported), a 2-channel one that sum
    in both of its channels."""
    arrays, model = small_resnet18
    path = _write_npz(tmp_path / "w.npz", arrays)
    initial = _initialised(model, jnp.ones((1, 32, 32, 1)))
    variables, report = pretrained.load_pretrained(initial, path, model_name="resnet18")
    expected = arrays["conv1.weight"].sum(axis=1, keepdims=True).transpose(2, 3, 1, 0)
    np.testing.assert_allclose(
        variables["params"]["backbone"]["conv1"]["kernel"], expected, rtol=1e-6
    )
    assert any("conv1.weight" in note and "summed" in note for note in report.notes)
    # 2 channels (a frame and its motion, say): each gets the grey kernel.
    two_channels = _initialised(model, jnp.ones((1, 32, 32, 2)))
    variables, report = pretrained.load_pretrained(two_channels, path, model_name="resnet18")
    np.testing.assert_allclose(
        variables["params"]["backbone"]["conv1"]["kernel"],
        np.concatenate([expected, expected], axis=2),
        rtol=1e-6,
    )
    assert any("each of the model's 2 input channels" in note for note in report.notes)


def test_missing_unexpected_and_mismatched_keys_in_one_error(tmp_path, small_resnet18):
    """One ValueError names the file and lists the missing key, the extra key and the shape."""
    arrays, model = small_resnet18
    broken = dict(arrays)
    del broken["layer3.1.bn2.running_var"]
    broken["layer5.0.conv1.weight"] = np.zeros((8, 8, 3, 3), np.float32)
    broken["layer2.0.conv1.weight"] = np.zeros((16, 8, 1, 1), np.float32)
    path = _write_npz(tmp_path / "broken.npz", broken)
    initial = _initialised(model, jnp.ones((1, 32, 32, 3)))
    with pytest.raises(ValueError) as error:
        pretrained.load_pretrained(initial, path, model_name="resnet18")
    message = str(error.value)
    assert str(path) in message
    assert "1 missing key(s) in the file: layer3.1.bn2.running_var" in message
    assert "1 unexpected key(s) in the file: layer5.0.conv1.weight" in message
    assert "layer2.0.conv1.weight: file (16, 8, 1, 1), model needs (16, 8, 3, 3)" in message


def test_wrong_width_lists_mismatches_with_a_count(tmp_path, small_resnet18):
    """Loading width-8 weights into a width-16 model lists a truncated set of mismatches."""
    arrays, _ = small_resnet18
    path = _write_npz(tmp_path / "w.npz", arrays)
    initial = _initialised(ResNetClassifier(depth=18, width=16), jnp.ones((1, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"shape mismatch\(es\): .*\.\.\. and \d+ more"):
        pretrained.load_pretrained(initial, path, model_name="resnet18")


def test_wrong_architecture_or_norm_is_reported(tmp_path, small_resnet18):
    """resnet34 weights or model_name for a resnet18, BN weights into a GroupNorm model."""
    arrays, model = small_resnet18
    path = _write_npz(tmp_path / "w.npz", arrays)
    x = jnp.ones((1, 32, 32, 3))
    resnet34 = _write_npz(tmp_path / "r34.npz", _random_arrays(_torchvision_resnet(34, width=8)))
    with pytest.raises(ValueError, match="unexpected key.*layer1.2.bn1.bias"):
        pretrained.load_pretrained(_initialised(model, x), resnet34, model_name="resnet18")
    with pytest.raises(ValueError, match="absent from the model.*params/backbone/layer1_2"):
        pretrained.load_pretrained(_initialised(model, x), path, model_name="resnet34")
    group = _initialised(ResNetClassifier(depth=18, width=8, norm="group"), x)
    with pytest.raises(ValueError, match="absent from the model.*batch_stats/backbone/bn1/mean"):
        pretrained.load_pretrained(group, path, model_name="resnet18")
    with pytest.raises(ValueError, match="resnet101"):
        pretrained.load_pretrained(_initialised(model, x), path, model_name="resnet101")


def test_corrupt_files_raise_errors_naming_the_file(tmp_path, small_resnet18):
    """Truncated .safetensors / .npz, garbage .h5, missing file and unknown extension."""
    arrays, model = small_resnet18
    initial = _initialised(model, jnp.ones((1, 32, 32, 3)))
    st = _write_safetensors(tmp_path / "w.safetensors", arrays)
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{st}.*not a valid .safetensors.*truncated"):
        pretrained.load_pretrained(initial, st, model_name="resnet18")
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match=f"{st}.*not JSON"):
        pretrained.load_pretrained(initial, st, model_name="resnet18")
    npz = _write_npz(tmp_path / "w.npz", arrays)
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{npz}.*not a valid .npz"):
        pretrained.load_pretrained(initial, npz, model_name="resnet18")
    h5 = tmp_path / "w.h5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 50)
    pytest.importorskip("h5py")
    with pytest.raises(ValueError, match=f"{h5}.*not a readable Keras .h5"):
        pretrained.load_pretrained(initial, h5, model_name="resnet50")
    with pytest.raises(FileNotFoundError, match="nowhere.npz"):
        pretrained.load_pretrained(initial, tmp_path / "nowhere.npz", model_name="resnet18")
    other = tmp_path / "w.ckpt"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"w\.ckpt.*\.safetensors"):
        pretrained.load_pretrained(initial, other, model_name="resnet18")


def test_pth_without_torch_says_how_to_convert(tmp_path, small_resnet18):
    """Without PyTorch a .pth file raises an ImportError pointing to .npz / .safetensors."""
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed")
    _, model = small_resnet18
    path = tmp_path / "resnet18.pth"
    path.write_bytes(b"PK")
    with pytest.raises(ImportError, match=r"resnet18\.pth.*\.npz.*\.safetensors"):
        pretrained.load_pretrained(
            _initialised(model, jnp.ones((1, 32, 32, 3))), path, model_name="resnet18"
        )


def test_frozen_dict_variables_come_back_frozen(tmp_path, small_resnet18):
    """FrozenDict in, FrozenDict out."""
    import flax

    arrays, model = small_resnet18
    path = _write_npz(tmp_path / "w.npz", arrays)
    initial = flax.core.freeze(_initialised(model, jnp.ones((1, 32, 32, 3))))
    variables, _ = pretrained.load_pretrained(initial, path, model_name="resnet18")
    assert isinstance(variables, flax.core.FrozenDict)


# ------------------------------------------------------------------------------------------
# torchvision VGG.


def test_vgg16_first_conv_and_fc1_match_numpy(tmp_path):
    """features.0 acts as a padding-1 conv; classifier.0 sees torch's (C, H, W) flattening."""
    model = VGG(depth=16, width=8, num_classes=10, classifier="fc", fc_features=32)
    arrays = _random_arrays(_torchvision_vgg16(False, width=8, fc_features=32, num_classes=10))
    path = _write_npz(tmp_path / "vgg16.npz", arrays)
    x = np.random.default_rng(3).normal(size=(1, 224, 224, 3)).astype(np.float32)
    variables, report = pretrained.load_pretrained(_initialised(model, x), path, model_name="vgg16")
    assert report.reinitialized == []
    np.testing.assert_array_equal(
        variables["params"]["block5_conv3"]["kernel"],
        arrays["features.28.weight"].transpose(2, 3, 1, 0),
    )
    captured = _captured(model, variables, x, ("block1_conv1", "block5_conv3", "fc1"))
    conv = _torch_conv2d(x, arrays["features.0.weight"], arrays["features.0.bias"], padding=1)
    _close(captured["block1_conv1"]["__call__"][0], conv)
    last = np.maximum(np.asarray(captured["block5_conv3"]["__call__"][0], np.float64), 0)
    pooled = last.reshape(1, 7, 2, 7, 2, 64).max(axis=(2, 4))  # 2x2 max-pool: (1, 7, 7, 64).
    torch_flat = pooled.transpose(0, 3, 1, 2).reshape(1, -1)  # torch.flatten of (N, C, H, W).
    fc1 = torch_flat @ arrays["classifier.0.weight"].T + arrays["classifier.0.bias"]
    _close(captured["fc1"]["__call__"][0], fc1)


def test_vgg16_bn_names_and_gap_model(tmp_path):
    """vgg16_bn indices map to block/bn names; a GAP model skips fc1/fc2 and re-inits head."""
    arrays = _random_arrays(_torchvision_vgg16(True, width=8, fc_features=32, num_classes=10))
    path = _write_safetensors(tmp_path / "vgg16_bn.safetensors", arrays)
    x = jnp.ones((1, 32, 32, 3))
    fc_model = VGG(
        depth=16, batch_norm=True, width=8, num_classes=10, classifier="fc", fc_features=32
    )
    variables, _ = pretrained.load_pretrained(
        _initialised(fc_model, x), path, model_name="vgg16_bn"
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["block1_bn1"]["mean"], arrays["features.1.running_mean"]
    )
    np.testing.assert_array_equal(
        variables["params"]["block5_conv3"]["kernel"],
        arrays["features.40.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["block5_bn3"]["var"], arrays["features.41.running_var"]
    )
    np.testing.assert_array_equal(
        variables["params"]["fc2"]["kernel"], arrays["classifier.3.weight"].T
    )

    gap_model = VGG(depth=16, batch_norm=True, width=8, num_classes=10, classifier="gap")
    initial = _initialised(gap_model, x)
    variables, report = pretrained.load_pretrained(initial, path, model_name="vgg16_bn")
    assert report.head_reinitialized and report.reinitialized == [
        "params/head/bias",
        "params/head/kernel",
    ]
    assert sorted(report.skipped) == [
        "classifier.0.bias (the model has no fc1)",
        "classifier.0.weight (the model has no fc1)",
        "classifier.3.bias (the model has no fc2)",
        "classifier.3.weight (the model has no fc2)",
    ]
    assert any("32 features" in note and "64" in note for note in report.notes)
    with pytest.raises(ValueError, match="unexpected key.*features.1.running_mean"):
        pretrained.load_pretrained(_initialised(fc_model, x), path, model_name="vgg16")


# ------------------------------------------------------------------------------------------
# Keras .h5.


def test_keras_vgg16_h5_loads_without_transposes(tmp_path):
    """Keras kernels are HWIO / (in, out) already; predictions is the head; notop works."""
    arrays = _random_arrays(_keras_vgg16(), keras=True)
    path = _write_keras_h5(tmp_path / "vgg16.h5", arrays)
    model = VGG(depth=16, width=8, num_classes=10, classifier="fc", fc_features=32)
    x = np.random.default_rng(4).normal(size=(1, 32, 32, 3)).astype(np.float32)
    variables, report = pretrained.load_pretrained(_initialised(model, x), path, model_name="vgg16")
    assert report.source == "keras" and report.reinitialized == []
    params = variables["params"]
    np.testing.assert_array_equal(params["block1_conv1"]["kernel"], arrays["block1_conv1/kernel"])
    np.testing.assert_array_equal(params["fc1"]["kernel"], arrays["fc1/kernel"])
    np.testing.assert_array_equal(params["head"]["kernel"], arrays["predictions/kernel"])
    captured = _captured(model, variables, x, ("block1_conv1",))
    torch_weight = arrays["block1_conv1/kernel"].transpose(3, 2, 0, 1)
    conv = _torch_conv2d(x, torch_weight, arrays["block1_conv1/bias"], padding=1)
    _close(captured["block1_conv1"]["__call__"][0], conv)

    notop = _write_keras_h5(
        tmp_path / "notop.h5", _random_arrays(_keras_vgg16(include_top=False), keras=True)
    )
    gap = VGG(depth=16, width=8, num_classes=2, classifier="gap")
    _, report = pretrained.load_pretrained(_initialised(gap, x), notop, model_name="vgg16")
    assert (
        report.head_reinitialized and "Head re-initialised: the file has no head." in report.notes
    )
    with pytest.raises(ValueError, match="Keras applications have no vgg16_bn"):
        pretrained.load_pretrained(_initialised(gap, x), notop, model_name="vgg16_bn")


def test_keras_resnet50_h5_folds_conv_bias_into_bn(tmp_path):
    """Keras ResNet50 names map to layer*_*; the conv bias is folded exactly into BN."""
    arrays = _random_arrays(_keras_resnet50(), keras=True)
    arrays["extra_layer/kernel"] = np.zeros((1,), np.float32)
    path = _write_keras_h5(tmp_path / "resnet50.h5", arrays)
    model = ResNetClassifier(depth=50, width=8, stride_in_1x1=True)
    x = np.random.default_rng(5).normal(size=(1, 16, 16, 3)).astype(np.float32)
    initial = _initialised(model, x)
    with pytest.raises(ValueError, match=f"(?s){path}.*unexpected key.*extra_layer/kernel"):
        pretrained.load_pretrained(initial, path, model_name="resnet50")
    del arrays["extra_layer/kernel"]
    path = _write_keras_h5(tmp_path / "resnet50.h5", arrays)
    variables, report = pretrained.load_pretrained(initial, path, model_name="resnet50")
    assert report.reinitialized == [] and any("stride_in_1x1=True" in n for n in report.notes)
    params, stats = variables["params"]["backbone"], variables["batch_stats"]["backbone"]
    np.testing.assert_array_equal(params["conv1"]["kernel"], arrays["conv1_conv/kernel"])
    np.testing.assert_array_equal(
        params["layer1_0"]["downsample_conv"]["kernel"], arrays["conv2_block1_0_conv/kernel"]
    )
    np.testing.assert_array_equal(
        params["layer4_2"]["conv3"]["kernel"], arrays["conv5_block3_3_conv/kernel"]
    )
    np.testing.assert_allclose(
        stats["layer2_3"]["bn2"]["mean"],
        arrays["conv3_block4_2_bn/moving_mean"] - arrays["conv3_block4_2_conv/bias"],
        rtol=1e-6,
    )
    # BN(conv(x) + b) with Keras' statistics equals the folded Flax conv1 -> bn1.
    captured = _captured(model, variables, x, ("bn1",))["backbone"]["bn1"]["__call__"][0]
    conv = _torch_conv2d(
        x,
        arrays["conv1_conv/kernel"].transpose(3, 2, 0, 1),
        arrays["conv1_conv/bias"],
        stride=2,
        padding=3,
    )
    normalised = (conv - arrays["conv1_bn/moving_mean"]) / np.sqrt(
        arrays["conv1_bn/moving_variance"] + 1e-5
    )
    _close(captured, normalised * arrays["conv1_bn/gamma"] + arrays["conv1_bn/beta"])


# ------------------------------------------------------------------------------------------
# Fine-tuning helpers.


def test_backbone_mask_marks_everything_but_the_head():
    """True under the backbone (and VGG's fc1/fc2), False under 'head'."""
    shapes = jax.eval_shape(
        lambda: ResNetClassifier(depth=18, width=4, num_classes=3).init(
            jax.random.key(0), jnp.ones((1, 32, 32, 3)), train=False
        )
    )
    mask = pretrained.backbone_mask(shapes["params"])
    assert all(jax.tree.leaves(mask["backbone"])) and not any(jax.tree.leaves(mask["head"]))
    params = {"fc1": {"kernel": 1.0}, "head": {"kernel": 2.0}, "decoder": {"bias": 3.0}}
    assert pretrained.backbone_mask(params, head_names=("head", "decoder")) == {
        "fc1": {"kernel": True},
        "head": {"kernel": False},
        "decoder": {"bias": False},
    }


def test_finetune_optimizer_freezes_then_scales_the_backbone():
    """For freeze_steps updates the backbone does not move; then it moves at lr * multiplier."""
    params = {"backbone": {"w": jnp.ones(3)}, "head": {"w": jnp.ones(2)}}
    grads = jax.tree.map(jnp.ones_like, params)
    tx = pretrained.make_finetune_optimizer(
        lambda: optax.sgd(0.1), freeze_steps=3, backbone_lr_multiplier=0.5
    )

    @jax.jit
    def train_step(params, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for i in range(3):
        params, state = train_step(params, state)
        np.testing.assert_array_equal(params["backbone"]["w"], np.ones(3))
        np.testing.assert_allclose(params["head"]["w"], np.full(2, 1 - 0.1 * (i + 1)), rtol=1e-6)
    params, state = train_step(params, state)
    np.testing.assert_allclose(params["backbone"]["w"], np.full(3, 1 - 0.05), rtol=1e-6)
    np.testing.assert_allclose(params["head"]["w"], np.full(2, 1 - 0.4), rtol=1e-6)
    with pytest.raises(ValueError, match="freeze_steps"):
        pretrained.make_finetune_optimizer(lambda: optax.sgd(0.1), freeze_steps=-1)
