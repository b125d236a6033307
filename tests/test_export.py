"""finetune-export: ONNX (checked with onnxruntime), TorchScript and safetensors from a checkpoint, and the card beside
each (<file>.json). The timm / hub folder (--format hub) is tested in test_hub.py."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.datamodules import (
    CIFAR10DataModule, CIFAR100DataModule, DigitsDataModule, Flowers102DataModule, ImageFolderDataModule,
)
from finetune.exporting.formats import CHECK_BATCH
from finetune.commands.export import main
from finetune.models import create_model
from finetune.models.efficientnet import Conv2dSame
from finetune.models.preprocessing import Preprocessing
from finetune.training.module import FineTuneModule
from finetune.build import fit
from helpers import compose_config, relative_error

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

PHOTOS = ("chelsea", "coffee")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """root/{train,val}/<photo>/: crops of two of scikit-image's bundled photos, as JPEG."""
    import skimage.data

    root = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        image = getattr(skimage.data, name)()
        for split, offsets in (("train", (0, 40, 80, 120)), ("val", (20, 60))):
            (root / split / name).mkdir(parents=True)
            for i, offset in enumerate(offsets):
                crop = image[offset:offset + 200, offset:offset + 260]
                Image.fromarray(crop).save(root / split / name / f"{i}.jpg", quality=90)
    return root


def _checkpoint(root, out, model):
    metrics = fit(compose_config([*model, "model.resolution=32", "data=imagefolder", f"data.root={root}",
                                  "data.num_workers=0", "data.batch_size=8", "trainer=cpu", "trainer.max_epochs=1",
                                  "logger=csv", "trainer.enable_progress_bar=false"], out))
    return metrics["best_checkpoint"]


@pytest.fixture(scope="module")
def checkpoints(photos, tmp_path_factory):
    """Pretrained Lite0 (TF-ported weights: 'same' padding), its head trained; a B0 from scratch (symmetric padding)."""
    return {
        "same": _checkpoint(photos, tmp_path_factory.mktemp("lite0"), ["model=lite0", "finetune=frozen"]),
        "symmetric": _checkpoint(photos, tmp_path_factory.mktemp("b0"), ["model=b0", "model.pretrained=null",
                                                                          "model.padding=symmetric"]),
    }


def _prepared_by_card(photo: Image.Image, card: dict) -> np.ndarray:
    """The network input for `photo` following its card (model.onnx.json) alone, with PIL and numpy."""
    w, h = photo.size
    short, long = card["resize"], int(card["resize"] * max(w, h) / min(w, h))
    resized = photo.resize((long, short) if w > h else (short, long),
                           Image.BICUBIC if card["interpolation"] == "bicubic" else Image.BILINEAR)
    res = card["resolution"]
    left, top = round((resized.width - res) / 2), round((resized.height - res) / 2)
    pixels = np.asarray(resized.crop((left, top, left + res, top + res)), dtype=np.float32) / 255
    return ((pixels - np.array(card["mean"], np.float32)) / np.array(card["std"], np.float32)).transpose(2, 0, 1)[None]


