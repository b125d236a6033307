"""`validate_config`: every value a user can set, checked before any checkpoint, data or weights are read.

Without it a wrong value surfaces wherever it is first used: after half a minute of
download retries, as Hydra's multi-line "Error in call to target", as a torch traceback
mid-epoch, or not at all (`trainer.max_epochs=0` exits 0 having done nothing). Each
group is a table of `Rule`s, one per key, checked in table order (so `model.phi` is
judged before the `model.resolution` derived from it); cross-key checks follow. Every
failure is one `ConfigError` line naming the full key.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import warnings
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
from lightning.pytorch.accelerators import AcceleratorRegistry, CUDAAccelerator, MPSAccelerator
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from finetune.configuration.rules import (
    BOOL,
    FRACTION,
    PATH,
    SEED,
    STRING,
    WORD,
    Rule,
    either,
    integer,
    is_integer,
    name,
    number,
    one_of,
    optional,
)
from finetune.datamodules.base import ImageClassificationDataModule
from finetune.errors import ConfigError
from finetune.models import MODEL_NAMES
from finetune.models.efficientnet import BASE_STAGES, PADDINGS
from finetune.models.sources import check_pretrained
from finetune.training.features import check_cacheable
from finetune.training.module import DEFAULT_OPTIM, OPTIM_RULES
from finetune.training.policies import POLICIES, FinetunePolicy, finetune_rules

# --------------------------------------------------------------------------- tables

NUM_STAGES = len(BASE_STAGES)
RESOLUTION = Rule(lambda v: is_integer(v) and v >= 32, "an integer >= 32 (EfficientNet downsamples 32x)",
                  hint="e.g. model.resolution=224")
PRETRAINED_KINDS = "true, false, null, 'timm', 'timm:<tag>', 'torchvision', 'package' or a checkpoint path"
#: The metrics FineTuneModule logs per epoch that a checkpoint or early stopping may watch, and their better direction.
MONITORED = {"val/acc": "max", "val/acc_top5": "max", "val/balanced_acc": "max", "val/loss": "min",
             "train/acc": "max", "train/epoch_loss": "min", "train/loss": "min"}

TOP: dict[str, Rule] = {
    "task_name": WORD,
    "run_name": STRING,
    "seed": SEED,
    "ckpt_path": optional(PATH),
    "test_after_fit": BOOL,
    "label_smoothing": number(0, 1, hi_open=True),
}
PATHS: dict[str, Rule] = {"data_dir": PATH, "output_dir": PATH, "tensorboard_dir": PATH}

MODEL: dict[str, Rule] = {
    "name": name("model", MODEL_NAMES, label="valid names"),
    "phi": number(0),  # the key exists for model=phi only
    "pretrained": Rule(lambda v: v is None or isinstance(v, (bool, str)), PRETRAINED_KINDS),
    "resolution": RESOLUTION,
    "drop_rate": optional(number(0, 1, hi_open=True)),
    "drop_path_rate": optional(number(0, 1, hi_open=True)),
    "padding": optional(one_of(*PADDINGS)),
    "bn_eps": optional(number(0, 1, lo_open=True, hi_open=True)),
    "grad_checkpointing": BOOL,
}

FINETUNE = finetune_rules(NUM_STAGES)
OPTIM = OPTIM_RULES


def _precisions() -> tuple[Any, ...]:
    """Lightning's accepted `precision` values (64, "bf16-mixed", ...), from its own type."""
    return tuple(choice for literal in get_args(_PRECISION_INPUT) for choice in get_args(literal))


