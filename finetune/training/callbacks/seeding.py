"""Random streams per DDP process: different draws on every rank, reproducible from the seed.

`lightning.seed_everything(seed)` runs in every process with the same seed, so without
this every rank would draw the same dropout and stochastic-depth masks and the same
device-side crops and flips for its (different) samples: the effective randomness of the
global batch would shrink by the number of processes. The data order is not drawn here:
`finetune.datamodules.base.EpochSampler` takes it from (seed, epoch) and shards it.
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch


def rank_seed(seed: int, rank: int) -> int:
    """Process `rank`'s seed; rank 0 keeps `seed`, so one-process runs are unchanged by it."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


class RankSeed(L.Callback):
    """Reseeds torch, numpy and random from (seed, global rank) once the process knows its rank.

    `setup` runs after the processes exist and before the first random draw of training;
    a resumed run then restores each rank's saved states on top (`RNGStateCallback`).
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.global_rank == 0:
            return
        seed = rank_seed(self.seed, trainer.global_rank)
        torch.manual_seed(seed)  # CPU and every CUDA device
        np.random.seed(seed)  # rank_seed is a uint32, what numpy accepts
        random.seed(seed)
