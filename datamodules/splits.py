"""Which samples validate, decided per sample, and what a checkpoint records of the data it was trained on.

A split drawn by shuffling the whole list with the training seed moves whenever the seed
or the list changes: the validation set of seed 43 was mostly training images of seed 42,
and adding one file moved most of it. Here each sample's side is a property of the sample:
a hash of a stable key (a file's path relative to the folder its classes are in, a CIFAR
image's index in the official train set) salted by `split_seed`, which is independent of
the training seed. Per class, the samples with the lowest hashes validate, so adding or
removing a file changes the side of at most about one other file of its class, and copies
of the data on other disks split alike.

`examples_per_class` keeps, per class, the training members with the highest hashes of the
same kind (BiT's `--examples_per_class`): validation takes the lowest, so the two sit at
opposite ends of one order, and the K images of a class are its K highest-hashing files
whatever `val_fraction` carves out and whatever the training seed.

`data_identity` (on the datamodule) records the class names and a digest of each split;
`check_same_data` compares a checkpoint's record with the data at hand, so that a resume
on renamed classes or a re-carved split fails in one line instead of silently training on
permuted labels or validating on trained images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from finetune.datamodules.index import PathArray
from finetune.errors import ConfigError

#: What to do when a checkpoint's data and the data at hand differ.
_FIX = ("resume with the data (and data.val_fraction, data.split_seed) it was trained on, "
        "or start fresh with ckpt_path=null")
#: Training-data settings a checkpoint records beside the splits, with what a record made before them means.
#: A resume with another value would train on other images (`examples_per_class`) or in another order or loss
#: (`balance`), so it is refused by name rather than through the train split's digest.
RECORDED_SETTINGS: dict[str, Any] = {"examples_per_class": None, "balance": "none"}


def sample_hashes(keys: Sequence[bytes], split_seed: int) -> np.ndarray:
    """A uint64 per key: 64-bit BLAKE2b of the key salted by `split_seed`, the same on every machine and Python."""
    salted = partial(hashlib.blake2b, digest_size=8, salt=split_seed.to_bytes(16, "little"))
    return np.frombuffer(b"".join([digest.digest() for digest in map(salted, keys)]), dtype="<u8")


def stable_split(
    keys: Sequence[bytes], labels: Sequence[int] | np.ndarray, val_fraction: float, split_seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(train positions, val positions), sorted: per class, the members with the lowest salted hashes validate.

    Class c validates floor(val_fraction * n_c) members, and the classes with the largest
    remainders one more (ties: the class holding the lowest hash), until the val set is
    round(val_fraction * n) overall: each class within one of its share, and a dataset of
    many 2-image classes still gets a validation set (rounding per class would give it none).
    Only `keys`, `labels` and `split_seed` matter, never the order of the list or the training seed.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    labels = np.asarray(labels, dtype=np.int64)
    if len(keys) != len(labels):
        raise ValueError(f"{len(keys)} keys but {len(labels)} labels")
    hashes = sample_hashes(keys, split_seed)
    by_hash = np.argsort(hashes)
    by_class = by_hash[np.argsort(labels[by_hash], kind="stable")]  # each class's members, lowest hash first
    sizes = np.bincount(labels)
    first = np.cumsum(sizes) - sizes  # where each class starts in by_class
    share = val_fraction * sizes
    counts = np.floor(share).astype(np.int64)
    remainder = np.where(sizes > 0, share - counts, -1.0)  # a label no sample has never gets a slot
    lowest = np.zeros(len(sizes), dtype=np.uint64)
    lowest[sizes > 0] = hashes[by_class[first[sizes > 0]]]
    extra = np.lexsort((lowest, -remainder))[: int(np.round(val_fraction * len(labels))) - counts.sum()]
    counts[extra] += 1
    rank = np.empty(len(labels), dtype=np.int64)
    rank[by_class] = np.arange(len(labels)) - np.repeat(first, sizes)
    val = rank < counts[labels]
    return np.flatnonzero(~val), np.flatnonzero(val)


def examples_per_class(
    keys: Sequence[bytes], labels: Sequence[int] | np.ndarray, count: int, split_seed: int = 0
) -> np.ndarray:
    """Positions (sorted) of the `count` members of each class with the highest salted hashes; a smaller class keeps all.

    Each file's hash is a property of the file, so "the same K images when files are added" means:
    an added file joins its class's K only if it hashes above the K-th (it then replaces that one),
    a removed file outside the K changes nothing, and one inside is replaced by the next highest;
    other classes never change. Only `keys`, `labels` and `split_seed` matter, never the list's
    order or the training seed.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(keys) != len(labels):
        raise ValueError(f"{len(keys)} keys but {len(labels)} labels")
    order = np.lexsort((sample_hashes(keys, split_seed), labels))  # by class, then hash ascending
    sizes = np.bincount(labels)
    end = np.cumsum(sizes)  # where each class's run in `order` stops
    from_top = end[labels[order]] - np.arange(len(labels))  # 1 for a class's highest hash
    return np.sort(order[from_top <= count])