@pytest.mark.parametrize("padding", ["same", pytest.param("symmetric", marks=pytest.mark.slow)])  # slow: make test's time
def test_onnx_export_matches_pytorch_at_any_batch_size(checkpoints, padding, tmp_path, capsys):
    module = FineTuneModule.from_checkpoint(checkpoints[padding])
    output = tmp_path / "deploy" / "model.onnx"
    main([checkpoints[padding], "--format", "onnx", "--output", str(output)])
    printed = capsys.readouterr().out
    check, following = printed.rstrip().splitlines()[-2:]
    assert "onnxruntime" in check and "max relative error" in check and check.endswith(": ok")
    # It ends with how to use what it wrote: the runtime, the file and the card that says how to prepare images.
    assert following == f'next: onnxruntime.InferenceSession("{output}"), images prepared as {output}.json says'

    card = json.loads((output.parent / "model.onnx.json").read_text())
    pre = module.preprocessing
    assert card["padding"] == padding and card["classes"] == list(PHOTOS) and card["file"] == "model.onnx"
    assert (card["resolution"], card["resize"], card["interpolation"], card["crop_fraction"]) == (
        32, pre.resize_size, pre.interpolation, pre.crop_fraction)
    assert card["mean"] == list(pre.mean) and card["std"] == list(pre.std)
    assert card["check"]["max_relative_error"] <= 1e-4

    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    (input_,) = session.get_inputs()
    assert isinstance(input_.shape[0], str) and input_.shape[1:] == [3, 32, 32]  # dynamic batch, fixed image size
    g = torch.Generator().manual_seed(3)
    for batch in (1, CHECK_BATCH):  # the export traced a batch of 2
        x = torch.randn(batch, 3, 32, 32, generator=g)
        (ours,) = session.run(None, {input_.name: x.numpy()})
        with torch.no_grad():
            reference = module.model(x)
        assert relative_error(torch.from_numpy(ours), reference) <= 1e-4
    if padding == "same":  # the pads are asymmetric at 32 px, so getting them wrong would show
        assert any(isinstance(m, Conv2dSame) for m in module.model.modules())
        cfg = module.model.config
        twin = create_model(cfg.name, cfg.num_classes, pretrained=module.model.state_dict(), padding="symmetric",
                            bn_eps=cfg.bn_eps).eval()
        with torch.no_grad():
            assert relative_error(torch.from_numpy(ours), twin(x)) > 1e-3

    # The card alone (PIL, numpy) prepares a photo as finetune's eval transform does for PyTorch.
    import skimage.data

    photo = Image.fromarray(skimage.data.rocket())  # 640x427: not square, not a training image
    (logits,) = session.run(None, {card["input"]["name"]: _prepared_by_card(photo, card)})
    with torch.no_grad():
        reference = module.model(pre.normalize(pre.eval_transform()(photo)[None]))
    # PIL and torchvision resize uint8 images alike to within one grey level.
    torch.testing.assert_close(torch.from_numpy(logits).softmax(-1), reference.softmax(-1), rtol=0, atol=2e-3)


def test_torchscript_and_safetensors_reproduce_the_checkpoint(checkpoints, tmp_path, capsys):
    from safetensors import safe_open

    checkpoint = checkpoints["same"]
    module = FineTuneModule.from_checkpoint(checkpoint)
    x = torch.randn(CHECK_BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(5))  # not the export's batch of 2
    with torch.no_grad():
        reference = module.model(x)

    main([checkpoint, "--format", "torchscript", "--output", str(tmp_path / "deploy" / "model.pt")])
    assert "max relative error" in capsys.readouterr().out
    with torch.no_grad():
        assert relative_error(torch.jit.load(str(tmp_path / "deploy" / "model.pt"))(x), reference) <= 1e-5

    # Issue 21: a second export into the same folder keeps the first one's card (each is named after its file).
    path = tmp_path / "deploy" / "model.safetensors"
    main([checkpoint, "--format", "safetensors", "--output", str(path)])
    assert "model.safetensors.json" in capsys.readouterr().out
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "model.pt", "model.pt.json", "model.safetensors", "model.safetensors.json"]
    assert json.loads((path.parent / "model.pt.json").read_text())["format"] == "torchscript"
    card = json.loads((path.parent / "model.safetensors.json").read_text())
    assert (card["variant"], card["padding"], card["format"]) == ("lite0", "same", "safetensors")
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["finetune"]) == card
    # The file's metadata gives padding, BN eps and preprocessing: nothing else is passed (issue 20).
    rebuilt = create_model(card["variant"], card["num_classes"], pretrained=str(path)).eval()
    assert (rebuilt.config.padding, rebuilt.config.bn_eps) == (module.model.config.padding, module.model.config.bn_eps)
    assert rebuilt.preprocessing == module.preprocessing
    with torch.no_grad():
        assert torch.equal(rebuilt(x), reference)


