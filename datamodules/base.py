"""Shared machinery for every image-classification datamodule.

Workers only decode and produce uint8 tensors: uint8 is a quarter of the bytes of
float32 through pinned memory and the host-to-device copy, and per-pixel work
(augmentation of in-memory datasets, resize, normalisation) is far cheaper on the
accelerator than on a few CPU cores. `device_transform` is that device half; Lightning
runs it through `on_after_batch_transfer`.
"""

from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms.v2 import Transform

from finetune.configuration.rules import (
    BOOL,
    PATH,
    SEED,
    Rule,
    either,
    hinted,
    integer,
    number,
    numbers,
    one_of,
    optional,
)
from finetune.datamodules.augment import AUTO_AUGMENT, auto_augment_policy, batch_mixer, erase_per_image, per_image
from finetune.datamodules.device_decode import EncodedImages
from finetune.datamodules.splits import RECORDED_SETTINGS, check_same_data, examples_per_class, split_identity
from finetune.errors import ConfigError
from finetune.models.preprocessing import (
    DEFAULT_CROP_FRACTION,
    DEFAULT_INTERPOLATION,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    resize_like_pil,
)
from finetune.signals import ignore_in_worker

Split = Literal["train", "val", "test"]
#: `data.balance`: none, class-balanced sampling (`EpochSampler`), or a loss weighted by inverse class frequency.
BALANCE = ("none", "sampler", "loss")
#: The bit at which a balanced epoch's repeat count enters an `(index, epoch)` key (see `EpochSampler`).
_REPEAT_SHIFT = 32

_STAGE_SPLITS: dict[str | None, tuple[Split, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": (),
    None: ("train", "val", "test"),
}


class InMemoryImageDataset(Dataset):
    """Items of a preloaded uint8 N×C×H×W tensor, for datasets small enough to hold in RAM.

    Indexing a tensor is all a worker does here, so there is no per-item decode cost and
    forked workers share the storage copy-on-write.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected a uint8 N×C×H×W tensor, got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]


def stratified_split(labels: Sequence[int] | np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split indices into len(fractions) parts, each holding every class in proportion.

    Each sample gets its quantile within its (seeded, shuffled) class; cutting the list
    sorted by quantile at the cumulative fractions makes part sizes exact overall and
    per-class counts within one of proportional. Per-class rounding would instead leave a
    dataset of many 2-image classes with no validation set at all. Returned indices are
    sorted, so a split depends only on the labels and `seed`.
    """
    if not np.isclose(sum(fractions), 1.0) or min(fractions) < 0:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {tuple(fractions)}")
    labels = np.asarray(labels)
    shuffled = np.random.default_rng(seed).permutation(len(labels))
    # Each class's members in shuffled order, all classes at once (a loop over 1000 classes took 8.6 s at 1.28M).
    by_class = shuffled[np.argsort(labels[shuffled], kind="stable")]
    _, first, sizes = np.unique(labels[by_class], return_index=True, return_counts=True)
    quantile = np.empty(len(labels))
    quantile[by_class] = (np.arange(len(labels)) - np.repeat(first, sizes) + 0.5) / np.repeat(sizes, sizes)
    tie_break = np.empty(len(labels))
    tie_break[shuffled] = np.arange(len(labels))  # equal quantiles across classes: seeded order
    ranked = np.lexsort((tie_break, quantile))
    cuts = np.round(np.cumsum(fractions)[:-1] * len(labels)).astype(int)
    return [np.sort(part) for part in np.split(ranked, cuts)]


def random_translate_flip(images: Tensor, pad: int, flip: bool) -> Tensor:
    """Per-sample random crop of a zero-padded batch (+ optional horizontal flip), as one gather.

    Equivalent to torchvision's RandomCrop(size, padding=pad) + RandomHorizontalFlip applied
    to each image, but vectorised over the batch so it stays a few kernels on the device.
    Randomness comes from torch's global RNG on the images' device, so
    `lightning.seed_everything` makes it reproducible.
    """
    b, _, h, w = images.shape
    device = images.device
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b, 1), device=device)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), device=device)
    rows = dy + torch.arange(h, device=device)
    cols = torch.arange(w, device=device).expand(b, w)
    if flip:
        mirrored = torch.rand(b, 1, device=device) < 0.5
        cols = torch.where(mirrored, cols.flip(-1), cols)
    cols = cols + dx
    batch = torch.arange(b, device=device).view(b, 1, 1)
    gathered = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return gathered.permute(0, 3, 1, 2)


