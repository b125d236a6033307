"""Image folders at scale: setup lists and never decodes, the index is cached once per job, decode where cheapest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import skimage.data
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image, ImageFile
from torch import nn

from finetune.datamodules import CorruptImageError, ImageFolderDataModule
from finetune.datamodules.base import auto_num_workers
from finetune.datamodules.device_decode import EncodedImages
from finetune.datamodules.images import ImageFileDataset, RandomCrop, worker_transform
from finetune.datamodules.index import ROOT_CACHE, PathArray
from finetune.errors import ConfigError
from finetune.models.preprocessing import Preprocessing

CLASSES = ("astronaut", "café", "coffee")  # a non-ASCII class name: paths are stored as bytes


def write_tree(root: Path, per_class: int = 6) -> list[Path]:
    """<root>/<class>/<nested?>/<i>.jpg (one PNG per class), crops of scikit-image photos of varied size."""
    paths = []
    for c, name in enumerate(CLASSES):
        photo = getattr(skimage.data, "chelsea" if name == "café" else name)()
        for i in range(per_class):
            h, w = 90 + 37 * i, 160 - 9 * i
            crop = photo[7 * i: 7 * i + h, 11 * i: 11 * i + w]
            folder = root / name / ("nested" if i % 3 == 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{i}.{'png' if i == 1 else 'jpg'}"
            Image.fromarray(crop).save(path, quality=90)
            paths.append(path)
    return paths


class Calls:
    """Counts calls of some functions while it is active, and still runs them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *targets: tuple[object, str]) -> None:
        self.counts: Counter[str] = Counter()
        lock = threading.Lock()  # the full check decodes in threads
        for owner, name in targets:
            original = getattr(owner, name)

            def counted(*args, _original=original, _name=name, **kwargs):
                with lock:
                    self.counts[_name] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(owner, name, counted)


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    write_tree(tmp_path / "photos")
    return tmp_path / "photos"


def decodes(monkeypatch: pytest.MonkeyPatch) -> Calls:
    """PIL opening a file (header) and decoding its pixels."""
    return Calls(monkeypatch, (Image, "open"), (ImageFile.ImageFile, "load"))


# --------------------------------------------------------------------------- index, don't decode


def test_setup_lists_the_tree_and_decodes_no_image(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = decodes(monkeypatch)
    dm = ImageFolderDataModule(root=str(tree), num_workers=0, batch_size=4, resolution=32)
    dm.setup("fit")
    train, val = dm.dataset("train"), dm.dataset("val")
    assert (len(train), len(val)) == (14, 4) and calls.counts == {}
    assert isinstance(train.files, PathArray) and train.files.buffer.dtype == np.uint8  # no list of Python objects
    assert sorted({p.relative_to(tree).parts[0] for p in val.files}) == sorted(CLASSES)  # stratified
    assert (tree / "café" / "nested" / "2.jpg") in list(train.files) + list(val.files)
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 32, 32) and calls.counts["open"] == 4 and calls.counts["load"] >= 4


