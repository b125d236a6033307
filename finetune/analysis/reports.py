"""What a classifier gets right and wrong: metrics, tables and figures shared by evaluation and `trainer.test`.

Every number comes from torchmetrics, so `finetune-evaluate`'s report.json and the `test/*`
scalars that training logs are the same computation on the same kind of input.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from finetune.analysis.cam import plt

#: Bins of the expected calibration error and of the reliability diagram (Guo et al. 2017 use 15).
CALIBRATION_BINS = 15


class BinnedCalibrationError(Metric):
    """Expected calibration error (top label, L1) from per-bin sums: the value torchmetrics'
    `MulticlassCalibrationError` computes, with states that do not grow with the images.

    torchmetrics keeps every image's confidence in list states and bins them at `compute`: O(N)
    memory, and its small per-batch tensors pinned freed probability batches in the heap (+190 MiB
    RSS alone over 50,000 images × 1,000 classes; `benchmarks/RESULTS.md`, evaluate at scale).
    The bins are torchmetrics': `bucketize(confidence, linspace(0, 1, bins + 1), right=True) - 1`.
    """

    full_state_update = False

    def __init__(self, bins: int = CALIBRATION_BINS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bins = bins
        for name in ("count", "confidence", "correct"):  # float64: sums over millions of images stay exact enough
            self.add_state(name, torch.zeros(bins + 1, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs: Tensor, labels: Tensor) -> None:
        confidence, predicted = probs.max(dim=1)
        boundaries = torch.linspace(0, 1, self.bins + 1, dtype=confidence.dtype, device=confidence.device)
        index = torch.bucketize(confidence, boundaries, right=True) - 1
        self.count.index_add_(0, index, torch.ones_like(confidence, dtype=torch.float64))
        self.confidence.index_add_(0, index, confidence.double())
        self.correct.index_add_(0, index, predicted.eq(labels).double())

    def compute(self) -> Tensor:
        filled = self.count.clamp(min=1)
        gap = (self.correct / filled - self.confidence / filled).abs()
        return (gap * self.count / self.count.sum()).sum().float()


#: How many of the largest off-diagonal confusion counts the report lists.
MOST_CONFUSED = 10
#: Up to this many classes the confusion matrix prints each cell's rate.
ANNOTATED_CLASSES = 20
#: Up to this many classes the confusion figure draws every class (labels stay >= 5.5 pt); above, only
#: FIGURE_MOST_CONFUSED of them: 1,000 rows of a 24-inch figure are a third of a point each, unreadable.
FIGURE_CLASSES = 128
FIGURE_MOST_CONFUSED = 40


def report_metrics(num_classes: int) -> MetricCollection:
    """The metrics of a classification report; feed them softmax probabilities and integer labels.

    The compute groups are given, not found: torchmetrics would merge metrics whose states are
    equal after the first update, and when every image of that batch is right, top-1 and top-5
    counts agree, so precision, recall and F1 would go on counting top-5 hits. The nine
    precision/recall/F1 metrics and the balanced accuracy do share one state (per-class top-1
    stat scores), updated once. Balanced accuracy is the mean of the per-class recalls (scikit-learn's
    `balanced_accuracy_score`), which is torchmetrics' macro-averaged accuracy.
    """
    top_k = min(5, num_classes)
    metrics: dict[str, Any] = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "acc_top5": MulticlassAccuracy(num_classes, top_k=top_k, average="micro"),
        "balanced_acc": MulticlassAccuracy(num_classes, average="macro"),
        "ece": BinnedCalibrationError(CALIBRATION_BINS),
        "confusion": MulticlassConfusionMatrix(num_classes),
    }
    for average in (None, "macro", "weighted"):
        suffix = f"_{average}" if average else ""
        metrics[f"precision{suffix}"] = MulticlassPrecision(num_classes, average=average)
        metrics[f"recall{suffix}"] = MulticlassRecall(num_classes, average=average)
        metrics[f"f1{suffix}"] = MulticlassF1Score(num_classes, average=average)
    stat_scores = [name for name in metrics if name.startswith(("precision", "recall", "f1", "balanced"))]
    return MetricCollection(metrics, compute_groups=[stat_scores])


def summarize(values: dict[str, Tensor], class_names: list[str]) -> dict[str, Any]:
    """The computed `report_metrics` as plain JSON values, with class names and the most-confused pairs.

    Macro averages follow torchmetrics: a class with no image and no prediction is left out. The
    dense confusion matrix is not in it (a million cells at 1,000 classes): it is `values["confusion"]`.
    """
    confusion = values["confusion"].cpu().long()
    support = confusion.sum(1)
    per_class = [
        {"class": name, "precision": float(values["precision"][i]), "recall": float(values["recall"][i]),
         "f1": float(values["f1"][i]), "support": int(support[i])}
        for i, name in enumerate(class_names)
    ]
    return {
        "images": int(support.sum()),
        "classes": len(class_names),
        "accuracy": float(values["acc"]),
        "top5_accuracy": float(values["acc_top5"]),
        "balanced_accuracy": float(values["balanced_acc"]),
        "top_k": min(5, len(class_names)),
        "expected_calibration_error": float(values["ece"]),
        "calibration_bins": CALIBRATION_BINS,
        "macro_avg": {k: float(values[f"{k}_macro"]) for k in ("precision", "recall", "f1")},
        "weighted_avg": {k: float(values[f"{k}_weighted"]) for k in ("precision", "recall", "f1")},
        "per_class": per_class,
        "most_confused": most_confused(confusion, class_names),
    }


def most_confused(confusion: Tensor, class_names: list[str], limit: int = MOST_CONFUSED) -> list[dict[str, Any]]:
    """The largest off-diagonal counts (true class, predicted class), largest first, ties in (true, predicted) order.

    A stable sort of the flattened matrix, not a Python sort of every non-zero cell (up to a million at 1,000 classes).
    """
    off = confusion.clone()
    off.fill_diagonal_(0)
    support = confusion.sum(1)
    cells = torch.argsort(-off.flatten(), stable=True)[:limit].tolist()
    pairs = [(int(off.flatten()[c]), *divmod(c, off.shape[1])) for c in cells]
    return [{"true": class_names[t], "predicted": class_names[p], "count": n, "share_of_true": n / int(support[t])}
            for n, t, p in pairs if n > 0]


def markdown_report(report: dict[str, Any]) -> str:
    """report.json as tables a person reads."""
    macro, weighted = report["macro_avg"], report["weighted_avg"]
    lines = [
        f"# Evaluation: {report['images']} images, {report['classes']} classes",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| accuracy | {report['accuracy']:.4f} |",
        f"| top-{report['top_k']} accuracy | {report['top5_accuracy']:.4f} |",
        f"| balanced accuracy (mean recall per class) | {report['balanced_accuracy']:.4f} |",
        f"| expected calibration error ({report['calibration_bins']} bins) | {report['expected_calibration_error']:.4f} |",
        f"| macro precision / recall / F1 | {macro['precision']:.4f} / {macro['recall']:.4f} / {macro['f1']:.4f} |",
        f"| weighted precision / recall / F1 | {weighted['precision']:.4f} / {weighted['recall']:.4f} / {weighted['f1']:.4f} |",
        "",
        "## Per class",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---:|---:|---:|---:|",
        *(f"| {c['class']} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |"
          for c in report["per_class"]),
        "",
        "## Most confused (true → predicted)",
        "",
    ]
    if report["most_confused"]:
        lines += ["| true | predicted | images | share of the true class |", "|---|---|---:|---:|"]
        lines += [f"| {p['true']} | {p['predicted']} | {p['count']} | {p['share_of_true']:.2%} |"
                  for p in report["most_confused"]]
    else:
        lines.append("No image was misclassified.")
    return "\n".join(lines) + "\n"


def confusion_figure(confusion: np.ndarray | list, class_names: list[str]) -> plt.Figure:
    """Confusion matrix coloured by row rate (each true class sums to 1), class names on both axes.

    Up to ANNOTATED_CLASSES each non-empty cell prints its image count over its rate: a rate alone
    hides whether 50% is 1 of 2 images or 500 of 1,000. Cells are sized for those two lines and
    the text is sized to the cell (`cell_fontsize`). Beyond that the figure grows with the class
    count and the labels shrink, so 102 classes stay legible; above FIGURE_CLASSES it shows the
    FIGURE_MOST_CONFUSED classes of the largest confusions (`most_confused_classes`), rates still
    shares of each true class's images, and says so in its title.
    """
    counts = np.asarray(confusion, dtype=float)
    support = counts.sum(1, keepdims=True)
    rates = np.divide(counts, support, out=np.zeros_like(counts), where=support > 0)
    title = "confusion matrix (rows: true class, normalised to 1)"
    if len(class_names) > FIGURE_CLASSES:
        shown = most_confused_classes(counts, FIGURE_MOST_CONFUSED)
        counts, rates = counts[np.ix_(shown, shown)], rates[np.ix_(shown, shown)]
        class_names = [class_names[i] for i in shown]
        title = (f"the {len(shown)} most-confused of {len(support)} classes\n"
                 "(rows: true class, share of all its images; confusion.npy holds every class)")
    n = len(class_names)
    annotated = n <= ANNOTATED_CLASSES
    if annotated:
        title = "confusion matrix: images in each cell,\nand their share of the true class (each row sums to 100%)"
    side = min(max(5.0, (0.5 if annotated else 0.2) * n + 2.5), 24.0)
    fontsize = 9 if annotated else min(8.0, 0.4 * 72 * side / n)  # ~half a row's height
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), class_names, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="share of the true class's images")
    fig.tight_layout()
    if annotated:
        size = cell_fontsize(fig, ax, n)
        for t, p in zip(*np.nonzero(counts)):
            share = f"{rates[t, p]:.0%}" if rates[t, p] >= 0.005 else "<1%"  # not 0% for a cell that has images
            ax.text(p, t, f"{int(counts[t, p])}\n{share}", ha="center", va="center", fontsize=size,
                    linespacing=1.1, color="white" if rates[t, p] > 0.5 else "black")
    return fig


def cell_fontsize(fig: plt.Figure, ax: plt.Axes, n: int) -> float:
    """A font size (pt) at which a count over a rate (two lines, up to 5 characters) fills about
    two thirds of an n x n image's cell as laid out, within 6-18 pt."""
    ax.apply_aspect()
    box = ax.get_position()
    cell = 72 * min(box.width * fig.get_figwidth(), box.height * fig.get_figheight()) / n
    return float(np.clip(cell / 3.4, 6.0, 18.0))


