"""Frozen fine-tuning on cached features: the backbone sees each image once, not once per epoch.

With a frozen backbone in eval mode and no random augmentation, the pooled features of
an image never change, so every epoch after the first would recompute the same numbers.
`CachedFeatureDataModule` computes them once (on the training device, when the loaders
are first asked for) and serves them with the same sampler and batch size as the image
datamodule, so the head sees the same batches in the same order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from datamodules.base import ImageClassificationDataModule, Split
from finetune.errors import ConfigError


class CachedFeatureDataModule(ImageClassificationDataModule):
    """Train/val splits of `source` as pooled backbone features; test stays on images."""

    def __init__(self, source: ImageClassificationDataModule) -> None:
        super().__init__(
            root=source.root, batch_size=source.batch_size, num_workers=0, resolution=source.resolution,
            mean=source.mean, std=source.std, augment=False, seed=source.seed, pin_memory=False,
        )
        if source.augment:
            raise ConfigError(
                "finetune.cache_features=true needs data.augment=false: cached features would freeze one random view"
            )
        self.source = source
        self.save_hyperparameters(ignore=["source"])  # checkpoints must hold primitives only

    @property
    def has_test(self) -> bool:
        return self.source.has_test

    def _read_class_names(self) -> list[str]:
        return self.source.class_names

    def _build_split(self, split: Split) -> Dataset:
        if split == "test":
            return self.source.dataset("test")
        return TensorDataset(*self._extract(split))

    def setup(self, stage: str | None = None) -> None:
        """Nothing to scan here: features are extracted once the model sits on its device."""
        self.source.setup(stage)

    def test_dataloader(self) -> DataLoader:
        return self.source.test_dataloader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        if x.dtype == torch.uint8:  # test images: the source's device transform
            return self.source.gpu_transform(x, train=False), y
        return x, y

    @torch.no_grad()
    def _extract(self, split: Split) -> tuple[Tensor, Tensor]:
        module = self.trainer.lightning_module
        model = module.model
        was_training = model.training
        model.eval()
        # Its own generator: a loader without one draws its seed from the global RNG, which
        # would shift every later dropout mask and break equality with uncached training.
        loader = DataLoader(self.source.dataset(split), batch_size=max(self.batch_size, 64), shuffle=False,
                            num_workers=self.source.num_workers, pin_memory=self.source.pin_memory,
                            generator=torch.Generator().manual_seed(0))
        features, labels = [], []
        for images, y in tqdm(loader, desc=f"caching {split} features", leave=False):
            x = self.source.gpu_transform(images.to(module.device, non_blocking=True), train=False)
            features.append(model.forward_head(model.forward_features(x), pre_logits=True).float().cpu())
            labels.append(y)
        model.train(was_training)
        return torch.cat(features), torch.cat(labels)
