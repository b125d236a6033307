"""What every datamodule of image files shares: where files are decoded, and whether all are checked first."""

from __future__ import annotations

from abc import ABC
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.base import ImageClassificationDataModule, Split
from datamodules.device_decode import EncodedImageFileDataset
from datamodules.images import DECODE_MODES, ImageFileDataset, worker_transform
from datamodules.index import PathArray
from finetune.errors import ConfigError


class ImageFileDataModule(ImageClassificationDataModule, ABC):
    """Base of the image-file datamodules.

    `decode`: "worker" (default) decodes in CPU workers, JPEG training crops in draft mode;
    "device" has workers only read the files and decodes, crops and resizes on the device.
    `verify_images`: decode every file before training (slow on large folders); otherwise
    an unreadable file is found when read, and named or (`skip_corrupt`) replaced.
    """

    def __init__(self, *, decode: str = "worker", verify_images: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if decode not in DECODE_MODES:
            raise ConfigError(f"data.decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}; "
                              "e.g. data.decode=worker")
        self.decode = decode
        self.verify_images = verify_images

    def _file_dataset(self, files: PathArray | Sequence[Path], labels: np.ndarray, split: Split) -> ImageFileDataset:
        train = split == "train" and self.augment
        if self.decode == "device":
            return EncodedImageFileDataset(files, labels, self.preprocessing, train, split, seed=self.seed,
                                           skip_corrupt=self.skip_corrupt)
        transform = worker_transform(self.preprocessing, train=train)
        return ImageFileDataset(files, labels, transform, seed=self.seed, skip_corrupt=self.skip_corrupt)
