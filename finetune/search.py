"""`finetune -m hparams_search=optuna ...`: an Optuna search that prunes weak trials after each epoch.

The lightning-hydra-template convention, but not through hydra-optuna-sweeper: that
sweeper pins optuna < 3, and a Hydra sweeper sees only each job's final return value,
so it cannot stop a trial early (lightning-hydra-template #176). Here Optuna (>= 4) drives
`fit` itself: each trial composes the train config with its sampled overrides, trains with
Optuna's Lightning pruning callback reporting `val/acc` every epoch, and stops as soon as
the pruner (median by default) judges it worse than the trials before it. The study lives in
SQLite in the sweep directory, so re-running the same command resumes it and runs only the
trials still missing, and `optuna-dashboard sqlite:///<dir>/optuna.db` can inspect it. Several
processes (one per device) may run the same command against one storage: together they stop
at `n_trials`, each proposing its own points. A trial that runs out of memory is recorded
failed and the search goes on; one ended by a stop signal, or whose process died, is recorded
failed too, and re-running the command runs a trial in its place.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from hydra.errors import HydraException
from hydra.utils import instantiate
from lightning.pytorch.utilities.memory import is_oom_error
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.exceptions import DuplicatedStudyError, ExperimentalWarning
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState
from optuna_integration import PyTorchLightningPruningCallback

from finetune.build import check_config, compose, fit
from finetune.configuration.rules import integer
from finetune.errors import ConfigError, user_errors
from finetune.training.callbacks.guards import NonFiniteLossError

GROUP = "hparams_search"
#: What trials are judged on: the metric `fit` keeps the best checkpoint by, reported each epoch for pruning.
MONITOR = "val/acc"
RESULTS_FILE = "optimization_results.yaml"
#: Keys each parameter type takes besides `type`.
PARAM_KEYS = {"float": ("low", "high", "log", "step"), "int": ("low", "high", "log", "step"), "categorical": ("choices",)}
#: Overrides that may change between runs of one study: extending a search is the point of resuming it.
RESUMABLE_CHANGES = (f"{GROUP}.n_trials", f"{GROUP}.heartbeat_interval")
#: Trials that hold part of the budget: finished ones, and those running in this or another process, so that
#: parallel workers stop together at n_trials. Failed ones (out of memory, stopped, their process dead) do not:
#: re-running the search runs trials in their place.
BUDGET = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


class TrialOutOfMemory(Exception):
    """A trial ran out of memory: Optuna records it failed, and the search goes on with the next one."""


def main(argv: Sequence[str]) -> None:
    """The `finetune` command when `hparams_search=<name>` is given (finetune.commands.train.main routes here)."""
    with user_errors():
        search(argv)


def search(argv: Sequence[str]) -> optuna.Study:
    """Create or resume the study of these overrides, run the trials it still lacks, write the results file."""
    overrides = _overrides(argv)
    root = compose("train", overrides, with_hydra=True)
    settings = root[GROUP]
    space, n_trials = _checked_settings(settings, overrides)
    sweep_dir = Path(root.hydra.sweep.dir)
    base = overrides + _one_device(root)
    _check_trial_config(base, sweep_dir)

    sweep_dir.mkdir(parents=True, exist_ok=True)
    storage = settings.get("storage") or f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"
    study = _create_or_join(settings, storage)
    _check_same_search(study, overrides, storage)

    def objective(trial: optuna.Trial) -> float:

        sampled = [_override(name, suggest(trial, name, distribution)) for name, distribution in space.items()]
        run_dir = sweep_dir / str(trial.number)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("overrides", sampled)
        cfg = compose("train", [*base, *sampled, f"paths.output_dir={run_dir}"])
        try:
            metrics = fit(cfg, extra_callbacks=[PyTorchLightningPruningCallback(trial, monitor=MONITOR)])
        except NonFiniteLossError as e:  # a bad point of the space, stopped early: what pruning means
            trial.set_user_attr("diverged", " ".join(str(e).split()))
            raise optuna.TrialPruned(f"diverged: {e}") from None
        except RuntimeError as e:
            if not (isinstance(e, torch.OutOfMemoryError) or is_oom_error(e)):
                raise
            # Not pruned: the point was never judged (a smaller batch or resolution might fit it).
            reason = " ".join(str(e).split())
            trial.set_user_attr("out_of_memory", reason)
            raise TrialOutOfMemory(reason) from None
        except SystemExit as e:
            # A stop signal: fit saved the trial's checkpoint and printed the search's command to resume with. Optuna
            # fails a trial on KeyboardInterrupt but leaves it RUNNING on SystemExit, so fail it here.
            trial.set_user_attr("stopped", f"exit status {e.code}")
            trial.study.tell(trial, state=TrialState.FAIL)
            raise
        return metrics["best_val_acc"]

    _fail_dead_trials(study)
    remaining = n_trials - len(study.get_trials(deepcopy=False, states=BUDGET))
    results = sweep_dir / RESULTS_FILE
    try:
        if remaining > 0:
            # MaxTrialsCallback stops this process once the study holds n_trials, other processes' trials included;
            # n_trials=remaining bounds a run whose every trial fails. gc_after_trial: a trial's model and its CUDA
            # memory sit in reference cycles (trainer <-> callbacks) that would otherwise outlive it.
            study.optimize(objective, n_trials=remaining, catch=(TrialOutOfMemory,), gc_after_trial=True, callbacks=[
                MaxTrialsCallback(n_trials, states=BUDGET), lambda study, _: write_results(study, results)])
    finally:
        write_results(study, results)
    _report(study, results)
    return study


def _create_or_join(settings: DictConfig, storage_url: str) -> optuna.Study:
    """The study, created by this process or joined: resumed, or run by several processes at once."""
    sampler = _instantiate(settings.sampler, f"{GROUP}.sampler", optuna.samplers.BaseSampler)
    pruner = _instantiate(settings.pruner, f"{GROUP}.pruner", optuna.pruners.BasePruner)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeats have been experimental since Optuna 2.9
        storage = optuna.storages.RDBStorage(storage_url, heartbeat_interval=settings.heartbeat_interval)
    name = settings.study_name
    try:
        return optuna.create_study(study_name=name, storage=storage, direction="maximize", sampler=sampler,
                                   pruner=pruner)
    except DuplicatedStudyError:
        # From its configured seed the sampler would propose again the points the study's first process proposed:
        # its start-up points on a resumed search, the same points in parallel processes. Only the process that
        # creates the study (one, by the storage's unique name) keeps the seed; the others reseed, as Optuna
        # reseeds its own parallel workers (n_jobs > 1).
        sampler.reseed_rng()
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)


def _fail_dead_trials(study: optuna.Study) -> None:
    """Fail the RUNNING trials of processes that died (SIGKILL, a lost node): no heartbeat for two intervals.

    Optuna does so before each trial; before the budget is counted too, or their trials would hold part of it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _checked_settings(settings: DictConfig, overrides: list[str]) -> tuple[dict[str, BaseDistribution], int]:
    """The search space and the trial budget, and a refusal of overrides that would defeat them."""
    space = parse_space(settings.get("params"))
    n_trials = settings.get("n_trials")
    integer(1).check(f"{GROUP}.n_trials", n_trials)
    integer(1).check(f"{GROUP}.heartbeat_interval", settings.get("heartbeat_interval"))
    keys = {arg.split("=", 1)[0].lstrip("+~") for arg in overrides}
    if "ckpt_path" in keys:
        raise ConfigError(f"ckpt_path does not apply to {GROUP}: every trial starts from the pretrained weights; "
                          "re-run the same command to resume the study")
    searched = sorted(set(space) & keys)
    if searched:
        raise ConfigError(f"{searched[0]} is both set on the command line and searched; drop one: {searched[0]}=... "
                          f"or ~{GROUP}.params.{searched[0]}")
    return space, n_trials


