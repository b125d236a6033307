"""Frozen vs partial vs full (and frozen on cached features): epoch time and peak memory.

Each policy is a real `lightning.Trainer` fit of `FineTuneModule` on the real
`CIFAR100DataModule` reading the same CIFAR-100-format files (written here; augment off,
which feature caching requires, so every row sees the same data). Epoch time is the
train epoch only (no validation), the median over the epochs after the first of every
repeat; "fit s" also holds the one-time work, such as extracting cached features. Peak
memory is the growth over the fit: on a GPU the allocator's peak, weights included (Lightning
moves the model there inside the fit); on the CPU the peak RSS growth, weights excluded
(they were allocated before). Gradients, optimizer state and activations count on both.

    .venv/bin/python benchmarks/bench_policies.py --resolution 128
    .venv/bin/python benchmarks/bench_policies.py --device cuda --precision bf16 --resolution 224 --batch-size 128 --batches 100
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from common import OtherProcessesCpu, PeakMemory, add_common_args, median, report, setup_device, synchronize, write_cifar100
from finetune.datamodules import CIFAR100DataModule
from finetune.training.features import CachedFeatureDataModule
from finetune.training.module import FineTuneModule

SCRIPT = "bench_policies.py"
POLICIES: dict[str, dict[str, Any]] = {
    "full": {"name": "full"},
    "partial (last 2 stages)": {"name": "partial", "trainable_stages": 2},
    "frozen": {"name": "frozen"},
    "frozen + cached features": {"name": "frozen", "cache_features": True},
}
COLUMNS = ["policy", "epoch s", "vs full", "fit s", "peak MiB", "images/epoch", "res", "batch"]


class EpochTimer(L.Callback):
    """Wall time of each train epoch, device work included."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        self.seconds.append(time.perf_counter() - self._start)


def fit_once(policy: dict[str, Any], root: Path, args: argparse.Namespace, device: torch.device, epochs: int) -> dict[str, Any]:
    """One fit from the same seed; its epoch times, total time and peak memory."""
    L.seed_everything(0, verbose=False)
    dm = CIFAR100DataModule(root=str(root), batch_size=args.batch_size, num_workers=args.num_workers,
                            resolution=args.resolution, val_fraction=0.0, augment=False,
                            channels_last=args.channels_last, pin_memory=device.type == "cuda")
    model = {"name": args.model, "pretrained": None, "resolution": args.resolution, "grad_checkpointing": args.grad_checkpointing}
    module = FineTuneModule(model=model, num_classes=dm.num_classes, finetune=policy)
    dm.set_preprocessing(module.preprocessing)
    if args.channels_last:
        module.model.to(memory_format=torch.channels_last)
    if args.compile:
        module.model.compile()
    data = CachedFeatureDataModule(dm) if policy.get("cache_features") else dm
    timer = EpochTimer()
    trainer = L.Trainer(
        accelerator=device.type, devices=[device.index or 0] if device.type == "cuda" else 1, max_epochs=epochs,
        precision="bf16-mixed" if args.precision == "bf16" else "32-true", benchmark=device.type == "cuda",
        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        trainer.fit(module, datamodule=data)
        synchronize(device)
        seconds = time.perf_counter() - start
    return {"epochs": timer.seconds, "fit": seconds, "peak": peak.peak_bytes}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, batch_size=32, resolution=224, repeats=2,
                    warmup_help="leading epochs of each fit left out of the epoch time (allocation, autotuning)")
    parser.add_argument("--model", default="b0")
    parser.add_argument("--batches", type=int, default=4, help="batches per epoch (the train split is batches x batch size)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per fit, after the warmup ones")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES))
    args = parser.parse_args(argv)
    device = setup_device(args)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    results: dict[str, list[dict[str, Any]]] = {name: [] for name in args.policies}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_cifar100(root, n_train=args.batches * args.batch_size, n_test=args.batch_size)
        fit_once(POLICIES["full"], root, args, device, epochs=1)  # one-time process costs land here, untimed
        with OtherProcessesCpu() as others:
            for repeat in range(args.repeats):
                for name in args.policies if repeat % 2 == 0 else args.policies[::-1]:
                    results[name].append(fit_once(POLICIES[name], root, args, device, epochs=args.warmup + args.epochs))

    def epoch_seconds(name: str) -> float:
        return median([s for run in results[name] for s in run["epochs"][args.warmup:]])

    rows = []
    for name, runs in results.items():
        peaks = [run["peak"] for run in runs]
        rows.append({
            "policy": name, "epoch s": epoch_seconds(name), "fit s": median([run["fit"] for run in runs]),
            "vs full": epoch_seconds(name) / epoch_seconds("full") if "full" in results else None,
            "peak MiB": median(peaks) / 2**20 if None not in peaks else None,
            "images/epoch": args.batches * args.batch_size, "res": args.resolution, "batch": args.batch_size,
            "epoch samples": [s for run in runs for s in run["epochs"]], "fit samples": [run["fit"] for run in runs],
        })
    notes = [f"model {args.model} (random init), {args.precision}, channels_last={args.channels_last}, compile={args.compile}, "
             f"grad_checkpointing={args.grad_checkpointing}, {args.num_workers} workers; epoch time: median of "
             f"{args.repeats} interleaved fits x {args.epochs} epochs after {args.warmup} warmup epoch(s)."]
    return report("policies: epoch time and peak memory", SCRIPT, argv, args, device, rows, COLUMNS, notes, others_cpu=others.share)


if __name__ == "__main__":
    main(sys.argv[1:])
