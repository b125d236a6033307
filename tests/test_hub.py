"""finetune-export --format hub (issue 23): a timm model folder with a model card, loaded by timm as it is,
and `model.pretrained=local-dir:` / `hf-hub:` loading such folders (ours or anyone's) with their preprocessing.

Every comparison is against timm itself: the folder is loaded with `timm.create_model("local-dir:...",
pretrained=True)` and its preprocessing read with `timm.data.resolve_data_config`.
"""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.data import resolve_data_config
from timm.models import save_for_hf

from finetune.errors import ConfigError
from finetune.commands.export import main
from finetune.models import create_model
from finetune.models.preprocessing import Preprocessing
from finetune.training.module import FineTuneModule
from finetune.build import fit
from helpers import compose_config, randomize_norm_stats, relative_error, serve_files, write_digits_folder

FAST = ["model.resolution=32", "data=imagefolder", "data.num_workers=0", "data.batch_size=16", "trainer=cpu",
        "trainer.max_epochs=1", "logger=csv", "trainer.enable_progress_bar=false"]
#: The Lite0 run's data normalisation, not its weights' (0.5): the folder must carry what training fed the network.
MEAN, STD = [0.45, 0.4, 0.35], [0.3, 0.3, 0.3]
ARCHITECTURES = {"same": "tf_efficientnet_lite0", "symmetric": "efficientnet_b0"}
POLICIES = {"same": "frozen", "symmetric": "full"}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """root/{train,val,test}/<digit>/*.png: 70, 20 and 10 images."""
    return write_digits_folder(tmp_path_factory.mktemp("digits"), per_class=10, size=40)


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory) -> dict[str, Path]:
    """Lite0 (pretrained, TF 'same' padding) trained by the `finetune` command, so its run folder holds the command
    and metrics.json; B0 from scratch (symmetric padding) and a φ model, by `fit`."""
    lite0 = tmp_path_factory.mktemp("lite0")
    overrides = ["model=lite0", "finetune=frozen", *FAST, f"data.root={digits}", "data.mean=[0.45,0.4,0.35]",
                 "data.std=[0.3,0.3,0.3]"]
    out = subprocess.run([sys.executable, "-m", "finetune.commands.train", *overrides, f"hydra.run.dir={lite0}"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    b0 = fit(compose_config(["model=b0", "model.pretrained=null", "model.padding=symmetric", *FAST,
                             f"data.root={digits}"], tmp_path_factory.mktemp("b0")))
    phi = fit(compose_config(["model=phi", "model.phi=0.5", *FAST, f"data.root={digits}", "test_after_fit=false"],
                             tmp_path_factory.mktemp("phi")))
    return {"same": json.loads((lite0 / "metrics.json").read_text())["best_checkpoint"],
            "symmetric": b0["best_checkpoint"], "phi": phi["best_checkpoint"], "lite0_run": lite0}


def _pre_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def _timm_preprocessing(model: torch.nn.Module) -> Preprocessing:
    """What timm reads from a folder's config.json, as our Preprocessing."""
    data = resolve_data_config({}, model=model)
    assert data["input_size"][1] == data["input_size"][2]
    return Preprocessing(data["input_size"][1], tuple(data["mean"]), tuple(data["std"]), data["interpolation"],
                         data["crop_pct"])


@pytest.mark.parametrize("padding", ["same", pytest.param("symmetric", marks=pytest.mark.slow)])  # slow: make test's time
def test_hub_folder_is_what_timm_loads_with_our_logits_classes_preprocessing_and_card(runs, digits, padding, tmp_path,
                                                                                        capsys):
    checkpoint = runs[padding]
    module = FineTuneModule.from_checkpoint(checkpoint)
    folder = tmp_path / "hub"
    main([checkpoint, "--format", "hub", "--output", str(folder)])
    printed = capsys.readouterr().out
    check = next(line for line in printed.splitlines() if line.startswith("check:"))
    assert "timm local-dir vs PyTorch" in check and check.endswith(": ok")
    assert printed.rstrip().splitlines()[-1] == f'next: timm.create_model("local-dir:{folder}", pretrained=True)  ' \
                                                 "(README.md in the folder: the model card)"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert {(folder / n).stat().st_mode for n in ("config.json", "model.safetensors")} == {
        (folder / "README.md").stat().st_mode}  # not safetensors' private 0600

    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == ARCHITECTURES[padding]
    assert config["label_names"] == module.class_names == [str(d) for d in range(10)] and config["num_classes"] == 10
    theirs = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert _timm_preprocessing(theirs) == module.preprocessing
    if padding == "same":
        assert (list(module.preprocessing.mean), list(module.preprocessing.std)) == (MEAN, STD)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))  # the check used a batch of 3
    with torch.no_grad():
        reference = module.model(x)
        assert relative_error(theirs(x), reference) <= 1e-5
    if padding == "same":  # 32 px makes 'same' pads asymmetric: timm's symmetric Lite0 with these weights is off
        wrong = timm.create_model("efficientnet_lite0", num_classes=10, bn_eps=1e-3).eval()
        wrong.load_state_dict(theirs.state_dict())
        with torch.no_grad():
            assert relative_error(wrong(x), reference) > 1e-3

    card = (folder / "README.md").read_text()
    assert card.startswith("---\ntags:\n") and "library_name: timm" in card
    assert f"timm {ARCHITECTURES[padding]}" in card and "shorter side to 36, bicubic" in card
    assert "crop_pct 0.875" in card and f"mean {list(module.preprocessing.mean)}" in card
    assert re.search(r"max relative error \d\.\d\de[-+]\d\d \(limit 1e-04\)", card)
    metrics = json.loads((Path(checkpoint).parent.parent / "metrics.json").read_text())
    assert f"test/acc: {metrics['test/acc']:.4f}" in card and f"best_val_acc: {metrics['best_val_acc']:.4f}" in card
    assert "train images: 70" in card and "val images: 20" in card
    assert f"name: {POLICIES[padding]}" in card and "name: adamw" in card
    if padding == "same":
        overrides = (runs["lite0_run"] / ".hydra" / "overrides.yaml").read_text()
        assert "`finetune model=lite0 finetune=frozen model.resolution=32" in card and "data.mean=" in overrides
        assert "Fine-tuned from:** the released ImageNet weights of lite0" in card
    else:
        assert "Training command:** not recorded (no .hydra/overrides.yaml" in card
        assert "Fine-tuned from:** no weights (from scratch)" in card

    # The card's usage code runs as written, on a real image.
    usage = card.split("```python\n")[1].split("\n```")[0].replace("photo.jpg", str(digits / "test" / "3" / "0.png"))
    printed_label = io.StringIO()
    with contextlib.redirect_stdout(printed_label):
        exec(usage, {})  # noqa: S102 - the card's own snippet
    assert printed_label.getvalue().strip() in module.class_names


