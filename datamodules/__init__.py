"""Lightning datamodules for image classification: uint8 from workers, float work on the device."""

from finetune.datamodules.base import ImageClassificationDataModule
from finetune.datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
from finetune.datamodules.digits import DigitsDataModule
from finetune.datamodules.errors import CorruptImageError, DatasetNotFoundError
from finetune.datamodules.flowers import Flowers102DataModule
from finetune.datamodules.folder import ImageFolderDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CorruptImageError",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "Flowers102DataModule",
    "ImageClassificationDataModule",
    "ImageFolderDataModule",
]
