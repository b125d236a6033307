"""`finetune-compare`: models x policies on identical data, seed and budget, reported side by side.

    finetune-compare experiment=demo "compare.policies=[frozen,partial,full]"
    finetune-compare experiment=demo "compare.models=[lite0,lite1,lite2]" "compare.policies=[frozen,full]"

Each (model, policy) is one `fit`, logging under one TensorBoard root so the curves overlay. The
report is read back from those TensorBoard logs, so the table and the curves cannot disagree.

Every run's config is derived from the one config Hydra composed, not composed again: a second
composition could only replay the command line, and would lose a config built any other way. A
run swaps the `model` and `finetune` nodes for the options it names, read from
conf/<group>/<option>.yaml after the same-group files their defaults list (`_base`), and keeps
each value of those groups that the command line or an experiment set over the configured
option's own. So a `model.resolution` left at `${variant_resolution:${model.name}}` follows each
model (and `data.resolution` with it), while one set anywhere (`experiment=demo`: 96 px) holds
for every model, as do `model.pretrained=null` and the like.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import lightning as L
import psutil
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import default_collate
from torchmetrics.classification import MulticlassRecall

from finetune import build
from finetune.build import build_datamodule, fit
from finetune.cli import run_command
from finetune.configuration.checks import validate_config
from finetune.console import next_commands, route_to_run_log, say
from finetune.datamodules.augment import augmenting_keys, without_augmentation
from finetune.errors import user_errors
from finetune.models.efficientnet import EfficientNetConfig
from finetune.models.profile import params_and_macs

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Marker shapes of the frontier plot, one per model.
MARKERS = "osD^vP*Xhp<>"


@dataclass
class RunResult:
    """One (model, policy) run of the grid, as comparison.json records it."""

    model: str
    policy: str
    #: TensorBoard run name and folder under runs/: `<policy>`, or `<model>/<policy>` when several models run.
    run: str
    resolution: int
    #: All parameters of the network with its new head, and its multiply-adds per image at `resolution`.
    params: int
    macs: int
    trainable_params: int
    best_val_acc: float
    test_acc: float | None
    epoch_seconds: float
    train_images_per_second: float
    peak_memory_mb: float
    total_seconds: float
    cached_features: bool
    val_acc: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    best_checkpoint: str | None = None
    #: Validation accuracy of each class (its recall) at the validation of the best val/acc: the best checkpoint's.
    per_class_acc: dict[str, float] = field(default_factory=dict)


class RunStats(L.Callback):
    """Train-epoch wall time (validation excluded), images trained on, peak memory, and the network trained.

    Peak memory is CUDA's allocator peak on GPU; on CPU, the peak rise of the process's
    resident memory over the run, sampled every 20 ms (lifetime peaks cannot be reset).
    """

    def __init__(self) -> None:
        self.epoch_seconds: list[float] = []
        self.train_images = 0
        self.peak_memory_mb = 0.0
        self.trainable_params = 0
        self.model_config: EfficientNetConfig | None = None
        self._epoch_start = self._last_batch_end = 0.0
        self._sampling = threading.Event()
        self._sampler: threading.Thread | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.model_config = pl_module.model.config
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

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._last_batch_end = time.perf_counter()
        self.train_images += len(batch[1]) * trainer.world_size  # each process trains on its own share

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_seconds.append(self._last_batch_end - self._epoch_start)
        self.trainable_params = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            self.peak_memory_mb = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        elif self._sampler is not None:
            self._sampling.set()
            self._sampler.join()


class ClassRecall(L.Callback):
    """Each class's validation accuracy (its recall) at every validation of the fit, from the logits it scored.

    The module's validation step returns its logits, so this takes no extra pass, and they
    are what `val/acc` scored (with `trainer.ema_decay`, of the averaged weights swapped in).
    torchmetrics syncs the counts across processes under DDP.
    """

    def __init__(self) -> None:
        self.class_names: list[str] = []
        #: (logged val/acc, recall of each class) of each validation, sanity check excluded.
        self.validations: list[tuple[float, list[float]]] = []
        self._recall: MulticlassRecall | None = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self._recall is None:
            self.class_names = pl_module.class_names
            self._recall = MulticlassRecall(len(self.class_names), average="none")
        self._recall = self._recall.to(pl_module.device)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._recall.update(outputs, batch[1])  # validation labels are class indices, never mixed targets

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        recall = self._recall.compute().tolist()
        self._recall.reset()
        acc = trainer.callback_metrics.get("val/acc")
        if acc is not None:
            self.validations.append((float(acc), recall))

    def best(self) -> dict[str, float]:
        """Class name -> recall at the first validation of the highest val/acc: the one ModelCheckpoint keeps
        (monitor val/acc, mode max, replaced only by a strictly better score)."""
        if not self.validations:
            return {}
        _, recall = max(self.validations, key=lambda v: v[0])  # max keeps the first of equal scores
        return dict(zip(self.class_names, recall))


def compose(overrides: list[str]) -> DictConfig:
    """The `compare` config for these overrides (`finetune.build.compose` of conf/compare.yaml)."""
    return build.compose("compare", overrides)


def compare(overrides: list[str], output_dir: str | Path) -> list[RunResult]:
    """The Python API of `finetune-compare`: compose once for these overrides, then run the grid."""
    return compare_config(compose(overrides), output_dir)


def compare_config(cfg: DictConfig, output_dir: str | Path) -> list[RunResult]:
    """Fit every model x policy of `cfg.compare`, then write comparison.{json,md,png}, the frontier and the CAM figure."""
    out = Path(output_dir)
    base = copy.deepcopy(cfg)
    base.paths.output_dir, base.paths.tensorboard_dir = str(out), str(out / "tensorboard")
    validate_config(base)  # compare.models and compare.policies too, before any option file is read
    models = list(base.compare.models or []) or [base.model.name]
    runs = [run_config(base, model, policy, several_models=len(models) > 1)
            for model in models for policy in base.compare.policies]
    for run in runs:
        validate_config(run)  # e.g. lite2's weights package missing: said now, not after lite0 and lite1 trained
    results = [fit_run(run) for run in runs]
    write_reports(results, out, data_name(base))
    write_frontier(results, out)
    write_cam(runs[0], {r.run: r.best_checkpoint for r in results if r.model == models[0]}, out)  # the first model's
    return results


def run_config(base: DictConfig, model: str, policy: str, several_models: bool) -> DictConfig:
    """`base` for one run: its model and policy options, its folder under runs/ and its TensorBoard run name."""
    run = copy.deepcopy(base)
    if model != base.model.name:
        run.model = switch_option(base, "model", model)
    run.finetune = switch_option(base, "finetune", policy)
    if policy == "probe":  # a probe fits on the features of unaugmented images: its run reads them so
        run.data.merge_with(without_augmentation(base.data))
    unaugmented = not augmenting_keys(base.data)
    run.finetune.cache_features = policy == "frozen" and bool(base.compare.cache_frozen_features) and unaugmented
    run.run_name = f"{model}/{policy}" if several_models else policy
    run.paths.output_dir = str(Path(base.paths.output_dir) / "runs" / run.run_name)
    return run


def switch_option(cfg: DictConfig, group: str, option: str) -> DictConfig:
    """`cfg[group]` switched to another option of conf/<group>/, keeping what `cfg` set over its own option.

    The current option is the file its `name` names (every model and policy file names itself).
    Only keys the new option has are kept: `model.phi` does not follow a switch to lite0.
    """
    current = OmegaConf.to_container(cfg[group], resolve=False)
    own = OmegaConf.to_container(option_node(group, current["name"]), resolve=False)
    switched = option_node(group, option)
    kept = {k: v for k, v in current.items() if k in switched and (k not in own or own[k] != v)}
    return OmegaConf.merge(switched, kept)


def option_node(group: str, option: str) -> DictConfig:
    """conf/<group>/<option>.yaml as Hydra composes it into `group`: the same-group options its defaults list, then itself."""
    source = importlib.resources.files("finetune.conf") / group / f"{option}.yaml"
    if not source.is_file():  # a node registered from Python (finetune.configuration.store), e.g. optim/_defaults
        return OmegaConf.create(ConfigStore.instance().load(f"{group}/{option}.yaml").node)
    text = source.read_text()
    node = OmegaConf.create(text)
    defaults = list(node.pop("defaults", []))
    if text.startswith("# @package _global_"):  # finetune/probe.yaml: the group's values sit under its name
        node = node[group]
    order = defaults if "_self_" in defaults else [*defaults, "_self_"]
    return OmegaConf.merge(*(node if name == "_self_" else option_node(group, name) for name in order))


def fit_run(cfg: DictConfig) -> RunResult:
    """One `fit`, measured, with its scores read back from its TensorBoard run."""
    stats, recall, start = RunStats(), ClassRecall(), time.perf_counter()
    metrics = fit(cfg, extra_callbacks=[stats, recall])
    total = time.perf_counter() - start
    if cfg.finetune.name == "probe":
        return probe_result(cfg, metrics, total)
    series = read_scalars(Path(cfg.paths.tensorboard_dir) / cfg.run_name)
    val_acc = [v for _, v in series.get("val/acc", [])]
    test = series.get("test/acc")
    train_seconds = sum(stats.epoch_seconds)
    params, macs = params_and_macs(stats.model_config)
    return RunResult(
        model=str(cfg.model.name), policy=str(cfg.finetune.name), run=str(cfg.run_name),
        resolution=stats.model_config.resolution, params=params, macs=macs, trainable_params=stats.trainable_params,
        best_val_acc=max(val_acc) if val_acc else float("nan"), test_acc=test[-1][1] if test else None,
        epoch_seconds=train_seconds / max(1, len(stats.epoch_seconds)),
        train_images_per_second=stats.train_images / train_seconds if train_seconds > 0 else 0.0,
        peak_memory_mb=round(stats.peak_memory_mb, 1), total_seconds=round(total, 2),
        cached_features=bool(cfg.finetune.cache_features),
        val_acc=val_acc, train_loss=[v for _, v in series.get("train/epoch_loss", [])],
        best_checkpoint=metrics.get("best_checkpoint"),
        per_class_acc=recall.best(),
    )


def probe_result(cfg: DictConfig, metrics: dict[str, Any], total: float) -> RunResult:
    """A probe's row: one fit on features extracted once, so its one "epoch" is the whole fit and it trains the head only.

    Its best val acc is the best point of its regularisation path (what val/acc logged), its per-class
    accuracies that point's, and its peak memory is not sampled (no training loop to sample it in).
    """
    from finetune.training.module import FineTuneModule

    module = FineTuneModule.from_checkpoint(metrics["best_checkpoint"])
    network = module.model
    params, macs = params_and_macs(network.config)
    return RunResult(
        model=str(cfg.model.name), policy="probe", run=str(cfg.run_name), resolution=network.config.resolution,
        params=params, macs=macs, trainable_params=sum(p.numel() for p in network.classifier.parameters()),
        best_val_acc=metrics["best_val_acc"], test_acc=metrics.get("test/acc"), epoch_seconds=total,
        train_images_per_second=0.0, peak_memory_mb=0.0, total_seconds=round(total, 2), cached_features=False,
        val_acc=[metrics["best_val_acc"]], best_checkpoint=metrics["best_checkpoint"],
        per_class_acc=dict(zip(module.class_names, metrics["val/class_acc"])),
    )


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


def per_class_table(results: list[RunResult]) -> str:
    """Rows: classes; columns: runs. Where runs differ per class, not only on average."""
    shown = [r for r in results if r.per_class_acc]
    if not shown:
        return ""
    lines = ["| class | " + " | ".join(r.run for r in shown) + " |", "|---|" + "---:|" * len(shown)]
    for name in shown[0].per_class_acc:
        lines.append(f"| {name} | " + " | ".join(f"{r.per_class_acc.get(name, float('nan')):.4f}" for r in shown) + " |")
    return "\n".join(lines)


def markdown_table(results: list[RunResult]) -> str:
    """One row per run; with several models, also each model's size and cost (`vs full`: the same model's full run)."""
    several_models = len({r.model for r in results}) > 1
    head = "| policy | trainable params | best val acc | test acc | train epoch (s) | vs full | peak memory (MB) | total (s) |"
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if several_models:
        head, rule = "| model | resolution | params | GMACs " + head, "|---|---:|---:|---:" + rule
    lines = [head, rule]
    for r in results:
        full = next((f for f in results if f.model == r.model and f.policy == "full"), None)
        name = f"{r.policy} (cached features)" if r.cached_features else r.policy
        test = f"{r.test_acc:.4f}" if r.test_acc is not None else "-"
        ratio = f"{r.epoch_seconds / full.epoch_seconds:.2f}x" if full and full.epoch_seconds else "-"
        model = f"| {r.model} | {r.resolution} | {r.params:,} | {r.macs / 1e9:.3f} " if several_models else ""
        lines.append(f"{model}| {name} | {r.trainable_params:,} | {r.best_val_acc:.4f} | {test} | {r.epoch_seconds:.2f} | "
                     f"{ratio} | {r.peak_memory_mb:.0f} | {r.total_seconds:.1f} |")
    return "\n".join(lines)


def write_reports(results: list[RunResult], out: Path, data: str) -> None:
    """comparison.json, comparison.md and comparison.png; `data` names the data in the figure's title."""
    from finetune.analysis.cam import plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    per_class = per_class_table(results)
    per_class = f"\n\nPer-class validation accuracy (best checkpoint of each run):\n\n{per_class}" if per_class else ""
    (out / "comparison.md").write_text(markdown_table(results) + per_class + "\n")
    fig = comparison_figure(results, data)
    fig.savefig(out / "comparison.png", dpi=110)
    plt.close(fig)


