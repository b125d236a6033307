"""What a person sees at the end of a run: where it went, the best checkpoint, the test or why none, what next;
and train.log holding what the console showed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write_digits_folder

# Full-length epochs on a small real folder; the frozen policy trains on cached features (the finetune-compare
# default for frozen runs), so its feature extraction would show a progress bar if one were left on.
RUN = ["model=lite0", "model.resolution=32", "data=imagefolder", "data.batch_size=16", "data.augment=false",
       "finetune=frozen", "finetune.cache_features=true", "trainer=cpu", "trainer.max_epochs=1",
       "trainer.enable_progress_bar=false"]


def finetune(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([str(Path(sys.executable).with_name("finetune")), *RUN, *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def summary(stdout: str) -> dict[str, str]:
    """The closing block: `name: value` lines from "run directory:" on, and the `next:` commands."""
    block = stdout[stdout.rindex("run directory:"):].splitlines()
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in block if not line.startswith("  "))}
    fields["next"] = "\n".join(line.strip() for line in block if line.startswith("  "))
    return fields


@pytest.fixture(scope="module")
def split_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    data = write_digits_folder(root / "digits", per_class=20, size=32)
    run_dir = root / "run"
    return finetune([f"data.root={data}", f"hydra.run.dir={run_dir}"], cwd=root), run_dir


def test_summary_names_the_run_the_best_checkpoint_and_the_test_result(split_run):
    run, run_dir = split_run
    said = summary(run.stdout)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert Path(said["run directory"]) == run_dir
    best, _, score = said["best checkpoint"].partition(" (val/acc ")
    assert Path(best) == Path(metrics["best_checkpoint"]) and Path(best).is_file()
    assert float(score.rstrip(")")) == pytest.approx(metrics["best_val_acc"], abs=5e-5)
    assert said["test"].startswith(f"acc {metrics['test/acc']:.4f}, acc_top5 {metrics['test/acc_top5']:.4f}")
    assert f"tensorboard --logdir {run_dir / 'tensorboard'}" in said["next"]
    assert f"finetune-evaluate {best} " in said["next"] and f"finetune-export {best} --format onnx" in said["next"]


def test_train_log_holds_what_the_console_showed(split_run):
    run, run_dir = split_run
    log = (run_dir / "train.log").read_text()
    assert "`Trainer.fit` stopped: `max_epochs=1` reached." in log  # Lightning's own messages
    for line in run.stdout[run.stdout.rindex("run directory:"):].splitlines():
        assert line in log  # the summary, line for line
    # Lightning's console handler is replaced, not doubled: its messages show once, on stdout.
    assert run.stdout.count("`Trainer.fit` stopped") == 1 and "`Trainer.fit` stopped" not in run.stderr


def test_no_feature_progress_bars_when_progress_bars_are_off(split_run):
    run, _ = split_run
    for split in ("train", "val", "test"):
        assert f"{split} features" not in run.stderr + run.stdout, run.stderr[-2000:]


@pytest.mark.slow  # make test's time; the summary test stays
def test_a_single_folder_says_why_there_is_no_test_and_how_to_get_one(tmp_path):
    data = write_digits_folder(tmp_path / "digits", per_class=12, size=32, splits=(("flat", 1.0),)) / "flat"
    run = finetune([f"data.root={data}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    said = summary(run.stdout)
    assert said["test"].startswith(f"none: '{data}' is one folder per class")
    assert f"{data}/test/<class>/" in said["test"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test_skipped"] in said["test"]
