"""A stopped or killed run, resumed with the command it prints, ends exactly where an uninterrupted run ends.

Every run here is the real `finetune` command on a real image folder with the data
defaults (two persistent workers, augmentation drawn in them) and full-length epochs:
5 training batches of 16 (the last one short) and 2 validation batches per epoch, 3 epochs,
pretrained Lite0 whose backbone the gradual policy unfreezes in epoch 1. A callback that
the command line adds (`+callbacks.chaos=...`, so the printed resume command carries it
too) sends a real signal to the whole process group, workers included, as Ctrl-C or a
scheduler does, at a chosen point: a training batch in mid-epoch, the first or last batch
of an epoch, a validation batch, inside an accumulation window; for SIGTERM, SIGINT,
SIGUSR1 and submitit's time-limit signal SIGUSR2; with and without EMA; twice in one run.
One more run is SIGKILLed at a random instant and resumed from its `last.ckpt`. Each
resumed run must end with bit-identical weights, the same optimizer-step count and the
same `metrics.json` (test metrics included) as the uninterrupted run of its settings.

`make test` runs one case of each kind; `make test-all` the whole signal x point x EMA matrix.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import write_digits_folder

FINETUNE = Path(sys.executable).with_name("finetune")
RUN = [
    "model=lite0", "model.resolution=32", "data=imagefolder", "data.batch_size=16",
    "finetune=gradual", "finetune.unfreeze_at_epoch=1", "optim.lr=0.03", "trainer=cpu", "trainer.max_epochs=3",
    "trainer.enable_progress_bar=false", "logger=csv", "seed=7", "+callbacks.chaos._target_=chaos_signal.SendSignal",
]
BATCHES = 5  # training batches an epoch: 7 images of each of 10 digits, in batches of 16 (the last one of 6)
SETTINGS = {"plain": (), "accumulating": ("trainer.accumulate_grad_batches=2",), "ema": ("trainer.ema_decay=0.9",)}
#: Where a signal arrives: (loop, epoch, batch, the batch's "start" or "end").
POINTS = {
    "mid-epoch": ("train", 1, 2, "end"),
    "first-batch": ("train", 1, 0, "start"),
    "last-batch": ("train", 0, BATCHES - 1, "start"),
    "validation": ("val", 1, 0, "start"),
    "mid-window": ("train", 1, 0, "start"),  # with accumulation: the window's optimizer step is batch 1
}
SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
#: `make test`: every signal once, every setting, a stop inside a training epoch, at its last batch, in validation
#: and inside an accumulation window. (setting, point, signal)
QUICK = [
    ("plain", "mid-epoch", "SIGTERM"),
    ("plain", "last-batch", "SIGUSR1"),
    ("accumulating", "mid-window", "SIGINT"),
    ("ema", "validation", "SIGUSR2"),
]
MATRIX = [(setting, point, sent) for setting in ("plain", "ema") for point in POINTS if point != "mid-window"
          for sent in SIGNALS] + [("accumulating", "mid-window", sent) for sent in SIGNALS]
SLOW = [case for case in MATRIX if case not in QUICK]
#: The callback the command line adds: sends CHAOS_SIGNAL at CHAOS_AT ("loop,epoch,batch,hook"), once, to the
#: process group; with one point per DDP rank ("...;..."), each rank at its own point to its own process only.
CALLBACK = '''
import os, subprocess
import lightning as L

class SendSignal(L.Callback):
    def setup(self, trainer, pl_module, stage):
        points = os.environ.get("CHAOS_AT", "").split(";")
        self.one_rank = len(points) > 1
        at = points[trainer.global_rank] if self.one_rank else points[0]
        self.at = None if not at else (lambda loop, epoch, batch, hook: (loop, int(epoch), int(batch), hook))(*at.split(","))

    def send(self, trainer, loop, batch_idx, hook):
        if self.at == (loop, trainer.current_epoch, batch_idx, hook) and not trainer.sanity_checking:
            self.at = None
            # from another process, as a terminal or a scheduler sends it (workers treat their parent's signals apart)
            target = str(os.getpid()) if self.one_rank else f"-{os.getpgid(0)}"
            subprocess.run(["kill", "-s", os.environ["CHAOS_SIGNAL"].removeprefix("SIG"), "--", target], check=True,
                           start_new_session=True)  # outside the group it signals

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.send(trainer, "train", batch_idx, "start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.send(trainer, "train", batch_idx, "end")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.send(trainer, "val", batch_idx, "start")
'''


class Runs:
    """Starts `finetune` processes in their own process groups (a signal reaches the workers too) and waits for them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = write_digits_folder(root / "digits", per_class=10)  # train 70, val 20, test 20
        (root / "chaos_signal.py").write_text(CALLBACK)
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
            [str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}

    def start(self, out: Path, *args: str, signal_at: str | None = None, sent: str | None = None,
              command: list[str] | None = None, port: int | None = None) -> subprocess.Popen:
        env = {k: v for k, v in self.env.items() if k not in ("CHAOS_AT", "CHAOS_SIGNAL")}
        if port:  # two DDP jobs at once: each its own rendezvous, or their ranks could meet across jobs
            env["MASTER_PORT"] = str(port)
        if signal_at:
            env |= {"CHAOS_AT": signal_at, "CHAOS_SIGNAL": sent}
        argv = command or [str(FINETUNE), *RUN, f"data.root={self.data}", f"hydra.run.dir={out}", *args]
        return subprocess.Popen(argv, cwd=self.root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)


