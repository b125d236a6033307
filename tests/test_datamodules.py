"""Datamodules against tiny copies of each dataset written in its real on-disk format."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import scipy.io
import skimage.data
import torch
from PIL import Image
from torch import nn

from finetune.datamodules import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    CorruptImageError,
    DatasetNotFoundError,
    DigitsDataModule,
    Flowers102DataModule,
    ImageFolderDataModule,
)
from finetune.datamodules.base import EpochSampler, random_translate_flip, stratified_split
from finetune.datamodules.cifar import DeviceBatches

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- writers


class _Py2Str(bytes):
    """A Python 2 `str`, the type the real CIFAR pickles (written by Python 2) are made of."""


class _Py2Pickler(pickle._Pickler):
    """Writes `_Py2Str` as BINSTRING, so it loads as `str` under encoding='latin1' (what
    torchvision uses) and as `bytes` under encoding='bytes' (the b'data' keys of the
    dataset's documentation), exactly like the real files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + bytes(obj))
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + bytes(obj))

    dispatch[_Py2Str] = _save_py2_str


def _dump_py2(obj: object, path: Path) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def _py2_dict(**entries: object) -> dict:
    return {_Py2Str(key.encode()): value for key, value in entries.items()}


def _cifar_batch(rng: np.random.Generator, n: int, labels: np.ndarray, label_key: str, **extra: object) -> dict:
    return _py2_dict(
        data=rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        filenames=[_Py2Str(f"img_{i:05d}.png".encode()) for i in range(n)],
        **{label_key: labels.tolist()},
        **extra,
    )


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 50) -> Path:
    """`cifar-100-python/{train,test,meta}` as in the real archive; 2 train images per class."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = np.arange(n) % 100
        batch = _cifar_batch(rng, n, fine, "fine_labels", coarse_labels=(fine // 5).tolist())
        batch[_Py2Str(b"batch_label")] = _Py2Str(f"{name}ing batch 1 of 1".encode())
        _dump_py2(batch, folder / name)
    meta = _py2_dict(
        fine_label_names=[_Py2Str(f"fine_{i}".encode()) for i in range(100)],
        coarse_label_names=[_Py2Str(f"coarse_{i}".encode()) for i in range(20)],
    )
    _dump_py2(meta, folder / "meta")
    return folder


def write_cifar10(root: Path, per_batch: int = 20) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = _cifar_batch(rng, per_batch, np.arange(per_batch) % 10, "labels")
        batch[_Py2Str(b"batch_label")] = _Py2Str(name.encode())
        _dump_py2(batch, folder / name)
    names = [_Py2Str(n.encode()) for n in "airplane automobile bird cat deer dog frog horse ship truck".split()]
    _dump_py2(_py2_dict(label_names=names, num_cases_per_batch=10000, num_vis=3072), folder / "batches.meta")
    return folder


_PHOTO = skimage.data.astronaut()


def _photo_crop(seed: int, size: tuple[int, int]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = size
    y, x = rng.integers(0, 512 - h), rng.integers(0, 512 - w)
    return _PHOTO[y : y + h, x : x + w]


def write_flowers(root: Path, labels: list[int], splits: dict[str, list[int]]) -> Path:
    """`flowers-102/{jpg/image_%05d.jpg, imagelabels.mat, setid.mat}`; labels 1-based as in the real files."""
    folder = root / "flowers-102"
    (folder / "jpg").mkdir(parents=True)
    for image_id in range(1, len(labels) + 1):
        size = (60 + 7 * image_id, 90 - 3 * image_id)
        Image.fromarray(_photo_crop(image_id, size)).save(folder / "jpg" / f"image_{image_id:05d}.jpg", quality=90)
    scipy.io.savemat(folder / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    scipy.io.savemat(folder / "setid.mat", {key: np.array([ids], dtype=np.uint16) for key, ids in splits.items()})
    return folder


def write_images(folder: Path, n: int, seed: int, exts: tuple[str, ...] = (".jpg",)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i:03d}{exts[i % len(exts)]}"
        Image.fromarray(_photo_crop(seed * 100 + i, (40 + i, 50))).save(path)
        paths.append(path)
    return paths


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def first_batch(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(loader))


def assert_worker_batch(images: torch.Tensor, labels: torch.Tensor, size: int, batch: int) -> None:
    assert images.dtype == torch.uint8 and images.shape == (batch, 3, size, size)
    assert labels.dtype == torch.int64 and labels.shape == (batch,)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar100")
    write_cifar100(root)
    return root


@pytest.fixture(scope="module")
def flowers_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("flowers")
    labels = [1, 1, 2, 2, 3, 3, 5, 5, 102, 102]
    write_flowers(root, labels, {"trnid": [1, 3, 5, 7], "valid": [2, 4, 9], "tstid": [6, 8, 10]})
    return root


@pytest.fixture()
def folder_root(tmp_path: Path) -> Path:
    """Split layout with mixed extensions, upper-case suffixes and a stray non-image file."""
    root = tmp_path / "pets"
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        write_images(root / split / "cat", n, seed=1, exts=(".jpg", ".PNG", ".bmp"))
        write_images(root / split / "dog", n, seed=2, exts=(".jpeg", ".webp", ".TIF"))
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture()
def single_root(tmp_path: Path) -> Path:
    root = tmp_path / "shapes"
    for index, name in enumerate(("circle", "square", "triangle")):
        write_images(root / name, 10, seed=index)
    return root


# --------------------------------------------------------------------------- CIFAR


def test_cifar_pickles_match_the_real_format(cifar100_root: Path) -> None:
    with open(cifar100_root / "cifar-100-python" / "train", "rb") as f:
        as_bytes = pickle.load(f, encoding="bytes")
    assert {b"data", b"fine_labels", b"coarse_labels", b"filenames"} <= set(as_bytes)
    assert as_bytes[b"data"].shape == (200, 3072) and as_bytes[b"data"].dtype == np.uint8


def test_cifar100_splits_classes_and_pixels(cifar100_root: Path) -> None:
    dm = CIFAR100DataModule(root=str(cifar100_root), num_workers=0, batch_size=16, resolution=64)
    assert dm.num_classes == 100 and dm.class_names[:2] == ["fine_0", "fine_1"]
    dm.setup("fit")
    train, val = dm.dataset("train"), dm.dataset("val")
    assert (len(train), len(val), len(dm.dataset("test"))) == (180, 20, 50)
    assert len(set(val.labels.tolist())) == 20  # stratified: 20 held-out images, 20 classes
    counts = torch.bincount(torch.cat([train.labels, val.labels]), minlength=100)
    assert counts.tolist() == [2] * 100

    images, labels = first_batch(dm.train_dataloader())
    assert_worker_batch(images, labels, 32, 16)

    # Channel-major rows of 1024 bytes, as documented for the python version.
    with open(cifar100_root / "cifar-100-python" / "test", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    test_images, test_labels = first_batch(dm.test_dataloader())
    expected = torch.from_numpy(raw[b"data"][:16].reshape(16, 3, 32, 32))
    assert torch.equal(test_images, expected)
    assert test_labels.tolist() == raw[b"fine_labels"][:16]


def test_cifar_val_fraction_zero_validates_on_test(cifar100_root: Path) -> None:
    dm = CIFAR100DataModule(root=str(cifar100_root), num_workers=0, val_fraction=0)
    assert len(dm.dataset("train")) == 200
    assert torch.equal(dm.dataset("val").images, dm.dataset("test").images)


def test_cifar_train_shuffle_is_seeded(cifar100_root: Path) -> None:
    def order(seed: int) -> list[int]:
        dm = CIFAR100DataModule(root=str(cifar100_root), num_workers=0, batch_size=200, seed=seed)
        return first_batch(dm.train_dataloader())[1].tolist()

    assert order(0) == order(0) != order(1)


def test_cifar10(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), num_workers=0, batch_size=8, val_fraction=0.2)
    assert dm.class_names[0] == "airplane" and dm.num_classes == 10
    assert (len(dm.dataset("train")), len(dm.dataset("val")), len(dm.dataset("test"))) == (80, 20, 20)
    assert_worker_batch(*first_batch(dm.val_dataloader()), 32, 8)


def test_cifar_device_augmentation(cifar100_root: Path) -> None:
    dm = CIFAR100DataModule(root=str(cifar100_root), num_workers=0, batch_size=32, resolution=48)
    images, _ = first_batch(dm.train_dataloader())
    torch.manual_seed(0)
    augmented = dm.device_transform(images, train=True)
    torch.manual_seed(0)
    assert torch.equal(augmented, dm.device_transform(images, train=True))  # seed_everything suffices
    assert not torch.equal(augmented, dm.device_transform(images, train=False))
    assert augmented.shape == (32, 3, 48, 48)

    plain = CIFAR100DataModule(root=str(cifar100_root), num_workers=0, augment=False, resolution=48)
    assert torch.equal(plain.device_transform(images, train=True), plain.device_transform(images, train=False))


def _epoch_batches(loader: object, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if loader.sampler is not None:
        loader.sampler.set_epoch(epoch)
    return list(loader)


def test_cifar_device_resident_gives_the_worker_path_batches(cifar100_root: Path) -> None:
    """Same seed and epoch: identical batches, including the short last one (180 = 5×32 + 20)."""
    kwargs = dict(root=str(cifar100_root), num_workers=0, batch_size=32, seed=7)
    workers = CIFAR100DataModule(device_resident=False, **kwargs)
    resident = CIFAR100DataModule(device_resident=True, **kwargs)
    assert resident.resident_device("train") == torch.device("cpu")  # no trainer: the CPU is the device
    worker_loader, resident_loader = workers.train_dataloader(), resident.train_dataloader()
    assert isinstance(resident_loader, DeviceBatches) and isinstance(worker_loader, torch.utils.data.DataLoader)
    assert len(resident_loader) == len(worker_loader) == 6

    orders = []
    for epoch in (0, 1, 5, 1):
        expected, got = _epoch_batches(worker_loader, epoch), _epoch_batches(resident_loader, epoch)
        assert [len(y) for _, y in got] == [32] * 5 + [20]
        for (xe, ye), (xg, yg) in zip(expected, got, strict=True):
            assert torch.equal(xe, xg) and torch.equal(ye, yg)
        orders.append(torch.cat([y for _, y in got]))
    assert not torch.equal(orders[0], orders[1]) and torch.equal(orders[1], orders[3])  # a function of the epoch

    for split in ("val", "test"):
        plain = list(getattr(workers, f"{split}_dataloader")())
        served = list(getattr(resident, f"{split}_dataloader")())
        assert all(torch.equal(a, b) for pa, pb in zip(plain, served, strict=True) for a, b in zip(pa, pb))


def test_cifar_device_resident_auto_stays_off_on_cpu(cifar100_root: Path) -> None:
    dm = CIFAR100DataModule(root=str(cifar100_root), num_workers=0)
    assert dm.device_resident == "auto" and dm.resident_device("train") is None
    assert isinstance(dm.train_dataloader(), torch.utils.data.DataLoader)
    with pytest.raises(ValueError, match="device_resident"):
        CIFAR100DataModule(root=str(cifar100_root), device_resident="yes")


def test_cifar_device_resident_shards_like_the_worker_path_under_ddp(cifar100_root: Path) -> None:
    """Two ranks (a stand-in trainer): each path gives each rank the same disjoint, equal-length share."""
    kwargs = dict(root=str(cifar100_root), num_workers=0, batch_size=16, seed=3)
    shares = []
    for rank in (0, 1):
        trainer = SimpleNamespace(world_size=2, global_rank=rank, strategy=SimpleNamespace(root_device=torch.device("cpu")))
        loaders = []
        for resident in (False, True):
            dm = CIFAR100DataModule(device_resident=resident, **kwargs)
            dm.trainer = trainer
            loaders.append((dm.train_dataloader(), dm.val_dataloader()))
        (worker_train, worker_val), (resident_train, resident_val) = loaders
        assert isinstance(resident_train, DeviceBatches) and len(resident_train) == len(worker_train) == 6  # 90 each
        expected, got = _epoch_batches(worker_train, 2), _epoch_batches(resident_train, 2)
        assert all(torch.equal(x, y) for pa, pb in zip(expected, got, strict=True) for x, y in zip(pa, pb))
        shares.append(torch.cat([y for _, y in got]))
        # Lightning shards the worker path's val loader itself (in order); the resident one comes sharded.
        val_labels = worker_val.dataset.labels
        assert torch.cat([y for _, y in resident_val]).tolist() == val_labels[rank::2].tolist()
    train_labels = CIFAR100DataModule(**kwargs).dataset("train").labels
    assert sorted(torch.cat(shares).tolist()) == sorted(train_labels.tolist())


def test_cifar_malformed_pickle(tmp_path: Path) -> None:
    folder = write_cifar100(tmp_path, n_train=10, n_test=10)
    _dump_py2(_py2_dict(pixels=np.zeros((10, 3072), np.uint8)), folder / "train")
    with pytest.raises(ValueError, match="not in the CIFAR python"):
        CIFAR100DataModule(root=str(tmp_path), num_workers=0).setup("fit")


# --------------------------------------------------------------------------- device transforms


def test_random_translate_flip_is_a_shifted_possibly_mirrored_copy() -> None:
    torch.manual_seed(3)
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)

    def candidates(image: torch.Tensor, pad: int, flip: bool) -> list[torch.Tensor]:
        padded = torch.nn.functional.pad(image, (pad,) * 4)
        crops = [padded[:, y : y + 8, x : x + 8] for y in range(2 * pad + 1) for x in range(2 * pad + 1)]
        return crops + [crop.flip(-1) for crop in crops] if flip else crops

    for pad, flip in ((4, True), (1, False)):
        out = random_translate_flip(images, pad, flip)
        assert out.shape == images.shape and out.dtype == torch.uint8
        for image, result in zip(images, out):
            assert any(torch.equal(result, c) for c in candidates(image, pad, flip))
        assert not torch.equal(out, images)


def test_device_transform_normalises_exactly() -> None:
    dm = DigitsDataModule(num_workers=0, resolution=16)
    value = 200
    images = torch.full((2, 3, 8, 8), value, dtype=torch.uint8)
    out = dm.device_transform(images, train=False)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    for c in range(3):
        expected = (value / 255 - MEAN[c]) / STD[c]
        assert torch.allclose(out[:, c], torch.full_like(out[:, c], expected), atol=1e-6)

    big = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    down = dm.device_transform(big, train=False)  # downsampling path (antialiased)
    assert down.shape == (2, 3, 16, 16)
    assert abs(down.mean().item() - (big.float().mean().item() / 255 - 0.456) / 0.225) < 0.05

    flat = DigitsDataModule(num_workers=0, resolution=8, channels_last=False, mean=(0, 0, 0), std=(1, 1, 1))
    assert torch.equal(flat.device_transform(big[:, :, :8, :8], train=False), big[:, :, :8, :8].float() / 255)


# --------------------------------------------------------------------------- digits


def test_digits_splits_and_determinism() -> None:
    dm = DigitsDataModule(num_workers=0, batch_size=32, resolution=24)
    dm.setup()
    sizes = [len(dm.dataset(split)) for split in ("train", "val", "test")]
    assert sizes == [1078, 360, 359] and dm.num_classes == 10 and dm.has_test
    val_counts = torch.bincount(dm.dataset("val").labels)
    assert val_counts.min() >= 35 and val_counts.max() <= 37  # ~20% of each class (174..183)

    images, labels = first_batch(dm.train_dataloader())
    assert_worker_batch(images, labels, 8, 32)
    assert images.max() == 255 and images.min() == 0
    assert torch.equal(images[:, 0], images[:, 1])  # grayscale replicated

    same = DigitsDataModule(num_workers=0, seed=0).dataset("val")
    other = DigitsDataModule(num_workers=0, seed=1).dataset("val")
    assert torch.equal(same.images, dm.dataset("val").images)
    assert not torch.equal(other.images, same.images)


def test_digits_values_are_rescaled_from_0_16() -> None:
    from sklearn.datasets import load_digits

    raw = load_digits().images
    dm = DigitsDataModule(num_workers=0)
    train = dm.dataset("train")
    first = train.images[0, 0].numpy()
    match = [i for i in range(len(raw)) if np.array_equal(np.rint(raw[i] * 255 / 16), first)]
    assert match


def test_split_helper_keeps_every_class_in_val() -> None:
    labels = np.repeat(np.arange(50), 2)  # many tiny classes
    train, val = stratified_split(labels, (0.9, 0.1), seed=0)
    assert len(train) == 90 and len(val) == 10 and len(set(labels[val])) == 10
    assert set(train) | set(val) == set(range(100))


# --------------------------------------------------------------------------- Flowers-102


def test_flowers_official_splits(flowers_root: Path) -> None:
    dm = Flowers102DataModule(root=str(flowers_root), num_workers=0, batch_size=4, resolution=32)
    assert dm.num_classes == 102 and dm.class_names[0] == "pink primrose"
    dm.setup()
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [4, 3, 3]
    assert dm.dataset("val").labels.tolist() == [0, 1, 101]  # 1-based .mat labels -> 0-based
    images, labels = first_batch(dm.test_dataloader())
    assert_worker_batch(images, labels, 32, 3)
    out = dm.device_transform(images, train=False)
    assert out.shape == (3, 3, 32, 32) and out.is_contiguous(memory_format=torch.channels_last)


def test_flowers_augment_flag(flowers_root: Path) -> None:
    def two_batches(augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
        dm = Flowers102DataModule(root=str(flowers_root), num_workers=0, batch_size=4, resolution=32, augment=augment)
        (a, la), (b, lb) = first_batch(dm.train_dataloader()), first_batch(dm.train_dataloader())
        assert torch.equal(la, lb)  # the seeded shuffle repeats
        return a, b

    torch.manual_seed(0)
    a, b = two_batches(augment=True)
    assert torch.equal(a, b)  # crops are drawn from (seed, epoch, index), not from the process's RNG
    plain, again = two_batches(augment=False)
    assert torch.equal(plain, again) and not torch.equal(a, plain)


def test_worker_augmentation_depends_on_seed_epoch_and_index_only(flowers_root: Path) -> None:
    """Same crops with 0, 1 or 2 workers, persistent or not, and new crops each epoch."""

    def epochs(**loader: object) -> list[torch.Tensor]:
        dm = Flowers102DataModule(root=str(flowers_root), batch_size=2, resolution=32, seed=3, **loader)
        loader_ = dm.train_dataloader()
        out = []
        for epoch in range(2):
            loader_.sampler.set_epoch(epoch)
            out.append(torch.cat([images for images, _ in loader_]))
        return out

    reference = epochs(num_workers=0)
    assert not torch.equal(reference[0], reference[1])
    for loader in (dict(num_workers=1, persistent_workers=True), dict(num_workers=2, persistent_workers=True),
                   dict(num_workers=2, persistent_workers=False)):
        assert all(torch.equal(a, b) for a, b in zip(epochs(**loader), reference)), loader


# --------------------------------------------------------------------------- image folder


def test_folder_split_layout(folder_root: Path) -> None:
    dm = ImageFolderDataModule(root=str(folder_root), num_workers=0, batch_size=4, resolution=24)
    assert dm.class_names == ["cat", "dog"] and dm.has_test
    dm.setup()
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [12, 4, 4]
    assert sorted(p.suffix for p in dm.dataset("train").files) == sorted(
        [".jpg", ".PNG", ".bmp"] * 2 + [".jpeg", ".webp", ".TIF"] * 2
    )
    assert_worker_batch(*first_batch(dm.val_dataloader()), 24, 4)


def test_folder_single_layout_split(single_root: Path) -> None:
    def split(seed: int, split_seed: int = 0) -> tuple[list[Path], list[Path]]:
        dm = ImageFolderDataModule(root=str(single_root), num_workers=0, seed=seed, split_seed=split_seed)
        dm.setup("fit")
        return list(dm.dataset("train").files), list(dm.dataset("val").files)

    train, val = split(0)
    assert ImageFolderDataModule(root=str(single_root)).class_names == ["circle", "square", "triangle"]
    assert len(train) == 24 and len(val) == 6 and not set(train) & set(val)
    assert sorted(p.parent.name for p in val) == ["circle"] * 2 + ["square"] * 2 + ["triangle"] * 2
    assert split(0) == split(1) == (train, val)  # the training seed does not move the split
    assert split(0, split_seed=1)[1] != val
    assert not ImageFolderDataModule(root=str(single_root)).has_test


def test_folder_without_test_refuses_test_loader(single_root: Path) -> None:
    dm = ImageFolderDataModule(root=str(single_root), num_workers=0)
    dm.setup("test")  # nothing to build, no error
    with pytest.raises(RuntimeError, match="has_test"):
        dm.test_dataloader()


def test_folder_with_workers(folder_root: Path) -> None:
    dm = ImageFolderDataModule(root=str(folder_root), num_workers=2, batch_size=5, resolution=24)
    loader = dm.train_dataloader()
    for _ in range(2):  # persistent workers serve a second epoch
        batches = list(loader)
        labels = torch.cat([labels for _, labels in batches])
        assert sorted(labels.tolist()) == sorted(dm.dataset("train").labels)
        assert all(images.dtype == torch.uint8 and images.shape[1:] == (3, 24, 24) for images, _ in batches)


def test_folder_corrupt_image_is_named_when_read(folder_root: Path) -> None:
    bad = folder_root / "train" / "dog" / "img001.webp"
    truncate(bad)
    dm = ImageFolderDataModule(root=str(folder_root), num_workers=0)
    dm.setup("fit")  # lists the files, decodes none
    train = dm.dataset("train")
    with pytest.raises(CorruptImageError, match="skip_corrupt=true") as error:
        train[list(train.files).index(bad)]
    assert str(bad) in str(error.value) and "\n" not in str(error.value)

    # From a worker process the DataLoader re-raises it with the worker's traceback: still one line.
    in_worker = ImageFolderDataModule(root=str(folder_root), num_workers=1, persistent_workers=False)
    with pytest.raises(CorruptImageError) as error:
        list(in_worker.train_dataloader())
    assert str(error.value).startswith(f"cannot decode image '{bad}': ") and "\n" not in str(error.value)

    # The full check, on request, finds it at setup.
    with pytest.raises(CorruptImageError, match="img001.webp.*skip_corrupt=true"):
        ImageFolderDataModule(root=str(folder_root), num_workers=0, verify_images=True).setup("fit")
    checked = ImageFolderDataModule(root=str(folder_root), num_workers=0, verify_images=True, skip_corrupt=True)
    with pytest.warns(UserWarning, match="img001.webp"):
        checked.setup("fit")
    assert len(checked.dataset("train")) == 11 and bad not in checked.dataset("train").files


def test_folder_skip_corrupt_stands_in_a_sample_drawn_from_seed_epoch_and_index(folder_root: Path) -> None:
    bad = folder_root / "train" / "dog" / "img001.webp"
    truncate(bad)

    def epochs(num_workers: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        dm = ImageFolderDataModule(root=str(folder_root), num_workers=num_workers, batch_size=4, resolution=24,
                                   skip_corrupt=True, seed=5)
        loader = dm.train_dataloader()
        out = []
        for epoch in (0, 1, 0):
            loader.sampler.set_epoch(epoch)
            out.append(tuple(torch.cat(parts) for parts in zip(*loader)))
        return out, dm.dataset("train").skipped

    with pytest.warns(UserWarning) as record:
        reference, skipped = epochs(num_workers=0)
    assert [str(w.message).split(":")[0] for w in record] == [f"skipping unreadable image '{bad}'"]  # once
    assert skipped == 1 and all(len(labels) == 12 for _, labels in reference)  # replaced, not dropped
    assert torch.equal(reference[0][0], reference[2][0]) and not torch.equal(reference[0][0], reference[1][0])
    with_workers, skipped = epochs(num_workers=2)  # workers warn on their own stderr
    assert skipped == 1
    assert all(torch.equal(a, b) for ours, theirs in zip(with_workers, reference) for a, b in zip(ours, theirs))


def test_flowers_truncated_jpeg(tmp_path: Path) -> None:
    write_flowers(tmp_path, [1, 2, 1, 2], {"trnid": [1, 2], "valid": [3, 4], "tstid": [3, 4]})
    truncate(tmp_path / "flowers-102" / "jpg" / "image_00002.jpg")
    dm = Flowers102DataModule(root=str(tmp_path), num_workers=0)
    dm.setup("fit")
    with pytest.raises(CorruptImageError, match="image_00002.jpg"):
        list(dm.train_dataloader())
    with pytest.raises(CorruptImageError, match="image_00002.jpg"):
        Flowers102DataModule(root=str(tmp_path), num_workers=0, verify_images=True).setup("fit")


def test_folder_empty_class_and_unknown_class(folder_root: Path) -> None:
    empty = folder_root / "train" / "bird"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images yet")
    with pytest.raises(ValueError, match=str(empty)):
        ImageFolderDataModule(root=str(folder_root), num_workers=0).setup("fit")

    (empty / "readme.txt").unlink()
    empty.rmdir()
    write_images(folder_root / "val" / "fox", 1, seed=9)
    with pytest.raises(ValueError, match="fox.*share one class list"):
        ImageFolderDataModule(root=str(folder_root), num_workers=0).setup("fit")


# --------------------------------------------------------------------------- missing data


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (CIFAR100DataModule, "cifar-100-python/{train,test,meta}"),
        (CIFAR10DataModule, "cifar-10-batches-py/{data_batch_1,"),
        (Flowers102DataModule, "flowers-102/{jpg/,imagelabels.mat,setid.mat}"),
    ],
)
def test_missing_dataset_message(tmp_path: Path, make: type, expected: str) -> None:
    dm = make(root=str(tmp_path), num_workers=0)
    with pytest.raises(DatasetNotFoundError) as error:
        dm.setup("fit")
    message = str(error.value)
    assert isinstance(error.value, FileNotFoundError) and "\n" not in message
    assert f"not found under '{tmp_path}'" in message and f"{tmp_path}/{expected}" in message
    assert "data.download=true" in message and "data.root=" in message


def test_missing_file_is_named(tmp_path: Path) -> None:
    (write_cifar100(tmp_path, n_train=10, n_test=10) / "meta").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"\(missing: meta\)"):
        CIFAR100DataModule(root=str(tmp_path)).class_names


def test_missing_image_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="data.root=") as error:
        ImageFolderDataModule(root=str(tmp_path / "nowhere")).num_classes
    assert "download" not in str(error.value)


# --------------------------------------------------------------------------- Lightning


class _Probe(L.LightningModule):
    """Linear classifier that records what reaches each step after the datamodule hook."""

    def __init__(self, pixels: int) -> None:
        super().__init__()
        self.head = nn.Linear(pixels, 10)
        self.seen: list[tuple[str, torch.dtype, tuple[int, ...]]] = []

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], kind: str) -> torch.Tensor:
        images, labels = batch
        self.seen.append((kind, images.dtype, tuple(images.shape[1:])))
        return nn.functional.cross_entropy(self.head(images.flatten(1)), labels)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _LabelProbe(_Probe):
    """Also records each training batch's labels; 100 classes for CIFAR-100."""

    def __init__(self, pixels: int) -> None:
        super().__init__(pixels)
        self.head = nn.Linear(pixels, 100)
        self.labels: list[torch.Tensor] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        self.labels.append(batch[1].clone())
        return super().training_step(batch, index)


