"""`finetune -m hparams_search=optuna`: a weak trial is pruned after its first epoch, and re-running resumes the study.

Resumed and parallel searches propose new points and stop together at n_trials; a trial out of memory, stopped by a
signal or in a killed process is recorded failed, and the search goes on or resumes with the command it printed.
"""

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from finetune.errors import ConfigError
from finetune.search import search, suggest
from helpers import write_digits_folder

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


@pytest.mark.slow  # 50-230 s on the 2-core machine: in make test-all, out of make test
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
    out = subprocess.run([sys.executable, "-m", "finetune.commands.train", *args, "hparams_search.n_trials=3"],
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


FINETUNE = Path(sys.executable).with_name("finetune")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
#: The default search, each trial one epoch on the CPU.
ONE_EPOCH = ["-m", "hparams_search=optuna", "model=lite0", "trainer=cpu", "trainer.max_epochs=1",
             "trainer.enable_progress_bar=false", "logger=csv"]
#: A resolution whose first activation (the digits' upsampling, on the device) no allocator can provide: a real
#: out-of-memory error, at once.
TOO_LARGE = 10_000_000


def tiny_search(tmp_path) -> list[str]:
    """The default search on a real image folder (70 training images in 5 batches)."""
    data = write_digits_folder(tmp_path / "digits", per_class=10)
    return [*ONE_EPOCH, "model.resolution=32", "data=imagefolder", f"data.root={data}", "data.batch_size=16",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]


def storage_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'sweep' / 'optuna.db'}"


def cli_env(tmp_path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])}


@pytest.mark.slow  # 50-230 s on the 2-core machine: in make test-all, out of make test
def test_a_resumed_search_proposes_new_points(tmp_path):
    args = tiny_search(tmp_path)
    search([*args, "hparams_search.n_trials=2"])
    trials = search([*args, "hparams_search.n_trials=4"]).trials

    assert [t.state in FINISHED for t in trials] == [True] * 4
    first, resumed = [t.params for t in trials[:2]], [t.params for t in trials[2:]]
    assert not [p for p in resumed if p in first]  # a sampler restarted from its seed proposes trial 0's point again
    # The process that created the study kept the configured seed: its first point is TPE's first from seed 42.
    reference = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=42, n_startup_trials=10)).ask()
    assert first[0] == {name: suggest(reference, name, d) for name, d in trials[0].distributions.items()}