def test_fine_tuning_from_a_hub_folder_starts_from_its_weights_and_preprocessing(runs, digits, tmp_path):
    folder = tmp_path / "hub"
    main([runs["same"], "--format", "hub", "--output", str(folder)])
    theirs = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    expected = _timm_preprocessing(theirs)
    assert (list(expected.mean), list(expected.std), expected.resolution) == (MEAN, STD, 32)

    # Python API: weights, padding, BN eps and the whole preprocessing, the input size included, from the folder.
    model = create_model("lite0", 10, pretrained=f"local-dir:{folder}").eval()
    assert (model.config.padding, model.config.bn_eps) == ("same", 1e-3) and model.preprocessing == expected
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert relative_error(model(x), theirs(x)) <= 1e-5

    # The command: a frozen backbone keeps the folder's weights; the checkpoint records the folder's preprocessing.
    metrics = fit(compose_config(["model=lite0", f"model.pretrained=local-dir:{folder}", "finetune=frozen", *FAST,
                                  f"data.root={digits}", "test_after_fit=false"], tmp_path / "run"))
    tuned = FineTuneModule.from_checkpoint(metrics["best_checkpoint"])
    assert tuned.preprocessing == expected
    assert relative_error(_pre_logits(tuned.model, x), _pre_logits(theirs, x)) <= 1e-5


@pytest.mark.parametrize(("arch", "variant", "padding"), [("tf_efficientnet_lite0", "lite0", "same"),
                                                           ("efficientnet_b0", "b0", "symmetric")])
def test_any_timm_efficientnet_folder_loads_as_pretrained_weights(arch, variant, padding, tmp_path):
    """A folder timm's own `save_for_hf` wrote, with preprocessing of its own (bilinear, crop 0.95, 64 px)."""
    folder = tmp_path / arch
    save_for_hf(randomize_norm_stats(timm.create_model(arch, num_classes=5)), str(folder), safe_serialization=True,
                model_config={"label_names": list("abcde")},
                data_config={"input_size": (3, 64, 64), "mean": (0.3, 0.4, 0.5), "std": (0.2, 0.25, 0.3),
                             "interpolation": "bilinear", "crop_pct": 0.95})
    theirs = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    ours = create_model(variant, 5, pretrained=f"local-dir:{folder}").eval()
    assert ours.config.padding == padding and ours.preprocessing == _timm_preprocessing(theirs)
    assert ours.preprocessing == Preprocessing(64, (0.3, 0.4, 0.5), (0.2, 0.25, 0.3), "bilinear", 0.95)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert relative_error(ours(x), theirs(x)) <= 1e-6
    fewer = create_model(variant, 3, pretrained=f"local-dir:{folder}").eval()  # another head: a fresh one
    assert fewer.classifier.out_features == 3
    assert relative_error(_pre_logits(fewer, x), _pre_logits(theirs, x)) <= 1e-6


