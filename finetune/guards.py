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


class NonFiniteLossError(FloatingPointError):
    """Training diverged; the message names the step and the checkpoint to resume from."""


class FiniteLossGuard(L.Callback):
    """Raise NonFiniteLossError at the first NaN/inf loss (on any rank) or non-finite weights to save.

    Costs one host sync per step (and one tiny all-reduce under DDP, so every rank stops
    at the same step instead of the others hanging in the next gradient all-reduce).
    """

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        value = "non-finite on another process" if finite else loss.detach().float().item()
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
