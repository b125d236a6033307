"""Image-file datasets: worker transforms and the setup-time scan for undecodable files.

Shared by the Flowers-102 and image-folder datamodules, whose images are files of
arbitrary size that must be decoded and cropped on CPU workers before batching.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms as T
from tqdm.auto import tqdm

from datamodules.errors import CorruptImageError
from finetune.models.preprocessing import Preprocessing

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
#: Above this many files the scan shows a progress bar; below it finishes too fast to need one.
_PROGRESS_THRESHOLD = 1000


def worker_transform(preprocessing: Preprocessing, train: bool) -> Callable[[Image.Image], Tensor]:
    """PIL -> uint8 C×res×res: random crop+flip for training, the weights' eval resize+centre crop otherwise."""
    if not train:
        return preprocessing.eval_transform()
    mode = T.InterpolationMode(preprocessing.interpolation)
    return T.Compose([T.RandomResizedCrop(preprocessing.resolution, interpolation=mode),
                      T.RandomHorizontalFlip(), T.PILToTensor()])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation in one epoch: independent of which worker draws it."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class ImageFileDataset(Dataset):
    """(path, label) pairs decoded with PIL to RGB and passed through a worker transform.

    Random transforms draw from a generator seeded by (seed, epoch, index), with the epoch
    taken from the `(index, epoch)` keys `EpochSampler` yields (`seeded_by_epoch`): worker
    processes, their number and their persistence then change nothing, and a resumed run
    sees exactly the crops the uninterrupted one would have.
    """

    seeded_by_epoch = True

    def __init__(
        self, files: Sequence[Path], labels: Sequence[int], transform: Callable[[Image.Image], Tensor], seed: int = 0
    ) -> None:
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        self.files = list(files)
        self.labels = [int(label) for label in labels]
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        with Image.open(self.files[index]) as image:
            rgb = image.convert("RGB")
        # Fork: with num_workers=0 this runs in the main process, whose RNG drives dropout.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.transform(rgb), self.labels[index]


def _decode_error(path: Path) -> str | None:
    """Why `path` cannot be decoded, or None if it can.

    JPEGs are decoded in draft mode (DCT-scaled, ~8x fewer pixels): that still consumes
    the whole entropy-coded stream, so truncation is caught, at a fraction of the cost.
    """
    try:
        with Image.open(path) as image:
            image.draft("RGB", (1, 1))
            image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        return str(error) or type(error).__name__
    return None


def drop_unreadable(
    files: Sequence[Path], labels: Sequence[int], skip_corrupt: bool
) -> tuple[list[Path], list[int]]:
    """Decode every file once, so a bad image fails here and not in a worker mid-epoch.

    Raises CorruptImageError on the first bad file unless `skip_corrupt`, in which case
    each bad file is dropped with a warning naming it.
    """
    threads = min(8, os.cpu_count() or 1)  # PIL releases the GIL while decoding
    with ThreadPoolExecutor(max_workers=threads) as pool:
        errors = list(
            tqdm(
                pool.map(_decode_error, files),
                total=len(files),
                disable=len(files) <= _PROGRESS_THRESHOLD,
                desc="checking images",
                unit="img",
            )
        )
    bad = [(path, error) for path, error in zip(files, errors) if error is not None]
    if bad and not skip_corrupt:
        path, error = bad[0]
        others = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CorruptImageError(
            f"cannot decode image '{path}': {error}{others}; replace or delete it, "
            f"or set data.skip_corrupt=true to skip unreadable images"
        )
    for path, error in bad:
        warnings.warn(f"skipping unreadable image '{path}': {error}", stacklevel=2)
    kept = [(path, label) for path, label, error in zip(files, labels, errors) if error is None]
    return [path for path, _ in kept], [label for _, label in kept]
