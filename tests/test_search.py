"""`finetune -m hparams_search=optuna`: a weak trial is pruned after its first epoch, and re-running resumes the study."""

import csv
import json
import os
import subprocess
import sys

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from finetune.errors import ConfigError
from finetune.search import search

#: Three epochs of two batches each, a frozen backbone and only the learning rate searched; the median
#: pruner may judge a trial from its first epoch on, as soon as one trial has finished.
SEARCH = [
    "-m", "hparams_search=optuna", "data=digits", "model=lite0", "model.resolution=32", "finetune=frozen",
    "trainer=cpu", "trainer.max_epochs=3", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false", "logger=csv",
    "~hparams_search.params.finetune", "~hparams_search.params.optim.backbone_lr_scale",
    "~hparams_search.params.optim.weight_decay", "hparams_search.params.optim.lr.low=1e-50",
    "hparams_search.pruner.n_startup_trials=1", "hparams_search.pruner.n_warmup_steps=0",
]
#: So small that AdamW's float32 updates round to zero: the zero-initialised head never moves, predictions stay uniform.
NO_LEARNING = 1e-50


def trained(run_dir) -> tuple[int, int]:
    """(epochs validated, optimizer steps taken) by a run, read from its CSV log: one val/acc row per validation."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        validations = [row for row in csv.DictReader(f) if row.get("val/acc")]
    return len(validations), int(validations[-1]["step"]) + 1


def test_weak_trial_is_pruned_early_and_the_study_resumes(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    # Fixed parameters for the first two trials (Optuna's enqueue_trial): one that learns, one that cannot.
    study = optuna.create_study(study_name="train_optuna", storage=storage, direction="maximize")
    study.enqueue_trial({"optim.lr": 0.05})
    study.enqueue_trial({"optim.lr": NO_LEARNING})
    args = [*SEARCH, f"hydra.sweep.dir={sweep}"]

    search([*args, "hparams_search.n_trials=2"])

    good, weak = optuna.load_study(study_name="train_optuna", storage=storage).trials
    assert good.state == TrialState.COMPLETE and sorted(good.intermediate_values) == [0, 1, 2]
    assert weak.state == TrialState.PRUNED and sorted(weak.intermediate_values) == [0]
    assert weak.intermediate_values[0] < good.intermediate_values[0]
    assert (trained(sweep / "0"), trained(sweep / "1")) == ((3, 6), (1, 2))  # epochs of 2 batches
    assert good.value == json.loads((sweep / "0" / "metrics.json").read_text())["best_val_acc"]
    assert not (sweep / "1" / "metrics.json").exists()  # fit stopped before its end
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_params"] == {"optim.lr": 0.05}
    assert results["best_value"] == good.value and results["best_run_dir"] == str(sweep / "0")
    assert results["n_trials"] == {"complete": 1, "pruned": 1, "failed": 0}

    # The same command, through the real CLI, with a budget of 3: only the missing trial runs.
    finished = (sweep / "0" / "metrics.json").stat().st_mtime_ns
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-m", "finetune.train", *args, "hparams_search.n_trials=3"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    trials = optuna.load_study(study_name="train_optuna", storage=storage).trials
    assert [t.number for t in trials] == [0, 1, 2]
    assert trials[2].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert [(t.params, t.state, t.intermediate_values) for t in trials[:2]] == [
        (good.params, good.state, good.intermediate_values), (weak.params, weak.state, weak.intermediate_values)]
    assert (sweep / "0" / "metrics.json").stat().st_mtime_ns == finished
    assert trained(sweep / "2")[0] == len(trials[2].intermediate_values)
    assert sum(yaml.safe_load((sweep / "optimization_results.yaml").read_text())["n_trials"].values()) == 3

    # A different search must not continue this study.
    with pytest.raises(ConfigError, match="started with other overrides.*new here: data.batch_size=32"):
        search([*args, "data.batch_size=32"])


@pytest.mark.parametrize("overrides, message", [
    (["optim.lr=0.1"], "optim.lr is both set on the command line and searched"),
    (["ckpt_path=last.ckpt"], "ckpt_path does not apply to hparams_search"),
    (["hparams_search.params.optim.lr.low=0"], r"hparams_search.params.optim.lr: .*low > 0"),
    (["+hparams_search.params.optim.lr.choices=[1]"], "optim.lr.choices is not a setting of a float parameter"),
    (["+hparams_search.params.seed={type: uniform}"], r"hparams_search.params.seed must be \{type: float\|int\|categorical"),
    (["hparams_search.n_trials=0"], "hparams_search.n_trials must be an integer >= 1"),
    (["~hparams_search.pruner.n_warmup_steps", "hparams_search.pruner._target_=optuna.samplers.TPESampler"],
     "hparams_search.pruner._target_ must name an Optuna BasePruner, got TPESampler"),
    (["trainer.devices=2"], "hparams_search runs each trial on one device"),
    (["model.resolution=16"], "model.resolution must be an integer >= 32"),
])
def test_search_settings_are_checked_before_any_trial(tmp_path, overrides, message):
    base = [arg for arg in SEARCH if not arg.startswith("hparams_search.pruner.")]
    with pytest.raises(ConfigError, match=message):
        search([*base, f"hydra.sweep.dir={tmp_path}", *overrides])
    assert not (tmp_path / "optuna.db").exists()
