"""What every console script does before Hydra runs: `--debug`, and unknown group options refused in one
line (Hydra's own message spans a dozen).
"""

from __future__ import annotations

import importlib.resources
import sys
from collections.abc import Callable, Sequence
from typing import Any

from finetune.errors import ConfigError, take_debug_flag, user_errors

#: Config groups whose options are files under conf/<group>/; checked before Hydra sees them.
GROUPS = ("model", "data", "finetune", "optim", "trainer", "logger", "callbacks", "experiment", "hparams_search")
#: Options that add config folders: their groups may hold options only Hydra can list.
_EXTRA_CONFIG_FLAGS = ("hydra.searchpath", "--config-dir", "-cd", "--config-path", "-cp")


def group_options(group: str) -> list[str]:
    """The option names of a config group, e.g. b0..b7, lite0..lite4, phi for `model`."""
    folder = importlib.resources.files("finetune.conf") / group
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir()
                  if p.name.endswith(".yaml") and not p.name.startswith("_"))  # _base.yaml: shared by the options


def check_overrides(args: Sequence[str]) -> None:
    """Refuse an unknown group option (`model=b9`) in one line that lists the valid ones.

    Hydra's own message for it spans a dozen lines. Sweeps (`model=b0,b9`) are checked
    name by name; sweep functions, interpolations and extra config folders are left to Hydra.
    """
    if any(arg.split("=", 1)[0].lstrip("+") in _EXTRA_CONFIG_FLAGS for arg in args):
        return
    for arg in args:
        key, sep, value = arg.partition("=")
        group = key.lstrip("+~")
        if arg.startswith("-") or not sep or group not in GROUPS or any(c in value for c in "()[]{}$*"):
            continue
        valid = group_options(group)
        for name in value.split(","):
            if name not in valid and name not in ("", "null"):
                raise ConfigError(f"unknown {group} '{name}'; valid: {', '.join(valid)}")


def run_command(hydra_entry: Callable[[], Any]) -> None:
    """A console script: `--debug`, one-line errors for unknown group options, then the Hydra app."""
    sys.argv[1:] = take_debug_flag(sys.argv[1:])
    with user_errors():
        check_overrides(sys.argv[1:])
    hydra_entry()