def test_export_mistakes_are_one_line_errors(checkpoints, tmp_path, capsys):
    checkpoint = checkpoints["symmetric"]
    torch.save({"stem.conv.weight": torch.zeros(1)}, tmp_path / "plain.pth")
    (tmp_path / "file").write_text("")
    (tmp_path / "folder").mkdir()
    for args, message in [
        ([str(tmp_path / "plain.pth"), "--format", "onnx", "--output", str(tmp_path / "m.onnx")],
         "is not a checkpoint written by finetune"),
        ([checkpoint, "--format", "tflite", "--output", str(tmp_path / "m.tflite")],
         "unknown format 'tflite'; valid: onnx, torchscript, safetensors, hub"),
        ([checkpoint, "--format", "onnx", "--output", str(tmp_path / "file" / "m.onnx")], "cannot write to"),
        ([checkpoint, "--format", "onnx", "--output", str(tmp_path / "folder")], "is a folder"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not list(tmp_path.glob("m.*"))


def test_an_in_memory_datasets_onnx_export_scores_what_validation_logged(tmp_path: Path) -> None:
    """Issue 20: the export, fed by its card's recipe, reproduces the val/acc training logged on digits.

    Validation upsamples each whole 8x8 digit; a checkpoint that recorded the weights' centre crop
    (0.875) made the card cut the digits' borders, so deployment scored other inputs.
    """
    cfg = compose_config(["model=lite0", "finetune=frozen", "model.resolution=64", "data=digits", "trainer=cpu",
                          "trainer.max_epochs=1", "logger=csv", "trainer.enable_progress_bar=false",
                          "test_after_fit=false"], tmp_path / "run")
    metrics = fit(cfg)
    output = tmp_path / "deploy" / "model.onnx"
    main([metrics["best_checkpoint"], "--format", "onnx", "--output", str(output)])
    card = json.loads((output.parent / "model.onnx.json").read_text())

    val = DigitsDataModule(seed=cfg.seed).dataset("val")  # the run's validation digits, raw uint8 3x8x8
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    inputs = np.concatenate([_prepared_by_card(Image.fromarray(image.permute(1, 2, 0).numpy()), card)
                             for image in val.images])
    (logits,) = session.run(None, {card["input"]["name"]: inputs})
    correct = int((logits.argmax(1) == val.labels.numpy()).sum())
    assert 0.3 < metrics["best_val_acc"] < 1  # a model that tells digits apart, so different inputs would show
    assert correct == round(metrics["best_val_acc"] * len(val))


@pytest.mark.parametrize(("datamodule", "crop_fraction"), [
    (CIFAR10DataModule, 1.0), (CIFAR100DataModule, 1.0), (DigitsDataModule, 1.0),  # upsampled whole on the device
    (ImageFolderDataModule, 0.9), (Flowers102DataModule, 0.9),  # files: resized and centre-cropped as the weights say
])
def test_what_a_datamodule_records_is_the_crop_its_validation_makes(datamodule: type, crop_fraction: float,
                                                                     tmp_path: Path) -> None:
    dm = datamodule(root=str(tmp_path))
    dm.set_preprocessing(Preprocessing(64, crop_fraction=0.9))  # weights evaluated with a 90% centre crop
    assert dm.preprocessing == Preprocessing(64, crop_fraction=crop_fraction)


def test_importing_the_export_loads_neither_the_evaluation_module_nor_matplotlib() -> None:
    """Issue 20: the export imported the evaluation module, and its figures' matplotlib, for one helper."""
    code = ("import sys, finetune.commands.export; "
            "assert 'matplotlib' not in sys.modules and 'finetune.commands.evaluate' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_an_export_that_fails_its_check_leaves_the_folder_as_it_was(checkpoints: dict[str, str], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 20: the mismatching file and its card were written before the check failed.

    The file written is the checkpoint's network with every logit scaled by 1.001 (relative error 1e-3).
    Neither a fresh folder nor one holding a good export gains or loses anything.
    """
    from finetune.commands import export

    checkpoint, output = checkpoints["same"], tmp_path / "deploy" / "model.pt"
    write = export.export_torchscript

    def drifted(model: torch.nn.Module, path: Path, resolution: int) -> None:
        scaled = copy.deepcopy(model)
        with torch.no_grad():
            scaled.classifier.weight.mul_(1.001)
            scaled.classifier.bias.mul_(1.001)
        write(scaled, path, resolution)

    def contents() -> dict[str, bytes]:
        return {path.name: path.read_bytes() for path in output.parent.iterdir()}

    with monkeypatch.context() as patch:
        patch.setattr(export, "export_torchscript", drifted)
        with pytest.raises(export.ExportMismatchError, match="differs from PyTorch"):
            main([checkpoint, "--format", "torchscript", "--output", str(output)])
    assert contents() == {}

    main([checkpoint, "--format", "torchscript", "--output", str(output)])
    good = contents()
    assert set(good) == {"model.pt", "model.pt.json"}
    monkeypatch.setattr(export, "export_torchscript", drifted)
    with pytest.raises(export.ExportMismatchError, match="differs from PyTorch"):
        main([checkpoint, "--format", "torchscript", "--output", str(output)])
    assert contents() == good
