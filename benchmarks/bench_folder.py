"""Image folders at scale: index time against torchvision's ImageFolder, worker memory over an epoch, decode paths.

1. Index: `ImageFolderDataModule.setup("fit")` against constructing torchvision's
   `ImageFolder` (which lists and sorts, decoding nothing) on the same tree, with the OS
   caches cold (dropped first, where this process may) and warm. Ours is timed as a first
   launch (no index cached), a relaunch (index cached, listing checked against it) and
   another DDP rank (index loaded, nothing listed); `verify_images=true` decodes every file
   once, which is what setup did before this change.
2. Memory: one epoch through 2 workers on a large tree; RSS and USS (private memory: what
   copy-on-read grows) of each worker at its first batch and at the end, and the main
   process's peak. Against the same dataset holding a Python list of paths, as before.
3. Decode: one process's img/s at 224 px for the training crop (full decode as before,
   JPEG draft mode, device decode on this machine's device) and the eval crop, on
   500×375 and 3000×2000 JPEGs. Per process: a worker does exactly this work.

Trees are written under a temporary folder and deleted afterwards: index and memory trees
are hard links to a few hundred distinct small JPEGs (crops of scikit-image photos), so
200k files cost little disk; the decode trees are real files (3000×2000 ones are upscaled
photos, JPEG quality 90).

    .venv/bin/python benchmarks/bench_folder.py --drop-caches
    .venv/bin/python benchmarks/bench_folder.py --sizes 20000 --memory-files 20000 --repeats 2   # quick
    .venv/bin/python benchmarks/bench_folder.py --device cuda --sections decode                  # nvJPEG
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import psutil
import skimage.data
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from common import OtherProcessesCpu, add_common_args, interleaved, median, paired_ratios, report, setup_device
from finetune.datamodules import ImageFolderDataModule
from finetune.datamodules.device_decode import EncodedImageFileDataset
from finetune.datamodules.images import ImageFileDataset, worker_transform
from finetune.models.preprocessing import Preprocessing

SCRIPT = "bench_folder.py"
SECTIONS = ("index", "memory", "decode")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "cat")


def photos() -> list[np.ndarray]:
    return [getattr(skimage.data, name)() for name in PHOTOS]


def write_jpegs(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """`count` distinct JPEGs of `size` (width, height): random crops of the photos, resized (up or down)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources, paths = photos(), []
    for i in range(count):
        photo = sources[i % len(sources)]
        h, w = photo.shape[:2]
        ch, cw = int(rng.integers(h // 2, h + 1)), int(rng.integers(w // 2, w + 1))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        image = Image.fromarray(photo[y:y + ch, x:x + cw]).resize(size, Image.BICUBIC)
        paths.append(folder / f"{i:04d}.jpg")
        image.save(paths[-1], quality=90)
    return paths


def link_tree(root: Path, sources: list[Path], files: int, per_class: int = 200) -> Path:
    """root/cNNNN/NNNNNNN.jpg: `files` hard links to `sources`, `per_class` to a class folder."""
    for i in range(files):
        folder = root / f"c{i // per_class:04d}"
        if i % per_class == 0:
            folder.mkdir(parents=True)
        os.link(sources[i % len(sources)], folder / f"{i:07d}.jpg")
    return root


def drop_caches() -> bool:
    """Empty the OS page, dentry and inode caches (root only): the next listing reads the disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    except OSError:
        return False
    return True


def timed(work: Callable[[], Any]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


# --------------------------------------------------------------------------- 1. index


def bench_index(args: argparse.Namespace, work: Path, device: torch.device, argv: list[str] | None) -> dict[str, Any]:
    sources = write_jpegs(work / "sources256", 200, (256, 256))
    rows = []
    cold_possible = args.drop_caches and drop_caches()
    with OtherProcessesCpu() as others:
        for files in args.sizes:
            root = link_tree(work / f"tree{files}", sources, files)
            then = time.time() - 3600  # a dataset written an hour ago: folders just written cannot vouch for a listing
            for folder in [root, *root.iterdir()]:
                os.utime(folder, (then, then))
            cached, fresh = work / f"index{files}", (work / f"fresh{files}-{n}" for n in itertools.count())

            def ours(launch: str) -> Callable[[], Any]:
                def run() -> None:
                    # A first launch (and the full check, as before this change) finds no index: an empty cache_dir.
                    cache = cached if launch in ("warm reuse", "other rank") else next(fresh)
                    dm = ImageFolderDataModule(root=str(root), num_workers=0, cache_dir=str(cache),
                                               verify_images=launch == "verify_images=true")
                    if launch == "other rank":
                        dm.trainer = SimpleNamespace(local_rank=1, world_size=1, num_devices=1)  # local rank 0 indexed it
                    dm.setup("fit")

                return run

            cases: dict[str, Callable[[], Any]] = {
                "torchvision ImageFolder": lambda: ImageFolder(str(root)),
                "ours, first launch": ours("first launch"),
                "ours, relaunch, warm reuse (no folder changed)": ours("warm reuse"),
                "ours, other rank": ours("other rank"),
            }
            if files <= args.verify_max:
                cases["ours, verify_images=true (setup before this change)"] = ours("verify_images=true")
            ImageFolderDataModule(root=str(root), cache_dir=str(cached)).setup("fit")  # for relaunch and other rank
            seconds: dict[tuple[str, str], list[float]] = {}
            for cache_state in (("cold", "warm") if cold_possible else ("warm",)):
                repeats = 1 if cache_state == "cold" else args.repeats
                for repeat in range(repeats):
                    for name in cases if repeat % 2 == 0 else list(cases)[::-1]:
                        if cache_state == "cold":
                            drop_caches()
                        seconds.setdefault((cache_state, name), []).append(timed(cases[name]))
            for (cache_state, name), samples in seconds.items():
                base = median(seconds[(cache_state, "torchvision ImageFolder")])
                cold_listing = median(seconds[(cache_state, "ours, first launch")])
                rows.append({"files": files, "OS cache": cache_state, "case": name, "seconds": median(samples),
                             "µs per file": median(samples) / files * 1e6, "vs ImageFolder": median(samples) / base,
                             "vs first launch": median(samples) / cold_listing, "samples": samples})
            shutil.rmtree(root)
            for folder in work.glob(f"*{files}*"):
                shutil.rmtree(folder)
    notes = [
        f"Trees: hard links to 200 distinct 256×256 JPEGs, 200 per class folder; median of {args.repeats} warm "
        "repeats (order alternating), 1 cold run per case after dropping the OS caches"
        + ("" if cold_possible else " (not possible here: cold rows missing; run as root with --drop-caches)") + ".",
        "ours = ImageFolderDataModule(...).setup('fit'): listing (scandir + stat for the cache key), the class map, "
        "the stratified 80/20 split and both datasets. ImageFolder = torchvision's constructor (os.walk + sort).",
    ]
    columns = ["files", "OS cache", "case", "seconds", "µs per file", "vs ImageFolder", "vs first launch"]
    return report("folder: index time vs torchvision ImageFolder", SCRIPT, argv, args, device, rows, columns, notes,
                  others_cpu=others.share)


# --------------------------------------------------------------------------- 2. memory


class PathListDataset(ImageFileDataset):
    """The dataset as it was: a Python list of Path objects and one of ints, read by every worker."""

    def __init__(self, dataset: ImageFileDataset) -> None:
        super().__init__(dataset.files, dataset.labels, dataset.transform, dataset.seed)
        self.files = list(dataset.files)  # type: ignore[assignment]
        self.labels = dataset.labels.tolist()  # type: ignore[assignment]


def memory_mib(process: psutil.Process) -> tuple[float, float]:
    info = process.memory_full_info()
    return info.rss / 2**20, info.uss / 2**20


def epoch_memory(dataset: ImageFileDataset, args: argparse.Namespace) -> dict[str, Any]:
    """Each worker's RSS/USS after its first batch, a tenth into the epoch and at its end; the main process's peak RSS.

    From a tenth on, allocator and library warm-up is over: growth after that is what
    reading the dataset costs per item.
    """
    loader = DataLoader(dataset, batch_size=args.memory_batch, num_workers=2, shuffle=True,
                        generator=torch.Generator().manual_seed(0), persistent_workers=True)
    me = psutil.Process()
    snapshots: list[dict[int, tuple[float, float]]] = []
    peak_main = 0.0
    start = time.perf_counter()
    for step, _ in enumerate(loader):
        if step in (2, len(loader) // 10):  # by step 2 both workers have delivered a batch
            snapshots.append({child.pid: memory_mib(child) for child in me.children()})
        if step % 20 == 0:
            peak_main = max(peak_main, me.memory_info().rss / 2**20)
    seconds = time.perf_counter() - start
    snapshots.append({child.pid: memory_mib(child) for child in me.children()})
    peak_main = max(peak_main, me.memory_info().rss / 2**20)
    del loader  # ends the persistent workers
    first, tenth, last = snapshots
    workers = sorted(last)

    def trace(kind: int) -> str:
        return ", ".join(f"{first[p][kind]:.0f}→{tenth[p][kind]:.0f}→{last[p][kind]:.0f}" for p in workers)

    return {
        "seconds": seconds, "main peak RSS MiB": peak_main, "worker RSS MiB": trace(0), "worker USS MiB": trace(1),
        "RSS growth, first batch→end": max(last[p][0] / first[p][0] - 1 for p in workers),
        "USS growth MiB, 10%→end": max(last[p][1] - tenth[p][1] for p in workers),
    }


def bench_memory(args: argparse.Namespace, work: Path, device: torch.device, argv: list[str] | None) -> dict[str, Any]:
    sources = write_jpegs(work / "sources64", 100, (64, 64), seed=1)
    root = link_tree(work / "memory", sources, args.memory_files)
    dm = ImageFolderDataModule(root=str(root), num_workers=0, val_fraction=0.01, resolution=32)
    dm.set_preprocessing(Preprocessing(resolution=32))
    dm.setup("fit")
    ours = dm.dataset("train")
    rows = []
    with OtherProcessesCpu() as others:
        for name, dataset in (("ours: numpy path buffer", ours),
                              ("before: list of Path objects", PathListDataset(ours))):
            rows.append({"dataset": name, "files": len(dataset), **epoch_memory(dataset, args)})
    shutil.rmtree(root)
    notes = [
        f"One epoch of {len(ours)} files (hard links to 100 distinct 64×64 JPEGs), 32 px random crops, batch "
        f"{args.memory_batch}, 2 workers (fork). Worker memory after its first batch → a tenth into the epoch → at "
        "the end, per worker. RSS counts the pages a worker shares with the main process; USS only the pages it has to "
        "itself, which is what grows when reading Python objects writes their reference counts (copy-on-read).",
    ]
    columns = ["dataset", "files", "seconds", "main peak RSS MiB", "worker RSS MiB", "RSS growth, first batch→end",
               "worker USS MiB", "USS growth MiB, 10%→end"]
    return report("folder: worker memory over one epoch", SCRIPT, argv, args, device, rows, columns, notes,
                  others_cpu=others.share)


# --------------------------------------------------------------------------- 3. decode


def bench_decode(args: argparse.Namespace, work: Path, device: torch.device, argv: list[str] | None) -> dict[str, Any]:
    preprocessing = Preprocessing(resolution=args.resolution)
    rows = []
    for width, height in ((500, 375), (3000, 2000)):
        files = write_jpegs(work / f"decode{width}", args.decode_files, (width, height), seed=2)
        labels = np.zeros(len(files), dtype=np.int64)

        def worker(train: bool, draft: bool) -> Callable[[], int]:
            dataset = ImageFileDataset(files, labels, worker_transform(preprocessing, train=train, draft=draft))
            keys = _keys(len(files))

            def run() -> int:
                for _ in range(args.decode_batch):
                    dataset[next(keys)]
                return args.decode_batch

            return run

        def on_device(train: bool) -> Callable[[], int]:
            dataset = EncodedImageFileDataset(files, labels, preprocessing, train=train, split="train")
            keys = _keys(len(files))

            def run() -> int:
                batch, y = dataset.collate_fn([dataset[next(keys)] for _ in range(args.decode_batch)])
                dataset.decode_batch(batch.to(device), y.to(device))
                return args.decode_batch

            return run

        cases = {
            ("train crop", "full decode (before)"): worker(train=True, draft=False),
            ("train crop", "draft decode"): worker(train=True, draft=True),
            ("train crop", f"device decode ({device.type})"): on_device(train=True),
            ("eval crop", "full decode (worker)"): worker(train=False, draft=False),
            ("eval crop", f"device decode ({device.type})"): on_device(train=False),
        }
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a DataLoader worker; on a shared machine, extra threads only add noise
        try:
            rates, others = interleaved(cases, repeats=args.repeats, warmup=1, device=device)
        finally:
            torch.set_num_threads(threads)
        for (crop, path), samples in rates.items():
            base = rates[(crop, next(p for c, p in rates if c == crop))]
            paired = paired_ratios(samples, base)
            rows.append({"JPEG": f"{width}×{height}", "crop": crop, "path": path, "img/s per process": median(samples),
                         "vs full decode": median(samples) / median(base),
                         "paired": f"{median(paired):.2f} [{min(paired):.2f}, {max(paired):.2f}]",
                         "others' CPU": f"{others:.0%}", "samples": samples})
    notes = [
        f"{args.resolution} px, {args.decode_files} distinct files per size, {args.decode_batch} images per call, "
        "1 torch thread (as in a DataLoader worker), "
        f"median of {args.repeats} interleaved repeats; paired: the ratio within each repeat, median [min, max]. "
        "Device decode on the CPU counts reading the bytes (a worker's share) and decoding + cropping (the device's "
        "share) in one process.",
    ]
    columns = ["JPEG", "crop", "path", "img/s per process", "vs full decode", "paired", "others' CPU"]
    return report("folder: decode paths, one process", SCRIPT, argv, args, device, rows, columns, notes)


def _keys(count: int) -> Iterator[tuple[int, int]]:
    """(index, epoch) keys over the files, a new epoch (new crops) each pass."""
    epoch = 0
    while True:
        yield from ((i, epoch) for i in range(count))
        epoch += 1


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, batch_size=None, resolution=224, repeats=3)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 200000], help="files in the index trees")
    parser.add_argument("--verify-max", type=int, default=20000, help="largest tree to time verify_images=true on")
    parser.add_argument("--drop-caches", action="store_true", help="time cold rows after dropping the OS caches (root)")
    parser.add_argument("--memory-files", type=int, default=100000)
    parser.add_argument("--memory-batch", type=int, default=256)
    parser.add_argument("--decode-files", type=int, default=16)
    parser.add_argument("--decode-batch", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the trees (default: a temp dir)")
    args = parser.parse_args(argv)
    device = setup_device(args)
    benches = {"index": bench_index, "memory": bench_memory, "decode": bench_decode}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        payloads = [benches[name](args, Path(tmp), device, argv) for name in args.sections]
    return {**payloads[0], "sections": payloads[1:]}


if __name__ == "__main__":
    main(sys.argv[1:])