@pytest.mark.slow  # make test's time; local-dir loading stays
def test_hf_hub_folder_is_fetched_by_the_hub_client_then_read_from_its_cache_offline(tmp_path):
    """`hf-hub:` goes through huggingface_hub: from a stand-in of the hub's file server, then HF_HUB_OFFLINE=1."""
    folder = tmp_path / "theirs"
    ref = randomize_norm_stats(timm.create_model("efficientnet_b0", num_classes=4))
    save_for_hf(ref, str(folder), safe_serialization=True)
    files = {f"/someone/b0-pets/resolve/main/{name}": (folder / name).read_bytes()
             for name in ("config.json", "model.safetensors")}
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(10))
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys, torch\nfrom finetune import create_model\nfrom finetune.errors import user_errors\n"
              "with user_errors():\n    m = create_model('b0', 4, pretrained='hf-hub:someone/b0-pets').eval()\n"
              f"torch.save(m(torch.load(r'{tmp_path / 'x.pt'}')).detach(), sys.argv[1])\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}
    with serve_files(files) as url:
        online = subprocess.run([sys.executable, "-c", script, str(tmp_path / "online.pt")], capture_output=True,
                                text=True, timeout=300, env={**env, "HF_ENDPOINT": url, "HF_HUB_OFFLINE": "0"})
    assert online.returncode == 0, online.stderr[-2000:]
    offline = subprocess.run([sys.executable, "-c", script, str(tmp_path / "offline.pt")], capture_output=True,
                             text=True, timeout=300, env={**env, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr[-2000:]
    with torch.no_grad():
        reference = ref(x)
    for name in ("online.pt", "offline.pt"):
        assert relative_error(torch.load(tmp_path / name), reference) <= 1e-5


def test_a_phi_model_is_refused_in_one_line_and_nothing_is_written(runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([runs["phi"], "--format", "hub", "--output", str(tmp_path / "hub")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "timm has no architecture for 'phi0.5'" in err and "--format onnx" in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_a_hub_export_that_fails_its_check_leaves_the_folder_as_it_was(runs, tmp_path, monkeypatch):
    """timm's copy with every logit scaled by 1.001 (relative error 1e-3): no folder, then a good one untouched."""
    from finetune.exporting import hub

    output = tmp_path / "deploy" / "hub"
    convert = hub.timm_model

    def drifted(model):
        theirs = convert(model)
        with torch.no_grad():
            theirs.classifier.weight.mul_(1.001)
            theirs.classifier.bias.mul_(1.001)
        return theirs

    def contents() -> dict[str, bytes]:
        return {p.relative_to(output.parent).as_posix(): p.read_bytes() for p in output.parent.rglob("*") if p.is_file()}

    with monkeypatch.context() as patch:
        patch.setattr(hub, "timm_model", drifted)
        with pytest.raises(hub.ExportMismatchError, match="differs from PyTorch"):
            main([runs["same"], "--format", "hub", "--output", str(output)])
    assert contents() == {}
    main([runs["same"], "--format", "hub", "--output", str(output)])
    good = contents()
    assert set(good) == {"hub/config.json", "hub/model.safetensors", "hub/README.md"}
    monkeypatch.setattr(hub, "timm_model", drifted)
    with pytest.raises(hub.ExportMismatchError, match="differs from PyTorch"):
        main([runs["same"], "--format", "hub", "--output", str(output)])
    assert contents() == good


def test_hub_mistakes_are_one_line_errors(runs, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for args, message in [
        (["--format", "onnx", "--output", str(tmp_path / "m.onnx"), "--push", "me/model"], "add --format hub"),
        (["--format", "hub", "--output", str(tmp_path / "hub"), "--push", "no-user"], "is no Hugging Face repository id"),
        (["--format", "hub", "--output", str(tmp_path / "file")], "is a file; --format hub writes a folder"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main([runs["same"], *args])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]

    folder = tmp_path / "resnet"
    save_for_hf(timm.create_model("resnet18", num_classes=2), str(folder), safe_serialization=True)
    b0 = tmp_path / "b0"
    save_for_hf(timm.create_model("efficientnet_b0", num_classes=2), str(b0), safe_serialization=True)
    for pretrained, message in [
        (f"local-dir:{tmp_path / 'nothing'}", "holds no config.json"),
        (f"local-dir:{folder}", "holds timm architecture 'resnet18'"),
        (f"local-dir:{b0}", "holds a timm 'efficientnet_b0', a b0, not a lite0: set model=b0"),
        ("hf-hub:not a repo", "is no Hugging Face repository id"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            create_model("lite0", 2, pretrained=pretrained)
