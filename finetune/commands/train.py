"""`finetune`: Hydra composes the config and `finetune.build.fit` trains; `hparams_search=<name>` runs
Optuna's trials (`finetune.search`).

    finetune model=b0 data=imagefolder data.root=DIR finetune=partial
"""

from __future__ import annotations

import math
import sys

import hydra
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from finetune.build import fit
from finetune.cli import run_command
from finetune.console import route_to_run_log, run_summary, say
from finetune.errors import user_errors


def _tensorboard_dir(cfg: DictConfig) -> str | None:
    """Where TensorBoard should look, when this run logs to it."""
    tensorboard = (cfg.get("logger") or {}).get("tensorboard")
    return str(tensorboard.save_dir) if tensorboard else None


def main() -> None:
    """The `finetune` command: Hydra composes the config and runs `fit`; Optuna runs `hparams_search=<name>` trials."""
    run_command(_search_or_hydra)


def _search_or_hydra() -> None:
    # Optuna drives `fit` itself: a Hydra sweeper cannot stop a trial mid-training (see finetune/search.py).
    if any(arg.lstrip("+").startswith("hparams_search=") for arg in sys.argv[1:]):
        from finetune.search import main as search  # here, not at the top: optuna loads for searches only

        search(sys.argv[1:])
    else:
        hydra_main()


@hydra.main(version_base="1.3", config_path="pkg://finetune.conf", config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    """Hydra's entry: fit, and hand the best validation accuracy to sweepers that optimise it."""
    route_to_run_log()
    with user_errors():
        metrics = fit(cfg)
        if rank_zero_only.rank == 0:
            say(run_summary(metrics, cfg.paths.output_dir, _tensorboard_dir(cfg)))
        value = metrics.get("best_val_acc")
        return value if value is not None and math.isfinite(value) else None


if __name__ == "__main__":
    main()
