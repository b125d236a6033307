"""finetune-evaluate's memory at scale: the per-batch `ScoreKeeper` against keeping every probability (issue 20).

No model: random logits of N images × C classes go through what evaluation does after the forward
pass (softmax, `report_metrics`, the kept top-k), batch by batch. `kept` is the code evaluation runs;
`full` is the former way (every probability concatenated, the metrics updated once). Each mode runs
in its own process, so the peak RSS (`ru_maxrss`) is that mode's alone.

    .venv/bin/python benchmarks/bench_evaluate.py --images 100000 --classes 1000 --mode kept
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from finetune.commands.evaluate import ScoreKeeper
from finetune.analysis.reports import report_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--mode", choices=("kept", "full"), default="kept")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    keeper = ScoreKeeper(args.classes, 5, torch.device("cpu"), images=args.images) if args.mode == "kept" else None
    full_probs, full_labels = [], []
    for first in range(0, args.images, args.batch_size):
        n = min(args.batch_size, args.images - first)
        probs = torch.randn(n, args.classes, generator=generator).softmax(-1)
        labels = torch.randint(0, args.classes, (n,), generator=generator)
        if keeper is not None:
            keeper.update(probs, labels)
        else:
            full_probs.append(probs)
            full_labels.append(labels)
    if keeper is not None:
        scores = keeper.scores()
        kept = sum(t.numel() * t.element_size() for t in (scores.top_probs, scores.top_classes, scores.labels))
    else:
        metrics = report_metrics(args.classes)
        probs = torch.cat(full_probs)
        metrics.update(probs, torch.cat(full_labels))
        metrics.compute()
        kept = probs.numel() * probs.element_size()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"mode={args.mode} images={args.images} classes={args.classes}: {seconds:.1f} s, kept {kept / 2**20:.1f} MiB, "
          f"peak RSS {peak / 2**10:.0f} MiB ({(peak - start_rss) / 2**10:.0f} MiB over the start)")


if __name__ == "__main__":
    main()
