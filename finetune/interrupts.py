"""Preemption-safe training: a stop signal ends the run at a batch boundary with a checkpoint to resume.

Clusters preempt jobs with SIGTERM (SLURM first sends its requeue signal), `timeout` and
container stops send SIGTERM, a user presses Ctrl-C. Lightning turns SIGTERM into an
exception that exits with status 0 and saves nothing, so the epoch in progress is lost and
a scheduler believes the job succeeded. Here each of these signals only sets Lightning's own
stop flag; the loop stops after the batch in progress (all DDP ranks at the same batch, via
Lightning's per-batch broadcast), `checkpoints/last.ckpt` is written with the exact
mid-epoch state (the datamodule records how far into the epoch it was, see
`finetune.datamodules.base.EpochSampler`), and the process exits with 128 + the signal number after
printing the command that resumes it. A second signal stops at once without saving.
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

#: The signals that stop a run gracefully: termination, Ctrl-C, and SLURM's warning before preemption.
STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None)


class GracefulStop(L.Callback):
    """On SIGTERM/SIGINT/SIGUSR1: finish the batch, save `last.ckpt`, remember the signal for `exit_status`."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.checkpoint: Path | None = None
        self._trainer: L.Trainer | None = None
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning registered its own handlers (in `_run`), so these replace them for the run.
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self._trainer = trainer
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            self._restore()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopped without saving")
        self.received = signum
        print(f"\n{signal.Signals(signum).name} received: stopping after this optimizer step and saving a "
              "checkpoint (send it again to stop at once)", file=sys.stderr, flush=True)
        if self._trainer is not None and self._trainer.accumulate_grad_batches == 1:
            self._trainer._signal_connector.received_sigterm = True  # Lightning's stop flag, checked every batch

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.received is None:
            return
        # With gradient accumulation, raise the stop flag (checked right after this hook) only where an
        # optimizer step just happened: gradients accumulated over part of a window are in no checkpoint.
        progress = trainer.fit_loop.epoch_loop.batch_progress  # `ready` already counts this batch
        stepped = progress.current.ready % trainer.accumulate_grad_batches == 0
        if stepped or progress.is_last_batch:
            trainer._signal_connector.received_sigterm = True

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
        if not isinstance(exception, SIGTERMException):
            return
        self.received = self.received or signal.SIGTERM  # Lightning's own handler caught it (before train start)
        self.checkpoint = last_checkpoint_path(trainer)
        trainer.save_checkpoint(self.checkpoint)  # every rank calls it; rank 0 writes, atomically

    @property
    def exit_status(self) -> int:
        """128 + signal number, the shell's convention: 143 for SIGTERM, 130 for SIGINT."""
        return 128 + int(self.received or 0)


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where the run's `last.ckpt` lives: the folder of its every-epoch checkpoint callback."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.filename == "last" and callback.dirpath:
            return Path(callback.dirpath) / "last.ckpt"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


def resume_command(argv: list[str], checkpoint: Path, output_dir: str | Path) -> str:
    """The command line that continues this run in the same folder, from `checkpoint`."""
    kept = [a for a in argv[1:] if a.split("=", 1)[0].lstrip("+") not in ("ckpt_path", "hydra.run.dir")]
    program = Path(argv[0]).name if argv else ""
    program = program if program and not program.endswith(".py") else "finetune"
    return shlex.join([program, *kept, f"ckpt_path={checkpoint}", f"hydra.run.dir={output_dir}"])
