"""CIFAR-10/100 held in memory as one uint8 tensor, augmented on the device.

At 32×32 the per-image CPU cost of PIL transforms would dominate, so workers only index
a tensor; crop-with-padding + flip run batched in `gpu_transform` at native size,
before the upsampling to the network resolution.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100

from datamodules.base import ImageClassificationDataModule, InMemoryImageDataset, Split, stratified_split
from datamodules.errors import dataset_not_found

_SOURCE = "the python version from https://www.cs.toronto.edu/~kriz/cifar.html"


# torchvision verifies each file's md5 before loading. We check the files' presence and
# format instead, so users' re-packed copies load; a download still verifies the
# archive's md5 (`tgz_md5` is kept).
class _PresenceCheckedCIFAR10(CIFAR10):
    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


class _PresenceCheckedCIFAR100(CIFAR100):
    train_list = [[name, None] for name, _ in CIFAR100.train_list]
    test_list = [[name, None] for name, _ in CIFAR100.test_list]
    meta = {**CIFAR100.meta, "md5": None}


class _CIFARDataModule(ImageClassificationDataModule):
    """Official train minus a stratified, seeded `val_fraction` hold-out; test = official test.

    `val_fraction=0` trains on the full official train set and validates on the test set.
    """

    device_pad = 4
    device_flip = True
    _title: str
    _reader: type[CIFAR10]

    def __init__(self, *, val_fraction: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.val_fraction = val_fraction
        self._official: dict[bool, tuple[Tensor, Tensor, list[str]]] = {}

    @property
    def has_test(self) -> bool:
        return True

    def prepare_data(self) -> None:
        if self.download:
            self._read(train=False, download=True)

    def _read(self, train: bool, download: bool) -> CIFAR10:
        folder = os.path.join(self.root, self._reader.base_folder)
        try:
            return self._reader(self.root, train=train, download=download)
        except RuntimeError as error:
            if "not found" not in str(error):
                raise
            names = [name for name, _ in self._reader.train_list + self._reader.test_list]
            names.append(self._reader.meta["filename"])
            missing = [name for name in names if not os.path.isfile(os.path.join(folder, name))]
            raise dataset_not_found(
                self._title, self.root, f"{folder}/{{{','.join(names)}}}", missing, _SOURCE
            ) from None
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as error:
            raise ValueError(
                f"{self._title} files under '{folder}' are not in the CIFAR python (pickle) format "
                f"({type(error).__name__}: {error}); use {_SOURCE}"
            ) from error

    def _load_official(self, train: bool) -> tuple[Tensor, Tensor, list[str]]:
        """(uint8 N×3×32×32 images, int64 labels, class names) of an official split, read once."""
        if train not in self._official:
            dataset = self._read(train, download=self.download)
            # torchvision stores N×H×W×C; one conversion here instead of one PIL image per item.
            images = torch.from_numpy(np.ascontiguousarray(dataset.data.transpose(0, 3, 1, 2)))
            labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
            self._official[train] = (images, labels, list(dataset.classes))
        return self._official[train]

    def _read_class_names(self) -> list[str]:
        return self._load_official(train=False)[2]

    def _build_split(self, split: Split) -> Dataset:
        if split == "test" or (split == "val" and self.val_fraction == 0):
            images, labels, _ = self._load_official(train=False)
            return InMemoryImageDataset(images, labels)
        images, labels, _ = self._load_official(train=True)
        if self.val_fraction == 0:
            return InMemoryImageDataset(images, labels)
        train_idx, val_idx = stratified_split(labels.numpy(), (1 - self.val_fraction, self.val_fraction), self.seed)
        index = torch.from_numpy(train_idx if split == "train" else val_idx)
        return InMemoryImageDataset(images[index], labels[index])


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (fine labels) from `<root>/cifar-100-python/{train,test,meta}`."""

    _title = "CIFAR-100"
    _reader = _PresenceCheckedCIFAR100


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 from `<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`."""

    _title = "CIFAR-10"
    _reader = _PresenceCheckedCIFAR10
