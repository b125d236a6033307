"""Scale-out: DDP on CPU (gloo) against one process, trainer=ddp under SLURM and torchrun, the SLURM launcher.

Tolerance of the 2-process vs 1-process comparison: with the same global batch (2 x 16 vs
32), no dropout and no augmentation (their random draws cannot match between one batch of
32 and two of 16) and a frozen backbone (BatchNorm in eval mode, so batch statistics do not
depend on the split either), the runs differ only in float32 summation order: gradients
averaged by all-reduce vs one mean over the batch. Weights must agree to 1e-6 absolute
(observed: ~3e-8) and accuracies, counted over the same samples, exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import submitit
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import DictConfig

from finetune.build import trainer_kwargs
from helpers import write_digits_folder

FINETUNE = Path(sys.executable).with_name("finetune")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
COMMON = [
    "model=lite0", "model.resolution=32", "model.drop_rate=0", "data=imagefolder", "data.augment=false",
    "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "logger=csv",
]
ONE_PROCESS = ["trainer=cpu", "data.batch_size=32"]
TWO_PROCESSES = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=16"]

# Runs `fit` like the CLI, plus a callback that compares every process's weights at the end
# and records whether the backbone learned (it must, once gradual unfreezes it).
AGREEMENT_SCRIPT = '''
import json, sys
from pathlib import Path
import lightning as L, torch
from hydra import compose, initialize_config_module
from finetune.build import fit

class Agreement(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.stem = pl_module.model.stem.conv.weight.detach().clone()
        # what dropout, stochastic depth and device-side crops draw from: it must differ across ranks
        self.masks = trainer.strategy.all_gather(torch.nn.functional.dropout(torch.ones(256), 0.5))
    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        everyone = trainer.strategy.all_gather(flat)
        if trainer.is_global_zero:
            report = {"processes": len(everyone), "max_difference": (everyone - everyone[0]).abs().max().item(),
                      "backbone_learned": not torch.equal(self.stem, pl_module.model.stem.conv.weight),
                      "same_dropout_masks": torch.equal(self.masks[0], self.masks[1])}
            Path(trainer.default_root_dir, "agreement.json").write_text(json.dumps(report))

with initialize_config_module("finetune.conf", version_base="1.3"):
    cfg = compose("train", overrides=[*sys.argv[2:], f"paths.output_dir={sys.argv[1]}"])
fit(cfg, extra_callbacks=[Agreement()])
'''


def config(*overrides: str) -> DictConfig:
    with initialize_config_module("finetune.conf", version_base="1.3"):
        return compose("train", overrides=["paths.output_dir=unused", *overrides], return_hydra_config=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three training runs, started together and awaited by the tests that read them."""
    root = tmp_path_factory.mktemp("ddp")
    script = root / "agreement.py"
    script.write_text(AGREEMENT_SCRIPT)
    # Full-length epochs of a small real folder: 140 training images, 4 batches of 32 and one of 12, the same
    # global batches as 2 processes x 16 (70 images each); 30 val and 30 test images split evenly.
    data = f"data.root={write_digits_folder(root / 'digits', per_class=20)}"
    commands = {
        "one": [str(FINETUNE), *COMMON, data, "finetune=frozen", *ONE_PROCESS, f"hydra.run.dir={root / 'one'}"],
        "two": [str(FINETUNE), *COMMON, data, "finetune=frozen", *TWO_PROCESSES, f"hydra.run.dir={root / 'two'}"],
        "gradual": [sys.executable, str(script), str(root / "gradual"), *COMMON, data, "finetune=gradual", *TWO_PROCESSES],
    }
    started = {name: subprocess.Popen(cmd, cwd=root, env=ENV, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)
               for name, cmd in commands.items()}
    for name, run in started.items():
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, f"{name}: {err[-3000:]}"
    return {name: root / name for name in commands}


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(runs: dict[str, Path]) -> None:
    one, two = (json.loads((runs[n] / "metrics.json").read_text()) for n in ("one", "two"))
    assert one["best_val_acc"] > 0.2  # it trains: ten classes, chance is 0.1
    for key in ("best_val_acc", "test/acc", "test/acc_top5", "epochs"):
        assert two[key] == one[key], key
    w1, w2 = (torch.load(runs[n] / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
              for n in ("one", "two"))
    assert w1.keys() == w2.keys()
    assert max((w1[k].double() - w2[k].double()).abs().max().item() for k in w1) <= 1e-6


def test_gradual_unfreezing_under_ddp_keeps_processes_in_sync(runs: dict[str, Path]) -> None:
    report = json.loads((runs["gradual"] / "agreement.json").read_text())
    assert report == {"processes": 2, "max_difference": 0.0, "backbone_learned": True, "same_dropout_masks": False}


def test_ddp_detects_unused_parameters_only_for_policies_that_unfreeze_later() -> None:
    assert trainer_kwargs(config("trainer=ddp", "finetune=gradual"))["strategy"] == "ddp_find_unused_parameters_true"
    assert trainer_kwargs(config("trainer=ddp", "finetune=gradual", "trainer.strategy=ddp_spawn"))["strategy"] == (
        "ddp_spawn_find_unused_parameters_true")
    for policy in ("frozen", "partial", "full"):
        assert trainer_kwargs(config("trainer=ddp", f"finetune={policy}"))["strategy"] == "ddp"
    unfrozen_from_the_start = config("trainer=ddp", "finetune=gradual", "finetune.unfreeze_at_epoch=0")
    assert trainer_kwargs(unfrozen_from_the_start)["strategy"] == "ddp"


@pytest.mark.parametrize(
    ("env", "devices", "nodes", "world", "rank"),
    [
        ({"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "finetune",
          "SLURM_JOB_ID": "1", "SLURM_NODELIST": "gpu[1-2]", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
          "SLURM_NODEID": "1"}, 4, 2, 8, 5),
        ({"LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "3", "WORLD_SIZE": "6", "RANK": "4", "LOCAL_RANK": "0",
          "GROUP_RANK": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}, 2, 3, 6, 4),
    ],
    ids=["slurm", "torchrun"],
)
def test_trainer_ddp_takes_devices_and_nodes_from_slurm_and_torchrun(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], devices: int, nodes: int, world: int, rank: int
) -> None:
    for key in [k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # The Trainer sets the process-wide rank of Lightning's rank_zero_only to this fake rank: put it back after,
    # or every later test in this process would log nothing.
    from lightning.fabric.utilities import rank_zero as fabric_rank_zero
    from lightning_utilities.core import rank_zero as utils_rank_zero

    for holder in (fabric_rank_zero.rank_zero_only, utils_rank_zero.rank_zero_only):
        monkeypatch.setattr(holder, "rank", holder.rank)
    cfg = config("trainer=ddp", "trainer.accelerator=cpu")
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (devices, nodes)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, **trainer_kwargs(cfg))  # Lightning validates both
    assert (trainer.world_size, trainer.global_rank, trainer.num_nodes) == (world, rank, nodes)


def test_slurm_launcher_config_renders_a_valid_sbatch_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\n")  # submitit only checks that a SLURM cluster is reachable
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    cfg = config("hydra/launcher=slurm", "trainer=ddp", "hydra.launcher.partition=gpu",
                 "hydra.launcher.gpus_per_node=4", "hydra.launcher.nodes=2", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    submitted = {}

    def capture(executor: submitit.AutoExecutor, fn: object, *args: list) -> list:
        submitted["executor"], submitted["jobs"] = executor, len(args[0])
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    launcher = instantiate(cfg.hydra.launcher)  # the plugin's SlurmLauncher
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    launcher.launch([["finetune=frozen"], ["finetune=full"]], initial_job_idx=0)
    sbatch = submitted["executor"]._executor._make_submission_file_text("python -m submitit.core._submit x", "0")
    assert submitted["jobs"] == 2
    for line in ("--partition=gpu", "--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=4", "--cpus-per-task=8",
                 "--mem=64GB", "--time=240", "--signal=USR2@120"):
        assert f"#SBATCH {line}" in sbatch, line