def _worker_init(worker_id: int) -> None:
    """Workers leave stop signals to the main process, and keep Lightning's worker seeding (`seed_everything(workers=True)`)."""
    ignore_in_worker(worker_id)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):  # Lightning adds its own only to loaders that have none
        pl_worker_init_function(worker_id)


#: `num_workers=auto` caps per process. Past about 16 decoding workers a GPU's step, not the loader, sets the pace
#: (timm's and torchvision's reference scripts default to 4-16 per GPU), and each worker costs a process's memory.
MAX_TRAIN_WORKERS = 16
#: Fewer for validation and test: their loader idles while training runs (its persistent workers only hold memory)
#: and reads a fraction of the images (val_fraction 0.2), with a cheaper transform (no random crop).
MAX_EVAL_WORKERS = 8


def auto_num_workers(devices: int, cap: int = MAX_TRAIN_WORKERS) -> int:
    """`num_workers=auto`: this process's share of the CPU cores it may run on, less one for itself, at most `cap`.

    The share is the whole affinity set when it is already per task: SLURM binds each task to its
    `cpus_per_task` (SLURM_CPUS_PER_TASK set), and an affinity set smaller than the machine is one
    chosen for this process. Dividing it among the node's devices again left 2 workers of 8 CPUs
    with 4 GPUs. Only a process that may run on the whole machine shares it among `devices`.
    The main process (the training loop) keeps one core; without the cap a 128-core node with
    one GPU started 128 workers per loader.
    """
    machine = os.cpu_count() or 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else machine
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit():
        cores = min(cores, int(per_task))
    elif cores >= machine:
        cores //= max(1, devices)
    return max(1, min(cap, cores - 1))


