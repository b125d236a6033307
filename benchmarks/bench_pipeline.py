"""Does the data starve the model? End-to-end images/s against the model-only step.

The real `CIFAR100DataModule` reads CIFAR-100-format files this script writes, batches
go to the device, `device_transform` crops, flips, resizes and normalises them there, and
our model takes a train step. The model-only case repeats the step on one batch that is
already transformed on the device. Both data paths are measured: CPU workers (uint8
batches, pinned, copied per step) and device-resident (uint8 splits on the device,
batches gathered there by index). Data-only rows show each path's ceiling.

    .venv/bin/python benchmarks/bench_pipeline.py --resolution 128
    .venv/bin/python benchmarks/bench_pipeline.py --device cuda --precision bf16 --resolution 224 --batch-size 256 \
        --train-size 50000 --steps 50 --warmup 20
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from common import add_common_args, autocast, cycle, interleaved, median, report, setup_device, write_cifar100
from finetune.datamodules import CIFAR100DataModule
from finetune.models import create_model

SCRIPT = "bench_pipeline.py"
COLUMNS = ["case", "img/s", "vs model-only", "res", "batch", "workers"]


def datamodule(root: Path, args: argparse.Namespace, trainer: L.Trainer, resident: bool) -> CIFAR100DataModule:
    """The datamodule as training configures it, attached to a Trainer for the device it serves."""
    dm = CIFAR100DataModule(
        root=str(root), batch_size=args.batch_size, num_workers=args.num_workers, resolution=args.resolution,
        val_fraction=0.0, channels_last=args.channels_last, pin_memory=trainer.strategy.root_device.type == "cuda",
        device_resident=resident,
    )
    dm.trainer = trainer  # what `trainer.fit` does: the datamodule learns its root device from it
    return dm


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, batch_size=32, resolution=224, repeats=3)
    parser.add_argument("--model", default="b0")
    parser.add_argument("--num-workers", type=int, default=2, help="workers of the CPU-worker path (the data config's)")
    parser.add_argument("--train-size", type=int, default=5000, help="images in the written train split")
    parser.add_argument("--steps", type=int, default=2, help="steps per timed repeat")
    args = parser.parse_args(argv)
    device = setup_device(args)

    model = create_model(args.model, num_classes=100, resolution=args.resolution).to(device).train()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    runner = torch.compile(model) if args.compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast(device, args.precision):
            loss = F.cross_entropy(runner(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_cifar100(root, n_train=args.train_size, n_test=args.batch_size)
        trainer = L.Trainer(accelerator=device.type, devices=[device.index or 0] if device.type == "cuda" else 1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False)
        workers = datamodule(root, args, trainer, resident=False)
        resident = datamodule(root, args, trainer, resident=True)
        worker_batches = cycle(workers.train_dataloader())
        resident_batches = cycle(resident.train_dataloader())
        images, labels = next(resident_batches)
        fixed = (workers.device_transform(images, train=True), labels)

        def case(batches: Any | None, dm: CIFAR100DataModule, step: bool) -> Callable[[], int]:
            def run() -> int:
                for _ in range(args.steps):
                    if batches is None:
                        x, y = fixed
                    else:
                        images, y = next(batches)
                        images = images.to(device, non_blocking=True)
                        y = y.to(device, non_blocking=True)
                        x = dm.device_transform(images, train=True)
                    if step:
                        train_step(x, y)
                return args.steps * args.batch_size

            return run

        cases = {
            "model only (batch already on device)": case(None, workers, step=True),
            "end-to-end, CPU workers": case(worker_batches, workers, step=True),
            "end-to-end, device-resident": case(resident_batches, resident, step=True),
            "data only, CPU workers": case(worker_batches, workers, step=False),
            "data only, device-resident": case(resident_batches, resident, step=False),
        }
        rates, others = interleaved(cases, repeats=args.repeats, warmup=args.warmup, device=device)

    base = median(rates["model only (batch already on device)"])
    rows = [{
        "case": name, "img/s": median(samples), "vs model-only": median(samples) / base, "res": args.resolution,
        "batch": args.batch_size, "workers": args.num_workers if "workers" in name else 0, "samples": samples,
    } for name, samples in rates.items()]
    notes = [f"model {args.model}, {args.precision}, channels_last={args.channels_last}, compile={args.compile}, "
             f"{args.train_size} train images, median of {args.repeats} interleaved repeats x {args.steps} steps, "
             f"{args.warmup} warmup; 'vs model-only' >= 0.9 means the data keeps up."]
    return report("pipeline: end-to-end vs model-only", SCRIPT, argv, args, device, rows, COLUMNS, notes, others_cpu=others)


if __name__ == "__main__":
    main(sys.argv[1:])
