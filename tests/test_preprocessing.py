"""Weights carry their preprocessing: padding, BN eps, mean/std, eval interpolation and crop.

A file's family comes from the hub's config.json beside it, our own checkpoint's record or a
timm name in its path; when nothing tells, loading is refused. A checkpoint records what
training fed the network (data.mean/std overrides included), and evaluation and the logged
sample grid read it back from there. Downloads without network: tests/test_offline_weights.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from finetune import WeightsError, create_model
from finetune.errors import ConfigError
from finetune.training.module import FineTuneModule
from finetune.build import fit
from helpers import compose_config, image_tags, randomize_norm_stats, relative_error

X = torch.randn(2, 3, 72, 88, generator=torch.Generator().manual_seed(0))
TINY_RUN = ["model=b0", "model.pretrained=null", "model.resolution=32", "data=digits", "data.batch_size=32",
            "trainer=cpu", "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def tf_b0() -> torch.nn.Module:
    return randomize_norm_stats(timm.create_model("tf_efficientnet_b0"))


def save_hub_layout(folder: Path, model: torch.nn.Module, architecture: str | None, **pretrained_cfg) -> Path:
    """`model.safetensors` (+ `config.json` as the Hugging Face hub holds it) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    if architecture is not None:
        (folder / "config.json").write_text(json.dumps({"architecture": architecture, "num_classes": 1000,
                                                        "pretrained_cfg": pretrained_cfg}))
    return path


def test_hub_layout_file_reads_its_family_and_preprocessing_from_config_json(tmp_path: Path, tf_b0) -> None:
    path = save_hub_layout(tmp_path / "hub", tf_b0, "tf_efficientnet_b0", mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5],
                           interpolation="bicubic", crop_pct=0.9)
    ours = create_model("b0", pretrained=str(path)).eval()
    assert (ours.config.padding, ours.config.bn_eps) == ("same", 1e-3)
    preprocessing = ours.preprocessing
    assert (preprocessing.mean, preprocessing.std) == ((0.5,) * 3, (0.5,) * 3)
    assert (preprocessing.interpolation, preprocessing.crop_fraction) == ("bicubic", 0.9)
    with torch.no_grad():
        assert relative_error(ours(X), tf_b0(X)) <= 1e-5


def test_a_file_nothing_describes_is_refused_not_guessed(tmp_path: Path, tf_b0) -> None:
    path = save_hub_layout(tmp_path / "downloads", tf_b0, architecture=None)
    with pytest.raises(WeightsError) as error:
        create_model("b0", pretrained=str(path))
    message = str(error.value)
    assert "cannot tell whether" in message and "model.padding=same model.bn_eps=1e-3" in message
    assert "\n" not in message
    # Told explicitly, it loads and matches timm: the refusal only stood in for a silent 1e-2 error.
    ours = create_model("b0", pretrained=str(path), padding="same", bn_eps=1e-3).eval()
    with torch.no_grad():
        assert relative_error(ours(X), tf_b0(X)) <= 1e-5
        wrong = create_model("b0", pretrained=str(path), padding="symmetric", bn_eps=1e-5).eval()
        assert relative_error(wrong(X), tf_b0(X)) > 1e-3


def test_hugging_face_cache_path_names_the_family(tmp_path: Path, tf_b0) -> None:
    snapshot = tmp_path / "hub" / "models--timm--tf_efficientnet_b0.in1k" / "snapshots" / ("0" * 40)
    path = save_hub_layout(snapshot, tf_b0, architecture=None)
    ours = create_model("b0", pretrained=str(path)).eval()
    assert (ours.config.padding, ours.config.bn_eps) == ("same", 1e-3)
    with torch.no_grad():
        assert relative_error(ours(X), tf_b0(X)) <= 1e-5


def test_our_checkpoint_as_weights_brings_its_recorded_settings(tmp_path: Path) -> None:
    first = fit(compose_config([*TINY_RUN, "model.padding=same", "model.bn_eps=1e-3", "logger=csv"], tmp_path / "run"))
    model = create_model("b0", num_classes=10, pretrained=first["best_checkpoint"])
    assert (model.config.padding, model.config.bn_eps) == ("same", 1e-3)


def test_only_one_of_data_mean_and_std_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.mean is set but data.std is not"):
        fit(compose_config([*TINY_RUN, "data.mean=[0.5,0.5,0.5]"], tmp_path))


def test_checkpoint_records_data_normalisation_overrides_and_the_sample_grid_uses_them(tmp_path: Path) -> None:
    mean, std = [0.2, 0.3, 0.4], [0.5, 0.6, 0.7]
    run = fit(compose_config([*TINY_RUN, f"data.mean={mean}", f"data.std={std}", "logger=tensorboard"], tmp_path / "run"))
    module = FineTuneModule.from_checkpoint(run["best_checkpoint"])
    preprocessing = module.preprocessing
    assert (list(preprocessing.mean), list(preprocessing.std)) == (mean, std)
    stored = torch.load(run["best_checkpoint"], weights_only=True)["hyper_parameters"]["preprocessing"]
    assert stored == preprocessing.to_dict()

    # The sample grid shows what the network saw, un-normalised with the recorded values:
    # digits' background is black (0), which the weights' ImageNet statistics would turn grey.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert "samples/train" in image_tags(tmp_path / "run" / "tensorboard")
    for events in (tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"):  # fit's file, not test's
        acc = EventAccumulator(str(events), size_guidance={"images": 1})
        acc.Reload()
        if "samples/train" in acc.Tags()["images"]:
            png = acc.Images("samples/train")[0].encoded_image_string
    import io

    grid = torch.from_numpy(__import__("numpy").array(Image.open(io.BytesIO(png)).convert("RGB")))
    assert grid.float().min().item() == 0.0 and torch.quantile(grid.float(), 0.25).item() <= 2


def test_torchvision_weights_bring_bicubic_eval_and_their_crop() -> None:
    from finetune.models.sources import Pretrained
    from torchvision.models import get_weight

    keywords = get_weight("EfficientNet_B3_Weights.IMAGENET1K_V1").transforms.keywords
    assert keywords["interpolation"].value == "bicubic"
    pretrained = Pretrained({}, "torchvision", "symmetric", 1e-5, None, None, "bicubic",
                            keywords["crop_size"] / keywords["resize_size"])
    assert pretrained.crop_fraction == 300 / 320
