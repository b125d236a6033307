"""Validation splits that stay put: independent of the training seed, stable when files come and go, recorded in checkpoints."""

from __future__ import annotations

import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from finetune.datamodules import CIFAR10DataModule, ImageFolderDataModule
from finetune.datamodules.splits import check_same_data, stable_split
from finetune.errors import ConfigError
from helpers import write_digits_folder
from test_datamodules import write_cifar10

PER_CLASS = 30


@pytest.fixture()
def digits(tmp_path: Path) -> Path:
    """Real handwritten digits, one folder per class, 30 PNGs each: the single layout, val carved out."""
    return write_digits_folder(tmp_path / "digits", per_class=PER_CLASS, splits=(("", 1.0),))


def folder_split(root: Path, **kwargs: object) -> tuple[set[str], set[str]]:
    """(train, val) as paths relative to `root`."""
    dm = ImageFolderDataModule(root=str(root), num_workers=0, **kwargs)
    dm.setup("fit")
    return tuple({p.relative_to(root).as_posix() for p in dm.dataset(split).files} for split in ("train", "val"))


def test_the_validation_split_is_the_same_for_every_training_seed(digits: Path) -> None:
    train, val = folder_split(digits, seed=42)
    assert folder_split(digits, seed=43) == (train, val)
    on_disk = {p.relative_to(digits).as_posix() for p in digits.rglob("*.png")}
    assert train | val == on_disk and not train & val
    assert Counter(path.split("/")[0] for path in val) == {str(digit): 6 for digit in range(10)}  # 20% of each class
    other_train, other_val = folder_split(digits, split_seed=1)  # the setting that does choose it
    assert other_val != val and len(other_val) == len(val)


def test_adding_or_removing_a_file_moves_at_most_one_other_file_in_its_class_and_one_elsewhere(digits: Path) -> None:
    _, before = folder_split(digits)
    shutil.copy(digits / "3" / "0.png", digits / "3" / "extra.png")
    _, added = folder_split(digits)
    (digits / "7" / "5.png").unlink()
    _, removed = folder_split(digits)
    for old, new, changed in ((before, added, "3/extra.png"), (added, removed, "7/5.png")):
        moved = Counter(path.split("/")[0] for path in (old ^ new) - {changed})
        assert sum(moved.values()) <= 2 and all(count == 1 for count in moved.values()), moved


def test_every_class_validates_in_proportion_even_with_two_images(tmp_path: Path) -> None:
    sizes = [2] * 25 + [3, 7, 13, 50, 101]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    keys = [f"class{label}/{i}.jpg".encode() for i, label in enumerate(labels)]
    for fraction in (0.1, 0.2, 0.5):
        train, val = stable_split(keys, labels, fraction, split_seed=3)
        assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
        assert len(val) == round(fraction * len(labels))
        per_class = np.bincount(labels[val], minlength=len(sizes))
        assert np.all(np.abs(per_class - fraction * np.array(sizes)) < 1)  # each class within one of its share
        assert per_class[:25].sum() > 0  # the 2-image classes validate too
    pairs = np.repeat(np.arange(500), 2)  # 500 classes of 2 images: rounding per class would validate on nothing
    _, val = stable_split([b"%d/%d.jpg" % (label, i) for i, label in enumerate(pairs)], pairs, 0.2)
    assert len(val) == 200 and len(set(pairs[val])) == 200
    shuffled = np.random.default_rng(0).permutation(len(labels))  # the order of the list does not matter
    _, val = stable_split([keys[i] for i in shuffled], labels[shuffled], 0.2, split_seed=3)
    assert sorted(shuffled[val]) == sorted(stable_split(keys, labels, 0.2, split_seed=3)[1])


