"""finetune-compare's report, read back against its TensorBoard logs; cached-feature training."""

import json
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from torch.utils.flop_counter import FlopCounterMode

from finetune.commands.compare import compare, compose, pareto_front, read_scalars, run_config
from finetune.errors import ConfigError
from finetune.commands.evaluate import split_predictions
from finetune.training.features import CachedFeatureDataModule
from finetune.training.module import FineTuneModule
from finetune.build import build_datamodule, build_module, fit
from helpers import compose_config


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """root/<class>/*.png: three colour classes with noise, 12 images each."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
        (root / f"class{c}").mkdir()
        for i in range(12):
            img = np.clip(np.array(colour) + rng.normal(0, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"class{c}" / f"{i}.png")
    return root


def _overrides(root):
    return ["model=b0", "model.pretrained=null", "model.resolution=32", "data=imagefolder", f"data.root={root}",
            "data.num_workers=0", "data.batch_size=8", "data.augment=false", "trainer.max_epochs=2",
            "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]


def test_compare_writes_one_row_per_policy_agreeing_with_tensorboard(tiny_folder, tmp_path):
    results = compare([*_overrides(tiny_folder), "compare.policies=[frozen,partial,full]", "compare.cam_images=2"], tmp_path)
    assert [r.policy for r in results] == ["frozen", "partial", "full"]
    rows = json.loads((tmp_path / "comparison.json").read_text())
    assert [r["policy"] for r in rows] == ["frozen", "partial", "full"]
    cfg = compose_config(_overrides(tiny_folder), tmp_path / "cfg")
    train_images = len(build_datamodule(cfg).dataset("train"))
    batch_sizes = [8] * (train_images // 8) + ([train_images % 8] if train_images % 8 else [])
    for row in rows:
        for key in ("trainable_params", "best_val_acc", "test_acc", "epoch_seconds", "peak_memory_mb", "total_seconds"):
            assert key in row
        assert row["test_acc"] is None  # a single folder has no test split
        # The best score as fit recorded it (the checkpoint callback's), in metrics.json and the checkpoint's name.
        fitted = json.loads((tmp_path / "runs" / row["policy"] / "metrics.json").read_text())
        best = Path(fitted["best_checkpoint"])
        assert row["best_val_acc"] == fitted["best_val_acc"] and f"val_acc{row['best_val_acc']:.4f}" in best.name
        assert len(row["val_acc"]) == 2 and max(row["val_acc"]) == row["best_val_acc"]
        assert row["val_acc"][int(re.match(r"epoch(\d+)-", best.name)[1])] == row["best_val_acc"]
        last = split_predictions(best.with_name("last.ckpt"), cfg, "val")  # the second epoch's weights, scored again
        assert row["val_acc"][1] == pytest.approx((last.predicted == last.labels).double().mean().item(), abs=1e-6)
        # Each epoch's loss is the mean of its steps' losses, weighted by their batch sizes.
        steps = np.array([v for _, v in read_scalars(tmp_path / "tensorboard" / row["policy"])["train/loss"]])
        assert len(steps) == 2 * len(batch_sizes)
        per_epoch = [np.average(epoch, weights=batch_sizes) for epoch in steps.reshape(2, -1)]
        assert row["train_loss"] == pytest.approx(per_epoch, rel=1e-5)
    frozen, partial, full = rows
    assert frozen["cached_features"] and not full["cached_features"]
    assert frozen["trainable_params"] == 1280 * 3 + 3 < partial["trainable_params"] < full["trainable_params"]
    table, per_class = (tmp_path / "comparison.md").read_text().split("\n\n", 1)
    assert table.count("\n") == 4 and "| frozen (cached features) |" in table and "| full |" in table
    # Per-class validation accuracy: weighted by each class's images, it is the best val/acc the run logged.
    val_labels = np.array(build_datamodule(cfg).dataset("val").labels)
    for row in rows:
        assert list(row["per_class_acc"]) == ["class0", "class1", "class2"]
        support = [int((val_labels == c).sum()) for c in range(3)]
        pooled = sum(acc * n for acc, n in zip(row["per_class_acc"].values(), support)) / sum(support)
        assert pooled == pytest.approx(row["best_val_acc"], abs=1e-6)
        assert all(acc * n == pytest.approx(round(acc * n)) for acc, n in zip(row["per_class_acc"].values(), support))
    assert "| class | frozen | partial | full |" in per_class
    assert f"| class1 | {rows[0]['per_class_acc']['class1']:.4f} | " in per_class
    for png in ("comparison.png", "comparison_cam.png", "comparison_frontier.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert list((tmp_path / "tensorboard" / "cam").glob("events.out.tfevents.*"))
    # One model: the runs keep their policy names and folders.
    assert [(r["model"], r["run"]) for r in rows] == [("b0", "frozen"), ("b0", "partial"), ("b0", "full")]
    assert all((tmp_path / "runs" / r["policy"] / "metrics.json").is_file() for r in rows)


def test_compare_includes_the_probe_fitted_on_unaugmented_images_as_finetune_probe_fits_it(tiny_folder, tmp_path):
    augmented = [o for o in _overrides(tiny_folder) if o != "data.augment=false"]  # augment: the default, on
    rows = {r.policy: r for r in compare([*augmented, "compare.policies=[probe,frozen]", "compare.cam_images=0"],
                                         tmp_path / "compare")}
    alone = fit(compose_config([*augmented, "finetune=probe", "data.augment=false"], tmp_path / "alone"))
    probe, frozen = rows["probe"], rows["frozen"]
    assert probe.best_val_acc == alone["best_val_acc"] and probe.val_acc == [alone["best_val_acc"]]
    assert probe.trainable_params == frozen.trainable_params == 1280 * 3 + 3 and probe.params == frozen.params
    assert Path(probe.best_checkpoint).name == "probe.ckpt" and probe.epoch_seconds > 0
    val_labels = np.array(build_datamodule(compose_config(augmented, tmp_path / "cfg")).dataset("val").labels)
    support = [int((val_labels == c).sum()) for c in range(3)]
    assert list(probe.per_class_acc) == ["class0", "class1", "class2"]
    pooled = sum(acc * n for acc, n in zip(probe.per_class_acc.values(), support)) / sum(support)
    assert pooled == pytest.approx(probe.best_val_acc, abs=1e-9)
    base = compose([*augmented, "data.mixup_alpha=0.2", f"paths.output_dir={tmp_path}"])
    assert run_config(base, "b0", "frozen", False).data.augment and run_config(base, "b0", "frozen", False).data.mixup_alpha
    probe_data = run_config(base, "b0", "probe", False).data  # only the probe's run turns augmentation off
    assert probe_data.augment is False and probe_data.mixup_alpha == 0.0
    assert "| probe | 3,843 |" in (tmp_path / "compare" / "comparison.md").read_text()


GRID = ["model=lite0", "model.pretrained=null", "model.resolution=32", "data=digits", "data.batch_size=32",
        "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "test_after_fit=false", "compare.cam_images=2",
        "compare.models=[lite0,lite1]", "compare.policies=[frozen,full]"]


def _macs_at(model: torch.nn.Module, resolution: int) -> int:
    """Multiply-adds of one image through the real network, counted as torch counts them (FLOPs / 2)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, resolution, resolution))
    return counter.get_total_flops() // 2


