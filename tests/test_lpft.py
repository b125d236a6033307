"""`finetune=lpft`: the network starts from the linear probe's head, then fine-tunes; a resume refits nothing.

The head is checked against scikit-learn's LogisticRegression on features this test extracts
itself (the probe's l2 is its C = 1 / (l2 * n_train), as tests/test_probe.py establishes).
"""

import json

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader

import finetune.training.probe
from finetune.commands.compare import compare, read_scalars
from finetune.errors import ConfigError
from finetune.training.policies import FinetunePolicy
from finetune.build import build_datamodule, fit
from helpers import compose_config, write_digits_folder

#: A folder of digits PNGs at 32 px on real Lite0 weights; a three-strength probe grid solved tightly enough to
#: compare to 1e-4.
LPFT = ["finetune=lpft", "data=imagefolder", "data.batch_size=32", "model=lite0", "model.resolution=32", "trainer=cpu",
        "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "+probe.l2_min=1e-2", "+probe.l2_max=1",
        "+probe.l2_steps=3", "+probe.tolerance=1e-8"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> list[str]:
    """LPFT on 20 digits a class as image files (14 train, 3 val, 3 test)."""
    return [*LPFT, f"data.root={write_digits_folder(tmp_path_factory.mktemp('digits'), per_class=20)}"]


def features_and_labels(model: torch.nn.Module, datamodule, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Pooled penultimate features through the eval transform, taken here by a plain forward (not by the probe).

    The loaders own a generator: one without draws its seed from the global RNG, which would change the run recorded.
    """
    features, labels = [], []
    with torch.no_grad():
        for batch in DataLoader(datamodule.dataset(split), batch_size=256, generator=torch.Generator()):
            x, y = datamodule.device_batch(batch, train=False)
            features.append(model.forward_head(model.forward_features(x), pre_logits=True))
            labels.append(y)
    return torch.cat(features).double().numpy(), torch.cat(labels).numpy()


class AtFirstStep(L.Callback):
    """The network as the first step finds it (logits of val images, features, weights) and after that step.

    Training features come from `unaugmented`, a datamodule of the same folder with data.augment=false: the
    run itself augments (the default), and the probe must still fit on the images, not on random crops of them.
    """

    def __init__(self, unaugmented) -> None:
        self.unaugmented = unaugmented

    def on_train_start(self, trainer, pl_module) -> None:
        model, datamodule = pl_module.model, trainer.datamodule
        assert datamodule.augment and not self.unaugmented.augment
        was_training = model.training
        model.eval()
        self.unaugmented.set_preprocessing(datamodule.preprocessing)
        self.unaugmented.prepare_data()
        self.unaugmented.setup("fit")
        self.train = features_and_labels(model, self.unaugmented, "train")
        self.val = features_and_labels(model, datamodule, "val")
        x, _ = datamodule.device_batch(next(iter(DataLoader(datamodule.dataset("val"), batch_size=64, generator=torch.Generator()))), train=False)
        with torch.no_grad():
            self.logits = model(x).double().numpy()
        model.train(was_training)
        self.start = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 1:
            self.after_step = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


class StopAfterFirstEpoch(L.Callback):
    """Ends the fit after epoch 0 and its checkpoint, as a killed run would; config and schedule stay the same."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits):
    """An uninterrupted two-epoch lpft run, and the same run stopped after its first epoch (recorded)."""
    root = tmp_path_factory.mktemp("lpft")
    whole = fit(compose_config(digits, root / "whole"))
    first = AtFirstStep(build_datamodule(compose_config([*digits, "data.augment=false"], root / "unaugmented")))
    fit(compose_config(digits, root / "stopped"), extra_callbacks=[first, StopAfterFirstEpoch()])
    return root, whole, first, digits


def test_the_network_starts_from_the_probes_head_and_full_fine_tuning_moves_the_backbone(runs):
    root, whole, first, _ = runs
    l2 = whole["probe/l2"]
    train_x, train_y = first.train
    with threadpool_limits(1):
        reference = LogisticRegression(C=1 / (l2 * len(train_y)), tol=1e-10, max_iter=10_000).fit(train_x, train_y)
    # The network's logits before the first step are the probe's: scikit-learn's decision function on the same images.
    val_x, val_y = first.val
    np.testing.assert_allclose(first.logits, reference.decision_function(val_x[:64]), atol=1e-3)
    np.testing.assert_allclose(first.start["classifier.weight"].double().numpy(), reference.coef_, atol=1e-4)
    assert whole["probe/val_acc"] == pytest.approx(reference.score(val_x, val_y), abs=1e-12)
    assert whole["probe/l2"] == pytest.approx(min((1.0, 0.1, 0.01), key=lambda g: abs(g - l2)))  # a grid point

    # full after the probe: the first step moves the backbone (stem and last stage) and the head.
    for key in ("stem.conv.weight", "top.conv.weight", "classifier.weight"):
        assert not torch.equal(first.start[key], first.after_step[key]), key

    # The probe's result is logged beside the fine-tune's, once, at step 0.
    scalars = read_scalars(root / "whole" / "tensorboard")
    assert scalars["probe/val_acc"] == [(0, pytest.approx(whole["probe/val_acc"]))]
    assert len(scalars["val/acc"]) == 2
    assert json.loads((root / "whole" / "metrics.json").read_text())["probe/val_acc"] == whole["probe/val_acc"]


def test_resume_takes_the_head_from_the_checkpoint_and_equals_the_uninterrupted_run(runs, monkeypatch):
    root, whole, _, digits = runs
    stopped = root / "stopped" / "checkpoints" / "last.ckpt"
    assert torch.load(stopped, weights_only=True)["epoch"] == 0

    def refit(*args, **kwargs):
        raise AssertionError("the probe was fitted again on resume")

    monkeypatch.setattr(finetune.training.probe, "fit_head", refit)
    # Resumed in its own run directory, as the command a stopped run prints does (its best checkpoint is there).
    resumed = fit(compose_config([*digits, f"ckpt_path={stopped}"], root / "stopped"))
    ends = [torch.load(root / run / "checkpoints" / "last.ckpt", weights_only=True) for run in ("whole", "stopped")]
    assert ends[0]["state_dict"].keys() == ends[1]["state_dict"].keys()
    assert [k for k in ends[0]["state_dict"] if not torch.equal(ends[0]["state_dict"][k], ends[1]["state_dict"][k])] == []
    assert ends[0]["global_step"] == ends[1]["global_step"]
    differ = {k for k in whole if k != "best_checkpoint" and whole[k] != resumed.get(k)}
    assert differ == set() and whole["probe/val_acc"] == resumed["probe/val_acc"]


def test_after_probe_picks_the_policy_the_epochs_follow():
    parts = ["stem", *(f"stage{i}" for i in range(7)), "top", "head"]
    for after in ("full", "partial", "gradual"):
        lpft = FinetunePolicy(name="lpft", after_probe=after, unfreeze_at_epoch=1)
        plain = FinetunePolicy(name=after, unfreeze_at_epoch=1)
        assert [lpft.trainable(parts, e) for e in (0, 1)] == [plain.trainable(parts, e) for e in (0, 1)]
        assert lpft.changes_during_training == plain.changes_during_training == (after == "gradual")


@pytest.mark.parametrize("override, message", [
    ("finetune.after_probe=frozen", "finetune.after_probe: unknown policy after the probe 'frozen'; valid: full, partial, gradual"),
    ("+probe.C=1", "probe.C is unknown; valid probe settings"),
    ("+probe.max_iter=0", "probe.max_iter must be an integer >= 1"),
])
def test_bad_lpft_settings_fail_in_one_line_before_any_data(tmp_path, digits, override, message):
    with pytest.raises(ConfigError) as info:
        fit(compose_config([*digits, override], tmp_path))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow  # 50-230 s on the 2-core machine: in make test-all, out of make test
def test_compare_runs_lpft_beside_the_other_policies(tmp_path, digits):
    overrides = [o for o in digits if not o.startswith(("finetune=", "trainer.max_epochs"))]
    results = compare([*overrides, "trainer.max_epochs=1", "compare.policies=[frozen,lpft]", "compare.cam_images=0"],
                      tmp_path)
    assert [r.policy for r in results] == ["frozen", "lpft"]
    lpft = results[1]
    assert lpft.trainable_params > results[0].trainable_params  # full fine-tuning after the probe
    metrics = json.loads((tmp_path / "runs" / "lpft" / "metrics.json").read_text())
    assert lpft.best_val_acc == pytest.approx(metrics["best_val_acc"]) and "probe/val_acc" in metrics
    assert "| lpft |" in (tmp_path / "comparison.md").read_text()