def _official_train(root: Path) -> tuple[list[bytes], list[int]]:
    """The official train set's images (3072 channel-major bytes each) and labels, read from the pickles directly."""
    images, labels = [], []
    for batch in range(1, 6):
        with open(root / "cifar-10-batches-py" / f"data_batch_{batch}", "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        images += [row.tobytes() for row in entry["data"]]
        labels += entry["labels"]
    return images, labels


def test_cifar_validation_split_is_independent_of_the_training_seed(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    images, labels = _official_train(tmp_path)
    position = {image: i for i, image in enumerate(images)}
    assert len(position) == len(images) == 100  # each image is found at one place

    def val(**kwargs: object) -> list[int]:
        dm = CIFAR10DataModule(root=str(tmp_path), num_workers=0, val_fraction=0.2, **kwargs)
        held_out, trained = ([position[image.numpy().tobytes()] for image in dm.dataset(split).images]
                             for split in ("val", "train"))
        assert sorted(held_out + trained) == list(range(100))
        return sorted(held_out)

    held_out = val(seed=42)
    assert val(seed=43) == held_out and val(split_seed=1) != held_out
    assert Counter(labels[i] for i in held_out) == {label: 2 for label in range(10)}


# --------------------------------------------------------------------------- what checkpoints record


def identity(root: Path, **kwargs: object) -> dict:
    return ImageFolderDataModule(root=str(root), num_workers=0, **kwargs).data_identity()


def refusal(recorded: dict, current: dict) -> str:
    with pytest.raises(ConfigError) as refused:
        check_same_data(recorded, current, "ckpt_path 'last.ckpt'")
    message = str(refused.value)
    assert message.startswith("ckpt_path 'last.ckpt' was trained on other data: ") and "\n" not in message
    assert message.endswith("or start fresh with ckpt_path=null")
    return message


def test_a_copy_of_the_data_or_another_seed_is_the_same_data(digits: Path, tmp_path: Path) -> None:
    recorded = identity(digits, seed=1)
    assert recorded["class_names"] == [str(digit) for digit in range(10)]
    assert {split: recorded["splits"][split]["count"] for split in ("train", "val")} == {"train": 240, "val": 60}
    copy = shutil.copytree(digits, tmp_path / "elsewhere" / "digits")
    for current in (identity(digits, seed=2), identity(copy)):
        assert current == recorded
        check_same_data(recorded, current, "ckpt_path 'last.ckpt'")


def test_a_renamed_class_folder_is_refused_naming_it(digits: Path) -> None:
    recorded = identity(digits)
    (digits / "3").rename(digits / "three")  # sorts last: every class after 3 would change label
    message = refusal(recorded, identity(digits))
    assert "class '3' is gone and class 'three' is new (10 classes then, 10 now)" in message


def test_an_added_file_or_another_split_seed_is_refused_naming_the_split(digits: Path) -> None:
    recorded = identity(digits)
    assert "other images or labels" in refusal(recorded, identity(digits, split_seed=7))
    shutil.copy(digits / "3" / "0.png", digits / "3" / "extra.png")
    message = refusal(recorded, identity(digits))
    assert "split held 240 images, it holds 241 now" in message or "split held 60 images, it holds 61 now" in message


def test_class_lists_that_differ_in_order_or_length_are_named() -> None:
    split = {"train": {"count": 1, "digest": "a"}}
    then = {"class_names": ["cat", "dog", "fox"], "splits": split}
    assert "class 0 was 'cat' and is 'dog' now" in refusal(then, {"class_names": ["dog", "cat", "fox"], "splits": split})
    assert "class 'fox' is gone (3 classes then, 2 now)" in refusal(then, {"class_names": ["cat", "dog"], "splits": split})
    more = {"class_names": ["ant", "bee", "cat", "dog", "fox"], "splits": split}
    assert "class 'ant' is new, 1 more changed (3 classes then, 5 now)" in refusal(then, more)


def test_cifar_identity_ignores_the_seed_and_follows_split_seed(tmp_path: Path) -> None:
    write_cifar10(tmp_path)

    def of(**kwargs: object) -> dict:
        return CIFAR10DataModule(root=str(tmp_path), num_workers=0, val_fraction=0.2, **kwargs).data_identity()

    recorded = of(seed=1)
    assert of(seed=2) == recorded and recorded["splits"]["val"]["count"] == 20
    assert "its train split holds 80 images as before, but other images" in refusal(recorded, of(split_seed=5))