TRAINER: dict[str, Rule] = {
    "accelerator": one_of("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())),
    "devices": Rule(
        lambda v: (v == "auto" or (is_integer(v) and (v >= 1 or v == -1))
                   or (isinstance(v, str) and all(p.strip().isdigit() for p in v.rstrip(",").split(",")) or v == "-1")
                   or (isinstance(v, list) and v != [] and all(is_integer(i) and i >= 0 for i in v) and len(set(v)) == len(v))),
        "an integer >= 1, -1 (every device), 'auto' or a list of device indices",
    ),
    "num_nodes": integer(1),
    "strategy": one_of("auto", *StrategyRegistry.available_strategies()),
    "precision": optional(one_of(*_precisions())),
    # 0 epochs (or 0 training batches) would exit 0 having trained nothing.
    "max_epochs": integer(1),
    "limit_train_batches": optional(either(integer(1), Rule(lambda v: isinstance(v, float) and 0 < v <= 1,
                                                             "a fraction in (0.0, 1.0]"))),
    "limit_val_batches": optional(either(integer(0), FRACTION)),
    "limit_test_batches": optional(either(integer(0), FRACTION)),
    "limit_predict_batches": optional(either(integer(0), FRACTION)),
    "val_check_interval": optional(either(integer(1), FRACTION)),
    "check_val_every_n_epoch": optional(integer(1)),
    "accumulate_grad_batches": integer(1),
    "log_every_n_steps": optional(integer(0)),
    "num_sanity_val_steps": optional(integer(-1)),
    "gradient_clip_val": optional(number(0)),
    "gradient_clip_algorithm": optional(one_of("norm", "value")),
    "benchmark": optional(BOOL),
    "deterministic": optional(one_of(True, False, "warn")),
    "enable_progress_bar": optional(BOOL),
    "sync_batchnorm": BOOL,
    "compile": BOOL,  # this and ema_decay: EXTRA_TRAINER_KEYS
    "ema_decay": optional(number(0, 1, lo_open=True, hi_open=True)),
}
#: trainer.* keys that are finetune's own, not Lightning Trainer arguments.
EXTRA_TRAINER_KEYS = ("compile", "ema_decay")
#: Trainer arguments finetune sets itself, and what users do instead.
TRAINER_RESERVED = {
    "logger": "pick the logger group instead (logger=tensorboard or logger=csv)",
    "callbacks": "add to the callbacks group instead (+callbacks.<name>={_target_: ...})",
    "plugins": "remove it (finetune passes its atomic checkpoint writer)",
    "default_root_dir": "set paths.output_dir instead",
}

#: Rules for the keys of known logger and callback classes (any subclass); other classes get their signature checked.
INSTANTIATED: dict[type, dict[str, Rule]] = {
    TensorBoardLogger: {"save_dir": PATH, "name": optional(STRING), "version": optional(either(STRING, integer(0))),
                        "default_hp_metric": BOOL},
    CSVLogger: {"save_dir": PATH, "name": optional(STRING), "version": optional(either(STRING, integer(0)))},
    ModelCheckpoint: {"dirpath": optional(PATH), "filename": optional(STRING), "monitor": optional(one_of(*MONITORED)),
                      "mode": one_of("min", "max"), "save_top_k": integer(-1),
                      "save_last": optional(one_of(True, False, "link")),
                      "auto_insert_metric_name": BOOL, "every_n_epochs": optional(integer(0))},
    EarlyStopping: {"monitor": one_of(*MONITORED), "mode": one_of("min", "max"), "patience": integer(0),
                    "min_delta": number(0)},
    LearningRateMonitor: {"logging_interval": optional(one_of("step", "epoch")), "log_momentum": BOOL},
}

#: Models a comparison can switch between: every fixed variant (model=phi needs its own model.phi).
COMPARED_MODELS = tuple(m for m in MODEL_NAMES if m != "phi")
COMPARE: dict[str, Rule] = {
    "policies": Rule(lambda v: isinstance(v, list) and v != [] and all(p in POLICIES for p in v)
                     and len(set(v)) == len(v),
                     f"a list of distinct policies from {', '.join(POLICIES)}", hint="e.g. compare.policies=[frozen,full]"),
    "models": optional(Rule(lambda v: isinstance(v, list) and all(m in COMPARED_MODELS for m in v) and len(set(v)) == len(v),
                            f"a list of distinct models from {', '.join(COMPARED_MODELS)} ([]: the configured model)",
                            hint="e.g. compare.models=[lite0,lite1,lite2]")),
    "cache_frozen_features": BOOL,
    "cam_images": integer(0),
}

#: The datamodules' package name before it installed under the project's; the old one is accepted for one release.
MOVED_DATA_PACKAGE = ("datamodules.", "finetune.datamodules.")

# --------------------------------------------------------------------------- checks


def validate_config(cfg: DictConfig) -> None:
    """Raise a one-line ConfigError for the first bad value of `cfg`; warn about settings that silently do little.

    Reads no data, weights or checkpoint and touches no network: it runs first, so a
    typo costs seconds, not a download or an epoch.
    """
    top = _section(cfg, "", TOP, others="skip")
    _section(_group(cfg, "paths"), "paths", PATHS, others="skip")
    model = _section(_group(cfg, "model"), "model", MODEL, required=("name",), others=MODEL)
    data_node = _group(cfg, "data")
    data_class = _data_class(data_node)
    data = _section(data_node, "data", _data_rules(data_class), required=("_target_",))
    finetune = _section(_group(cfg, "finetune"), "finetune", FINETUNE, others=FINETUNE)
    optim = {**DEFAULT_OPTIM, **_section(_group(cfg, "optim"), "optim", OPTIM, others=OPTIM)}
    trainer = _trainer(_group(cfg, "trainer"))
    for group in ("logger", "callbacks"):  # either may be left out (~logger)
        for entry, node in (_group(cfg, group).items() if cfg.get(group) is not None else ()):
            _check_instantiated(node, f"{group}.{entry}")
    if cfg.get("compare") is not None:
        _section(_group(cfg, "compare"), "compare", COMPARE, others=COMPARE)

    _check_model(model, resuming=top.get("ckpt_path") is not None)
    _check_data(data, data_class, model)
    _check_training(finetune, optim, trainer, data)


def _value(node: DictConfig, key: str, full: str) -> Any:
    """`node[key]` unresolved below it; a `???` or a failing interpolation becomes a ConfigError naming its key."""
    try:
        return node[key]
    except MissingMandatoryValue as e:
        where = e.full_key or full
        raise ConfigError(f"{where} must be set (it is ??? in the config), e.g. {where}=<value>") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{e.full_key or full} cannot be resolved: {str(e).splitlines()[0]}") from None


def _resolved(node: DictConfig, key: str, full: str) -> Any:
    """`node[key]` as plain Python, everything below it resolved."""
    value = _value(node, key, full)
    if not isinstance(value, (DictConfig, ListConfig)):
        return value
    try:
        return OmegaConf.to_container(value, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{e.full_key or full} cannot be resolved: {str(e).splitlines()[0]}") from None


def _group(cfg: DictConfig, group: str) -> DictConfig:
    node = _value(cfg, group, group)
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{group} must be a config group, got {node!r}; pick one, e.g. {group}=<option>")
    return node


def _section(
    node: DictConfig, prefix: str, rules: Mapping[str, Rule], *,
    required: Collection[str] = (), others: Collection[str] | Literal["keep", "skip"] = "keep",
) -> dict[str, Any]:
    """The keys of `node`, resolved one by one and checked in table order.

    Keys without a rule are kept unchecked ("keep"), ignored ("skip"), or refused unless
    in the given collection (a group whose keys become a constructor's arguments).
    """
    full = (lambda key: f"{prefix}.{key}") if prefix else (lambda key: key)
    present = list(node.keys())  # `in node` is False for a `???` value, which must be reported, not skipped
    for key in required:
        if key not in present:
            raise ConfigError(f"{full(key)} must be set")
    keys = [k for k in rules if k in present] + ([] if others == "skip" else [k for k in present if k not in rules])
    values = {}
    for key in keys:
        if others not in ("keep", "skip") and key not in others:
            raise ConfigError(f"{full(key)} is unknown; valid {prefix} settings: {', '.join(sorted(others))}")
        values[key] = _resolved(node, key, full(key))
        if key in rules:
            rules[key].check(full(key), values[key])
    return values


def _check_model(model: dict[str, Any], resuming: bool) -> None:
    """`model.phi` exactly for model=phi; the weights source, unless a resumed run takes every weight from its checkpoint."""
    name_, phi = model["name"], model.get("phi")
    if name_ == "phi" and phi is None:
        raise ConfigError("model=phi needs a compound coefficient: set model.phi, e.g. model.phi=2.5")
    if name_ != "phi" and phi is not None:
        raise ConfigError(f"model.phi only applies to model=phi; '{name_}' has fixed scaling: remove model.phi")
    if not resuming:
        _check_pretrained(name_, model.get("pretrained"))


def _check_pretrained(model: str, pretrained: Any) -> None:
    """Which weights `model.pretrained` names, judged from names and files alone (no download)."""
    if pretrained is None or pretrained is False:
        return
    check_pretrained(model, pretrained)
    source = pretrained is True or pretrained in ("package", "torchvision", "timm") or pretrained.startswith(
        ("timm:", "hf-hub:", "local-dir:"))
    if not source and not Path(pretrained).expanduser().exists():
        raise ConfigError(f"model.pretrained='{pretrained}' is neither an existing file nor a weights source; "
                          f"use {PRETRAINED_KINDS}")


def _data_class(node: DictConfig) -> type:
    """The class `data._target_` names, imported (no data read) so that its own settings table checks the rest."""
    target = _section(node, "data", {"_target_": STRING}, required=("_target_",), others="skip")["_target_"]
    return import_class(data_target(target), "data._target_")


def _data_rules(data_class: type) -> dict[str, Rule]:
    """The datamodule's own rules (`ImageClassificationDataModule.SETTINGS`); mean/std may also be null here,
    which keeps the weights' own and never reaches the constructor (`build_datamodule` drops it)."""
    rules = data_class.settings() if issubclass(data_class, ImageClassificationDataModule) else {}
    nullable = {key: optional(rules[key]) for key in ("mean", "std") if key in rules}
    return {"_target_": STRING, **rules, **nullable}


def _check_data(data: dict[str, Any], target: type, model: dict[str, Any]) -> None:
    mean, std = data.get("mean"), data.get("std")
    if (mean is None) != (std is None):
        given, other = ("data.mean", "data.std") if mean is not None else ("data.std", "data.mean")
        raise ConfigError(
            f"{given} is set but {other} is not; normalisation needs both (e.g. data.mean=[0.5,0.5,0.5] "
            "data.std=[0.5,0.5,0.5]) or neither (the weights' own)"
        )
    resolution = model.get("resolution")
    if resolution is not None and data.get("resolution") not in (None, resolution):
        raise ConfigError(f"data.resolution={data['resolution']} differs from model.resolution={resolution}: "
                          f"images are resized to the model's; set model.resolution={data['resolution']} instead")
    accepted = accepted_keywords(target)
    for key in data:
        if accepted is not None and not key.startswith("_") and key not in accepted:
            raise ConfigError(f"data.{key} is not a setting of {target.__name__}; valid: {', '.join(sorted(accepted))}")


def _check_training(finetune: dict[str, Any], optim: dict[str, Any], trainer: dict[str, Any], data: dict[str, Any]) -> None:
    policy = FinetunePolicy(**finetune).validate(NUM_STAGES)  # its own cross-key rules (cache_features)
    if policy.cache_features:
        check_cacheable(data)
    if policy.name == "probe" and data.get("balance", "none") != "none":
        raise ConfigError(f"data.balance={data['balance']} does not apply to finetune=probe, whose convex fit weighs "
                          "every training image alike; set data.balance=none (data.examples_per_class does apply)")
    epochs, warmup = trainer["max_epochs"], optim["warmup_epochs"]
    if optim["scheduler"] == "constant" and warmup > 0:
        raise ConfigError(f"optim.warmup_epochs={warmup} needs optim.scheduler=cosine (constant has no warmup); "
                          "set optim.warmup_epochs=0 or optim.scheduler=cosine")
    if optim["scheduler"] == "cosine" and warmup >= epochs:
        raise ConfigError(f"optim.warmup_epochs={warmup} must be less than trainer.max_epochs={epochs}: "
                          "the learning rate would never leave its warmup")
    if policy.name == "gradual" and policy.unfreeze_at_epoch >= epochs:
        rank_zero_warn(f"finetune=gradual unfreezes at epoch {policy.unfreeze_at_epoch} (finetune.unfreeze_at_epoch) but "
                       f"training stops after trainer.max_epochs={epochs}: only the head trains, as with finetune=frozen; "
                       "lower finetune.unfreeze_at_epoch or raise trainer.max_epochs")
    _check_devices(trainer.get("accelerator", "auto"), trainer.get("devices", "auto"))


def _check_devices(accelerator: str, devices: Any) -> None:
    """The accelerator exists here, and a CPU run (asked for, or what `auto` falls back to) counts processes."""
    gpu = CUDAAccelerator.is_available() or MPSAccelerator.is_available()
    if accelerator == "gpu":
        available = gpu
    else:
        available = accelerator == "auto" or AcceleratorRegistry[accelerator]["accelerator"].is_available()
    if not available:
        raise ConfigError(f"trainer.accelerator={accelerator}, but this machine has no such device; "
                          "use trainer=cpu or trainer.accelerator=auto")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not gpu)
    if on_cpu and not (devices == "auto" or (is_integer(devices) and devices >= 1)
                       or (isinstance(devices, str) and devices.isdigit() and int(devices) >= 1)):
        raise ConfigError(f"trainer.devices={devices!r} does not fit a CPU run (trainer.accelerator={accelerator}): "
                          "give a number of processes >= 1, e.g. trainer.devices=2")


def _trainer(node: DictConfig) -> dict[str, Any]:
    for key, instead in TRAINER_RESERVED.items():
        if key in node:
            raise ConfigError(f"trainer.{key} is set by finetune itself; {instead}")
    arguments = (accepted_keywords(L.Trainer) or set()) - set(TRAINER_RESERVED) | set(EXTRA_TRAINER_KEYS)
    return _section(node, "trainer", TRAINER, required=("max_epochs",), others=arguments)


def _check_instantiated(node: Any, key: str) -> None:
    """A logger or callback entry: a class that imports, keys its constructor takes, and known keys' values."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(f"{key} must be a mapping with a _target_ class, got {node!r}; remove it with ~{key}")
    values = _section(node, key, {})
    target = import_class(values["_target_"], f"{key}._target_")
    accepted = accepted_keywords(target)
    rules = next((rules for cls, rules in INSTANTIATED.items() if issubclass(target, cls)), {})
    for name_, value in values.items():
        if accepted is not None and not name_.startswith("_") and name_ not in accepted:
            raise ConfigError(f"{key}.{name_} is not an argument of {target.__name__}; valid: {', '.join(sorted(accepted))}")
        if name_ in rules:
            rules[name_].check(f"{key}.{name_}", value)
    monitor, mode = values.get("monitor"), values.get("mode")
    if monitor in MONITORED and mode is not None and mode != MONITORED[monitor]:
        raise ConfigError(f"{key}.mode={mode} would keep the worst {monitor}; use {key}.mode={MONITORED[monitor]}")


def data_target(path: Any) -> Any:
    """`data._target_` as it imports now: older configs name `datamodules.X`, which installs as `finetune.datamodules.X`.

    Rewritten even where the old name still imports (from the repository root, whose
    `datamodules/` folder is on sys.path) so that there is one class per datamodule.
    """
    if isinstance(path, str) and path.startswith(MOVED_DATA_PACKAGE[0]):
        new = MOVED_DATA_PACKAGE[1] + path.removeprefix(MOVED_DATA_PACKAGE[0])
        # stacklevel=1: validation and build_datamodule both pass here, and one location warns once
        warnings.warn(f"data._target_={path} is now {new}; the old name goes in the next release", FutureWarning, stacklevel=1)
        return new
    return path


def import_class(path: Any, key: str) -> type:
    """The class a `_target_` names (Hydra's own lookup would also log a multi-line error)."""
    module, _, name_ = str(path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name_)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{key}='{path}' is not an importable class ({type(e).__name__}); check the spelling") from None
    if not isinstance(cls, type):
        raise ConfigError(f"{key}='{path}' is not a class; give one as module.Class")
    return cls


def accepted_keywords(cls: type) -> set[str] | None:
    """The keyword arguments `cls(...)` takes, following `**kwargs` up its bases; None when that stays open-ended.

    A subclass passing `**kwargs` on to its base (our datamodules) accepts the base's
    keywords too; one that ends in `**kwargs` for something else (TensorBoard's writer)
    accepts anything, and is left to its own checks.
    """
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is object:
            return None
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return names
    return None
