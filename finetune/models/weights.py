"""Reading checkpoints safely and mapping timm / torchvision / lukemelas layouts onto ours.

Every file is read with `torch.load(weights_only=True)` or safetensors: a checkpoint
that would run code when unpickled is refused before anything in it runs.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from finetune.errors import ConfigError
from finetune.models.efficientnet import EfficientNet, EfficientNetConfig

StateDict = dict[str, torch.Tensor]
HEAD_KEYS = ("classifier.weight", "classifier.bias")
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
PREFIXES = ("model.", "module.", "_orig_mod.")


class WeightsError(ConfigError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


def read_checkpoint(path: str | Path) -> StateDict:
    """Load tensors from .pth/.pt/.bin/.ckpt (weights only) or .safetensors, unwrapped."""
    return unwrap_state_dict(load_safely(path), str(Path(path).expanduser()))


def load_safely(path: str | Path, mmap: bool = False) -> object:
    """The object in a checkpoint file, read without ever unpickling code; clear errors otherwise.

    `mmap=True` maps tensor data instead of reading it, for callers that only look at
    metadata and shapes of a (zip-format) checkpoint.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file not found: '{path}'")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        blocked = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), None)
        if blocked:
            raise WeightsError(
                f"refused to load '{path}': it holds pickled objects that could run code ({blocked}); "
                "only tensors are accepted - re-save it with torch.save(model.state_dict()) or as .safetensors"
            ) from None
        raise WeightsError(f"'{path}' is truncated or not a PyTorch/safetensors checkpoint (not a tensor pickle)") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, SafetensorError) as e:
        raise WeightsError(
            f"'{path}' is truncated or not a PyTorch/safetensors checkpoint ({_first_line(str(e))}); "
            "download or save it again"
        ) from None
    return obj


def unwrap_state_dict(obj: object, origin: str = "state dict") -> StateDict:
    """Find the tensor dict inside Lightning/DDP/compile wrappers and strip their prefixes."""
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not _is_tensor_dict(obj) or not obj:
        raise WeightsError(f"{origin} holds no model weights (expected a dict of tensors or a Lightning checkpoint)")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def detect_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """Which implementation wrote these keys: ours, timm, torchvision or lukemelas."""
    if "stem.conv.weight" in sd:
        return "ours"
    if "conv_stem.weight" in sd:
        return "timm"
    if "features.0.0.weight" in sd:
        return "torchvision"
    if "_conv_stem.weight" in sd:
        return "lukemelas"
    sample = ", ".join(list(sd)[:3])
    raise WeightsError(
        f"unrecognised checkpoint layout (first keys: {sample}); expected EfficientNet weights "
        "from this toolkit, timm, torchvision or lukemelas' EfficientNet-PyTorch"
    )


def to_our_layout(sd: Mapping[str, torch.Tensor], stage_sizes: list[int]) -> StateDict:
    """Rename any supported layout's keys to ours; stage sizes place lukemelas' flat block list."""
    layout = detect_layout(sd)
    if layout == "ours":
        return dict(sd)
    rename = {"timm": _timm_key, "torchvision": _torchvision_key, "lukemelas": _lukemelas_key}[layout]
    ctx = _layout_context(sd, layout, stage_sizes)
    out: StateDict = {}
    for key, value in sd.items():
        new = rename(key, ctx)
        out[new if new is not None else f"<unmapped {layout}>.{key}"] = value
    return out


def from_our_layout(sd: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                    stage_sizes: list[int]) -> StateDict:
    """`sd` (our layout) under the key names of `target`, a state dict in any layout `to_our_layout` reads.

    The inverse of `to_our_layout`, derived from it (each of `target`'s keys is renamed to ours and
    looked up in `sd`), so both directions share one table; it writes files other libraries load
    (`finetune-export --format hub`: timm's layout). Every key of either side must find its partner.
    """
    layout = detect_layout(target)
    if layout == "ours":
        names = {key: key for key in target}
    else:
        rename = {"timm": _timm_key, "torchvision": _torchvision_key, "lukemelas": _lukemelas_key}[layout]
        ctx = _layout_context(target, layout, stage_sizes)
        names = {key: rename(key, ctx) for key in target}
    missing = sorted(key for key, ours in names.items() if ours not in sd)
    unexpected = sorted(set(sd) - set(names.values()))
    misshaped = sorted(f"{key} {tuple(sd[ours].shape)} vs {tuple(target[key].shape)}" for key, ours in names.items()
                       if ours in sd and sd[ours].shape != target[key].shape)
    if missing or unexpected or misshaped:
        raise WeightsError(f"these weights do not fit the {layout} layout given: {_listing('missing', missing)}, "
                           f"{_listing('unexpected', unexpected)}, {_listing('mis-shaped', misshaped)}")
    return {key: sd[ours] for key, ours in names.items()}


