"""`data.decode=device` in finetune-compare's Grad-CAM figure and in `evaluate(split_predictions(...))` (issue 20).

With decode=device a dataset's items are file bytes that the device decodes a batch at a time; both
paths stacked the items as images and crashed, the figure only after every run had trained. Each
must show exactly what the worker-decode path shows for the same checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.commands.compare import RunResult, compare, compose, write_cam
from finetune.commands.evaluate import evaluate, split_predictions
from helpers import compose_config, write_digits_folder


@pytest.fixture(scope="module")
def jpeg_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """write_digits_folder's digits (train 70, val 10) as JPEGs: what data.decode=device decodes on the device."""
    root = write_digits_folder(tmp_path_factory.mktemp("digits"), per_class=6, splits=(("train", 0.8), ("val", 0.2)))
    for png in root.rglob("*.png"):
        Image.open(png).save(png.with_suffix(".jpg"), quality=90)
        png.unlink()
    return root


def _overrides(root: Path, decode: str) -> list[str]:
    return ["model=b0", "model.pretrained=null", "model.resolution=32", "data=imagefolder", f"data.root={root}",
            f"data.decode={decode}", "data.num_workers=0", "data.batch_size=8", "trainer=cpu", "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false"]


COMPARE = ["compare.policies=[full]", "compare.cam_images=4"]


@pytest.fixture(scope="module")
def compared(jpeg_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[RunResult], Path]:
    """finetune-compare with data.decode=device, as a user runs it: its results and output folder."""
    out = tmp_path_factory.mktemp("compare")
    return compare([*_overrides(jpeg_digits, "device"), *COMPARE], out), out


def _pixels(png: Path) -> np.ndarray:
    return np.asarray(Image.open(png))


def test_compare_draws_grad_cam_of_device_decoded_images_as_of_worker_decoded_ones(
    compared: tuple[list[RunResult], Path], jpeg_digits: Path, tmp_path: Path
) -> None:
    results, out = compared
    worker = compose([*_overrides(jpeg_digits, "worker"), *COMPARE])
    write_cam(worker, {r.run: r.best_checkpoint for r in results}, tmp_path)  # the same checkpoint, worker-decoded
    assert np.array_equal(_pixels(out / "comparison_cam.png"), _pixels(tmp_path / "comparison_cam.png"))


def test_evaluating_a_device_decoded_split_reports_what_the_worker_decoded_one_does(
    compared: tuple[list[RunResult], Path], jpeg_digits: Path, tmp_path: Path
) -> None:
    checkpoint = compared[0][0].best_checkpoint
    predictions, reports = {}, {}
    for decode in ("device", "worker"):
        cfg = compose_config(_overrides(jpeg_digits, decode), tmp_path / decode)
        predictions[decode] = split_predictions(checkpoint, cfg, "val")
        reports[decode] = evaluate(predictions[decode], tmp_path / decode / "eval")
    device, worker = predictions["device"], predictions["worker"]
    assert (device.predicted != device.labels).any()  # errors.png shows the network's view of some images
    for kept in ("top_probs", "top_classes", "labels"):
        assert torch.equal(getattr(device, kept), getattr(worker, kept)), kept
    assert device.items == worker.items and reports["device"] == reports["worker"]
    for name in ("report.json", "predictions.csv"):
        assert (tmp_path / "device" / "eval" / name).read_bytes() == (tmp_path / "worker" / "eval" / name).read_bytes()
    for name in ("errors.png", "confusion_matrix.png"):
        assert np.array_equal(_pixels(tmp_path / "device" / "eval" / name), _pixels(tmp_path / "worker" / "eval" / name))
