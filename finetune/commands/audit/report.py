"""What `finetune-audit` writes: the CSV lists, report.md / report.json with advice, and the three galleries."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finetune.commands.audit.data import Images
from finetune.commands.audit.probe import ProbeFit
from finetune.commands.audit.search import Pairs

#: Gallery tiles per row (duplicates: pairs side by side, so half as many pairs).
GALLERY_COLUMNS = 6

ADVICE = {
    "label_issues": "Look at label_issues.png: move each wrongly labelled file into its right class folder (the "
                    "suggested class is the probe's guess), or delete it if it belongs to no class. Training on "
                    "wrong labels teaches the mistakes; validating on them misreports accuracy.",
    "leakage": "Pairs across splits are leakage: the same photo is trained on and validated (or tested) on, which "
               "inflates val/test accuracy. Delete the copy from val/ or test/.",
    "duplicates": "Copies within a split weigh one photo several times: keep one of each pair.",
    "outliers": "Outliers look unlike every other image: delete those that belong to no class, or collect more "
                "images of what they show (or add it as a class).",
    "imbalance": "The largest class outnumbers the smallest by the ratio shown: collect more images of the rare "
                 "classes, or balance training (data.balance=sampler or data.balance=loss).",
    "balanced": "The classes are balanced within 1.5x in every split.",
}


@dataclass(frozen=True)
class Findings:
    """Everything the audit found, as rows into `images`; each list is ordered worst first."""

    images: Images
    probabilities: np.ndarray  # out-of-sample, images x classes
    label_quality: np.ndarray  # cleanlab's label quality score per image: near 0, the label is surely wrong
    label_issues: np.ndarray
    pairs: Pairs
    outlier_scores: np.ndarray
    outliers: np.ndarray
    outlier_fence: float
    probe: ProbeFit

    def suggested(self, row: int) -> str:
        return self.images.class_names[int(self.probabilities[row].argmax())]

    def given(self, row: int) -> str:
        return self.images.class_names[int(self.images.labels[row])]

    @property
    def across_splits(self) -> int:
        split = self.images.split
        return int((split[self.pairs.a] != split[self.pairs.b]).sum())


def label_issue_rows(f: Findings) -> list[dict[str, Any]]:
    return [{"file": f.images.names[r], "split": f.images.split_name(r), "given": f.given(r),
             "suggested": f.suggested(r), "score": round(float(f.label_quality[r]), 6)} for r in f.label_issues.tolist()]


def duplicate_rows(f: Findings) -> list[dict[str, Any]]:
    p, images = f.pairs, f.images
    return [{"file_a": images.names[a], "split_a": images.split_name(a), "file_b": images.names[b],
             "split_b": images.split_name(b), "similarity": round(float(s), 6), "kind": "exact" if e else "near"}
            for a, b, s, e in zip(p.a.tolist(), p.b.tolist(), p.similarity.tolist(), p.exact.tolist())]


def outlier_rows(f: Findings) -> list[dict[str, Any]]:
    return [{"file": f.images.names[r], "split": f.images.split_name(r), "score": round(float(f.outlier_scores[r]), 6)}
            for r in f.outliers.tolist()]


def class_rows(images: Images) -> list[dict[str, Any]]:
    """Per split and class: its count, its share of the split, and how many times the split's largest class it is."""
    rows = []
    for index, split in enumerate(images.splits):
        counts = np.bincount(images.labels[images.split == index], minlength=len(images.class_names))
        for name, count in zip(images.class_names, counts.tolist()):
            rows.append({"class": name, "split": split, "count": count,
                         "share": round(count / max(1, counts.sum()), 6),
                         "imbalance_ratio": round(counts.max() / count, 6) if count else math.inf})
    return rows


def imbalance(images: Images) -> dict[str, float]:
    """Per split: largest class count / smallest (inf where a class has no image in it)."""
    ratios = {}
    for row in class_rows(images):
        ratios[row["split"]] = max(ratios.get(row["split"], 1.0), row["imbalance_ratio"])
    return ratios


