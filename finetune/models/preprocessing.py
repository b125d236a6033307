"""How images must be prepared for a set of weights, recorded once and used everywhere.

As in torchvision's multi-weight API, preprocessing belongs to the weights: the resize
interpolation, the centre-crop fraction and the mean/std the network was trained with.
A checkpoint records the `Preprocessing` its training actually used (including data
overrides), and evaluation, export, sample grids and Grad-CAM read it from there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from finetune.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Lite weights were trained on inputs scaled to [-1, 1].
LITE_MEAN = LITE_STD = (0.5, 0.5, 0.5)
INTERPOLATIONS = ("bilinear", "bicubic")
#: The eval resize when the weights name none: what EfficientNets are evaluated with.
DEFAULT_INTERPOLATION = "bicubic"
#: The usual ImageNet eval protocol: resize so the centre crop keeps 87.5% of the side.
DEFAULT_CROP_FRACTION = 0.875


@dataclass(frozen=True)
class Preprocessing:
    """Resolution, normalisation, eval resize interpolation and centre-crop fraction."""

    resolution: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = DEFAULT_INTERPOLATION
    crop_fraction: float = DEFAULT_CROP_FRACTION

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", rgb_triple(self.mean, "mean"))
        object.__setattr__(self, "std", rgb_triple(self.std, "std"))
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if not 0 < float(self.crop_fraction) <= 1:
            raise ConfigError(f"crop_fraction must be in (0, 1], got {self.crop_fraction!r}")

    @property
    def resize_size(self) -> int:
        """The shorter side eval images are resized to before the centre crop (timm's rule)."""
        return int(self.resolution / self.crop_fraction)

    def to_dict(self) -> dict[str, Any]:
        """Primitives only, so checkpoints holding it still load with `weights_only=True`."""
        values = asdict(self)
        return {**values, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Preprocessing:
        known = {k: values[k] for k in ("resolution", "mean", "std", "interpolation", "crop_fraction") if k in values}
        return cls(**known)

    def eval_transform(self) -> Callable[[Image.Image], Tensor]:
        """PIL image -> uint8 C×res×res: resize the shorter side, centre crop."""
        from torchvision.transforms import InterpolationMode, v2

        return v2.Compose([
            v2.PILToTensor(),
            v2.Resize(self.resize_size, interpolation=InterpolationMode(self.interpolation), antialias=True),
            v2.CenterCrop(self.resolution),
        ])

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (or [0, 255] float) B×C×H×W -> the network's float input."""
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        return (images.float() / 255 - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        """The network's input back to [0, 1] images, for figures of what it saw."""
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x.float() * std + mean).clamp(0, 1)


def resize_like_pil(images: Tensor, size: int, interpolation: str) -> Tensor:
    """uint8 B×C×H×W -> uint8 B×C×size×size as PIL's `Image.resize` makes each image, on any device.

    PIL (so `eval_transform` and the export card's recipe too) resizes the width, rounds to uint8, then
    the height. One float resize of both axes keeps the first pass's bicubic overshoot that PIL
    clips: up to 24 grey levels on 8 px digits upsampled to 64, enough to flip predictions.
    Antialiased (PIL's kernels, also when upsampling) and rounded half up like PIL's fixed point,
    this agrees with PIL within one grey level.
    """
    x = images.float()
    height, width = x.shape[-2:]
    for shape, needed in (((height, size), width != size), ((size, size), height != size)):
        if needed:
            x = F.interpolate(x, size=shape, mode=interpolation, align_corners=False, antialias=True)
            x = x.add_(0.5).floor_().clamp_(0, 255)
    return x.to(torch.uint8)


def rgb_triple(value: Any, key: str) -> tuple[float, float, float]:
    """`value` as three floats, one per RGB channel (all > 0 for a `std`), or a one-line error naming `key`."""
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or (key == "std" and min(values) <= 0):
        positive = ", all > 0" if key == "std" else ""
        raise ConfigError(f"{key} must be three numbers (per RGB channel{positive}), got {value!r}")
    return values  # type: ignore[return-value]
