"""Crash-safe checkpoint files, and what a resume needs; stopped and killed runs are in test_chaos.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetune import fileio
from finetune.training.callbacks.checkpointing import AtomicCheckpointIO
from finetune.fileio import atomic_save
from helpers import write_digits_folder

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_failed_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 0, "w": torch.ones(3)}, path)
    before = path.read_bytes()

    def dies_halfway(obj: object, f) -> None:
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # what a Ctrl-C in the middle of torch.save looks like

    monkeypatch.setattr(fileio.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"epoch": 1, "w": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # the temporary file is gone too


def test_sigkill_during_a_write_leaves_previous_checkpoint_intact(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, torch\n"
        "from finetune.fileio import atomic_save\n"
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


def test_a_save_leaves_a_live_writers_temporary_file_and_removes_a_dead_ones(tmp_path: Path) -> None:
    """Two runs (or ranks, or nodes) may write one shared checkpoint: cleaning up must not break the other's rename."""
    path = tmp_path / "last.ckpt"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        host = fileio._HOST
        live_temp = tmp_path / f".last.ckpt.{host}.{live.pid}.0123abcd.tmp"
        dead_temp = tmp_path / f".last.ckpt.{host}.{dead.pid}.4567cdef.tmp"
        other_host_temp = tmp_path / f".last.ckpt.elsewhere.{dead.pid}.89abcdef.tmp"
        for temp in (live_temp, dead_temp, other_host_temp):
            temp.write_bytes(b"half a checkpoint")
        atomic_save({"w": torch.ones(2)}, path)
        assert live_temp.exists() and other_host_temp.exists()  # their writers may still rename them
        assert not dead_temp.exists()
        os.replace(live_temp, path)  # the live writer finishes: its rename works
    finally:
        live.kill()
        live.wait()


def test_resume_needs_the_checkpoint_only_not_the_pretrained_weights(tmp_path: Path) -> None:
    """A run started from a weights file resumes after that file is gone (offline, moved, cleaned up)."""
    import timm

    from finetune.build import fit
    from helpers import compose_config

    weights_file = tmp_path / "tf_b0.pth"
    torch.save(timm.create_model("tf_efficientnet_b0").state_dict(), weights_file)  # TF port: same padding, eps 1e-3
    data = write_digits_folder(tmp_path / "digits", per_class=6)
    run = ["model=b0", f"model.pretrained={weights_file}", "model.padding=same", "model.bn_eps=1e-3",
           "model.resolution=32", "data=imagefolder", f"data.root={data}", "data.batch_size=32", "trainer=cpu",
           "trainer.enable_progress_bar=false", "logger=csv"]
    first = fit(compose_config([*run, "trainer.max_epochs=1"], tmp_path / "first"))
    weights_file.unlink()
    last = Path(first["best_checkpoint"]).with_name("last.ckpt")
    resumed = fit(compose_config([*run, "trainer.max_epochs=2", f"ckpt_path={last}"], tmp_path / "resumed"))
    assert resumed["epochs"] == 2
    stored = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert (stored["model"]["padding"], stored["model"]["bn_eps"]) == ("same", 1e-3)


def test_resume_on_renamed_classes_or_added_files_is_refused_in_one_line(tmp_path: Path) -> None:
    """Renaming a class folder would permute the labels, adding files would re-carve the split: both refused."""
    from finetune.errors import ConfigError
    from finetune.build import fit
    from helpers import compose_config

    data = write_digits_folder(tmp_path / "digits", per_class=6, splits=(("train", 1.0),))
    run = ["model=lite0", "model.resolution=32", "data=imagefolder", f"data.root={data}", "data.batch_size=32",
           "finetune=frozen", "trainer=cpu", "trainer.enable_progress_bar=false", "logger=csv"]
    fit(compose_config([*run, "trainer.max_epochs=1"], tmp_path / "first"))
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    saved = last.read_bytes()
    resume = [*run, "trainer.max_epochs=2", f"ckpt_path={last}"]

    (data / "train" / "3").rename(data / "train" / "three")
    with pytest.raises(ConfigError, match=r"trained on other data: class '3' is gone and class 'three' is new"):
        fit(compose_config(resume, tmp_path / "renamed"))
    (data / "train" / "three").rename(data / "train" / "3")

    (data / "train" / "3" / "extra.png").write_bytes((data / "train" / "3" / "0.png").read_bytes())
    with pytest.raises(ConfigError, match=r"trained on other data: its (train|val) split held \d+ images"):
        fit(compose_config(resume, tmp_path / "added"))
    assert last.read_bytes() == saved  # nothing already written is touched
