"""Module paths of the previous release keep working for one more, with a FutureWarning naming the new one."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest
from hydra.utils import instantiate

from finetune.moved import MOVED

# What users wrote against the old paths: README's Python API, the notebook, configs' _target_s.
OLD_IMPORTS = [
    ("finetune.train", "fit", "finetune.build"),
    ("finetune.train", "build_datamodule", "finetune.build"),
    ("finetune.train", "check_overrides", "finetune.cli"),
    ("finetune.train", "main", "finetune.commands.train"),
    ("finetune.compare", "compare", "finetune.commands.compare"),
    ("finetune.evaluate", "split_predictions", "finetune.commands.evaluate"),
    ("finetune.export", "main", "finetune.commands.export"),
    ("finetune.export", "export_onnx", "finetune.exporting.formats"),
    ("finetune.module", "FineTuneModule", "finetune.training.module"),
    ("finetune.checkpointing", "atomic_save", "finetune.fileio"),
    ("finetune.checkpointing", "AtomicCheckpointIO", "finetune.training.callbacks.checkpointing"),
    ("finetune.reports", "TestReport", "finetune.training.callbacks.test_report"),
    ("finetune.reports", "report_metrics", "finetune.analysis.reports"),
    ("finetune.guards", "NonFiniteLossError", "finetune.errors"),
]


def forget(name: str) -> None:
    """Drop an old name from this process's imports (and its parent's attributes), so importing it warns again."""
    sys.modules.pop(name, None)
    parent, _, child = name.rpartition(".")
    if hasattr(sys.modules[parent], child):
        delattr(sys.modules[parent], child)


@pytest.mark.parametrize(("old", "name", "home"), OLD_IMPORTS)
def test_an_old_import_gives_the_same_object_with_a_future_warning(old: str, name: str, home: str) -> None:
    forget(old)
    with pytest.warns(FutureWarning, match=rf"{old} is now {MOVED[old][0]}; the old name goes in the next release"):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(home), name)


def test_every_old_name_imports_and_no_new_module_sits_under_it() -> None:
    for old, homes in MOVED.items():
        forget(old)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            importlib.import_module(old)
        assert [str(w.message) for w in caught if w.category is FutureWarning], old
        for home in homes:
            assert importlib.util.find_spec(home) is not None and home != old


def test_an_old_target_in_a_config_instantiates() -> None:
    with pytest.warns(FutureWarning, match="finetune.guards is now finetune.training.callbacks.guards"):
        forget("finetune.guards")
        guard = instantiate({"_target_": "finetune.guards.FiniteLossGuard"})
    from finetune.training.callbacks.guards import FiniteLossGuard

    assert isinstance(guard, FiniteLossGuard)


def test_python_dash_m_with_the_old_module_runs_the_command() -> None:
    done = subprocess.run([sys.executable, "-m", "finetune.train", "--cfg", "job", "data=digits", "model=lite0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "finetune.train is now finetune.commands.train" in done.stderr
    assert "_target_: finetune.datamodules.DigitsDataModule" in done.stdout
