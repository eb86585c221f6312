"""Model registry: `config.model.name` -> a Flax Linen module built from `config.model`."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn

# Keys of `config.model` that the trainer reads (local pretrained weights, the fine-tuning
# schedule) and that are not module attributes; `build_model` drops them.
NON_MODULE_KEYS = (
    "init_from",
    "freeze_backbone_steps",
    "backbone_lr_multiplier",
    "flow_class_rule",  # perfusion: how the flow class is read from the outputs.
)


def _unet(**kwargs: Any) -> nn.Module:
    from medjax.models.unet import UNet

    return UNet(**kwargs)


def _resnet(depth: int, **kwargs: Any) -> nn.Module:
    from medjax.models.resnet import ResNetClassifier

    return ResNetClassifier(depth=depth, **kwargs)


def _vgg(depth: int, batch_norm: bool, **kwargs: Any) -> nn.Module:
    from medjax.models.vgg import VGG

    return VGG(depth=depth, batch_norm=batch_norm, **kwargs)


def _heatmap_resnet(**kwargs: Any) -> nn.Module:
    from medjax.models.keypoints import HeatmapResNet

    return HeatmapResNet(**kwargs)


def _deeplabv3(**kwargs: Any) -> nn.Module:
    from medjax.models.deeplabv3 import DeepLabV3

    return DeepLabV3(**kwargs)


def _r2plus1d_ef(**kwargs: Any) -> nn.Module:
    from medjax.models.r2plus1d import EFRegressor

    return EFRegressor(**kwargs)


def _convlstm(**kwargs: Any) -> nn.Module:
    from medjax.models.convlstm import ConvLSTMClassifier

    return ConvLSTMClassifier(**kwargs)


def _inception_v3(**kwargs: Any) -> nn.Module:
    from medjax.models.inception import InceptionV3

    return InceptionV3(**kwargs)


def _cnn_rnn(**kwargs: Any) -> nn.Module:
    from medjax.models.inception import CnnRnnClassifier

    return CnnRnnClassifier(**kwargs)


def _vae(**kwargs: Any) -> nn.Module:
    from medjax.models.vae import VAE

    return VAE(**kwargs)


def _dae(**kwargs: Any) -> nn.Module:
    from medjax.models.vae import DenoisingAutoencoder

    return DenoisingAutoencoder(**kwargs)


def _lstm_classifier(**kwargs: Any) -> nn.Module:
    from medjax.models.sequence import LSTMClassifier

    return LSTMClassifier(**kwargs)


MODELS = {
    "cnn_rnn": _cnn_rnn,
    "convlstm": _convlstm,
    "inception_v3": _inception_v3,
    "deeplabv3": _deeplabv3,
    "heatmap_resnet": _heatmap_resnet,
    "r2plus1d_ef": _r2plus1d_ef,
    "unet": _unet,
    "resnet18": functools.partial(_resnet, 18),
    "resnet34": functools.partial(_resnet, 34),
    "resnet50": functools.partial(_resnet, 50),
    "vgg16": functools.partial(_vgg, 16, False),
    "vgg16_bn": functools.partial(_vgg, 16, True),
    "vae": _vae,
    "dae": _dae,
    "lstm_classifier": _lstm_classifier,
}


def pretrained_name(model_config: Any) -> str:
    """The ImageNet architecture whose weights `config.model.init_from` must hold."""
    name = model_config.name
    if name in ("heatmap_resnet", "deeplabv3"):
        return f"resnet{model_config.depth}"
    if name.startswith(("resnet", "vgg")):
        return name
    if name in ("inception_v3", "cnn_rnn"):
        return "inception_v3"
    raise ValueError(
        f"config.model.init_from is set, but {name!r} has no ImageNet counterpart; "
        "pretrained weights load into the VGG, ResNet and InceptionV3 models only."
    )


def build_model(model_config: Any, **overrides: Any) -> nn.Module:
    """Builds the module named by `model_config.name`, passing the other keys as attributes.

    The keys in `NON_MODULE_KEYS` are not passed.

    Raises:
      ValueError: an unknown model name, or a key the module does not accept.
    """
    kwargs = dict(model_config)
    name = kwargs.pop("name")
    for key in NON_MODULE_KEYS:
        kwargs.pop(key, None)
    if name not in MODELS:
        raise ValueError(
            f"config.model.name={name!r} is not a known model; known: {', '.join(sorted(MODELS))}."
        )
    kwargs.update(overrides)
    try:
        return MODELS[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"config.model does not fit model {name!r}: {e}") from None
