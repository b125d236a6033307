"""Any dataset laid out as one folder of images per class.

Two layouts, told apart by whether `<root>/train/` exists:
  split:  <root>/train/<class>/*, <root>/val/<class>/*, optional <root>/test/<class>/*
          (without val/, val is carved out of train/ as in the single layout)
  single: <root>/<class>/*, split into train/val by `val_fraction`, stratified per class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from datamodules.base import ImageClassificationDataModule, Split, stratified_split
from datamodules.errors import dataset_not_found
from datamodules.images import IMAGE_EXTENSIONS, ImageFileDataset, drop_unreadable, worker_transform
from finetune.errors import ConfigError


def _class_folders(folder: Path) -> list[Path]:
    # Hidden folders (.git, .ipynb_checkpoints, ...) are never classes.
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    """Images under `folder` (recursively), sorted so the split never depends on listing order."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


class ImageFolderDataModule(ImageClassificationDataModule):
    """Class-per-folder images; class names are the (sorted) folder names under train.

    Workers decode and crop like Flowers-102. `val_fraction` (default 0.2) only applies
    when there is no val/ folder; the split is seeded by `seed`.
    """

    def __init__(self, *, val_fraction: float = 0.2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0 < val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.val_fraction = val_fraction
        self._base = Path(self.root)

    @property
    def _split_layout(self) -> bool:
        return (self._base / "train").is_dir()

    @property
    def _train_folder(self) -> Path:
        return self._base / "train" if self._split_layout else self._base

    @property
    def has_test(self) -> bool:
        return self._split_layout and (self._base / "test").is_dir()

    def _read_class_names(self) -> list[str]:
        folder = self._train_folder
        classes = _class_folders(folder) if folder.is_dir() else []
        if not classes:
            root = self.root
            raise dataset_not_found(
                "Image folder",
                root,
                f"{root}/train/<class>/<image> (+ val/, test/ alike) or {root}/<class>/<image>",
                [f"class folders in {folder}" if folder.is_dir() else str(folder)],
                "image types: " + ", ".join(ext.lstrip(".") for ext in IMAGE_EXTENSIONS),
                downloadable=False,
            )
        return [p.name for p in classes]

    def _samples(self, folder: Path) -> tuple[list[Path], list[int]]:
        """All (file, label) pairs under `folder`, labelled by the train folder's class list."""
        index = {name: label for label, name in enumerate(self.class_names)}
        files: list[Path] = []
        labels: list[int] = []
        for class_folder in _class_folders(folder):
            if class_folder.name not in index:
                raise ConfigError(
                    f"class folder '{class_folder}' has no counterpart in '{self._train_folder}'; "
                    f"train/val/test must share one class list"
                )
            found = _image_files(class_folder)
            if not found:
                raise ConfigError(
                    f"class folder '{class_folder}' holds no images "
                    f"({', '.join(IMAGE_EXTENSIONS)}); add some or remove the folder"
                )
            files += found
            labels += [index[class_folder.name]] * len(found)
        return files, labels

    def _build_split(self, split: Split) -> Dataset:
        carve_val = not (self._split_layout and (self._base / "val").is_dir())
        if split == "train" or (split == "val" and carve_val):
            files, labels = self._samples(self._train_folder)
            if carve_val:
                parts = stratified_split(labels, (1 - self.val_fraction, self.val_fraction), self.seed)
                keep = parts[0 if split == "train" else 1]
                files, labels = [files[i] for i in keep], [labels[i] for i in keep]
        else:
            files, labels = self._samples(self._base / split)
        files, labels = drop_unreadable(files, labels, self.skip_corrupt)
        train = split == "train" and self.augment
        return ImageFileDataset(files, labels, worker_transform(self.preprocessing, train=train), seed=self.seed)
