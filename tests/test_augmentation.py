"""Augmentation and regularisation keys: each changes what it should in training, and evaluation not at all.

The data keys are judged on real batches of scikit-learn's digits through the datamodule's
own device path, with and without the key under the same seed; EMA and gradient
accumulation through short real fits of `finetune.build.fit`.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from finetune.configuration.checks import validate_config
from finetune.datamodules import DigitsDataModule
from finetune.errors import ConfigError
from finetune.training.features import CachedFeatureDataModule
from finetune.training.module import FineTuneModule
from finetune.build import fit
from finetune.cli import group_options
from helpers import compose_config

DIGITS = {"num_workers": 0, "resolution": 32, "batch_size": 64}
KEYS = [
    {"auto_augment": "randaugment"},
    {"auto_augment": "trivialaugment"},
    {"random_erasing": 0.5},
    {"mixup_alpha": 0.4},
    {"cutmix_alpha": 1.0},
]
MIXING = ("mixup_alpha", "cutmix_alpha")
FIT = [
    "model=b0", "model.pretrained=null", "model.resolution=32", "data=digits", "data.batch_size=32",
    "trainer=cpu", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false", "logger=csv",
]


def first_batch(dm: DigitsDataModule, split: str) -> tuple[Tensor, Tensor]:
    dm.setup("fit")
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    return next(iter(loader))


def on_device(dm: DigitsDataModule, batch: tuple[Tensor, Tensor], train: bool, seed: int = 0) -> tuple[Tensor, Tensor]:
    """What the network gets for `batch` from `dm`, with torch's global RNG at `seed` (as seed_everything leaves it)."""
    torch.manual_seed(seed)
    return dm.device_batch(batch, train=train)


# --------------------------------------------------------------------------- data keys


@pytest.mark.parametrize("key", KEYS, ids=lambda key: "=".join(map(str, *key.items())))
def test_each_key_changes_training_images_and_leaves_evaluation_images_untouched(key: dict) -> None:
    plain, augmented = DigitsDataModule(**DIGITS), DigitsDataModule(**DIGITS, **key)
    train_batch = first_batch(plain, "train")
    assert torch.equal(train_batch[0], first_batch(augmented, "train")[0])  # same data: only the transform differs

    x, y = on_device(plain, train_batch, train=True)
    x_key, y_key = on_device(augmented, train_batch, train=True)
    assert not torch.equal(x, x_key)
    if next(iter(key)) in MIXING:
        assert y_key.shape == (len(y), 10) and y_key.dtype == torch.float32
    else:
        assert torch.equal(y_key, y) and torch.equal(y, train_batch[1])

    for batch in (first_batch(plain, "val"), train_batch):  # evaluation of any images is bit-identical
        expected, got = on_device(plain, batch, train=False), on_device(augmented, batch, train=False)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]) and torch.equal(got[1], batch[1])


@pytest.mark.parametrize("key", [*KEYS[:2], {"random_erasing": 1.0}], ids=lambda key: "=".join(map(str, *key.items())))
def test_auto_augment_and_erasing_are_drawn_per_image(key: dict) -> None:
    """Copies of one image come out different: torchvision would give a whole batch tensor one op, one box."""
    dm = DigitsDataModule(**DIGITS, augment=False, **key)
    copies = dm.dataset("train").images[:1].repeat(32, 1, 1, 1)
    torch.manual_seed(0)
    out = dm.device_transform(copies, train=True)
    assert len({image.numpy().tobytes() for image in out}) >= 16


