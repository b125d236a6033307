"""`finetune=probe`: how good the frozen features are, measured as Kornblith et al. (2019) measure them.

A linear probe answers "how linearly separable are this backbone's features for my
classes?" without the noise of an SGD schedule: the pooled penultimate features of each
split are extracted once (backbone in eval mode, evaluation transforms, no augmentation),
then an L2-regularised multinomial logistic regression is solved to convergence with
L-BFGS for every strength on a log grid, and the strength with the best
validation accuracy is kept (Kornblith, Shlens & Le, "Do Better ImageNet Models Transfer
Better?", CVPR 2019). The problem is strictly convex for every strength > 0, so each
solution is unique and the grid is walked from strong to weak regularisation with warm
starts.

The features are extracted as `finetune-evaluate` predicts: float32, no autocast, whatever
trainer.precision says (a probe of bf16 features would measure bf16 rounding, and its classifier
would meet float32 features at evaluation). The fit is full-batch, every feature on the device
in float64, when that fits in the device's free memory (`plan_fit`); beyond, the features stay
in host memory and every evaluation of the objective streams them through the device in chunks
(`FeatureRows`): the same sums in another order, so the same minimiser to the optimizer's
tolerance. metrics.json and probe.ckpt record which fit ran.

The objective is scikit-learn's: mean cross-entropy + l2 / 2 * ||W||^2, the bias
unpenalised, so `l2` here is `LogisticRegression(C=1 / (l2 * n_train))` there
(tests/test_probe.py checks that both land on the same classifier).

The chosen weights go into the network's own classifier, so the checkpoint is an ordinary
frozen-backbone FineTuneModule checkpoint: `FineTuneModule.from_checkpoint`,
`finetune-evaluate` and `finetune-export` load it as they load any other.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import psutil
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from finetune.configuration.rules import POSITIVE, checked_section, integer, optional
from finetune.datamodules.base import ImageClassificationDataModule, Split
from finetune.errors import ConfigError
from finetune.fileio import atomic_save
from finetune.models import EfficientNet
from finetune.training.features import pooled_features

#: Share of the free memory a full-batch fit may plan to fill: the estimate leaves out the allocator's
#: rounding and fragmentation, and other processes may allocate while the fit runs.
MEMORY_FRACTION = 0.5
#: Rows per host-to-device copy when the full-batch fit places its features: bounds the float32 staging copy.
STAGING_ROWS = 8192

#: The policy a probe checkpoint records: its weights are exactly a frozen backbone under a trained head.
CHECKPOINT_POLICY = {"name": "frozen", "trainable_stages": 0, "unfreeze_at_epoch": 0, "bn": "eval", "cache_features": False}


@dataclass(frozen=True)
class PathPoint:
    """One strength of the regularisation path and the accuracies its classifier reaches."""

    l2: float
    train_acc: float
    val_acc: float
    iterations: int


@dataclass(frozen=True)
class ProbeSettings:
    """The `probe` config node, checked."""

    l2_min: float
    l2_max: float
    l2_steps: int
    max_iter: int
    tolerance: float
    chunk_rows: int | None = None  # None: full-batch when it fits in memory (plan_fit), else chunks sized to fit

    @classmethod
    def from_config(cls, node: DictConfig | None) -> ProbeSettings:
        # in the dataclass's order: the unknown-key error lists them so
        rules = {"l2_min": POSITIVE, "l2_max": POSITIVE, "l2_steps": integer(1), "max_iter": integer(1),
                 "tolerance": POSITIVE, "chunk_rows": optional(integer(1))}
        values = checked_section(None if node is None else OmegaConf.to_container(node, resolve=True), "probe", rules,
                                 "finetune.name=probe needs the probe settings of conf/finetune/probe.yaml; "
                                 "select it with finetune=probe")
        if values["l2_min"] > values["l2_max"]:
            raise ConfigError(f"probe.l2_min={values['l2_min']} exceeds probe.l2_max={values['l2_max']}; swap them")
        return cls(**{k: (float(v) if k in ("l2_min", "l2_max", "tolerance") else v) for k, v in values.items()})

    @classmethod
    def for_run(cls, cfg: DictConfig) -> ProbeSettings:
        """A run's probe (finetune=probe, lpft's, the audit's, a comparison's): probe.yaml's settings (their one
        source), with the run's `probe.<key>` over them."""
        defaults = OmegaConf.create((importlib.resources.files("finetune.conf") / "finetune" / "probe.yaml").read_text())
        return cls.from_config(OmegaConf.merge(defaults.probe, cfg.get("probe") or {}))

    def grid(self) -> list[float]:
        """The strengths to try, strongest first: warm starts then move from simple to complex solutions."""
        if self.l2_steps == 1:
            return [self.l2_max]
        return torch.logspace(math.log10(self.l2_max), math.log10(self.l2_min), self.l2_steps, dtype=torch.float64).tolist()