def write_csv(path: Path, columns: Sequence[str], rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def report(f: Findings, settings: dict[str, Any], worst: int) -> dict[str, Any]:
    """report.json: the counts, the `worst` first cases of each issue, and what to do about them."""
    images = f.images
    issues_by_split = {s: int((images.split[f.label_issues] == i).sum()) for i, s in enumerate(images.splits)}
    ratios = imbalance(images)
    duplicates = duplicate_rows(f)
    return {
        "images": {split: images.count(split) for split in images.splits} | {"total": len(images)},
        "classes": len(images.class_names),
        "probe": asdict(f.probe),
        "label_issues": {"count": len(f.label_issues), "by_split": issues_by_split,
                         "worst": label_issue_rows(f)[:worst], "advice": ADVICE["label_issues"]},
        "duplicates": {"pairs": len(f.pairs), "exact": int(f.pairs.exact.sum()), "near": int((~f.pairs.exact).sum()),
                       "across_splits": f.across_splits, "worst": duplicates[:worst],
                       "advice": " ".join([ADVICE["leakage"], ADVICE["duplicates"]])},
        "outliers": {"count": len(f.outliers), "fence": round(f.outlier_fence, 6), "worst": outlier_rows(f)[:worst],
                     "advice": ADVICE["outliers"]},
        "imbalance": {"ratio": ratios,
                      "advice": ADVICE["imbalance"] if max(ratios.values()) > 1.5 else ADVICE["balanced"]},
        "settings": settings,
    }


def markdown(summary: dict[str, Any]) -> str:
    """report.md: the same content as report.json, for reading."""
    images, probe = summary["images"], summary["probe"]
    issues, dup, out, imb = (summary[k] for k in ("label_issues", "duplicates", "outliers", "imbalance"))
    split_counts = ", ".join(f"{k} {v}" for k, v in images.items() if k != "total")
    lines = [
        "# Data audit", "",
        f"{images['total']} images ({split_counts}), {summary['classes']} classes. Out-of-sample probabilities from "
        f"the linear probe at l2={probe['l2']:.3g} (validation accuracy {probe['val_acc']:.4f}), "
        f"{probe['folds']}-fold on train.", "",
        "| issue | count | file |", "|---|---:|---|",
        f"| label issues | {issues['count']} | label_issues.csv, label_issues.png |",
        f"| duplicate pairs across splits (leakage) | {dup['across_splits']} | duplicates.csv, duplicates.png |",
        f"| duplicate pairs in all (exact / near) | {dup['pairs']} ({dup['exact']} / {dup['near']}) | duplicates.csv |",
        f"| outliers | {out['count']} | outliers.csv, outliers.png |",
        "| largest / smallest class | " + ", ".join(f"{s} {r:.2f}" for s, r in imb["ratio"].items())
        + " | classes.csv |",
        "",
        "## Label issues", "", issues["advice"], "",
        _table(issues["worst"], ["file", "split", "given", "suggested", "score"]),
        "`score`: cleanlab's label quality, from 0 (the label is surely wrong) to 1.", "",
        "## Duplicates and leakage", "", dup["advice"], "",
        _table(dup["worst"], ["file_a", "split_a", "file_b", "split_b", "similarity", "kind"]),
        "## Outliers", "", out["advice"], "", _table(out["worst"], ["file", "split", "score"]),
        f"`score`: mean cosine distance to the nearest images; listed above {out['fence']:.4f} (the fence).", "",
        "## Classes", "", imb["advice"], "",
    ]
    return "\n".join(lines)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "None found.\n"
    head = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(head + ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]) + "\n"


def gallery(f: Findings, rows: Sequence[int], path: Path, title: str, captions: Sequence[str] = ()) -> None:
    """A grid of the images `rows`, each titled with its file name, split, given and suggested class, and `captions`."""
    from finetune.analysis.cam import plt

    columns = GALLERY_COLUMNS
    lines = max(1, math.ceil(len(rows) / columns))
    fig, axes = plt.subplots(lines, columns, figsize=(2.3 * columns, 2.7 * lines + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for n, row in enumerate(rows):
        ax = axes.flat[n]
        ax.imshow(f.images.thumbnail(row))
        extra = f"\n{captions[n]}" if n < len(captions) else ""
        ax.set_title(f"{_short(f.images.names[row])} ({f.images.split_name(row)})\ngiven {f.given(row)}, "
                     f"suggested {f.suggested(row)}{extra}", fontsize=7)
    fig.suptitle(title if rows else f"{title}: none found", fontsize=10)
    top = 1 - 0.45 / fig.get_figheight()  # room for the title
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top, hspace=0.45, wspace=0.05)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _short(name: str, width: int = 30) -> str:
    """The file's last two path parts (class folder and file name), cut to `width` from the left."""
    short = "/".join(Path(name).parts[-2:])
    return short if len(short) <= width else "…" + short[-(width - 1):]
