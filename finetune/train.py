"""`finetune`: fit an EfficientNet under a fine-tuning policy, then test the best checkpoint.

    finetune model=b0 data=cifar100 finetune=frozen
    finetune -m finetune=frozen,partial,full      # a sweep
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from finetune.errors import user_errors
from finetune.models.scaling import compound
from finetune.module import FineTuneModule

OmegaConf.register_new_resolver("phi_resolution", lambda phi: compound(float(phi)).resolution, replace=True)


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The datamodule of `cfg.data`; mean/std left null here follow the model's weights later."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    data = {k: v for k, v in data.items() if not (k in ("mean", "std") and v is None)}
    return instantiate(data)


def build_module(cfg: DictConfig, datamodule: L.LightningDataModule) -> FineTuneModule:
    container = OmegaConf.to_container(cfg, resolve=True)
    module = FineTuneModule(
        model=container["model"],
        num_classes=datamodule.num_classes,
        finetune=container["finetune"],
        optim=container["optim"],
        label_smoothing=container["label_smoothing"],
        class_names=list(datamodule.class_names),
    )
    if cfg.data.get("mean") is None or cfg.data.get("std") is None:
        datamodule.set_normalization(module.model.mean, module.model.std)
    if getattr(datamodule, "channels_last", False):
        module.model.to(memory_format=torch.channels_last)
    return module


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """Lightning Trainer arguments with the GPU defaults we measured (bf16, cudnn benchmark)."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs.pop("compile", None)
    gpu = torch.cuda.is_available() and kwargs.get("accelerator") in ("auto", "gpu", "cuda")
    if kwargs.get("precision") is None:
        kwargs["precision"] = ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed") if gpu else "32-true"
    if kwargs.get("benchmark") is None:
        kwargs["benchmark"] = gpu
    return {k: v for k, v in kwargs.items() if v is not None}


def build_trainer(cfg: DictConfig, extra_callbacks: list | None = None) -> L.Trainer:
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()] + list(extra_callbacks or [])
    return L.Trainer(logger=loggers or False, callbacks=callbacks, default_root_dir=cfg.paths.output_dir, **trainer_kwargs(cfg))


def fit(cfg: DictConfig, extra_callbacks: list | None = None) -> dict[str, Any]:
    """Fit, test the best checkpoint, write `metrics.json` into the run directory."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    if cfg.trainer.get("compile"):
        module.model.compile()
    trainer = build_trainer(cfg, extra_callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint else ""
    metrics: dict[str, Any] = {
        "best_val_acc": _number(checkpoint.best_model_score) if checkpoint and checkpoint.best_model_score is not None else None,
        "best_checkpoint": best or None,
        "epochs": trainer.current_epoch,
    }
    if cfg.get("test_after_fit") and datamodule.has_test:
        results = trainer.test(module, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        metrics.update({k: _number(v) for k, v in (results[0] if results else {}).items()})
    if trainer.is_global_zero:
        Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.paths.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _number(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        metrics = fit(cfg)
        value = metrics.get("best_val_acc")
        return value if value is not None and math.isfinite(value) else None


if __name__ == "__main__":
    main()
