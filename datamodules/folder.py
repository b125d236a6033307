"""Any dataset laid out as one folder of images per class.

Two layouts, told apart by whether `<root>/train/` exists:
  split:  <root>/train/<class>/*, <root>/val/<class>/*, optional <root>/test/<class>/*
          (without val/, val is carved out of train/ as in the single layout)
  single: <root>/<class>/*, split into train/val by `val_fraction`, stratified per class
          and drawn per file (`splits.stable_split`): independent of `seed`, and stable
          when files are added or removed.

Each folder is listed once per job (`prepare_data`, on one process per node) into a
cached `FolderIndex`; no image is decoded before a worker reads it. Under DDP every
process then uses the index global rank 0 uses, so all draw the same splits and agree
on the number of batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from finetune.configuration.rules import PATH, SEED, number, optional
from finetune.datamodules.base import Split
from finetune.datamodules.errors import dataset_not_found
from finetune.datamodules.files import ImageFileDataModule
from finetune.datamodules.images import IMAGE_EXTENSIONS, drop_unreadable, find_unreadable
from finetune.datamodules.index import FolderIndex, PathArray, cache_file, class_folders, current_index
from finetune.datamodules.splits import stable_split
from finetune.errors import ConfigError


class ImageFolderDataModule(ImageFileDataModule):
    """Class-per-folder images; class names are the (sorted) folder names under train.

    Workers decode and crop like Flowers-102. `val_fraction` (default 0.2) only applies
    when there is no val/ folder; which files validate depends on `split_seed` and on
    each file's path relative to the class folders, not on `seed`. `cache_dir` holds the
    index (default: `$XDG_CACHE_HOME/effnet-finetune/index/`, else `~/.cache/effnet-finetune/index/`;
    nothing is written into the data folder unless `cache_dir` names it).
    """

    # Not 0, unlike CIFAR's: a single folder has no official test split to validate on instead.
    SETTINGS = {"val_fraction": number(0, 1, lo_open=True, hi_open=True), "split_seed": SEED,
                "cache_dir": optional(PATH)}

    def __init__(
        self, *, val_fraction: float = 0.2, split_seed: int = 0, cache_dir: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)  # checks these too, by SETTINGS
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.cache_dir = cache_dir
        self._base = Path(self.root)
        self._indexes: dict[Path, FolderIndex] = {}
        self._agreed = False  # whether this process took rank 0's indexes (DDP)
        self._carved: tuple[np.ndarray, np.ndarray] | None = None  # train/val positions when val is carved out of train

    @property
    def _split_layout(self) -> bool:
        return (self._base / "train").is_dir()

    @property
    def _train_folder(self) -> Path:
        return self._base / "train" if self._split_layout else self._base

    @property
    def has_test(self) -> bool:
        return self._split_layout and (self._base / "test").is_dir()

    @property
    def missing_test(self) -> str:
        root = self.root
        layout = ("has no test/ folder" if self._split_layout
                  else "is one folder per class, which training splits into train and val only")
        return (f"'{root}' {layout}: put held-out images in {root}/test/<class>/ beside {root}/train/<class>/ to test "
                "the best checkpoint after training, or score any labelled folder with finetune-evaluate")

    def _read_class_names(self) -> list[str]:
        folder = self._train_folder
        classes = class_folders(folder) if folder.is_dir() else []
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
        if len(classes) == 1:
            raise ConfigError(
                f"image folder '{folder}' holds one class folder ('{classes[0].name}'); a classifier needs two or "
                f"more: add a folder of images per class"
            )
        return [p.name for p in classes]

    def _folders(self) -> dict[str, Path]:
        """The tree's listed folders by their name under the root ("." in the single layout), absolute."""
        folders = [self._train_folder] + [self._base / s for s in ("val", "test") if self._split_layout]
        return {str(f.relative_to(self._base)): f.absolute() for f in folders if f.is_dir()}

    def prepare_data(self) -> None:
        """List every folder of the tree once per node and cache its index (Lightning: local rank 0, before setup).

        Every split's class folders are checked against train's here, so a stray test class
        fails the run before it trains.
        """
        for folder in self._folders().values():
            self._samples(folder)

    def setup(self, stage: str | None = None) -> None:
        """Under DDP, first take global rank 0's index of every folder (`_use_rank_zero_indexes`)."""
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1 and not self._agreed:
            self._use_rank_zero_indexes(trainer.strategy, trainer.global_rank)
            self._agreed = True
        super().setup(stage)

    def _use_rank_zero_indexes(self, strategy: Any, rank: int) -> None:
        """Make every process's index of every folder the one global rank 0 uses (a collective call: all ranks).

        Rank 0 broadcasts its indexes' digests; another rank takes whichever of its node's
        listing (prepare_data), the cached index and a listing of its own has that digest.
        Never a cached index unchecked: one left by an earlier job, when rank 0 could not
        write its own, would give this rank other splits and another number of batches (a hang).
        """
        folders = self._folders()
        mine = {name: self._index(folder).digest for name, folder in folders.items()} if rank == 0 else None
        digests = strategy.broadcast(mine, src=0)
        if rank == 0:
            return
        if set(digests) != set(folders):
            raise ConfigError(f"process {rank} finds the folders {sorted(folders)} under '{self._base}', process 0 "
                              f"found {sorted(digests)}: every process must see the same data.root")
        for name, folder in folders.items():
            self._indexes[folder] = self._index_with_digest(folder, digests[name], rank)

    def _index_with_digest(self, folder: Path, digest: str, rank: int) -> FolderIndex:
        """This node's listing, the cached index or a listing made here, whichever has rank 0's `digest`."""
        for find in (self._indexes.get, self._cached_index, self._current_index):
            index = find(folder)
            if index is not None and index.digest == digest:
                return index
        raise ConfigError(
            f"process {rank} lists other images under '{folder}' than process 0 did (the folder changed while the job "
            f"started, or the nodes see different files), and process 0's index could not be shared: set "
            f"data.cache_dir to a folder every process reads and process 0 can write"
        )

    def _index(self, folder: Path) -> FolderIndex:
        folder = folder.absolute()
        if folder not in self._indexes:
            self._indexes[folder] = self._current_index(folder)
        return self._indexes[folder]

    def _cache_file(self, folder: Path) -> Path:
        return cache_file(folder, self.cache_dir)

    def _cached_index(self, folder: Path) -> FolderIndex | None:
        return FolderIndex.load(self._cache_file(folder), folder)

    def _current_index(self, folder: Path) -> FolderIndex:
        check = find_unreadable if self.verify_images else None
        return current_index(folder, self._cache_file(folder), IMAGE_EXTENSIONS, check)

    def _samples(self, folder: Path) -> tuple[PathArray, np.ndarray, dict[int, str]]:
        """All files under `folder`, labelled by the train folder's class list, and a full check's findings."""
        index = self._index(folder)
        if index.folder == self._train_folder.absolute() and index.classes != self.class_names:
            raise ConfigError(f"the class folders under '{index.folder}' changed while the job started "
                              f"({len(self.class_names)} when the model was sized, {len(index.classes)} when listed); "
                              "start it again once they are in place")
        label_of = {name: label for label, name in enumerate(self.class_names)}
        for name, count in zip(index.classes, np.bincount(index.class_ids, minlength=len(index.classes))):
            class_folder = index.folder / name
            if name not in label_of:
                raise ConfigError(
                    f"class folder '{class_folder}' has no counterpart in '{self._train_folder}'; "
                    f"train/val/test must share one class list"
                )
            if count == 0:
                raise ConfigError(
                    f"class folder '{class_folder}' holds no images "
                    f"({', '.join(IMAGE_EXTENSIONS)}); add some or remove the folder"
                )
        labels = np.array([label_of[name] for name in index.classes], dtype=np.int64)[index.class_ids]
        return index.paths, labels, index.unreadable or {}

    def _build_split(self, split: Split) -> Dataset:
        carve_val = not (self._split_layout and (self._base / "val").is_dir())
        if split == "train" or (split == "val" and carve_val):
            files, labels, unreadable = self._samples(self._train_folder)
            if carve_val:
                if self._carved is None:  # once for both splits
                    self._carved = stable_split(files.names(), labels, self.val_fraction, self.split_seed)
                keep = self._carved[0 if split == "train" else 1]
                files, labels, unreadable = files.take(keep), labels[keep], _renumbered(unreadable, keep)
            keep = self._few_shot(files.names(), labels) if split == "train" else None
            if keep is not None:  # data.examples_per_class: the K highest-hashing training files of each class
                files, labels, unreadable = files.take(keep), labels[keep], _renumbered(unreadable, keep)
        else:
            files, labels, unreadable = self._samples(self._base / split)
        if self.verify_images:
            files, labels = drop_unreadable(files, labels, self.skip_corrupt, unreadable)
        return self._file_dataset(files, labels, split)


def _renumbered(unreadable: dict[int, str], keep: np.ndarray) -> dict[int, str]:
    """Findings keyed by position in the sorted selection `keep` instead of in the whole folder."""
    at = {position: int(np.searchsorted(keep, position)) for position in unreadable}
    return {at[p]: error for p, error in unreadable.items() if at[p] < len(keep) and keep[at[p]] == p}
