"""`create_model`: the one public way to get an EfficientNet, with or without weights."""

from __future__ import annotations

import math
from numbers import Integral, Real

from finetune.models.efficientnet import PADDINGS, EfficientNet, EfficientNetConfig
from finetune.models.preprocessing import (
    DEFAULT_CROP_FRACTION, DEFAULT_INTERPOLATION, IMAGENET_MEAN, IMAGENET_STD, LITE_MEAN, LITE_STD, rgb_triple,
)
from finetune.models.scaling import VARIANTS, compound
from finetune.models.sources import resolve_pretrained, unknown_family
from finetune.models.weights import load_into
from finetune.errors import ConfigError

MODEL_NAMES = tuple(VARIANTS) + ("phi",)


def create_model(
    name: str,
    num_classes: int = 1000,
    pretrained: object = None,
    *,
    phi: float | None = None,
    padding: str | None = None,
    bn_eps: float | None = None,
    drop_rate: float | None = None,
    drop_path_rate: float = 0.2,
    resolution: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> EfficientNet:
    """Build b0..b7, lite0..lite4 or any compound coefficient (`name="phi", phi=2.5`).

    `pretrained`: None, True (the variant's default source), 'timm', 'timm:<tag>',
    'torchvision', a checkpoint path or a state dict. Padding, BN eps, input
    normalisation (mean/std), eval interpolation and crop follow the weights unless given
    here; a file or dict whose family nothing tells needs `padding` and `bn_eps`. A classifier of another size
    than `num_classes` is replaced by a fresh one.
    """
    name = str(name).lower()
    if name not in MODEL_NAMES:
        raise ConfigError(f"unknown model '{name}'; valid names: {', '.join(MODEL_NAMES)}")
    if name == "phi":
        if phi is None:
            raise ConfigError("model 'phi' needs a compound coefficient, e.g. create_model('phi', phi=2.5)")
        scaling = compound(float(phi))
    elif phi is not None:
        raise ConfigError(f"phi={phi} only applies to model 'phi'; '{name}' has fixed scaling")
    else:
        scaling = VARIANTS[name]
    _check(num_classes, resolution, padding, bn_eps, drop_rate, drop_path_rate)

    weights = resolve_pretrained(name, pretrained)
    lite = name.startswith("lite")
    default_mean, default_std = (LITE_MEAN, LITE_STD) if lite else (IMAGENET_MEAN, IMAGENET_STD)
    config = EfficientNetConfig(
        name=name if name != "phi" else f"phi{float(phi):g}",
        scaling=scaling,
        num_classes=num_classes,
        lite=lite,
        padding=padding or (weights and weights.padding) or "symmetric",
        bn_eps=bn_eps or (weights and weights.bn_eps) or 1e-5,
        drop_rate=scaling.dropout if drop_rate is None else drop_rate,
        drop_path_rate=drop_path_rate,
        resolution=resolution or (weights and weights.resolution) or scaling.resolution,
        mean=rgb_triple(mean, "mean") if mean is not None else (weights and weights.mean) or default_mean,
        std=rgb_triple(std, "std") if std is not None else (weights and weights.std) or default_std,
        interpolation=(weights and weights.interpolation) or DEFAULT_INTERPOLATION,
        crop_fraction=(weights and weights.crop_fraction) or DEFAULT_CROP_FRACTION,
        weights=weights.origin if weights else None,
    )
    model = EfficientNet(config)
    if weights is not None:
        load_into(model, weights.state_dict, origin=weights.origin)  # a wrong variant is the first thing to hear
        if weights.padding is None and (padding is None or bn_eps is None):
            raise unknown_family(weights.origin)
    return model


def _check(num_classes, resolution, padding, bn_eps, drop_rate, drop_path_rate) -> None:
    if not isinstance(num_classes, Integral) or isinstance(num_classes, bool) or num_classes < 0:
        raise ConfigError(f"num_classes must be an integer >= 0, got {num_classes!r}")
    if resolution is not None and (not isinstance(resolution, Integral) or isinstance(resolution, bool) or resolution < 32):
        raise ConfigError(f"resolution must be an integer >= 32 (the network downsamples 32x), got {resolution!r}")
    if padding is not None and padding not in PADDINGS:
        raise ConfigError(f"unknown padding '{padding}'; valid: {', '.join(PADDINGS)}")
    if bn_eps is not None and (not isinstance(bn_eps, Real) or not 0 < bn_eps < 1):
        raise ConfigError(f"bn_eps must be a number in (0, 1), got {bn_eps!r}")
    for key, value in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
        if value is not None and (not isinstance(value, Real) or not 0 <= value < 1 or math.isnan(value)):
            raise ConfigError(f"{key} must be in [0, 1), got {value!r}")

