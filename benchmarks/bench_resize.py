"""Where to upsample 32 px CIFAR images: on the device after transfer, or in CPU workers?

"CPU workers" is the classic pipeline: each worker turns an image into PIL, resizes it
with torchvision's Resize and hands over a full-resolution uint8 tensor, which is then
copied to the device and normalised there. "Device" is ours: workers hand over the 32 px
uint8 tensor and `device_transform` resizes and normalises the batch on the device. Both are
timed from the DataLoader to a normalised batch on the device, for each worker count;
"per worker" divides by the number of processes doing the loading.

    .venv/bin/python benchmarks/bench_resize.py --resolution 224 --workers 0 1 2
    .venv/bin/python benchmarks/bench_resize.py --device cuda --resolution 224 --batch-size 256 --workers 1 2 4 8 --batches 20
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.transforms.functional import pil_to_tensor

from common import add_common_args, cycle, interleaved, median, report, setup_device
from finetune.datamodules import DigitsDataModule
from finetune.datamodules.base import InMemoryImageDataset

SCRIPT = "bench_resize.py"
COLUMNS = ["resize in", "workers", "img/s", "img/s per worker", "bytes/img to device", "res", "batch"]


class PILResizeDataset(Dataset):
    """The CPU-side pipeline: uint8 array -> PIL image -> Resize -> uint8 tensor, per image."""

    def __init__(self, images: Tensor, labels: Tensor, resolution: int) -> None:
        self.arrays = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = labels
        self.resize = transforms.Resize((resolution, resolution), antialias=True)

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return pil_to_tensor(self.resize(Image.fromarray(self.arrays[index]))), self.labels[index]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, batch_size=64, resolution=224, repeats=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts to try")
    parser.add_argument("--batches", type=int, default=4, help="batches per timed repeat")
    parser.add_argument("--images", type=int, default=2048, help="32 px source images")
    args = parser.parse_args(argv)
    device = setup_device(args)

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 100, (args.images,), generator=g)
    # Any in-memory datamodule's device transform; only its resolution and normalisation matter here.
    transform = DigitsDataModule(num_workers=0, resolution=args.resolution, channels_last=args.channels_last)
    sources = {"CPU workers (PIL Resize)": PILResizeDataset(images, labels, args.resolution),
               "device (device_transform)": InMemoryImageDataset(images, labels)}

    def case(dataset: Dataset, workers: int) -> Callable[[], int]:
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                            pin_memory=device.type == "cuda", persistent_workers=workers > 0, drop_last=True)
        batches = cycle(loader)

        def run() -> int:
            for _ in range(args.batches):
                x, _ = next(batches)
                transform.device_transform(x.to(device, non_blocking=True), train=False)
            return args.batches * args.batch_size

        return run

    pil = sources["CPU workers (PIL Resize)"]
    resident = images[: args.batch_size].to(device)

    def one_worker() -> int:  # a worker's own work, without the loader around it
        n = args.batches * args.batch_size
        torch.stack([pil[i % len(pil)][0] for i in range(n)])
        return n

    def device_only() -> int:  # the device's own work on a batch already there
        for _ in range(args.batches):
            transform.device_transform(resident, train=False)
        return args.batches * args.batch_size

    cases: dict[tuple[str, int | str], Callable[[], int]] = {
        ("CPU: PIL Resize only, one process", 1): one_worker,
        ("device: device_transform only, batch on device", "-"): device_only,
    }
    cases |= {(where, workers): case(dataset, workers) for workers in args.workers for where, dataset in sources.items()}
    rates, others = interleaved(cases, repeats=args.repeats, warmup=args.warmup, device=device)
    rows = []
    for (where, workers), samples in rates.items():
        cpu_side = where.startswith("CPU")
        rows.append({
            "resize in": where, "workers": workers, "img/s": median(samples),
            "img/s per worker": median(samples) / max(workers, 1) if cpu_side else None,
            "bytes/img to device": 3 * (args.resolution**2 if cpu_side else 32 * 32),
            "res": args.resolution, "batch": args.batch_size, "samples": samples,
        })
    notes = [f"32 -> {args.resolution} px, median of {args.repeats} interleaved repeats x {args.batches} batches, "
             f"{args.warmup} warmup; 0 workers: the main process loads (counted as one). Workers needed to feed "
             "a model at R img/s with CPU resizing: R / (img/s per worker of the 'only' row)."]
    return report("resize: device vs CPU workers", SCRIPT, argv, args, device, rows, COLUMNS, notes, others_cpu=others)


if __name__ == "__main__":
    main(sys.argv[1:])
