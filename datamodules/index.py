"""A class-per-folder tree's file list: listed (never decoded) once per job, cached, held in numpy arrays.

Listing uses `os.scandir` and nothing else per file but the `stat` the cache key needs: it
reads the folders torchvision's `ImageFolder` reads (the root once more), plus one `stat` per
file and per folder, and opens no file (tests/test_guarantees.py counts them). In time, that measured
1.5-3.9x `ImageFolder`'s with the OS cache warm (benchmarks/RESULTS.md, "Image folders at scale").
The index is cached in the user's cache directory (never in the data folder), under a name derived
from the folder's resolved path. A later launch reuses it without listing when no folder it read
has a new mtime: one `stat` per folder, none per file, which on Lustre or NFS is the difference
between seconds and minutes per million files. The listing's key is a hash of relative paths and
sizes, so a copy of the tree (node-local disk, per job) finds the full check of the images
(`data.verify_images`) made on the original, and the check runs again only when the listing changes.

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
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from finetune.fileio import atomic_save

#: Bumped whenever the cached layout changes; older index files are then rebuilt.
INDEX_VERSION = 2
#: A folder modified this close to its listing may change again within its filesystem's mtime granularity
#: (1 s on ext3, 2 s on FAT and some NFS servers) with the same mtime, so its mtime vouches for nothing.
_RACY_NS = 2_000_000_000
#: The mtime recorded for such a folder: no folder has it, so the next launch lists the tree again.
_UNTRUSTED = -1


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

    def names(self) -> list[bytes]:
        """Each path relative to `root`, as bytes: what stays the same when the data is copied elsewhere."""
        raw = self.buffer.tobytes()
        return [raw[start:stop] for start, stop in zip(self.starts.tolist(), self.stops.tolist())]


@dataclass(frozen=True)
class FolderIndex:
    """The images under `folder`/<class>/**, class ids per file, and what a full check found.

    `unreadable` maps file positions to why they cannot be decoded; None until verified. `dirs` are the
    folders the listing read (relative, the root as ""), with their mtimes in `dir_mtimes`: while none
    moves, the listing still holds (`unchanged`).
    """

    folder: Path
    key: str
    classes: list[str]
    class_ids: np.ndarray
    paths: PathArray
    dirs: PathArray
    dir_mtimes: np.ndarray
    unreadable: dict[int, str] | None = None

    def verified(self, unreadable: dict[int, str]) -> FolderIndex:
        return replace(self, unreadable=dict(unreadable))

    @cached_property
    def digest(self) -> str:
        """What the splits are drawn from: classes, relative paths and (once verified) which files are unreadable.

        Unlike `key` it leaves out sizes and mtimes, so processes that see one tree through
        different mounts or copies agree on it, and any two indexes with one digest give the
        same splits and batch counts.
        """
        digest = hashlib.blake2b(digest_size=16)
        digest.update("\0".join(self.classes).encode("utf-8", "surrogateescape") + b"\1")
        paths = self.paths  # an index's paths are its whole buffer, in order: no per-path loop
        digest.update(paths.buffer.tobytes())
        digest.update(np.asarray(paths.stops - paths.starts, dtype=np.int64).tobytes())
        digest.update(np.asarray(self.class_ids, dtype=np.int64).tobytes())
        if self.unreadable is not None:
            digest.update(b"\1" + np.array(sorted(self.unreadable), dtype=np.int64).tobytes())
        return digest.hexdigest()

    def unchanged(self) -> bool:
        """Whether no folder the listing read has changed since: one `stat` per folder, none per file.

        Adding, removing or renaming a file or folder (also what rsync, cp, mv and downloaders do: they
        write a new file and rename it) gives its folder a new mtime. What this does not see is a
        file rewritten in place under its name (an image editor saving over it): its folder keeps
        its mtime. That is also not checked for verified indexes, since a stat per file is the cost
        this saves: a file that became unreadable is still found where a worker reads it (named,
        or with `data.skip_corrupt` replaced), so a stale full check never trains on it unseen.
        """
        root = os.fsencode(self.folder)
        try:
            return all(mtime != _UNTRUSTED and os.stat(os.path.join(root, name)).st_mtime_ns == mtime
                       for name, mtime in zip(self.dirs.names(), self.dir_mtimes.tolist()))
        except OSError:  # a folder gone (or unreadable now)
            return False

    def entry(self) -> tuple[object, ...]:
        """What its cache file records besides the listing itself: when this differs, the file is rewritten."""
        return self.key, self.unreadable, self.dirs.names(), self.dir_mtimes.tolist()

    def save(self, file: Path) -> None:
        """Atomically (temp file + rename), so a killed run never leaves half an index; warn if not writable."""
        state = {
            "version": INDEX_VERSION, "folder": os.fspath(self.folder.resolve()), "key": self.key,
            "classes": self.classes, "class_ids": torch.from_numpy(self.class_ids),
            **_arrays("", self.paths), **_arrays("dir_", self.dirs), "dir_mtimes": torch.from_numpy(self.dir_mtimes),
            "unreadable": self.unreadable,
        }
        _save(state, file, "image index")

    @classmethod
    def load(cls, file: Path, folder: Path) -> FolderIndex | None:
        """The index cached in `file` for `folder` (or another path to it), or None if there is none (or an outdated one)."""
        with contextlib.suppress(Exception):  # missing, half-written by a killed writer, or another format
            state = torch.load(file, weights_only=True)
            if state["version"] == INDEX_VERSION and state["folder"] == os.fspath(Path(folder).resolve()):
                return cls(folder, state["key"], list(state["classes"]), state["class_ids"].numpy(),
                           _paths(folder, state, ""), _paths(folder, state, "dir_"), state["dir_mtimes"].numpy(),
                           state["unreadable"])
        return None


def _arrays(prefix: str, paths: PathArray) -> dict[str, torch.Tensor]:
    return {f"{prefix}buffer": torch.from_numpy(paths.buffer.copy()), f"{prefix}starts": torch.from_numpy(paths.starts),
            f"{prefix}stops": torch.from_numpy(paths.stops)}


def _paths(folder: Path, state: dict, prefix: str) -> PathArray:
    return PathArray(folder, *(state[f"{prefix}{name}"].numpy() for name in ("buffer", "starts", "stops")))


def _save(state: dict, file: Path, what: str) -> None:
    try:
        atomic_save(state, file)
    except OSError as error:
        warnings.warn(f"could not cache the {what} at '{file}' ({error}); set data.cache_dir to a "
                      "writable folder so other processes and later runs can reuse it", stacklevel=3)


def class_folders(folder: Path) -> list[Path]:
    # Hidden folders (.git, .ipynb_checkpoints, .dvc) are never classes.
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(folder: Path, extensions: Sequence[str]) -> list[Path]:
    """Every file with one of `extensions` under `folder`, by the rule `scan` lists a class folder with.

    Hidden files and folders (macOS' `._x.jpg` resource forks, `.thumbnails/`) are skipped, so a
    tool reading a folder of images sees the files training would.
    """
    listing = _Listing(extensions, stat_files=False)
    listing.walk(os.fsencode(folder), os.fsencode(folder), frozenset())
    return [Path(os.fsdecode(name)) for name in listing.names]


def scan(folder: Path, extensions: Sequence[str]) -> FolderIndex:
    """List `folder`/<class>/** (hidden names skipped, symlinked folders followed), decoding nothing.

    Files come in the order of their sorted path components, the order the split is drawn
    in, so it never depends on the order the filesystem lists them. The key hashes classes,
    relative paths and sizes but no mtime or absolute path, so a copy of the tree has the same.
    """
    folder = Path(folder).absolute()
    listing = _Listing(extensions, stat_files=True)
    listing.record(b"", os.stat(folder))  # the root's mtime moves when a class folder comes or goes
    classes = [p.name for p in class_folders(folder)]
    counts = []
    for name in classes:
        before = len(listing.names)
        listing.walk(os.fsencode(folder / name), os.fsencode(name), frozenset())
        counts.append(len(listing.names) - before)
    class_ids = np.repeat(np.arange(len(classes), dtype=np.int32), counts)
    digest = hashlib.blake2b(digest_size=16)
    digest.update("\0".join(classes).encode("utf-8", "surrogateescape") + b"\1")
    digest.update(b"\0".join(listing.names))
    digest.update(np.asarray(listing.sizes, dtype=np.int64).tobytes())
    return FolderIndex(folder, digest.hexdigest(), classes, class_ids, PathArray.from_names(folder, listing.names),
                       PathArray.from_names(folder, listing.dirs), np.asarray(listing.dir_mtimes, dtype=np.int64))


_name = operator.attrgetter("name")


class _Listing:
    """What one walk collects: matching files (and with `stat_files` their sizes), and each folder read with its mtime."""

    def __init__(self, extensions: Sequence[str], stat_files: bool) -> None:
        self.suffixes = tuple(os.fsencode(ext.lower()) for ext in extensions)
        self.names: list[bytes] = []
        self.sizes: list[int] | None = [] if stat_files else None
        self.dirs: list[bytes] = []
        self.dir_mtimes: list[int] = []
        self.since = time.time_ns() - _RACY_NS  # folders modified after this may change again with the same mtime

    def record(self, prefix: bytes, info: os.stat_result) -> None:
        """Record a folder's mtime, taken before it is listed: a change during the listing moves it past this one."""
        self.dirs.append(prefix)
        self.dir_mtimes.append(info.st_mtime_ns if info.st_mtime_ns < self.since else _UNTRUSTED)

    def walk(self, directory: bytes, prefix: bytes, ancestors: frozenset[tuple[int, int]]) -> None:
        """Append the matching files under `directory` (named `prefix`/...), depth-first, by name.

        Symlinked folders are followed, as torchvision's `ImageFolder` does (`os.walk(followlinks=True)`),
        except into a folder the walk is already inside: a link to an ancestor is a loop, which
        would list the same files without end.
        """
        info = os.stat(directory)
        node = info.st_dev, info.st_ino
        if node in ancestors:
            return
        self.record(prefix, info)
        with os.scandir(directory) as listing:
            entries = sorted(listing, key=_name)
        for entry in entries:
            if entry.name.startswith(b"."):
                continue
            if entry.is_dir():
                self.walk(entry.path, prefix + b"/" + entry.name, ancestors | {node})
            elif entry.name.lower().endswith(self.suffixes) and entry.is_file():
                self.names.append(prefix + b"/" + entry.name)
                if self.sizes is not None:
                    self.sizes.append(entry.stat().st_size)


def cache_file(folder: Path, cache_dir: str | Path | None) -> Path:
    """Where `folder`'s index is cached: in `cache_dir` if given, else in the user's cache directory.

    Never in the data folder unless asked: a file there is a class to torchvision's `ImageFolder`
    ("Found no valid file for the classes ...") and a change to DVC, rsync or git-lfs. The default is
    $XDG_CACHE_HOME/effnet-finetune/index (~/.cache/... without it); the name carries a hash of the
    folder's resolved absolute path, so two folders never share an entry (two paths to one folder do).
    """
    resolved = Path(folder).resolve()
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "effnet-finetune" / "index"
    base = Path(cache_dir).expanduser() if cache_dir is not None else user_cache
    tag = hashlib.blake2b(os.fsencode(resolved), digest_size=8).hexdigest()
    return base / f"{resolved.name}-{tag}.index"


def _check_file(file: Path, key: str) -> Path:
    """Where a full check of listings with `key` is cached, beside the index `file`: found from any copy of the tree."""
    return file.with_name(f"{key}.check")


def current_index(
    folder: Path, file: Path, extensions: Sequence[str], check: Callable[[PathArray], dict[int, str]] | None = None
) -> FolderIndex:
    """`folder`'s index as it is now, checked by `check` unless a check of this listing is cached.

    The cached index is taken without listing while no folder it read changed (`FolderIndex.unchanged`);
    otherwise the tree is listed again and a cached check is kept if the key still matches. A check
    is looked up by the key alone, so a copy of the tree elsewhere reuses the original's. The cache
    is rewritten only when what it records changed.
    """
    cached = FolderIndex.load(file, Path(folder).absolute())
    index = cached if cached is not None and cached.unchanged() else scan(folder, extensions)
    if cached is not None and index is not cached and cached.key == index.key and cached.unreadable is not None:
        index = index.verified(cached.unreadable)
    if check is not None and index.unreadable is None:
        found = _load_check(_check_file(file, index.key), index.key)
        if found is None:
            found = check(index.paths)
            _save({"version": INDEX_VERSION, "key": index.key, "unreadable": found}, _check_file(file, index.key),
                  "image check")
        index = index.verified(found)
    if cached is None or index.entry() != cached.entry():
        index.save(file)
    return index


def _load_check(file: Path, key: str) -> dict[int, str] | None:
    with contextlib.suppress(Exception):  # missing, half-written, or another format
        state = torch.load(file, weights_only=True)
        if state["version"] == INDEX_VERSION and state["key"] == key:
            return dict(state["unreadable"])
    return None
