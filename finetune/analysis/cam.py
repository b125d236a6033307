"""Grad-CAM on the last stage: where each fine-tuned model looks (the paper's Figure 7 idea)."""

from __future__ import annotations

from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the headless backend
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from finetune.models import EfficientNet  # noqa: E402


class ClassActivation(NamedTuple):
    """Grad-CAM maps and the probabilities of the pass that made them, so a figure can say what the model predicted."""

    maps: torch.Tensor  # (B, H, W) in [0, 1]
    probabilities: torch.Tensor  # (B, classes), softmax of the same logits


def grad_cam(model: EfficientNet, x: torch.Tensor, target: torch.Tensor) -> ClassActivation:
    """Class activation maps (B, H, W) in [0, 1] for class `target`, upsampled to the input size.

    Works for any policy: the last stage's output is made a leaf that requires grad, so
    frozen parameters need no gradient. The probabilities come from the logits the maps were
    taken from, so a figure's "predicted" is what the explained pass predicted.
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
    return ClassActivation((cam / peak).cpu(), logits.detach().float().softmax(-1).cpu())


#: The colour map of the Grad-CAM overlays and of their colour bar.
CAM_COLOURS = "jet"
#: Opacity of a map over its image: enough of the image shows through to see what is lit.
CAM_ALPHA = 0.45


def cam_figure(images: torch.Tensor, cams: dict[str, torch.Tensor], labels: list[str],
               predictions: dict[str, list[tuple[str, float]]]) -> plt.Figure:
    """Rows: images; columns: the input, then each policy's map of the true class over it.

    `predictions` holds, per policy and image, the predicted class and its probability: a map of
    the true class reads differently when the model predicted another one, so each panel says
    which it did, right or wrong, in words and colour. The colour bar gives the maps' scale.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    n, cols = len(images), 1 + len(cams)
    fig, axes = plt.subplots(n, cols, figsize=(2.2 * cols + 1.2, 2.5 * n + 0.7), squeeze=False, layout="constrained")
    for i in range(n):
        picture = images[i].permute(1, 2, 0).clamp(0, 1).numpy()
        axes[i][0].imshow(picture)
        axes[i][0].set_title(f"true: {labels[i]}", fontsize=9)
        for j, (policy, cam) in enumerate(cams.items(), start=1):
            predicted, probability = predictions[policy][i]
            right = predicted == labels[i]
            axes[i][j].imshow(picture)
            axes[i][j].imshow(cam[i].numpy(), cmap=CAM_COLOURS, alpha=CAM_ALPHA, vmin=0, vmax=1)
            axes[i][j].set_title(f"{policy}\npredicts {predicted} ({probability:.2f}), {'right' if right else 'wrong'}",
                                 fontsize=8, color="tab:green" if right else "tab:red")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Grad-CAM of the true class: where each policy's best model finds evidence for the image's label\n"
                 "(panel titles: the model's prediction and its probability; green right, red wrong)", fontsize=10)
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap=CAM_COLOURS), ax=axes, shrink=min(1.0, 2.0 / n + 0.3),
                       aspect=25)
    bar.set_label("evidence for the true class (1: the map's peak)")
    return fig