def test_random_erasing_zeroes_one_box_per_erased_image_and_nothing_else() -> None:
    plain, erasing = DigitsDataModule(**DIGITS), DigitsDataModule(**DIGITS, random_erasing=0.5)
    batch = first_batch(plain, "train")
    x, _ = on_device(plain, batch, train=True)
    x_erased, _ = on_device(erasing, batch, train=True)
    erased = 0
    for before, after in zip(x, x_erased):
        changed = (before != after).any(0)
        if not changed.any():
            continue
        erased += 1
        rows, cols = changed.any(1).nonzero().squeeze(1), changed.any(0).nonzero().squeeze(1)
        box = after[:, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert (box == 0).all()  # one rectangle of the mean colour; every pixel outside it is unchanged
        assert box[0].numel() >= 0.02 * 32 * 32 * 0.9  # at least RandomErasing's smallest area, less rounding
    assert 0.25 * len(x) < erased < 0.75 * len(x)


def test_mixup_blends_each_image_with_its_neighbour_and_labels_alike_without_smoothing() -> None:
    plain, mixing = DigitsDataModule(**DIGITS), DigitsDataModule(**DIGITS, mixup_alpha=0.4)
    batch = first_batch(plain, "train")
    x, y = on_device(plain, batch, train=True)
    x_mixed, targets = on_device(mixing, batch, train=True)
    one_hot = F.one_hot(y, 10).float()
    k = int((y != y.roll(1)).nonzero()[0])
    lam = float(targets[k, y[k]])
    assert 0 < lam < 1
    assert torch.allclose(targets, lam * one_hot + (1 - lam) * one_hot.roll(1, 0))  # exact zeros elsewhere: unsmoothed
    assert torch.allclose(x_mixed, lam * x + (1 - lam) * x.roll(1, 0), atol=1e-5)


def test_cutmix_pastes_one_box_from_the_neighbour_and_weights_labels_by_area() -> None:
    plain, mixing = DigitsDataModule(**DIGITS), DigitsDataModule(**DIGITS, cutmix_alpha=1.0)
    batch = first_batch(plain, "train")
    x, y = on_device(plain, batch, train=True)
    x_mixed, targets = on_device(mixing, batch, train=True)
    pasted = (x_mixed != x).any(1).any(0)
    rows, cols = pasted.any(1).nonzero().squeeze(1), pasted.any(0).nonzero().squeeze(1)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[top:bottom, left:right] = True
    assert torch.equal(x_mixed, torch.where(inside, x.roll(1, 0), x))
    lam = 1 - float(inside.sum()) / (32 * 32)
    one_hot = F.one_hot(y, 10).float()
    assert torch.allclose(targets, lam * one_hot + (1 - lam) * one_hot.roll(1, 0))


def test_mixup_and_cutmix_together_pick_one_per_batch() -> None:
    plain, mixing = DigitsDataModule(**DIGITS), DigitsDataModule(**DIGITS, mixup_alpha=0.4, cutmix_alpha=1.0)
    batch = first_batch(plain, "train")
    whole_image_changed = []
    for seed in range(12):
        x, _ = on_device(plain, batch, train=True, seed=seed)
        x_mixed, _ = on_device(mixing, batch, train=True, seed=seed)
        cut = bool(((x_mixed == x) | (x_mixed == x.roll(1, 0))).all())  # cutmix: each pixel from one image
        whole_image_changed.append(not cut)  # mixup: blends of both where the two differ
    assert any(whole_image_changed) and not all(whole_image_changed)


def test_mixed_targets_get_label_smoothing_once_and_train_accuracy_counts_the_dominant_label() -> None:
    dm = DigitsDataModule(**DIGITS, mixup_alpha=0.4)
    x, targets = on_device(dm, first_batch(dm, "train"), train=True)
    module = FineTuneModule({"name": "b0", "pretrained": None}, num_classes=10, label_smoothing=0.1).eval()
    with torch.no_grad():
        loss = module.training_step((x, targets), batch_idx=1)
        logits = module(x)
    smoothed = targets * 0.9 + 0.1 / 10
    assert torch.allclose(loss, -(smoothed * logits.log_softmax(1)).sum(1).mean(), atol=1e-6)
    dominant = (logits.argmax(1) == targets.argmax(1)).float().mean()
    assert torch.allclose(module.train_acc.compute(), dominant)


def test_keys_are_listed_in_every_data_option_and_bad_values_are_one_line_errors(tmp_path: Path) -> None:
    overrides = ["data.auto_augment=trivialaugment", "data.random_erasing=0.25", "data.mixup_alpha=0.2",
                 "data.cutmix_alpha=1.0"]
    for option in group_options("data"):  # no `+` needed: each option lists the keys
        data = compose_config([f"data={option}", *overrides], tmp_path).data
        values = (data.auto_augment, data.random_erasing, data.mixup_alpha, data.cutmix_alpha)
        assert values == ("trivialaugment", 0.25, 0.2, 1.0)
    validate_config(compose_config(["data=digits", *overrides, "trainer=cpu", "trainer.ema_decay=0.999",
                                    "trainer.accumulate_grad_batches=4"], tmp_path))
    bad = {
        "data.auto_augment=autoaugment": "data.auto_augment must be null or one of randaugment, trivialaugment, "
                                         "got 'autoaugment'",
        "data.random_erasing=1.5": "data.random_erasing must be a number in [0, 1], got 1.5",
        "data.mixup_alpha=-0.2": "data.mixup_alpha must be a number >= 0, got -0.2",
        "trainer.ema_decay=1.0": "trainer.ema_decay must be",
        "trainer.accumulate_grad_batches=0": "trainer.accumulate_grad_batches must be an integer >= 1, got 0",
        "finetune.cache_features=true": "finetune.cache_features=true trains on features of unaugmented images, "
                                        "which data.mixup_alpha would change",
    }
    for override, message in bad.items():
        extra = ["data.augment=false", "finetune=frozen", "data.mixup_alpha=0.2"] if "cache" in override else []
        with pytest.raises(ConfigError) as info:
            validate_config(compose_config(["data=digits", "trainer=cpu", *extra, override], tmp_path))
        assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"^data.random_erasing must be a number in \[0, 1\], got 2"):
        DigitsDataModule(random_erasing=2)


