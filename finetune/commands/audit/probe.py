"""Out-of-sample class probabilities for every audited image, from the linear probe (`finetune/training/probe.py`).

Confident learning (cleanlab) needs, for each image, probabilities from a classifier that did
not see that image's label: a classifier scoring its own training labels agrees with them,
mistakes included. Training images get them by K-fold cross-validation: the probe is fitted on
K-1 folds and predicts the held-out fold. Validation and test images, which no fit sees, get
the probe fitted on all of train. Every fit is the probe's exact convex one at a single
strength, the one its regularisation path picks on validation; the folds start from the
all-train solution (the problem is strictly convex, so the start changes only the time).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold
from torch import Tensor

from finetune.datamodules.base import Split
from finetune.training.probe import (
    FeatureRows,
    ProbeSettings,
    available_memory,
    fit_logistic,
    plan_fit,
    regularisation_path,
)


@dataclass(frozen=True)
class ProbeFit:
    """What the probabilities come from: the strength, its validation accuracy, the folds and how the fits ran."""

    l2: float
    val_acc: float
    folds: int
    fit: str


def out_of_sample_probabilities(
    features: dict[Split, tuple[Tensor, Tensor]], num_classes: int, settings: ProbeSettings, folds: int, seed: int,
    device: torch.device,
) -> tuple[dict[Split, np.ndarray], ProbeFit]:
    """Per split, float32 probabilities (images x classes) that no fit saw the image's label for."""
    dtype = torch.float32 if device.type == "mps" else torch.float64  # float64 as the probe (MPS has none)
    dims = next(iter(features.values()))[0].shape[1]
    chunk_rows = plan_fit(sum(len(y) for _, y in features.values()), dims, num_classes, dtype.itemsize,
                          available_memory(device), settings.chunk_rows)

    def rows(x: Tensor, y: Tensor) -> FeatureRows:
        return FeatureRows.place(x, y, device, dtype, chunk_rows)

    train_x, train_y = features["train"]
    (weight, bias), best, _ = regularisation_path(rows(train_x, train_y), rows(*features["val"]), num_classes, settings)
    out = {split: probabilities(rows(x, y), weight, bias) for split, (x, y) in features.items() if split != "train"}
    held_out = np.empty((len(train_y), num_classes), dtype=np.float32)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed % 2**32)
    for fitted, predicted in splitter.split(np.zeros(len(train_y)), train_y.numpy()):
        fitted_t, predicted_t = torch.from_numpy(fitted), torch.from_numpy(predicted)
        fold_weight, fold_bias, _ = fit_logistic(rows(train_x[fitted_t], train_y[fitted_t]), num_classes, best.l2,
                                                 init=(weight, bias), max_iter=settings.max_iter,
                                                 tolerance=settings.tolerance)
        held_out[predicted] = probabilities(rows(train_x[predicted_t], train_y[predicted_t]), fold_weight, fold_bias)
    out["train"] = held_out
    fit = "full-batch" if chunk_rows is None else f"chunked, chunks of {chunk_rows} rows"
    return {split: out[split] for split in features}, ProbeFit(best.l2, best.val_acc, folds, fit)


@torch.no_grad()
def probabilities(rows: FeatureRows, weight: Tensor, bias: Tensor) -> np.ndarray:
    """Softmax of the classifier (weight, bias) on every row, chunk by chunk, as float32 on the CPU."""
    parts = [torch.softmax(torch.addmm(bias, x, weight.T), dim=1).float().cpu() for x, _ in rows.chunks()]
    return torch.cat(parts).numpy() if parts else np.zeros((0, weight.shape[0]), dtype=np.float32)
