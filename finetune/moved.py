"""Module paths of the previous release, kept for one more with a FutureWarning.

`finetune/` was regrouped into sub-packages (commands, training, configuration, analysis,
exporting). Imports, `_target_`s and `python -m` lines written against the old flat paths
(`from finetune.train import fit`, `finetune.reports.TestReport`, `-m finetune.train`) keep
working: a meta-path finder answers for each old name with its new module, and warns once.
An old module split in two (`finetune.train` into `build`, `cli` and `commands.train`) answers
with a view that looks each name up in its new homes, in order.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from collections.abc import Sequence
from typing import Any

#: Old module -> its new homes; a name is looked up in them in order (the first is where `-m` runs).
MOVED: dict[str, tuple[str, ...]] = {
    "finetune.train": ("finetune.commands.train", "finetune.build", "finetune.cli"),
    "finetune.compare": ("finetune.commands.compare",),
    "finetune.evaluate": ("finetune.commands.evaluate",),
    "finetune.export": ("finetune.commands.export", "finetune.exporting.formats"),
    "finetune.audit": ("finetune.commands.audit",),
    "finetune.audit_data": ("finetune.commands.audit.data",),
    "finetune.audit_probe": ("finetune.commands.audit.probe",),
    "finetune.audit_search": ("finetune.commands.audit.search",),
    "finetune.audit_report": ("finetune.commands.audit.report",),
    "finetune.hub": ("finetune.exporting.hub",),
    "finetune.module": ("finetune.training.module",),
    "finetune.policies": ("finetune.training.policies",),
    "finetune.features": ("finetune.training.features",),
    "finetune.probe": ("finetune.training.probe", "finetune.build"),
    "finetune.checkpointing": ("finetune.training.callbacks.checkpointing", "finetune.fileio"),
    "finetune.interrupts": ("finetune.training.callbacks.interrupts",),
    "finetune.seeding": ("finetune.training.callbacks.seeding",),
    "finetune.guards": ("finetune.training.callbacks.guards", "finetune.errors"),
    "finetune.averaging": ("finetune.training.callbacks.averaging",),
    "finetune.reports": ("finetune.analysis.reports", "finetune.training.callbacks.test_report"),
    "finetune.cam": ("finetune.analysis.cam",),
    "finetune.config_rules": ("finetune.configuration.rules",),
    "finetune.config_checks": ("finetune.configuration.checks",),
    "finetune.config_store": ("finetune.configuration.store",),
    "finetune.outputs": ("finetune.fileio",),
}


class _SplitModule(types.ModuleType):
    """An old module whose names now live in several modules: each attribute from the first that has it."""

    def __init__(self, name: str, homes: Sequence[types.ModuleType]) -> None:
        super().__init__(name)
        self._homes = tuple(homes)

    def __getattr__(self, attr: str) -> Any:
        for home in self._homes:
            if hasattr(home, attr):
                return getattr(home, attr)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")

    def __dir__(self) -> list[str]:
        return sorted({name for home in self._homes for name in dir(home)})


class _MovedLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        homes = MOVED[spec.name]
        _warn(spec.name)
        modules = [importlib.import_module(home) for home in homes]
        return modules[0] if len(modules) == 1 else _SplitModule(spec.name, modules)

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the new module ran when it was imported."""

    def get_code(self, fullname: str) -> types.CodeType | None:
        """`python -m <old name>` runs the new module's code (runpy asks the loader for it)."""
        _warn(fullname)
        home = _runnable(MOVED[fullname][0])
        return home.loader.get_code(home.name)


def _runnable(name: str) -> importlib.machinery.ModuleSpec:
    """The spec `python -m name` runs: the module's, or a package's `__main__`."""
    spec = importlib.util.find_spec(name)
    return importlib.util.find_spec(f"{name}.__main__") if spec.submodule_search_locations is not None else spec


def _warn(old: str) -> None:
    warnings.warn(f"{old} is now {MOVED[old][0]}; the old name goes in the next release", FutureWarning,
                  stacklevel=3)


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        home = _runnable(MOVED[fullname][0])  # its file: what `python -m` puts in sys.argv[0]
        return importlib.util.spec_from_loader(fullname, _MovedLoader(), origin=home.origin)


def install() -> None:
    """Answer for the old names (once per process; after every real module, so it never shadows one)."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
