"""One clear line for mistakes users make; the traceback only for developers."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

DEBUG_ENV = ("FINETUNE_DEBUG", "HYDRA_FULL_ERROR")


class ConfigError(ValueError):
    """A value a user set (config key, CLI argument, file) is wrong; the message says how to fix it.

    Only this family (and the data, weights and divergence errors below) becomes a one-line
    error: a plain ValueError from inside torch or our own code is a bug and keeps its traceback.
    """

DEBUG_FLAG = "--debug"


def debugging() -> bool:
    return any(os.environ.get(k, "") not in ("", "0") for k in DEBUG_ENV)


def take_debug_flag(argv: list[str]) -> list[str]:
    """Drop `--debug` (which Hydra would reject) from `argv`, turning it into FINETUNE_DEBUG=1.

    An environment variable rather than a flag, so processes that DDP launches inherit it.
    """
    if DEBUG_FLAG in argv:
        os.environ["FINETUNE_DEBUG"] = "1"
    return [arg for arg in argv if arg != DEBUG_FLAG]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is absent from `root` and `download` is off (or it cannot be downloaded)."""


class NonFiniteLossError(FloatingPointError):
    """Training diverged; the message names the step and the checkpoint to resume from."""


#: The errors `user_errors` reports in one line. Each subclasses the builtin a caller would naturally catch
#: (a missing dataset *is* a missing file); ConfigError covers WeightsError and CorruptImageError, its subclasses.
USER_ERRORS = (ConfigError, DatasetNotFoundError, NonFiniteLossError)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn configuration, data and divergence errors into `error: ...` and exit status 2.

    Pass --debug, or set FINETUNE_DEBUG=1 (or HYDRA_FULL_ERROR=1), to get the full traceback instead.
    """
    try:
        yield
    except USER_ERRORS as e:
        if debugging():
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
