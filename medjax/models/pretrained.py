"""Imports ImageNet weights from a LOCAL file into the medjax ResNet, VGG and InceptionV3 models.

Nothing is ever downloaded: the caller passes the path of a file it already has.

Formats (chosen by the file extension):

- ``.pth`` / ``.pt``: a torchvision state dict, read with ``torch`` when it is installed
  (without it, convert the file to ``.npz`` or ``.safetensors`` elsewhere);
- ``.npz``: ``numpy.savez`` of a torchvision state dict, with torchvision's key names;
- ``.safetensors``: a torchvision state dict, parsed here with numpy (8-byte little-endian
  header length, JSON header of name -> dtype/shape/data_offsets, raw little-endian bytes);
- ``.h5``: Keras applications weights (``VGG16``, ``VGG19``, ``ResNet50``, ``InceptionV3``),
  read with ``h5py``. Keys are reported as ``layer/weight``, e.g. ``block1_conv1/kernel`` for the
  dataset ``block1_conv1/block1_conv1/kernel:0``.

The mapping is explicit: `resnet_mapping`, `vgg_mapping` and `inception_mapping` list every key
of the file (torchvision's or Keras') with the Flax variable it fills and the layout change
(`WeightMapping`): torch conv weights OIHW -> HWIO, torch linear (out, in) -> (in, out)
(torchvision's first VGG linear also goes from a C, H, W flattening to the H, W, C one of
`medjax.models.vgg.VGG`), BatchNorm weight/bias/running_mean/running_var ->
params scale/bias and batch_stats mean/var (Keras gamma/beta/moving_mean/moving_variance);
Keras kernels are already HWIO / (in, out). ``num_batches_tracked`` keys are ignored. The
Keras ResNet50 convs have biases that medjax's ResNet (like torchvision's) does not; each one
is folded exactly into the moving mean of the BatchNorm that follows
(BN(conv(x) + b) with mean m is BN(conv(x)) with mean m - b). Keras' InceptionV3 BatchNorms
have no scale (gamma); the Flax scales are set to 1. torchvision's InceptionV3 file also holds
the auxiliary classifier (``AuxLogits.*``), which medjax's model does not have; it is skipped.

`load_pretrained` checks the file against the model strictly: keys missing from the file,
keys the mapping does not know and shape mismatches are reported together in one ValueError.
The classifier head (torchvision ``fc`` / ``classifier.6``, Keras ``predictions``) is the
exception: when its shape differs (another class count) or it is absent, the head keeps its
initialisation and the report says so. A 1-channel model accepts a 3-channel (RGB) first conv:
the kernel is summed over its input channels, which gives the response of the RGB network to a
grey image replicated on R, G and B.

The backbone may be the root module (`ResNet`, `VGG`, `InceptionV3`) or a submodule named
``backbone`` (`ResNetClassifier`, `CnnRnnClassifier`, or heads built around a ResNet); other
variables of the model (e.g. a segmentation or keypoint head) keep their initialisation and are
listed in the report.

`backbone_mask` and `make_finetune_optimizer` support a frozen-backbone-then-fine-tune
schedule with `optax`.

Example::

    variables = model.init(key, images, train=False)
    variables, report = load_pretrained(variables, "/data/resnet34.npz", model_name="resnet34")
    print(report.summary())
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
import zipfile
import zlib
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from medjax.models.inception import INCEPTION_BLOCKS
from medjax.models.resnet import STAGE_SIZES
from medjax.models.vgg import BLOCK_CONVS

__all__ = [
    "WeightMapping",
    "LoadReport",
    "PRETRAINED_MODELS",
    "resnet_mapping",
    "vgg_mapping",
    "inception_mapping",
    "read_weight_file",
    "load_pretrained",
    "backbone_mask",
    "make_finetune_optimizer",
]

# Model names `load_pretrained` knows; Keras files exist for resnet50, vgg16, vgg19 and
# inception_v3.
PRETRAINED_MODELS = (
    "resnet18",
    "resnet34",
    "resnet50",
    *(f"vgg{depth}{suffix}" for depth in sorted(BLOCK_CONVS) for suffix in ("", "_bn")),
    "inception_v3",
)
_KERAS_MODELS = ("resnet50", "vgg16", "vgg19", "inception_v3")

# Layouts of `WeightMapping`.
CONV = "conv"  # torch OIHW -> Flax HWIO.
LINEAR = "linear"  # torch (out, in) -> Flax (in, out).
LINEAR_CHW = "linear_chw"  # LINEAR, and the input goes from C, H, W to H, W, C order.
SAME = "same"  # Copied as is (norm vectors, Keras kernels).
FOLD_INTO_MEAN = "fold_into_mean"  # A Keras conv bias subtracted from the target BN mean.
ONES = "ones"  # No array in the file: the variable is set to 1 (a Keras BN without scale).

# Roles of `WeightMapping`.
BACKBONE = "backbone"  # Required; the path is relative to the backbone module.
CLASSIFIER = "classifier"  # VGG fc1/fc2: required if the model has them, else skipped.
HEAD = "head"  # The class head: kept as initialised when absent from the file or mismatched.

# torchvision's VGG flattens a 7x7 adaptive-average-pooled map.
_VGG_POOL_CELLS = 7 * 7
# Longest list printed in an error message or summary.
_MAX_LISTED = 20


@dataclasses.dataclass(frozen=True)
class WeightMapping:
    """Where one array of a weight file goes in the Flax variables.

    Attributes:
      source_key: key in the file (torchvision name, or Keras ``layer/weight``).
      target: (collection, *module path, variable name), e.g.
        ``("params", "layer1_0", "conv1", "kernel")``; relative to the backbone module for
        ``role="backbone"``, to the model root otherwise.
      layout: one of ``CONV``, ``LINEAR``, ``LINEAR_CHW``, ``SAME``, ``FOLD_INTO_MEAN``,
        ``ONES`` (nothing is read: the variable is set to 1; ``source_key`` only names it).
      role: ``BACKBONE``, ``CLASSIFIER`` or ``HEAD``.
      first_conv: True for the kernel of the first conv (3 -> 1 channel adaptation).
    """

    source_key: str
    target: tuple[str, ...]
    layout: str
    role: str = BACKBONE
    first_conv: bool = False


@dataclasses.dataclass
class LoadReport:
    """What `load_pretrained` did.

    Attributes:
      path: the weight file.
      model_name: e.g. ``"resnet34"``.
      source: ``"torchvision"`` or ``"keras"``.
      loaded: ``"file key -> flax/path"`` for every array taken from the file.
      reinitialized: Flax variables (``collection/module/.../name``) kept as they were in
        the given variables, i.e. freshly initialised.
      skipped: file keys the model has no place for (e.g. ``fc.*`` for a bare backbone),
        with the reason.
      notes: adaptations and caveats (channel summing, bias folding, Keras preprocessing).
      head_reinitialized: True when the model has a head and it was not loaded.
    """

    path: str
    model_name: str
    source: str
    loaded: list[str] = dataclasses.field(default_factory=list)
    reinitialized: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    head_reinitialized: bool = False

    def summary(self) -> str:
        """A few readable lines for logs.

        Returns:
          The summary text.
        """
        lines = [
            f"Loaded {len(self.loaded)} arrays from {self.path} ({self.source}) into "
            f"{self.model_name}.",
            f"Kept as initialised ({len(self.reinitialized)}): {_listing(self.reinitialized)}",
        ]
        if self.skipped:
            lines.append(f"Skipped file keys ({len(self.skipped)}): {_listing(self.skipped)}")
        lines.extend(self.notes)
        return "\n".join(lines)


def _listing(items: Sequence[str]) -> str:
    """Joins at most `_MAX_LISTED` items, saying how many more there are.

    Args:
      items: strings to list.

    Returns:
      A comma-separated listing, ``"-"`` when empty.
    """
    if not items:
        return "-"
    shown = ", ".join(items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown += f", ... and {len(items) - _MAX_LISTED} more"
    return shown


# ---------------------------------------------------------------------------------------------
# Name and layout mappings.


def _torch_norm(source: str, module: tuple[str, ...]) -> list[WeightMapping]:
    """Mapping of one torch BatchNorm2d.

    Args:
      source: torch module name, e.g. ``"layer1.0.bn1"``.
      module: Flax module path, e.g. ``("layer1_0", "bn1")``.

    Returns:
      The four entries (weight, bias, running_mean, running_var).
    """
    return [
        WeightMapping(f"{source}.weight", ("params", *module, "scale"), SAME),
        WeightMapping(f"{source}.bias", ("params", *module, "bias"), SAME),
        WeightMapping(f"{source}.running_mean", ("batch_stats", *module, "mean"), SAME),
        WeightMapping(f"{source}.running_var", ("batch_stats", *module, "var"), SAME),
    ]


def _keras_norm(layer: str, module: tuple[str, ...]) -> list[WeightMapping]:
    """Mapping of one Keras BatchNormalization layer.

    Args:
      layer: Keras layer name, e.g. ``"conv2_block1_1_bn"``.
      module: Flax module path.

    Returns:
      The four entries (gamma, beta, moving_mean, moving_variance).
    """
    return [
        WeightMapping(f"{layer}/gamma", ("params", *module, "scale"), SAME),
        WeightMapping(f"{layer}/beta", ("params", *module, "bias"), SAME),
        WeightMapping(f"{layer}/moving_mean", ("batch_stats", *module, "mean"), SAME),
        WeightMapping(f"{layer}/moving_variance", ("batch_stats", *module, "var"), SAME),
    ]


def _keras_conv_bn(
    layer: str, module: tuple[str, ...], conv_name: str, norm_name: str
) -> list[WeightMapping]:
    """Mapping of a Keras ResNet50 Conv2D (with bias) and the BatchNormalization after it.

    Args:
      layer: Keras name without the suffix, e.g. ``"conv2_block1_1"`` for the layers
        ``conv2_block1_1_conv`` and ``conv2_block1_1_bn``.
      module: Flax path of the module holding the conv and the norm.
      conv_name: Flax name of the conv, e.g. ``"conv1"`` or ``"downsample_conv"``.
      norm_name: Flax name of the norm, e.g. ``"bn1"`` or ``"downsample_bn"``.

    Returns:
      Entries for the kernel, the bias (folded into the norm's mean) and the norm.
    """
    return [
        WeightMapping(f"{layer}_conv/kernel", ("params", *module, conv_name, "kernel"), SAME),
        WeightMapping(
            f"{layer}_conv/bias", ("batch_stats", *module, norm_name, "mean"), FOLD_INTO_MEAN
        ),
        *_keras_norm(f"{layer}_bn", (*module, norm_name)),
    ]


def resnet_mapping(depth: int, *, source: str = "torchvision") -> list[WeightMapping]:
    """File key -> Flax variable mapping for `medjax.models.resnet` at any width.

    Args:
      depth: 18, 34 or 50.
      source: ``"torchvision"`` (state-dict names such as ``layer1.0.conv1.weight``) or
        ``"keras"`` (ResNet50 only: ``conv1_conv``, ``conv2_block1_0_conv`` (shortcut),
        ``conv2_block1_1_conv``, ..., ``predictions``).

    Returns:
      The list of `WeightMapping`; backbone targets are relative to the `ResNet` module,
      the head's to the model root (``head``).

    Raises:
      ValueError: an unknown depth or source, or Keras weights for a depth other than 50.
    """
    if depth not in STAGE_SIZES:
        raise ValueError(f"ResNet depth={depth} is not one of {sorted(STAGE_SIZES)}")
    bottleneck = depth == 50
    convs = (1, 2, 3) if bottleneck else (1, 2)
    if source == "torchvision":
        mapping = [
            WeightMapping("conv1.weight", ("params", "conv1", "kernel"), CONV, first_conv=True),
            *_torch_norm("bn1", ("bn1",)),
        ]
        for stage, num_blocks in enumerate(STAGE_SIZES[depth], start=1):
            for index in range(num_blocks):
                torch_block, block = f"layer{stage}.{index}", f"layer{stage}_{index}"
                for k in convs:
                    mapping.append(
                        WeightMapping(
                            f"{torch_block}.conv{k}.weight",
                            ("params", block, f"conv{k}", "kernel"),
                            CONV,
                        )
                    )
                    mapping.extend(_torch_norm(f"{torch_block}.bn{k}", (block, f"bn{k}")))
                # Stage 1 of ResNet-18/34 keeps its channels and stride: no projection.
                if index == 0 and (stage > 1 or bottleneck):
                    mapping.append(
                        WeightMapping(
                            f"{torch_block}.downsample.0.weight",
                            ("params", block, "downsample_conv", "kernel"),
                            CONV,
                        )
                    )
                    mapping.extend(
                        _torch_norm(f"{torch_block}.downsample.1", (block, "downsample_bn"))
                    )
        mapping += [
            WeightMapping("fc.weight", ("params", "head", "kernel"), LINEAR, role=HEAD),
            WeightMapping("fc.bias", ("params", "head", "bias"), SAME, role=HEAD),
        ]
        return mapping
    if source == "keras":
        if not bottleneck:
            raise ValueError(f"Keras applications have no ResNet-{depth}; only ResNet50.")
        mapping = [
            WeightMapping(
                "conv1_conv/kernel", ("params", "conv1", "kernel"), SAME, first_conv=True
            ),
            WeightMapping("conv1_conv/bias", ("batch_stats", "bn1", "mean"), FOLD_INTO_MEAN),
            *_keras_norm("conv1_bn", ("bn1",)),
        ]
        for stage, num_blocks in enumerate(STAGE_SIZES[depth], start=1):
            for index in range(num_blocks):
                keras_block = f"conv{stage + 1}_block{index + 1}"
                module = (f"layer{stage}_{index}",)
                if index == 0:  # The shortcut projection is Keras' branch 0.
                    mapping += _keras_conv_bn(
                        f"{keras_block}_0", module, "downsample_conv", "downsample_bn"
                    )
                for k in convs:
                    mapping += _keras_conv_bn(f"{keras_block}_{k}", module, f"conv{k}", f"bn{k}")
        mapping += [
            WeightMapping("predictions/kernel", ("params", "head", "kernel"), SAME, role=HEAD),
            WeightMapping("predictions/bias", ("params", "head", "bias"), SAME, role=HEAD),
        ]
        return mapping
    raise ValueError(f"Unknown weight source {source!r}; expected 'torchvision' or 'keras'")


def vgg_mapping(
    depth: int, *, batch_norm: bool = False, source: str = "torchvision"
) -> list[WeightMapping]:
    """File key -> Flax variable mapping for `medjax.models.vgg.VGG` at any width.

    torchvision numbers the layers of ``features`` in order (conv, [BatchNorm], ReLU, ...,
    MaxPool), so for vgg16 ``features.0`` is ``block1_conv1`` and ``features.28`` is
    ``block5_conv3``; for vgg16_bn ``features.1`` is ``block1_bn1``. ``classifier.0``,
    ``classifier.3`` and ``classifier.6`` are ``fc1``, ``fc2`` and ``head``. Keras names the
    convs as medjax does, and the dense layers ``fc1``, ``fc2``, ``predictions``.

    Args:
      depth: 11, 13, 16 or 19.
      batch_norm: True for the ``_bn`` variants (torchvision only).
      source: ``"torchvision"`` or ``"keras"`` (VGG16 / VGG19 without BatchNorm).

    Returns:
      The list of `WeightMapping`, targets relative to the `VGG` module.

    Raises:
      ValueError: an unknown depth or source, or a Keras variant that does not exist.
    """
    if depth not in BLOCK_CONVS:
        raise ValueError(f"VGG depth={depth} is not one of {sorted(BLOCK_CONVS)}")
    mapping = []
    if source == "torchvision":
        layer = 0  # Index in torchvision's `features` Sequential.
        for block, num_convs in enumerate(BLOCK_CONVS[depth], start=1):
            for index in range(1, num_convs + 1):
                conv = f"block{block}_conv{index}"
                mapping += [
                    WeightMapping(
                        f"features.{layer}.weight",
                        ("params", conv, "kernel"),
                        CONV,
                        first_conv=layer == 0,
                    ),
                    WeightMapping(f"features.{layer}.bias", ("params", conv, "bias"), SAME),
                ]
                layer += 1
                if batch_norm:
                    mapping += _torch_norm(f"features.{layer}", (f"block{block}_bn{index}",))
                    layer += 1
                layer += 1  # ReLU.
            layer += 1  # MaxPool.
        dense = (
            ("classifier.0", "fc1", LINEAR_CHW, CLASSIFIER),
            ("classifier.3", "fc2", LINEAR, CLASSIFIER),
            ("classifier.6", "head", LINEAR, HEAD),
        )
        for name, module, layout, role in dense:
            mapping += [
                WeightMapping(f"{name}.weight", ("params", module, "kernel"), layout, role),
                WeightMapping(f"{name}.bias", ("params", module, "bias"), SAME, role),
            ]
        return mapping
    if source == "keras":
        if batch_norm or depth not in (16, 19):
            raise ValueError(
                f"Keras applications have no vgg{depth}{'_bn' if batch_norm else ''}; "
                "only VGG16 and VGG19 without BatchNorm."
            )
        for block, num_convs in enumerate(BLOCK_CONVS[depth], start=1):
            for index in range(1, num_convs + 1):
                conv = f"block{block}_conv{index}"
                mapping += [
                    WeightMapping(
                        f"{conv}/kernel",
                        ("params", conv, "kernel"),
                        SAME,
                        first_conv=block == 1 and index == 1,
                    ),
                    WeightMapping(f"{conv}/bias", ("params", conv, "bias"), SAME),
                ]
        # Keras flattens the 7x7 map in H, W, C order, as medjax does.
        dense = (
            ("fc1", "fc1", CLASSIFIER),
            ("fc2", "fc2", CLASSIFIER),
            ("predictions", "head", HEAD),
        )
        for name, module, role in dense:
            mapping += [
                WeightMapping(f"{name}/kernel", ("params", module, "kernel"), SAME, role),
                WeightMapping(f"{name}/bias", ("params", module, "bias"), SAME, role),
            ]
        return mapping
    raise ValueError(f"Unknown weight source {source!r}; expected 'torchvision' or 'keras'")


# torchvision's InceptionAux (AuxLogits): file key suffix -> (layout, Flax path under AuxLogits).
_INCEPTION_AUX = (
    ("conv0.conv.weight", CONV, ("conv0", "conv", "kernel")),
    ("conv1.conv.weight", CONV, ("conv1", "conv", "kernel")),
    ("fc.weight", LINEAR, ("fc", "kernel")),
    ("fc.bias", SAME, ("fc", "bias")),
)


def inception_mapping(*, source: str = "torchvision") -> list[WeightMapping]:
    """File key -> Flax variable mapping for `medjax.models.inception.InceptionV3` at any width.

    torchvision names every BasicConv2d by its module path (``Conv2d_1a_3x3.conv.weight``,
    ``Mixed_5b.branch5x5_1.bn.running_mean``, ...), as the Flax modules are named. Its
    ImageNet file also holds the auxiliary classifier (``AuxLogits.*``), which the Flax model
    does not have: those keys are skipped (and reported). Keras' ``InceptionV3`` leaves its
    layers unnamed, so they are numbered in creation order, which is torchvision's module
    order: the k-th BasicConv2d is ``conv2d_k`` and ``batch_normalization_k`` (k = 1 .. 94,
    as in the applications' ``inception_v3_weights_tf_dim_ordering_tf_kernels*.h5``; a file
    saved by a newer tf.keras that names the first layers ``conv2d`` and
    ``batch_normalization`` needs its layers renamed). Its BatchNorms have ``scale=False``:
    no gamma, the Flax scale is set to 1. The class head is ``fc`` / ``predictions``.

    Args:
      source: ``"torchvision"`` or ``"keras"``.

    Returns:
      The list of `WeightMapping`; backbone targets are relative to the `InceptionV3`
      module, the head's to the model root (``head``).

    Raises:
      ValueError: an unknown source.
    """
    mapping = []
    if source == "torchvision":
        for index, path in enumerate(INCEPTION_BLOCKS):
            name = ".".join(path)
            mapping.append(
                WeightMapping(
                    f"{name}.conv.weight",
                    ("params", *path, "conv", "kernel"),
                    CONV,
                    first_conv=index == 0,
                )
            )
            mapping.extend(_torch_norm(f"{name}.bn", (*path, "bn")))
        for prefix in ("conv0.bn", "conv1.bn"):
            for entry in _torch_norm(f"AuxLogits.{prefix}", ("AuxLogits", *prefix.split("."))):
                mapping.append(dataclasses.replace(entry, role=CLASSIFIER))
        for suffix, layout, path in _INCEPTION_AUX:
            mapping.append(
                WeightMapping(
                    f"AuxLogits.{suffix}",
                    ("params", "AuxLogits", *path),
                    layout,
                    CLASSIFIER,
                )
            )
        mapping += [
            WeightMapping("fc.weight", ("params", "head", "kernel"), LINEAR, role=HEAD),
            WeightMapping("fc.bias", ("params", "head", "bias"), SAME, role=HEAD),
        ]
        return mapping
    if source == "keras":
        for index, path in enumerate(INCEPTION_BLOCKS):
            conv, norm = f"conv2d_{index + 1}", f"batch_normalization_{index + 1}"
            mapping += [
                WeightMapping(
                    f"{conv}/kernel",
                    ("params", *path, "conv", "kernel"),
                    SAME,
                    first_conv=index == 0,
                ),
                WeightMapping(f"{norm} (scale=False: 1)", ("params", *path, "bn", "scale"), ONES),
                WeightMapping(f"{norm}/beta", ("params", *path, "bn", "bias"), SAME),
                WeightMapping(f"{norm}/moving_mean", ("batch_stats", *path, "bn", "mean"), SAME),
                WeightMapping(f"{norm}/moving_variance", ("batch_stats", *path, "bn", "var"), SAME),
            ]
        mapping += [
            WeightMapping("predictions/kernel", ("params", "head", "kernel"), SAME, role=HEAD),
            WeightMapping("predictions/bias", ("params", "head", "bias"), SAME, role=HEAD),
        ]
        return mapping
    raise ValueError(f"Unknown weight source {source!r}; expected 'torchvision' or 'keras'")


def _mapping_for(model_name: str, source: str) -> list[WeightMapping]:
    """The mapping for a model name such as ``"resnet34"`` or ``"vgg16_bn"``.

    Args:
      model_name: one of `PRETRAINED_MODELS`.
      source: ``"torchvision"`` or ``"keras"``.

    Returns:
      The list of `WeightMapping`.

    Raises:
      ValueError: an unknown model name, or one Keras has no weights for.
    """
    if model_name not in PRETRAINED_MODELS:
        raise ValueError(
            f"model_name={model_name!r} has no weight mapping; known: "
            f"{', '.join(PRETRAINED_MODELS)}"
        )
    if model_name == "inception_v3":
        return inception_mapping(source=source)
    family, depth, bn = re.fullmatch(r"(resnet|vgg)(\d+)(_bn)?", model_name).groups()
    depth = int(depth)
    if source == "keras" and model_name not in _KERAS_MODELS:
        raise ValueError(
            f"Keras applications have no {model_name}; Keras .h5 files load into "
            f"{', '.join(_KERAS_MODELS)}."
        )
    if family == "resnet":
        return resnet_mapping(depth, source=source)
    return vgg_mapping(depth, batch_norm=bn is not None, source=source)


# ---------------------------------------------------------------------------------------------
# Readers.

# safetensors dtype -> little-endian numpy dtype (BF16 is widened to float32 separately).
_SAFETENSORS_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
}


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """Reads every array of a ``numpy.savez`` archive.

    Args:
      path: the .npz file.

    Returns:
      Dict from key to array.

    Raises:
      ValueError: the file is not a readable .npz archive.
    """
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path} is not a valid .npz archive: {e}") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is not a valid .npz archive: it holds a single .npy array")
    with archive:
        try:
            return {key: archive[key] for key in archive.files}
        except (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError) as e:
            raise ValueError(f"{path} is not a valid .npz archive (truncated?): {e}") from e


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Parses a .safetensors file with numpy.

    Args:
      path: the .safetensors file.

    Returns:
      Dict from tensor name to array (BF16 tensors widened to float32).

    Raises:
      ValueError: the file is not a valid .safetensors file (e.g. truncated).
    """

    def invalid(reason: str) -> ValueError:
        return ValueError(f"{path} is not a valid .safetensors file: {reason}")

    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise invalid(f"only {len(data)} bytes, shorter than the 8-byte header length")
    header_size = int.from_bytes(data[:8], "little")
    if header_size > len(data) - 8:
        raise invalid(f"header of {header_size} bytes does not fit in {len(data)} (truncated?)")
    try:
        header = json.loads(data[8 : 8 + header_size])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise invalid(f"the header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise invalid("the header is not a JSON object")
    buffer = memoryview(data)[8 + header_size :]
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape = info["dtype"], tuple(int(n) for n in info["shape"])
            begin, end = (int(n) for n in info["data_offsets"])
        except (TypeError, KeyError, ValueError) as e:
            raise invalid(f"bad header entry for {name!r}: {info!r}") from e
        if dtype_name != "BF16" and dtype_name not in _SAFETENSORS_DTYPES:
            raise invalid(f"unsupported dtype {dtype_name!r} of {name!r}")
        dtype = np.dtype("<u2" if dtype_name == "BF16" else _SAFETENSORS_DTYPES[dtype_name])
        if not 0 <= begin <= end <= len(buffer):
            raise invalid(
                f"the data of {name!r} (bytes {begin}..{end}) lies outside the "
                f"{len(buffer)}-byte buffer (truncated?)"
            )
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise invalid(f"{name!r} has {end - begin} bytes for shape {shape} {dtype_name}")
        array = np.frombuffer(buffer[begin:end], dtype=dtype).reshape(shape)
        if dtype_name == "BF16":  # bfloat16 is the top half of a float32.
            array = (array.astype(np.uint32) << 16).view(np.float32)
        arrays[name] = array
    return arrays


def _read_torch(path: str) -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict (optionally under a ``state_dict`` key).

    Args:
      path: the .pth/.pt file.

    Returns:
      Dict from key to array.

    Raises:
      ImportError: PyTorch is not installed (the message says how to convert the file).
      ValueError: the file is not a readable PyTorch state dict.
    """
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"Reading {path} needs PyTorch, which is not installed. Convert the file where "
            "torch is available, e.g. numpy.savez('weights.npz', **{k: v.numpy() for k, v in "
            "torch.load(path).items()}) or safetensors.torch.save_file, and pass the .npz or "
            ".safetensors file instead."
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {e}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict but a {type(state).__name__}")
    arrays = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            if value.dtype == torch.bfloat16:
                value = value.float()
            arrays[key] = value.numpy()
    return arrays


def _read_keras_h5(path: str) -> dict[str, np.ndarray]:
    """Reads the weights of a Keras ``.h5`` file (weights-only or full-model save).

    Args:
      path: the .h5 file.

    Returns:
      Dict from ``layer/weight`` (e.g. ``conv1_conv/kernel``) to array.

    Raises:
      ImportError: h5py is not installed.
      ValueError: the file is not a readable HDF5 file, or two datasets share a key.
    """
    try:
        import h5py
    except ImportError:
        raise ImportError(f"Reading the Keras file {path} needs h5py: pip install h5py") from None
    arrays = {}

    def visit(name: str, item: Any) -> None:
        if isinstance(item, h5py.Dataset):
            parts = name.split("/")
            key = f"{parts[0]}/{parts[-1].split(':')[0]}"
            if key in arrays:
                raise ValueError(f"{path}: two datasets map to the key {key!r}")
            arrays[key] = item[()]

    try:
        with h5py.File(path, "r") as f:
            root = f["model_weights"] if "model_weights" in f else f
            root.visititems(visit)
    except OSError as e:
        raise ValueError(f"{path} is not a readable Keras .h5 (HDF5) file: {e}") from e
    return arrays


def read_weight_file(path: str) -> tuple[dict[str, np.ndarray], str]:
    """Reads a local weight file into numpy arrays; never downloads anything.

    Args:
      path: a ``.pth``, ``.pt``, ``.npz``, ``.safetensors`` or ``.h5`` file.

    Returns:
      (arrays by key, source) where source is ``"torchvision"`` (state-dict names) or
      ``"keras"`` (``.h5``, keys ``layer/weight``).

    Raises:
      FileNotFoundError: no such file.
      ValueError: an unknown extension, or a file that is not a valid archive of its format.
      ImportError: ``torch`` (for .pth/.pt) or ``h5py`` (for .h5) is not installed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Pretrained weight file {path} does not exist")
    extension = os.path.splitext(path)[1].lower()
    if extension == ".npz":
        return _read_npz(path), "torchvision"
    if extension == ".safetensors":
        return _read_safetensors(path), "torchvision"
    if extension in (".pth", ".pt"):
        return _read_torch(path), "torchvision"
    if extension == ".h5":
        return _read_keras_h5(path), "keras"
    raise ValueError(
        f"Unknown weight file extension of {path}; expected .pth, .pt, .npz, .safetensors or .h5"
    )


# ---------------------------------------------------------------------------------------------
# Loading.


def _to_flax(array: np.ndarray, layout: str) -> np.ndarray:
    """Rearranges a file array into the Flax layout.

    Args:
      array: the array as stored in the file.
      layout: the `WeightMapping` layout.

    Returns:
      The array in the Flax layout.
    """
    if layout == CONV:
        return array.transpose(2, 3, 1, 0)
    if layout == LINEAR:
        return array.T
    if layout == LINEAR_CHW:
        out_features, in_features = array.shape
        channels = in_features // _VGG_POOL_CELLS
        side = math.isqrt(_VGG_POOL_CELLS)
        return (
            array.reshape(out_features, channels, side, side)
            .transpose(2, 3, 1, 0)
            .reshape(in_features, out_features)
        )
    return array


def _file_shape(flax_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The shape a file array must have to fill a Flax variable of `flax_shape`.

    Args:
      flax_shape: shape of the Flax variable.
      layout: the `WeightMapping` layout.

    Returns:
      The shape in the file's layout.
    """
    if layout == CONV and len(flax_shape) == 4:
        height, width, in_channels, out_channels = flax_shape
        return (out_channels, in_channels, height, width)
    if layout in (LINEAR, LINEAR_CHW):
        return tuple(reversed(flax_shape))
    return tuple(flax_shape)


def _in_channel_axis(layout: str) -> int:
    """Axis of the input channels of a first-conv kernel in the file layout.

    Args:
      layout: ``CONV`` (OIHW) or ``SAME`` (Keras HWIO).

    Returns:
      The axis index.
    """
    return 1 if layout == CONV else 2


def _backbone_prefix(
    flat: dict[tuple[str, ...], Any], mapping: list[WeightMapping], model_name: str
) -> tuple[str, ...]:
    """Finds the backbone module in the variables: the root or a submodule ``backbone``.

    Args:
      flat: flattened variables.
      mapping: the weight mapping.
      model_name: for the error message.

    Returns:
      The module path of the backbone, ``()`` or ``("backbone",)``.

    Raises:
      ValueError: neither place holds the first conv of the mapping.
    """
    first = next(entry.target for entry in mapping if entry.role == BACKBONE)
    for prefix in ((), ("backbone",)):
        if (first[0], *prefix, *first[1:]) in flat:
            return prefix
    raise ValueError(
        f"The variables have no {'/'.join(first)} (at the root or under 'backbone'); they do "
        f"not look like a {model_name} model."
    )


def _path(key: tuple[str, ...]) -> str:
    """Formats a flattened variable key.

    Args:
      key: (collection, *module path, name).

    Returns:
      ``"collection/module/.../name"``.
    """
    return "/".join(key)


def load_pretrained(
    variables: Any, path: str, *, model_name: str, num_classes: int | None = None
) -> tuple[Any, LoadReport]:
    """Copies the weights of a local file into freshly initialised Flax variables.

    Args:
      variables: the model's initialised variables (``{"params": ..., "batch_stats": ...}``)
        from `ResNet`, `ResNetClassifier` (backbone under ``backbone``), `VGG`, or any model
        holding a ResNet as the submodule ``backbone``.
      path: local weight file (see `read_weight_file`).
      model_name: one of `PRETRAINED_MODELS`, e.g. ``"resnet34"`` or ``"vgg16_bn"``; it
        selects the mapping, whatever the model's width (shapes are checked against the file).
      num_classes: the model's class count; checked against the head in ``variables``
        when given. The file's head is loaded only if its shape equals the model's.

    Returns:
      (new variables of the same structure with every mapped array replaced and cast to the
      variable's dtype, `LoadReport`).

    Raises:
      FileNotFoundError, ImportError: see `read_weight_file`.
      ValueError: an unknown model name, a corrupt file, ``num_classes`` disagreeing with
        the variables, or (all in one message naming the file) keys of the mapping missing
        from the file, file keys unknown to the mapping, shape mismatches and mapped
        variables the model lacks.
    """
    path = os.fspath(path)
    arrays, source = read_weight_file(path)
    arrays = {k: v for k, v in arrays.items() if not k.endswith("num_batches_tracked")}
    mapping = _mapping_for(model_name, source)
    frozen = isinstance(variables, flax.core.FrozenDict)
    flat = traverse_util.flatten_dict(flax.core.unfreeze(variables))
    prefix = _backbone_prefix(flat, mapping, model_name)

    def flax_key(entry: WeightMapping) -> tuple[str, ...]:
        if entry.role == BACKBONE:
            return (entry.target[0], *prefix, *entry.target[1:])
        return entry.target

    head_key = ("params", "head", "kernel")
    if num_classes is not None:
        if head_key not in flat:
            raise ValueError(f"num_classes={num_classes} given, but the model has no 'head'")
        if flat[head_key].shape[-1] != num_classes:
            raise ValueError(
                f"num_classes={num_classes}, but the model's head has "
                f"{flat[head_key].shape[-1]} outputs"
            )

    report = LoadReport(path=path, model_name=model_name, source=source)
    new_flat = dict(flat)
    loaded_keys = set()
    missing, mismatched, absent = [], [], []

    def load(entry: WeightMapping, key: tuple[str, ...], value: np.ndarray) -> None:
        new_flat[key] = jnp.asarray(value, dtype=flat[key].dtype)
        loaded_keys.add(key)
        report.loaded.append(f"{entry.source_key} -> {_path(key)}")

    # The head loads as a unit: all of it, or none of it.
    head = [entry for entry in mapping if entry.role == HEAD]
    if head_key not in flat:
        present = [entry.source_key for entry in head if entry.source_key in arrays]
        report.skipped += [f"{key} (the model has no head)" for key in present]
    else:
        in_file = all(entry.source_key in arrays for entry in head)
        fits = in_file and all(
            flax_key(entry) in flat
            and arrays[entry.source_key].shape
            == _file_shape(tuple(flat[flax_key(entry)].shape), entry.layout)
            for entry in head
        )
        if fits:
            for entry in head:
                load(entry, flax_key(entry), _to_flax(arrays[entry.source_key], entry.layout))
        else:
            report.head_reinitialized = True
            if in_file:
                kernel = _to_flax(arrays[head[0].source_key], head[0].layout)
                reason = (
                    f"the file's head maps {kernel.shape[0]} features to {kernel.shape[-1]} "
                    f"classes, the model's {flat[head_key].shape[0]} to "
                    f"{flat[head_key].shape[-1]}"
                )
            elif any(entry.source_key in arrays for entry in head):
                reason = "the file has only part of the head"
            else:
                reason = "the file has no head"
            report.notes.append(f"Head re-initialised: {reason}.")

    folds = []
    for entry in mapping:
        key = flax_key(entry)
        if entry.role == HEAD:
            continue
        if entry.layout == FOLD_INTO_MEAN:
            folds.append((entry, key))
            continue
        if key not in flat:
            if entry.role == CLASSIFIER:
                if entry.source_key in arrays:
                    report.skipped.append(f"{entry.source_key} (the model has no {key[1]})")
            else:
                absent.append(_path(key))
            continue
        if entry.layout == ONES:
            load(entry, key, np.ones(flat[key].shape))
            continue
        if entry.source_key not in arrays:
            missing.append(entry.source_key)
            continue
        array = arrays[entry.source_key]
        expected = _file_shape(tuple(flat[key].shape), entry.layout)
        if array.shape == expected:
            load(entry, key, _to_flax(array, entry.layout))
            continue
        axis = _in_channel_axis(entry.layout)
        rgb_to_grey = (
            entry.first_conv
            and array.ndim == 4
            and array.shape[axis] == 3
            and expected[axis] != 3
            and array.shape[:axis] + array.shape[axis + 1 :]
            == expected[:axis] + expected[axis + 1 :]
        )
        if rgb_to_grey:
            grey = array.sum(axis=axis, keepdims=True)
            load(entry, key, _to_flax(np.repeat(grey, expected[axis], axis=axis), entry.layout))
            report.notes.append(
                f"{entry.source_key}: the RGB kernel was summed over its 3 input channels for "
                + (
                    "the 1-channel model."
                    if expected[axis] == 1
                    else f"each of the model's {expected[axis]} input channels."
                )
            )
            continue
        mismatched.append(f"{entry.source_key}: file {array.shape}, model needs {expected}")

    for entry, key in folds:
        if entry.source_key not in arrays:
            missing.append(entry.source_key)
        elif key in loaded_keys:
            bias = arrays[entry.source_key]
            if bias.shape != tuple(flat[key].shape):
                mismatched.append(
                    f"{entry.source_key}: file {bias.shape}, model needs {tuple(flat[key].shape)}"
                )
                continue
            new_flat[key] = new_flat[key] - jnp.asarray(bias, dtype=flat[key].dtype)
            report.loaded.append(f"{entry.source_key} -> folded into {_path(key)}")
    if folds:
        report.notes.append(
            "Keras conv biases were folded into the moving means of the BatchNorms after them "
            "(exact)."
        )

    known = {entry.source_key for entry in mapping}
    unexpected = sorted(set(arrays) - known)
    if missing or unexpected or mismatched or absent:
        problems = [
            f"Cannot load {path} into {model_name} ({source} names):",
            f"  {len(missing)} missing key(s) in the file: {_listing(missing)}",
            f"  {len(unexpected)} unexpected key(s) in the file: {_listing(unexpected)}",
            f"  {len(mismatched)} shape mismatch(es): {_listing(mismatched)}",
        ]
        if absent:
            problems.append(
                f"  {len(absent)} mapped variable(s) absent from the model (another "
                f"architecture or norm?): {_listing(absent)}"
            )
        raise ValueError("\n".join(problems))

    if model_name == "inception_v3":
        report.notes.append(
            "InceptionV3 weights (torchvision's are ported from TensorFlow) expect RGB scaled "
            "to [-1, 1] (x / 127.5 - 1)."
        )
        if source == "keras":
            report.notes.append(
                "Keras InceptionV3 BatchNorms have no scale (set to 1) and its branch average "
                "pools exclude the padding: build the model with pool_count_include_pad=False "
                "to reproduce it."
            )
    elif source == "keras":
        report.notes.append(
            "Keras weights expect Caffe preprocessing (BGR channel order, ImageNet mean "
            "subtracted, no scaling)."
        )
        if model_name == "resnet50":
            report.notes.append(
                "Keras ResNet50 is ResNet v1 (stride in the first 1x1 conv; BatchNorm epsilon "
                "1.001e-5): build the ResNet with stride_in_1x1=True to reproduce it."
            )
    report.reinitialized = sorted(_path(key) for key in flat if key not in loaded_keys)
    new_variables = traverse_util.unflatten_dict(new_flat)
    return (flax.core.freeze(new_variables) if frozen else new_variables), report


# ---------------------------------------------------------------------------------------------
# Fine-tuning helpers.


def backbone_mask(params: Any, head_names: Sequence[str] = ("head",)) -> Any:
    """Marks the backbone parameters, for `optax.multi_transform` or `optax.masked`.

    Args:
      params: the ``params`` collection.
      head_names: top-level module names that are not backbone (``("head",)`` for the
        medjax classifiers; add e.g. a decoder's name for a segmentation model).

    Returns:
      A pytree of the structure of ``params`` with True for every leaf except those under
      a top-level module in ``head_names``.
    """

    def is_backbone(path: tuple, _: Any) -> bool:
        return getattr(path[0], "key", None) not in head_names

    return jax.tree_util.tree_map_with_path(is_backbone, params)


def make_finetune_optimizer(
    base_tx_fn: Callable[[], optax.GradientTransformation],
    *,
    freeze_steps: int,
    backbone_lr_multiplier: float = 1.0,
    head_names: Sequence[str] = ("head",),
) -> optax.GradientTransformation:
    """An optimizer that trains only the head first, then everything.

    The backbone (see `backbone_mask`) and the head each get their own ``base_tx_fn()``. The
    backbone's updates are multiplied by 0 for its first ``freeze_steps`` updates and by
    ``backbone_lr_multiplier`` afterwards, so its parameters (weight decay included, when it
    is part of the base transformation) do not move while frozen. Gradients are still
    computed for the backbone, and a stateful base (e.g. Adam) keeps accumulating its
    moments during the frozen phase.

    Args:
      base_tx_fn: builds the base transformation, e.g. ``lambda: optax.adamw(schedule)``.
      freeze_steps: number of initial updates that leave the backbone unchanged (>= 0).
      backbone_lr_multiplier: scale of the backbone's updates after the frozen phase.
      head_names: see `backbone_mask`.

    Returns:
      The `optax.GradientTransformation` (an `optax.multi_transform`).

    Raises:
      ValueError: a negative ``freeze_steps``.
    """
    if freeze_steps < 0:
        raise ValueError(f"freeze_steps must be >= 0, got {freeze_steps}")

    def backbone_scale(step: jnp.ndarray) -> jnp.ndarray:
        return jnp.where(step < freeze_steps, 0.0, backbone_lr_multiplier)

    def labels(params: Any) -> Any:
        return jax.tree.map(
            lambda backbone: BACKBONE if backbone else HEAD, backbone_mask(params, head_names)
        )

    return optax.multi_transform(
        {
            BACKBONE: optax.chain(base_tx_fn(), optax.scale_by_schedule(backbone_scale)),
            HEAD: base_tx_fn(),
        },
        labels,
    )