@dataclass(frozen=True)
class FeatureRows:
    """One split's features and labels as the solver reads them: chunk by chunk, each on `device` in `dtype`.

    Full-batch (`place` without chunk_rows), the features already sit on the device in `dtype`
    and one chunk is all of them: nothing moves. Chunked, they stay where extraction left them
    (float32, host memory) and every pass moves one chunk at a time, so the device holds one
    chunk, never the matrix. A chunk crosses as float32 and is cast on the device: half the
    bytes of a float64 transfer, and no float64 copy on the host.
    """

    features: Tensor
    labels: Tensor
    device: torch.device
    dtype: torch.dtype
    chunk_rows: int

    @classmethod
    def place(cls, features: Tensor, labels: Tensor, device: torch.device, dtype: torch.dtype,
              chunk_rows: int | None) -> FeatureRows:
        """Chunks of `chunk_rows`, or (None) every row on the device in `dtype`, copied STAGING_ROWS at a time."""
        streamed = cls(features, labels, device, dtype, chunk_rows or STAGING_ROWS)
        if chunk_rows is not None:
            return streamed
        resident = torch.empty(features.shape, dtype=dtype, device=device)
        for begin, (x, _) in zip(range(0, len(labels), STAGING_ROWS), streamed.chunks()):
            resident[begin:begin + len(x)] = x
        return cls(resident, labels.to(device), device, dtype, max(1, len(labels)))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_chunks(self) -> int:
        return math.ceil(len(self) / self.chunk_rows)

    def chunks(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(features, labels) of each chunk in row order, on the device, features in `dtype`."""
        for begin in range(0, len(self), self.chunk_rows):
            end = begin + self.chunk_rows
            yield self.features[begin:end].to(self.device).to(self.dtype), self.labels[begin:end].to(self.device)

    def mean(self) -> Tensor:
        """The mean feature vector, in `dtype` on the device."""
        return sum(x.sum(dim=0) for x, _ in self.chunks()) / len(self)


def plan_fit(rows: int, dims: int, num_classes: int, itemsize: int, available: int,
             chunk_rows: int | None = None) -> int | None:
    """Rows per chunk for a chunked fit, or None for the full-batch fit, of `rows` feature vectors (all splits).

    Full-batch needs every feature on the device (`itemsize` bytes each) plus, per row, the
    logits, probabilities and their gradients of one objective evaluation; it runs when that
    fits in MEMORY_FRACTION of the `available` bytes. Otherwise a chunk is as many rows as fit
    there, each row counted with its float32 transfer copy. A given `chunk_rows` (probe.chunk_rows)
    is taken as it is.
    """
    if chunk_rows is not None:
        return chunk_rows
    budget = MEMORY_FRACTION * available
    temporaries = 4 * itemsize * num_classes
    if rows * (itemsize * dims + temporaries) <= budget:
        return None
    return max(1, int(budget // ((4 + itemsize) * dims + temporaries)))


def available_memory(device: torch.device) -> int:
    """Bytes the fit may still take on `device`: CUDA's free memory (cached blocks released first), else the host's.

    MPS shares the host's memory, so psutil's figure holds there too.
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def fit_logistic(
    rows: FeatureRows, num_classes: int, l2: float, *,
    init: tuple[Tensor, Tensor] | None = None, max_iter: int = 1000, tolerance: float = 1e-6,
) -> tuple[Tensor, Tensor, int]:
    """Minimise mean cross-entropy + l2 / 2 * ||W||^2 (bias unpenalised) with L-BFGS over all of `rows`.

    Returns the weight (classes x features), the bias and the number of L-BFGS iterations, in
    the dtype and on the device of `rows`. Each evaluation of the objective sums the loss and
    accumulates the gradient chunk by chunk (backward per chunk, so autograd holds one chunk's
    graph); a full-batch `rows` is one chunk. L-BFGS starts from one scalar curvature for all
    parameters, but with strong regularisation W's curvature (>= l2) is far above the bias's
    ((K-1)/K^2 at uniform predictions): unaided it then crawls for thousands of iterations. So
    it solves an equivalent problem: features centred on their mean and the bias scaled by
    c = sqrt(1 + l2 K^2 / (K-1)), both folded back into (W, b) at the end. Neither changes the
    minimiser, because the bias is unpenalised. The centring is applied through the bias,
    (x - mean) W^T + c s = x W^T + (c s - W mean): the same function of (W, s), without a
    centred copy of the features.
    """
    mean = rows.mean()
    scale = math.sqrt(1 + l2 * num_classes**2 / max(1, num_classes - 1))
    weight = torch.zeros(num_classes, mean.shape[0], dtype=rows.dtype, device=rows.device)
    shift = torch.zeros(num_classes, dtype=rows.dtype, device=rows.device)
    if init is not None:
        weight, shift = init[0].clone(), (init[1] + init[0] @ mean) / scale
    weight.requires_grad_(True)
    shift.requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, shift], lr=1, max_iter=max_iter, max_eval=2 * max_iter, history_size=50,
                                  tolerance_grad=tolerance, tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        penalty = 0.5 * l2 * weight.square().sum()
        penalty.backward()
        loss = penalty.detach()
        for x, y in rows.chunks():
            logits = torch.addmm(shift * scale - weight @ mean, x, weight.T)
            part = F.cross_entropy(logits, y, reduction="sum") / len(rows)
            part.backward()
            loss += part.detach()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    iterations = int(optimizer.state_dict()["state"].get(0, {}).get("n_iter", 0))
    if iterations >= max_iter:
        rank_zero_warn(f"probe: L-BFGS reached probe.max_iter={max_iter} at l2={l2:.3g} before its gradient fell below "
                       f"probe.tolerance={tolerance:g}; raise probe.max_iter for an exact solution")
    weight = weight.detach()
    return weight, shift.detach() * scale - weight @ mean, iterations


