"""Largest training batch per variant at its full resolution, with and without gradient checkpointing.

A batch "fits" when a whole train step (forward, loss, backward, AdamW update, so the
optimizer state is counted) runs without a CUDA out-of-memory error. Doubling finds a
batch that fails, bisection the largest that does not. Also reported: the allocator's
peak at that batch and its images/s, the price of recomputation. CUDA only: on a CPU the
answer would be the machine's RAM, not the accelerator's.

    .venv/bin/python benchmarks/bench_memory.py --device cuda --precision bf16 --variants b4 b5 b6 b7
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from common import add_common_args, autocast, median, report, setup_device
from finetune.models import create_model
from finetune.models.scaling import VARIANTS

SCRIPT = "bench_memory.py"
B_VARIANTS = [f"b{i}" for i in range(8)]
COLUMNS = ["variant", "res", "grad checkpointing", "largest batch", "peak GiB", "img/s at that batch"]


class Trial:
    """One model and optimizer on the device, tried at growing batch sizes."""

    def __init__(self, variant: str, resolution: int, checkpointing: bool, args: argparse.Namespace, device: torch.device) -> None:
        self.model = create_model(variant, num_classes=1000, resolution=resolution).to(device).train()
        if args.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model.set_grad_checkpointing(checkpointing)
        self.runner = torch.compile(self.model) if args.compile else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.resolution, self.args, self.device = resolution, args, device

    def step(self, batch: int) -> None:
        x = torch.randn(batch, 3, self.resolution, self.resolution, device=self.device)
        if self.args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (batch,), device=self.device)
        with autocast(self.device, self.args.precision):
            loss = F.cross_entropy(self.runner(x), y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def fits(self, batch: int) -> bool:
        try:
            self.step(batch)
            torch.cuda.synchronize(self.device)
            return True
        except torch.cuda.OutOfMemoryError:
            self.optimizer.zero_grad(set_to_none=True)
            return False
        finally:
            gc.collect()
            torch.cuda.empty_cache()

    def largest_batch(self, limit: int) -> int:
        good, bad = 0, 1
        while bad <= limit and self.fits(bad):
            good, bad = bad, bad * 2
        bad = min(bad, limit + 1)
        while bad - good > 1:
            mid = (good + bad) // 2
            good, bad = (mid, bad) if self.fits(mid) else (good, mid)
        return good

    def measure(self, batch: int, repeats: int) -> tuple[float, float]:
        """(peak GiB, images/s) of steps at `batch`."""
        for _ in range(self.args.warmup):
            self.step(batch)
        torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            self.step(batch)
            torch.cuda.synchronize(self.device)
            times.append(time.perf_counter() - start)
        return torch.cuda.max_memory_allocated(self.device) / 2**30, batch / median(times)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, batch_size=None, resolution=None, repeats=3, warmup_help="untimed steps at the largest batch before timing it")
    parser.add_argument("--variants", nargs="+", choices=B_VARIANTS, default=B_VARIANTS)
    parser.add_argument("--max-batch", type=int, default=2048, help="stop searching above this batch")
    args = parser.parse_args(argv)
    device = setup_device(args)
    if device.type != "cuda":
        note = f"bench_memory.py measures accelerator memory and needs CUDA (--device cuda); got --device {args.device}: nothing measured."
        return report("memory: largest batch per variant", SCRIPT, argv, args, device, [], COLUMNS, [note])
    rows = []
    for variant in args.variants:
        resolution = args.resolution or VARIANTS[variant].resolution
        for checkpointing in (False, True):
            trial = Trial(variant, resolution, checkpointing, args, device)
            batch = trial.largest_batch(args.max_batch)
            peak, rate = trial.measure(batch, args.repeats) if batch else (None, None)
            rows.append({"variant": variant, "res": resolution, "grad checkpointing": checkpointing,
                         "largest batch": batch, "peak GiB": peak, "img/s at that batch": rate})
            del trial
            gc.collect()
            torch.cuda.empty_cache()
    notes = [f"{args.precision}, channels_last={args.channels_last}, compile={args.compile}, AdamW; "
             f"batch search capped at {args.max_batch}; img/s: median of {args.repeats} steps at the largest batch."]
    return report("memory: largest batch per variant", SCRIPT, argv, args, device, rows, COLUMNS, notes)


if __name__ == "__main__":
    main(sys.argv[1:])
