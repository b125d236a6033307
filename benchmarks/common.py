"""What every benchmark shares: flags, timing, peak memory, machine info, tables, CIFAR files.

Timing rules, the same in every script: warmup calls are run and thrown away (they hold
cudnn autotuning, torch.compile and allocator growth), the cases being compared run
interleaved within each repeat in alternating order (ABBA), so drift in clock speed or
in the load of a shared machine hits them alike, and the reported figure is the median
over repeats. Thread counts stay at torch's defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import datetime
import json
import os
import pickle
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PRECISIONS = ("fp32", "bf16")


def add_common_args(parser: argparse.ArgumentParser, *, batch_size: int | None, resolution: int | None, repeats: int,
                    warmup_help: str = "untimed calls of each case before timing (>= 1)") -> None:
    """The flags every script takes, with defaults sized for that script's CPU run (no --batch-size: searched for)."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16: autocast to bfloat16")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model(s); compilation is warmup")
    if batch_size is not None:
        parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--resolution", type=int, default=resolution)
    parser.add_argument("--repeats", type=int, default=repeats, help="timed repeats; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help=warmup_help)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")


def setup_device(args: argparse.Namespace) -> torch.device:
    """The device to run on; cudnn benchmark on CUDA, as the trainer does by default."""
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    return device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast as Lightning's bf16-mixed does it, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(cases: dict[Any, Callable[[], int]], *, repeats: int, warmup: int, device: torch.device
                ) -> tuple[dict[Any, list[float]], float]:
    """Items per second of each case, one value per repeat; and the CPU share others took meanwhile.

    Each case runs some work and returns how many items (images) it processed. Order
    alternates per repeat (ABC, CBA, ...) so neither side always runs first.
    """
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
    synchronize(device)
    rates: dict[Any, list[float]] = {name: [] for name in names}
    with OtherProcessesCpu() as others:
        for repeat in range(repeats):
            for name in names if repeat % 2 == 0 else names[::-1]:
                synchronize(device)
                start = time.perf_counter()
                items = cases[name]()
                synchronize(device)
                rates[name].append(items / (time.perf_counter() - start))
    return rates, others.share


class OtherProcessesCpu:
    """Share of the machine's CPU time that processes other than this one (and its children) used.

    On a shared machine other jobs steal cores in bursts and CPU timings swing by several
    times; this says how quiet the machine was while a benchmark ran (0.0 = quiet).
    """

    share: float = 0.0

    def __enter__(self) -> OtherProcessesCpu:
        self._machine, self._own = _machine_cpu(), _own_cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, total = (a - b for a, b in zip(_machine_cpu(), self._machine))
        self.share = max(0.0, busy - (_own_cpu() - self._own)) / total if total > 0 else 0.0


def _machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot; guest time is already in user."""
    t = psutil.cpu_times()
    total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
    return total - t.idle - getattr(t, "iowait", 0.0), total


def _own_cpu() -> float:
    """CPU seconds of this process, its finished children and its live ones (DataLoader workers)."""
    me = psutil.Process()
    t = me.cpu_times()
    seconds = t.user + t.system + t.children_user + t.children_system
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            ct = child.cpu_times()
            seconds += ct.user + ct.system
    return seconds


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    """Per-repeat ratios of two interleaved cases: each pair ran back to back, so load drift cancels."""
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak on a GPU, peak RSS growth on the CPU.

    torch's CPU tensors bypass Python's allocator, so tracemalloc sees none of them; the
    kernel's high-water mark (VmHWM) does. Writing 5 to /proc/self/clear_refs resets it,
    and malloc_trim first returns freed heap to the system, so memory a previous run left
    cached does not hide this run's growth. Linux only on the CPU; None elsewhere.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            self._base = _reset_cpu_peak()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._base is not None:
            self.peak_bytes = _proc_status_kib("VmHWM") * 1024 - self._base


def _malloc_trim() -> None:
    libc = ctypes.util.find_library("c")
    if libc and hasattr(ctypes.CDLL(libc), "malloc_trim"):
        ctypes.CDLL(libc).malloc_trim(0)


def _reset_cpu_peak() -> int | None:
    """Reset the RSS high-water mark; the current RSS in bytes, or None where that cannot be done."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _proc_status_kib("VmRSS") * 1024


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where and with what a number was measured: it means nothing without this."""
    import lightning
    import timm
    import torchvision

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Other processes' load skews CPU timings: the 1-minute load average when the run ended.
        "load_average_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "lightning": lightning.__version__,
    }
    if device.type == "cuda":
        info |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def command(script: str, argv: list[str] | None) -> str:
    """The command line that reproduces a run, whether started directly or from run_all."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join([".venv/bin/python", f"benchmarks/{script}", *args])


def report(name: str, script: str, argv: list[str] | None, args: argparse.Namespace, device: torch.device,
           rows: list[dict[str, Any]], columns: list[str], notes: list[str] | None = None,
           others_cpu: float | None = None) -> dict[str, Any]:
    """Print the markdown table (and notes), write --json if asked; the payload run_all stores."""
    notes = list(notes or [])
    if others_cpu is not None:
        notes.append(f"Other processes used {others_cpu:.0%} of the machine's CPU while this was timed (0% = quiet).")
    payload = {
        "benchmark": name,
        "command": command(script, argv),
        "machine": machine_info(device),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "others_cpu_share": others_cpu,
        "rows": rows,
        "notes": notes,
    }
    print(f"\n### {name}\n\n`{payload['command']}`\n")
    print(markdown_table(rows, columns))
    for note in payload["notes"]:
        print(f"\n{note}")
    if args.json is not None:
        write_json(args.json, payload)
    return payload


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def write_cifar100(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Random images in the CIFAR-100 python format (`cifar-100-python/{train,test,meta}`).

    The benchmarks time the real datamodule reading real-format files; pixel values do not
    change any timing here, so random ones spare a 160 MB download.
    """
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, 100, n)
        batch = {
            "batch_label": f"{name}ing batch 1 of 1",
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "fine_labels": fine.tolist(),
            "coarse_labels": (fine // 5).tolist(),
            "filenames": [f"img_{i:05d}.png" for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"fine_label_names": [f"class_{i}" for i in range(100)], "coarse_label_names": [f"super_{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def cycle(loader: Any) -> Iterator[Any]:
    """Endless batches over epochs, telling the sampler each new epoch as Lightning does."""
    epoch = 0
    while True:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1
