"""What every datamodule of image files shares: where files are decoded, and whether all are checked first."""

from __future__ import annotations

from abc import ABC
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finetune.configuration.rules import BOOL, hinted, one_of
from finetune.datamodules.base import ImageClassificationDataModule, Split
from finetune.datamodules.device_decode import EncodedImageFileDataset
from finetune.datamodules.images import DECODE_MODES, ImageFileDataset, worker_transform
from finetune.datamodules.index import PathArray


class ImageFileDataModule(ImageClassificationDataModule, ABC):
    """Base of the image-file datamodules.

    `decode`: "worker" (default) decodes in CPU workers, JPEG training crops in draft mode;
    "device" has workers only read the files and decodes, crops and resizes on the device.
    `verify_images`: decode every file before training (slow on large folders); otherwise
    an unreadable file is found when read, and named or (`skip_corrupt`) replaced.
    """

    SETTINGS = {"decode": hinted(one_of(*DECODE_MODES), "e.g. data.decode=worker"), "verify_images": BOOL}

    def __init__(self, *, decode: str = "worker", verify_images: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # checks these too, by SETTINGS
        self.decode = decode
        self.verify_images = verify_images

    def _file_dataset(self, files: PathArray | Sequence[Path], labels: np.ndarray, split: Split) -> ImageFileDataset:
        train = split == "train" and self.augment
        if self.decode == "device":
            return EncodedImageFileDataset(files, labels, self.preprocessing, train, split, seed=self.seed,
                                           skip_corrupt=self.skip_corrupt)
        transform = worker_transform(self.preprocessing, train=train)
        return ImageFileDataset(files, labels, transform, seed=self.seed, skip_corrupt=self.skip_corrupt)
