"""Each policy changes exactly the parts it promises, and frozen BatchNorm statistics stay put."""

import lightning as L
import pytest
import torch

from finetune.datamodules import DigitsDataModule
from finetune.training.module import FineTuneModule
from finetune.training.policies import FinetunePolicy, model_parts

PARTS = ["stem"] + [f"stage{i}" for i in range(7)] + ["top", "head"]


def _train(finetune: dict, epochs: int = 1, snapshot_each_epoch: bool = False):
    L.seed_everything(0)
    dm = DigitsDataModule(resolution=32, batch_size=16, num_workers=0)
    module = FineTuneModule(
        model={"name": "b0", "pretrained": None, "drop_path_rate": 0.0, "drop_rate": 0.0},
        num_classes=dm.num_classes, finetune=finetune, optim={"lr": 1e-2, "scheduler": "constant"},
    )
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    snapshots = []

    class Snapshot(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            snapshots.append({k: v.clone() for k, v in pl_module.model.state_dict().items()})

    trainer = L.Trainer(max_epochs=epochs, limit_train_batches=3, limit_val_batches=1, accelerator="cpu",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[Snapshot()] if snapshot_each_epoch else [])
    trainer.fit(module, datamodule=dm)
    return before, module.model.state_dict(), snapshots


def _changed_parts(before, after, kind="params"):
    """Parts with any changed parameter (kind=params) or BatchNorm running statistic (kind=stats)."""
    changed = set()
    for key, value in after.items():
        is_stat = "running_" in key
        if is_stat != (kind == "stats") or key.endswith("num_batches_tracked"):
            continue
        if not torch.equal(value, before[key]):
            changed.add(_part_of(key))
    return changed


def _part_of(key: str) -> str:
    first, rest = key.split(".", 1)
    if first == "stages":
        return f"stage{rest.split('.', 1)[0]}"
    return {"classifier": "head"}.get(first, first)


def test_full_changes_everything():
    before, after, _ = _train({"name": "full"})
    assert _changed_parts(before, after) == set(PARTS)
    assert _changed_parts(before, after, "stats") == set(PARTS) - {"head"}


def test_frozen_changes_only_the_head_and_keeps_bn_statistics():
    before, after, _ = _train({"name": "frozen"})
    assert _changed_parts(before, after) == {"head"}
    assert _changed_parts(before, after, "stats") == set()


def test_frozen_with_bn_train_adapts_statistics_only():
    before, after, _ = _train({"name": "frozen", "bn": "train"})
    assert _changed_parts(before, after) == {"head"}
    assert _changed_parts(before, after, "stats") == set(PARTS) - {"head"}


def test_partial_two_stages_changes_last_two_stages_top_and_head():
    before, after, _ = _train({"name": "partial", "trainable_stages": 2})
    assert _changed_parts(before, after) == {"stage5", "stage6", "top", "head"}
    assert _changed_parts(before, after, "stats") == {"stage5", "stage6", "top"}


def test_partial_zero_stages_still_trains_top_and_head():
    # README: partial trains the last k stages + the top 1x1 conv + the head; k=0 is not frozen.
    before, after, _ = _train({"name": "partial", "trainable_stages": 0})
    assert _changed_parts(before, after) == {"top", "head"}
    assert _changed_parts(before, after, "stats") == {"top"}


def test_gradual_unfreezes_at_the_given_epoch():
    before, after, snaps = _train({"name": "gradual", "unfreeze_at_epoch": 1}, epochs=2, snapshot_each_epoch=True)
    assert _changed_parts(before, snaps[0]) == {"head"}
    assert _changed_parts(before, snaps[0], "stats") == set()
    assert _changed_parts(snaps[0], snaps[1]) == set(PARTS)


def test_param_groups_are_named_made_once_and_cover_every_parameter():
    module = FineTuneModule(model={"name": "b0", "pretrained": None}, num_classes=4, finetune={"name": "frozen"},
                            optim={"lr": 1e-3, "backbone_lr_scale": 0.1, "layer_decay": 0.5})
    groups = module.param_groups()
    names = [g["name"] for g in groups]
    assert [n for n in names if "." not in n] == PARTS
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(module.model.parameters()))
    lr = {g["name"]: g["lr"] for g in groups}
    assert lr["head"] == 1e-3 and lr["top"] == pytest.approx(1e-4) and lr["stage6"] == pytest.approx(5e-5)
    assert all(g["weight_decay"] == 0 for g in groups if g["name"].endswith(".no_decay"))


@pytest.mark.parametrize(
    "finetune, match",
    [
        ({"name": "half"}, "unknown finetune policy 'half'; valid: full, frozen, partial, gradual"),
        ({"name": "partial", "trainable_stages": 8}, "trainable_stages must be an integer in 0..7, got 8"),
        ({"name": "partial", "trainable_stages": -1}, "trainable_stages must be an integer in 0..7"),
        ({"name": "frozen", "bn": "fixed"}, "finetune.bn must be one of eval, train"),
        ({"name": "gradual", "unfreeze_at_epoch": -2}, "unfreeze_at_epoch must be an integer >= 0"),
    ],
)
def test_bad_policy_values(finetune, match):
    with pytest.raises(ValueError, match=match):
        FinetunePolicy(**finetune).validate(7)


def test_model_parts_cover_the_model():
    module = FineTuneModule(model={"name": "lite0", "pretrained": None}, num_classes=3)
    parts = model_parts(module.model)
    assert list(parts) == PARTS
    assert sum(p.numel() for m in parts.values() for p in m.parameters()) == sum(p.numel() for p in module.model.parameters())


def test_renamed_bn_mode_still_works_with_a_warning() -> None:
    with pytest.warns(FutureWarning, match="finetune.bn=frozen is now finetune.bn=eval"):
        policy = FinetunePolicy(name="partial", bn="frozen").validate(7)
    assert policy.bn == "eval"


def test_renamed_device_transform_still_works_with_a_warning() -> None:
    dm = DigitsDataModule(num_workers=0, resolution=16)
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    with pytest.warns(FutureWarning, match="gpu_transform is now device_transform"):
        old = dm.gpu_transform(images, train=False)
    assert torch.equal(old, dm.device_transform(images, train=False))
