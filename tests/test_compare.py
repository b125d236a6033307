"""finetune-compare's report, read back against its TensorBoard logs; cached-feature training."""

import json

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from finetune.compare import compare, read_scalars
from finetune.features import CachedFeatureDataModule
from finetune.train import build_datamodule, build_module
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
    for row in rows:
        for key in ("trainable_params", "best_val_acc", "test_acc", "epoch_seconds", "peak_memory_mb", "total_seconds"):
            assert key in row
        assert row["test_acc"] is None  # a single folder has no test split
        series = read_scalars(tmp_path / "tensorboard" / row["policy"])
        assert row["best_val_acc"] == max(v for _, v in series["val/acc"])
        assert row["val_acc"] == [v for _, v in series["val/acc"]] and len(row["val_acc"]) == 2
        assert row["train_loss"] == [v for _, v in series["train/epoch_loss"]]
    frozen, partial, full = rows
    assert frozen["cached_features"] and not full["cached_features"]
    assert frozen["trainable_params"] == 1280 * 3 + 3 < partial["trainable_params"] < full["trainable_params"]
    table = (tmp_path / "comparison.md").read_text()
    assert table.count("\n") == 5 and "| frozen (cached features) |" in table and "| full |" in table
    for png in ("comparison.png", "comparison_cam.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert list((tmp_path / "tensorboard" / "cam").glob("events.out.tfevents.*"))


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