def test_a_second_launch_reuses_the_index_and_its_full_check(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def launch() -> tuple[int, list[Path]]:
        calls = decodes(monkeypatch)
        dm = ImageFolderDataModule(root=str(tree), num_workers=0, verify_images=True)
        dm.prepare_data()
        dm.setup("fit")
        return calls.counts["load"], list(dm.dataset("train").files)

    first_decodes, files = launch()
    (cached,) = (tree / ROOT_CACHE).iterdir()
    written = cached.stat().st_ino
    assert first_decodes == 18  # the full check decoded every file once
    assert launch() == (0, files) and cached.stat().st_ino == written  # reused, not rewritten

    with open(tree / "coffee" / "0.jpg", "ab") as f:  # a file changed: its size is in the listing's key
        f.write(b"\0")
    assert launch()[0] == 18 and cached.stat().st_ino != written


def test_other_ranks_load_what_local_rank_zero_indexed(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rank0 = ImageFolderDataModule(root=str(tree), num_workers=0)
    rank0.trainer = SimpleNamespace(local_rank=0, num_devices=2)
    rank0.prepare_data()  # Lightning: on local rank 0 only, before every rank's setup
    (tree / "coffee" / "new.jpg").write_bytes((tree / "coffee" / "0.jpg").read_bytes())

    scans = Calls(monkeypatch, (os, "scandir"))
    rank1 = ImageFolderDataModule(root=str(tree), num_workers=0)
    rank1.trainer = SimpleNamespace(local_rank=1, num_devices=2)
    rank1.setup("fit")
    assert scans.counts == {} and len(rank1.dataset("train")) + len(rank1.dataset("val")) == 18
    rank0.setup("fit")
    assert list(rank0.dataset("train").files) == list(rank1.dataset("train").files)

    relaunch = ImageFolderDataModule(root=str(tree), num_workers=0)  # a new job lists again and sees the new file
    relaunch.setup("fit")
    assert scans.counts["scandir"] > 0 and len(relaunch.dataset("train")) + len(relaunch.dataset("val")) == 19


def test_a_damaged_index_is_rebuilt_and_cache_dir_is_honoured(tree: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    ImageFolderDataModule(root=str(tree), num_workers=0, cache_dir=str(cache)).setup("fit")
    (index,) = cache.iterdir()
    assert not (tree / ROOT_CACHE).exists()
    index.write_bytes(index.read_bytes()[:100])  # as if a writer died mid-file without the atomic rename
    dm = ImageFolderDataModule(root=str(tree), num_workers=0, cache_dir=str(cache))
    dm.setup("fit")
    assert len(dm.dataset("train")) == 14 and index.stat().st_size > 100
    assert [p.name for p in cache.iterdir()] == [index.name]  # no temporary file left beside it


# --------------------------------------------------------------------------- workers sized to the machine


def test_num_workers_auto_shares_this_process_cores_among_the_node_devices() -> None:
    cores = len(os.sched_getaffinity(0))
    dm = ImageFolderDataModule(root="unused")
    assert dm.num_workers == "auto" and dm.loader_workers == cores
    dm.trainer = SimpleNamespace(num_devices=2)
    assert dm.loader_workers == max(1, cores // 2) and auto_num_workers(cores + 1) == 1
    assert ImageFolderDataModule(root="unused", num_workers=3).loader_workers == 3
    for bad in ("many", -1, 1.5):
        with pytest.raises(ConfigError, match=r"data\.num_workers must be an integer >= 0 or 'auto'.*num_workers=auto"):
            ImageFolderDataModule(root="unused", num_workers=bad)


# --------------------------------------------------------------------------- decode where it is cheapest


def test_draft_decodes_large_jpeg_crops_at_a_fraction_and_crops_the_same_region(tmp_path: Path) -> None:
    big = tmp_path / "big.jpg"
    Image.fromarray(skimage.data.astronaut()).resize((2048, 2048), Image.BICUBIC).save(big, quality=90)
    results = {}
    for draft in (True, False):
        with Image.open(big) as image:
            torch.manual_seed(1)  # a crop of 1694×1924 px: drafted at 1/8 for 128 px
            results[draft] = RandomCrop(128, "bicubic", draft=draft)(image)
            results[draft, "decoded size"] = image.size
    assert results[True, "decoded size"] == (256, 256) and results[False, "decoded size"] == (2048, 2048)
    difference = (results[True].float() - results[False].float()).abs()
    assert results[True].shape == (3, 128, 128) and difference.mean() < 3  # same region; another would differ by ~50

    preprocessing = Preprocessing(resolution=128)
    with Image.open(big) as image:  # eval images are never drafted: they equal what evaluation computes
        expected = preprocessing.eval_transform()(image.convert("RGB"))
    dataset = ImageFileDataset([big], [0], worker_transform(preprocessing, train=False))
    assert torch.equal(dataset[0][0], expected)


def _device_batches(dm: ImageFolderDataModule, split: str, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and labels of a whole split as the device receives them (decoded there if encoded)."""
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    if loader.sampler is not None and hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    images, labels = [], []
    for batch in loader:
        x, y = move_data_to_device(batch, torch.device("cpu"))  # what Lightning does to a batch
        if isinstance(x, EncodedImages):
            x, y = dm.dataset(split).decode_batch(x, y)
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


def test_device_decode_on_the_cpu_gives_the_worker_path_eval_images(tree: Path) -> None:
    kwargs = dict(root=str(tree), num_workers=0, batch_size=4, resolution=64, seed=2)
    worker, device = ImageFolderDataModule(**kwargs), ImageFolderDataModule(decode="device", **kwargs)
    for dm in (worker, device):
        dm.set_preprocessing(Preprocessing(resolution=64, interpolation="bilinear"))
    expected, labels = _device_batches(worker, "val")
    got, got_labels = _device_batches(device, "val")
    assert torch.equal(labels, got_labels) and (got.int() - expected.int()).abs().max() <= 1  # one grey level

    # Training crops come from the same (seed, epoch, index) draws; only the resampler differs.
    expected, labels = _device_batches(worker, "train", epoch=3)
    got, got_labels = _device_batches(device, "train", epoch=3)
    assert torch.equal(labels, got_labels) and (got.float() - expected.float()).abs().mean() < 4
    again, _ = _device_batches(device, "train", epoch=3)
    assert torch.equal(got, again) and not torch.equal(got, _device_batches(device, "train", epoch=4)[0])


def test_device_decode_stands_in_the_worker_path_sample_for_an_unreadable_file(tree: Path) -> None:
    bad = tree / "coffee" / "0.jpg"
    bad.write_bytes(bad.read_bytes()[:400])  # a truncated JPEG: only the device's decode can tell
    kwargs = dict(root=str(tree), num_workers=0, batch_size=4, resolution=32, skip_corrupt=True)
    with pytest.warns(UserWarning, match="skipping unreadable image .*coffee/0.jpg"):
        _, expected = _device_batches(ImageFolderDataModule(**kwargs), "train", epoch=1)
    device = ImageFolderDataModule(decode="device", **kwargs)
    with pytest.warns(UserWarning, match="skipping unreadable image .*coffee/0.jpg"):
        _, labels = _device_batches(device, "train", epoch=1)
    assert torch.equal(labels, expected) and device.dataset("train").skipped == 1

    strict = ImageFolderDataModule(decode="device", root=str(tree), num_workers=0, batch_size=18, resolution=32)
    with pytest.raises(CorruptImageError, match=f"cannot decode image '{bad}': .*data.skip_corrupt=true"):
        _device_batches(strict, "train")


class _Probe(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3 * 32 * 32, len(CLASSES))
        self.seen: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        self.seen.append((x.dtype, tuple(x.shape)))
        return nn.functional.cross_entropy(self.head(x.flatten(1)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_device_decode_trains_through_lightning(tree: Path) -> None:
    dm = ImageFolderDataModule(root=str(tree), decode="device", num_workers=1, batch_size=8, resolution=32)
    model = _Probe()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert model.seen == [(torch.float32, (8, 3, 32, 32)), (torch.float32, (6, 3, 32, 32))]


# --------------------------------------------------------------------------- cached features across DDP processes

SHARDED_SCRIPT = '''
import json, sys
from pathlib import Path
import lightning as L, torch
from hydra import compose, initialize_config_module
import finetune.datamodules.images
from finetune.train import fit

reads = []
load = finetune.datamodules.images.ImageFileDataset.load
finetune.datamodules.images.ImageFileDataset.load = lambda self, position: reads.append(position) or load(self, position)

class Features(L.Callback):
    def on_train_start(self, trainer, pl_module):
        data = trainer.datamodule
        cached = data.dataset("train").tensors
        torch.save({"features": cached[0], "labels": cached[1], "reads": len(reads)},
                   Path(trainer.default_root_dir) / f"rank{trainer.global_rank}.pt")
        if trainer.world_size == 1 or trainer.global_rank == 0:
            return
        model = pl_module.model.eval()
        with torch.no_grad():
            images = torch.stack([data.source.dataset("train")[i][0] for i in range(len(cached[0]))])
            direct = model.forward_head(model.forward_features(data.source.device_transform(images, train=False)), True)
        (Path(trainer.default_root_dir) / "direct.json").write_text(json.dumps((direct - cached[0]).abs().max().item()))

with initialize_config_module("finetune.conf", version_base="1.3"):
    cfg = compose("train", overrides=[*sys.argv[2:], f"paths.output_dir={sys.argv[1]}"])
fit(cfg, extra_callbacks=[Features()])
'''


def test_cached_features_are_extracted_once_across_ddp_processes(tmp_path: Path) -> None:
    """Two gloo processes: each decodes half the training images; both end up with all features, as one would."""
    root = tmp_path / "photos"
    write_tree(root)
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED_SCRIPT)
    out = tmp_path / "run"
    overrides = ["model=lite0", "model.pretrained=null", "model.resolution=32", "data=imagefolder", f"data.root={root}",
                 "data.num_workers=0", "data.batch_size=4", "data.augment=false", "finetune=frozen",
                 "finetune.cache_features=true", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                 "trainer.max_epochs=1", "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
                 "logger=csv", "test_after_fit=false"]
    run = subprocess.run([sys.executable, str(script), str(out), *overrides], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["reads"] for r in ranks] == [7, 7]  # 14 training images, half each
    assert all(torch.equal(ranks[0][key], ranks[1][key]) for key in ("features", "labels"))
    assert len(ranks[0]["labels"]) == 14 and json.loads((out / "direct.json").read_text()) < 1e-5