def wait(run: subprocess.Popen) -> tuple[int, str]:
    _, err = run.communicate(timeout=480)
    return run.returncode, err


def resume_command(err: str) -> list[str]:
    """The command a stopped run printed, with the `finetune` of this environment."""
    lines = [line for line in err.splitlines() if line.startswith("stopped by ")]
    assert len(lines) == 1, err[-3000:]
    command = shlex.split(lines[0].rpartition("resume with: ")[2])
    assert command[0] == "finetune", lines[0]
    return [str(FINETUNE), *command[1:]]


def outcome(out: Path) -> dict:
    """What must match the uninterrupted run: metrics.json (test metrics included), step count, weights."""
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("best_checkpoint")
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    return {"metrics": metrics, "global_step": last["global_step"], "epoch": last["epoch"], "state_dict": last["state_dict"]}


def assert_same(resumed: dict, uninterrupted: dict) -> None:
    assert resumed["metrics"] == uninterrupted["metrics"]
    assert (resumed["global_step"], resumed["epoch"]) == (uninterrupted["global_step"], uninterrupted["epoch"])
    weights, reference = resumed["state_dict"], uninterrupted["state_dict"]
    assert weights.keys() == reference.keys()
    assert [k for k in weights if not torch.equal(weights[k], reference[k])] == []


#: Cases stopped and resumed at once: each is a `finetune` process with two data workers (~1 GB together), so the
#: whole matrix at once (38 processes) runs a 24 GB machine out of memory.
AT_ONCE = 8


def run_cases(root: Path, cases: list[tuple[str, str, str]]) -> dict:
    """The uninterrupted run of each setting the cases use, and each case stopped then resumed, AT_ONCE at a time."""
    runs = Runs(root)
    settings = sorted({setting for setting, _, _ in cases})
    started = {setting: runs.start(root / setting, *SETTINGS[setting]) for setting in settings}
    results: dict = {}
    for first in range(0, len(cases), AT_ONCE):
        stopped, resumed = {}, {}
        for setting, point, sent in cases[first:first + AT_ONCE]:
            name = f"{setting}-{point}-{sent}"
            stopped[name] = runs.start(root / name, *SETTINGS[setting], signal_at=",".join(map(str, POINTS[point])),
                                       sent=sent)
        for name, run in stopped.items():
            status, err = wait(run)
            results[name] = {"status": status, "stderr": err, "out": root / name}
            if status != 0:
                resumed[name] = runs.start(root / name, command=resume_command(err))
        for name, run in resumed.items():
            status, err = wait(run)
            assert status == 0, err[-3000:]
        for name in stopped:
            results[name]["outcome"] = outcome(root / name) if (root / name / "metrics.json").exists() else None
    for setting, run in started.items():
        status, err = wait(run)
        assert status == 0, err[-3000:]
        results[setting] = outcome(root / setting)
    return results


def check_case(results: dict, setting: str, point: str, sent: str) -> None:
    case = results[f"{setting}-{point}-{sent}"]
    assert case["status"] == 128 + getattr(signal, sent), case["stderr"][-3000:]
    stop_line = next(line for line in case["stderr"].splitlines() if line.startswith("stopped by "))
    loop, epoch, batch, _ = POINTS[point]
    if loop == "val" or batch == BATCHES - 1:  # validation finishes and the run stops at the epoch's end
        steps_per_epoch = 3 if setting == "accumulating" else BATCHES
        assert f"stopped by {sent} at epoch {epoch + 1}, step {(epoch + 1) * steps_per_epoch};" in stop_line, stop_line
    assert_same(case["outcome"], results[setting])
    assert sorted(p.name for p in (case["out"] / "checkpoints").glob("last*")) == ["last.ckpt"]  # not last-v1.ckpt


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_cases(tmp_path_factory.mktemp("chaos"), QUICK)


@pytest.mark.parametrize(("setting", "point", "sent"), QUICK, ids=["-".join(c) for c in QUICK])
def test_stopped_run_resumes_to_the_uninterrupted_result(quick: dict, setting: str, point: str, sent: str) -> None:
    check_case(quick, setting, point, sent)


def test_uninterrupted_runs_train_every_batch_of_every_epoch(quick: dict) -> None:
    """The reference itself: 3 full epochs of 5 steps (the resumed runs must reach the same count)."""
    assert quick["plain"]["global_step"] == 3 * BATCHES
    assert quick["accumulating"]["global_step"] == 3 * 3  # windows of 2 over 5 batches: 3 steps an epoch
    assert quick["plain"]["metrics"]["epochs"] == 3 and quick["plain"]["metrics"]["best_val_acc"] > 0.2
    assert quick["ema"]["metrics"] != quick["plain"]["metrics"]  # the EMA did change what was validated


