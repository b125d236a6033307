"""Compound scaling: how one base network becomes B0-B7 (and any phi).

The paper scales depth by alpha^phi, width by beta^phi and resolution by gamma^phi
under alpha * beta^2 * gamma^2 ~= 2, so each step of phi roughly doubles the
multiply-adds. The released B1-B7 do not follow the formula exactly (their
coefficients were rounded by hand), so the official points are kept as a table and
the formula serves any other phi.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from finetune.errors import ConfigError

ALPHA, BETA, GAMMA = 1.2, 1.1, 1.15
BASE_RESOLUTION = 224


@dataclass(frozen=True)
class Scaling:
    """Multipliers that turn the base spec into one variant."""

    width: float
    depth: float
    resolution: int
    dropout: float


VARIANTS: dict[str, Scaling] = {
    "b0": Scaling(1.0, 1.0, 224, 0.2),
    "b1": Scaling(1.0, 1.1, 240, 0.2),
    "b2": Scaling(1.1, 1.2, 260, 0.3),
    "b3": Scaling(1.2, 1.4, 300, 0.3),
    "b4": Scaling(1.4, 1.8, 380, 0.4),
    "b5": Scaling(1.6, 2.2, 456, 0.4),
    "b6": Scaling(1.8, 2.6, 528, 0.5),
    "b7": Scaling(2.0, 3.1, 600, 0.5),
    # Lite: TF's efficientnet_lite_builder; lite3/lite4 use smaller resolutions than b3/b4.
    "lite0": Scaling(1.0, 1.0, 224, 0.2),
    "lite1": Scaling(1.0, 1.1, 240, 0.2),
    "lite2": Scaling(1.1, 1.2, 260, 0.3),
    "lite3": Scaling(1.2, 1.4, 280, 0.3),
    "lite4": Scaling(1.4, 1.8, 300, 0.3),
}


def compound(phi: float, alpha: float = ALPHA, beta: float = BETA, gamma: float = GAMMA) -> Scaling:
    """Scaling for an arbitrary compound coefficient, by the paper's formula.

    Resolution is rounded to a multiple of 8 (what the stride-32 network and every
    released variant use); dropout grows from 0.2 by 0.05 per unit of phi, capped at 0.5,
    which interpolates the official points.
    """
    if not math.isfinite(phi) or phi < 0:
        raise ConfigError(f"phi must be a finite number >= 0, got {phi!r}")
    resolution = int(round(BASE_RESOLUTION * gamma**phi / 8.0)) * 8
    dropout = min(0.5, 0.2 + 0.05 * phi)
    return Scaling(width=beta**phi, depth=alpha**phi, resolution=resolution, dropout=round(dropout, 4))


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by `width`, keeping it a multiple of `divisor`.

    Never rounds down by more than 10%, the rule of the TF reference, timm and
    torchvision alike; matching it exactly is what makes their weights load.
    """
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    """Scale a stage's block count; ceil, so depth never shrinks below the base."""
    return int(math.ceil(repeats * depth))
