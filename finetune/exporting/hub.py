"""`finetune-export --format hub`: a checkpoint as a timm model folder with a model card, and its upload.

    finetune-export outputs/train/<time>/checkpoints/<best>.ckpt --format hub --output deploy/pets-b0 [--push user/pets-b0]

The folder is what timm and the Hugging Face hub expect: config.json (the timm architecture that
computes what our padding does, the class names, the preprocessing the checkpoint recorded),
model.safetensors in timm's key layout and README.md, a model card. `timm.create_model(
"local-dir:<folder>", pretrained=True)` loads it as it is (`hf-hub:<user>/<name>` once pushed), and
`model.pretrained=local-dir:<folder>` fine-tunes from it here. timm writes config and weights
(`save_for_hf`) and the card's frame (`generate_readme`). The folder is built under a temporary name,
loaded back by timm and checked against our network, and only then moved to the output.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import nn

from finetune.errors import ConfigError
from finetune.exporting.formats import CHECK_BATCH, PARITY_LIMIT, ExportMismatchError, example_input, relative_error
from finetune.fileio import writable_folder
from finetune.models import EfficientNet
from finetune.models.scaling import VARIANTS
from finetune.models.sources import TF_SETTINGS, TORCH_SETTINGS
from finetune.models.weights import from_our_layout, load_safely

if TYPE_CHECKING:
    from finetune.training.module import FineTuneModule

FOLDER_FILES = ("config.json", "model.safetensors", "README.md")
#: Keys timm's data config and our Preprocessing share, theirs -> ours, for the check of what the folder says.
DATA_KEYS = {"interpolation": "interpolation", "crop_pct": "crop_fraction", "mean": "mean", "std": "std"}


def timm_architecture(model: EfficientNet) -> str:
    """The timm architecture that computes what `model` does: TF 'same' padding is timm's `tf_` ports."""
    name = model.config.name
    if name not in VARIANTS:
        raise ConfigError(f"timm has no architecture for '{name}' (a compound coefficient of its own), so no timm "
                          "folder can hold it; export it with --format onnx or --format safetensors")
    return f"{'tf_' if model.config.padding == 'same' else ''}efficientnet_{name}"


def timm_model(model: EfficientNet) -> nn.Module:
    """timm's network of that architecture holding `model`'s weights, its BN eps passed where it is not timm's default."""
    import timm

    arch = timm_architecture(model)
    default_eps = (TF_SETTINGS if arch.startswith("tf_") else TORCH_SETTINGS)[1]
    eps = {} if model.config.bn_eps == default_eps else {"bn_eps": model.config.bn_eps}
    theirs = timm.create_model(arch, num_classes=model.num_classes, **eps)
    theirs.load_state_dict(from_our_layout(model.state_dict(), theirs.state_dict(), [len(s) for s in model.stages]))
    # The architecture's default cfg names ImageNet weights (tag, license) these are not.
    theirs.pretrained_cfg = {k: v for k, v in theirs.pretrained_cfg.items() if k not in ("tag", "license")}
    return theirs.eval()


def check_folder(folder: Path, module: FineTuneModule, batch: int = CHECK_BATCH) -> float:
    """Relative error of timm's model loaded from `folder` against ours; its data config must be the checkpoint's."""
    import timm
    from timm.data import resolve_data_config

    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    pre = module.preprocessing
    data = resolve_data_config({}, model=loaded)
    said = {ours: tuple(data[theirs]) if ours in ("mean", "std") else data[theirs] for theirs, ours in DATA_KEYS.items()}
    recorded = {ours: getattr(pre, ours) for ours in DATA_KEYS.values()}
    if said != recorded or tuple(data["input_size"]) != (3, pre.resolution, pre.resolution):
        raise ExportMismatchError(f"timm reads other preprocessing from {folder}: {data}, not the checkpoint's {pre}")
    x = example_input(batch, pre.resolution, seed=1)
    with torch.no_grad():
        return relative_error(loaded(x).numpy(), module.model.eval()(x).numpy())


