"""Oxford Flowers-102 with its official train/val/test splits (`setid.mat`)."""

from __future__ import annotations

import os

import numpy as np
from torch.utils.data import Dataset
from torchvision.datasets import Flowers102

from finetune.datamodules.base import Split
from finetune.datamodules.errors import dataset_not_found
from finetune.datamodules.files import ImageFileDataModule
from finetune.datamodules.images import drop_unreadable
from finetune.datamodules.index import PathArray

_SOURCE = "102flowers.tgz unpacked, imagelabels.mat and setid.mat from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
_REQUIRED = ("jpg/", "imagelabels.mat", "setid.mat")


class _PresenceCheckedFlowers102(Flowers102):
    """torchvision's reader, checking the label files' presence rather than their md5.

    Re-packed copies of the .mat files (same keys, other bytes) then load; downloads still
    verify every md5, and the images themselves are checked as they are read (all of them
    at setup with data.verify_images=true).
    """

    def _check_integrity(self) -> bool:
        folder = self._base_folder
        return self._images_folder.is_dir() and all(
            (folder / self._file_dict[key][0]).is_file() for key in ("label", "setid")
        )


class Flowers102DataModule(ImageFileDataModule):
    """Flowers-102 from `<root>/flowers-102/{jpg/image_%05d.jpg, imagelabels.mat, setid.mat}`.

    Images are decoded, randomly cropped and flipped on CPU workers (they are large and of
    varied size), or on the device with `decode="device"`; `augment=False` uses the
    deterministic eval transform for training too.
    """

    @property
    def has_test(self) -> bool:
        return True

    def prepare_data(self) -> None:
        if self.download:
            self._read("train", download=True)

    def _read(self, split: Split, download: bool) -> Flowers102:
        try:
            return _PresenceCheckedFlowers102(self.root, split=split, download=download)
        except RuntimeError as error:
            if "not found" not in str(error):
                raise
            folder = os.path.join(self.root, "flowers-102")
            missing = [name for name in _REQUIRED if not os.path.exists(os.path.join(folder, name))]
            raise dataset_not_found(
                "Flowers-102", self.root, f"{folder}/{{{','.join(_REQUIRED)}}}", missing, _SOURCE
            ) from None

    def _read_class_names(self) -> list[str]:
        return list(Flowers102.classes)

    def _build_split(self, split: Split) -> Dataset:
        reader = self._read(split, download=self.download)
        # torchvision exposes no public accessor for these; we take its parsed file list and
        # labels, so workers read the files themselves (and a full check can filter them first).
        files = PathArray.from_names(reader._images_folder, [path.name for path in reader._image_files])
        labels = np.asarray(reader._labels, dtype=np.int64)
        if split == "train" and (few := self._few_shot(files.names(), labels)) is not None:  # data.examples_per_class
            files, labels = files.take(few), labels[few]
        if self.verify_images:
            files, labels = drop_unreadable(files, labels, self.skip_corrupt)
        return self._file_dataset(files, labels, split)
