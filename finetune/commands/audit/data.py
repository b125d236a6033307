"""The images `finetune-audit` looks at: every split in one list, each image's name, label and stored bytes.

A file's name is its path; an image of an in-memory dataset (digits, CIFAR) has none, so it is
named by its position in the split's dataset, e.g. `digits[123]` with split `train` is
`build_datamodule(cfg).dataset("train")[123]`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from finetune.commands.audit.search import content_hash
from finetune.datamodules.base import ImageClassificationDataModule, Split
from finetune.datamodules.images import decode_rgb, open_image

#: Files hashed at once: blake2b releases the GIL on large buffers, so threads overlap reading and hashing.
HASH_THREADS = min(8, os.cpu_count() or 1)
#: Files handed to the threads at a time.
HASH_BATCH = 4096
#: Longest side of a gallery thumbnail, in pixels.
THUMBNAIL = 160


@dataclass(frozen=True)
class Images:
    """Every image of the audited splits, the splits one after another (train, val, test)."""

    splits: list[Split]
    split: np.ndarray  # index into `splits`, per image
    position: np.ndarray  # index into its split's dataset
    labels: np.ndarray
    names: list[str]
    class_names: list[str]
    datasets: dict[Split, Dataset]

    @classmethod
    def read(cls, datamodule: ImageClassificationDataModule, splits: Sequence[Split]) -> Images:
        datasets = {split: datamodule.dataset(split) for split in splits}
        prefix = type(datamodule).__name__.removesuffix("DataModule").lower()
        names: list[str] = []
        labels, split_of, position = [], [], []
        for index, (split, dataset) in enumerate(datasets.items()):
            names += [str(path) for path in files] if (files := _files(dataset)) is not None else [
                f"{prefix}[{i}]" for i in range(len(dataset))]
            labels.append(np.asarray(_labels(dataset), dtype=np.int64))
            split_of.append(np.full(len(dataset), index, dtype=np.int64))
            position.append(np.arange(len(dataset)))
        return cls(list(splits), np.concatenate(split_of), np.concatenate(position), np.concatenate(labels), names,
                   list(datamodule.class_names), datasets)

    def __len__(self) -> int:
        return len(self.names)

    def count(self, split: Split) -> int:
        return int((self.split == self.splits.index(split)).sum())

    def split_name(self, row: int) -> Split:
        return self.splits[int(self.split[row])]

    def hashes(self) -> list[bytes]:
        """Each image's content hash: of the file's bytes, or of an in-memory image's pixels."""
        return [digest for dataset in self.datasets.values() for digest in _hashes(dataset)]

    def thumbnail(self, row: int) -> np.ndarray:
        """The image as stored (not as the network saw it), at most THUMBNAIL pixels a side, H x W x 3 uint8."""
        dataset = self.datasets[self.split_name(row)]
        position = int(self.position[row])
        files = _files(dataset)
        if files is None:
            return dataset.images[position].permute(1, 2, 0).numpy()
        with open_image(files[position]) as opened:
            image = decode_rgb(opened)
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        return np.asarray(image)


def _files(dataset: Dataset) -> Sequence[Path] | None:
    """The file of each item (ImageFileDataset and its device-decoding subclass), or None for in-memory images."""
    return getattr(dataset, "files", None)


def _labels(dataset: Dataset) -> Sequence[int]:
    labels = dataset.labels
    return labels.numpy() if hasattr(labels, "numpy") else labels


def _hashes(dataset: Dataset) -> Iterator[bytes]:
    files = _files(dataset)
    if files is None:  # in-memory uint8 tensors: equal pixels are exact copies
        images = dataset.images
        for i in range(len(images)):
            yield content_hash(images[i].contiguous().numpy().tobytes())
        return
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        for start in range(0, len(files), HASH_BATCH):  # a batch of futures at a time, not one per file of the folder
            batch = [files[i] for i in range(start, min(start + HASH_BATCH, len(files)))]
            yield from pool.map(lambda path: content_hash(Path(path).read_bytes()), batch)
