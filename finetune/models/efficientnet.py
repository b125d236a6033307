"""EfficientNet built from one base spec (paper Table 1) and a Scaling.

Module and parameter names are our own (`stem`, `stages.i.j`, `top`, `classifier`);
`finetune.models.weights` maps timm, torchvision and lukemelas layouts onto them.
The arithmetic follows timm's `efficientnet_*` / `tf_efficientnet_*` exactly, which
is what the parity tests check.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from finetune.models.preprocessing import (
    DEFAULT_CROP_FRACTION, DEFAULT_INTERPOLATION, IMAGENET_MEAN, IMAGENET_STD, Preprocessing,
)
from finetune.models.scaling import Scaling, round_filters, round_repeats

Padding = Literal["symmetric", "same"]
PADDINGS = ("symmetric", "same")
NORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class StageSpec:
    """One row of paper Table 1 (MBConv stages only)."""

    expand: int
    kernel: int
    stride: int
    channels: int
    repeats: int


BASE_STAGES: tuple[StageSpec, ...] = (
    StageSpec(expand=1, kernel=3, stride=1, channels=16, repeats=1),
    StageSpec(expand=6, kernel=3, stride=2, channels=24, repeats=2),
    StageSpec(expand=6, kernel=5, stride=2, channels=40, repeats=2),
    StageSpec(expand=6, kernel=3, stride=2, channels=80, repeats=3),
    StageSpec(expand=6, kernel=5, stride=1, channels=112, repeats=3),
    StageSpec(expand=6, kernel=5, stride=2, channels=192, repeats=4),
    StageSpec(expand=6, kernel=3, stride=1, channels=320, repeats=1),
)
STEM_CHANNELS = 32
TOP_CHANNELS = 1280


@dataclass(frozen=True)
class EfficientNetConfig:
    """Everything needed to build one network; `create_model` fills it in."""

    name: str
    scaling: Scaling
    num_classes: int = 1000
    lite: bool = False
    padding: Padding = "symmetric"
    bn_eps: float = 1e-5
    drop_rate: float = 0.2
    drop_path_rate: float = 0.2
    resolution: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = DEFAULT_INTERPOLATION
    crop_fraction: float = DEFAULT_CROP_FRACTION
    weights: str | None = None
    stages: tuple[StageSpec, ...] = field(default=BASE_STAGES, repr=False)

    @property
    def se_ratio(self) -> float:
        return 0.0 if self.lite else 0.25

    def scaled_stages(self) -> list[StageSpec]:
        """Apply width and depth; Lite keeps the first and last stage depth fixed."""
        out = []
        last = len(self.stages) - 1
        for i, s in enumerate(self.stages):
            fixed_depth = self.lite and i in (0, last)
            repeats = s.repeats if fixed_depth else round_repeats(s.repeats, self.scaling.depth)
            out.append(replace(s, channels=round_filters(s.channels, self.scaling.width), repeats=repeats))
        return out

    @property
    def stem_channels(self) -> int:
        return STEM_CHANNELS if self.lite else round_filters(STEM_CHANNELS, self.scaling.width)

    @property
    def top_channels(self) -> int:
        return TOP_CHANNELS if self.lite else round_filters(TOP_CHANNELS, self.scaling.width)


class Conv2dSame(nn.Conv2d):
    """TensorFlow 'SAME' convolution: pads more on the bottom/right when the total is odd.

    Only stride-2 layers need this; for stride 1 and odd kernels it equals symmetric
    padding, so `conv2d` uses a plain static-padded layer there.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def conv2d(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, padding: Padding = "symmetric") -> nn.Conv2d:
    if padding == "same" and stride > 1:
        return Conv2dSame(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)
    return nn.Conv2d(cin, cout, kernel, stride, padding=(kernel - 1) // 2, groups=groups, bias=False)


def activation(lite: bool) -> nn.Module:
    return nn.ReLU6(inplace=True) if lite else nn.SiLU(inplace=True)


class ConvBNAct(nn.Sequential):
    """conv -> BatchNorm -> activation (none for the linear projection)."""

    def __init__(self, cin: int, cout: int, kernel: int, *, stride: int = 1, groups: int = 1,
                 padding: Padding, bn_eps: float, act: nn.Module | None) -> None:
        super().__init__()
        self.conv = conv2d(cin, cout, kernel, stride, groups, padding)
        self.bn = nn.BatchNorm2d(cout, eps=bn_eps)
        self.act = act if act is not None else nn.Identity()


class SqueezeExcite(nn.Module):
    """Channel gating from globally pooled features; reduction counted from the block input."""

    def __init__(self, channels: int, reduced: int, act: nn.Module) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = act
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.expand(self.act(self.reduce(s)))
        return x * s.sigmoid()


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescale the survivors."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, squeeze-excite, 1x1 project."""

    def __init__(self, cin: int, cout: int, *, expand: int, kernel: int, stride: int, se_ratio: float,
                 lite: bool, padding: Padding, bn_eps: float, drop_path_rate: float) -> None:
        super().__init__()
        mid = cin * expand
        norm = dict(padding=padding, bn_eps=bn_eps)
        self.expand = ConvBNAct(cin, mid, 1, act=activation(lite), **norm) if expand != 1 else nn.Identity()
        self.dw = ConvBNAct(mid, mid, kernel, stride=stride, groups=mid, act=activation(lite), **norm)
        self.se = SqueezeExcite(mid, max(1, int(cin * se_ratio)), activation(lite)) if se_ratio > 0 else nn.Identity()
        self.project = ConvBNAct(mid, cout, 1, act=None, **norm)
        self.has_skip = stride == 1 and cin == cout
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.dw(self.expand(x))))
        if self.has_skip:
            out = drop_path(out, self.drop_path_rate, self.training) + x
        return out


