"""Group defaults that live in Python, registered with Hydra so the YAML options set only what differs.

`DEFAULT_OPTIM` (finetune/training/module.py) and `FinetunePolicy`'s fields (finetune/training/policies.py) are the
one source of the optim and finetune defaults: the Python API uses them as they are, and each
option file (`conf/optim/sgd.yaml`, `conf/finetune/partial.yaml`, ...) starts from them with
`defaults: [_defaults]`, so every key exists in the composed config (`optim.lr=...` needs no `+`)
without being written twice. Plain dicts, not typed schemas: values are checked by
`finetune.configuration.checks` in one line, not by Hydra's multi-line type errors.
"""

from __future__ import annotations

from dataclasses import asdict

from hydra.core.config_store import ConfigStore

from finetune.training.module import DEFAULT_OPTIM
from finetune.training.policies import FinetunePolicy


def register_defaults() -> None:
    store = ConfigStore.instance()
    store.store(group="optim", name="_defaults", node={**DEFAULT_OPTIM, "betas": list(DEFAULT_OPTIM["betas"])})
    store.store(group="finetune", name="_defaults", node=asdict(FinetunePolicy()))
