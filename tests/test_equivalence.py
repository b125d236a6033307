"""The speed options change nothing but speed: channels_last, the device transform, checkpointing.

Each fast path is compared with the plain one on the same inputs and weights. Tolerances
are float32 reordering noise (different kernels sum in a different order), except the
device transform, whose reference rounds to uint8 after resizing (see its test).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.transforms import v2

from finetune.datamodules import DigitsDataModule
from finetune.models import create_model
from finetune.training.module import FineTuneModule
from helpers import randomize_norm_stats, relative_error

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _inputs(batch: int, size: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tol: float) -> None:
    """Each tensor within `tol` of its own largest entry, or of the model's largest gradient.

    The floor matters for gradients that are zero in exact arithmetic (a BatchNorm bias
    feeding another BatchNorm): there both paths hold only rounding noise.
    """
    assert ours.keys() == ref.keys() and ref
    floor = max(g.abs().max().item() for g in ref.values())
    for name, g in ref.items():
        err = (ours[name] - g).abs().max().item()
        assert err <= tol * max(g.abs().max().item(), floor * 1e-2), f"{name}: gradient differs by {err:.2e}"


# --------------------------------------------------------------------------- channels_last


def test_channels_last_gives_the_same_outputs() -> None:
    model = randomize_norm_stats(create_model("b0", num_classes=10))
    x, _ = _inputs(2, 64, 10)
    with torch.no_grad():
        plain = model(x)
        fast = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert relative_error(fast, plain) <= 1e-5


def test_channels_last_gives_the_same_loss_and_grads() -> None:
    """A training-mode step (batch statistics, dropout and stochastic depth seeded alike)."""
    torch.manual_seed(0)
    plain = create_model("b0", num_classes=10, drop_path_rate=0.2).train()
    fast = create_model("b0", num_classes=10, pretrained=plain.state_dict(), padding="symmetric", bn_eps=1e-5,
                        drop_path_rate=0.2).train()
    fast.to(memory_format=torch.channels_last)
    x, y = _inputs(4, 64, 10)
    losses = []
    for model, inp in ((plain, x), (fast, x.contiguous(memory_format=torch.channels_last))):
        torch.manual_seed(1)
        loss = nn.functional.cross_entropy(model(inp), y)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    _assert_grads_close(_grads(fast), _grads(plain), tol=1e-4)


# --------------------------------------------------------------------------- device transform


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize(("size", "resolution"), [(8, 48), (32, 224), (40, 16)])
def test_device_transform_resizes_as_pil_does(size: int, resolution: int, interpolation: str) -> None:
    """`device_transform`'s resize vs PIL's `Image.resize`, what model.json's recipe and `eval_transform` do.

    PIL resizes the width, rounds to uint8, then the height; its fixed-point arithmetic moves a pixel
    by up to one grey level (1/255 before normalisation), the tolerance. One float resize of both axes
    (the device's before) was many grey levels off for bicubic, which clips its first pass's overshoot.
    Upsampling (8->48, 32->224) and antialiased downsampling (40->16) are both covered, on noise.
    """
    from PIL import Image

    images = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    dm = DigitsDataModule(num_workers=0, resolution=resolution, channels_last=False)
    dm.interpolation = interpolation  # the weights' (set_preprocessing)
    filter_ = Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR
    pil = torch.stack([v2.functional.pil_to_tensor(v2.functional.to_pil_image(image).resize((resolution, resolution),
                                                                                             filter_))
                       for image in images])
    reference = v2.Normalize(MEAN, STD)(v2.ToDtype(torch.float32, scale=True)(pil))
    ours = dm.device_transform(images, train=False)
    assert ours.shape == reference.shape == (4, 3, resolution, resolution)
    grey_levels = ((ours - reference) * torch.tensor(STD).view(1, 3, 1, 1) * 255).abs().max().item()
    assert grey_levels <= 1 + 1e-3


def test_device_transform_channels_last_is_the_same_tensor() -> None:
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    contiguous = DigitsDataModule(num_workers=0, resolution=96, channels_last=False).device_transform(images, train=False)
    strided = DigitsDataModule(num_workers=0, resolution=96, channels_last=True).device_transform(images, train=False)
    assert strided.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(contiguous, strided)


# --------------------------------------------------------------------------- gradient checkpointing


def _module(checkpointing: bool, policy: str) -> FineTuneModule:
    torch.manual_seed(0)
    model = {"name": "b0", "pretrained": None, "resolution": 64, "drop_path_rate": 0.2, "grad_checkpointing": checkpointing}
    module = FineTuneModule(model=model, num_classes=10, finetune={"name": policy, "trainable_stages": 3})
    randomize_norm_stats(module.model)
    nn.init.normal_(module.model.classifier.weight, std=0.05)  # a zero head sends no gradient back
    return module.train()


@pytest.mark.parametrize("policy", ["full", "partial"])
def test_grad_checkpointing_gives_the_same_loss_and_grads(policy: str) -> None:
    """Through FineTuneModule's forward (frozen leading parts without a graph for `partial`).

    Recomputation replays the saved RNG state, so stochastic depth drops the same blocks.
    """
    plain, checkpointed = _module(False, policy), _module(True, policy)
    assert checkpointed.model.grad_checkpointing and not plain.model.grad_checkpointing
    x, y = _inputs(4, 64, 10, seed=2)
    losses = []
    for module in (plain, checkpointed):
        torch.manual_seed(3)
        loss = module.criterion(module(x), y)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    _assert_grads_close(_grads(checkpointed), _grads(plain), tol=1e-5)
    if policy == "partial":
        assert not any(p.grad is not None for p in checkpointed.model.stem.parameters())


def test_grad_checkpointing_leaves_batchnorm_statistics_as_plain() -> None:
    """Eval-mode results depend on the running statistics, so they must match too."""
    plain, checkpointed = _module(False, "full"), _module(True, "full")
    x, y = _inputs(4, 64, 10, seed=2)
    for module in (plain, checkpointed):
        torch.manual_seed(3)
        module.criterion(module(x), y).backward()
    reference = plain.model.state_dict()
    for name, value in checkpointed.model.state_dict().items():
        assert torch.allclose(value.float(), reference[name].float(), rtol=1e-5, atol=1e-6), name
