"""CIFAR-10/100 held in memory as one uint8 tensor, augmented on the device.

At 32×32 the per-image CPU cost of PIL transforms would dominate, so workers only index
a tensor; crop-with-padding + flip run batched in `device_transform` at native size,
before the upsampling to the network resolution.

With `device_resident` the uint8 splits live on the accelerator itself (CIFAR-100's
train split is 138 MB) and batches are gathered there by index: no workers, no pinned
copies, no host-to-device transfer per step. Both paths draw their order from the same
sampler, so they give the same batches.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.datasets import CIFAR10, CIFAR100

from finetune.configuration.rules import SEED, number, one_of
from finetune.datamodules.base import ImageClassificationDataModule, InMemoryImageDataset, Split
from finetune.datamodules.errors import dataset_not_found
from finetune.datamodules.splits import stable_split
from finetune.errors import ConfigError

_SOURCE = "the python version from https://www.cs.toronto.edu/~kriz/cifar.html"
#: "auto" keeps a split on the GPU only if it takes at most this share of the free memory:
#: the rest is for the model's weights, optimizer state and activations.
RESIDENT_MAX_FREE_FRACTION = 0.1


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


class DeviceBatches:
    """Batches gathered by index from uint8 tensors that already live on the device.

    The order is its sampler's, the same sampler the worker path's DataLoader would get
    (seeded per epoch, sharded under DDP), so both paths yield the same batches. Lightning
    iterates it like a DataLoader: it finds `set_epoch` on `sampler`, and
    `on_after_batch_transfer` still runs `device_transform` on each (already on-device) batch.
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, sampler: Sampler[int]) -> None:
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.sampler = sampler

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # One upload of the epoch's order, then only device-side gathers.
        order = torch.as_tensor(list(self.sampler), dtype=torch.int64).to(self.images.device)
        for batch in order.split(self.batch_size):
            yield self.images[batch], self.labels[batch]


class _CIFARDataModule(ImageClassificationDataModule):
    """Official train minus a stratified `val_fraction` hold-out; test = official test.

    Which images are held out depends on `split_seed` and each image's index in the official
    train set (`splits.stable_split`), not on `seed`: runs with other seeds validate on the
    same images. `val_fraction=0` trains on the full official train set and validates on the test set.
    `device_resident`: True keeps the uint8 splits on the trainer's root device (the CPU
    when there is no trainer) and serves batches from there; "auto" does so on a CUDA
    device when a split takes at most `RESIDENT_MAX_FREE_FRACTION` of its free memory.
    """

    device_pad = 4
    device_flip = True
    whole_image_eval = True
    SETTINGS = {"val_fraction": number(0, 1, hi_open=True), "split_seed": SEED,
                "device_resident": one_of(True, False, "auto")}
    _title: str
    _reader: type[CIFAR10]

    def __init__(
        self, *, val_fraction: float = 0.1, split_seed: int = 0, device_resident: bool | Literal["auto"] = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)  # checks these too, by SETTINGS
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.device_resident = device_resident
        self._official: dict[bool, tuple[Tensor, Tensor, list[str]]] = {}
        self._resident: dict[tuple[Split, torch.device], tuple[Tensor, Tensor]] = {}

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
            raise ConfigError(
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
        if self.val_fraction == 0 and self.examples_per_class is None:
            return InMemoryImageDataset(images, labels)
        keys = [b"%d" % i for i in range(len(labels))]  # the index in the official train set
        train_idx, val_idx = (stable_split(keys, labels.numpy(), self.val_fraction, self.split_seed)
                              if self.val_fraction else (np.arange(len(labels)), None))
        if split == "train" and (few := self._few_shot([keys[i] for i in train_idx], labels.numpy()[train_idx])) is not None:
            train_idx = train_idx[few]  # data.examples_per_class
        index = torch.from_numpy(train_idx if split == "train" else val_idx)
        return InMemoryImageDataset(images[index], labels[index])

    def _loader(self, split: Split, shuffle: bool) -> DataLoader | DeviceBatches:
        device = self.resident_device(split)
        if device is None:
            return super()._loader(split, shuffle)
        dataset = self.dataset(split)
        if shuffle:
            sampler = self._shuffling_sampler(dataset)
        else:  # in order; under DDP each rank takes its share, as Lightning does for the worker path
            replicas, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
            sampler = DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=False)
        return DeviceBatches(*self._on_device(split, device), self.batch_size, sampler)

    def resident_device(self, split: Split) -> torch.device | None:
        """The device that will hold `split`'s uint8 tensors, or None to serve it from CPU workers."""
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        if self.device_resident is False:
            return None
        if self.device_resident == "auto":
            if device.type != "cuda":
                return None  # on the CPU there is no transfer to save
            free, _ = torch.cuda.mem_get_info(device)
            if self.dataset(split).images.nbytes > RESIDENT_MAX_FREE_FRACTION * free:
                return None
        return device

    def _on_device(self, split: Split, device: torch.device) -> tuple[Tensor, Tensor]:
        # Copied once per split and device; every epoch then gathers from the same storage.
        if (split, device) not in self._resident:
            dataset = self.dataset(split)
            self._resident[split, device] = (dataset.images.to(device), dataset.labels.to(device))
        return self._resident[split, device]


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (fine labels) from `<root>/cifar-100-python/{train,test,meta}`."""

    _title = "CIFAR-100"
    _reader = _PresenceCheckedCIFAR100


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 from `<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`."""

    _title = "CIFAR-10"
    _reader = _PresenceCheckedCIFAR10
