"""scikit-learn's bundled 8×8 handwritten digits: a tiny real dataset that needs no download.

Useful for smoke tests and demos of the whole pipeline on a laptop CPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from finetune.datamodules.base import ImageClassificationDataModule, InMemoryImageDataset, Split, stratified_split

#: Stratified train/val/test proportions, seeded by `seed`.
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
_SPLITS: tuple[Split, ...] = ("train", "val", "test")


class DigitsDataModule(ImageClassificationDataModule):
    """1797 digits (10 classes) held in memory as uint8 3×8×8, upsampled on the device.

    `root` and `download` are accepted for a uniform config but unused: the data ships
    with scikit-learn. Training augmentation is a ±1 px random translation on the device;
    there are no flips, since a mirrored digit is a different (or no) digit.
    """

    device_pad = 1
    device_flip = False
    whole_image_eval = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._arrays: tuple[Tensor, Tensor] | None = None

    @property
    def has_test(self) -> bool:
        return True

    def _read_class_names(self) -> list[str]:
        return [str(digit) for digit in range(10)]

    def _load(self) -> tuple[Tensor, Tensor]:
        if self._arrays is None:
            # Imported here: sklearn.datasets adds about a second to `import finetune.datamodules`.
            from sklearn.datasets import load_digits

            digits = load_digits()
            gray = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # values are 0..16
            images = torch.from_numpy(gray)[:, None].repeat(1, 3, 1, 1)
            self._arrays = (images, torch.from_numpy(digits.target).to(torch.int64))
        return self._arrays

    def _build_split(self, split: Split) -> Dataset:
        images, labels = self._load()
        parts = stratified_split(labels.numpy(), SPLIT_FRACTIONS, self.seed)
        index = parts[_SPLITS.index(split)]
        # data.examples_per_class: keyed by the index in scikit-learn's array; chosen among this seed's train split
        if split == "train" and (few := self._few_shot([b"%d" % i for i in index], labels.numpy()[index])) is not None:
            index = index[few]
        return InMemoryImageDataset(images[torch.from_numpy(index)], labels[torch.from_numpy(index)])
