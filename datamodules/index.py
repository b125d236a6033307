"""A class-per-folder tree's file list: listed (never decoded) once per job, cached, held in numpy arrays.

Listing uses `os.scandir` and nothing else per file but the `stat` the cache key needs, so
indexing costs about what torchvision's `ImageFolder` does. The index is cached under a
name derived from the folder and checked against a hash of the listing (paths, sizes,
mtimes): DDP ranks and resumed runs reuse it, and a full check of the images
(`data.verify_images`) is stored in it, so it runs again only when a file changes.

Paths live in one byte buffer with offsets (`PathArray`), not in a list of Python objects:
reading a Python object in a forked DataLoader worker writes its reference count, which
copies the page it sits on, so over an epoch every worker would end up with its own copy
of a million-path list. Numpy buffers are only read, and stay shared.
"""

from __future__ import annotations

import contextlib
import hashlib
import operator
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from finetune.checkpointing import atomic_save

#: Bumped whenever the cached layout changes; older index files are then rebuilt.
INDEX_VERSION = 1
#: The index cache inside a writable data root (hidden, so it is never taken for a class).
ROOT_CACHE = ".finetune-index"


class PathArray(Sequence[Path]):
    """Paths under `root` as a shared byte buffer and per-path [start, stop) offsets into it.

    `take` selects a subset without copying the buffer, so splits cost 16 bytes a file.
    """

    def __init__(self, root: str | Path, buffer: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> None:
        self.root = str(root)
        self.buffer, self.starts, self.stops = buffer, starts, stops

    @classmethod
    def from_names(cls, root: str | Path, names: Sequence[str | bytes]) -> PathArray:
        """Relative (or, with root "", absolute) names as given, in their order."""
        encoded = [os.fsencode(name) for name in names]
        stops = np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)))
        starts = stops - np.fromiter(map(len, encoded), np.int64, len(encoded))
        return cls(root, np.frombuffer(b"".join(encoded), np.uint8), starts, stops)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> Path:  # type: ignore[override]
        name = os.fsdecode(self.buffer[self.starts[index]:self.stops[index]].tobytes())
        return Path(self.root, name)

    def __iter__(self) -> Iterator[Path]:
        return (self[i] for i in range(len(self)))

    def take(self, positions: np.ndarray) -> PathArray:
        return PathArray(self.root, self.buffer, self.starts[positions], self.stops[positions])


@dataclass(frozen=True)
class FolderIndex:
    """The images under `folder`/<class>/**, class ids per file, and what a full check found.

    `unreadable` maps file positions to why they cannot be decoded; None until verified.
    """

    folder: Path
    key: str
    classes: list[str]
    class_ids: np.ndarray
    paths: PathArray
    unreadable: dict[int, str] | None = None

    def verified(self, unreadable: dict[int, str]) -> FolderIndex:
        return replace(self, unreadable=dict(unreadable))

    def save(self, file: Path) -> None:
        """Atomically (temp file + rename), so a killed run never leaves half an index; warn if not writable."""
        state = {
            "version": INDEX_VERSION, "folder": str(self.folder), "key": self.key, "classes": self.classes,
            "class_ids": torch.from_numpy(self.class_ids), "buffer": torch.from_numpy(self.paths.buffer.copy()),
            "starts": torch.from_numpy(self.paths.starts), "stops": torch.from_numpy(self.paths.stops),
            "unreadable": self.unreadable,
        }
        try:
            atomic_save(state, file)
        except OSError as error:
            warnings.warn(f"could not cache the image index at '{file}' ({error}); set data.cache_dir to a "
                          "writable folder so other processes and later runs can reuse it", stacklevel=2)

    @classmethod
    def load(cls, file: Path, folder: Path) -> FolderIndex | None:
        """The index cached in `file` for `folder`, or None if there is none (or an outdated one)."""
        with contextlib.suppress(Exception):  # missing, half-written by a killed writer, or another format
            state = torch.load(file, weights_only=True)
            if state["version"] == INDEX_VERSION and state["folder"] == str(folder):
                paths = PathArray(folder, state["buffer"].numpy(), state["starts"].numpy(), state["stops"].numpy())
                return cls(folder, state["key"], list(state["classes"]), state["class_ids"].numpy(), paths,
                           state["unreadable"])
        return None


def class_folders(folder: Path) -> list[Path]:
    # Hidden folders (.git, .ipynb_checkpoints, the index cache) are never classes.
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan(folder: Path, extensions: Sequence[str]) -> FolderIndex:
    """List `folder`/<class>/** (hidden names skipped, symlinked class folders followed), decoding nothing.

    Files come in the order of their sorted path components, the order the split is drawn
    in, so it never depends on the order the filesystem lists them.
    """
    folder = Path(folder).absolute()
    suffixes = tuple(os.fsencode(ext.lower()) for ext in extensions)
    classes = [p.name for p in class_folders(folder)]
    names: list[bytes] = []
    stats: list[int] = []
    counts = []
    for name in classes:
        before = len(names)
        _walk(os.fsencode(folder / name), os.fsencode(name), suffixes, names, stats)
        counts.append(len(names) - before)
    class_ids = np.repeat(np.arange(len(classes), dtype=np.int32), counts)
    digest = hashlib.blake2b(digest_size=16)
    digest.update("\0".join(classes).encode("utf-8", "surrogateescape") + b"\1")
    digest.update(b"\0".join(names))
    digest.update(np.asarray(stats, dtype=np.int64).tobytes())
    return FolderIndex(folder, digest.hexdigest(), classes, class_ids, PathArray.from_names(folder, names))


_name = operator.attrgetter("name")


def _walk(directory: bytes, prefix: bytes, suffixes: tuple[bytes, ...], names: list[bytes], stats: list[int]) -> None:
    """Append the matching files under `directory` (named `prefix`/...), their size and mtime; depth-first, by name."""
    with os.scandir(directory) as listing:
        entries = sorted(listing, key=_name)
    for entry in entries:
        if entry.name.startswith(b"."):
            continue
        if entry.is_dir(follow_symlinks=False):
            _walk(entry.path, prefix + b"/" + entry.name, suffixes, names, stats)
        elif entry.name.lower().endswith(suffixes) and entry.is_file():
            stat = entry.stat()
            names.append(prefix + b"/" + entry.name)
            stats += (stat.st_size, stat.st_mtime_ns)


def cache_file(folder: Path, root: Path, cache_dir: str | Path | None) -> Path:
    """Where `folder`'s index is cached: `cache_dir`, else `root`/.finetune-index if writable, else the user cache."""
    folder = Path(folder).absolute()
    if cache_dir is not None:
        base = Path(cache_dir).expanduser()
    elif os.access(root, os.W_OK):
        base = Path(root) / ROOT_CACHE
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "effnet-finetune"
    tag = hashlib.blake2b(os.fsencode(folder), digest_size=8).hexdigest()
    return base / f"{folder.name}-{tag}.index"


def current_index(
    folder: Path, file: Path, extensions: Sequence[str], check: Callable[[PathArray], dict[int, str]] | None = None
) -> FolderIndex:
    """`folder`'s index as it is now: listed afresh, checked by `check` unless the cache holds a check of this listing.

    The cache is rewritten only when the listing differs from it or a check was added.
    """
    fresh = scan(folder, extensions)
    cached = FolderIndex.load(file, fresh.folder)
    if cached is not None and cached.key == fresh.key and (check is None or cached.unreadable is not None):
        return cached
    index = fresh if check is None else fresh.verified(check(fresh.paths))
    index.save(file)
    return index
