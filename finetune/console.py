"""What a command says: one logging path to the console and to `<run dir>/<command>.log`, and its closing summary.

Hydra configures the handlers (`conf/hydra/job_logging/finetune.yaml`): messages on the console as they
are, the same lines with times in the run's log file. Lightning installs its own console handler when it
is imported before any logging is configured, which kept its messages (and Python warnings) out of the
log file; `route_to_run_log` hands them to Hydra's handlers instead.
"""
from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

log = logging.getLogger("finetune")

#: The test metrics the closing summary names; metrics.json has them all.
_TEST_SHOWN = ("acc", "acc_top5", "balanced_acc", "f1_macro", "ece")

_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")


class Below(logging.Filter):
    """Passes records under `level`: info on stdout, warnings and errors on stderr (`job_logging/finetune.yaml`)."""

    def __init__(self, level: str) -> None:
        super().__init__()
        self.level = logging.getLevelName(level)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def route_to_run_log() -> None:
    """Lightning's messages and Python warnings through the handlers Hydra set up, so the log file holds them."""
    if not logging.getLogger().handlers:  # not under Hydra's logging: leave Lightning's own console handler
        return
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)
        logger.propagate = True
    logging.captureWarnings(True)


def say(lines: list[str]) -> None:
    """Print a block of lines to the console and the run's log file (plain print where Hydra set nothing up)."""
    text = "\n".join(lines)
    if logging.getLogger().handlers:
        log.info(text)
    else:
        print(text, flush=True)


def run_summary(metrics: dict[str, Any], run_dir: str | Path, tensorboard_dir: str | Path | None) -> list[str]:
    """The end of a `finetune` run: where everything went, the best score, the test result or why there is none,
    and the commands a user types next."""
    run_dir = Path(run_dir)
    best = metrics.get("best_checkpoint")
    score = metrics.get("best_val_acc")
    lines = ["", f"run directory:   {run_dir}"]
    if best:
        lines.append(f"best checkpoint: {best}" + (f" (val/acc {score:.4f})" if score is not None else ""))
    else:
        lines.append("best checkpoint: none was saved (no validation ran)")
    tests = [f"{name} {metrics[f'test/{name}']:.4f}" for name in _TEST_SHOWN if f"test/{name}" in metrics]
    if tests:
        lines.append(f"test:            {', '.join(tests)} (best checkpoint; all in {run_dir / 'metrics.json'})")
    elif metrics.get("test_skipped"):
        lines.append(f"test:            none: {metrics['test_skipped']}")
    lines.append(f"log:             {run_dir / 'train.log'}")
    return lines + next_commands(best, run_dir, tensorboard_dir)


def next_commands(best: str | None, run_dir: Path, tensorboard_dir: str | Path | None) -> list[str]:
    """What a user types after a run: look at the curves, score other images, deploy."""
    lines = ["next:"]
    if tensorboard_dir:
        lines.append(f"  tensorboard --logdir {shlex.quote(str(tensorboard_dir))}")
    if best:
        quoted = shlex.quote(str(best))
        lines.append(f"  finetune-evaluate {quoted} <labelled folder> --output {shlex.quote(str(run_dir / 'evaluation'))}")
        lines.append(f"  finetune-export {quoted} --format onnx --output {shlex.quote(str(run_dir / 'export' / 'model.onnx'))}")
    return lines if len(lines) > 1 else []