@pytest.mark.parametrize("resident", [False, True])
def test_cifar_resident_and_worker_paths_train_on_the_same_batches(cifar100_root: Path, resident: bool) -> None:
    """Through a real Trainer over 2 epochs: Lightning's `set_epoch` reaches both paths' sampler."""

    def fit(device_resident: bool) -> list[torch.Tensor]:
        dm = CIFAR100DataModule(root=str(cifar100_root), num_workers=0, batch_size=64, resolution=8,
                                device_resident=device_resident)
        model = _LabelProbe(3 * 8 * 8)
        trainer = L.Trainer(accelerator="cpu", max_epochs=2, limit_val_batches=0, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model, datamodule=dm)
        assert isinstance(trainer.train_dataloader, DeviceBatches) == device_resident
        assert all(shape == (3, 8, 8) and dtype == torch.float32 for _, dtype, shape in model.seen)
        return model.labels

    labels = fit(resident)
    train = CIFAR100DataModule(root=str(cifar100_root)).dataset("train")
    expected = []
    for epoch in (0, 1):
        sampler = EpochSampler(train, num_replicas=1, rank=0, seed=0, epoch=epoch)
        expected += list(train.labels[list(sampler)].split(64))
    assert len(labels) == len(expected) == 6
    assert all(torch.equal(a, b) for a, b in zip(labels, expected))


def test_trainer_applies_device_transform_with_training_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    dm = DigitsDataModule(num_workers=0, batch_size=16, resolution=12)
    flags: list[bool] = []
    original = dm.device_transform

    def spy(images: torch.Tensor, train: bool) -> torch.Tensor:
        flags.append(train)
        return original(images, train)

    monkeypatch.setattr(dm, "device_transform", spy)
    model = _Probe(3 * 12 * 12)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    kinds = [kind for kind, _, _ in model.seen]
    assert kinds == ["train"] * 3 + ["val"] * 2 and flags == [True] * 3 + [False] * 2
    assert all(dtype == torch.float32 and shape == (3, 12, 12) for _, dtype, shape in model.seen)
