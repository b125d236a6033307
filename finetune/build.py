"""The composition root: a composed config in, the datamodule, module and trainer it names out, and `fit`.

Every command builds through here (`finetune`, `finetune-compare`, `finetune-evaluate`,
`finetune-audit`, the search); none imports another. Importing this module registers the
config resolvers and the defaults Hydra composes with, so `compose` works from Python too.
"""

from __future__ import annotations

import json
import signal
import sys
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from finetune.configuration.checks import EXTRA_TRAINER_KEYS, data_target, import_class, validate_config
from finetune.configuration.store import register_defaults
from finetune.console import log
from finetune.errors import ConfigError
from finetune.models.scaling import VARIANTS, compound
from finetune.training.callbacks.averaging import FitEMA
from finetune.training.callbacks.checkpointing import (
    AtomicCheckpointIO,
    RNGStateCallback,
    check_resumable,
    load_resume_checkpoint,
)
from finetune.training.callbacks.guards import FiniteLossGuard
from finetune.training.callbacks.interrupts import GracefulStop, last_checkpoint_path, resume_command
from finetune.training.callbacks.seeding import RankSeed
from finetune.training.callbacks.test_report import TestReport
from finetune.training.features import CachedFeatureDataModule
from finetune.training.module import FineTuneModule
from finetune.training.policies import DDPPolicySetup, FinetunePolicy
from finetune.training.probe import CHECKPOINT_POLICY, ProbeHead, ProbeSettings, check_probe_config, run_probe

# Lightning warns that a mid-epoch checkpoint cannot resume exactly unless its loader is stateful; ours
# resumes exactly through the datamodule's state (EpochSampler skips the samples already trained on).
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

register_defaults()  # optim/_defaults, finetune/_defaults: before Hydra composes anything
OmegaConf.register_new_resolver("phi_resolution", lambda phi: compound(float(phi)).resolution, replace=True)
# None for a name that is no variant: validate_config then names model.name in its one-line error.
OmegaConf.register_new_resolver("variant_resolution", lambda name: getattr(VARIANTS.get(name), "resolution", None),
                                replace=True)

#: Model settings a checkpoint records (FineTuneModule writes them) that its weights depend on.
RECORDED_MODEL_KEYS = ("padding", "bn_eps", "mean", "std")