def run_record(checkpoint: Path) -> dict[str, Any]:
    """What the run recorded about itself: the command (Hydra's overrides), metrics.json, the data the checkpoint names.

    A run folder holds `checkpoints/`, `metrics.json` and `.hydra/`; what is missing is said so in the card.
    """
    run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    overrides = run / ".hydra" / "overrides.yaml"
    metrics = run / "metrics.json"
    ckpt = load_safely(checkpoint, mmap=True)
    states = {k: v for k, v in ckpt.items() if isinstance(v, Mapping) and isinstance(v.get("data"), Mapping)}
    datamodule, state = next(iter(states.items()), ("", {}))
    splits = state.get("data", {}).get("splits", {})
    return {
        "pretrained": ckpt["hyper_parameters"]["model"].get("pretrained"),  # from_checkpoint's module holds None
        "command": ("finetune " + " ".join(yaml.safe_load(overrides.read_text()) or [])) if overrides.is_file() else None,
        "metrics": json.loads(metrics.read_text()) if metrics.is_file() else None,
        "datamodule": datamodule,
        "root": (ckpt.get("datamodule_hyper_parameters") or {}).get("root"),
        "images": {split: info["count"] for split, info in splits.items()},
        "run": run,
    }


def readme(module: FineTuneModule, checkpoint: Path, arch: str, name: str, load_as: str, check: dict[str, Any]) -> str:
    """The model card: how the model was trained and on what, what it scored, how to prepare an image and load it."""
    from timm.models._hub import generate_readme  # not re-exported by timm.models

    hp, cfg, pre = module.hparams, module.model.config, module.preprocessing
    record = run_record(checkpoint)
    classes = module.class_names
    source = record["pretrained"]
    base = {True: f"the released ImageNet weights of {cfg.name} (model.pretrained=true)", None: "no weights (from scratch)",
            False: "no weights (from scratch)"}.get(source, f"model.pretrained={source}")
    metrics = record["metrics"]
    if metrics is None:
        scores: Any = f"no metrics.json in {record['run']}"
    else:
        scores = {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in metrics.items() if k != "best_checkpoint"}
        best = Path(metrics.get("best_checkpoint") or "").name
        if best and best != checkpoint.name:
            scores["note"] = f"test metrics are those of the run's best checkpoint {best}; this card is of {checkpoint.name}"
    data = {"datamodule": record["datamodule"] or "not recorded", "root": record["root"] or "not recorded",
            **{f"{split} images": n for split, n in record["images"].items()}}
    card = {
        "tags": ["image-classification", "timm", "efficientnet", "effnet-finetune"],
        "license": "other",
        "description": (
            f"EfficientNet-{cfg.name.capitalize()} fine-tuned with effnet-finetune to tell {len(classes)} classes apart. "
            f"It is a timm model folder: `timm.create_model(\"{load_as}\", pretrained=True)` loads it, preprocessing and "
            "class names included. The run records no license: set the one your data and the base weights allow "
            "before sharing."),
        "details": {
            "Model Type": "Image classification",
            "Architecture": f"timm {arch} ({cfg.padding} padding, BN eps {cfg.bn_eps:g})",
            "Fine-tuned from": base,
            "Classes": classes if len(classes) <= 30 else f"{len(classes)}: {', '.join(classes[:30])}, ...",
            "Data": data,
            "Policy": dict(hp.get("finetune") or {}),
            "Optimizer": dict(hp.get("optim") or {}),
            "Training command": f"`{record['command']}`" if record["command"] else
                                f"not recorded (no .hydra/overrides.yaml in {record['run']})",
            "Metrics": scores,
            "Preprocessing": {
                "input": f"{pre.resolution}x{pre.resolution} RGB",
                "resize": f"shorter side to {pre.resize_size}, {pre.interpolation}",
                "crop": f"centre {pre.resolution}x{pre.resolution} (crop_pct {pre.crop_fraction:g})",
                "normalise": f"divide by 255, mean {list(pre.mean)}, std {list(pre.std)}",
            },
            "Export check": (f"timm's model loaded from this folder vs effnet-finetune's on a batch of {check['batch']}: "
                             f"max relative error {check['max_relative_error']:.2e} (limit {check['limit']:.0e})"),
        },
        "usage": (
            "```python\n"
            "import timm\n"
            "import torch\n"
            "from PIL import Image\n\n"
            f"model = timm.create_model(\"{load_as}\", pretrained=True).eval()\n"
            "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))\n"
            "with torch.no_grad():\n"
            "    probabilities = model(transform(Image.open(\"photo.jpg\").convert(\"RGB\"))[None]).softmax(-1)\n"
            "print(model.pretrained_cfg[\"label_names\"][int(probabilities.argmax())])\n"
            "```\n\n"
            f"Fine-tune it further with effnet-finetune: `finetune model={cfg.name} model.pretrained={load_as} ...`\n"),
    }
    return generate_readme(card, name)


