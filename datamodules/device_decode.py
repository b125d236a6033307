"""`data.decode=device`: workers only read the files; the device decodes, crops and resizes the batch.

On a GPU, nvJPEG (`torchvision.io.decode_jpeg(..., device="cuda")`) decodes a whole batch
of JPEGs, the work that limits a CPU worker to a few hundred images a second. On the CPU
the same call runs libjpeg-turbo, the decoder PIL uses, and eval images go through the
very `Preprocessing.eval_transform()` the worker path applies, so they come out equal.
Training crops are drawn from (seed, epoch, index) exactly like the worker path's (the
batch carries each sample's index and epoch), then resampled on the device.

Files that are not JPEGs (PNG, WebP, ...) are decoded by the worker as before.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from finetune.datamodules.images import (
    ImageFileDataset, UnreadableImage, decode_rgb, open_image, sample_seed, train_crop_params,
)
from finetune.datamodules.index import PathArray
from finetune.models.preprocessing import Preprocessing

_JPEG_MAGIC = b"\xff\xd8\xff"


class EncodedImages:
    """A batch of undecoded JPEG bytes (1-D uint8) or worker-decoded images (3-D uint8), with their keys.

    `keys` rows are (index, epoch, position): the sample, its epoch, and the file that
    was read for it (another than `index` when the worker replaced an unreadable one).
    `.to(device)`, which Lightning's batch transfer calls, only records where to decode:
    nvJPEG reads its input from host memory.
    """

    def __init__(self, data: list[Tensor], keys: Tensor, split: str, device: torch.device | str = "cpu") -> None:
        self.data, self.keys, self.split, self.device = data, keys, split, torch.device(device)

    def to(self, device: torch.device | str, *args: Any, **kwargs: Any) -> EncodedImages:
        return EncodedImages(self.data, self.keys, self.split, device)

    def __len__(self) -> int:
        return len(self.data)


class EncodedImageFileDataset(ImageFileDataset):
    """Image files for `data.decode=device`: items are file bytes; `decode_batch` turns a batch into images."""

    def __init__(
        self,
        files: PathArray | Sequence[Path],
        labels: Sequence[int] | np.ndarray,
        preprocessing: Preprocessing,
        train: bool,
        split: str,
        seed: int = 0,
        *,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(files, labels, transform=preprocessing.eval_transform(), seed=seed, skip_corrupt=skip_corrupt)
        self.resolution = preprocessing.resolution
        self.mode = InterpolationMode(preprocessing.interpolation)
        self.train = train
        self.split = split

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[tuple[Tensor, int, int, int], int]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        (data, position), label = super().__getitem__(key)
        return (data, index, epoch, position), label

    def load(self, position: int) -> tuple[Tensor, int]:  # type: ignore[override]
        """A JPEG's bytes as they are on disk; any other format decoded here, with PIL."""
        path = self.files[position]
        try:
            raw = np.fromfile(path, dtype=np.uint8)
        except OSError as error:
            raise UnreadableImage(error.strerror or str(error)) from error
        if raw[:3].tobytes() == _JPEG_MAGIC:
            return torch.from_numpy(raw), position
        with open_image(path) as image:
            return F.pil_to_tensor(decode_rgb(image)), position

    def collate_fn(self, items: list[tuple[tuple[Tensor, int, int, int], int]]) -> tuple[EncodedImages, Tensor]:
        keys = torch.tensor([[index, epoch, position] for (_, index, epoch, position), _ in items], dtype=torch.int64)
        labels = torch.tensor([label for _, label in items], dtype=torch.int64)
        return EncodedImages([data for (data, *_), _ in items], keys, self.split), labels

    def decode_batch(self, batch: EncodedImages, labels: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 B×C×res×res on `batch.device`, and the labels (changed where a stand-in replaced a bad file)."""
        device = batch.device
        images = _decode(batch.data, device)
        out = []
        for k, (index, epoch, position) in enumerate(batch.keys.tolist()):
            image = images[k]
            if isinstance(image, str):
                self.report_unreadable(position, image)
                image, position = self._stand_in(index, epoch, device)
                labels = labels.clone()
                labels[k] = int(self.labels[position])
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
                out.append(self._crop(image))
        return torch.stack(out), labels

    def _stand_in(self, index: int, epoch: int, device: torch.device) -> tuple[Tensor, int]:
        """The first decodable file among `index`'s candidates: the one the worker path would have used."""
        for position in self.candidates(index, epoch):
            if self._unreadable[position]:
                continue
            try:
                data, _ = self.load(position)
            except UnreadableImage as error:
                self.report_unreadable(position, str(error))
                continue
            image = _decode([data], device)[0]
            if not isinstance(image, str):
                return image, position
            self.report_unreadable(position, image)
        raise self.no_stand_in(index)

    def _crop(self, image: Tensor) -> Tensor:
        """The worker path's crop of a decoded image, on its device: seeded random crop+flip, or the eval transform."""
        if not self.train:
            return self.transform(image)
        top, left, height, width, flip = train_crop_params(image)
        size = [self.resolution, self.resolution]
        crop = F.resized_crop(image, top, left, height, width, size, self.mode, antialias=True)
        return F.horizontal_flip(crop) if flip else crop


def _decode(data: list[Tensor], device: torch.device) -> list[Tensor | str]:
    """Each item as uint8 3×H×W on `device` (JPEG bytes decoded there), or why it could not be decoded."""
    out: list[Tensor | str | None] = [item.to(device) if item.ndim == 3 else None for item in data]
    jpegs = [k for k, item in enumerate(data) if item.ndim == 1]
    if device.type == "cuda" and len(jpegs) > 1:
        # One nvJPEG call for the batch; a bad file fails it, and then each is decoded alone below.
        with contextlib.suppress(RuntimeError):
            for k, image in zip(jpegs, decode_jpeg([data[k] for k in jpegs], mode=ImageReadMode.RGB, device=device)):
                out[k] = image
    for k in jpegs:
        if out[k] is None:
            try:
                out[k] = decode_jpeg(data[k], mode=ImageReadMode.RGB, device=device)
            except RuntimeError as error:  # torchvision prefixes its C++ source location
                out[k] = re.sub(r"^.*\.cpp:\d+, ", "", str(error)) or "undecodable JPEG"
    return out  # type: ignore[return-value]
