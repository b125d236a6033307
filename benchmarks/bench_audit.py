"""finetune-audit's cost: the whole audit against the feature pass alone, images/s and peak memory (issue 22).

A folder of crops of scikit-image photos (5 classes, train/ and val/) is written once. Each case
runs in its own process, so its peak RSS (`ru_maxrss`) is that case's alone: `features` builds
the datamodule and the network and extracts the pooled features of every split (what any audit
must do); `audit` runs `finetune.commands.audit.audit` on the same config, end to end, and times its
stages (features, probe fits, search and cleanlab, files written). Cases alternate ABBA over
the repeats; the ratios are taken within each repeat, and the medians reported.

    .venv/bin/python benchmarks/bench_audit.py --images 400 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OtherProcessesCpu, report  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")


def write_folder(root: Path, images: int, seed: int = 0) -> None:
    """`images` 160 px crops of five photos (one class each), 80% in train/, 20% in val/."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    for n in range(images):
        name = PHOTOS[n % len(PHOTOS)]
        photo = getattr(skimage.data, name)()
        h, w = photo.shape[:2]
        side = int(min(h, w) * rng.uniform(0.3, 0.6))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        folder = root / ("val" if (n // len(PHOTOS)) % 5 == 0 else "train") / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[y:y + side, x:x + side]).resize((160, 160)).save(folder / f"{n}.png")


def run_case(case: str, overrides: list[str], output: Path) -> dict[str, float]:
    """In this (child) process: the case's seconds, stage seconds and peak memory, as JSON on stdout."""
    import finetune.commands.audit as audit_module
    from finetune.commands.audit import audit, compose

    stages: dict[str, float] = {}

    def timed(name: str, function):
        def run(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            stages[name] = stages.get(name, 0.0) + time.perf_counter() - start
            return result
        return run

    start = time.perf_counter()
    if case == "features":
        from omegaconf import OmegaConf

        from finetune.training.features import pooled_features
        from finetune.training.probe import CHECKPOINT_POLICY
        from finetune.build import build_datamodule, build_module

        cfg = OmegaConf.merge(compose(overrides), {"finetune": CHECKPOINT_POLICY, "paths": {"output_dir": str(output)}})
        datamodule = build_datamodule(cfg)
        module = build_module(cfg, datamodule)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        datamodule.prepare_data()
        datamodule.setup(None)
        model = module.model.to(device).eval()
        images = sum(len(pooled_features(model, datamodule, split, device)[1]) for split in ("train", "val"))
    else:
        for name in ("pooled_features", "out_of_sample_probabilities", "find_issues", "write_outputs"):
            setattr(audit_module, name, timed(name, getattr(audit_module, name)))
        images = audit(overrides, output)["images"]["total"]
    seconds = time.perf_counter() - start
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"seconds": seconds, "images": images, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
            "peak_gpu_mb": peak_gpu, "stages": stages}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=224, help="lite0's default")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--case", choices=("features", "audit"), help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    overrides = lambda root: ["model=lite0", f"model.resolution={args.resolution}", "data=imagefolder",  # noqa: E731
                              f"data.root={root}"]
    if args.case:
        with tempfile.TemporaryDirectory() as out:
            print(json.dumps(run_case(args.case, overrides(args.root), Path(out))))
        return

    samples: dict[str, list[dict]] = {"features": [], "audit": []}
    with tempfile.TemporaryDirectory() as tmp, OtherProcessesCpu() as others:
        root = Path(tmp) / "photos"
        write_folder(root, args.images)
        for repeat in range(args.repeats):
            for case in (("features", "audit") if repeat % 2 == 0 else ("audit", "features")):
                child = [sys.executable, __file__, "--case", case, "--root", str(root),
                         "--resolution", str(args.resolution)]
                done = subprocess.run(child, capture_output=True, text=True, check=True)
                samples[case].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = []
    for case, runs in samples.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        rows.append({"case": case, "images": runs[0]["images"], "seconds": seconds,
                     "images/s": runs[0]["images"] / seconds,
                     "peak RSS (MB)": statistics.median(r["peak_rss_mb"] for r in runs),
                     "peak GPU (MB)": runs[0]["peak_gpu_mb"]})
    time_ratio = statistics.median(a["seconds"] / f["seconds"] for a, f in zip(samples["audit"], samples["features"]))
    memory_ratio = statistics.median(a["peak_rss_mb"] / f["peak_rss_mb"]
                                     for a, f in zip(samples["audit"], samples["features"]))
    stages = {name: statistics.median(r["stages"][name] for r in samples["audit"]) for name in samples["audit"][0]["stages"]}
    notes = [f"audit / features: time {time_ratio:.2f}x, peak RSS {memory_ratio:.2f}x (median of per-repeat ratios)",
             "audit stages (s, median): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items())]
    report("finetune-audit vs the feature pass alone", "bench_audit.py", argv, args,
           torch.device("cuda" if torch.cuda.is_available() else "cpu"), rows,
           ["case", "images", "seconds", "images/s", "peak RSS (MB)", "peak GPU (MB)"], notes, others.share)


if __name__ == "__main__":
    main()