def compose(config_name: str, overrides: Sequence[str], with_hydra: bool = False) -> DictConfig:
    """conf/<config_name>.yaml for these overrides, inside a running Hydra app or from Python; Hydra's errors in one line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    try:
        if GlobalHydra.instance().is_initialized():
            return hydra_compose(config_name, overrides=list(overrides), return_hydra_config=with_hydra)
        with initialize_config_module(config_module="finetune.conf", version_base="1.3"):
            return hydra_compose(config_name, overrides=list(overrides), return_hydra_config=with_hydra)
    except HydraException as e:
        raise ConfigError(" ".join(str(e).split())) from None


def check_config(cfg: DictConfig) -> None:
    """Every config value checked, in one line naming its key, before any checkpoint, data or weights are read."""
    validate_config(cfg)


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The datamodule of `cfg.data`; mean/std left null here follow the model's weights later."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    data = {k: v for k, v in data.items() if not (k in ("mean", "std") and v is None)}
    # A flat dict of plain values (lists, not ListConfigs: checkpoints must load with weights_only=True), so a
    # direct call, which also keeps a constructor's one-line errors as they are (instantiate would wrap them).
    datamodule_class = import_class(data_target(data.pop("_target_")), "data._target_")
    return datamodule_class(**data)


def build_module(
    cfg: DictConfig, datamodule: L.LightningDataModule, resume: dict[str, Any] | None = None
) -> FineTuneModule:
    """The LightningModule for `cfg`; when resuming, its weights come from `resume` alone.

    A resumed run's checkpoint holds every weight, so the pretrained ones are not fetched
    again (no network, no download); the padding, BN eps and normalisation they implied
    are taken from the checkpoint instead.
    """
    container = OmegaConf.to_container(cfg, resolve=True)
    model, optim, preprocessing = container["model"], container["optim"], None
    if resume is not None:
        hp = resume["hyper_parameters"]
        recorded = hp["model"]
        model = {**model, "pretrained": None, **{k: recorded[k] for k in RECORDED_MODEL_KEYS if k in recorded}}
        preprocessing = hp.get("preprocessing")
        if optim.get("backbone_lr_scale") is None:  # resolved from the weights the first run loaded
            optim = {**optim, "backbone_lr_scale": hp.get("optim", {}).get("backbone_lr_scale")}
    module = FineTuneModule(
        model=model,
        num_classes=datamodule.num_classes,
        finetune=container["finetune"],
        optim=optim,
        label_smoothing=container["label_smoothing"],
        class_names=list(datamodule.class_names),
        preprocessing=preprocessing,
    )
    mean, std = cfg.data.get("mean"), cfg.data.get("std")
    if resume is None and mean is not None:  # data overrides of the weights' normalisation (both, or neither)
        module.preprocessing = replace(module.preprocessing, mean=tuple(mean), std=tuple(std))
    datamodule.set_preprocessing(module.preprocessing)
    module.preprocessing = datamodule.preprocessing  # what validation does (in-memory data: the whole image)
    if getattr(datamodule, "channels_last", False):
        module.model.to(memory_format=torch.channels_last)
    return module


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """Lightning Trainer arguments with GPU defaults (bf16 where the hardware has it, cudnn benchmark).

    The GPU defaults follow common practice; they are not yet measured here (no GPU lent so far).
    """
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key in EXTRA_TRAINER_KEYS:  # ours, not Lightning's: build_module compiles, build_trainer adds the EMA callback
        kwargs.pop(key, None)
    gpu = torch.cuda.is_available() and kwargs.get("accelerator") in ("auto", "gpu", "cuda")
    if kwargs.get("precision") is None:
        # Emulated bf16 (V100, T4) is slower than fp16 autocast: count only native support.
        native_bf16 = gpu and torch.cuda.is_bf16_supported(including_emulation=False)
        kwargs["precision"] = ("bf16-mixed" if native_bf16 else "16-mixed") if gpu else "32-true"
    if kwargs.get("benchmark") is None:
        kwargs["benchmark"] = gpu
    policy = FinetunePolicy(**OmegaConf.to_container(cfg.finetune, resolve=True))
    kwargs["strategy"] = DDPPolicySetup.strategy(kwargs.get("strategy"), policy)
    return {k: v for k, v in kwargs.items() if v is not None}


def build_trainer(cfg: DictConfig, extra_callbacks: list | None = None) -> L.Trainer:
    """The Trainer of `cfg.trainer`: atomic checkpoint files, RNG states in them, a NaN guard, `ema_decay`'s EMA."""
    loggers = [_keep_earlier_csv(instantiate(c), resuming=bool(cfg.get("ckpt_path"))) for c in (cfg.get("logger") or {}).values()]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    callbacks += [FiniteLossGuard(), RNGStateCallback(), DDPPolicySetup(), TestReport(), *(extra_callbacks or [])]
    if cfg.trainer.get("ema_decay") is not None:
        callbacks.append(FitEMA(decay=cfg.trainer.ema_decay))
    trainer = L.Trainer(
        logger=loggers or False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=cfg.paths.output_dir,
        **trainer_kwargs(cfg),
    )
    _check_not_in_local_sweep(trainer)
    return trainer


def _keep_earlier_csv(logger: Any, resuming: bool) -> Any:
    """A resumed run's CSV logger in a fresh version folder: Lightning's would delete the metrics.csv it finds."""
    if not (resuming and isinstance(logger, CSVLogger) and Path(logger.log_dir, "metrics.csv").is_file()):
        return logger
    n = 1
    while Path(logger.root_dir, f"resumed_{n}").exists():
        n += 1
    return CSVLogger(logger.save_dir, name=logger.name, version=f"resumed_{n}")


