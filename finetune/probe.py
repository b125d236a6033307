"""`finetune=probe`: how good the frozen features are, measured as Kornblith et al. (2019) measure them.

A linear probe answers "how linearly separable are this backbone's features for my
classes?" without the noise of an SGD schedule: the pooled penultimate features of each
split are extracted once (backbone in eval mode, evaluation transforms, no augmentation),
then an L2-regularised multinomial logistic regression is solved to convergence with
full-batch L-BFGS for every strength on a log grid, and the strength with the best
validation accuracy is kept (Kornblith, Shlens & Le, "Do Better ImageNet Models Transfer
Better?", CVPR 2019). The problem is strictly convex for every strength > 0, so each
solution is unique and the grid is walked from strong to weak regularisation with warm
starts.

The objective is scikit-learn's: mean cross-entropy + l2 / 2 * ||W||^2, the bias
unpenalised, so `l2` here is `LogisticRegression(C=1 / (l2 * n_train))` there
(tests/test_probe.py checks that both land on the same classifier).

The chosen weights go into the network's own classifier, so the checkpoint is an ordinary
frozen-backbone FineTuneModule checkpoint: `FineTuneModule.from_checkpoint`,
`finetune-evaluate` and `finetune-export` load it as they load any other.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from finetune.checkpointing import atomic_save
from finetune.config_rules import POSITIVE, integer
from finetune.datamodules.base import Split
from finetune.errors import ConfigError
from finetune.features import pooled_features

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

    @classmethod
    def from_config(cls, node: DictConfig | None) -> ProbeSettings:
        if node is None:
            raise ConfigError("finetune.name=probe needs the probe settings of conf/finetune/probe.yaml; select it with finetune=probe")
        values = OmegaConf.to_container(node, resolve=True)
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ConfigError(f"probe.{unknown[0]} is unknown; valid probe settings: {', '.join(valid)}")
        for key in ("l2_min", "l2_max", "tolerance"):
            POSITIVE.check(f"probe.{key}", values.get(key))
        for key in ("l2_steps", "max_iter"):
            integer(1).check(f"probe.{key}", values.get(key))
        if values["l2_min"] > values["l2_max"]:
            raise ConfigError(f"probe.l2_min={values['l2_min']} exceeds probe.l2_max={values['l2_max']}; swap them")
        return cls(**{k: (float(v) if k in ("l2_min", "l2_max", "tolerance") else v) for k, v in values.items()})

    def grid(self) -> list[float]:
        """The strengths to try, strongest first: warm starts then move from simple to complex solutions."""
        if self.l2_steps == 1:
            return [self.l2_max]
        return torch.logspace(math.log10(self.l2_max), math.log10(self.l2_min), self.l2_steps, dtype=torch.float64).tolist()


def fit_logistic(
    features: Tensor, labels: Tensor, num_classes: int, l2: float, *,
    init: tuple[Tensor, Tensor] | None = None, max_iter: int = 1000, tolerance: float = 1e-6,
) -> tuple[Tensor, Tensor, int]:
    """Minimise mean cross-entropy + l2 / 2 * ||W||^2 (bias unpenalised) with full-batch L-BFGS.

    Returns the weight (classes x features), the bias and the number of L-BFGS iterations;
    works in the dtype and on the device of `features`. L-BFGS starts from one scalar
    curvature for all parameters, but with strong regularisation W's curvature (>= l2) is
    far above the bias's ((K-1)/K^2 at uniform predictions): unaided it then crawls for
    thousands of iterations. So it solves an equivalent problem: features centred on their
    mean and the bias scaled by c = sqrt(1 + l2 K^2 / (K-1)), both folded back into (W, b)
    at the end. Neither changes the minimiser, because the bias is unpenalised.
    """
    mean = features.mean(dim=0)
    centred = features - mean
    scale = math.sqrt(1 + l2 * num_classes**2 / max(1, num_classes - 1))
    weight = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    shift = torch.zeros(num_classes, dtype=features.dtype, device=features.device)
    if init is not None:
        weight, shift = init[0].clone(), (init[1] + init[0] @ mean) / scale
    weight.requires_grad_(True)
    shift.requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, shift], lr=1, max_iter=max_iter, max_eval=2 * max_iter, history_size=50,
                                  tolerance_grad=tolerance, tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(torch.addmm(shift * scale, centred, weight.T), labels) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    iterations = int(optimizer.state_dict()["state"].get(0, {}).get("n_iter", 0))
    if iterations >= max_iter:
        rank_zero_warn(f"probe: L-BFGS reached probe.max_iter={max_iter} at l2={l2:.3g} before its gradient fell below "
                       f"probe.tolerance={tolerance:g}; raise probe.max_iter for an exact solution")
    weight = weight.detach()
    return weight, shift.detach() * scale - weight @ mean, iterations


def accuracy(logits: Tensor, labels: Tensor, k: int = 1) -> float:
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(dim=1).double().mean().item()


def regularisation_path(
    train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], num_classes: int, settings: ProbeSettings
) -> tuple[tuple[Tensor, Tensor], PathPoint, list[PathPoint]]:
    """Fit every strength of the grid; return the classifier best on validation, its point and the whole path.

    Ties go to the stronger regularisation (visited first): of equally accurate
    classifiers, the one with the smaller weights.
    """
    x, y = train
    best: tuple[tuple[Tensor, Tensor], PathPoint] | None = None
    path: list[PathPoint] = []
    init = None
    for l2 in settings.grid():
        weight, bias, iterations = fit_logistic(x, y, num_classes, l2, init=init,
                                                max_iter=settings.max_iter, tolerance=settings.tolerance)
        init = (weight, bias)
        point = PathPoint(l2, accuracy(torch.addmm(bias, x, weight.T), y),
                          accuracy(torch.addmm(bias, val[0], weight.T), val[1]), iterations)
        path.append(point)
        if best is None or point.val_acc > best[1].val_acc:
            best = ((weight, bias), point)
    assert best is not None  # the grid has at least one strength
    return best[0], best[1], path


def fit_probe(cfg: DictConfig) -> dict[str, Any]:
    """Extract features, walk the regularisation path, save the best classifier; `fit`'s metrics for `finetune=probe`."""
    from finetune.train import build_datamodule, build_module, trainer_kwargs  # train.py dispatches here

    settings = ProbeSettings.from_config(cfg.get("probe"))
    if cfg.get("ckpt_path"):
        raise ConfigError("finetune=probe fits in one pass and has nothing to resume; remove ckpt_path "
                          "(to probe a fine-tuned network's features, pass it as model.pretrained=<checkpoint>)")
    if cfg.data.get("augment"):
        raise ConfigError("finetune=probe measures features of unaugmented images; set data.augment=false")
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    module = build_module(OmegaConf.merge(cfg, {"finetune": CHECKPOINT_POLICY}), datamodule)
    kwargs = trainer_kwargs(cfg)
    fabric = L.Fabric(accelerator=kwargs.get("accelerator", "auto"), devices=1, precision=kwargs.get("precision"))
    model = module.model.to(fabric.device).eval()
    datamodule.prepare_data()
    datamodule.setup(None)

    splits: list[Split] = ["train", "val"] + (["test"] if datamodule.has_test else [])
    # Solved where the features are, in float64 as scikit-learn does (MPS has no float64).
    dtype = torch.float32 if fabric.device.type == "mps" else torch.float64
    features = {}
    for split in splits:
        x, y = pooled_features(model, datamodule, split, fabric.device, precision=fabric.autocast)
        features[split] = (x.to(fabric.device, dtype), y.to(fabric.device))
    (weight, bias), best, path = regularisation_path(features["train"], features["val"], datamodule.num_classes, settings)

    with torch.no_grad():
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(bias)
    metrics: dict[str, Any] = {"best_val_acc": best.val_acc, "best_checkpoint": None, "probe/l2": best.l2}
    if "test" in features:
        logits = torch.addmm(bias, features["test"][0], weight.T)
        metrics |= {"test/acc": accuracy(logits, features["test"][1]), "test/acc_top5": accuracy(logits, features["test"][1], 5)}

    out = Path(cfg.paths.output_dir)
    checkpoint = out / "checkpoints" / "probe.ckpt"
    atomic_save({"state_dict": module.to("cpu").state_dict(), "hyper_parameters": dict(module.hparams),
                 "pytorch-lightning_version": L.__version__, "probe": asdict(best)}, checkpoint)
    metrics["best_checkpoint"] = str(checkpoint)
    _log(cfg, metrics, path)
    (out / "metrics.json").write_text(json.dumps({**metrics, "probe/path": [asdict(p) for p in path]}, indent=2))
    return metrics


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
