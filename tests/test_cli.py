"""The `finetune` command as users run it: every policy, TensorBoard tags, checkpoints, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.commands.compare import read_scalars
from helpers import image_tags

FAST = [
    "model=b0", "model.pretrained=null", "model.resolution=32", "data=digits", "data.batch_size=32",
    "trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
    "trainer.accelerator=cpu", "trainer.log_every_n_steps=1",
]
TAGS = {"train/loss", "train/acc", "val/loss", "val/acc", "val/acc_top5", "test/acc", "test/acc_top5",
        "lr-AdamW/head", "lr-AdamW/stage6"}


def run_cli(args: list[str], cwd: Path, module: str = "finetune.commands.train") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One multirun over the four policies (one process: the suite stays fast)."""
    root = tmp_path_factory.mktemp("sweep")
    out = run_cli(["-m", *FAST, "finetune=full,frozen,partial,gradual", f"hydra.sweep.dir={root}"], cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    return root


@pytest.mark.slow  # 50-230 s on the 2-core machine: in make test-all, out of make test
@pytest.mark.parametrize("job, policy", [(0, "full"), (1, "frozen"), (2, "partial"), (3, "gradual")])
def test_each_policy_writes_tensorboard_and_checkpoints(sweep, job, policy):
    run = sweep / str(job)
    assert (run / ".hydra" / "overrides.yaml").read_text().count(f"finetune={policy}") == 1
    tags = read_scalars(run / "tensorboard")
    assert TAGS <= set(tags), TAGS - set(tags)
    assert "samples/train" in image_tags(run / "tensorboard")
    assert (run / "tensorboard" / "hparams.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run / "checkpoints").glob("epoch*-val_acc*.ckpt"))) == 1
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["test/acc"] <= 1 and metrics["best_val_acc"] == pytest.approx(tags["val/acc"][-1][1])


@pytest.mark.slow  # 50-230 s on the 2-core machine: in make test-all, out of make test
def test_resume_from_last_checkpoint_continues_training(sweep, tmp_path):
    last = sweep / "1" / "checkpoints" / "last.ckpt"
    out = run_cli([*FAST, "finetune=frozen", "trainer.max_epochs=2", f"ckpt_path={last}", f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Restoring states from the checkpoint path" in out.stdout + out.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epochs"] == 2
    steps = [s for s, _ in read_scalars(tmp_path / "tensorboard")["train/loss"]]
    assert min(steps) >= 3  # the first epoch's 3 steps came from the checkpoint, not retraining


def test_configs_are_found_from_any_directory_and_as_console_script(tmp_path):
    exe = Path(sys.executable).with_name("finetune")
    out = subprocess.run([str(exe), "--cfg", "job", "model=lite0", "data=cifar100"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "name: lite0" in out.stdout and "_target_: finetune.datamodules.CIFAR100DataModule" in out.stdout
