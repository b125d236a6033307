"""The package's layers, as pyproject.toml's import-linter contracts state them, hold; a broken one names its import.

import-linter reads the package where it is installed: there `datamodules/` sits inside
`finetune/` (pyproject's package-dir), so the contracts are checked on a copy laid out so.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


@pytest.fixture
def installed_layout(tmp_path: Path) -> Path:
    """tmp_path/finetune as the wheel installs it (conf/ holds no Python, so it is left out)."""
    ignore = shutil.ignore_patterns("__pycache__", "conf", "datamodules")
    shutil.copytree(ROOT / "finetune", tmp_path / "finetune", ignore=ignore)
    shutil.copytree(ROOT / "datamodules", tmp_path / "finetune" / "datamodules", ignore=ignore)
    return tmp_path


def lint(layout: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=layout,
                          env={"PYTHONPATH": str(layout), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)


def add_import(layout: Path, module: str, imported: str) -> None:
    path = layout / (module.replace(".", "/") + ".py")
    path.write_text(path.read_text() + f"\nimport {imported}  # noqa: E402\n")


def test_the_package_keeps_every_contract(installed_layout: Path) -> None:
    done = lint(installed_layout)
    assert done.returncode == 0 and "Contracts: 3 kept, 0 broken." in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize(("module", "imported", "contract"), [
    ("finetune.models.scaling", "finetune.training.module", "Layers: commands"),  # a model importing training
    ("finetune.datamodules.index", "finetune.training.callbacks.checkpointing", "Layers: commands"),  # PR 25's finding
    ("finetune.commands.export", "finetune.commands.evaluate", "Commands never import each other"),
    ("finetune.training.features", "finetune.training.probe", "No import cycle inside a sub-package"),
])
def test_a_forbidden_import_breaks_its_contract_naming_the_import(installed_layout: Path, module: str, imported: str,
                                                                   contract: str) -> None:
    add_import(installed_layout, module, imported)
    done = lint(installed_layout)
    assert done.returncode == 1, done.stdout + done.stderr
    broken = done.stdout.split("Broken contracts", 1)[1]
    assert f"{contract}" in broken
    if "cycle" not in contract:
        assert f"{module} -> {imported}" in broken, broken
    else:  # a cycle is named by the dependency that would break it
        assert "features -> .probe" in broken or ".probe -> .features" in broken, broken
