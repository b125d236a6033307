"""`finetune=probe`: the linear probe is scikit-learn's multinomial LogisticRegression on the same frozen features.

Its features are float32 whatever trainer.precision says, a fit too large for the device is
chunked to the same solution, and a multi-process launch is refused.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader

from finetune.commands.compare import read_scalars
from finetune.errors import ConfigError
from finetune.models import create_model
from finetune.training.module import FineTuneModule
import finetune.training.probe
from finetune.build import fit_probe
from finetune.training.probe import plan_fit
from finetune.build import build_datamodule, fit
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

    # The run says which fit ran: the digits fit in memory.
    assert json.loads((out / "metrics.json").read_text())["probe/fit"] == metrics["probe/fit"] == "full-batch"
    assert torch.load(metrics["best_checkpoint"], weights_only=True)["probe"]["fit"] == "full-batch"

    scalars = read_scalars(out / "tensorboard")
    assert scalars["val/acc"] == [(0, pytest.approx(metrics["best_val_acc"]))]
    assert scalars["test/acc"] == [(0, pytest.approx(metrics["test/acc"]))]
    assert [v for _, v in scalars["probe/val_acc"]] == pytest.approx([p["val_acc"] for p in path])


@pytest.mark.parametrize("overrides, message", [
    (["data.augment=true"], "finetune=probe measures features of unaugmented images; set data.augment=false"),
    (["ckpt_path=last.ckpt"], "finetune=probe fits in one pass and has nothing to resume"),
    (["probe.l2_min=10"], "probe.l2_min=10 exceeds probe.l2_max=1; swap them"),
    (["probe.l2_steps=0"], "probe.l2_steps must be an integer >= 1"),
    (["probe.chunk_rows=0"], "probe.chunk_rows must be null or an integer >= 1, got 0"),
    (["+probe.C=1"], "probe.C is unknown; valid probe settings: l2_min, l2_max, l2_steps, max_iter, tolerance, chunk_rows"),
])
def test_probe_settings_are_checked_first(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        fit_probe(compose_config([*PROBE, *overrides], tmp_path))
    assert not (tmp_path / "metrics.json").exists()


def test_features_are_float32_under_bf16_mixed(tmp_path, monkeypatch, checkpoint_outputs):
    """trainer.precision=bf16-mixed: the probe still fits the float32 features finetune-evaluate computes.

    Compared with the features `checkpoint_outputs` takes by a plain float32 forward of the same
    backbone (other batches, no channels_last: 2e-5 apart, against 0.46 under bf16 autocast).
    """
    fitted = {}
    regularisation_path = finetune.training.probe.regularisation_path

    def spy(train, val, *args):
        fitted["train"], fitted["val"] = train, val
        return regularisation_path(train, val, *args)

    monkeypatch.setattr(finetune.training.probe, "regularisation_path", spy)
    fit_probe(compose_config([*PROBE, "trainer.precision=bf16-mixed", "probe.l2_steps=1"], tmp_path))
    _, outputs = checkpoint_outputs
    for split in ("train", "val"):
        np.testing.assert_allclose(fitted[split].features.numpy(), outputs[split][0], rtol=0, atol=1e-4)


def test_full_batch_fit_only_where_it_fits():
    """1M x 2,560 float64 B7 features are 20.5 GB: full-batch in an H200's 141 GB, chunked in 16 GB free."""
    assert plan_fit(1797, 1280, 10, itemsize=8, available=8 * 2**30) is None  # the digits, on any machine
    assert plan_fit(1_000_000, 2560, 1000, itemsize=8, available=141 * 10**9) is None
    rows = plan_fit(1_000_000, 2560, 1000, itemsize=8, available=16 * 10**9)
    assert rows is not None and 100_000 < rows and rows * 2560 * 8 < 8 * 10**9  # chunks fill no more than half
    assert plan_fit(1797, 1280, 10, itemsize=8, available=8 * 2**30, chunk_rows=100) == 100  # probe.chunk_rows


def test_chunked_fit_equals_full_batch(tmp_path, monkeypatch, probe_run, checkpoint_outputs, sklearn_path):
    """Through the `finetune` command, on a device with 3.1 MB free: the same classifier, path and accuracies.

    A chunk of 100 rows takes 100 x (1280 x (8 + 4) + 4 x 8 x 10) bytes, half of 3,136,000:
    the 1078 training rows go in 11 chunks, the last one partial.
    """
    monkeypatch.setattr(finetune.training.probe, "available_memory", lambda device: 3_136_000)
    metrics = fit(compose_config(PROBE, tmp_path))
    assert metrics["best_checkpoint"] == str(tmp_path / "checkpoints" / "probe.ckpt")  # `finetune` dispatched here
    assert metrics["probe/fit"] == "chunked, 11 chunks of 100 rows"
    assert torch.load(metrics["best_checkpoint"], weights_only=True)["probe"]["fit"] == metrics["probe/fit"]

    cfg, full = probe_run
    path = json.loads((tmp_path / "metrics.json").read_text())["probe/path"]
    full_path = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["probe/path"]
    # Exactly the same accuracies; L-BFGS may take an iteration more or less (the same sums, rounded in another order).
    assert [{**p, "iterations": None} for p in path] == [{**p, "iterations": None} for p in full_path]
    results = ("probe/l2", "best_val_acc", "test/acc", "test/acc_top5")
    assert {k: metrics[k] for k in results} == {k: full[k] for k in results}

    chunked = FineTuneModule.from_checkpoint(metrics["best_checkpoint"]).model.classifier
    full_batch = checkpoint_outputs[0].model.classifier
    for ours, reference in ((chunked.weight, full_batch.weight), (chunked.bias, full_batch.bias)):
        assert ((ours - reference).abs().max() / reference.abs().max()).item() < 1e-6
    reference = sklearn_path[metrics["probe/l2"]]  # and so still scikit-learn's classifier
    np.testing.assert_allclose(chunked.weight.detach().double().numpy(), reference.coef_, atol=1e-4)


@pytest.mark.parametrize("env, overrides, launch", [
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, [], "WORLD_SIZE=2"),  # torchrun --nproc_per_node=2
    ({"SLURM_NTASKS": "4", "SLURM_JOB_NAME": "probe"}, [], "SLURM_NTASKS=4"),  # srun --ntasks=4
    ({}, ["trainer.devices=2"], "trainer.devices=2 trainer.num_nodes=1"),  # Lightning would start 2 processes
    ({"LOCAL_WORLD_SIZE": "2"}, ["trainer=ddp", "trainer.accelerator=cpu"], "trainer.devices=2 trainer.num_nodes=1"),
])
def test_several_processes_are_refused(tmp_path, monkeypatch, env, overrides, launch):
    """Each process would run the whole probe on the first device and race on probe.ckpt: refused before any work."""
    for name in ("WORLD_SIZE", "SLURM_NTASKS", "SLURM_JOB_NAME", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE",
                 "SLURM_NNODES", "GROUP_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=re.escape(f"finetune=probe is one fit on one device, but this run has "
                                                    f"several processes ({launch}); start it once")):
        fit(compose_config([*PROBE, *overrides], tmp_path))  # a later trainer= replaces PROBE's trainer=cpu
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "checkpoints").exists()