def data_name(cfg: DictConfig) -> str:
    """The data a run trained on, as a figure names it: the datamodule (digits, cifar100, ...), an image folder's path."""
    name = str(cfg.data._target_).rsplit(".", 1)[-1].removesuffix("DataModule").lower()
    return f"the image folder {cfg.data.root}" if name == "imagefolder" else name


def comparison_figure(results: list[RunResult], data: str) -> Figure:
    """Validation accuracy and training loss per epoch of each run, and each best checkpoint's test accuracy.

    The test accuracy is a star at the epoch of the checkpoint it was measured on (the first
    of the best val/acc, the one ModelCheckpoint keeps), so it reads against that run's curve.
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    from finetune.analysis.cam import plt

    models = ", ".join(dict.fromkeys(r.model for r in results))
    resolutions = sorted({r.resolution for r in results})
    at = f" at {resolutions[0]} px" if len(resolutions) == 1 else ""
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4.4), layout="constrained")
    for i, r in enumerate(results):
        colour = f"C{i % 10}"
        label = r.run if r.test_acc is None else f"{r.run} (test {r.test_acc:.4f})"
        acc_ax.plot(range(1, len(r.val_acc) + 1), r.val_acc, marker="o", color=colour, label=label)
        loss_ax.plot(range(1, len(r.train_loss) + 1), r.train_loss, marker="o", color=colour, label=r.run)
        if r.test_acc is not None and r.val_acc:
            best_epoch = r.val_acc.index(max(r.val_acc)) + 1
            acc_ax.scatter(best_epoch, r.test_acc, marker="*", s=180, color=colour, edgecolor="black", lw=0.6, zorder=3)
    tested = any(r.test_acc is not None for r in results)
    acc_ax.set(title="validation accuracy" + ("; ★ test accuracy of the best checkpoint" if tested
                                              else " (no test split: no test accuracy)"),
               xlabel="epoch", ylabel="top-1 accuracy")
    loss_ax.set(title="training loss", xlabel="epoch", ylabel="cross-entropy")
    handles, _ = acc_ax.get_legend_handles_labels()
    if tested:
        handles.append(Line2D([], [], ls="", marker="*", markersize=12, color="0.6", markeredgecolor="black",
                              label="test accuracy"))
    acc_ax.legend(handles=handles, fontsize=8)
    loss_ax.legend(fontsize=8)
    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(f"{models}{at} on {data}: one run per policy, same data, seed and budget")
    return fig


def pareto_front(costs: Sequence[float], scores: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats (as cheap or cheaper, and better), by rising cost.

    Of points with equal cost and score only the first is kept; a NaN score is never on the front.
    """
    front, best = [], -math.inf
    for i in sorted(range(len(costs)), key=lambda i: (costs[i], -scores[i])):
        if scores[i] > best:
            front.append(i)
            best = scores[i]
    return front


