"""Stop a diverging run at the first non-finite loss, and never checkpoint non-finite weights.

A NaN or inf loss poisons every weight it updates; training on only wastes the remaining
budget and, worse, the next checkpoint would overwrite `last.ckpt`, the state a user
would resume from. The guard raises before that backward pass, so the update never
happens, and refuses any checkpoint whose weights are already non-finite (an inf gradient
from a finite loss), so the last good checkpoint on disk survives either way.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch

from finetune.errors import NonFiniteLossError


class FiniteLossGuard(L.Callback):
    """Raise NonFiniteLossError before an update from a NaN/inf loss (on any rank), or on non-finite weights to save.

    The losses are only recorded as tensors before backward; the one host sync per update
    (plus one tiny all-reduce under DDP, so every rank stops at the same step instead of
    the others hanging in the next gradient all-reduce) waits until backward has been
    queued. Syncing before backward would idle a GPU while the CPU queues its kernels.
    """

    def __init__(self) -> None:
        self._losses: list[torch.Tensor] = []

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if not self._losses:  # a step without a loss of ours (e.g. manual optimisation elsewhere)
            return
        losses, self._losses = torch.stack(self._losses), []
        finite = bool(torch.isfinite(losses).all())
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        value = "non-finite on another process" if finite else losses[~torch.isfinite(losses)][0].float().item()
        raise NonFiniteLossError(
            f"loss became {value} at global step {trainer.global_step} (epoch {trainer.current_epoch}); "
            f"stopped before that update; {_last_good(trainer)}; lower optim.lr or set trainer.gradient_clip_val"
        )

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        bad = next((k for k, v in checkpoint.get("state_dict", {}).items()
                    if torch.is_floating_point(v) and not bool(torch.isfinite(v).all())), None)
        if bad is not None:
            raise NonFiniteLossError(
                f"weights became non-finite ({bad}) by global step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}); refused to save them; {_last_good(trainer)}; "
                "lower optim.lr or set trainer.gradient_clip_val"
            )


def _last_good(trainer: L.Trainer) -> str:
    """Where the newest checkpoint written before the failure is, phrased as the way to resume."""
    if not trainer.checkpoint_callbacks:
        return "checkpointing is off, nothing to resume from"
    written = {p for c in trainer.checkpoint_callbacks for p in (c.last_model_path, c.best_model_path)
               if p and os.path.isfile(p)}
    if not written:
        return "no checkpoint was written yet"
    path = max(written, key=lambda p: (os.stat(p).st_mtime_ns, os.path.basename(p).startswith("last")))
    return f"last good checkpoint: {path} (resume with ckpt_path={path})"
