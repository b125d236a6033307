"""One clear line for mistakes users make; the traceback only for developers."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from finetune.models.weights import WeightsError

DEBUG_ENV = ("FINETUNE_DEBUG", "HYDRA_FULL_ERROR")


def debugging() -> bool:
    return any(os.environ.get(k, "") not in ("", "0") for k in DEBUG_ENV)


def user_error_types() -> tuple[type[BaseException], ...]:
    from datamodules.errors import CorruptImageError, DatasetNotFoundError

    return (ValueError, FileNotFoundError, WeightsError, DatasetNotFoundError, CorruptImageError)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn configuration and data errors into `error: ...` and exit status 2.

    Set FINETUNE_DEBUG=1 (or HYDRA_FULL_ERROR=1) to get the full traceback instead.
    """
    try:
        yield
    except user_error_types() as e:
        if debugging():
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
