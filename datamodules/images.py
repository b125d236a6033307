"""Image-file datasets: decoding and cropping in workers, unreadable files handled where they are read.

Shared by the Flowers-102 and image-folder datamodules, whose images are files of
arbitrary size. Setup decodes nothing: a bad file is found when a worker reads it, and
then either named in the error or (`data.skip_corrupt`) replaced by another sample drawn
from (seed, epoch, index). `find_unreadable` is the full check `data.verify_images` asks for.
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as F
from torchvision.transforms.v2 import functional as T2
from tqdm.auto import tqdm

from finetune.datamodules.errors import CorruptImageError
from finetune.datamodules.index import PathArray
from finetune.models.preprocessing import Preprocessing

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
#: `data.decode`: workers decode (JPEG training crops in draft mode), or only read the files for the device to decode.
DECODE_MODES = ("worker", "device")
#: RandomResizedCrop's defaults: area fraction and aspect-ratio range of training crops.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
#: Above this many files the full check shows a progress bar; below it finishes too fast to need one.
_PROGRESS_THRESHOLD = 1000
#: Files a checking thread is given ahead of the results: enough to keep it busy, bounded whatever the dataset's size.
_IN_FLIGHT_PER_THREAD = 4
#: Random draws for a stand-in before giving up: only a mostly unreadable dataset exhausts them.
_STAND_IN_DRAWS = 100
#: PIL's greyscale modes wider than 8 bits, which `convert("RGB")` clips at 255 (PIL reduces 16-bit RGB itself).
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
#: What PIL raises for a file it cannot open or decode.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class UnreadableImage(Exception):
    """One file could not be read or decoded; the message is the decoder's reason."""


class WorkerCorruptImageError(CorruptImageError):
    """A CorruptImageError raised in a DataLoader worker that stays one line in the main process.

    The DataLoader re-raises a worker's exception as `type(message + worker traceback)`;
    this keeps only the original message, the one line `user_errors` prints.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message.rsplit(f"{type(self).__name__}: ", 1)[-1].strip())


def open_image(source: str | Path | BinaryIO) -> Image.Image:
    """PIL's lazy open (header only); an unreadable file raises UnreadableImage."""
    try:
        return Image.open(source)
    except _PIL_ERRORS as error:
        raise UnreadableImage(str(error) or type(error).__name__) from error


def decode_rgb(image: Image.Image) -> Image.Image:
    """Decode an opened image to RGB; a truncated or broken file raises UnreadableImage.

    PIL's `convert("RGB")` clips greyscale of more than 8 bits at 255, so a 16-bit PNG or TIFF
    would come out white: those are scaled to 8 bits first (`eight_bit_grey`).
    """
    try:
        if image.mode in _WIDE_GREY_MODES:
            image = eight_bit_grey(image)
        return image.convert("RGB")
    except _PIL_ERRORS as error:
        raise UnreadableImage(str(error) or type(error).__name__) from error


def eight_bit_grey(image: Image.Image) -> Image.Image:
    """A 16-bit greyscale image (modes I;16*, or I within 0..65535) as 8-bit "L", scaled over the full 16-bit range.

    The scaling is torchvision's `to_dtype(..., scale=True)` (the high byte, 65535 -> 255), which is
    also how torchvision's `decode_image` + `ToDtype` and PIL's own 16-bit RGB decoding reduce 16 bits,
    so every 16-bit image reaches the network alike. Wider values have no fixed range and are refused.
    """
    values = np.asarray(image)
    if image.mode == "F" or values.min() < 0 or values.max() > 65535:
        kind = "floating-point" if image.mode == "F" else "32-bit integer"
        raise UnreadableImage(f"{kind} pixels (PIL mode {image.mode}, values {values.min()} to {values.max()}) "
                              f"have no fixed range to scale to 8 bits; save the image with 8 or 16 bits a channel")
    sixteen = torch.from_numpy(values.astype(np.uint16))  # native byte order, whatever the file's was
    return Image.fromarray(T2.to_dtype(sixteen, torch.uint8, scale=True).numpy())


def train_crop_params(image: Image.Image | Tensor) -> tuple[int, int, int, int, bool]:
    """(top, left, height, width, flip) of a training crop, drawn from torch's CPU RNG.

    The draws of RandomResizedCrop followed by RandomHorizontalFlip, in that order, so
    the worker and device paths (and the pipeline before draft decoding) crop alike.
    """
    top, left, height, width = T.RandomResizedCrop.get_params(image, list(CROP_SCALE), list(CROP_RATIO))
    return top, left, height, width, bool(torch.rand(1) < 0.5)