def most_confused_classes(confusion: np.ndarray, limit: int) -> np.ndarray:
    """Up to `limit` class indices (sorted) taken pair by pair from the largest off-diagonal counts.

    Pairs, not per-class error totals, so the pairs `most_confused` lists are all in the figure.
    """
    off = np.array(confusion, dtype=float)
    np.fill_diagonal(off, 0)
    true, predicted = np.unravel_index(np.argsort(-off, axis=None, kind="stable"), off.shape)
    classes = np.stack([true, predicted], 1).ravel()  # t0, p0, t1, p1, ... largest count first
    _, first = np.unique(classes, return_index=True)
    return np.sort(classes[np.sort(first)][:limit])


def reliability_figure(confidence: Tensor, correct: Tensor, ece: float, bins: int = CALIBRATION_BINS) -> plt.Figure:
    """Calibration diagram: accuracy against confidence of the top-1 class, per confidence bin.

    Takes each image's top-1 probability and whether it was right, not the N×C probabilities.
    Bins as torchmetrics' calibration error draws them (`[k/bins, (k+1)/bins)`), so the gaps
    drawn here are the ones ECE averages. Each bin holds two bars side by side, accuracy and
    the gap from it to the bin's mean confidence, so neither hides the other whichever is
    higher. The axis starts at the lowest bin holding an image (top-1 confidence is at least
    1/classes, and a trained model's rarely goes below 0.4), not at 0.
    """
    correct = correct.double().numpy()
    confidence = confidence.double().numpy()
    index = np.clip(np.searchsorted(np.linspace(0, 1, bins + 1), confidence, side="right") - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    accuracy = np.bincount(index, weights=correct, minlength=bins) / np.maximum(count, 1)
    mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / np.maximum(count, 1)
    left, width = np.arange(bins) / bins, 1 / bins
    filled = count > 0
    start = left[filled].min() if filled.any() else 0.0
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    ax.bar(left[filled], accuracy[filled], width=width * 0.55, align="edge", color="tab:blue", edgecolor="black",
           lw=0.5, label="accuracy")
    gap = (mean_confidence - accuracy)[filled]
    ax.bar(left[filled] + width * 0.55, gap, bottom=accuracy[filled], width=width * 0.4, align="edge",
           color="tab:red", edgecolor="darkred", lw=0.5, hatch="///",
           label="gap to mean confidence (up: overconfident)")
    ax.plot([start, 1], [start, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set(xlim=(start, 1), ylim=(0, 1), ylabel="accuracy")
    fig.suptitle(f"reliability (ECE {ece:.4f}, {bins} bins)")
    # Above the axes, not on them: high-confidence bars reach the top, low ones the left.
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.01), fontsize=8, ncol=2, frameon=False)
    hist.bar(left[filled], count[filled], width=width, align="edge", color="gray", edgecolor="black")
    hist.set(xlabel="confidence of the predicted class" + (f" (no image below {start:.2f})" if start > 0 else ""),
             ylabel="images")
    fig.tight_layout()
    return fig


def errors_figure(images: Tensor, titles: list[str]) -> plt.Figure:
    """A grid of images ([0, 1], B×3×H×W) with one title each; a note when there are none.

    Each image has a frame, so an all-white image does not read as an empty slot; the layout
    engine (constrained) makes room for multi-line titles above each image.
    """
    n = len(images)
    cols = min(4, max(1, n))
    rows = max(1, math.ceil(n / cols))
    lines = max((t.count("\n") + 1 for t in titles), default=1)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, (2.4 + 0.16 * lines) * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.axis("on")
        ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set(color="0.3", linewidth=1.0)
        ax.set_title(title, fontsize=8)
    if n == 0:
        axes[0][0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    return fig