def accuracy(rows: FeatureRows, weight: Tensor, bias: Tensor, k: int = 1) -> float:
    """Top-k accuracy of the classifier (weight, bias) on `rows`, chunk by chunk; NaN for an empty split."""
    if len(rows) == 0:
        return math.nan
    hits = 0
    for x, y in rows.chunks():
        top = torch.addmm(bias, x, weight.T).topk(min(k, weight.shape[0]), dim=1).indices
        hits += int((top == y[:, None]).any(dim=1).sum())
    return hits / len(rows)


def class_recall(rows: FeatureRows, weight: Tensor, bias: Tensor) -> list[float]:
    """Each class's accuracy (its recall) under the classifier (weight, bias) on `rows`; NaN for an absent class."""
    hits = torch.zeros(weight.shape[0], dtype=torch.float64)
    counts = torch.zeros_like(hits)
    for x, y in rows.chunks():
        right = (torch.addmm(bias, x, weight.T).argmax(dim=1) == y).to(torch.float64).cpu()
        hits.index_add_(0, y.cpu(), right)
        counts.index_add_(0, y.cpu(), torch.ones_like(right))
    return (hits / counts).tolist()


def regularisation_path(
    train: FeatureRows, val: FeatureRows, num_classes: int, settings: ProbeSettings
) -> tuple[tuple[Tensor, Tensor], PathPoint, list[PathPoint]]:
    """Fit every strength of the grid; return the classifier best on validation, its point and the whole path.

    Ties go to the stronger regularisation (visited first): of equally accurate
    classifiers, the one with the smaller weights.
    """
    best: tuple[tuple[Tensor, Tensor], PathPoint] | None = None
    path: list[PathPoint] = []
    init = None
    for l2 in settings.grid():
        weight, bias, iterations = fit_logistic(train, num_classes, l2, init=init,
                                                max_iter=settings.max_iter, tolerance=settings.tolerance)
        init = (weight, bias)
        point = PathPoint(l2, accuracy(train, weight, bias), accuracy(val, weight, bias), iterations)
        path.append(point)
        if best is None or point.val_acc > best[1].val_acc:
            best = ((weight, bias), point)
    assert best is not None  # the grid has at least one strength
    return best[0], best[1], path


