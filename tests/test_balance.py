"""Imbalance and few-shot: `data.balance` (class-balanced sampling or a class-weighted loss), `data.examples_per_class`,
and balanced accuracy in reports and validation.

The training runs are the real `finetune` on a real image folder: scikit-learn's digits as PNGs, with
classes 5-9 cut to 2 training images each (42 for classes 0-4); validation and test stay balanced.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score
from sklearn.utils.class_weight import compute_class_weight

from finetune.configuration.checks import validate_config
from finetune.datamodules import DigitsDataModule, ImageFolderDataModule
from finetune.datamodules.base import EpochSampler
from finetune.errors import ConfigError
from finetune.commands.evaluate import main as evaluate_main
from finetune.training.module import FineTuneModule
from finetune.analysis.reports import markdown_report, report_metrics, summarize
from finetune.build import fit
from helpers import compose_config, write_digits_folder
from test_chaos import POINTS, Runs, assert_same, outcome, resume_command, wait

MINORITY = range(5, 10)
#: Training images left in each minority class.
FEW = 2
RUN = ["model=lite0", "model.resolution=32", "data=imagefolder", "data.num_workers=0", "data.batch_size=16",
       "finetune=frozen", "optim.lr=0.03", "trainer=cpu", "trainer.max_epochs=4", "trainer.enable_progress_bar=false",
       "logger=csv"]


def cut_minority(train: Path, keep: int) -> None:
    for label in MINORITY:
        for file in sorted((train / str(label)).iterdir())[keep:]:
            file.unlink()


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_digits_folder(tmp_path_factory.mktemp("imbalanced"), per_class=60, size=32)  # 42 / 9 / 9 a class
    cut_minority(root / "train", FEW)
    return root


@pytest.fixture(scope="module")
def runs(imbalanced: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """One run per data.balance, same seed and settings otherwise: (output folder, metrics.json)."""
    results = {}
    for balance in ("none", "sampler", "loss"):
        out = tmp_path_factory.mktemp(balance)
        results[balance] = out, fit(compose_config([*RUN, f"data.root={imbalanced}", f"data.balance={balance}"], out))
    return results


def test_balancing_raises_macro_recall_on_an_imbalanced_folder(runs: dict) -> None:
    recall = {balance: metrics["test/recall_macro"] for balance, (_, metrics) in runs.items()}
    print("test macro recall:", recall)
    assert recall["sampler"] >= recall["none"] + 0.08, recall
    assert recall["loss"] >= recall["none"] + 0.03, recall


def test_loss_weights_are_sklearns_balanced_class_weights_and_travel_in_the_checkpoint(runs: dict, imbalanced: Path) -> None:
    labels = np.repeat(np.arange(10), [42] * 5 + [FEW] * 5)
    expected = compute_class_weight("balanced", classes=np.arange(10), y=labels)
    out, metrics = runs["loss"]
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    np.testing.assert_allclose(last["hyper_parameters"]["class_weights"], expected, rtol=1e-6)
    assert not any("criterion" in key for key in last["state_dict"])  # weight files hold the network only
    module = FineTuneModule.from_checkpoint(metrics["best_checkpoint"])  # as finetune-evaluate rebuilds it
    np.testing.assert_allclose(module.criterion.weight.numpy(), expected, rtol=1e-6)
    for balance in ("none", "sampler"):
        ckpt = torch.load(runs[balance][0] / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["hyper_parameters"]["class_weights"] is None


def test_balanced_accuracy_of_evaluate_and_of_validation_equals_sklearns(runs: dict, imbalanced: Path, tmp_path: Path) -> None:
    out, metrics = runs["sampler"]
    last = out / "checkpoints" / "last.ckpt"
    evaluate_main([str(last), str(imbalanced / "val"), "--output", str(tmp_path), "--num-workers", "0"])
    report = json.loads((tmp_path / "report.json").read_text())
    with (tmp_path / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    expected = balanced_accuracy_score([r["true"] for r in rows], [r["predicted"] for r in rows])
    assert 0.2 < expected < 0.95  # a value a wrong average would change
    assert report["balanced_accuracy"] == pytest.approx(expected, abs=1e-6)
    assert f"| balanced accuracy (mean recall per class) | {expected:.4f} |" in (tmp_path / "report.md").read_text()
    with next(out.rglob("metrics.csv")).open() as f:
        logged = [float(r["val/balanced_acc"]) for r in csv.DictReader(f) if r.get("val/balanced_acc")]
    assert len(logged) == 4 and logged[-1] == pytest.approx(expected, abs=1e-6)  # last epoch's = last.ckpt's
    assert metrics["test/balanced_acc"] == pytest.approx(metrics["test/recall_macro"], abs=1e-6)


def test_report_balanced_accuracy_equals_sklearn_on_imbalanced_labels() -> None:
    rng = np.random.default_rng(0)
    labels = rng.choice(6, size=500, p=[0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    logits = torch.randn(500, 6) + 2.0 * torch.nn.functional.one_hot(torch.from_numpy(labels), 6)
    logits[:, 0] += 1.0  # a classifier leaning to the majority class: its balanced accuracy is below its accuracy
    metrics = report_metrics(6)
    for batch in range(0, 500, 64):
        metrics.update(logits[batch:batch + 64].softmax(-1), torch.from_numpy(labels[batch:batch + 64]))
    report = summarize(metrics.compute(), [str(i) for i in range(6)])
    expected = balanced_accuracy_score(labels, logits.argmax(1).numpy())
    assert abs(expected - report["accuracy"]) > 0.02  # imbalanced enough that the two differ
    assert report["balanced_accuracy"] == pytest.approx(expected, abs=1e-6)
    assert f"{expected:.4f}" in markdown_report(report)


def test_balanced_sampler_draws_each_class_equally_shards_and_resumes_exactly() -> None:
    labels = np.repeat(np.arange(3), [100, 10, 2])

    class Keyed(torch.utils.data.Dataset):
        seeded_by_epoch = True

        def __len__(self) -> int:
            return len(labels)

    def sampler(**kwargs) -> EpochSampler:
        return EpochSampler(Keyed(), num_replicas=kwargs.pop("replicas", 1), rank=kwargs.pop("rank", 0), seed=3,
                            labels=labels, **kwargs)

    draws = []
    for epoch in range(200):
        one = sampler(epoch=epoch)
        keys = list(one)
        assert len(keys) == len(labels) == len(one)
        assert keys == list(sampler(epoch=epoch))  # a function of (seed, epoch)
        assert keys[40:] == list(sampler(epoch=epoch, skip=40))  # a resumed epoch continues where it stopped
        shards = [list(sampler(epoch=epoch, replicas=2, rank=rank)) for rank in range(2)]
        assert keys[0::2] == shards[0] and keys[1::2] == shards[1]  # DDP: every rank its own share of one draw
        seen = {}
        for index, key_epoch in keys:  # a repeat in the same epoch is keyed apart (its own augmentation)
            assert key_epoch & 0xFFFFFFFF == epoch and key_epoch >> 32 == seen.get(index, 0)
            seen[index] = seen.get(index, 0) + 1
        draws += [index for index, _ in keys]
    frequency = np.bincount(draws, minlength=len(labels)) / len(draws)
    expected = 1 / (3 * np.bincount(labels)[labels])  # probability proportional to 1 / class count
    class_share = np.bincount(labels[draws]) / len(draws)
    np.testing.assert_allclose(class_share, 1 / 3, atol=0.01)
    np.testing.assert_allclose(frequency[labels > 0], expected[labels > 0], rtol=0.15)
    assert list(sampler(epoch=1)) != list(sampler(epoch=0))


def test_an_image_drawn_twice_in_an_epoch_gets_two_crops(imbalanced: Path) -> None:
    data = ImageFolderDataModule(root=str(imbalanced), num_workers=0, balance="sampler", resolution=32)
    dataset = data.dataset("train")
    keys = list(data.train_dataloader().sampler)
    index, _ = next(key for key in keys if sum(k[0] == key[0] for k in keys) > 1)
    crops = [dataset[key][0] for key in keys if key[0] == index]
    assert len(crops) > 1 and not torch.equal(crops[0], crops[1])
    assert torch.equal(crops[0], dataset[next(key for key in keys if key[0] == index)][0])  # yet each is seeded


@pytest.mark.slow  # make test's time; mid-epoch resume is test_chaos.py's, the sampler's shards and draws stay
def test_a_run_stopped_mid_epoch_with_the_balanced_sampler_resumes_exactly(tmp_path: Path) -> None:
    runs = Runs(tmp_path)
    cut_minority(runs.data / "train", 3)  # 35 + 15 images: 4 batches of 16 an epoch
    uninterrupted = runs.start(tmp_path / "whole", "data.balance=sampler")
    stopped = runs.start(tmp_path / "stopped", "data.balance=sampler", signal_at=",".join(map(str, POINTS["mid-epoch"])),
                         sent="SIGTERM")
    status, err = wait(stopped)
    assert status == 143, err[-3000:]
    resumed = runs.start(tmp_path / "stopped", command=resume_command(err))
    for run in (resumed, uninterrupted):
        status, err = wait(run)
        assert status == 0, err[-3000:]
    assert_same(outcome(tmp_path / "stopped"), outcome(tmp_path / "whole"))


def highest_hashes(names: list[str], count: int, split_seed: int = 0) -> set[str]:
    """The `count` names with the highest 64-bit BLAKE2b salted by split_seed, recomputed here from hashlib."""
    def value(name: str) -> int:
        digest = hashlib.blake2b(name.encode(), digest_size=8, salt=split_seed.to_bytes(16, "little")).digest()
        return int.from_bytes(digest, "little")
    return set(sorted(names, key=value)[-count:])


def chosen(root: Path, **kwargs) -> dict[str, set[str]]:
    data = ImageFolderDataModule(root=str(root), num_workers=0, **kwargs)
    return {split: {str(path.relative_to(path.parents[1])) for path in data.dataset(split).files}
            for split in ("train", "val", "test")}


def test_examples_per_class_takes_the_same_k_for_any_seed_and_when_files_are_added(tmp_path: Path) -> None:
    root = write_digits_folder(tmp_path / "digits", per_class=20, size=16)  # 14 training images a class
    every = chosen(root)
    few = chosen(root, examples_per_class=4)
    assert few["val"] == every["val"] and few["test"] == every["test"]  # validation and test untouched
    for label in range(10):
        names = sorted(name for name in every["train"] if name.startswith(f"{label}/"))
        assert {name for name in few["train"] if name.startswith(f"{label}/")} == highest_hashes(names, 4)
    assert chosen(root, examples_per_class=4, seed=123)["train"] == few["train"]
    assert chosen(root, examples_per_class=4, split_seed=1)["train"] != few["train"]
    # an added file joins its class's 4 only if it hashes above the 4th, replacing it; other classes never change
    source = next((root / "train" / "3").iterdir())
    for n in range(12):
        shutil.copy(source, root / "train" / "3" / f"added{n}.png")
    after = chosen(root, examples_per_class=4)["train"]
    names = [name for name in every["train"] if name.startswith("3/")] + [f"3/added{n}.png" for n in range(12)]
    assert {name for name in after if name.startswith("3/")} == highest_hashes(names, 4)
    assert {name for name in after if not name.startswith("3/")} == {name for name in few["train"] if not name.startswith("3/")}
    assert 0 < len(after - few["train"]) < 4  # some added files hash higher, and not all
    with pytest.warns(UserWarning, match="10 of 10 classes have fewer training images"):
        assert chosen(root, examples_per_class=100)["train"] == chosen(root)["train"]


def test_examples_per_class_on_in_memory_digits_leaves_validation_and_test_alone() -> None:
    full, few = DigitsDataModule(), DigitsDataModule(examples_per_class=3)
    assert np.bincount(few.dataset("train").labels.numpy()).tolist() == [3] * 10
    for split in ("val", "test"):
        assert torch.equal(few.dataset(split).images, full.dataset(split).images)


def test_resume_with_another_examples_per_class_or_balance_is_refused_in_one_line(tmp_path: Path) -> None:
    root = write_digits_folder(tmp_path / "digits", per_class=10, size=16)
    first = [*RUN, f"data.root={root}", "data.examples_per_class=3", "trainer.max_epochs=1", "test_after_fit=false"]
    fit(compose_config(first, tmp_path / "first"))
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    cases = {"data.examples_per_class=4": "was trained with data.examples_per_class=3, this run has data.examples_per_class=4",
             "data.examples_per_class=null": "data.examples_per_class=3, this run has data.examples_per_class=null",
             "data.balance=sampler": "was trained with data.balance=none, this run has data.balance=sampler"}
    for override, message in cases.items():
        overrides = [*first, "trainer.max_epochs=2", f"ckpt_path={last}", override]
        with pytest.raises(ConfigError, match=message) as refused:
            fit(compose_config(overrides, tmp_path / override.replace("=", "-")))
        assert "\n" not in str(refused.value)


@pytest.mark.parametrize(("override", "message"), [
    ("data.balance=oversample", "data.balance must be one of none, sampler, loss, got 'oversample'"),
    ("data.examples_per_class=0", "data.examples_per_class must be null or an integer >= 1, got 0"),
])
def test_bad_values_are_refused_in_one_line(override: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_config(["data=digits", override], tmp_path))


def test_probe_refuses_a_balance_it_would_ignore(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.balance=loss does not apply to finetune=probe"):
        validate_config(compose_config(["data=digits", "finetune=probe", "data.augment=false", "data.balance=loss"], tmp_path))
