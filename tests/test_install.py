"""The project's own install: warning-free, and the wheel carries every config the commands compose."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_builds_without_warnings_and_carries_every_config(tmp_path):
    # A copy: setuptools builds in the source tree (build/, *.egg-info), which is not the tests' to litter.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "finetune", "datamodules", "conf"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    # -v shows what setuptools says while it builds (a plain `pip install` hides it until it fails);
    # no build isolation: the venv's setuptools, no registry needed.
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    said = build.stdout + build.stderr
    # setuptools' own warnings are classes (BuildBackendWarning, SetuptoolsDeprecationWarning); lower-case
    # "warning: byte-compiling is disabled" is the interpreter's setting, not the project's.
    warnings = sorted({line.strip() for line in said.splitlines() if re.search(r"[A-Z]\w*Warning\b", line)})
    assert not warnings, "\n".join(warnings)

    wheel = next(tmp_path.glob("effnet_finetune-*.whl"))
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".yaml")}
    expected = {"finetune/conf/" + p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert expected - shipped == set(), "configs missing from the wheel"
