"""Exceptions whose one-line messages tell a user how to fix their data config.

They subclass the builtin a caller would naturally catch (a missing dataset *is* a
missing file; an undecodable image *is* a bad value), so generic handlers keep working.
"""

from __future__ import annotations

from collections.abc import Sequence

from finetune.errors import ConfigError, DatasetNotFoundError

__all__ = ["CorruptImageError", "DatasetNotFoundError", "dataset_not_found"]


class CorruptImageError(ConfigError):
    """An image file cannot be decoded; the message names it and how to skip such files."""


def dataset_not_found(
    name: str,
    root: str,
    expected: str,
    missing: Sequence[str],
    source: str,
    *,
    downloadable: bool = True,
) -> DatasetNotFoundError:
    """Build the error with every hint on one line, so it survives log truncation."""
    hint = "set data.download=true to fetch it or " if downloadable else "set "
    gone = f" (missing: {', '.join(missing)})" if missing else ""
    return DatasetNotFoundError(
        f"{name} not found under '{root}': expected {expected}{gone} ({source}); "
        f"{hint}data.root=<folder that holds it>"
    )