def parse_space(node: DictConfig | None, prefix: str = "") -> dict[str, BaseDistribution]:
    """`hparams_search.params` as Optuna distributions keyed by the config key (or group) each one sets.

    The mapping nests like the config (`optim: {lr: {type: float, ...}}` searches `optim.lr`),
    so the command line can change one bound (`hparams_search.params.optim.lr.high=0.01`),
    drop a parameter (`~hparams_search.params.finetune`) or add one (`+hparams_search.params.seed=...`).
    """
    where = f"{GROUP}.params{'.' + prefix.rstrip('.') if prefix else ''}"
    if not isinstance(node, DictConfig) or (not prefix and len(node) == 0):
        raise ConfigError(f"{where} must map config keys to parameters, e.g. "
                          "optim: {lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}}")
    space: dict[str, BaseDistribution] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, DictConfig) and "type" not in value:
            space |= parse_space(value, f"{name}.")
        else:
            space[name] = _distribution(value, f"{GROUP}.params.{name}")
    return space


def _distribution(value: Any, where: str) -> BaseDistribution:
    spec = OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else None
    kind = spec.pop("type", None) if spec else None
    if kind not in PARAM_KEYS:
        raise ConfigError(f"{where} must be {{type: float|int|categorical, ...}}, got {value!r}")
    unknown = sorted(set(spec) - set(PARAM_KEYS[kind]))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]} is not a setting of a {kind} parameter; valid: {', '.join(PARAM_KEYS[kind])}")
    try:
        if kind == "categorical":
            return CategoricalDistribution(spec["choices"])
        if kind == "float":
            return FloatDistribution(spec["low"], spec["high"], log=spec.get("log", False), step=spec.get("step"))
        return IntDistribution(spec["low"], spec["high"], log=spec.get("log", False), step=spec.get("step", 1))
    except KeyError as e:
        raise ConfigError(f"{where}.{e.args[0]} must be set for a {kind} parameter") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> Any:
    """The trial's value for one parameter (a value enqueued for this trial, or the sampler's)."""
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, FloatDistribution):
        return trial.suggest_float(name, distribution.low, distribution.high, log=distribution.log, step=distribution.step)
    return trial.suggest_int(name, distribution.low, distribution.high, log=distribution.log, step=distribution.step)


