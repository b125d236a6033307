"""FineTuneModule: an EfficientNet with a new head, trained under a fine-tuning policy."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from torchvision.utils import make_grid

from finetune.configuration.rules import POSITIVE, Rule, number, numbers, optional
from finetune.configuration.rules import name as name_rule
from finetune.models import create_model
from finetune.models.preprocessing import Preprocessing
from finetune.models.weights import WeightsError, load_safely, unwrap_state_dict
from finetune.training.policies import FinetunePolicy, apply_policy, model_parts, set_frozen_eval

OPTIMIZERS = ("adamw", "sgd", "rmsprop")
SCHEDULERS = ("cosine", "constant")


class FineTuneModule(L.LightningModule):
    """Builds the model for the data's classes, applies the policy, logs metrics.

    `model`, `finetune` and `optim` are plain dicts (the Hydra groups of the same names),
    so checkpoints hold only primitives and load with `weights_only=True`.
    """

    def __init__(
        self,
        model: dict[str, Any],
        num_classes: int,
        finetune: dict[str, Any] | None = None,
        optim: dict[str, Any] | None = None,
        label_smoothing: float = 0.1,
        class_names: list[str] | None = None,
        preprocessing: dict[str, Any] | None = None,
        class_weights: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        model_kwargs = {k: v for k, v in model.items() if v is not None and k not in ("name", "grad_checkpointing")}
        self.model = create_model(model["name"], num_classes=num_classes, **model_kwargs)
        self.model.set_grad_checkpointing(bool(model.get("grad_checkpointing", False)))
        # Record what the weights decided, so a checkpoint rebuilds the same network offline.
        cfg = self.model.config
        self.hparams.model.update(padding=cfg.padding, bn_eps=cfg.bn_eps, resolution=cfg.resolution,
                                  mean=list(cfg.mean), std=list(cfg.std))
        # What training feeds the network; build_module records data overrides of the weights' values.
        self.preprocessing = Preprocessing.from_dict(preprocessing) if preprocessing else self.model.preprocessing
        self.policy = FinetunePolicy(**(finetune or {})).validate(len(self.model.stages))
        self.optim_cfg = {**DEFAULT_OPTIM, **{k: v for k, v in (optim or {}).items() if v is not None}}
        if self.optim_cfg["backbone_lr_scale"] is None:
            # One rate for the whole network: a 10x slower backbone for pretrained weights (the default until
            # issue 24) lost at 3 epochs on every set measured (benchmarks/RESULTS.md, LP-FT). Recorded, so that a
            # resumed run of a checkpoint that trained with another value keeps it (build_module).
            self.optim_cfg["backbone_lr_scale"] = 1.0
            self.hparams.optim = {**(optim or {}), "backbone_lr_scale": self.optim_cfg["backbone_lr_scale"]}
        _check_optim(self.optim_cfg)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.weigh_classes(class_weights)
        top5 = min(5, num_classes)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.val_balanced_acc = MulticlassAccuracy(num_classes, average="macro")  # the mean recall per class
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.frozen_parts = apply_policy(self.model, self.policy, epoch=0)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> FineTuneModule:
        """Rebuild from one of our checkpoints without fetching the original weights again."""
        ckpt = load_safely(path)
        if not isinstance(ckpt, dict) or "hyper_parameters" not in ckpt:
            raise WeightsError(f"'{path}' is not a checkpoint written by finetune (no hyper_parameters); "
                               "to start from plain weights use model.pretrained=<path>")
        hp = dict(ckpt["hyper_parameters"])
        hp["model"] = {**hp["model"], "pretrained": None}
        module = cls(**hp)
        module.model.load_state_dict(unwrap_state_dict(ckpt, str(path)))
        return module.eval()

    @property
    def class_names(self) -> list[str]:
        """The checkpoint's class names in label order; their indices where training recorded none."""
        return list(self.hparams.get("class_names") or [str(i) for i in range(self.model.num_classes)])

    @property
    def preprocessing(self) -> Preprocessing:
        return self._preprocessing

    @preprocessing.setter
    def preprocessing(self, value: Preprocessing) -> None:
        # Kept in the hyperparameters, so every checkpoint carries what its training fed the network.
        self._preprocessing = value
        self.hparams.preprocessing = value.to_dict()

    def weigh_classes(self, weights: list[float] | None) -> None:
        """The loss's class weights (data.balance=loss), kept in the hyperparameters and so in every checkpoint.

        Not in the state dict (a non-persistent buffer): weight files keep the network's keys only,
        and checkpoints with and without weights load alike.
        """
        self.hparams.class_weights = None if weights is None else [float(w) for w in weights]
        tensor = None if weights is None else torch.tensor(self.hparams.class_weights, device=self.device)
        self.criterion.register_buffer("weight", tensor, persistent=False)

    def setup(self, stage: str) -> None:
        """A new fit takes its class weights from the datamodule's training labels (`class_weights`)."""
        datamodule = self.trainer.datamodule if self.trainer is not None else None
        if stage == "fit" and self.hparams.get("class_weights") is None and hasattr(datamodule, "class_weights"):
            self.weigh_classes(datamodule.class_weights())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A resumed fit (and a test of a checkpoint) uses the class weights the checkpoint recorded."""
        recorded = checkpoint.get("hyper_parameters", {})
        if "class_weights" in recorded:
            self.weigh_classes(recorded["class_weights"])

    # --- policy ---------------------------------------------------------------------------

    def train(self, mode: bool = True) -> FineTuneModule:
        super().train(mode)
        if mode:
            set_frozen_eval(self.model, self.frozen_parts, self.policy)
        return self

    def on_train_start(self) -> None:
        # A run resumed mid-epoch skips on_train_epoch_start for that epoch: apply its policy here too.
        self.on_train_epoch_start()

    def on_train_epoch_start(self) -> None:
        frozen = apply_policy(self.model, self.policy, self.current_epoch)
        if frozen != self.frozen_parts:
            self.print(f"epoch {self.current_epoch}: trainable parts now {sorted(set(model_parts(self.model)) - set(frozen))}")
        self.frozen_parts = frozen
        self.train()

    # --- steps ----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:  # pooled features (CachedFeatureDataModule's train/val; its test batches are images)
            return self.model.classifier(self.model.dropout(x))
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if batch_idx == 0 and self.current_epoch == 0 and x.ndim == 4:
            self._log_samples("samples/train", x)
        logits = self(x)
        loss = self.criterion(logits, y)  # y: labels, or probability targets of mixed images (data.mixup_alpha)
        # A mixed image counts as its dominant label: train/acc stays defined, though below the unmixed accuracy.
        self.train_acc(logits, y.argmax(1) if y.ndim == 2 else y)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/epoch_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Logs the metrics; returns the logits, which callbacks get as `outputs` (no second forward pass)."""
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.val_acc_top5(logits, y)
        self.val_balanced_acc(logits, y)
        self.log("val/loss", self.criterion(logits, y), on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)
        self.log("val/acc_top5", self.val_acc_top5, on_epoch=True)
        self.log("val/balanced_acc", self.val_balanced_acc, on_epoch=True)
        return logits.detach()

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """As `validation_step`: the logits go to callbacks such as `reports.TestReport`."""
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.test_acc_top5(logits, y)
        self.log("test/loss", self.criterion(logits, y), on_epoch=True, sync_dist=True)
        self.log("test/acc", self.test_acc, on_epoch=True)
        self.log("test/acc_top5", self.test_acc_top5, on_epoch=True)
        return logits.detach()

    def _log_samples(self, tag: str, x: torch.Tensor) -> None:
        """A grid of what the network actually sees: after resize, de-normalised."""
        if not isinstance(self.logger, TensorBoardLogger):
            return
        images = self.preprocessing.denormalize(x[:16])
        self.logger.experiment.add_image(tag, make_grid(images.cpu(), nrow=4), self.global_step)

    # --- optimisation ---------------------------------------------------------------------

    def param_groups(self) -> list[dict[str, Any]]:
        """One named group per part (no weight decay on norms and biases), made once.

        Backbone parts learn at `backbone_lr_scale` times the head's rate, further scaled
        by `layer_decay` per part away from the head. Frozen parameters are in their
        group too: unfreezing only flips requires_grad, so schedulers and resume hold.
        """
        cfg = self.optim_cfg
        parts = model_parts(self.model)
        backbone = [n for n in parts if n != "head"]
        groups = []
        for name, part in parts.items():
            scale = 1.0 if name == "head" else cfg["backbone_lr_scale"] * cfg["layer_decay"] ** (len(backbone) - 1 - backbone.index(name))
            decay = [p for p in part.parameters() if p.ndim > 1]
            no_decay = [p for p in part.parameters() if p.ndim <= 1]
            groups.append({"name": name, "params": decay, "lr": cfg["lr"] * scale, "weight_decay": cfg["weight_decay"]})
            if no_decay:
                groups.append({"name": f"{name}.no_decay", "params": no_decay, "lr": cfg["lr"] * scale, "weight_decay": 0.0})
        return groups

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim_cfg
        groups = self.param_groups()
        if cfg["name"] == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=cfg["lr"], betas=tuple(cfg["betas"]))
        elif cfg["name"] == "sgd":
            optimizer = torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["momentum"] > 0)
        else:  # TF-style RMSprop, as EfficientNet was trained
            optimizer = torch.optim.RMSprop(groups, lr=cfg["lr"], alpha=0.9, eps=1e-3, momentum=cfg["momentum"])
        if cfg["scheduler"] == "constant":
            return {"optimizer": optimizer}
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, self.trainer.max_epochs or 1)
        warmup = int(round(cfg["warmup_epochs"] * total / epochs))
        schedule = WarmupCosine(total, warmup, cfg["min_lr_ratio"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


#: The one source of the optim defaults (conf/optim/*.yaml start from it and set only what differs).
DEFAULT_OPTIM: dict[str, Any] = {
    "name": "adamw",            # adamw | sgd (Nesterov) | rmsprop (TF-style)
    "lr": 1e-3,                 # the head's; backbone parts learn at lr * backbone_lr_scale
    "weight_decay": 0.01,       # not applied to norms and biases
    "betas": (0.9, 0.999),      # adamw
    "momentum": 0.9,            # sgd, rmsprop
    "backbone_lr_scale": None,  # None: 1.0 for a new run; a resumed run keeps its checkpoint's
    "layer_decay": 1.0,         # < 1: parts further from the head learn slower still
    "scheduler": "cosine",      # cosine | constant
    "warmup_epochs": 0.0,
    "min_lr_ratio": 0.01,       # cosine decays to lr * min_lr_ratio
}


#: What each optim key must be: checked here for every FineTuneModule and by `validate_config` before a run.
OPTIM_RULES: dict[str, Rule] = {
    "name": name_rule("optimizer", OPTIMIZERS),
    "lr": POSITIVE,
    "weight_decay": number(0, 1, hi_open=True),
    "betas": numbers(2, number(0, 1, hi_open=True), "[0.9,0.999]"),
    "momentum": number(0, 1, hi_open=True),
    "backbone_lr_scale": optional(POSITIVE),  # null: 1.0 for a new run; a resumed run keeps its checkpoint's
    "layer_decay": POSITIVE,
    "scheduler": name_rule("scheduler", SCHEDULERS),
    "warmup_epochs": number(0),
    "min_lr_ratio": number(0, 1),
}


class WarmupCosine:
    """Linear warmup from ~0, then cosine to `min_ratio`; a class so schedulers pickle for DDP."""

    def __init__(self, total: int, warmup: int, min_ratio: float) -> None:
        self.total, self.warmup, self.min_ratio = total, warmup, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _check_optim(cfg: dict[str, Any]) -> None:
    for key, rule in OPTIM_RULES.items():
        rule.check(f"optim.{key}", cfg[key])
