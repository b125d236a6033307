"""Weights offline or behind a proxy: the download clients (huggingface_hub, torch.hub) decide, not a probe of ours.

Every download runs in a fresh process, since the clients read HF_HOME, HF_ENDPOINT,
HF_HUB_OFFLINE and the proxy variables when they start. The hub is named `hub.invalid`, a
name that never resolves (RFC 2606), so a direct connection cannot succeed and only the
client's cache or a proxy on 127.0.0.1 can; nothing leaves the machine.
"""

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save as safetensors_bytes

from helpers import randomize_norm_stats, relative_error, serve_files

TAG = "efficientnet_b0.ra_in1k"  # create_model('b0', pretrained=True) fetches these
HUB = "http://hub.invalid"
CLOSED = "http://127.0.0.1:9"  # discard port: nothing listens, a connection is refused at once
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


def _env(tmp_path: Path, proxy: str, offline: bool = False) -> dict[str, str]:
    """A hub that only `proxy` can reach, and Hugging Face and torch.hub caches of this test's own."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in PROXY_VARS}
    return {**env, "HF_ENDPOINT": HUB, "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"),
            "HF_HUB_OFFLINE": "1" if offline else "0", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1",
            "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy, "https_proxy": proxy}


def _weights() -> tuple[torch.nn.Module, bytes]:
    ref = randomize_norm_stats(timm.create_model("efficientnet_b0"))
    return ref, safetensors_bytes({k: v.contiguous() for k, v in ref.state_dict().items()})


def _create(tmp_path: Path, env: dict[str, str], pretrained: str, prelude: str = "") -> subprocess.CompletedProcess:
    """`create_model('b0', pretrained=...)` as the CLI runs it, after `prelude`; its output on a saved input goes to y.pt."""
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    script = prelude + (
        "import torch\n"
        "from finetune import create_model\n"
        "from finetune.errors import user_errors\n"
        "with user_errors():\n"
        f"    m = create_model('b0', pretrained={pretrained!r}).eval()\n"
        f"torch.save(m(torch.load(r'{tmp_path / 'x.pt'}')).detach(), r'{tmp_path / 'y.pt'}')\n"
    )
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)


def _same_outputs(tmp_path: Path, ref: torch.nn.Module) -> None:
    with torch.no_grad():
        assert relative_error(torch.load(tmp_path / "y.pt"), ref(torch.load(tmp_path / "x.pt"))) <= 1e-5


def _cache_in_hf_layout(hf_home: Path, blob: bytes) -> None:
    """What a past download left: hub/models--timm--<tag>/refs/main naming a snapshot that holds the file."""
    repo = hf_home / "hub" / f"models--timm--{TAG}"
    commit = "1" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "model.safetensors").write_bytes(blob)


def test_cached_hub_weights_load_with_no_route_out(tmp_path: Path) -> None:
    """Weights in the Hugging Face cache, HF_HUB_OFFLINE unset, the only proxy closed: the cached weights load."""
    ref, blob = _weights()
    _cache_in_hf_layout(tmp_path / "hf", blob)
    out = _create(tmp_path, _env(tmp_path, CLOSED), "timm")
    assert out.returncode == 0, out.stderr[-2000:]
    _same_outputs(tmp_path, ref)


def test_hub_weights_download_through_the_proxy(tmp_path: Path) -> None:
    """HTTPS_PROXY/HTTP_PROXY reach a hub that a direct connection cannot: the download and the cache go through it."""
    ref, blob = _weights()
    with serve_files({f"{HUB}/timm/{TAG}/resolve/main/model.safetensors": blob}) as proxy:  # a forward proxy gets full URLs
        out = _create(tmp_path, _env(tmp_path, proxy), "timm")
    assert out.returncode == 0, out.stderr[-2000:]
    _same_outputs(tmp_path, ref)
    assert list((tmp_path / "hf" / "hub" / f"models--timm--{TAG}" / "snapshots").glob("*/model.safetensors"))


@pytest.mark.parametrize("offline", [pytest.param(False, marks=pytest.mark.slow), True])  # False: ~60 s of retries
def test_uncached_hub_weights_without_network_fail_in_one_line(tmp_path: Path, offline: bool) -> None:
    """The error names the cache and HF_HUB_OFFLINE=1; online, it follows the hub's own retry warnings (~45 s)."""
    out = _create(tmp_path, _env(tmp_path, CLOSED, offline), "timm")
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], out.stderr
    assert len(lines) == 1 or not offline, out.stderr
    assert lines[-1].startswith(f"error: could not download timm weights '{TAG}': ")
    assert f"Hugging Face cache {tmp_path / 'hf' / 'hub'}" in lines[-1] and "HF_HUB_OFFLINE=1" in lines[-1]
    assert "model.pretrained=<folder>/model.safetensors" in lines[-1]


def _torchvision_file() -> tuple[torch.nn.Module, bytes, str]:
    """A torchvision-layout b0 file named as torch.hub names it (<stem>-<first 8 hex of its sha256>.pth)."""
    import torchvision

    ref = randomize_norm_stats(torchvision.models.efficientnet_b0())
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    return ref, buf.getvalue(), f"efficientnet_b0_test-{hashlib.sha256(buf.getvalue()).hexdigest()[:8]}.pth"


@pytest.mark.slow  # make test's time; hub weights' offline and proxy tests stay
def test_torchvision_weights_without_network_then_through_the_proxy_then_from_the_cache(tmp_path: Path) -> None:
    """torch.hub, whose cache is $TORCH_HOME/hub/checkpoints: uncached and no network, one line; HTTP_PROXY
    reaches what a direct connection cannot; with the proxy closed again, the file it cached loads."""
    ref, blob, name = _torchvision_file()
    url = f"{HUB}/{name}"
    prelude = f"from torchvision.models import EfficientNet_B0_Weights\nEfficientNet_B0_Weights.IMAGENET1K_V1.value.url = {url!r}\n"
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    out = _create(tmp_path, _env(tmp_path, CLOSED), "torchvision", prelude)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr[-2000:]
    assert out.stderr.startswith(f"error: could not download torchvision weights for 'b0' from {url}: it is not in "
                                 f"torch.hub's cache {cache} and there is no network (")
    assert "pretrained=<path>" in out.stderr
    with serve_files({url: blob}) as proxy:
        out = _create(tmp_path, _env(tmp_path, proxy), "torchvision", prelude)
    assert out.returncode == 0, out.stderr[-2000:]
    _same_outputs(tmp_path, ref)
    assert (cache / name).is_file()
    (tmp_path / "y.pt").unlink()
    out = _create(tmp_path, _env(tmp_path, CLOSED), "torchvision", prelude)
    assert out.returncode == 0, out.stderr[-2000:]
    _same_outputs(tmp_path, ref)
