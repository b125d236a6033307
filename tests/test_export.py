"""finetune-export: ONNX (checked with onnxruntime), TorchScript and safetensors from a checkpoint, and model.json."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.export import CHECK_BATCH, main
from finetune.models import create_model
from finetune.models.efficientnet import Conv2dSame
from finetune.module import FineTuneModule
from finetune.train import fit
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


def _prepared_by_model_json(photo: Image.Image, card: dict) -> np.ndarray:
    """The network input for `photo` following model.json alone, with PIL and numpy."""
    w, h = photo.size
    short, long = card["resize"], int(card["resize"] * max(w, h) / min(w, h))
    resized = photo.resize((long, short) if w > h else (short, long),
                           Image.BICUBIC if card["interpolation"] == "bicubic" else Image.BILINEAR)
    res = card["resolution"]
    left, top = round((resized.width - res) / 2), round((resized.height - res) / 2)
    pixels = np.asarray(resized.crop((left, top, left + res, top + res)), dtype=np.float32) / 255
    return ((pixels - np.array(card["mean"], np.float32)) / np.array(card["std"], np.float32)).transpose(2, 0, 1)[None]


@pytest.mark.parametrize("padding", ["same", "symmetric"])
def test_onnx_export_matches_pytorch_at_any_batch_size(checkpoints, padding, tmp_path, capsys):
    module = FineTuneModule.from_checkpoint(checkpoints[padding])
    output = tmp_path / "deploy" / "model.onnx"
    main([checkpoints[padding], "--format", "onnx", "--output", str(output)])
    printed = capsys.readouterr().out
    assert "onnxruntime" in printed and "max relative error" in printed and printed.rstrip().endswith(": ok")

    card = json.loads((output.parent / "model.json").read_text())
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

    # model.json alone (PIL, numpy) prepares a photo as finetune's eval transform does for PyTorch.
    import skimage.data

    photo = Image.fromarray(skimage.data.rocket())  # 640x427: not square, not a training image
    (logits,) = session.run(None, {card["input"]["name"]: _prepared_by_model_json(photo, card)})
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

    main([checkpoint, "--format", "torchscript", "--output", str(tmp_path / "ts" / "model.pt")])
    assert "max relative error" in capsys.readouterr().out
    with torch.no_grad():
        assert relative_error(torch.jit.load(str(tmp_path / "ts" / "model.pt"))(x), reference) <= 1e-5

    path = tmp_path / "st" / "model.safetensors"
    main([checkpoint, "--format", "safetensors", "--output", str(path)])
    card = json.loads((path.parent / "model.json").read_text())
    assert (card["variant"], card["padding"], card["format"]) == ("lite0", "same", "safetensors")
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["finetune"]) == card
    rebuilt = create_model(card["variant"], card["num_classes"], pretrained=str(path), padding=card["padding"],
                           bn_eps=card["bn_eps"]).eval()
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
         "unknown format 'tflite'; valid: onnx, torchscript, safetensors"),
        ([checkpoint, "--format", "onnx", "--output", str(tmp_path / "file" / "m.onnx")], "cannot write to"),
        ([checkpoint, "--format", "onnx", "--output", str(tmp_path / "folder")], "is a folder"),
        ([checkpoint, "--format", "safetensors", "--output", str(tmp_path / "model.json")], "written beside the export"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not list(tmp_path.glob("m.*"))
