"""Which parts of the network train, and how frozen parts behave.

The network is split into ordered parts: `stem`, `stage0`..`stage6`, `top` (the 1x1
conv before pooling) and `head` (the classifier). A policy names the trainable parts
for a given epoch. Frozen parts keep BatchNorm in eval mode: updating running
statistics of layers that do not learn is the classic bug of naive partial
fine-tuning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import lightning as L
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from finetune.configuration.rules import BOOL, Rule, integer, one_of
from finetune.configuration.rules import name as name_rule
from finetune.errors import ConfigError
from finetune.models import EfficientNet

POLICIES = ("full", "frozen", "partial", "gradual", "probe", "lpft")  # probe, lpft's head: finetune/training/probe.py
#: What `finetune=lpft` fine-tunes from the probe's head (`finetune.after_probe`).
AFTER_PROBE = ("full", "partial", "gradual")
BN_MODES = ("eval", "train")
#: Old `finetune.bn` values, accepted with a FutureWarning for one release: `frozen` named a policy, not a BatchNorm mode.
RENAMED_BN_MODES = {"frozen": "eval"}


def finetune_rules(num_stages: int) -> dict[str, Rule]:
    """What each `FinetunePolicy` field (a `finetune.*` key) must be: checked by `validate` and by `validate_config`."""
    return {
        "name": name_rule("finetune policy", POLICIES),
        "trainable_stages": integer(0, num_stages),
        "unfreeze_at_epoch": integer(0),
        "bn": one_of(*BN_MODES, *RENAMED_BN_MODES),
        "cache_features": BOOL,
        "after_probe": name_rule("policy after the probe", AFTER_PROBE),
    }


def model_parts(model: EfficientNet) -> dict[str, nn.Module]:
    """The network's parts in forward order; policies and param groups are built on them."""
    parts: dict[str, nn.Module] = {"stem": model.stem}
    parts |= {f"stage{i}": stage for i, stage in enumerate(model.stages)}
    parts |= {"top": model.top, "head": model.classifier}
    return parts


@dataclass(frozen=True)
class FinetunePolicy:
    """full | frozen (head only) | partial (last k stages + top + head) | gradual (frozen, then full) | lpft.

    `top` trains with partial because it sits between the trained stages and the head;
    frozen keeps it fixed so pooled features stay cacheable. lpft starts from the linear
    probe's head (`probe.ProbeHead`) and then trains as `after_probe` says; other policies
    ignore `after_probe`.
    """

    name: str = "full"
    trainable_stages: int = 2
    unfreeze_at_epoch: int = 1
    bn: str = "eval"
    cache_features: bool = False
    after_probe: str = "full"

    def validate(self, num_stages: int) -> FinetunePolicy:
        for key, rule in finetune_rules(num_stages).items():
            rule.check(f"finetune.{key}", getattr(self, key))
        if self.bn in RENAMED_BN_MODES:
            warnings.warn(f"finetune.bn={self.bn} is now finetune.bn={RENAMED_BN_MODES[self.bn]}; the old value goes in the "
                          "next release", FutureWarning, stacklevel=1)  # one location: shown once per run
            object.__setattr__(self, "bn", RENAMED_BN_MODES[self.bn])
        if self.cache_features and (self.name != "frozen" or self.bn != "eval"):
            raise ConfigError(
                f"finetune.cache_features=true needs finetune=frozen with bn=eval (got {self.name}, bn={self.bn}): "
                "only an unchanging backbone gives features worth caching"
            )
        return self

    @property
    def fine_tuning(self) -> FinetunePolicy:
        """The policy the epochs follow: lpft's is `after_probe`'s, once the probe's head is in."""
        return replace(self, name=self.after_probe) if self.name == "lpft" else self

    @property
    def changes_during_training(self) -> bool:
        """Whether the set of trainable parts changes between epochs (gradual, unfreezing later)."""
        policy = self.fine_tuning
        return policy.name == "gradual" and policy.unfreeze_at_epoch > 0

    def trainable(self, part_names: list[str], epoch: int) -> set[str]:
        """Names of the parts that learn during `epoch`."""
        if self.name == "lpft":
            return self.fine_tuning.trainable(part_names, epoch)
        if self.name == "full" or (self.name == "gradual" and epoch >= self.unfreeze_at_epoch):
            return set(part_names)
        if self.name == "partial":  # with 0 stages still top + head: partial never degrades to frozen
            stages = [p for p in part_names if p.startswith("stage")]
            return set(stages[len(stages) - self.trainable_stages:]) | {"top", "head"}
        return {"head"}


def apply_policy(model: EfficientNet, policy: FinetunePolicy, epoch: int) -> list[str]:
    """Set requires_grad per part for `epoch`; returns the frozen part names, in order."""
    parts = model_parts(model)
    trainable = policy.trainable(list(parts), epoch)
    for name, part in parts.items():
        part.requires_grad_(name in trainable)
    return [name for name in parts if name not in trainable]


def set_frozen_eval(model: EfficientNet, frozen: list[str], policy: FinetunePolicy) -> None:
    """Run frozen parts in inference mode: BatchNorm statistics untouched, no stochastic depth.

    With bn=train they stay in training mode and BatchNorm adapts its statistics to the
    new data while the weights stay fixed.
    """
    if policy.bn == "train":
        return
    parts = model_parts(model)
    for name in frozen:
        parts[name].eval()


class DDPPolicySetup(L.Callback):
    """Lets DDP train policies whose frozen parts change, without tripping its unused-parameter check.

    DDP registers only parameters with requires_grad=True when it wraps the model, and
    without `find_unused_parameters` it expects a gradient for each of them every step.
    Static policies (full, frozen, partial) freeze before the wrap, so frozen parameters
    are never registered: no check trips and no gradients of them are exchanged. A
    gradual policy unfreezes later, and parameters DDP did not register would then be
    updated from local gradients only, the processes silently drifting apart. So for
    it every parameter is made trainable just before the wrap (the module re-applies
    the policy each epoch) and DDP must detect unused parameters: `strategy` turns
    trainer=ddp into `*_find_unused_parameters_true`, which skips the frozen parts each
    step, and `on_train_start` refuses a strategy that would not.
    """

    @staticmethod
    def strategy(strategy: object, policy: FinetunePolicy) -> object:
        """The Trainer strategy for `policy`: a `ddp*` name gains `_find_unused_parameters_true` when parts unfreeze later."""
        if (policy.changes_during_training and isinstance(strategy, str) and strategy.startswith("ddp")
                and "find_unused_parameters" not in strategy):
            return f"{strategy}_find_unused_parameters_true"
        return strategy

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1 and pl_module.policy.changes_during_training:
            pl_module.model.requires_grad_(True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = trainer.strategy.model
        if (isinstance(model, DistributedDataParallel) and pl_module.policy.changes_during_training
                and not model.find_unused_parameters):
            raise ConfigError(
                f"finetune={pl_module.policy.name} under DDP needs unused-parameter detection; "
                "use trainer=ddp or trainer.strategy=ddp_find_unused_parameters_true"
            )