def test_mid_window_stop_waits_for_the_windows_optimizer_step(quick: dict) -> None:
    """Gradients of half a window are in no checkpoint: sent during batch 0 of epoch 1, saved after batch 1's step."""
    err = quick["accumulating-mid-window-SIGINT"]["stderr"]
    assert "stopped by SIGINT at epoch 1, step 4;" in err, err[-3000:]


def test_two_stops_in_one_run_and_a_sigkill_resume_exactly(quick: dict, tmp_path: Path) -> None:
    runs = Runs(tmp_path)
    twice = runs.start(tmp_path / "twice", signal_at="train,0,1,end", sent="SIGTERM")
    killed = runs.start(tmp_path / "killed")

    # SIGKILL at a random instant after the first checkpoint (no handler runs: the last complete last.ckpt resumes)
    seed = random.randrange(10**6)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists():
        assert killed.poll() is None and time.monotonic() < deadline, killed.stderr.read()
        time.sleep(0.01)
    time.sleep(random.Random(seed).uniform(0, 4))
    os.killpg(killed.pid, signal.SIGKILL)
    wait(killed)
    assert killed.returncode == -signal.SIGKILL
    killed_resume = runs.start(tmp_path / "killed", f"ckpt_path={last}")

    status, err = wait(twice)
    assert status == 143 and "stopped by SIGTERM at epoch 0, step 2;" in err, err[-3000:]
    status, err = wait(runs.start(tmp_path / "twice", command=resume_command(err), signal_at="val,1,1,start", sent="SIGINT"))
    assert status == 130 and "stopped by SIGINT at epoch 2, step 10;" in err, err[-3000:]
    status, err = wait(runs.start(tmp_path / "twice", command=resume_command(err)))
    assert status == 0, err[-3000:]

    status, err = wait(killed_resume)
    assert status == 0, err[-3000:]
    assert_same(outcome(tmp_path / "twice"), quick["plain"])
    # stopped before the first epoch's checkpoint: the resumed run's last.ckpt replaces that one, not beside it
    assert sorted(p.name for p in (tmp_path / "twice" / "checkpoints").glob("last*")) == ["last.ckpt"]
    print(f"SIGKILL delay drawn with seed {seed}")  # shown with a failure below
    assert_same(outcome(tmp_path / "killed"), quick["plain"])


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_cases(tmp_path_factory.mktemp("matrix"), SLOW)


@pytest.mark.slow
@pytest.mark.parametrize(("setting", "point", "sent"), SLOW, ids=["-".join(c) for c in SLOW])
def test_whole_matrix(matrix: dict, setting: str, point: str, sent: str) -> None:
    check_case(matrix, setting, point, sent)


def test_ddp_ranks_signalled_at_different_batches_stop_together_and_resume_exactly(tmp_path: Path) -> None:
    """Two gloo processes, each signalled at its own batch: one decision for both, one checkpoint, an exact resume."""
    runs = Runs(tmp_path)
    ddp = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")  # 35 images a rank: batches of 16, 16, 3
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        ports = a.getsockname()[1], b.getsockname()[1]
    reference = runs.start(tmp_path / "ddp", *ddp, port=ports[0])
    stopped = runs.start(tmp_path / "stopped", *ddp, signal_at="train,1,2,start;train,1,0,end", sent="SIGTERM",
                         port=ports[1])
    status, err = wait(stopped)
    # rank 1's signal (after batch 0 of epoch 1) decides for both: saved after that batch, step 3 + 1
    assert status == 143 and "stopped by SIGTERM at epoch 1, step 4;" in err, err[-3000:]
    assert sorted(p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir() if p.name.startswith("last")) == ["last.ckpt"]
    status, err = wait(runs.start(tmp_path / "stopped", command=resume_command(err), port=ports[1]))
    assert status == 0, err[-3000:]
    status, err = wait(reference)
    assert status == 0, err[-3000:]
    assert_same(outcome(tmp_path / "stopped"), outcome(tmp_path / "ddp"))


WORKERS_SCRIPT = """
import os, subprocess, sys, time, torch
from torch.utils.data import DataLoader, TensorDataset
from finetune.signals import ignore_in_worker

loader = DataLoader(TensorDataset(torch.arange(64)), batch_size=8, num_workers=2, persistent_workers=True,
                    worker_init_fn=ignore_in_worker)
batches = iter(loader)
next(batches), next(batches)  # one batch from each worker: both have run their worker_init_fn
for worker in batches._workers:  # a SIGTERM and a SIGINT from outside, as a scheduler or a terminal sends them
    for sent in ("TERM", "INT"):
        subprocess.run(["kill", "-s", sent, str(worker.pid)], check=True)
time.sleep(2)
assert all(worker.is_alive() for worker in batches._workers), "a worker died of a stop signal"
assert len(list(batches)) == 6
print("exiting with persistent workers alive")  # Python's exit must still end them (their parent's SIGTERM)
"""


def test_data_workers_outlive_stop_signals_from_outside_and_end_with_their_process(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", WORKERS_SCRIPT], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and "exiting with persistent workers alive" in done.stdout, done.stderr[-2000:]