def write_results(study: optuna.Study, path: Path) -> None:
    """`optimization_results.yaml`: the best parameters and value (as hydra-optuna-sweeper writes them) and trial counts."""
    trials = study.get_trials(deepcopy=False)
    counts = {name: sum(t.state == state for t in trials)
              for name, state in (("complete", TrialState.COMPLETE), ("pruned", TrialState.PRUNED), ("failed", TrialState.FAIL))}
    best = _best(study)
    results = {
        "name": "optuna",
        "study_name": study.study_name,
        "metric": MONITOR,
        "direction": "maximize",
        "best_params": best.params if best else None,
        "best_value": best.value if best else None,
        "best_trial": best.number if best else None,
        "best_run_dir": best.user_attrs.get("run_dir") if best else None,
        "best_overrides": " ".join(best.user_attrs.get("overrides", [])) if best else None,
        "n_trials": counts,
    }
    path.write_text(yaml.safe_dump(results, sort_keys=False, width=10_000))  # one line per value


def _best(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no trial completed yet
        return None


def _report(study: optuna.Study, results: Path) -> None:
    best = _best(study)
    if best is None:
        print(f"no trial completed; see {results}")
        return
    print(f"best {MONITOR} {best.value:.4f}: trial {best.number} ({best.user_attrs.get('run_dir')}) with "
          f"{' '.join(best.user_attrs.get('overrides', []))}; results in {results}")


def _overrides(argv: Sequence[str]) -> list[str]:
    """The command line as compose() takes it: `-m` dropped, the search group appended (train.yaml lists no default for it)."""
    overrides = []
    for arg in argv:
        if arg in ("-m", "--multirun"):
            continue
        if arg.startswith("-"):
            raise ConfigError(f"{arg} does not apply to {GROUP}=<name>, which runs its trials itself; drop it")
        overrides.append(f"+{arg}" if arg.startswith(f"{GROUP}=") else arg)
    return overrides


def _one_device(root: DictConfig) -> list[str]:
    """Trials run one after another in this process, each on one device: the overrides that make it so.

    Lightning would start further DDP processes by re-running the command line, so each would
    run the whole search; `trainer.devices=auto` would pick every GPU.
    """
    trainer = root.trainer
    devices, strategy = trainer.get("devices"), str(trainer.get("strategy"))
    if strategy.startswith("ddp") or trainer.get("num_nodes", 1) != 1 or devices not in ("auto", 1, "1"):
        raise ConfigError(f"{GROUP} runs each trial on one device; use trainer.devices=1 and trainer.strategy=auto "
                          f"(got devices={devices}, strategy={strategy})")
    return ["trainer.devices=1"] if devices == "auto" else []


def _check_trial_config(overrides: list[str], sweep_dir: Path) -> None:
    """The trials' config without sampled values, checked before a study is created for it."""
    check_config(compose("train", [*overrides, f"paths.output_dir={sweep_dir}"]))


def _check_same_search(study: optuna.Study, overrides: list[str], storage: str) -> None:
    """Refuse to resume a study that other settings started: its trials would not be comparable."""
    mine = sorted(arg for arg in overrides
                  if not arg.startswith("hydra.") and arg.split("=", 1)[0] not in RESUMABLE_CHANGES)
    theirs = study.user_attrs.get("overrides")
    if theirs is None:
        study.set_user_attr("overrides", mine)
    elif theirs != mine:
        dropped, added = sorted(set(theirs) - set(mine)), sorted(set(mine) - set(theirs))
        raise ConfigError(
            f"study '{study.study_name}' in {storage} was started with other overrides (missing here: "
            f"{' '.join(dropped) or 'none'}; new here: {' '.join(added) or 'none'}); resume it with its own overrides "
            f"(only {', '.join(RESUMABLE_CHANGES)} may change), or give this search its own with "
            f"{GROUP}.study_name=<name> or hydra.sweep.dir=<dir>"
        )


def _instantiate(node: DictConfig, key: str, kind: type) -> Any:
    try:
        obj = instantiate(node)
    except HydraException as e:
        raise ConfigError(f"{key}: {' '.join(str(e.__cause__ or e).split())}") from None
    if not isinstance(obj, kind):
        raise ConfigError(f"{key}._target_ must name an Optuna {kind.__name__}, got {type(obj).__name__}")
    return obj


def _override(key: str, value: Any) -> str:
    """`key=value` as Hydra parses it back to `value`."""
    text = {True: "true", False: "false", None: "null"}[value] if value is None or isinstance(value, bool) else value
    return f"{key}={text}"
