"""Files written so that a crash never leaves half of one, and folders checked before a command's long part.

A module without project imports besides `finetune.errors`, so any layer may use it: checkpoints
(`training.callbacks.checkpointing`), the image-folder index cache (`datamodules.index`), the probe's
checkpoint, and the output folders of `finetune-evaluate`, `finetune-export` and `finetune-audit`.

Lightning writes checkpoints through an fsspec transaction whose temporary file lives in
the system temp dir: when that is another filesystem than the run's, the final move is a
copy, so a kill during it leaves a truncated `last.ckpt`, and nothing is fsynced. Here the
temporary file sits next to the target, is fsynced, and replaces it with one `os.replace`
(atomic on POSIX filesystems): a reader, or a run killed at any instant, sees either the
previous complete file or the new complete one.
"""

from __future__ import annotations

import contextlib
import glob
import os
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch

from finetune.errors import ConfigError

TEMP_SUFFIX = ".tmp"


#: This host's name in temporary file names, without the dots that separate their fields.
_HOST = socket.gethostname().replace(".", "-") or "host"


def atomic_save(obj: Any, path: str | Path) -> None:
    """`torch.save` to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name opened with "x" (not mkstemp) so the file gets the umask's permissions, not 0600; the host
    # and pid in it tell whether its writer still runs (`_remove_dead_writers_files`).
    tmp = path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
    _remove_dead_writers_files(path)


def _remove_dead_writers_files(path: Path) -> None:
    """Delete the temporary files that killed writers of `path` left, on this host; never a live writer's.

    On a shared folder another process (a second run, another rank or node) may be writing
    the same target right now: its temporary file is left alone, or its rename would fail.
    A file from another host is left too: whether its writer lives cannot be told from here.
    """
    prefix = f".{path.name}.{_HOST}."
    for temp in path.parent.glob(f"{glob.escape(prefix)}*{TEMP_SUFFIX}"):
        pid = temp.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _process_exists(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; directories cannot be opened for fsync on Windows."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)




def writable_folder(path: Path) -> Path:
    """`path`, created if needed; a one-line error where it cannot be, or where it refuses new files."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # an existing folder may still refuse files
            pass
    except OSError as e:
        raise ConfigError(f"cannot write to '{path}': {e.strerror or e}; choose another --output") from None
    return path
