"""onnxruntime vs PyTorch: CPU inference img/s of what `finetune-export --format onnx` writes.

The same weights, the same input batch and the same thread count in one process; the two
run interleaved within each repeat (ABBA), so the ratio onnxruntime/PyTorch holds on a
machine whose load changes. Batch 1 runs the images one call at a time.

    .venv/bin/python benchmarks/bench_export.py                   # B0 at 224, batch 1 and 32, both paddings
    .venv/bin/python benchmarks/bench_export.py --paddings same --batch-sizes 1 8 32 --repeats 11
"""

from __future__ import annotations

import argparse
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime
import torch

from common import interleaved, median, paired_ratios, report
from finetune.exporting.formats import INPUT_NAME, check_onnx, export_onnx
from finetune.models import create_model

SCRIPT = "bench_export.py"
COLUMNS = ["variant", "padding", "res", "batch", "PyTorch img/s", "onnxruntime img/s", "ort/PyTorch",
           "paired: median [min, max]", "export rel. error", "others' CPU"]


def bench_padding(padding: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    model = create_model(args.variant, padding=padding, resolution=args.resolution).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, path, args.resolution)
        error = check_onnx(path, model, args.resolution)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the same cores for both
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    rows = []
    for batch in args.batch_sizes:
        calls = math.ceil(args.images / batch)
        x = torch.randn(batch, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(0))
        x_torch, x_numpy = x.contiguous(memory_format=fmt), x.numpy()

        def run_torch() -> int:
            with torch.inference_mode():
                for _ in range(calls):
                    model(x_torch)
            return calls * batch

        def run_onnx() -> int:
            for _ in range(calls):
                session.run(None, {INPUT_NAME: x_numpy})
            return calls * batch

        cases: dict[str, Callable[[], int]] = {"torch": run_torch, "onnx": run_onnx}
        rates, others = interleaved(cases, repeats=args.repeats, warmup=args.warmup, device=device)
        ratios = paired_ratios(rates["onnx"], rates["torch"])
        rows.append({
            "variant": args.variant, "padding": padding, "res": args.resolution, "batch": batch,
            "PyTorch img/s": median(rates["torch"]), "onnxruntime img/s": median(rates["onnx"]),
            "ort/PyTorch": median(rates["onnx"]) / median(rates["torch"]),
            "paired: median [min, max]": f"{median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}]",
            "export rel. error": f"{error:.1e}", "others' CPU": f"{others:.0%}",
            "samples": {"torch": rates["torch"], "onnx": rates["onnx"]},
        })
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="onnxruntime vs PyTorch CPU inference of an exported EfficientNet.")
    parser.add_argument("--variant", default="b0")
    parser.add_argument("--paddings", nargs="+", choices=("symmetric", "same"), default=["symmetric", "same"],
                        help="symmetric: timm/torchvision weights; same: TF-ported weights (explicit Pad ops in ONNX)")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--images", type=int, default=32, help="images per timed call of each case (whole batches)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each case before timing (>= 1)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="PyTorch's memory format (onnxruntime takes NCHW and chooses its own layout)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    rows = [row for padding in args.paddings for row in bench_padding(padding, args, device)]
    notes = [
        f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider, default graph optimisations, "
        f"intra-op threads = torch's {torch.get_num_threads()}); PyTorch eager fp32 under inference_mode, "
        f"{'channels_last' if args.channels_last else 'contiguous'}.",
        "Random weights (speed does not depend on their values); the ONNX file is what finetune-export writes "
        "(opset 18, dynamic batch axis), checked against PyTorch before timing (export rel. error).",
    ]
    others = max(float(r["others' CPU"].rstrip("%")) / 100 for r in rows)
    return report("Export: onnxruntime vs PyTorch, CPU inference", SCRIPT, argv, args, device, rows, COLUMNS, notes,
                  others_cpu=others)


if __name__ == "__main__":
    main()