def load_into(model: EfficientNet, sd: Mapping[str, torch.Tensor], origin: str = "checkpoint") -> list[str]:
    """Load converted weights strictly; a head of another size is left fresh. Returns dropped keys."""
    ours = to_our_layout(sd, [len(s) for s in model.stages])
    expected = model.state_dict()
    dropped = []
    if any(k in ours and ours[k].shape != expected[k].shape for k in HEAD_KEYS if k in expected) or not model.num_classes:
        dropped = [k for k in HEAD_KEYS if k in ours]
        for k in dropped:
            ours.pop(k)
        model.reset_classifier(model.num_classes)
    optional = set(HEAD_KEYS) | {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(k for k in expected if k not in ours and k not in optional)
    unexpected = sorted(k for k in ours if k not in expected)
    misshaped = sorted(
        f"{k} {tuple(ours[k].shape)} vs {tuple(expected[k].shape)}"
        for k in ours if k in expected and ours[k].shape != expected[k].shape
    )
    if missing or unexpected or misshaped:
        guess = guess_variant(ours)
        hint = f"; it looks like a checkpoint of '{guess}'" if guess and guess != model.config.name else ""
        raise WeightsError(
            f"{origin} does not fit efficientnet '{model.config.name}'{hint}: "
            f"{_listing('missing', missing)}, {_listing('unexpected', unexpected)}, {_listing('mis-shaped', misshaped)}"
        )
    model.load_state_dict(ours, strict=False)
    return dropped


def guess_variant(ours: Mapping[str, torch.Tensor]) -> str | None:
    """Name the standard variant whose stem width and stage depths match these weights."""
    from finetune.models.scaling import VARIANTS

    stem = ours.get("stem.conv.weight")
    if stem is None:
        return None
    depths: dict[int, set[int]] = {}
    for key in ours:
        m = re.match(r"stages\.(\d+)\.(\d+)\.", key)
        if m:
            depths.setdefault(int(m[1]), set()).add(int(m[2]))
    found = [len(depths[i]) for i in sorted(depths)]
    lite = not any(".se." in k for k in ours)
    for name, scaling in VARIANTS.items():
        cfg = EfficientNetConfig(name=name, scaling=scaling, lite=name.startswith("lite"))
        if cfg.lite == lite and cfg.stem_channels == stem.shape[0] and [s.repeats for s in cfg.scaled_stages()] == found:
            if cfg.top_channels == ours.get("top.conv.weight", stem).shape[0]:
                return name
    return None


# --- per-layout key renaming -------------------------------------------------------------

_BN_OR_CONV = r"(weight|bias|running_mean|running_var|num_batches_tracked)"


def _layout_context(sd: Mapping[str, torch.Tensor], layout: str, stage_sizes: list[int]) -> dict:
    """Facts a renamer needs beyond one key: which blocks expand, where lukemelas blocks belong."""
    if layout == "timm":
        return {"expanding": {m[1] for k in sd if (m := re.match(r"(blocks\.\d+\.\d+)\.conv_pwl\.", k))}}
    if layout == "torchvision":
        heads = [int(m[1]) for k in sd if (m := re.match(r"features\.(\d+)\.0\.weight$", k))]
        expanding = {m[1] for k in sd if (m := re.match(r"(features\.\d+\.\d+)\.block\.3\.", k))}
        return {"top": str(max(heads)), "expanding": expanding}
    flat = {int(m[1]) for k in sd if (m := re.match(r"_blocks\.(\d+)\.", k))}
    places, n = {}, 0
    for s, size in enumerate(stage_sizes):
        for b in range(size):
            places[n] = (s, b)
            n += 1
    for extra in sorted(i for i in flat if i not in places):  # more blocks than the model: keep them visible
        places[extra] = ("x", extra)
    return {"places": places}


def _outer_key(key: str, names: Mapping[str, str], stem_bn: str, top_bn: str) -> str | None:
    """Stem, top conv and classifier keys, which lie outside the blocks in every layout."""
    if key in names:
        return names[key]
    for theirs, ours in ((stem_bn, "stem.bn"), (top_bn, "top.bn")):
        if m := re.fullmatch(re.escape(theirs) + r"\." + _BN_OR_CONV, key):
            return f"{ours}.{m[1]}"
    return None


def _timm_key(key: str, ctx: dict) -> str | None:
    outer = {"conv_stem.weight": "stem.conv.weight", "conv_head.weight": "top.conv.weight",
             "classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"}
    if (new := _outer_key(key, outer, "bn1", "bn2")) is not None:
        return new
    m = re.fullmatch(r"(blocks\.(\d+)\.(\d+))\.(.+)", key)
    if not m:
        return None
    prefix, rest = f"stages.{m[2]}.{m[3]}", m[4]
    if m[1] in ctx["expanding"]:
        parts = {"conv_pw": "expand.conv", "bn1": "expand.bn", "conv_dw": "dw.conv", "bn2": "dw.bn",
                 "conv_pwl": "project.conv", "bn3": "project.bn"}
    else:
        parts = {"conv_dw": "dw.conv", "bn1": "dw.bn", "conv_pw": "project.conv", "bn2": "project.bn"}
    parts |= {"se.conv_reduce": "se.reduce", "se.conv_expand": "se.expand"}
    return _rename_part(prefix, rest, parts)


def _torchvision_key(key: str, ctx: dict) -> str | None:
    if key.startswith("classifier.1."):
        return "classifier." + key.removeprefix("classifier.1.")
    if m := re.fullmatch(r"features\.(\d+)\.([01])\." + _BN_OR_CONV, key):
        where = "stem" if m[1] == "0" else "top" if m[1] == ctx["top"] else None
        if where:
            return f"{where}.{'conv' if m[2] == '0' else 'bn'}.{m[3]}"
    m = re.fullmatch(r"(features\.(\d+)\.(\d+))\.block\.(.+)", key)
    if not m:
        return None
    prefix = f"stages.{int(m[2]) - 1}.{m[3]}"
    order = ["expand", "dw", "se", "project"] if m[1] in ctx["expanding"] else ["dw", "se", "project"]
    parts = {}
    for i, name in enumerate(order):
        if name == "se":
            parts |= {f"{i}.fc1": "se.reduce", f"{i}.fc2": "se.expand"}
        else:
            parts |= {f"{i}.0": f"{name}.conv", f"{i}.1": f"{name}.bn"}
    return _rename_part(prefix, m[4], parts)


def _lukemelas_key(key: str, ctx: dict) -> str | None:
    outer = {"_conv_stem.weight": "stem.conv.weight", "_conv_head.weight": "top.conv.weight",
             "_fc.weight": "classifier.weight", "_fc.bias": "classifier.bias"}
    if (new := _outer_key(key, outer, "_bn0", "_bn1")) is not None:
        return new
    m = re.fullmatch(r"_blocks\.(\d+)\.(.+)", key)
    if not m:
        return None
    s, b = ctx["places"][int(m[1])]
    parts = {"_expand_conv": "expand.conv", "_bn0": "expand.bn", "_depthwise_conv": "dw.conv", "_bn1": "dw.bn",
             "_se_reduce": "se.reduce", "_se_expand": "se.expand", "_project_conv": "project.conv", "_bn2": "project.bn"}
    return _rename_part(f"stages.{s}.{b}", m[2], parts)


def _rename_part(prefix: str, rest: str, parts: Mapping[str, str]) -> str | None:
    for old, new in parts.items():
        if rest.startswith(old + "."):
            return f"{prefix}.{new}.{rest[len(old) + 1:]}"
    return None


def _is_tensor_dict(obj: Mapping) -> bool:
    return bool(obj) and sum(isinstance(v, torch.Tensor) for v in obj.values()) > len(obj) // 2


def _listing(what: str, keys: list[str], show: int = 4) -> str:
    if not keys:
        return f"0 {what}"
    more = f", ... {len(keys) - show} more" if len(keys) > show else ""
    return f"{len(keys)} {what} ({', '.join(keys[:show])}{more})"


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.strip().splitlines() if line.strip()), "unknown error")[:200]
