"""Evaluation at scale keeps state that does not grow with the images: the binned ECE and the kept top-k arrays."""
from __future__ import annotations

import torch
from torchmetrics.classification import MulticlassCalibrationError

from finetune.commands.evaluate import ScoreKeeper
from finetune.analysis.reports import CALIBRATION_BINS, BinnedCalibrationError


def _batches(n_batches: int, size: int = 64, classes: int = 7, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        probs = (3 * torch.randn(size, classes, generator=generator)).softmax(-1)
        yield probs, torch.randint(0, classes, (size,), generator=generator)


def test_binned_ece_equals_torchmetrics_and_its_state_does_not_grow():
    ours, reference = BinnedCalibrationError(CALIBRATION_BINS), MulticlassCalibrationError(7, n_bins=CALIBRATION_BINS)
    sizes = []
    for probs, labels in _batches(40):
        ours.update(probs, labels)
        reference.update(probs, labels)
        sizes.append(sum(t.numel() for t in (ours.count, ours.confidence, ours.correct)))
    assert torch.isclose(ours.compute(), reference.compute(), atol=1e-6)
    assert len(set(sizes)) == 1  # torchmetrics' list states hold one number per image


def test_binned_ece_bins_confidences_on_the_boundaries_as_torchmetrics_does():
    # A confidence of exactly a bin edge (k/15 as linspace makes it, and 1.0) is bucketize(right=True)'s edge
    # case; each shares its bin with a confidence just above it, so a misplaced one changes the value.
    edge = torch.linspace(0, 1, CALIBRATION_BINS + 1)
    confidence = torch.stack([edge[9], edge[9] + 0.02, edge[12], edge[12] + 0.01, edge[15], torch.tensor(0.99)])
    probs = torch.stack([confidence, 1 - confidence], dim=1)
    labels = torch.tensor([0, 1, 1, 0, 0, 1])  # right, wrong, wrong, right, right, wrong
    ours, reference = BinnedCalibrationError(CALIBRATION_BINS), MulticlassCalibrationError(2, n_bins=CALIBRATION_BINS)
    ours.update(probs, labels)
    reference.update(probs, labels)
    assert torch.isclose(ours.compute(), reference.compute(), atol=1e-7)


def test_kept_scores_are_the_top_k_of_every_image_in_order_announced_or_not():
    batches = list(_batches(5, size=10))
    probs = torch.cat([p for p, _ in batches])
    labels = torch.cat([y for _, y in batches])
    for announced in (50, 0, 17):  # exact, unknown, too few: the arrays grow
        keeper = ScoreKeeper(7, top_k=5, device=torch.device("cpu"), images=announced)
        for p, y in batches:
            keeper.update(p, y)
        scores = keeper.scores()
        top = probs.topk(5, dim=-1)
        assert torch.equal(scores.top_probs, top.values) and torch.equal(scores.top_classes, top.indices.int())
        assert torch.equal(scores.labels, labels)