def split_identity(dataset: Dataset) -> dict[str, Any]:
    """{"count", "digest"} of a split's membership and labels, unchanged by copying the data elsewhere.

    File datasets are identified by their paths relative to the data (never absolute ones),
    in-memory ones by their pixels: what a copy to another disk keeps and a changed split does not.
    """
    files = getattr(dataset, "files", None)
    digest = hashlib.blake2b(digest_size=16)
    if isinstance(files, PathArray):
        digest.update(b"files\0" + b"\0".join(files.names()))
    else:  # InMemoryImageDataset: uint8 N×C×H×W
        images = dataset.images.contiguous().cpu().numpy()
        digest.update(b"pixels\0" + np.asarray(images.shape, dtype="<i8").tobytes())
        digest.update(images.data)
    labels = np.asarray(dataset.labels, dtype="<i8")
    digest.update(b"\1" + labels.tobytes())
    return {"count": len(labels), "digest": digest.hexdigest()}


def check_same_data(recorded: Mapping[str, Any], current: Mapping[str, Any], where: str) -> None:
    """Refuse, in one line naming the first difference, data other than what `recorded` (a `data_identity`) describes.

    `where` names the checkpoint in the message, e.g. "ckpt_path 'last.ckpt'".
    """
    for key, default in RECORDED_SETTINGS.items():
        then, now = recorded.get(key, default), current.get(key, default)
        if then != now:
            shown = "null" if then is None else then
            raise ConfigError(f"{where} was trained with data.{key}={shown}, this run has data.{key}="
                              f"{'null' if now is None else now}; resume with data.{key}={shown}, "
                              "or start fresh with ckpt_path=null")
    splits = (_split_difference(name, then, current["splits"].get(name)) for name, then in recorded["splits"].items())
    difference = _class_difference(list(recorded["class_names"]), list(current["class_names"])) or next(
        filter(None, splits), None)
    if difference:
        raise ConfigError(f"{where} was trained on other data: {difference}; {_FIX}")


def _split_difference(split: str, then: Mapping[str, Any], now: Mapping[str, Any] | None) -> str | None:
    if now is None:
        return f"it had a {split} split of {then['count']} images, there is none now"
    if now["count"] != then["count"]:
        return f"its {split} split held {then['count']} images, it holds {now['count']} now"
    if now["digest"] != then["digest"]:
        return (f"its {split} split holds {now['count']} images as before, but other images or labels "
                "(files added, removed or renamed, or another data.split_seed)")
    return None


def _class_difference(then: list[str], now: list[str]) -> str | None:
    """The first way the class lists differ, in words; None if they are the same."""
    if then == now:
        return None
    gone = [name for name in then if name not in now]
    new = [name for name in now if name not in then]
    if not gone and not new:
        position = next(i for i, (a, b) in enumerate(zip(then, now)) if a != b)
        return f"class {position} was '{then[position]}' and is '{now[position]}' now (its labels would be permuted)"
    changes = ([f"class '{gone[0]}' is gone"] if gone else []) + ([f"class '{new[0]}' is new"] if new else [])
    others = len(gone) + len(new) - len(changes)
    return (" and ".join(changes) + (f", {others} more changed" if others else "")
            + f" ({len(then)} classes then, {len(now)} now)")
