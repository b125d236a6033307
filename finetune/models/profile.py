"""Parameters and multiply-adds of B0-B7 (and any phi), measured, beside the paper's Table 2.

Models are built on the meta device, so profiling B7 at 600 px costs no memory or time.
MACs are torch's flop counter (convolutions and the classifier) halved.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from finetune.models.efficientnet import EfficientNet, EfficientNetConfig
from finetune.models.scaling import ALPHA, BETA, GAMMA, VARIANTS, compound

# Paper Table 2: (parameters, FLOPs) as printed; the paper's "FLOPs" are multiply-adds.
PAPER_TABLE2 = {
    "b0": (5.3e6, 0.39e9), "b1": (7.8e6, 0.70e9), "b2": (9.2e6, 1.0e9), "b3": (12e6, 1.8e9),
    "b4": (19e6, 4.2e9), "b5": (30e6, 9.9e9), "b6": (43e6, 19e9), "b7": (66e6, 37e9),
}


@dataclass(frozen=True)
class Profile:
    name: str
    phi: float
    resolution: int
    params: int
    macs: int


def params_and_macs(config: EfficientNetConfig) -> tuple[int, int]:
    """Parameters and multiply-adds per image of the network `config` describes (its head and resolution included)."""
    with torch.device("meta"):
        model = EfficientNet(config).eval()
        x = torch.empty(1, 3, config.resolution, config.resolution)
    params = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return params, counter.get_total_flops() // 2


def profile_config(config: EfficientNetConfig, phi: float) -> Profile:
    return Profile(config.name, phi, config.resolution, *params_and_macs(config))


def profile_variant(name: str) -> Profile:
    phi = float(name[1:])
    return profile_config(EfficientNetConfig(name=name, scaling=VARIANTS[name], resolution=VARIANTS[name].resolution), phi)


def profile_phi(phi: float) -> Profile:
    scaling = compound(phi)
    return profile_config(EfficientNetConfig(name=f"phi{phi:g}", scaling=scaling, resolution=scaling.resolution), phi)


def format_table(rows: list[Profile]) -> str:
    """Markdown table; the last columns compare MAC growth with the paper's 2^phi."""
    base = rows[0]
    lines = [
        "| model | phi | resolution | params (M) | MACs (G) | params / B0 | MACs / B0 | 2^phi | paper params (M) | paper MACs (G) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        paper = PAPER_TABLE2.get(r.name)
        paper_cols = f"{paper[0] / 1e6:.1f} | {paper[1] / 1e9:.2f}" if paper else "- | -"
        lines.append(
            f"| {r.name} | {r.phi:g} | {r.resolution} | {r.params / 1e6:.2f} | {r.macs / 1e9:.2f} | "
            f"{r.params / base.params:.2f} | {r.macs / base.macs:.2f} | {2 ** r.phi:.0f} | {paper_cols} |"
        )
    return "\n".join(lines)


def growth_note(rows: list[Profile]) -> str:
    """Fit MACs ~ 2^(k*phi) by least squares through B0; the paper designs k = 1."""
    base = rows[0]
    pts = [(r.phi, math.log2(r.macs / base.macs)) for r in rows if r.phi > 0]
    if not pts:
        return ""
    k = sum(p * y for p, y in pts) / sum(p * p for p, _ in pts)
    constraint = ALPHA * BETA**2 * GAMMA**2
    return (
        f"MACs grow as 2^({k:.2f}*phi) across these models, against the paper's nominal 2^phi: its constraint "
        f"alpha*beta^2*gamma^2 is {constraint:.2f} (not 2), and the released B1-B7 use hand-rounded coefficients."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Parameters and multiply-adds of EfficientNet B0-B7 and any phi.")
    parser.add_argument("--phi", type=float, nargs="*", default=[], help="extra compound coefficients, e.g. --phi 2.5 8")
    parser.add_argument("--variants", nargs="*", default=[f"b{i}" for i in range(8)], choices=[f"b{i}" for i in range(8)])
    args = parser.parse_args(argv)
    if any(not math.isfinite(p) or p < 0 for p in args.phi):
        parser.error("--phi values must be finite and >= 0")
    rows = [profile_variant("b0")] + [profile_variant(v) for v in args.variants if v != "b0"]
    rows += [profile_phi(p) for p in args.phi]
    print(format_table(rows))
    print()
    print(growth_note(rows))


if __name__ == "__main__":
    main()
