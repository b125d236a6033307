"""The built wheel installs one top-level package, `finetune`, and runs from it alone.

`datamodules/` and `conf/` sit beside `finetune/` in the repository; installed as top-level
packages they would collide with any other project's `conf`. These tests build the real
wheel and run the CLI from it, away from the repository, so that a stray
`import datamodules` or `pkg://conf` cannot pass by importing the checkout's folders.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Repository folder -> where its files land in the wheel.
INSTALLED_AS = {"finetune": "finetune", "datamodules": "finetune/datamodules", "conf": "finetune/conf"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip wheel` builds from a copy of the sources (the build leaves build/ and egg-info behind)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in INSTALLED_AS:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp / "dist"), str(source)], check=True, capture_output=True, text=True)
    (built,) = (tmp / "dist").glob("effnet_finetune-*.whl")
    return built


def test_wheel_has_one_top_level_package_holding_every_source_and_config_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"finetune"}
    expected = {
        f"{INSTALLED_AS[folder]}/{path.relative_to(ROOT / folder).as_posix()}"
        for folder in INSTALLED_AS
        for path in (ROOT / folder).rglob("*")
        if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts
    }
    assert len(expected) > 60 and not expected - names, sorted(expected - names)
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["finetune"]


def test_installed_wheel_composes_and_validates_a_run_without_the_repository(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a pure-Python wheel installs by unpacking
    script = """
import importlib.util, sys
import finetune, finetune.datamodules, finetune.build
from hydra import compose, initialize_config_module
from finetune.build import build_datamodule, check_config
assert finetune.__file__.startswith(sys.argv[1]), finetune.__file__
assert importlib.util.find_spec("datamodules") is None and importlib.util.find_spec("conf") is None
with initialize_config_module("finetune.conf", version_base="1.3"):
    cfg = compose("train", overrides=["data=digits", "model=lite0", "model.pretrained=null", "paths.output_dir=out"])
check_config(cfg)
datamodule = build_datamodule(cfg)
print(type(datamodule).__module__, sorted(m for m in sys.modules if m.split(".")[0] in ("datamodules", "conf")))
"""
    # -P and the temporary cwd keep the checkout off sys.path; PYTHONPATH puts the unpacked wheel
    # ahead of the editable install, whose finder only answers names the path finder did not find.
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-P", "-c", script, str(site)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == "finetune.datamodules.digits []"
    cli = subprocess.run([sys.executable, "-P", "-m", "finetune.commands.train", "--cfg", "job", "data=flowers102"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "_target_: finetune.datamodules.Flowers102DataModule" in cli.stdout
