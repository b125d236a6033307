"""`finetune-compare`: several policies on identical data, seed and budget, reported side by side.

    finetune-compare experiment=demo "compare.policies=[frozen,partial,full]"

Each policy is one `fit` of the same composed config (only the `finetune` group differs),
logging under one TensorBoard root so the curves overlay. The report is read back from
those TensorBoard logs, so the table and the curves cannot disagree.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import psutil
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from finetune.errors import ConfigError, user_errors
from finetune.train import build_datamodule, fit, run_command


@dataclass
class PolicyResult:
    policy: str
    trainable_params: int
    best_val_acc: float
    test_acc: float | None
    epoch_seconds: float
    peak_memory_mb: float
    total_seconds: float
    cached_features: bool
    val_acc: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    best_checkpoint: str | None = None


class RunStats(L.Callback):
    """Train-epoch wall time (validation excluded), peak memory and trainable parameters.

    Peak memory is CUDA's allocator peak on GPU; on CPU, the peak rise of the process's
    resident memory over the run, sampled every 20 ms (lifetime peaks cannot be reset).
    """

    def __init__(self) -> None:
        self.epoch_seconds: list[float] = []
        self.peak_memory_mb = 0.0
        self.trainable_params = 0
        self._epoch_start = self._last_batch_end = 0.0
        self._sampling = threading.Event()
        self._sampler: threading.Thread | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
            return
        process = psutil.Process()
        baseline = process.memory_info().rss

        def sample() -> None:
            while not self._sampling.wait(0.02):
                self.peak_memory_mb = max(self.peak_memory_mb, (process.memory_info().rss - baseline) / 2**20)

        self._sampler = threading.Thread(target=sample, daemon=True)
        self._sampler.start()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = self._last_batch_end = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._last_batch_end = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_seconds.append(self._last_batch_end - self._epoch_start)
        self.trainable_params = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            self.peak_memory_mb = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        elif self._sampler is not None:
            self._sampling.set()
            self._sampler.join()


def compose(overrides: list[str]) -> DictConfig:
    """The `compare` config for these overrides, inside a running Hydra app or from Python."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose("compare", overrides=overrides)
    with initialize_config_module(config_module="conf", version_base="1.3"):
        return hydra_compose("compare", overrides=overrides)


def compare(overrides: list[str], output_dir: str | Path) -> list[PolicyResult]:
    """Fit every policy of `compare.policies`, then write comparison.{json,md,png} and the CAM figure."""
    out = Path(output_dir)
    base = compose(overrides)
    policies = list(base.compare.policies)
    if not policies or len(set(policies)) != len(policies):
        raise ConfigError(f"compare.policies must list distinct policies, got {policies}")
    results, best = [], {}
    for policy in policies:
        cache = policy == "frozen" and bool(base.compare.cache_frozen_features) and not base.data.get("augment", True)
        cfg = compose([
            *overrides, f"finetune={policy}", f"finetune.cache_features={cache}", f"run_name={policy}",
            f"paths.output_dir={out / 'runs' / policy}", f"paths.tensorboard_dir={out / 'tensorboard'}",
        ])
        stats, start = RunStats(), time.perf_counter()
        metrics = fit(cfg, extra_callbacks=[stats])
        total = time.perf_counter() - start
        series = read_scalars(out / "tensorboard" / policy)
        val_acc = [v for _, v in series.get("val/acc", [])]
        test = series.get("test/acc")
        results.append(PolicyResult(
            policy=policy, trainable_params=stats.trainable_params,
            best_val_acc=max(val_acc) if val_acc else float("nan"), test_acc=test[-1][1] if test else None,
            epoch_seconds=sum(stats.epoch_seconds) / max(1, len(stats.epoch_seconds)),
            peak_memory_mb=round(stats.peak_memory_mb, 1), total_seconds=round(total, 2), cached_features=cache,
            val_acc=val_acc, train_loss=[v for _, v in series.get("train/epoch_loss", [])],
            best_checkpoint=metrics.get("best_checkpoint"),
        ))
        best[policy] = metrics.get("best_checkpoint")
    write_reports(results, out)
    write_cam(base, best, out)
    return results