class RandomCrop:
    """Opened, not yet decoded image -> uint8 C×res×res random resized crop, maybe mirrored.

    With `draft`, a JPEG whose crop is at least 2× the resolution is decoded at 1/2, 1/4
    or 1/8 scale (libjpeg's DCT-domain scaling, the largest that keeps the crop at or
    above the resolution): a 3000×2000 photo costs a fraction of a full decode.
    """

    #: ImageFileDataset hands it the opened file: the draft scale must be chosen before decoding.
    decodes = True

    def __init__(self, resolution: int, interpolation: str, draft: bool) -> None:
        self.resolution = resolution
        self.mode = T.InterpolationMode(interpolation)
        self.draft = draft

    def __call__(self, image: Image.Image) -> Tensor:
        top, left, height, width, flip = train_crop_params(image)
        full_width, full_height = image.size
        if self.draft:
            factor = next((f for f in (8, 4, 2) if min(height, width) >= f * self.resolution), 1)
            if factor > 1:
                image.draft("RGB", (full_width // factor, full_height // factor))
        rgb = decode_rgb(image)
        if rgb.size != (full_width, full_height):  # drafted: the crop box in the smaller image's pixels
            sx, sy = full_width / rgb.width, full_height / rgb.height
            top, left = min(round(top / sy), rgb.height - 1), min(round(left / sx), rgb.width - 1)
            height = max(1, min(round(height / sy), rgb.height - top))
            width = max(1, min(round(width / sx), rgb.width - left))
        size = [self.resolution, self.resolution]
        crop = F.resized_crop(rgb, top, left, height, width, size, self.mode, antialias=True)
        return F.pil_to_tensor(F.hflip(crop) if flip else crop)


def worker_transform(
    preprocessing: Preprocessing, train: bool, *, draft: bool = True
) -> Callable[[Image.Image], Tensor]:
    """PIL -> uint8 C×res×res: random crop+flip for training, the weights' eval resize+centre crop otherwise.

    Eval images are never drafted: they must equal what `finetune-evaluate` computes from
    the fully decoded file. `draft=False` is the full-decode crop (for comparisons).
    """
    if not train:
        return preprocessing.eval_transform()
    return RandomCrop(preprocessing.resolution, preprocessing.interpolation, draft)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation in one epoch: independent of which worker draws it."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class ImageFileDataset(Dataset):
    """(path, label) pairs decoded with PIL to RGB and passed through a worker transform.

    Random transforms draw from torch's CPU generator seeded by (seed, epoch, index), with
    the epoch taken from the `(index, epoch)` keys `EpochSampler` yields (`seeded_by_epoch`):
    worker processes, their number and their persistence then change nothing, and a
    resumed run sees exactly the crops the uninterrupted one would have. A stand-in for
    an unreadable file is drawn from the same three numbers, and its crop too.
    """

    seeded_by_epoch = True

    def __init__(
        self,
        files: PathArray | Sequence[Path],
        labels: Sequence[int] | np.ndarray,
        transform: Callable[[Image.Image], Tensor],
        seed: int = 0,
        *,
        skip_corrupt: bool = False,
    ) -> None:
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        self.files = files if isinstance(files, PathArray) else PathArray.from_names("", [os.fspath(f) for f in files])
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.seed = seed
        self.skip_corrupt = skip_corrupt
        # In shared memory, so every worker sees which files failed: each is reported once, never retried.
        self._unreadable = torch.zeros(len(self.files), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.files)

    @property
    def skipped(self) -> int:
        """How many distinct unreadable files were replaced so far, across all workers."""
        return int(self._unreadable.sum())

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        # Fork: with num_workers=0 this runs in the main process, whose RNG drives dropout.
        with torch.random.fork_rng(devices=[]):
            for position in self.candidates(index, epoch):
                # The CPU generator alone: torch.manual_seed would also reseed (and initialise) CUDA.
                torch.random.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
                try:
                    return self.load(position), int(self.labels[position])
                except UnreadableImage as error:
                    self.report_unreadable(position, str(error))
        raise self.no_stand_in(index)

    def load(self, position: int) -> Tensor:
        with open_image(self.files[position]) as image:
            if getattr(self.transform, "decodes", False):  # e.g. RandomCrop, which drafts JPEGs
                return self.transform(image)
            return self.transform(decode_rgb(image))

    def candidates(self, index: int, epoch: int) -> Iterator[int]:
        """`index`, then stand-ins drawn from (seed, epoch, index), skipping files known to be unreadable."""
        yield index
        rng = np.random.default_rng([self.seed, epoch, index])
        for _ in range(_STAND_IN_DRAWS):
            position = int(rng.integers(len(self)))
            if not self._unreadable[position]:
                yield position

    def report_unreadable(self, position: int, error: str) -> None:
        """Raise naming the file, or with `skip_corrupt` mark it and warn once."""
        path = self.files[position]
        if not self.skip_corrupt:
            raise WorkerCorruptImageError(
                f"cannot decode image '{path}': {error}; replace or delete it, "
                f"or set data.skip_corrupt=true to skip unreadable images"
            )
        if not self._unreadable[position]:
            self._unreadable[position] = True
            warnings.warn(f"skipping unreadable image '{path}': {error} (another sample stands in for it; "
                          f"{self.skipped} unreadable so far)", stacklevel=2)

    def no_stand_in(self, index: int) -> CorruptImageError:
        return WorkerCorruptImageError(
            f"no readable image found in {_STAND_IN_DRAWS} random draws to stand in for '{self.files[index]}' "
            f"({self.skipped} of {len(self)} files unreadable so far); check the images under data.root"
        )


def _decode_error(path: Path) -> str | None:
    """Why `path` cannot be decoded, or None if it can.

    JPEGs are decoded in draft mode (DCT-scaled, ~8x fewer pixels): that still consumes
    the whole entropy-coded stream, so truncation is caught, at a fraction of the cost.
    Greyscale wider than 8 bits is also scaled, so pixels without a fixed range are found here too.
    """
    try:
        with Image.open(path) as image:
            image.draft("RGB", (1, 1))
            image.load()
            if image.mode in _WIDE_GREY_MODES:
                eight_bit_grey(image)
    except _PIL_ERRORS as error:
        return str(error) or type(error).__name__
    except UnreadableImage as error:
        return str(error)
    return None


def find_unreadable(files: Sequence[Path]) -> dict[int, str]:
    """Decode every file once (data.verify_images): position -> why it cannot be decoded.

    At most `_IN_FLIGHT_PER_THREAD` files a thread are submitted ahead of the results: `pool.map`
    submits one future (~2.2 KB) per file up front, 2 GB for a million files.
    """
    threads = min(8, os.cpu_count() or 1)  # PIL releases the GIL while decoding
    unreadable: dict[int, str] = {}
    with ThreadPoolExecutor(max_workers=threads) as pool, tqdm(
        total=len(files), disable=len(files) <= _PROGRESS_THRESHOLD, desc="checking images", unit="img"
    ) as progress:
        pending: deque[tuple[int, Future[str | None]]] = deque()

        def collect_oldest() -> None:
            position, future = pending.popleft()
            if (error := future.result()) is not None:
                unreadable[position] = error
            progress.update()

        for position in range(len(files)):
            pending.append((position, pool.submit(_decode_error, files[position])))
            if len(pending) >= threads * _IN_FLIGHT_PER_THREAD:
                collect_oldest()
        while pending:
            collect_oldest()
    return unreadable


def drop_unreadable(
    files: PathArray | Sequence[Path],
    labels: Sequence[int] | np.ndarray,
    skip_corrupt: bool,
    unreadable: dict[int, str] | None = None,
) -> tuple[PathArray, np.ndarray]:
    """Drop what a full check found (`unreadable`, or a check run now): the first bad file raises unless `skip_corrupt`.

    With `skip_corrupt` each bad file is dropped with a warning naming it.
    """
    files = files if isinstance(files, PathArray) else PathArray.from_names("", [os.fspath(f) for f in files])
    labels = np.asarray(labels, dtype=np.int64)
    if unreadable is None:
        unreadable = find_unreadable(files)
    bad = sorted(unreadable)
    if bad and not skip_corrupt:
        others = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CorruptImageError(
            f"cannot decode image '{files[bad[0]]}': {unreadable[bad[0]]}{others}; replace or delete it, "
            f"or set data.skip_corrupt=true to skip unreadable images"
        )
    for position in bad:
        warnings.warn(f"skipping unreadable image '{files[position]}': {unreadable[position]}", stacklevel=2)
    keep = np.setdiff1d(np.arange(len(files)), bad)
    return files.take(keep), labels[keep]