# --------------------------------------------------------------------------- through the trainer


class Record(L.Callback):
    """What the network gets and which weights it runs with, batch by batch (these hooks run before the EMA's)."""

    def __init__(self) -> None:
        self.train_targets: list[Tensor] = []
        self.val_images: list[Tensor] = []
        self.raw: list[Tensor] = []
        self.validated: list[Tensor] = []
        self.tested: list[Tensor] = []
        self.steps = 0
        self.schedule_total = 0

    @staticmethod
    def _head(pl_module: L.LightningModule) -> Tensor:
        return pl_module.model.classifier.weight.detach().clone()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.train_targets.append(batch[1].clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.raw.append(self._head(pl_module))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.val_images.append(batch[0].clone())
        self.validated.append(self._head(pl_module))

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.tested.append(self._head(pl_module))

    def on_train_end(self, trainer, pl_module) -> None:
        self.steps = trainer.global_step
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        self.schedule_total = (scheduler.lr_lambdas[0].total, scheduler.last_epoch)


class StopAfterFirstEpoch(L.Callback):
    """Ends the fit after epoch 0 and its checkpoint, as a killed run would; the config (and schedule) stay the same."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True


def run(tmp_path: Path, name: str, *overrides: str, stop: bool = False) -> tuple[dict, Record]:
    record = Record()
    callbacks = [record, StopAfterFirstEpoch()] if stop else [record]
    return fit(compose_config([*FIT, *overrides], tmp_path / name), extra_callbacks=callbacks), record


@pytest.mark.slow  # 50-230 s on the 2-core machine: in make test-all, out of make test
def test_fit_with_every_key_trains_on_mixed_targets_and_validates_on_the_same_images(tmp_path: Path) -> None:
    every = ["data.auto_augment=randaugment", "data.random_erasing=0.5", "data.mixup_alpha=0.2",
             "data.cutmix_alpha=1.0", "trainer.max_epochs=1", "trainer.limit_train_batches=2"]
    _, plain = run(tmp_path, "plain", "trainer.max_epochs=1", "trainer.limit_train_batches=2")
    _, augmented = run(tmp_path, "every", *every)
    assert all(y.ndim == 1 for y in plain.train_targets)
    assert all(y.shape == (32, 10) and torch.allclose(y.sum(1), torch.ones(32)) for y in augmented.train_targets)
    assert len(plain.val_images) == len(augmented.val_images) == 2
    assert all(torch.equal(a, b) for a, b in zip(plain.val_images, augmented.val_images))


@pytest.mark.slow  # 50-230 s on the 2-core machine: in make test-all, out of make test
def test_ema_weights_are_validated_saved_and_tested_raw_weights_kept_for_resuming(tmp_path: Path) -> None:
    metrics, record = run(tmp_path, "ema", "trainer.max_epochs=1", "trainer.limit_train_batches=4",
                          "trainer.ema_decay=0.9")
    expected = record.raw[0]
    for raw in record.raw[1:]:  # torch.optim.swa_utils.get_ema_avg_fn, starting from the first step's weights
        expected = 0.9 * expected + (1 - 0.9) * raw
    checkpoint = torch.load(metrics["best_checkpoint"], weights_only=True)
    key = "model.classifier.weight"
    saved, current = checkpoint["state_dict"][key], checkpoint["current_model_state"][key]
    assert torch.allclose(saved, expected, rtol=0, atol=1e-7) and not torch.allclose(saved, record.raw[-1])
    assert torch.equal(current, record.raw[-1])
    assert all(torch.equal(w, saved) for w in record.validated + record.tested)  # what chose the best, what was tested
    evaluated = FineTuneModule.from_checkpoint(metrics["best_checkpoint"])  # what finetune-evaluate scores
    assert torch.equal(evaluated.model.classifier.weight, saved)


@pytest.mark.slow  # 50-230 s on the 2-core machine: in make test-all, out of make test
def test_resume_with_ema_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    ema = ("trainer.max_epochs=2", "trainer.limit_train_batches=3", "trainer.ema_decay=0.9", "test_after_fit=false")
    run(tmp_path, "whole", *ema)
    run(tmp_path, "stopped", *ema, stop=True)
    stopped = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    assert torch.load(stopped, weights_only=True)["epoch"] == 0
    run(tmp_path, "resumed", *ema, f"ckpt_path={stopped}")
    whole = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    for part in ("state_dict", "current_model_state", "averaging_state"):
        assert whole[part].keys() == resumed[part].keys()
        assert [k for k in whole[part] if not torch.equal(whole[part][k], resumed[part][k])] == []


@pytest.mark.slow  # 50-230 s on the 2-core machine: in make test-all, out of make test
@pytest.mark.parametrize(("accumulate", "steps"), [(1, 10), (2, 6)])
def test_accumulation_steps_the_optimizer_once_per_n_batches_and_the_schedule_matches(
    tmp_path: Path, accumulate: int, steps: int
) -> None:
    _, record = run(tmp_path, str(accumulate), "trainer.max_epochs=2", "trainer.limit_train_batches=5",
                    f"trainer.accumulate_grad_batches={accumulate}", "test_after_fit=false")
    assert record.steps == steps  # 5 batches an epoch: 5 steps, or 3 (the last after one batch) with n=2
    assert record.schedule_total == (steps, steps)  # cosine length and the steps the scheduler took


@pytest.mark.parametrize("key, value", [("mixup_alpha", 0.2), ("cutmix_alpha", 1.0), ("random_erasing", 0.25),
                                        ("auto_augment", "randaugment")])
def test_cached_features_refuse_training_only_augmentation_from_python_too(key: str, value: object) -> None:
    """Without the check, the cached head would silently train without the augmentation asked for."""
    source = DigitsDataModule(num_workers=0, resolution=32, augment=False, **{key: value})
    with pytest.raises(ConfigError, match=f"trains on features of unaugmented images, which data.{key} would change"):
        CachedFeatureDataModule(source)