def check_one_process(trainer: Mapping[str, Any]) -> None:
    """Refuse a launch of several processes: each would run the whole probe on the first device and race on probe.ckpt.

    Refused rather than run on rank 0 alone: the probe is one convex fit on one device, so
    under a launcher the other ranks' devices (a SLURM allocation's, too) would idle for the
    whole run. Several processes are what torchrun or Lightning's own launcher announce in
    WORLD_SIZE, what srun announces in SLURM_NTASKS (the rule of Lightning's SLURMEnvironment:
    not for a job named bash or interactive), or what trainer.devices x trainer.num_nodes ask for.
    """
    env = os.environ
    launched = [f"WORLD_SIZE={env['WORLD_SIZE']}"] if int(env.get("WORLD_SIZE", 1)) > 1 else []
    if int(env.get("SLURM_NTASKS", 1)) > 1 and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        launched.append(f"SLURM_NTASKS={env['SLURM_NTASKS']}")
    devices, nodes = trainer.get("devices", "auto"), trainer.get("num_nodes", 1)
    if _device_count(devices, trainer.get("accelerator", "auto")) * nodes > 1:
        launched.append(f"trainer.devices={devices} trainer.num_nodes={nodes}")
    if launched:
        raise ConfigError(f"finetune=probe is one fit on one device, but this run has several processes "
                          f"({', '.join(launched)}); start it once, without torchrun (under SLURM: srun --ntasks=1), "
                          "with trainer=gpu trainer.devices=1 or trainer=cpu")


def _device_count(devices: Any, accelerator: str) -> int:
    """How many devices, one process each, `trainer.devices` asks Lightning for ('auto': one, what the probe takes)."""
    if isinstance(devices, list):
        return len(devices)
    if isinstance(devices, str):
        if devices == "auto":
            return 1
        if "," in devices:  # GPU indices, "0,1" or "1,"
            return len([index for index in devices.split(",") if index.strip()])
        devices = int(devices)
    if devices == -1:  # every device: the CPU accepts no -1 (config_checks)
        return torch.cuda.device_count() if accelerator in ("auto", "gpu", "cuda") else 1
    return devices


def fit_head(
    model: EfficientNet, datamodule: ImageClassificationDataModule, splits: list[Split], settings: ProbeSettings,
    device: torch.device, progress: bool = True,
) -> tuple[dict[str, FeatureRows], tuple[Tensor, Tensor], PathPoint, list[PathPoint], str]:
    """Extract `splits`' features with `model` on `device`, walk the path, load the best classifier into `model`.

    Shared by `finetune=probe` and `finetune=lpft` (`ProbeHead`). Returns each split's features as
    the solver read them, the classifier, its point on the path, the whole path and which fit ran.
    The classifier acts on the raw pooled features (the solver's centring and bias scaling are
    folded back by `fit_logistic`), and the network's dropout is the identity in eval mode, so in
    the network's own linear layer it gives the network the probe's logits. `model` ends on the
    CPU in eval mode: the fit needs the device's memory, not the network.
    """
    model.to(device).eval()
    extracted = {split: pooled_features(model, datamodule, split, device, progress=progress) for split in splits}
    model.to("cpu")
    # Solved in float64 as scikit-learn does (MPS has no float64).
    dtype = torch.float32 if device.type == "mps" else torch.float64
    chunk_rows = plan_fit(sum(len(y) for _, y in extracted.values()), model.num_features, datamodule.num_classes,
                          dtype.itemsize, available_memory(device), settings.chunk_rows)
    # pop: once a split sits on the device, a full-batch fit frees its host copy.
    features = {split: FeatureRows.place(*extracted.pop(split), device, dtype, chunk_rows) for split in splits}
    fit = "full-batch" if chunk_rows is None else f"chunked, {features['train'].num_chunks} chunks of {chunk_rows} rows"
    rank_zero_info(f"probe: L-BFGS on {len(features['train'])} x {model.num_features} "
                   f"{str(dtype).removeprefix('torch.')} features on {device} ({fit})")
    (weight, bias), best, path = regularisation_path(features["train"], features["val"], datamodule.num_classes,
                                                     settings)
    with torch.no_grad():
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(bias)
    return features, (weight, bias), best, path, fit


def check_probe_config(cfg: DictConfig) -> None:
    """What finetune=probe refuses before any data or weights are read: a resume, augmentation, several processes."""
    if cfg.get("ckpt_path"):
        raise ConfigError("finetune=probe fits in one pass and has nothing to resume; remove ckpt_path "
                          "(to probe a fine-tuned network's features, pass it as model.pretrained=<checkpoint>)")
    if cfg.data.get("augment"):
        raise ConfigError("finetune=probe measures features of unaugmented images; set data.augment=false")
    check_one_process(OmegaConf.to_container(cfg.trainer, resolve=True))