def export_hub(checkpoint: str | Path, output: str | Path, push: str | None = None) -> dict[str, Any]:
    """Write the timm folder `output` (and upload it to `push`); what was written, with the check's result.

    Nothing reaches `output` where the check fails: a previous export there stays as it was.
    """
    from timm.models import save_for_hf

    from finetune.training.module import FineTuneModule

    if push is not None:
        _check_repo_id(push)
    output, checkpoint = Path(output).expanduser(), Path(checkpoint).expanduser()
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output '{output}' is a file; --format hub writes a folder: name one, e.g. {output.with_suffix('')}")
    writable_folder(output.parent)
    module = FineTuneModule.from_checkpoint(checkpoint)
    arch = timm_architecture(module.model)  # a φ model is refused before anything is written
    pre = module.preprocessing
    staged = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        save_for_hf(timm_model(module.model), str(staged), model_config={"label_names": module.class_names},
                    safe_serialization=True,
                    data_config={"input_size": (3, pre.resolution, pre.resolution), "mean": pre.mean, "std": pre.std,
                                 "interpolation": pre.interpolation, "crop_pct": pre.crop_fraction})
        # safetensors writes its file private (0600): give it config.json's mode, the umask's, to share it.
        shutil.copymode(staged / "config.json", staged / "model.safetensors")
        error = check_folder(staged, module)
        check = {"runtime": "timm local-dir", "batch": CHECK_BATCH, "max_relative_error": error, "limit": PARITY_LIMIT}
        if not error <= PARITY_LIMIT:
            raise ExportMismatchError(f"timm's model loaded from {output} differs from PyTorch: relative error "
                                      f"{error:.2e} > {PARITY_LIMIT:.0e} on a batch of {CHECK_BATCH}")
        load_as = f"hf-hub:{push}" if push else f"local-dir:{output}"
        name = push.split("/")[-1] if push else output.name
        (staged / "README.md").write_text(readme(module, checkpoint, arch, name, load_as, check), encoding="utf-8")
        _move_into(staged, output)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    summary = {"format": "hub", "files": list(FOLDER_FILES), "architecture": arch, "variant": module.model.config.name,
               "num_classes": module.model.num_classes, "resolution": pre.resolution, "padding": module.model.config.padding,
               "check": check}
    if push is not None:
        summary["pushed"] = push_folder(output, push)
    return summary


def _move_into(staged: Path, output: Path) -> None:
    """The checked folder to `output`: renamed whole where it is new, file by file over a previous export."""
    if not output.exists():
        os.replace(staged, output)
        return
    for name in FOLDER_FILES:
        os.replace(staged / name, output / name)


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        valid = False
    else:
        valid = "/" in repo_id
    if not valid:
        raise ConfigError(f"--push '{repo_id}' is no Hugging Face repository id; write <user>/<name>")


def push_folder(folder: Path, repo_id: str) -> str:
    """Upload the checked folder as it is; the commit's URL.

    Not timm's `push_to_hf_hub`: it serialises the model again and keeps a README the repository
    already has over our card. huggingface_hub takes the token from `hf auth login` or HF_TOKEN.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        repo = api.create_repo(repo_id, exist_ok=True)
        commit = api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder), allow_patterns=list(FOLDER_FILES),
                                   commit_message="Add a model fine-tuned with effnet-finetune")
    except Exception as e:  # noqa: BLE001 - network, authentication and HTTP errors all end in this one line
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise ConfigError(f"could not upload {folder} to {repo_id} ({type(cause).__name__}: {cause}); the folder is "
                          f"written and checked: log in (hf auth login) or set HF_TOKEN, then run "
                          f"`hf upload {repo_id} {folder}`") from e
    return str(commit.commit_url)