def write_frontier(results: list[RunResult], out: Path) -> None:
    """comparison_frontier.png (see `frontier_figure`)."""
    from finetune.analysis.cam import plt

    fig = frontier_figure(results)
    fig.savefig(out / "comparison_frontier.png", dpi=110)
    plt.close(fig)


def frontier_figure(results: list[RunResult]) -> Figure:
    """Best val accuracy against GMACs and against train-epoch time, each with its Pareto front.

    A cost that every run shares (one model: one GMACs value) would put every point on one
    vertical line, so it gets no panel: the title states it instead.
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import LogFormatter

    from finetune.analysis.cam import plt

    class Plain(LogFormatter):
        """Labels where matplotlib's log axis puts them, written 0.008 rather than 8x10^-3."""

        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:g}" if super().__call__(x, pos) else ""

    models = list(dict.fromkeys(r.model for r in results))
    policies = list(dict.fromkeys(r.policy for r in results))
    marker = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(models)}
    colour = {p: f"C{i % 10}" for i, p in enumerate(policies)}
    resolutions = sorted({r.resolution for r in results})
    at = f"at {resolutions[0]} px" if len(resolutions) == 1 else "at each model's resolution"
    accuracy = [r.best_val_acc for r in results]
    panels = [([r.macs / 1e9 for r in results], "accuracy against compute", f"GMACs per image {at}"),
              ([r.epoch_seconds for r in results], "accuracy against training time", "train epoch (s)")]
    shared = [p for p in panels if len(set(p[0])) == 1]
    drawn = [p for p in panels if p not in shared] or panels[-1:]
    fig, axes = plt.subplots(1, len(drawn), figsize=(5.5 * len(drawn) + 1.5, 4.2), sharey=True, squeeze=False,
                             layout="constrained")
    for ax, (cost, title, xlabel) in zip(axes[0], drawn):
        front = pareto_front(cost, accuracy)
        if front:  # the best accuracy each budget buys, held out to the largest cost shown
            xs, ys = [cost[i] for i in front] + [max(cost)], [accuracy[i] for i in front] + [accuracy[front[-1]]]
            ax.step(xs, ys, where="post", color="0.4", ls="--", lw=1, zorder=2)
        for r, x, y in zip(results, cost, accuracy):
            ax.scatter(x, y, marker=marker[r.model], color=colour[r.policy], s=70, edgecolor="black", lw=0.5, zorder=3)
        ax.set(title=title, xscale="log", xlabel=f"{xlabel}, log scale")
        ax.xaxis.set_major_formatter(Plain())
        ax.xaxis.set_minor_formatter(Plain(minor_thresholds=(2, 0.5)))  # some minor ticks labelled up to 2 decades
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("best validation accuracy")
    if len(drawn) < len(panels) and shared:
        cost, _, xlabel = shared[0]
        fig.suptitle(f"every run: {', '.join(models)}, {cost[0]:.3g} {xlabel}", fontsize=10)
    handles = ([Line2D([], [], ls="", marker=marker[m], color="0.5", markeredgecolor="black", label=m) for m in models]
               + [Line2D([], [], ls="", marker="s", color=colour[p], label=p) for p in policies]
               + [Line2D([], [], ls="--", color="0.4", label="Pareto front")])
    fig.legend(handles=handles, loc="outside right upper", frameon=False)
    return fig