def run_probe(cfg: DictConfig, datamodule: ImageClassificationDataModule, module: L.LightningModule,
              device: torch.device, settings: ProbeSettings) -> dict[str, Any]:
    """Extract features, walk the regularisation path, save the best classifier; `fit`'s metrics for `finetune=probe`.

    `module` is the network to probe (built by `finetune.build.fit_probe` with CHECKPOINT_POLICY), its head replaced
    here.
    """
    datamodule.prepare_data()
    datamodule.setup(None)

    splits: list[Split] = ["train", "val"] + (["test"] if datamodule.has_test else [])
    features, (weight, bias), best, path, fit = fit_head(module.model, datamodule, splits, settings, device,
                                                         progress=cfg.trainer.enable_progress_bar)
    metrics: dict[str, Any] = {"best_val_acc": best.val_acc, "best_checkpoint": None, "probe/l2": best.l2,
                               "probe/fit": fit, "val/class_acc": class_recall(features["val"], weight, bias)}
    if "test" in features:
        test = features["test"]
        metrics |= {"test/acc": accuracy(test, weight, bias), "test/acc_top5": accuracy(test, weight, bias, 5)}

    out = Path(cfg.paths.output_dir)
    checkpoint = out / "checkpoints" / "probe.ckpt"
    atomic_save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                 "pytorch-lightning_version": L.__version__, "probe": {**asdict(best), "fit": fit}}, checkpoint)
    metrics["best_checkpoint"] = str(checkpoint)
    _log(cfg, metrics, path)
    (out / "metrics.json").write_text(json.dumps({**metrics, "probe/path": [asdict(p) for p in path]}, indent=2))
    return metrics


class ProbeHead(L.Callback):
    """finetune=lpft: the linear probe's head in the network before the first step (Kumar et al., ICLR 2022).

    A zero head sends the backbone the gradients of uniform predictions in the first steps; the
    probe's head is the best linear classifier of the pretrained features, so fine-tuning starts
    from it and distorts them less. It is fitted at `setup`, when the datamodule is set up and the
    device known, before DDP wraps the model (whose wrap broadcasts rank 0's weights, so processes
    that fitted their own copy start equal) and before the EMA's first average. Every process fits
    the whole probe: there is no collective yet to share features through, and its wall time is one
    process's. A resumed fit (`resuming`: Lightning sets `trainer.ckpt_path` only after `setup`)
    takes the head from its checkpoint and the probe's result from this callback's state in it:
    nothing is refitted.
    """

    def __init__(self, settings: ProbeSettings, resuming: bool) -> None:
        self.settings = settings
        self.resuming = resuming
        self.result: dict[str, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.resuming:
            return
        model = pl_module.model
        was_training = model.training
        _, _, best, _, fit = fit_head(model, trainer.datamodule, ["train", "val"], self.settings,
                                      trainer.strategy.root_device, progress=trainer.progress_bar_callback is not None)
        model.train(was_training)
        self.result = {"probe/val_acc": best.val_acc, "probe/train_acc": best.train_acc, "probe/l2": best.l2,
                       "probe/fit": fit}
        rank_zero_info(f"probe: val acc {best.val_acc:.4f} at l2={best.l2:.3g}; fine-tuning from its head")
        for logger in trainer.loggers:
            logger.log_metrics({k: v for k, v in self.result.items() if k != "probe/fit"}, step=0)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.result)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.result = dict(state_dict)


def _log(cfg: DictConfig, metrics: dict[str, Any], path: list[PathPoint]) -> None:
    """Write the result under the tags training uses (val/acc, test/acc...) and the path as probe/* curves.

    The path's x-axis is the grid index (strongest regularisation at 0); probe/log10_l2 gives its strength.
    """
    loggers = [instantiate(node) for node in (cfg.get("logger") or {}).values()]
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        for step, point in enumerate(path):
            logger.log_metrics({"probe/log10_l2": math.log10(point.l2), "probe/train_acc": point.train_acc,
                                "probe/val_acc": point.val_acc}, step=step)
        logger.log_metrics({"val/acc": metrics["best_val_acc"],
                            **{k: v for k, v in metrics.items() if k.startswith("test/")}}, step=0)
        logger.finalize("success")