class EpochSampler(DistributedSampler):
    """A shuffle whose order in epoch e depends on (seed, e) alone; keys carry e to seeded datasets.

    DistributedSampler already draws epoch e's permutation from seed + e in `set_epoch`
    (which Lightning calls every epoch) and shards it across DDP processes; Lightning
    keeps a DistributedSampler as given. For a dataset with `seeded_by_epoch = True` it
    yields `(index, epoch)` keys, so that dataset draws each sample's augmentation from
    (seed, epoch, index): the same numbers whichever worker, persistent or not, serves
    the sample, however many workers there are, and in a resumed run. `skip` drops the
    first samples of the epoch it was created for: a run resumed mid-epoch continues
    where the interrupted one stopped. Its length stays the whole epoch's even then:
    Lightning sizes every epoch from the first loader's length and restores its batch
    counter to the batches already trained, so it takes exactly the rest of the epoch
    (a shortened length shortened every later epoch too). It also owns the generator its
    DataLoader draws worker base seeds from, so loading never touches torch's global RNG
    (which checkpoints restore for dropout and device-side augmentation).

    With `labels` (data.balance=sampler) epoch e instead draws as many samples as it has,
    with replacement, each with probability proportional to 1 / its class's count: a class
    uniformly, then a member uniformly, from numpy's generator seeded by (seed, e). The whole
    epoch's draw is made on every process and sharded like DistributedSampler's, so exact
    mid-epoch resume (`skip`) and DDP sharding hold as for the shuffle. torch's
    WeightedRandomSampler is not used: it neither shards across processes nor draws from
    (seed, epoch), and torch.multinomial, which it calls, refuses more than 2**24 samples.
    A sample drawn again in the same epoch gets its own augmentation: its k-th repeat is
    keyed `(index, epoch + k * 2**32)`, which seeded datasets only use as a seed.
    """

    def __init__(
        self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int, epoch: int = 0, skip: int = 0,
        labels: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.generator = torch.Generator()
        self.keyed = bool(getattr(dataset, "seeded_by_epoch", False))
        self._skip_epoch, self._skip = epoch, skip
        self._classes: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        if labels is not None:
            labels = np.asarray(labels, dtype=np.int64)
            counts = np.bincount(labels)
            # members grouped by class, and each class's count and start among them
            self._classes = (np.argsort(labels, kind="stable"), np.flatnonzero(counts), counts, np.cumsum(counts) - counts)
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.generator.manual_seed(self.seed + epoch)

    def __iter__(self) -> Iterator[int | tuple[int, int]]:
        if self._classes is None:
            indices = list(super().__iter__())
            epochs = [self.epoch] * len(indices)
        else:
            indices, epochs = self._balanced()
        if self.epoch == self._skip_epoch and self._skip:
            indices, epochs = indices[self._skip:], epochs[self._skip:]
        self._skip = 0  # only the resumed epoch starts late
        return iter(list(zip(indices, epochs)) if self.keyed else indices)

    def _balanced(self) -> tuple[list[int], list[int]]:
        """This process's share of epoch e's class-balanced draw, and each sample's key epoch (its repeat in the high bits)."""
        members, present, counts, first = self._classes
        rng = np.random.default_rng([self.seed, self.epoch])
        classes = present[rng.integers(len(present), size=self.total_size)]
        drawn = members[first[classes] + rng.integers(0, counts[classes])]
        by_index = np.argsort(drawn, kind="stable")
        _, starts, runs = np.unique(drawn[by_index], return_index=True, return_counts=True)
        repeat = np.empty(len(drawn), dtype=np.int64)
        repeat[by_index] = np.arange(len(drawn)) - np.repeat(starts, runs)
        mine = slice(self.rank, self.total_size, self.num_replicas)
        return drawn[mine].tolist(), (self.epoch + (repeat[mine] << _REPEAT_SHIFT)).tolist()


class ImageClassificationDataModule(L.LightningDataModule, ABC):
    """Base datamodule: uint8 worker batches, device-side float conversion/augment/resize/normalise.

    Subclasses provide `_read_class_names`, `_build_split` and `has_test`; those holding
    small images in memory set `device_pad`/`device_flip` to get the vectorised random
    translation (+ flip) in `device_transform` instead of per-image CPU transforms.
    """

    #: Zero padding (pixels, at native size) for the device-side random translation; 0 = none.
    device_pad: int = 0
    #: Whether the device-side augmentation also flips horizontally.
    device_flip: bool = False
    #: Whether eval images are resized whole rather than centre-cropped: true of in-memory datasets, whose
    #: small images `device_transform` upsamples entire. `preprocessing` then says crop fraction 1.0 whatever
    #: the weights' is, so a checkpoint records what validation did and the export card prepares the same input.
    whole_image_eval: bool = False
    #: What each constructor keyword must be: the one table behind both the constructor's checks and
    #: `validate_config`'s, which reads it from `data._target_` before any data is read. A subclass lists
    #: its own keywords, or a stricter rule for one of its base's (see `settings`).
    SETTINGS: ClassVar[Mapping[str, Rule]] = {
        "root": PATH,
        "download": BOOL,
        "batch_size": integer(1),
        "num_workers": hinted(either(integer(0), one_of("auto")), "e.g. data.num_workers=auto"),
        "resolution": integer(1),
        "mean": numbers(3, number(0, 1), "[0.5,0.5,0.5]"),
        "std": numbers(3, number(0, lo_open=True), "[0.5,0.5,0.5]"),
        "augment": BOOL,
        "seed": SEED,
        "pin_memory": optional(BOOL),
        "persistent_workers": BOOL,
        "skip_corrupt": BOOL,
        "channels_last": BOOL,
        "auto_augment": hinted(optional(one_of(*AUTO_AUGMENT)), "e.g. data.auto_augment=randaugment"),
        "random_erasing": hinted(number(0, 1), "e.g. data.random_erasing=0.25"),
        "mixup_alpha": hinted(number(0), "0: off; e.g. data.mixup_alpha=0.2"),
        "cutmix_alpha": hinted(number(0), "0: off; e.g. data.cutmix_alpha=1.0"),
        "balance": hinted(one_of(*BALANCE), "e.g. data.balance=sampler"),
        "examples_per_class": hinted(optional(integer(1)), "null: every training image; e.g. data.examples_per_class=10"),
    }

    @classmethod
    def settings(cls) -> dict[str, Rule]:
        """Every keyword's rule along the class's bases, a subclass's rule replacing its base's."""
        rules: dict[str, Rule] = {}
        for klass in reversed(cls.__mro__):
            rules |= vars(klass).get("SETTINGS", {})
        return rules

    def __init__(
        self,
        *,
        root: str = "data",
        download: bool = False,
        batch_size: int = 64,
        num_workers: int | str = "auto",
        resolution: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        augment: bool = True,
        seed: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        skip_corrupt: bool = False,
        channels_last: bool = True,
        auto_augment: str | None = None,
        random_erasing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        balance: str = "none",
        examples_per_class: int | None = None,
    ) -> None:
        super().__init__()
        # Recorded so checkpoints carry the data config (Lightning stores datamodule hparams).
        self.save_hyperparameters()
        # hparams hold every keyword of the whole constructor chain (a subclass's too): one pass checks them all.
        rules = type(self).settings()
        for key, value in self.hparams.items():
            if key in rules:
                rules[key].check(f"data.{key}", value)
        self.root = str(root)
        self.download = download
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.resolution = resolution
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.interpolation = DEFAULT_INTERPOLATION  # until set_preprocessing adopts the weights'
        self.crop_fraction = 1.0 if self.whole_image_eval else DEFAULT_CROP_FRACTION
        self.augment = augment
        self.seed = seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers
        self.skip_corrupt = skip_corrupt
        self.channels_last = channels_last
        self.auto_augment = auto_augment
        self.random_erasing = random_erasing
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.balance = balance
        self.examples_per_class = examples_per_class
        self._auto_augment = auto_augment_policy(auto_augment) if auto_augment else None
        self._mixer: Transform | None = None  # built on the first mixed batch: it needs num_classes
        self._datasets: dict[str, Dataset] = {}  # by split, and "unaugmented train"
        self._class_names: list[str] | None = None
        self._stats: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._train_epoch = 0  # the epoch a new train loader starts at; a checkpoint restores it
        self._train_skip = 0  # samples of that epoch this process already trained on (mid-epoch checkpoint)
        self._identity: dict[str, Any] | None = None  # what checkpoints record of the data (`data_identity`)

    @property
    @abstractmethod
    def has_test(self) -> bool:
        """Whether a test split exists; when False, `test_dataloader` raises."""

    @property
    def missing_test(self) -> str:
        """Why there is no test split and how to get one: the end of a run says it where test metrics would be."""
        return f"{type(self).__name__} has no test split; score held-out images with finetune-evaluate"

    @abstractmethod
    def _read_class_names(self) -> list[str]:
        """Class names in label order; may read metadata from disk (called once)."""

    @abstractmethod
    def _build_split(self, split: Split) -> Dataset:
        """Dataset yielding (uint8 C×H×W tensor, int label) for `split`."""

    @property
    def class_names(self) -> list[str]:
        # Lazy so a model can be sized from `num_classes` before `setup` runs.
        if self._class_names is None:
            self._class_names = list(self._read_class_names())
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def data_identity(self) -> dict[str, Any]:
        """What a checkpoint records of the data a fit used, for `splits.check_same_data` to compare on resume.

        {"class_names": [...], "splits": {"train": {"count", "digest"}, "val": {...}}, "examples_per_class",
        "balance"}: a renamed class folder would otherwise permute the labels silently, and a re-carved
        split validate on trained images. Digests use relative paths or pixels, so a copy of the data
        elsewhere matches.
        """
        return {"class_names": list(self.class_names),
                "splits": {split: split_identity(self.dataset(split)) for split in _STAGE_SPLITS["fit"]},
                **{key: getattr(self, key) for key in RECORDED_SETTINGS}}

    def _few_shot(self, keys: Sequence[bytes], labels: np.ndarray) -> np.ndarray | None:
        """Positions of the training samples `examples_per_class` keeps (`splits.examples_per_class`); None: all.

        `keys` name the samples stably (relative paths, indices in the source); the hashes are salted by
        `split_seed` where the datamodule has one (another split_seed: other K images), else 0.
        """
        if self.examples_per_class is None:
            return None
        keep = examples_per_class(keys, labels, self.examples_per_class, getattr(self, "split_seed", 0))
        short = int(np.sum(np.bincount(labels[keep], minlength=self.num_classes) < self.examples_per_class))
        if short:
            warnings.warn(f"data.examples_per_class={self.examples_per_class}: {short} of {self.num_classes} classes "
                          "have fewer training images, and train on all they have", stacklevel=2)
        return keep

    def train_labels(self) -> np.ndarray:
        """The training split's labels, from which `data.balance` weighs the classes."""
        return np.asarray(self.dataset("train").labels, dtype=np.int64)

    def class_weights(self) -> list[float] | None:
        """With data.balance=loss, each class's loss weight: n / (classes * n_c) over the training split; else None.

        scikit-learn's "balanced" class weight: a class's weighted count is the mean count. A class with no
        training image gets 0 (no training loss term has its label). Computed from the split itself, after
        `examples_per_class`, so a checkpoint's weights are those of the data its identity records.
        """
        if self.balance != "loss":
            return None
        counts = np.bincount(self.train_labels(), minlength=self.num_classes)
        weights = np.divide(counts.sum() / np.count_nonzero(counts), counts, out=np.zeros(len(counts)), where=counts > 0)
        return weights.tolist()

    def setup(self, stage: str | None = None) -> None:
        """Build (and scan) the splits `stage` needs here, in the main process, so bad data fails before workers start."""
        if stage not in _STAGE_SPLITS:
            raise ValueError(f"unknown stage {stage!r}; expected one of {list(_STAGE_SPLITS)}")
        for split in _STAGE_SPLITS[stage]:
            if split != "test" or self.has_test:
                self.dataset(split)

    def dataset(self, split: Split) -> Dataset:
        """The dataset behind a split, built on first use and cached."""
        if split == "test" and not self.has_test:
            raise RuntimeError(f"{type(self).__name__} has no test split; check `has_test` before testing")
        if split not in self._datasets:
            self._datasets[split] = self._build_split(split)
        return self._datasets[split]

    def unaugmented(self, split: Split) -> Dataset:
        """The split as evaluation reads it, whatever `augment` says: no crop or flip drawn in the workers.

        What a linear probe fits on (`finetune=probe`, lpft's head, the audit) and what cached
        features hold. Only the training split of an augmenting datamodule differs from `dataset`.
        """
        if split != "train" or not self.augment:
            return self.dataset(split)
        if "unaugmented train" not in self._datasets:
            augment, self.augment = self.augment, False
            try:
                self._datasets["unaugmented train"] = self._build_split("train")
            finally:
                self.augment = augment
        return self._datasets["unaugmented train"]

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def _loader(self, split: Split, shuffle: bool) -> DataLoader:
        dataset = self.dataset(split)
        sampler = self._shuffling_sampler(dataset) if shuffle else None
        # A loader without a generator draws its workers' base seed from torch's global RNG each
        # time it starts an iterator: once per run with persistent workers, so a resumed run
        # (which starts it in another epoch) would shift every later dropout mask.
        generator = sampler.generator if sampler is not None else torch.Generator().manual_seed(self.seed)
        workers = self.loader_workers if split == "train" else self.eval_loader_workers
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            generator=generator,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and workers > 0,
            drop_last=False,
            collate_fn=getattr(dataset, "collate_fn", None),  # data.decode=device: batches of file bytes
            worker_init_fn=_worker_init,
        )

    @property
    def loader_workers(self) -> int:
        """The training loader's `num_workers`, with "auto" resolved by `auto_num_workers` (at most MAX_TRAIN_WORKERS)."""
        return self._workers(MAX_TRAIN_WORKERS)

    @property
    def eval_loader_workers(self) -> int:
        """The validation and test loaders' `num_workers`: "auto" resolved to at most MAX_EVAL_WORKERS."""
        return self._workers(MAX_EVAL_WORKERS)

    def _workers(self, cap: int) -> int:
        if self.num_workers != "auto":
            return self.num_workers
        devices = self.trainer.num_devices if self.trainer is not None else 1
        return auto_num_workers(devices, cap)

    def _shuffling_sampler(self, dataset: Dataset) -> EpochSampler:
        # One replica without a trainer or on one device; the trainer's world size and rank under DDP.
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        skip, self._train_skip = self._train_skip, 0
        labels = self.train_labels() if self.balance == "sampler" else None
        return EpochSampler(dataset, num_replicas=replicas, rank=rank, seed=self.seed, epoch=self._train_epoch,
                            skip=skip, labels=labels)

    def state_dict(self) -> dict[str, Any]:
        """Where the training data stands, saved in checkpoints: the epoch, and how far into it.

        On resume Lightning builds the train loader (and, with workers, fetches its first
        indices) before it restores its loops and calls `set_epoch`; this makes that first
        loader start at the resumed epoch's order, past the samples a mid-epoch checkpoint
        (an interrupted run's) had already trained on.
        """
        trainer = self.trainer
        if trainer is None:
            return {}
        epoch = trainer.fit_loop.epoch_progress.current.processed
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        mid_epoch = epoch < trainer.fit_loop.epoch_progress.current.started and batches > 0
        if self._identity is None:  # the splits do not change during a run: computed once, not per checkpoint
            self._identity = self.data_identity()
        return {"train_epoch": epoch, "train_samples_done": batches * self.batch_size if mid_epoch else 0,
                "world_size": trainer.world_size, "data": self._identity}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore where training stands; refuse (one line) data or a process count the checkpoint was not made with."""
        self._train_epoch = int(state_dict.get("train_epoch", 0))
        self._train_skip = int(state_dict.get("train_samples_done", 0))
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return
        where = f"ckpt_path '{trainer.ckpt_path}'"
        if "data" in state_dict:
            check_same_data(state_dict["data"], self.data_identity(), where)
        world_size = state_dict.get("world_size", trainer.world_size)
        if self._train_skip and world_size != trainer.world_size:
            raise ConfigError(
                f"{where} was saved in mid-epoch by {world_size} processes, and this run has {trainer.world_size}: "
                f"each process's position in the epoch would be wrong; resume with {world_size} processes "
                "(trainer.devices, trainer.num_nodes)"
            )

    def gpu_transform(self, images: Tensor, train: bool) -> Tensor:
        """The old name of `device_transform`, kept for one release."""
        warnings.warn("gpu_transform is now device_transform (it runs on the CPU too); the old name goes in the "
                      "next release", FutureWarning, stacklevel=2)
        return self.device_transform(images, train)

    def device_transform(self, images: Tensor, train: bool) -> Tensor:
        """uint8 B×C×H×W batch -> normalised float32 B×C×res×res (channels_last if enabled).

        Training batches also get `auto_augment` (per image, on uint8 at native size, after
        the crop and flip as in torchvision's and timm's recipes) and `random_erasing` (after
        normalisation, so an erased box holds the mean colour).
        """
        if images.dtype != torch.uint8:
            raise TypeError(f"device_transform expects uint8 images, got {images.dtype}")
        if train and self.augment and (self.device_pad or self.device_flip):
            images = random_translate_flip(images, self.device_pad, self.device_flip)
        if train and self._auto_augment is not None:
            images = per_image(self._auto_augment, images)
        if images.shape[-2:] != (self.resolution, self.resolution):  # as the export card's recipe and eval_transform resize
            images = resize_like_pil(images, self.resolution, self.interpolation)
        x = images.float().div_(255)
        mean, std = self._device_stats(x.device)
        x = x.sub_(mean).div_(std)
        if train and self.random_erasing > 0:
            x = erase_per_image(x, self.random_erasing)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        training = self.trainer is not None and self.trainer.training
        return self.device_batch(batch, train=training)

    def device_batch(self, batch: tuple[Any, Tensor], train: bool) -> tuple[Tensor, Tensor]:
        """A batch on its device -> (network input, labels); with data.decode=device, decoded here first.

        With `mixup_alpha` or `cutmix_alpha`, a training batch's labels become B×num_classes
        probability targets (the loss takes those; its label smoothing then applies once).
        """
        images, labels = batch
        if isinstance(images, EncodedImages):  # labels change where a stand-in replaced an unreadable file
            images, labels = self.dataset(images.split).decode_batch(images, labels)
        x = self.device_transform(images, train=train)
        if train and (self.mixup_alpha > 0 or self.cutmix_alpha > 0):
            if self._mixer is None:
                self._mixer = batch_mixer(self.mixup_alpha, self.cutmix_alpha, self.num_classes)
            x, labels = self._mixer(x, labels)  # keeps channels_last
        return x, labels

    @property
    def preprocessing(self) -> Preprocessing:
        """What this datamodule does to an eval image: what a checkpoint must record."""
        return Preprocessing(self.resolution, self.mean, self.std, self.interpolation, self.crop_fraction)

    def set_preprocessing(self, preprocessing: Preprocessing) -> None:
        """Adopt the weights' preprocessing (normalisation, resize interpolation, eval crop).

        The crop only where eval images are cropped (`whole_image_eval`): `preprocessing` reads back
        what this datamodule does, which is what the training module records.
        """
        self.resolution = preprocessing.resolution
        self.mean, self.std = preprocessing.mean, preprocessing.std
        self.interpolation = preprocessing.interpolation
        self.crop_fraction = 1.0 if self.whole_image_eval else preprocessing.crop_fraction
        self._stats.clear()

    def _device_stats(self, device: torch.device) -> tuple[Tensor, Tensor]:
        # Cached per device: building them every batch would be a host-to-device copy each step.
        if device not in self._stats:
            self._stats[device] = (
                torch.tensor(self.mean, device=device).view(1, -1, 1, 1),
                torch.tensor(self.std, device=device).view(1, -1, 1, 1),
            )
        return self._stats[device]
