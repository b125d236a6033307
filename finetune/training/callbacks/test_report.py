"""`trainer.test`'s report: the evaluation report's metrics as `test/*` scalars, its confusion figure and
per-class table in TensorBoard.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from torchmetrics import MetricCollection

from finetune.analysis.reports import confusion_figure, markdown_report, plt, report_metrics, summarize


class TestReport(L.Callback):
    """At the end of `trainer.test`: the report's averaged metrics and ECE as `test/*` scalars, plus
    the confusion matrix figure and the per-class table in TensorBoard.

    The logits are what the module's test step returns (`outputs`), so testing runs no extra
    pass; torchmetrics syncs the states across processes under DDP.
    """

    def __init__(self) -> None:
        self._metrics: MetricCollection | None = None

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._metrics = report_metrics(pl_module.hparams["num_classes"]).to(pl_module.device)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._metrics.update(outputs.float().softmax(-1), batch[1])

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        names = pl_module.class_names
        values = self._metrics.compute()
        report = summarize(values, names)
        scalars = {"test/ece": report["expected_calibration_error"], "test/balanced_acc": report["balanced_accuracy"]}
        for average in ("macro", "weighted"):
            scalars |= {f"test/{k}_{average}": v for k, v in report[f"{average}_avg"].items()}
        pl_module.log_dict(scalars)  # test/acc and test/acc_top5 are the module's own
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if loggers and trainer.is_global_zero:
            fig = confusion_figure(values["confusion"].cpu().numpy(), names)
            for logger in loggers:
                logger.experiment.add_figure("test/confusion_matrix", fig, trainer.global_step, close=False)
                logger.experiment.add_text("test/report", markdown_report(report), trainer.global_step)
            plt.close(fig)
        self._metrics = None
