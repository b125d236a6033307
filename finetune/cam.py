"""Grad-CAM on the last stage: where each fine-tuned model looks (the paper's Figure 7 idea)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the headless backend
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from finetune.models import EfficientNet  # noqa: E402


def grad_cam(model: EfficientNet, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class activation maps (B, H, W) in [0, 1] for class `target`, upsampled to the input size.

    Works for any policy: the last stage's output is made a leaf that requires grad, so
    frozen parameters need no gradient.
    """
    was_training = model.training
    model.eval()
    with torch.no_grad():
        activations = model.stages(model.stem(x))
    activations = activations.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model.forward_head(model.top(activations))
        score = logits.gather(1, target.view(-1, 1)).sum()
        (grads,) = torch.autograd.grad(score, activations)
    model.train(was_training)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activations.detach()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
    return (cam / peak).cpu()


def cam_figure(images: torch.Tensor, cams: dict[str, torch.Tensor], labels: list[str]) -> plt.Figure:
    """Rows: images; columns: the input, then each policy's map over it."""
    n, cols = len(images), 1 + len(cams)
    fig, axes = plt.subplots(n, cols, figsize=(2.2 * cols, 2.2 * n), squeeze=False)
    for i in range(n):
        picture = images[i].permute(1, 2, 0).clamp(0, 1).numpy()
        axes[i][0].imshow(picture)
        axes[i][0].set_title(labels[i], fontsize=8)
        for j, (policy, cam) in enumerate(cams.items(), start=1):
            axes[i][j].imshow(picture)
            axes[i][j].imshow(cam[i].numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
            if i == 0:
                axes[i][j].set_title(policy, fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig
