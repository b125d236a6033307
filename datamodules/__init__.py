"""Lightning datamodules for image classification: uint8 from workers, float work on the device."""

from datamodules.base import ImageClassificationDataModule
from datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
from datamodules.digits import DigitsDataModule
from datamodules.errors import CorruptImageError, DatasetNotFoundError
from datamodules.flowers import Flowers102DataModule
from datamodules.folder import ImageFolderDataModule

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
