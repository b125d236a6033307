"""Preemption-safe training: a stop signal ends the run at a step boundary with a checkpoint to resume.

Clusters preempt jobs with SIGTERM (SLURM first sends its warning signal, submitit SIGUSR2),
`timeout` and container stops send SIGTERM, a user presses Ctrl-C. Lightning turns SIGTERM
into an exception that exits with status 0 and saves nothing, so the epoch in progress is
lost and a scheduler believes the job succeeded. Here each of `finetune.signals.STOP_SIGNALS`
is only recorded by its handler; the run decides at the next optimizer step, all DDP ranks
together (one all-reduce), so every rank stops after the same batch. A stop decided inside
an epoch saves `checkpoints/last.ckpt` with the exact mid-epoch state (the datamodule
records how far into the epoch it was, see `finetune.datamodules.base.EpochSampler`). A stop
that arrives in the epoch's last batch or during validation lets that validation finish
(a partial one is no result, and the EMA's averaged weights are swapped in during it) and
stops at the epoch boundary, with the epoch's own `last.ckpt`. The process then exits with
128 + the signal number after printing the command that resumes it. A second signal stops
at once without saving; the previous `last.ckpt` stays intact.
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
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from finetune.signals import STOP_SIGNALS


class GracefulStop(L.Callback):
    """On a stop signal: finish the optimizer step (or the epoch's validation), save `last.ckpt`, exit 128 + signal."""

    def __init__(self) -> None:
        self.received: int | None = None  # the signal this process got
        self.stopping: int | None = None  # the signal the run stops for, the same on every rank
        self.checkpoint: Path | None = None
        self._at_epoch_end = False
        self._previous: dict[int, Any] = {}

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def _install(self) -> None:
        # After Lightning (and submitit) registered theirs (Trainer._run), so these replace them for the run.
        if self._previous or threading.current_thread() is not threading.main_thread():
            return  # installed already; signal handlers can only be set from the main thread
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            self._restore()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopped without saving")
        self.received = signum
        print(f"\n{signal.Signals(signum).name} received: stopping after this optimizer step (or this epoch's "
              "validation) and saving a checkpoint (send it again to stop at once)", file=sys.stderr, flush=True)

    def _decide(self, trainer: L.Trainer) -> bool:
        """Whether any rank received a stop signal: one all-reduce, so all ranks stop after the same batch."""
        if self.stopping is not None:
            return True  # decided on every rank at once, so no rank waits in a collective here
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            received = torch.tensor(self.received or 0, device=trainer.strategy.root_device)
            dist.all_reduce(received, op=dist.ReduceOp.MAX)
            self.stopping = int(received.item()) or None
        else:
            self.stopping = self.received
        return self.stopping is not None

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # Only where an optimizer step just happened: gradients accumulated over part of a window are in no
        # checkpoint. Every rank reaches the same steps, so the all-reduce in `_decide` always has all of them.
        progress = trainer.fit_loop.epoch_loop.batch_progress  # `ready` already counts this batch
        stepped = progress.current.ready % trainer.accumulate_grad_batches == 0 or progress.is_last_batch
        if stepped and self._decide(trainer):
            # Lightning checks this flag right after this batch (and stops there unless it was the epoch's last
            # batch), and after each validation batch, where `on_validation_start` hides it.
            trainer._signal_connector.received_sigterm = True

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stopping is not None:
            trainer._signal_connector.received_sigterm = False  # validate to the end: a partial pass is no result

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stopping is not None:
            trainer._signal_connector.received_sigterm = True  # mid-epoch validation: stop right after it

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._decide(trainer):
            return
        # The epoch is trained and validated: stop at its boundary, with the checkpoint an uninterrupted run
        # writes here. Lightning raises right after this hook, past the point where it could still save one.
        self._at_epoch_end = True
        self.checkpoint = last_checkpoint_path(trainer)
        if not _saved_last_at_this_step(trainer):
            trainer.save_checkpoint(self.checkpoint)
        trainer._signal_connector.received_sigterm = True

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
        if not isinstance(exception, SIGTERMException):
            return
        self.stopping = self.stopping or self.received or signal.SIGTERM  # Lightning's handler, before train start
        if self._at_epoch_end:
            return  # `on_train_epoch_end` made sure of the epoch's last.ckpt
        self.checkpoint = last_checkpoint_path(trainer)
        trainer.save_checkpoint(self.checkpoint)  # every rank calls it; rank 0 writes, atomically


def _saved_last_at_this_step(trainer: L.Trainer) -> bool:
    """Whether the run's every-epoch checkpoint callback already wrote `last.ckpt` at this global step."""
    callback = _last_checkpoint_callback(trainer)
    # `_last_global_step_saved`: ModelCheckpoint's own guard against saving twice at one step.
    return callback is not None and getattr(callback, "_last_global_step_saved", None) == trainer.global_step


def _last_checkpoint_callback(trainer: L.Trainer) -> ModelCheckpoint | None:
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.filename == "last" and callback.dirpath:
            return callback
    return None


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where the run's `last.ckpt` lives: the folder of its every-epoch checkpoint callback."""
    callback = _last_checkpoint_callback(trainer)
    return Path(callback.dirpath if callback else Path(trainer.default_root_dir) / "checkpoints") / "last.ckpt"


def resume_command(argv: list[str], checkpoint: Path, output_dir: str | Path) -> str:
    """The command line that continues this run in the same folder, from `checkpoint`.

    A trial of a search (`hparams_search=...`) continues with the search's own command, which resumes its
    study (and refuses a trial's `ckpt_path`).
    """
    program = Path(argv[0]).name if argv else ""
    program = program if program and not program.endswith(".py") else "finetune"
    if any(a.lstrip("+").startswith("hparams_search=") for a in argv[1:]):
        return shlex.join([program, *argv[1:]])
    kept = [a for a in argv[1:] if a.split("=", 1)[0].lstrip("+") not in ("ckpt_path", "hydra.run.dir")]
    return shlex.join([program, *kept, f"ckpt_path={checkpoint}", f"hydra.run.dir={output_dir}"])
