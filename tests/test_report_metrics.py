"""Test metrics (precision, recall, F1) against scikit-learn when the first batch is all correct.

torchmetrics merges metrics whose states look alike after the first update; a first batch
without a mistake made top-1 and top-5 counts look alike, so precision/recall/F1 counted top-5 hits.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import precision_recall_fscore_support

from finetune.commands.evaluate import split_predictions
from finetune.analysis.reports import report_metrics
from finetune.build import fit
from helpers import compose_config


def _assert_matches_sklearn(values: dict, true: np.ndarray, predicted: np.ndarray, num_classes: int,
                            prefix: str = "") -> None:
    """Per-class, macro and weighted precision/recall/F1 in `values` equal scikit-learn's on the raw predictions."""
    per_class = precision_recall_fscore_support(true, predicted, labels=range(num_classes), zero_division=0)
    for name, expected in zip(("precision", "recall", "f1"), per_class):
        if f"{prefix}{name}" in values:
            np.testing.assert_allclose(np.asarray(values[f"{prefix}{name}"]), expected, atol=1e-6, err_msg=name)
    present = sorted(set(true) | set(predicted))  # torchmetrics' macro average leaves out classes absent from both
    for average in ("macro", "weighted"):
        averaged = precision_recall_fscore_support(true, predicted, labels=present, average=average, zero_division=0)
        for name, expected in zip(("precision", "recall", "f1"), averaged):
            assert float(values[f"{prefix}{name}_{average}"]) == pytest.approx(expected, abs=1e-6), f"{name}_{average}"


def test_report_metrics_equal_sklearn_after_a_first_batch_without_mistakes():
    classes, rng = 7, np.random.default_rng(0)
    metrics = report_metrics(classes)
    true, predicted = [], []
    for batch in range(4):
        labels = rng.integers(0, classes, 16)
        logits = rng.normal(0, 1, (16, classes))
        if batch == 0:  # every image of the first batch right
            logits[np.arange(16), labels] += 10
        metrics.update(torch.from_numpy(logits).float().softmax(-1), torch.from_numpy(labels))
        true.append(labels)
        predicted.append(logits.argmax(1))
    true, predicted = np.concatenate(true), np.concatenate(predicted)
    values = metrics.compute()
    accuracy = (true == predicted).mean()
    assert 0.2 < accuracy < 0.9 and float(values["acc"]) == pytest.approx(accuracy, abs=1e-6)
    assert float(values["acc_top5"]) > accuracy + 0.1  # top-5 hits differ from top-1: merged states would show
    assert float(values["recall_weighted"]) == pytest.approx(accuracy, abs=1e-6)  # weighted recall is accuracy
    _assert_matches_sklearn(values, true, predicted, classes)


COLOURS = {"blue": (30, 30, 220), "green": (30, 220, 30), "red": (220, 30, 30)}


def _write_split(root: Path, counts: dict[str, int], rng: np.random.Generator,
                 looks_like: dict[str, list[str]] | None = None) -> None:
    """root/<class>/<n>.png noisy colour squares; `looks_like[class]` lists colours some of its images really have."""
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        colours = [*(looks_like or {}).get(name, []), *[name] * count][:count]
        for i, colour in enumerate(colours):
            img = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 20, (36, 36, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")


def test_trainer_test_logs_precision_recall_f1_of_the_best_checkpoint(tmp_path):
    """Through `fit`: the first test batch (8 blue images) is all right, two green-labelled red squares are not."""
    rng = np.random.default_rng(0)
    root = tmp_path / "colours"
    _write_split(root / "train", dict.fromkeys(COLOURS, 8), rng)
    _write_split(root / "val", dict.fromkeys(COLOURS, 3), rng)
    _write_split(root / "test", {"blue": 8, "green": 4, "red": 4}, rng, looks_like={"green": ["red", "red"]})
    cfg = compose_config(["model=lite0", "model.resolution=32", "finetune=frozen", "data=imagefolder",
                          f"data.root={root}", "data.num_workers=0", "data.batch_size=8", "trainer=cpu",
                          "trainer.max_epochs=4", "optim.lr=1e-1", "logger=csv", "trainer.enable_progress_bar=false"],
                         tmp_path / "run")
    metrics = fit(cfg)

    predictions = split_predictions(metrics["best_checkpoint"], cfg, "test")
    true, predicted = predictions.labels.numpy(), predictions.predicted.numpy()
    assert predictions.items[0].endswith("blue/0.png") and (predicted[:8] == true[:8]).all()  # first batch all right
    assert (predicted != true).any()
    assert metrics["test/acc"] == pytest.approx((predicted == true).mean(), abs=1e-6)
    assert metrics["test/recall_weighted"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    _assert_matches_sklearn(metrics, true, predicted, len(COLOURS), prefix="test/")