def _check_not_in_local_sweep(trainer: L.Trainer) -> None:
    """Refuse DDP processes that Lightning would start itself inside a `-m` sweep of this machine.

    Lightning starts them by re-running the command line, which re-runs the whole sweep in
    each of them. Under SLURM or torchrun the processes exist already, and that is fine.
    """
    strategy = trainer.strategy
    if (trainer.world_size > 1 and strategy.launcher is not None
            and not strategy.cluster_environment.creates_processes_externally
            and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        raise ConfigError(
            "trainer=ddp cannot start its processes inside a local -m sweep (Lightning re-runs the command line "
            "for each); sweep with hydra/launcher=slurm, or run one command per sweep point (plain or under torchrun)"
        )


def fit(cfg: DictConfig, extra_callbacks: list | None = None) -> dict[str, Any]:
    """Fit (or resume from `cfg.ckpt_path`), test the best checkpoint, write `metrics.json` into the run directory."""
    check_config(cfg)
    if cfg.finetune.name == "probe":  # a convex fit on features extracted once, no epochs: see training/probe.py
        return fit_probe(cfg)
    # lpft: the probe's head goes into the network before the first step (its settings checked here, before any data)
    ckpt_path = cfg.get("ckpt_path")
    probe_head = [ProbeHead(ProbeSettings.for_run(cfg), resuming=bool(ckpt_path))] if cfg.finetune.name == "lpft" else []
    resume = load_resume_checkpoint(ckpt_path) if ckpt_path else None
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule, resume)
    if resume is not None:
        check_resumable(resume, ckpt_path, module)
    if cfg.trainer.get("compile"):
        module.model.compile()  # torch.compile in place: state-dict keys unchanged
    stop = GracefulStop()
    trainer = build_trainer(cfg, [stop, RankSeed(cfg.seed), *probe_head, *(extra_callbacks or [])])
    fit_data = CachedFeatureDataModule(datamodule) if module.policy.cache_features else datamodule
    try:
        trainer.fit(module, datamodule=fit_data, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:  # a stop signal: GracefulStop saved the checkpoint
        _exit_stopped(trainer, stop.stopping, stop.checkpoint, cfg)

    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint else ""
    metrics: dict[str, Any] = {
        "best_val_acc": _number(checkpoint.best_model_score) if checkpoint and checkpoint.best_model_score is not None else None,
        "best_checkpoint": best or None,
        "epochs": trainer.current_epoch,
        **(probe_head[0].result if probe_head else {}),  # the probe lpft started from (from the checkpoint on resume)
    }
    if cfg.get("test_after_fit") and datamodule.has_test:
        try:
            results = trainer.test(module, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        except SIGTERMException:  # training is complete: resuming from last.ckpt only tests
            _exit_stopped(trainer, signal.SIGTERM, last_checkpoint_path(trainer), cfg)
        metrics.update({k: _number(v) for k, v in (results[0] if results else {}).items()})
    else:
        metrics["test_skipped"] = datamodule.missing_test if cfg.get("test_after_fit") else "test_after_fit=false"
    if trainer.is_global_zero:
        Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.paths.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def fit_probe(cfg: DictConfig) -> dict[str, Any]:
    """`fit` for finetune=probe: its checks, the datamodule and the network it probes, then the probe's fit
    (`training.probe.run_probe`): features, the regularisation path, probe.ckpt and metrics.json."""
    settings = ProbeSettings.for_run(cfg)
    check_probe_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    module = build_module(OmegaConf.merge(cfg, {"finetune": CHECKPOINT_POLICY}), datamodule)
    device = L.Fabric(accelerator=trainer_kwargs(cfg).get("accelerator", "auto"), devices=1).device
    return run_probe(cfg, datamodule, module, device, settings)


def _exit_stopped(trainer: L.Trainer, signum: int | None, checkpoint: Path | None, cfg: DictConfig) -> None:
    """Say where the run stopped and the command that resumes it, then exit 128 + the signal number."""
    signum = int(signum or signal.SIGTERM)
    if trainer.is_global_zero:
        where = f"saved {checkpoint}; resume with: {resume_command(sys.argv, checkpoint, cfg.paths.output_dir)}"
        log.warning(f"stopped by {signal.Signals(signum).name} at epoch {trainer.current_epoch}, "
                    f"step {trainer.global_step}; {where}")
    sys.exit(128 + signum)




def _number(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)









