"""Our EfficientNet vs timm's `efficientnet_bN`: train-step and inference images/s.

Both models live in one process with the same weights (ours loads timm's state dict),
the same input batch, resolution, memory format, precision and compile setting, and
run interleaved; the ratio ours/timm is what the target is set on (>= 1.00).

    .venv/bin/python benchmarks/bench_model.py --variants b0 --resolution 128
    .venv/bin/python benchmarks/bench_model.py --device cuda --precision bf16 --variants b0 b4 --batch-size 128
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from common import add_common_args, autocast, interleaved, median, paired_ratios, report, setup_device, synchronize
from finetune.models import create_model
from finetune.models.scaling import VARIANTS

SCRIPT = "bench_model.py"
B_VARIANTS = [f"b{i}" for i in range(8)]
MODES = ("train", "infer")
COLUMNS = ["variant", "mode", "res", "batch", "ours img/s", "timm img/s", "ours/timm", "paired: median [min, max]",
           "1st run s: ours / timm", "others' CPU"]


def build_pair(variant: str, device: torch.device, channels_last: bool) -> tuple[nn.Module, nn.Module]:
    """(ours, timm) with identical weights and the same dropout / stochastic depth."""
    drop_rate, drop_path_rate = VARIANTS[variant].dropout, 0.2
    ref = timm.create_model(f"efficientnet_{variant}", drop_rate=drop_rate, drop_path_rate=drop_path_rate)
    ours = create_model(variant, pretrained=ref.state_dict(), padding="symmetric", bn_eps=1e-5,
                        drop_rate=drop_rate, drop_path_rate=drop_path_rate)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return ours.to(device, memory_format=fmt), ref.to(device, memory_format=fmt)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               device: torch.device, precision: str) -> None:
    """What a fine-tuning step costs: forward, loss, backward, optimizer update."""
    with autocast(device, precision):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def infer_step(model: nn.Module, x: torch.Tensor, device: torch.device, precision: str) -> None:
    with torch.inference_mode(), autocast(device, precision):
        model(x)


def bench_variant(variant: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    ours, ref = build_pair(variant, device, args.channels_last)
    resolution = args.resolution or VARIANTS[variant].resolution
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, resolution, resolution, generator=g).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch_size,), generator=g).to(device)
    models = {"ours": ours, "timm": ref}
    runners = {name: torch.compile(m) if args.compile else m for name, m in models.items()}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for name, m in models.items()}

    def case(name: str, mode: str) -> Callable[[], int]:
        model = runners[name]

        def run() -> int:
            for _ in range(args.steps):
                if mode == "train":
                    train_step(model, optimizers[name], x, y, device, args.precision)
                else:
                    infer_step(model, x, device, args.precision)
            return args.steps * args.batch_size

        return run

    rows = []
    for mode in args.modes:
        for m in models.values():
            m.train(mode == "train")
        cases = {name: case(name, mode) for name in models}
        first_run = {}
        for name, run in cases.items():  # the first run holds compilation / autotuning: reported, kept out of the medians
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            first_run[name] = time.perf_counter() - start
        rates, others = interleaved(cases, repeats=args.repeats, warmup=args.warmup - 1, device=device)
        ratios = paired_ratios(rates["ours"], rates["timm"])
        rows.append({
            "variant": variant, "mode": mode, "res": resolution, "batch": args.batch_size,
            "ours img/s": median(rates["ours"]), "timm img/s": median(rates["timm"]),
            "ours/timm": median(rates["ours"]) / median(rates["timm"]),
            "paired: median [min, max]": f"{median(ratios):.3f} [{min(ratios):.2f}, {max(ratios):.2f}]",
            "paired median": median(ratios),
            "1st run s: ours / timm": f"{first_run['ours']:.2f} / {first_run['timm']:.2f}",
            "others' CPU": f"{others:.0%}",
            "ours samples": rates["ours"], "timm samples": rates["timm"],
        })
    del ours, ref, runners, optimizers
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, batch_size=32, resolution=None, repeats=7)
    parser.add_argument("--variants", nargs="+", choices=B_VARIANTS, default=["b0"])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=int, default=1, help="steps per timed repeat")
    args = parser.parse_args(argv)
    device = setup_device(args)
    rows = [row for variant in args.variants for row in bench_variant(variant, args, device)]
    notes = [f"{args.precision}, channels_last={args.channels_last}, compile={args.compile}, "
             f"median of {args.repeats} interleaved repeats x {args.steps} step(s), {args.warmup} warmup; "
             "resolution: the variant's own unless --resolution. ours/timm: ratio of the medians; paired: "
             "the ratio within each repeat (the two ran back to back). 1st run: the first, untimed repeat; ours runs "
             "first and also pays the process's one-time costs; with --compile it holds the compilation. others' CPU: share of "
             "the machine's CPU other processes used while the row was timed (0% = quiet)."]
    return report("model: ours vs timm", SCRIPT, argv, args, device, rows, COLUMNS, notes)


if __name__ == "__main__":
    main(sys.argv[1:])
