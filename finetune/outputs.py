"""Folders the commands write into, checked before their long part starts.

A module of its own so that `finetune.export` and `finetune.evaluate` share it without the export
importing the evaluation module, its figures and matplotlib.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from finetune.errors import ConfigError


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