def write_cam(cfg: DictConfig, checkpoints: dict[str, str | None], out: Path) -> None:
    """Grad-CAM of each run's best model on the same first val images, as PNG and in TensorBoard.

    `cfg` is the config of one of those runs: the images are that run's validation images.
    """
    from torch.utils.tensorboard import SummaryWriter

    from finetune.analysis.cam import cam_figure, grad_cam, plt
    from finetune.training.module import FineTuneModule

    modules = {p: FineTuneModule.from_checkpoint(c) for p, c in checkpoints.items() if c}
    if not modules or cfg.compare.cam_images <= 0:
        return
    datamodule = build_datamodule(cfg)
    preprocessing = next(iter(modules.values())).preprocessing  # recorded by training, data overrides included
    datamodule.set_preprocessing(preprocessing)
    val = datamodule.dataset("val")
    picks = [val[i] for i in range(min(int(cfg.compare.cam_images), len(val)))]
    collate = getattr(val, "collate_fn", None) or default_collate  # data.decode=device: items are file bytes
    x, labels = datamodule.device_batch(collate(picks), train=False)  # decoded, resized, normalised as validation
    activations = {p: grad_cam(m.model, x, labels) for p, m in modules.items()}
    classes = datamodule.class_names
    names = [classes[int(i)] for i in labels]
    predictions = {p: [(classes[int(k)], float(v)) for v, k in zip(*a.probabilities.max(1))]
                   for p, a in activations.items()}
    shown = preprocessing.denormalize(x)  # exactly what the networks saw
    fig = cam_figure(shown, {p: a.maps for p, a in activations.items()}, names, predictions)
    fig.savefig(out / "comparison_cam.png", dpi=110)
    with SummaryWriter(str(out / "tensorboard" / "cam")) as writer:
        writer.add_figure("cam/comparison", fig)
    plt.close(fig)