@pytest.mark.slow  # make test's time; one-model compare tests stay
def test_compare_runs_the_grid_of_models_and_policies(tmp_path):
    results = compare(GRID, tmp_path)
    rows = json.loads((tmp_path / "comparison.json").read_text())
    assert [(r["model"], r["policy"], r["run"]) for r in rows] == [
        ("lite0", "frozen", "lite0/frozen"), ("lite0", "full", "lite0/full"),
        ("lite1", "frozen", "lite1/frozen"), ("lite1", "full", "lite1/full")]
    assert [r.run for r in results] == [r["run"] for r in rows]
    for row in rows:
        checkpoint = torch.load(row["best_checkpoint"], map_location="cpu", weights_only=True)
        hp = checkpoint["hyper_parameters"]
        assert hp["model"]["name"] == row["model"]
        assert hp["model"]["resolution"] == hp["preprocessing"]["resolution"] == row["resolution"] == 32
        assert row["best_checkpoint"].startswith(str(tmp_path / "runs" / row["model"] / row["policy"]))
        model = FineTuneModule.from_checkpoint(row["best_checkpoint"]).model
        assert row["params"] == sum(p.numel() for p in model.parameters())
        assert row["macs"] == _macs_at(model, 32)
        # 2 batches of 32 images in the one epoch: images/s times the epoch's seconds counts them back.
        assert row["train_images_per_second"] > 0
        assert row["train_images_per_second"] * row["epoch_seconds"] == pytest.approx(64)
        fitted = json.loads((tmp_path / "runs" / row["run"] / "metrics.json").read_text())  # fit's checkpoint callback
        assert row["best_val_acc"] == fitted["best_val_acc"] and row["best_checkpoint"] == fitted["best_checkpoint"]
        assert f"val_acc{row['best_val_acc']:.4f}" in Path(row["best_checkpoint"]).name
    lite0, lite1 = rows[0], rows[2]
    assert lite0["params"] < lite1["params"] and lite0["macs"] < lite1["macs"]
    assert lite0["trainable_params"] == 1280 * 10 + 10 < rows[1]["trainable_params"] == lite0["params"]
    table = (tmp_path / "comparison.md").read_text()
    assert "| model | resolution | params | GMACs | policy |" in table
    assert f"| lite1 | 32 | {lite1['params']:,} | {lite1['macs'] / 1e9:.3f} | frozen | 12,810 |" in table
    assert "| class | lite0/frozen | lite0/full | lite1/frozen | lite1/full |" in table
    for png in ("comparison.png", "comparison_cam.png", "comparison_frontier.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_each_model_trains_at_its_own_resolution_unless_one_is_set(tmp_path):
    def run(overrides: list[str], model: str):
        cfg = compose(["model=lite0", "data=digits", f"paths.output_dir={tmp_path}", *overrides])
        return run_config(cfg, model, "full", several_models=True)

    own = run([], "lite1")
    assert (own.model.name, own.model.resolution, own.data.resolution) == ("lite1", 240, 240)
    assert run([], "b2").model.resolution == 260 and run([], "lite0").model.resolution == 224
    given = run(["model.resolution=64", "model.pretrained=null", "model.drop_path_rate=0.1"], "lite1")
    assert (given.model.resolution, given.data.resolution, given.model.pretrained) == (64, 64, None)
    assert given.model.drop_path_rate == 0.1 and given.finetune.name == "full"
    assert run(["experiment=demo"], "lite2").model.resolution == 96  # an experiment's resolution holds for every model
    from_phi = run(["model=phi", "model.phi=2"], "lite0")
    assert "phi" not in from_phi.model and from_phi.model.resolution == 224 and from_phi.model.pretrained is True


MODELS_ERROR = "compare.models must be null or a list of distinct models from b0, b1, b2, b3, b4, b5, b6, b7, lite0, "


@pytest.mark.parametrize("override, expected", [
    *((f"compare.models={models}", MODELS_ERROR) for models in ("[lite0,lite0]", "[lite0,phi]", "[lite0,b9]", "lite0")),
    ("compare.policies=[full,full]", "compare.policies must be a list of distinct policies from full, frozen, partial, "
                                     "gradual, probe, lpft, got ['full', 'full']"),
])
def test_compare_refuses_bad_models_and_policies_before_any_run(tmp_path, override, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        compare([*GRID, override], tmp_path)
    assert not (tmp_path / "runs").exists()


def test_pareto_front_keeps_the_points_nothing_cheaper_beats():
    costs = [1.0, 2.0, 2.0, 3.0, 0.5, 4.0, 4.0, 5.0]
    scores = [0.5, 0.7, 0.6, 0.65, 0.4, 0.9, 0.9, float("nan")]
    # 0.5 -> 0.4, 1 -> 0.5, 2 -> 0.7 (the 0.6 at equal cost loses), 3 -> 0.65 is beaten, 4 -> 0.9 once.
    assert pareto_front(costs, scores) == [4, 0, 1, 5]
    assert pareto_front([], []) == []


def _trained_head(root, out, cache: bool) -> torch.Tensor:
    cfg = compose_config([*_overrides(root), "finetune=frozen", f"finetune.cache_features={cache}", "model.drop_rate=0.3"], out)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=CachedFeatureDataModule(datamodule) if cache else datamodule)
    return module.model.classifier.weight.detach().clone()


def test_cached_features_train_the_same_head_as_images(tiny_folder, tmp_path):
    uncached = _trained_head(tiny_folder, tmp_path / "a", cache=False)
    cached = _trained_head(tiny_folder, tmp_path / "b", cache=True)
    assert uncached.abs().max() > 0
    torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=1e-6)


def test_cache_needs_unaugmented_data_and_frozen_policy(tiny_folder, tmp_path):
    cfg = compose_config([*_overrides(tiny_folder), "data.augment=true"], tmp_path)
    with pytest.raises(ValueError, match="needs data.augment=false"):
        CachedFeatureDataModule(build_datamodule(cfg))
    cfg = compose_config([*_overrides(tiny_folder), "finetune=full", "finetune.cache_features=true"], tmp_path)
    with pytest.raises(ValueError, match="needs finetune=frozen"):
        build_module(cfg, build_datamodule(cfg))
