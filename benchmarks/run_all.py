"""`make bench`: the CPU suite, sized to finish in under 10 minutes on 2 cores.

Prints every markdown table and writes one JSON per benchmark to benchmarks/results/
(command, machine, library versions, config, per-repeat samples). The GPU commands are
in benchmarks/RESULTS.md; run them on a CUDA machine with `--device cuda`.

    .venv/bin/python benchmarks/run_all.py
    .venv/bin/python benchmarks/run_all.py --only model_b0_train pipeline
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import bench_folder
import bench_memory
import bench_model
import bench_pipeline
import bench_policies
import bench_resize
from common import RESULTS_DIR, write_json

# name -> (benchmark entry point, arguments). B0 at 128 px with channels_last is the CPU target configuration.
SUITE: dict[str, tuple[Callable[[list[str]], dict[str, Any]], list[str]]] = {
    "model_b0_train": (bench_model.main, ["--variants", "b0", "--modes", "train", "--resolution", "128",
                                          "--batch-size", "32", "--repeats", "15", "--steps", "3"]),
    "model_b0_infer": (bench_model.main, ["--variants", "b0", "--modes", "infer", "--resolution", "128",
                                          "--batch-size", "32", "--repeats", "15", "--steps", "8"]),
    "model_b0_b7": (bench_model.main, ["--variants", *bench_model.B_VARIANTS, "--resolution", "64",
                                       "--batch-size", "8", "--repeats", "5"]),
    "pipeline": (bench_pipeline.main, ["--resolution", "128", "--batch-size", "32", "--repeats", "5", "--steps", "3"]),
    "policies": (bench_policies.main, ["--resolution", "128", "--batch-size", "32", "--batches", "4",
                                       "--epochs", "2", "--repeats", "3"]),
    "resize": (bench_resize.main, ["--resolution", "224", "--batch-size", "64", "--workers", "0", "1", "2",
                                   "--repeats", "3"]),
    "memory": (bench_memory.main, []),
    # Image folders at scale: index 20k/200k files, worker memory over a 100k-file epoch, decode paths (~5 min).
    "folder": (bench_folder.main, ["--drop-caches", "--repeats", "5"]),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(SUITE), default=list(SUITE))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    for name in args.only:
        entry, bench_args = SUITE[name]
        began = time.perf_counter()
        payload = entry(bench_args)
        payload["seconds"] = round(time.perf_counter() - began, 1)
        write_json(RESULTS_DIR / f"{name}.json", payload)
    print(f"\n{len(args.only)} benchmark(s) in {time.perf_counter() - start:.0f} s; JSON in {RESULTS_DIR}")


if __name__ == "__main__":
    main(sys.argv[1:])
