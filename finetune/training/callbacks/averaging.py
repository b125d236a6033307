"""`trainer.ema_decay`: Lightning's EMA of the weights, validated, checkpointed and tested in their place."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn


class FitEMA(EMAWeightAveraging):
    """Lightning's `EMAWeightAveraging`, except that a checkpoint loaded to test or validate keeps its averaged weights.

    Lightning writes the average as a checkpoint's `state_dict` and the raw weights as
    `current_model_state`, and its callback swaps the average in for validation, so the
    best checkpoint is chosen by the average's accuracy. But Lightning 2.6 restores
    callbacks for every trainer function, and once the average exists (after a fit) the
    callback loads `current_model_state` into the model: `trainer.test(ckpt_path=best)`
    after a fit would score raw weights that validation never saw. Only resuming a fit
    needs the raw weights back.
    """

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