def main() -> None:
    """The `finetune-compare` command."""
    run_command(hydra_main)


@hydra.main(version_base="1.3", config_path="pkg://finetune.conf", config_name="compare")
def hydra_main(cfg: DictConfig) -> None:
    route_to_run_log()
    with user_errors():
        out = HydraConfig.get().runtime.output_dir
        results = compare_config(cfg, out)
        say(compare_summary(results, Path(out)))


def compare_summary(results: list[RunResult], out: Path) -> list[str]:
    """The end of `finetune-compare`: the table, where the files went, the best run and what to type next."""
    lines = ["", markdown_table(results), "", f"comparison in:   {out} (comparison.md, .json, .png; runs/<policy>/)"]
    scored = [r for r in results if r.best_val_acc is not None and math.isfinite(r.best_val_acc)]
    best = max(scored, key=lambda r: r.best_val_acc, default=None)
    if best is not None:
        lines.append(f"best run:        {best.run} (val/acc {best.best_val_acc:.4f}): {best.best_checkpoint}")
        if best.test_acc is not None:
            lines.append(f"test:            test/acc {best.test_acc:.4f} (its best checkpoint)")
        else:
            recorded = out / "runs" / best.run / "metrics.json"
            skipped = json.loads(recorded.read_text()).get("test_skipped") if recorded.is_file() else None
            lines.append(f"test:            none: {skipped or 'no test metrics were recorded'}")
    lines.append(f"log:             {out / 'compare.log'}")
    return lines + next_commands(best.best_checkpoint if best else None, out, out / "tensorboard")


if __name__ == "__main__":
    main()
