"""`finetune-audit`: know your data before and after fine-tuning.

    finetune-audit model=lite0 data=imagefolder data.root=DIR --output audit/
    finetune-audit model=lite0 model.pretrained=<fine-tuned .ckpt> data=imagefolder data.root=DIR --output audit/

The same config overrides as `finetune`. The network's pooled features of every split are
extracted once (unaugmented, float32, as `finetune=probe` takes them); from them:

- label issues: cleanlab's confident learning on out-of-sample probabilities of the linear probe
  (K-fold on train, see `audit_probe`);
- exact duplicates (equal bytes) and near duplicates (cosine similarity of the features), pairs
  across splits first, since those are leakage (`audit_search`);
- outliers: images far from their nearest neighbours, so unlike every class;
- class counts per split and their imbalance.

--output receives label_issues.csv, duplicates.csv, outliers.csv, classes.csv, report.md,
report.json and the galleries label_issues.png, duplicates.png and outliers.png (`audit_report`).
The thresholds are the `audit` keys of conf/audit.yaml.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from finetune import build
from finetune.build import build_datamodule, build_module, check_config, trainer_kwargs
from finetune.cli import check_overrides
from finetune.commands.audit.data import Images
from finetune.commands.audit.probe import out_of_sample_probabilities
from finetune.commands.audit.report import (
    Findings,
    class_rows,
    duplicate_rows,
    gallery,
    label_issue_rows,
    markdown,
    outlier_rows,
    report,
    write_csv,
)
from finetune.commands.audit.search import (
    duplicate_pairs,
    exact_pairs,
    nearest_neighbours,
    outlier_fence,
    outlier_scores,
)
from finetune.configuration.rules import Rule, checked_section, integer, number, one_of
from finetune.errors import ConfigError, take_debug_flag, user_errors
from finetune.fileio import writable_folder
from finetune.training.features import pooled_features
from finetune.training.probe import CHECKPOINT_POLICY, ProbeSettings, check_one_process

#: cleanlab.filter.find_label_issues' `filter_by` methods.
FILTERS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given",
           "low_normalized_margin", "low_self_confidence")


@dataclass(frozen=True)
class AuditSettings:
    """The `audit` node of conf/audit.yaml (the one source of the defaults), checked."""

    folds: int
    filter_by: str
    neighbours: int
    near_duplicate: float
    outlier_iqr: float
    gallery: int
    report_rows: int

    RULES = {"folds": integer(2), "filter_by": one_of(*FILTERS), "neighbours": integer(1),
             "near_duplicate": number(0, 1, lo_open=True), "outlier_iqr": number(0), "gallery": integer(0),
             "report_rows": integer(0)}

    @classmethod
    def from_config(cls, node: DictConfig | None) -> AuditSettings:
        values = None if node is None else OmegaConf.to_container(node, resolve=True)
        rules: dict[str, Rule] = {f.name: cls.RULES[f.name] for f in fields(cls)}
        return cls(**checked_section(values, "audit", rules, "finetune-audit needs the audit settings of "
                                     "conf/audit.yaml; compose the 'audit' config"))


def compose(overrides: list[str]) -> DictConfig:
    """The `audit` config for these overrides (`finetune.build.compose` of conf/audit.yaml)."""
    return build.compose("audit", overrides)


def audit(overrides: list[str], output: str | Path) -> dict[str, Any]:
    """The Python API of `finetune-audit`: report.json's content, every file written into `output`."""
    cfg = compose(overrides)
    cfg.paths.output_dir = str(output)  # set, not an override: any path, whatever characters it holds
    return audit_config(cfg, output)


def audit_config(cfg: DictConfig, output: str | Path) -> dict[str, Any]:
    """Audit the data of `cfg` with its network's features; write the lists, reports and galleries into `output`."""
    settings = AuditSettings.from_config(cfg.get("audit"))
    probe = ProbeSettings.for_run(cfg)  # probe.yaml's settings, the audit config's probe.<key> over them
    if cfg.get("ckpt_path"):
        raise ConfigError("finetune-audit resumes nothing; remove ckpt_path (to audit with a fine-tuned network's "
                          "features, pass it as model.pretrained=<checkpoint>)")
    check_one_process(OmegaConf.to_container(cfg.trainer, resolve=True))
    # Every image as validation sees it: no augmentation, no class balancing or few-shot subset of train.
    data = {"augment": False} | {k: v for k, v in (("balance", "none"), ("examples_per_class", None)) if k in cfg.data}
    cfg = OmegaConf.merge(cfg, {"data": data, "finetune": CHECKPOINT_POLICY})
    check_config(cfg)
    out = writable_folder(Path(output))
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    device = L.Fabric(accelerator=trainer_kwargs(cfg).get("accelerator", "auto"), devices=1).device
    datamodule.prepare_data()
    datamodule.setup(None)
    splits = ["train", "val"] + (["test"] if datamodule.has_test else [])
    images = Images.read(datamodule, splits)
    _check_enough(images, settings)

    model = module.model.to(device).eval()
    features = {split: pooled_features(model, datamodule, split, device) for split in splits}
    model.to("cpu")  # the fits and the search need the device's memory, not the network
    probabilities, fit = out_of_sample_probabilities(features, datamodule.num_classes, probe, settings.folds,
                                                     int(cfg.seed), device)
    findings = find_issues(images, torch.cat([x for x, _ in features.values()]),
                           np.concatenate([probabilities[s] for s in splits]), fit, settings, device)
    summary = report(findings, asdict(settings), settings.report_rows)
    write_outputs(findings, summary, out, settings)
    return summary