class EfficientNet(nn.Module):
    """stem -> 7 MBConv stages -> 1x1 top conv -> pool -> dropout -> classifier."""

    def __init__(self, config: EfficientNetConfig) -> None:
        super().__init__()
        self.config = config
        self.grad_checkpointing = False
        lite, padding, eps = config.lite, config.padding, config.bn_eps
        stem = config.stem_channels
        self.stem = ConvBNAct(3, stem, 3, stride=2, act=activation(lite), padding=padding, bn_eps=eps)

        specs = config.scaled_stages()
        total_blocks = sum(s.repeats for s in specs)
        stages, cin, index = [], stem, 0
        for spec in specs:
            blocks = []
            for j in range(spec.repeats):
                blocks.append(MBConv(
                    cin, spec.channels, expand=spec.expand, kernel=spec.kernel,
                    stride=spec.stride if j == 0 else 1, se_ratio=config.se_ratio, lite=lite,
                    padding=padding, bn_eps=eps, drop_path_rate=config.drop_path_rate * index / total_blocks,
                ))
                cin, index = spec.channels, index + 1
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)

        self.num_features = config.top_channels
        self.top = ConvBNAct(cin, self.num_features, 1, act=activation(lite), padding=padding, bn_eps=eps)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(config.drop_rate)
        self.num_classes = config.num_classes
        self.classifier = nn.Linear(self.num_features, self.num_classes) if self.num_classes else nn.Identity()
        self.apply(_init_weights)

    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.config.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.config.std

    @property
    def preprocessing(self) -> Preprocessing:
        """What its weights expect of an image (resolution, mean/std, eval resize and crop)."""
        c = self.config
        return Preprocessing(c.resolution, c.mean, c.std, c.interpolation, c.crop_fraction)

    @property
    def drop_rate(self) -> float:
        return self.config.drop_rate

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a zero-initialised one (0 classes: pooled features out).

        A zero head starts at uniform predictions, so the first steps of fine-tuning do
        not push large random gradients into pretrained features.
        """
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        ref = self.top.conv.weight
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype) if num_classes else nn.Identity()
        if num_classes:
            nn.init.zeros_(self.classifier.weight)
            nn.init.zeros_(self.classifier.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward: trades ~30% time for most activation memory."""
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, stages and top conv (before pooling).

        Frozen parts need nothing here: with requires_grad=False on their parameters autograd
        records nothing until the first trainable layer (measured: the same saved tensors and
        step time as running the frozen prefix under no_grad).
        """
        x = self.stem(x)
        for stage in self.stages:
            if self.grad_checkpointing and torch.is_grad_enabled():
                for block in stage:
                    x = checkpoint(block, x, use_reentrant=False,
                                   context_fn=lambda b=block: (nullcontext(), _keep_norm_stats(b)))
            else:
                x = stage(x)
        return self.top(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x).flatten(1)
        if pre_logits:
            return x
        return self.classifier(self.dropout(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@contextmanager
def _keep_norm_stats(module: nn.Module) -> Iterator[None]:
    """Recomputation re-runs BatchNorm in training mode: undo its second statistics update."""
    buffers = [b for n, b in module.named_buffers() if n.rsplit(".", 1)[-1] in NORM_STATS]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


def _init_weights(m: nn.Module) -> None:
    """The TF reference init (also timm's): fan-out normal for convs, uniform for the head."""
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        bound = 1.0 / math.sqrt(m.weight.size(0))
        nn.init.uniform_(m.weight, -bound, bound)
        nn.init.zeros_(m.bias)
