"""Does running frozen leading parts under no_grad save anything over requires_grad=False alone?

The answer decided the design (docs/architecture.md, decision 6): it does not, because
autograd records nothing before the first layer with a trainable parameter. Measured for
`partial` (last 2 stages + top + head) on B0: bytes autograd saves for backward, and the
train-step time, interleaved, as a ratio.

    .venv/bin/python benchmarks/bench_frozen_prefix.py
"""

from __future__ import annotations

import statistics
import time

import torch

from finetune.models import create_model
from finetune.training.policies import FinetunePolicy, apply_policy, model_parts, set_frozen_eval


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = create_model("b0", num_classes=10).train()
    policy = FinetunePolicy(name="partial", trainable_stages=2)
    frozen = apply_policy(model, policy, 0)
    set_frozen_eval(model, frozen, policy)
    layers = [model.stem, *model.stages, model.top]
    prefix = next(i for i, name in enumerate(n for n in model_parts(model) if n != "head") if name not in frozen)
    x, y = torch.randn(16, 3, 128, 128), torch.randint(0, 10, (16,))

    def step(no_grad_prefix: bool) -> tuple[float, int]:
        saved = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[0] += t.numel() * t.element_size()
            return t

        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h = x
            for i, layer in enumerate(layers):
                with torch.set_grad_enabled(not (no_grad_prefix and i < prefix)):
                    h = layer(h)
            loss = torch.nn.functional.cross_entropy(model.forward_head(h), y)
        loss.backward()
        return time.perf_counter() - start, saved[0]

    for _ in range(2):
        step(True), step(False)
    with_prefix, without = [], []
    for _ in range(12):
        with_prefix.append(step(True))
        without.append(step(False))
    ratio = statistics.median(a[0] / b[0] for a, b in zip(with_prefix, without))
    print(f"saved for backward: no_grad prefix {with_prefix[0][1] / 2**20:.1f} MB, "
          f"requires_grad=False only {without[0][1] / 2**20:.1f} MB")
    print(f"step time, no_grad prefix / requires_grad=False only: {ratio:.3f} (median of 12 interleaved pairs)")


if __name__ == "__main__":
    main()