def _check_enough(images: Images, settings: AuditSettings) -> None:
    train = images.count("train")
    if train < settings.folds:
        raise ConfigError(f"audit.folds={settings.folds} needs at least {settings.folds} training images, the "
                          f"training split has {train}; add images or lower audit.folds (at least 2)")


def find_issues(images: Images, features: torch.Tensor, probabilities: np.ndarray, fit: Any,
                settings: AuditSettings, device: torch.device) -> Findings:
    """Label issues (cleanlab), duplicate pairs and outliers (nearest neighbours), each ordered worst first."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = images.labels
    flagged = find_label_issues(labels, probabilities, filter_by=settings.filter_by, n_jobs=1)
    quality = get_label_quality_scores(labels, probabilities)
    issues = np.flatnonzero(flagged)
    issues = issues[np.argsort(quality[issues], kind="stable")]

    similarities, indices = nearest_neighbours(features, settings.neighbours, device)
    pairs = duplicate_pairs(similarities, indices, settings.near_duplicate, exact_pairs(images.hashes(), images.split),
                            images.split)
    scores = outlier_scores(similarities)
    fence = outlier_fence(scores, settings.outlier_iqr)
    outliers = np.flatnonzero(scores > fence)
    outliers = outliers[np.argsort(-scores[outliers], kind="stable")]
    return Findings(images, probabilities, quality, issues, pairs, scores, outliers, fence, fit)


def write_outputs(f: Findings, summary: dict[str, Any], out: Path, settings: AuditSettings) -> None:
    write_csv(out / "label_issues.csv", ["file", "split", "given", "suggested", "score"], label_issue_rows(f))
    write_csv(out / "duplicates.csv", ["file_a", "split_a", "file_b", "split_b", "similarity", "kind"],
              duplicate_rows(f))
    write_csv(out / "outliers.csv", ["file", "split", "score"], outlier_rows(f))
    write_csv(out / "classes.csv", ["class", "split", "count", "share", "imbalance_ratio"], class_rows(f.images))
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(markdown(summary))
    shown = settings.gallery
    gallery(f, f.label_issues[:shown].tolist(), out / "label_issues.png", "Label issues, most likely first",
            [f"label quality {f.label_quality[r]:.3f}" for r in f.label_issues[:shown].tolist()])
    pairs = [(a, b, s) for a, b, s in zip(f.pairs.a.tolist(), f.pairs.b.tolist(), f.pairs.similarity.tolist())]
    pairs = pairs[:max(1, shown // 2)] if shown else []
    gallery(f, [row for a, b, _ in pairs for row in (a, b)], out / "duplicates.png",
            "Duplicate pairs side by side, across splits first",
            [f"similarity {s:.4f}" for *_, s in pairs for _ in "ab"])
    gallery(f, f.outliers[:shown].tolist(), out / "outliers.png", "Outliers, most unusual first",
            [f"distance {f.outlier_scores[r]:.3f}" for r in f.outliers[:shown].tolist()])


def summary_lines(summary: dict[str, Any], out: Path, overrides: list[str]) -> list[str]:
    """What the command prints last: where the output went, the counts, and the next command."""
    images, dup = summary["images"], summary["duplicates"]
    ratio = max(summary["imbalance"]["ratio"].values())
    return [
        f"Audit of {images['total']} images in {out}/ (report.md, *.csv, *.png):",
        f"  label issues  {summary['label_issues']['count']}",
        f"  duplicates    {dup['pairs']} pairs, {dup['across_splits']} across splits (leakage)",
        f"  outliers      {summary['outliers']['count']}",
        f"  imbalance     {ratio:.2f}x largest / smallest class",
        f"Next: fix the files listed in {out / 'report.md'}, then fine-tune: finetune {shlex.join(overrides)}",
    ]


def main(argv: list[str] | None = None) -> None:
    """The `finetune-audit` command: `finetune`'s config overrides, and --output."""
    parser = argparse.ArgumentParser(prog="finetune-audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="folder for the lists, reports and galleries")
    args, overrides = parser.parse_known_args(take_debug_flag(sys.argv[1:] if argv is None else argv))
    with user_errors():
        unknown = [arg for arg in overrides if arg.startswith("-")]
        if unknown:
            raise ConfigError(f"unknown option {unknown[0]}; finetune-audit takes finetune's config overrides "
                              "(key=value) and --output DIR")
        check_overrides(overrides)
        summary = audit(overrides, args.output)
        print("\n".join(summary_lines(summary, args.output, overrides)))

