"""Frozen fine-tuning on cached features: the backbone sees each image once, not once per epoch.

With a frozen backbone in eval mode and no random augmentation, the pooled features of
an image never change, so every epoch after the first would recompute the same numbers.
`CachedFeatureDataModule` computes them once (on the training device, when the loaders
are first asked for) and serves them with the same sampler and batch size as the image
datamodule, so the head sees the same batches in the same order. Under DDP each process
extracts a contiguous share of the images and `all_gather` hands every process all of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from tqdm.auto import tqdm

from finetune.datamodules.augment import TRAINING_ONLY_KEYS, augmenting_keys
from finetune.datamodules.base import ImageClassificationDataModule, Split
from finetune.errors import ConfigError
from finetune.models import EfficientNet

#: Feature rows per all_gather call: bounds the device memory the gather takes (a share times the processes).
_GATHER_ROWS = 8192


def check_cacheable(data: Mapping[str, Any]) -> None:
    """Cached features need images that are the same every epoch: refuse any data setting that varies them."""
    augmenting = augmenting_keys(data)
    if "augment" in augmenting:
        raise ConfigError("finetune.cache_features=true needs data.augment=false: "
                          "cached features would freeze one random view")
    if augmenting:
        raise ConfigError(f"finetune.cache_features=true trains on features of unaugmented images, which "
                          f"data.{augmenting[0]} would change; set it back to off or finetune.cache_features=false")


class CachedFeatureDataModule(ImageClassificationDataModule):
    """Train/val splits of `source` as pooled backbone features; test stays on images."""

    def __init__(self, source: ImageClassificationDataModule) -> None:
        super().__init__(
            root=source.root, batch_size=source.batch_size, num_workers=0, resolution=source.resolution,
            mean=source.mean, std=source.std, augment=False, seed=source.seed, pin_memory=False,
            balance=source.balance,  # the source's sampler draws (data.balance=sampler), and its loss weights
        )
        check_cacheable({key: getattr(source, key) for key in ("augment", *TRAINING_ONLY_KEYS)})
        self.source = source
        self.save_hyperparameters(ignore=["source"])  # checkpoints must hold primitives only

    @property
    def has_test(self) -> bool:
        return self.source.has_test

    def _read_class_names(self) -> list[str]:
        return self.source.class_names

    def data_identity(self) -> dict[str, Any]:
        return self.source.data_identity()  # the images the features come from

    def train_labels(self) -> np.ndarray:
        return self.source.train_labels()

    def _build_split(self, split: Split) -> Dataset:
        if split == "test":
            return self.source.dataset("test")
        return TensorDataset(*self._extract(split))

    def prepare_data(self) -> None:
        self.source.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        """Nothing to scan here: features are extracted once the model sits on its device."""
        self.source.trainer = self.trainer  # Lightning attaches the wrapper; the source's checks need the ranks too
        self.source.setup(stage)

    def test_dataloader(self) -> DataLoader:
        return self.source.test_dataloader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        if isinstance(x, Tensor) and x.is_floating_point():  # pooled features
            return x, y
        return self.source.device_batch(batch, train=False)  # test images: the source's device transform

    @torch.no_grad()
    def _extract(self, split: Split) -> tuple[Tensor, Tensor]:
        trainer = self.trainer
        module = trainer.lightning_module
        model = module.model
        dataset = self.source.dataset(split)
        share = math.ceil(len(dataset) / trainer.world_size)
        start = min(trainer.global_rank * share, len(dataset))
        mine = range(start, min(start + share, len(dataset)))
        was_training = model.training
        model.eval()
        mine_features, mine_labels = pooled_features(model, self.source, split, module.device, indices=mine,
                                                     progress=trainer.progress_bar_callback is not None)
        model.train(was_training)
        if trainer.world_size == 1:
            return mine_features, mine_labels
        features = torch.zeros(share, model.num_features)  # equal shares for all_gather: the last one padded
        labels = torch.zeros(share, dtype=torch.int64)
        features[:len(mine_labels)], labels[:len(mine_labels)] = mine_features, mine_labels
        features, labels = self._gather(features), self._gather(labels)
        return features[:len(dataset)], labels[:len(dataset)]

    def _gather(self, share: Tensor) -> Tensor:
        """Every process's equally long `share`, concatenated in rank order, on the CPU."""
        strategy = self.trainer.strategy
        out = torch.empty(self.trainer.world_size, *share.shape, dtype=share.dtype)
        for begin in range(0, len(share), _GATHER_ROWS):
            piece = share[begin:begin + _GATHER_ROWS].to(strategy.root_device)
            out[:, begin:begin + _GATHER_ROWS] = strategy.all_gather(piece).cpu()
        return out.flatten(0, 1)


@torch.no_grad()
def pooled_features(
    model: EfficientNet, source: ImageClassificationDataModule, split: Split, device: torch.device,
    indices: Sequence[int] | None = None, progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """Pooled penultimate features (float32, on the CPU) and labels of a split, in order, through the eval transform.

    Shared by cached-feature training and the linear probe. It opens no autocast: the probe calls
    it outside any, so its features are the float32 ones `finetune-evaluate` computes, whatever
    trainer.precision says. The loader has its own generator: one without draws its workers'
    seed from the global RNG, which would shift every later dropout mask and break equality
    with uncached training.
    """
    dataset = source.unaugmented(split)
    loader = DataLoader(dataset if indices is None else Subset(dataset, indices), batch_size=max(source.batch_size, 64),
                        shuffle=False, num_workers=source.loader_workers, pin_memory=source.pin_memory,
                        generator=torch.Generator().manual_seed(0), collate_fn=getattr(dataset, "collate_fn", None))
    features, labels = [], []
    for batch in tqdm(loader, desc=f"{split} features", leave=False, disable=not progress):
        x, y = source.device_batch(move_data_to_device(batch, device), train=False)
        features.append(model.forward_head(model.forward_features(x), pre_logits=True).float().cpu())
        labels.append(y.cpu())
    empty = (torch.zeros(0, model.num_features), torch.zeros(0, dtype=torch.int64))
    return (torch.cat(features), torch.cat(labels)) if features else empty

