"""Image folders at scale: setup lists and never decodes, the index is cached once per job, decode where cheapest."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import weakref
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
from finetune.datamodules import index as index_module
from finetune.datamodules.index import PathArray
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


@pytest.fixture(autouse=True)
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default index cache, $XDG_CACHE_HOME/effnet-finetune/index, in this test's folder (subprocesses inherit it)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "effnet-finetune" / "index"


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


def test_a_second_launch_reuses_the_index_and_its_full_check(
    tree: Path, user_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def launch() -> tuple[int, list[Path]]:
        calls = decodes(monkeypatch)
        dm = ImageFolderDataModule(root=str(tree), num_workers=0, verify_images=True)
        dm.prepare_data()
        dm.setup("fit")
        return calls.counts["load"], list(dm.dataset("train").files)

    first_decodes, files = launch()
    (cached,) = user_cache.glob("*.index")
    written = cached.stat().st_ino
    assert first_decodes == 18  # the full check decoded every file once
    assert launch() == (0, files) and cached.stat().st_ino == written  # reused, not rewritten

    # A file changed in place. The tree was written just now, so its folders' mtimes vouch for nothing (they
    # could move again within the filesystem's mtime granularity): it is listed again, and sizes are in the key.
    with open(tree / "coffee" / "0.jpg", "ab") as f:
        f.write(b"\0")
    assert launch()[0] == 18 and cached.stat().st_ino != written


class Link:
    """A DDP strategy's broadcast between stand-in ranks in one process: what rank 0 sends, every rank receives.

    Rank 0's `setup` runs first here; under a real strategy the others wait for it in the same call.
    """

    def __init__(self) -> None:
        self.sent: object = None

    def broadcast(self, obj: object, src: int = 0) -> object:
        if obj is not None:
            self.sent = obj
        return self.sent


def on_rank(rank: int, link: Link, root: Path, **kwargs: object) -> ImageFolderDataModule:
    """A datamodule as process `rank` of a two-process job on one node holds it."""
    dm = ImageFolderDataModule(root=str(root), num_workers=0, **kwargs)
    dm.trainer = SimpleNamespace(local_rank=rank, global_rank=rank, world_size=2, num_devices=2, strategy=link)
    return dm


def splits(dm: ImageFolderDataModule) -> tuple[list[Path], list[Path]]:
    return list(dm.dataset("train").files), list(dm.dataset("val").files)


def test_other_ranks_load_what_local_rank_zero_indexed(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    link = Link()
    rank0 = on_rank(0, link, tree)
    rank0.prepare_data()  # Lightning: on local rank 0 only, before every rank's setup
    (tree / "coffee" / "new.jpg").write_bytes((tree / "coffee" / "0.jpg").read_bytes())
    rank0.setup("fit")

    scans = Calls(monkeypatch, (os, "scandir"))
    rank1 = on_rank(1, link, tree)
    rank1.setup("fit")
    assert scans.counts == {} and len(rank1.dataset("train")) + len(rank1.dataset("val")) == 18
    assert splits(rank0) == splits(rank1)

    relaunch = ImageFolderDataModule(root=str(tree), num_workers=0)  # a new job lists again and sees the new file
    relaunch.setup("fit")
    assert scans.counts["scandir"] > 0 and len(relaunch.dataset("train")) + len(relaunch.dataset("val")) == 19


def _quota_exceeded(*args: object, **kwargs: object) -> None:
    raise OSError(errno.EDQUOT, "Disk quota exceeded")


@pytest.mark.filterwarnings("ignore:could not cache the image index")  # rank 1 cannot cache its listing either
def test_a_rank_never_takes_an_earlier_jobs_index_when_rank_zero_could_not_write_its_own(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    ImageFolderDataModule(root=str(tree), num_workers=0, cache_dir=str(cache)).prepare_data()  # an earlier job's
    new = tree / "coffee" / "new.jpg"
    new.write_bytes((tree / "coffee" / "0.jpg").read_bytes())
    monkeypatch.setattr(index_module, "atomic_save", _quota_exceeded)  # this job cannot replace the cached index

    link = Link()
    rank0 = on_rank(0, link, tree, cache_dir=str(cache))
    with pytest.warns(UserWarning, match="could not cache the image index .*Disk quota exceeded"):
        rank0.prepare_data()
    rank0.setup("fit")
    rank1 = on_rank(1, link, tree, cache_dir=str(cache))
    rank1.setup("fit")
    on_disk = sorted(tree.rglob("*.*"))
    assert sorted(sum(splits(rank0), [])) == on_disk and new in on_disk  # rank 0 uses the folder as it is
    assert splits(rank1) == splits(rank0)  # and so does rank 1: the same splits, the same number of batches


@pytest.mark.filterwarnings("ignore:could not cache the image index")
def test_a_rank_that_cannot_see_rank_zeros_files_refuses_in_one_line(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    ImageFolderDataModule(root=str(tree), num_workers=0, cache_dir=str(cache)).prepare_data()  # an earlier job's
    (tree / "coffee" / "new.jpg").write_bytes((tree / "coffee" / "0.jpg").read_bytes())
    monkeypatch.setattr(index_module, "atomic_save", _quota_exceeded)
    link = Link()
    on_rank(0, link, tree, cache_dir=str(cache)).setup("fit")
    (tree / "astronaut" / "0.jpg").unlink()  # the folder changes again before rank 1 lists it
    with pytest.raises(ConfigError) as refused:
        on_rank(1, link, tree, cache_dir=str(cache)).setup("fit")
    message = str(refused.value)
    assert "process 1 lists other images under" in message and "set data.cache_dir to a folder" in message
    assert "\n" not in message


def test_a_rank_that_sees_other_folders_or_classes_than_rank_zero_refuses(tree: Path) -> None:
    link = Link()
    on_rank(0, link, tree).setup("fit")
    late = on_rank(1, link, tree)
    assert late.num_classes == 3  # the model is sized before setup
    (tree / "train").mkdir()  # the split layout appears after rank 0 listed the single one
    with pytest.raises(ConfigError, match=r"process 1 finds the folders \['train'\] under .*process 0 found \['\.'\]"):
        late.setup("fit")
    (tree / "train").rmdir()

    (tree / "zebra").mkdir()  # a class folder appears after rank 0 listed the tree: labels would shift on rank 1
    (tree / "zebra" / "0.jpg").write_bytes((tree / "coffee" / "0.jpg").read_bytes())
    with pytest.raises(ConfigError, match=r"class folders under .* changed while the job started \(4 when the model "
                                          r"was sized, 3 when listed\)"):
        on_rank(1, link, tree).setup("fit")


def test_a_damaged_index_is_rebuilt_and_cache_dir_is_honoured(tree: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    ImageFolderDataModule(root=str(tree), num_workers=0, cache_dir=str(cache)).setup("fit")
    (index,) = cache.iterdir()
    assert not (tmp_path / "xdg").exists()  # nothing in the default cache
    index.write_bytes(index.read_bytes()[:100])  # as if a writer died mid-file without the atomic rename
    dm = ImageFolderDataModule(root=str(tree), num_workers=0, cache_dir=str(cache))
    dm.setup("fit")
    assert len(dm.dataset("train")) == 14 and index.stat().st_size > 100
    assert [p.name for p in cache.iterdir()] == [index.name]  # no temporary file left beside it


# --------------------------------------------------------------------------- workers sized to the machine


def machine(monkeypatch: pytest.MonkeyPatch, cpus: int, allowed: int, slurm_cpus_per_task: int | None = None) -> None:
    """A machine of `cpus` cores on which this process may run on `allowed`, maybe as a SLURM task."""
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(allowed)))
    if slurm_cpus_per_task is None:
        monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    else:
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(slurm_cpus_per_task))


def test_num_workers_auto_takes_this_tasks_cores_once_leaves_one_and_is_capped(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    machine(monkeypatch, cpus=64, allowed=8, slurm_cpus_per_task=8)  # SLURM: 8 CPUs per task, one task per GPU
    assert auto_num_workers(devices=4) == 7  # not 8 // 4 = 2: the affinity is already this task's
    machine(monkeypatch, cpus=64, allowed=8)  # an affinity set smaller than the machine: chosen for this process
    assert auto_num_workers(devices=4) == 7
    machine(monkeypatch, cpus=64, allowed=64, slurm_cpus_per_task=8)  # SLURM without CPU binding
    assert auto_num_workers(devices=4) == 7
    machine(monkeypatch, cpus=16, allowed=16)  # the whole machine: shared among its devices
    assert auto_num_workers(devices=4) == 3 and auto_num_workers(devices=16) == 1

    machine(monkeypatch, cpus=128, allowed=128)  # a 128-core node with one GPU: capped
    dm = ImageFolderDataModule(root=str(tree), batch_size=4)
    dm.setup("fit")
    assert dm.num_workers == "auto" and (dm.train_dataloader().num_workers, dm.val_dataloader().num_workers) == (16, 8)
    dm.trainer = SimpleNamespace(num_devices=8, world_size=1)
    assert (dm.loader_workers, dm.eval_loader_workers) == (15, 8)  # 128 // 8 - 1, then the caps
    fixed = ImageFolderDataModule(root=str(tree), num_workers=3)
    assert (fixed.loader_workers, fixed.eval_loader_workers) == (3, 3)
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
from finetune.build import fit

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


@pytest.mark.slow  # 50-230 s on the 2-core machine: in make test-all, out of make test
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


STALE_INDEX_SCRIPT = '''
import json, sys
from pathlib import Path
import lightning as L, torch
import finetune.datamodules.index
from finetune.datamodules import ImageFolderDataModule

def quota_exceeded(*args, **kwargs):
    raise OSError(122, "Disk quota exceeded")

finetune.datamodules.index.atomic_save = quota_exceeded  # no process can replace the earlier job's cached index

class Record(L.Callback):
    def on_train_start(self, trainer, pl_module):
        data = trainer.datamodule
        seen = {split: [str(p) for p in data.dataset(split).files] for split in ("train", "val")}
        seen["batches"] = trainer.num_training_batches
        Path(sys.argv[3], f"rank{trainer.global_rank}.json").write_text(json.dumps(seen))

class Linear(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3 * 32 * 32, 3)
    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.head(x.flatten(1)), y)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

data = ImageFolderDataModule(root=sys.argv[1], cache_dir=sys.argv[2], num_workers=0, batch_size=4, resolution=32)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()], default_root_dir=sys.argv[3])
trainer.fit(Linear(), datamodule=data)
'''


def test_two_gloo_processes_use_rank_zeros_index_over_an_earlier_jobs_cache(tree: Path, tmp_path: Path) -> None:
    """Lightning DDP on CPU: rank 0 cannot write its index, rank 1 still trains on rank 0's listing, not the stale one."""
    cache = tmp_path / "cache"
    ImageFolderDataModule(root=str(tree), num_workers=0, cache_dir=str(cache)).prepare_data()  # an earlier job's
    (tree / "coffee" / "new.jpg").write_bytes((tree / "coffee" / "0.jpg").read_bytes())
    script, out = tmp_path / "stale.py", tmp_path / "run"
    script.write_text(STALE_INDEX_SCRIPT)
    out.mkdir()
    run = subprocess.run([sys.executable, str(script), str(tree), str(cache), str(out)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank1 == rank0 and len(rank0["train"]) + len(rank0["val"]) == 19  # the folder as it is now


# --------------------------------------------------------------------------- the index on clusters


def listing(folder: Path) -> list[tuple[str, int]]:
    """Every name under `folder`, hidden ones too, with its size (0 for folders)."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size if p.is_file() else 0) for p in folder.rglob("*"))


def test_indexing_writes_nothing_into_the_data_folder(tree: Path, tmp_path: Path, user_cache: Path) -> None:
    from torchvision.datasets import ImageFolder

    before = listing(tree)
    copy = Path(shutil.copytree(tree, tmp_path / "copy"))
    for root in (tree, copy):
        dm = ImageFolderDataModule(root=str(root), num_workers=0, verify_images=True)
        dm.prepare_data()
        dm.setup("fit")
    assert listing(tree) == before  # nothing for DVC, rsync or git-lfs to see
    assert len(ImageFolder(str(tree)).samples) == 18  # no hidden class folder it would fail on
    assert len(list(user_cache.glob("*.index"))) == 2  # one entry per folder

    mine = tmp_path / "mine"  # data.cache_dir still decides where
    ImageFolderDataModule(root=str(tree), num_workers=0, cache_dir=str(mine)).prepare_data()
    assert [p.suffix for p in mine.iterdir()] == [".index"] and listing(tree) == before


def test_symlinked_folders_in_class_folders_are_followed_as_imagefolder_does_and_loops_end(
    tree: Path, tmp_path: Path
) -> None:
    from torchvision.datasets import ImageFolder

    extra = tmp_path / "extra" / "deeper"
    extra.mkdir(parents=True)
    for i in range(3):
        shutil.copy(tree / "coffee" / "0.jpg", extra / f"{i}.jpg")
    (tree / "coffee" / "linked").symlink_to(tmp_path / "extra", target_is_directory=True)

    def ours() -> list[Path]:
        dm = ImageFolderDataModule(root=str(tree), num_workers=0)
        dm.setup("fit")
        return sorted(sum(splits(dm), []))

    theirs = sorted(Path(path) for path, _ in ImageFolder(str(tree)).samples)
    assert len(theirs) == 21 and ours() == theirs

    (tree / "astronaut" / "nested" / "loop").symlink_to(tree / "astronaut", target_is_directory=True)
    assert ours() == theirs  # the loop ends, and each file is listed once


def age(tree: Path, seconds: float = 3600) -> None:
    """Date every file and folder under `tree` `seconds` back, as a dataset that was not just written."""
    then = time.time() - seconds
    for path in [*tree.rglob("*"), tree]:
        os.utime(path, (then, then), follow_symlinks=False)


class Touched:
    """The paths `os.stat`, `os.lstat` and `os.scandir` are called with (a scandir entry's `stat` needs a scandir)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.stats: list[Path] = []
        self.listed: list[Path] = []
        for name, seen in (("stat", self.stats), ("lstat", self.stats), ("scandir", self.listed)):
            original = getattr(os, name)

            def wrapped(path=".", *args, _original=original, _seen=seen, **kwargs):
                _seen.append(Path(os.fsdecode(path)))
                return _original(path, *args, **kwargs)

            monkeypatch.setattr(os, name, wrapped)


def test_a_warm_cache_lists_nothing_and_stats_no_file(tree: Path) -> None:
    age(tree)
    first = ImageFolderDataModule(root=str(tree), num_workers=0)
    first.prepare_data()
    first.setup("fit")

    with pytest.MonkeyPatch.context() as patch:  # undone before the checks below stat files themselves
        touched = Touched(patch)
        again = ImageFolderDataModule(root=str(tree), num_workers=0)
        again.prepare_data()
        again.setup("fit")
    assert splits(again) == splits(first)
    assert not [p for p in touched.stats if p.is_file()]  # the folders' mtimes only
    assert set(touched.listed) <= {tree}  # no class folder listed (the root is, for the class names)

    (tree / "coffee" / "nested" / "new.jpg").write_bytes((tree / "coffee" / "0.jpg").read_bytes())  # a folder changed
    seen = ImageFolderDataModule(root=str(tree), num_workers=0)
    seen.setup("fit")
    assert tree / "coffee" / "nested" / "new.jpg" in sum(splits(seen), [])


def test_a_folder_changed_within_its_mtime_granularity_is_listed_again(tree: Path) -> None:
    ImageFolderDataModule(root=str(tree), num_workers=0).prepare_data()  # the tree was written just now
    folder = tree / "coffee"
    mtime = folder.stat().st_mtime_ns
    (folder / "new.jpg").write_bytes((folder / "0.jpg").read_bytes())
    os.utime(folder, ns=(mtime, mtime))  # a filesystem with coarse mtimes: the same mtime after the change
    dm = ImageFolderDataModule(root=str(tree), num_workers=0)
    dm.setup("fit")
    assert folder / "new.jpg" in sum(splits(dm), [])


def test_a_copy_of_the_tree_reuses_the_full_check(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = ImageFolderDataModule(root=str(tree), num_workers=0, verify_images=True)
    original.setup("fit")
    copy = Path(shutil.copytree(tree, tmp_path / "node-local", copy_function=shutil.copy))  # new mtimes, like cp -r
    calls = decodes(monkeypatch)
    local = ImageFolderDataModule(root=str(copy), num_workers=0, verify_images=True)
    local.setup("fit")
    assert calls.counts == {}  # no image decoded again
    assert [p.relative_to(copy) for p in sum(splits(local), [])] == [p.relative_to(tree) for p in sum(splits(original), [])]


def test_the_full_check_keeps_a_bounded_number_of_files_in_flight(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from finetune.datamodules import images

    bad = tree / "coffee" / "0.jpg"
    bad.write_bytes(bad.read_bytes()[:400])
    files = sorted(tree.rglob("*.*")) * 8  # 144 checks
    expected = {position: error for position, file in enumerate(files) if (error := images._decode_error(file))}
    alive: weakref.WeakSet = weakref.WeakSet()
    most = 0
    submit = ThreadPoolExecutor.submit

    def counted(self, *args, **kwargs):
        nonlocal most
        future = submit(self, *args, **kwargs)
        alive.add(future)
        most = max(most, len(alive))
        return future

    monkeypatch.setattr(ThreadPoolExecutor, "submit", counted)
    found = images.find_unreadable(files)
    assert found == expected and len(found) == 8
    assert most <= 8 * images._IN_FLIGHT_PER_THREAD < len(files)