def read_scalars(tensorboard_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series under a TensorBoard folder, as (step, value) in logging order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(Path(tensorboard_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 1})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return series


def markdown_table(results: list[PolicyResult]) -> str:
    full = next((r for r in results if r.policy == "full"), None)
    lines = [
        "| policy | trainable params | best val acc | test acc | train epoch (s) | vs full | peak memory (MB) | total (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        name = f"{r.policy} (cached features)" if r.cached_features else r.policy
        test = f"{r.test_acc:.4f}" if r.test_acc is not None else "-"
        ratio = f"{r.epoch_seconds / full.epoch_seconds:.2f}x" if full and full.epoch_seconds else "-"
        lines.append(f"| {name} | {r.trainable_params:,} | {r.best_val_acc:.4f} | {test} | {r.epoch_seconds:.2f} | "
                     f"{ratio} | {r.peak_memory_mb:.0f} | {r.total_seconds:.1f} |")
    return "\n".join(lines)


def write_reports(results: list[PolicyResult], out: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    from finetune.cam import plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    (out / "comparison.md").write_text(markdown_table(results) + "\n")
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        acc_ax.plot(range(1, len(r.val_acc) + 1), r.val_acc, marker="o", label=r.policy)
        loss_ax.plot(range(1, len(r.train_loss) + 1), r.train_loss, marker="o", label=r.policy)
    acc_ax.set(title="validation accuracy", xlabel="epoch", ylabel="top-1")
    loss_ax.set(title="training loss", xlabel="epoch", ylabel="cross-entropy")
    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=110)
    plt.close(fig)


def write_cam(cfg: DictConfig, checkpoints: dict[str, str | None], out: Path) -> None:
    """Grad-CAM of each policy's best model on the same first val images, as PNG and in TensorBoard."""
    from torch.utils.tensorboard import SummaryWriter

    from finetune.cam import cam_figure, grad_cam, plt
    from finetune.module import FineTuneModule

    modules = {p: FineTuneModule.from_checkpoint(c) for p, c in checkpoints.items() if c}
    if not modules or cfg.compare.cam_images <= 0:
        return
    datamodule = build_datamodule(cfg)
    preprocessing = next(iter(modules.values())).preprocessing  # recorded by training, data overrides included
    datamodule.set_preprocessing(preprocessing)
    val = datamodule.dataset("val")
    picks = [val[i] for i in range(min(int(cfg.compare.cam_images), len(val)))]
    images = torch.stack([img for img, _ in picks])
    labels = torch.stack([torch.as_tensor(label) for _, label in picks])
    x = datamodule.gpu_transform(images, train=False)
    cams = {p: grad_cam(m.model, x, labels) for p, m in modules.items()}
    names = [datamodule.class_names[int(i)] for i in labels]
    shown = preprocessing.denormalize(x)  # exactly what the networks saw
    fig = cam_figure(shown, cams, names)
    fig.savefig(out / "comparison_cam.png", dpi=110)
    with SummaryWriter(str(out / "tensorboard" / "cam")) as writer:
        writer.add_figure("cam/comparison", fig)
    plt.close(fig)


def main() -> None:
    """The `finetune-compare` command."""
    run_command(hydra_main)


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="compare")
def hydra_main(cfg: DictConfig) -> None:
    with user_errors():
        hydra_cfg = HydraConfig.get()
        results = compare(list(hydra_cfg.overrides.task), hydra_cfg.runtime.output_dir)
        print(f"\nComparison in {hydra_cfg.runtime.output_dir} (tensorboard --logdir {hydra_cfg.runtime.output_dir}/tensorboard):\n")
        print(markdown_table(results))


if __name__ == "__main__":
    main()