@pytest.mark.slow  # 50-230 s on the 2-core machine: in make test-all, out of make test
def test_parallel_searches_share_the_budget_and_propose_their_own_points(tmp_path):
    args = [*tiny_search(tmp_path), "hparams_search.n_trials=2"]
    (tmp_path / "sweep").mkdir()
    # The storage exists before its workers start: SQLAlchemy's table creation races between processes that start
    # at the same instant (sqlalchemy#4936). The study itself is left to the workers.
    optuna.storages.RDBStorage(storage_url(tmp_path))
    workers = [subprocess.Popen([str(FINETUNE), *args], cwd=tmp_path, env=cli_env(tmp_path), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    logs = [worker.communicate(timeout=300)[1] for worker in workers]

    assert [worker.returncode for worker in workers] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    trials = optuna.load_study(study_name="train_optuna", storage=storage_url(tmp_path)).trials
    assert [t.state in FINISHED for t in trials] == [True, True]  # not 4: each worker alone would run 2
    assert trials[0].params != trials[1].params
    assert [len(re.findall(r"Trial \d+ (?:finished with value|pruned)", log)) for log in logs] == [1, 1]  # one each


def test_trials_running_in_another_process_hold_their_place_in_the_budget(tmp_path):
    (tmp_path / "sweep").mkdir()
    study = optuna.create_study(study_name="train_optuna", storage=storage_url(tmp_path), direction="maximize")
    elsewhere = study.ask()  # what a process running this search holds while its trial trains

    search([*tiny_search(tmp_path), "hparams_search.n_trials=1"])

    assert [t.number for t in optuna.load_study(study_name="train_optuna", storage=storage_url(tmp_path)).trials] == [
        elsewhere.number]


@pytest.mark.slow  # 50-230 s on the 2-core machine: in make test-all, out of make test
def test_a_trial_out_of_memory_is_failed_and_the_search_goes_on(tmp_path):
    searched = "+hparams_search.params.model.resolution={type: categorical, choices: [32, %d]}" % TOO_LARGE
    args = [*ONE_EPOCH, "data=digits", searched, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    (tmp_path / "sweep").mkdir()
    study = optuna.create_study(study_name="train_optuna", storage=storage_url(tmp_path), direction="maximize")
    study.enqueue_trial({"model.resolution": TOO_LARGE})
    study.enqueue_trial({"model.resolution": 32})

    search([*args, "hparams_search.n_trials=2"])

    too_large, fitting = optuna.load_study(study_name="train_optuna", storage=storage_url(tmp_path)).trials
    assert too_large.state == TrialState.FAIL
    assert "can't allocate memory" in too_large.user_attrs["out_of_memory"]
    assert fitting.state == TrialState.COMPLETE and fitting.params["model.resolution"] == 32
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert results["n_trials"] == {"complete": 1, "pruned": 0, "failed": 1}


#: What a scheduler does to a running trial: SIGTERM, here at the end of the first training batch of the process.
STOP_ONCE = """
import os, signal
import lightning as L

class StopOnce(L.Callback):
    def on_train_batch_end(self, trainer, *args):
        if os.environ.pop("STOP_SEARCH", None):
            os.kill(os.getpid(), signal.SIGTERM)
"""


@pytest.mark.slow  # 50-230 s on the 2-core machine: in make test-all, out of make test
def test_a_stopped_search_fails_its_trial_and_resumes_with_the_command_it_printed(tmp_path):
    (tmp_path / "stop_once.py").write_text(STOP_ONCE)
    args = [*tiny_search(tmp_path), "+callbacks.stop._target_=stop_once.StopOnce", "hparams_search.n_trials=2"]
    stopped = subprocess.run([str(FINETUNE), *args], cwd=tmp_path, env={**cli_env(tmp_path), "STOP_SEARCH": "1"},
                             capture_output=True, text=True, timeout=300)

    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    (trial,) = optuna.load_study(study_name="train_optuna", storage=storage_url(tmp_path)).trials
    assert trial.state == TrialState.FAIL and trial.user_attrs["stopped"] == "exit status 143"
    (line,) = [line for line in stopped.stderr.splitlines() if line.startswith("stopped by SIGTERM")]
    command = shlex.split(line.rpartition("resume with: ")[2])
    assert command == ["finetune", *args], line  # the search's own, not the trial's ckpt_path that it refuses

    resumed = subprocess.run([str(FINETUNE), *command[1:]], cwd=tmp_path, env=cli_env(tmp_path),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = optuna.load_study(study_name="train_optuna", storage=storage_url(tmp_path)).trials
    assert trials[0].state == TrialState.FAIL and [t.state in FINISHED for t in trials[1:]] == [True, True]


@pytest.mark.slow  # 50-230 s on the 2-core machine: in make test-all, out of make test
def test_a_killed_search_resumes_in_place_of_its_dead_trial(tmp_path):
    args = [*tiny_search(tmp_path), "hparams_search.heartbeat_interval=1", "hparams_search.n_trials=1"]
    killed = subprocess.Popen([str(FINETUNE), *args], cwd=tmp_path, env=cli_env(tmp_path),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "sweep" / "0").exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # until trial 0 is fitting: its heartbeat thread has beaten
    os.killpg(killed.pid, signal.SIGKILL)  # a lost node, or the kernel's OOM killer: no handler runs
    assert killed.wait() == -signal.SIGKILL

    resumed = subprocess.run([str(FINETUNE), *args], cwd=tmp_path, env=cli_env(tmp_path),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = optuna.load_study(study_name="train_optuna", storage=storage_url(tmp_path)).trials
    assert trials[0].state == TrialState.FAIL and [t.state in FINISHED for t in trials[1:]] == [True]

