"""`finetune=probe`: the linear probe is scikit-learn's multinomial LogisticRegression on the same frozen features."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader

from finetune.compare import read_scalars
from finetune.errors import ConfigError
from finetune.models import create_model
from finetune.module import FineTuneModule
from finetune.probe import fit_probe
from finetune.train import build_datamodule, fit
from helpers import compose_config

#: Three strengths, strongest first; a tolerance tight enough to compare solutions to 1e-4.
PROBE = ["finetune=probe", "data=digits", "model=lite0", "model.resolution=32", "trainer=cpu",
         "probe.l2_min=1e-2", "probe.l2_max=1", "probe.l2_steps=3", "probe.tolerance=1e-8"]
GRID = [1.0, 0.1, 0.01]


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    cfg = compose_config(PROBE, tmp_path_factory.mktemp("probe"))
    return cfg, fit_probe(cfg)


@pytest.fixture(scope="module")
def checkpoint_outputs(probe_run):
    """Per split, through the saved checkpoint: pooled features (taken here, not by the probe), its logits, the labels."""
    cfg, metrics = probe_run
    module = FineTuneModule.from_checkpoint(metrics["best_checkpoint"])
    datamodule = build_datamodule(cfg)
    datamodule.set_preprocessing(module.preprocessing)
    outputs = {}
    with torch.no_grad():
        for split in ("train", "val", "test"):
            features, logits, labels = [], [], []
            for batch in DataLoader(datamodule.dataset(split), batch_size=256):
                x, y = datamodule.device_batch(batch, train=False)
                features.append(module.model.forward_head(module.model.forward_features(x), pre_logits=True))
                logits.append(module(x))
                labels.append(y)
            outputs[split] = (torch.cat(features).double().numpy(), torch.cat(logits).double(), torch.cat(labels).numpy())
    return module, outputs


@pytest.fixture(scope="module")
def sklearn_path(checkpoint_outputs):
    """scikit-learn's classifier for each strength: our l2 is its C = 1 / (l2 * n_train)."""
    x, _, y = checkpoint_outputs[1]["train"]
    with threadpool_limits(1):  # a 1078 x 1280 problem: threads only contend on a shared CPU
        return {l2: LogisticRegression(C=1 / (l2 * len(y)), tol=1e-10, max_iter=10_000).fit(x, y) for l2 in GRID}


def test_probe_picks_and_matches_sklearns_classifier(probe_run, checkpoint_outputs, sklearn_path):
    _, metrics = probe_run
    module, outputs = checkpoint_outputs
    val_x, _, val_y = outputs["val"]
    val_acc = {l2: clf.score(val_x, val_y) for l2, clf in sklearn_path.items()}
    chosen = max(GRID, key=val_acc.get)  # ties: the first, the strongest
    assert metrics["probe/l2"] == pytest.approx(chosen)
    assert metrics["best_val_acc"] == pytest.approx(val_acc[chosen], abs=1e-12)

    reference = sklearn_path[chosen]
    for split in ("val", "test"):
        x, logits, y = outputs[split]
        probabilities = torch.softmax(logits, dim=1).numpy()
        np.testing.assert_array_equal(probabilities.argmax(1), reference.predict(x))
        np.testing.assert_allclose(probabilities, reference.predict_proba(x), atol=1e-4)
    assert metrics["test/acc"] == pytest.approx(reference.score(*outputs["test"][::2]), abs=1e-12)
    np.testing.assert_allclose(module.model.classifier.weight.detach().double().numpy(), reference.coef_, atol=1e-4)


def test_path_checkpoint_and_logs(probe_run, checkpoint_outputs, sklearn_path):
    cfg, metrics = probe_run
    module, outputs = checkpoint_outputs
    out = Path(cfg.paths.output_dir)
    path = json.loads((out / "metrics.json").read_text())["probe/path"]
    assert [p["l2"] for p in path] == pytest.approx(GRID)
    val_x, _, val_y = outputs["val"]
    assert [p["val_acc"] for p in path] == pytest.approx([sklearn_path[l2].score(val_x, val_y) for l2 in GRID], abs=1e-12)

    # The backbone is the pretrained one, untouched (BatchNorm statistics included); the checkpoint records a frozen policy.
    pretrained = create_model("lite0", num_classes=10, pretrained=True).state_dict()
    ours = module.model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in pretrained.items() if not k.startswith("classifier."))
    assert module.hparams.finetune["name"] == "frozen"

    scalars = read_scalars(out / "tensorboard")
    assert scalars["val/acc"] == [(0, pytest.approx(metrics["best_val_acc"]))]
    assert scalars["test/acc"] == [(0, pytest.approx(metrics["test/acc"]))]
    assert [v for _, v in scalars["probe/val_acc"]] == pytest.approx([p["val_acc"] for p in path])


@pytest.mark.parametrize("overrides, message", [
    (["data.augment=true"], "finetune=probe measures features of unaugmented images; set data.augment=false"),
    (["ckpt_path=last.ckpt"], "finetune=probe fits in one pass and has nothing to resume"),
    (["probe.l2_min=10"], "probe.l2_min=10 exceeds probe.l2_max=1; swap them"),
    (["probe.l2_steps=0"], "probe.l2_steps must be an integer >= 1"),
    (["+probe.C=1"], "probe.C is unknown; valid probe settings: l2_min, l2_max, l2_steps, max_iter, tolerance"),
])
def test_probe_settings_are_checked_first(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        fit_probe(compose_config([*PROBE, *overrides], tmp_path))
    assert not (tmp_path / "metrics.json").exists()


def test_finetune_command_dispatches_probe(tmp_path):
    metrics = fit(compose_config(PROBE, tmp_path))
    assert metrics["best_checkpoint"] == str(tmp_path / "checkpoints" / "probe.ckpt")
    assert json.loads((tmp_path / "metrics.json").read_text())["probe/l2"] == metrics["probe/l2"]
