"""Training-only augmentations of a device batch: auto-augment, random erasing, mixup and cutmix.

All of them run in `ImageClassificationDataModule.device_batch` on training batches only,
so evaluation images never see them. torchvision v2's auto-augment and erasing draw ONE
set of parameters per call, the same for every image of a batch tensor; here they are
drawn per image. Randomness comes from torch's global CPU generator (v2 draws its
parameters there), which `lightning.seed_everything` seeds and checkpoints restore.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import v2

#: `data.auto_augment` choices and the torchvision policy each names.
AUTO_AUGMENT = {"randaugment": v2.RandAugment, "trivialaugment": v2.TrivialAugmentWide}
#: Random erasing's box draws (area 2-33 %, aspect ratio 0.3-3.3, torchvision's defaults); the filling is ours.
_ERASING_BOXES = v2.RandomErasing()

#: Each augmenting data setting and the value that turns it off (the training-only ones' defaults, conf/data/_base.yaml).
AUGMENTATION_OFF: dict[str, Any] = {"augment": False, "auto_augment": None, "random_erasing": 0.0, "mixup_alpha": 0.0,
                                    "cutmix_alpha": 0.0}
#: The data keys that change training images only (each off by default); cached features need them off.
TRAINING_ONLY_KEYS = tuple(key for key in AUGMENTATION_OFF if key != "augment")


def augmenting_keys(data: Mapping[str, Any]) -> list[str]:
    """The data settings (`augment` first) that make training images differ from epoch to epoch or from eval's.

    Empty is what cached features need: only then is an image's pooled feature the same every epoch.
    """
    return [key for key in ("augment", *TRAINING_ONLY_KEYS) if data.get(key, key == "augment")]  # augment: on by default


def without_augmentation(data: Mapping[str, Any]) -> dict[str, Any]:
    """The overrides that turn off each of `data`'s augmenting settings (what a probe's run in a comparison takes)."""
    return {key: AUGMENTATION_OFF[key] for key in augmenting_keys(data)}


def auto_augment_policy(name: str) -> v2.Transform:
    """The named policy, with bilinear resampling for its geometric ops as torchvision's reference recipes use."""
    return AUTO_AUGMENT[name](interpolation=v2.InterpolationMode.BILINEAR)


def per_image(transform: v2.Transform, images: Tensor) -> Tensor:
    """`transform` applied to each image of a uint8 batch on its own, so each draws its own op and magnitude.

    A loop of v2 calls: on the CPU 0.2-0.4 ms per 32 px image and 1-2.5 ms per 224 px
    image (measured, one thread), mostly dispatch; batching by op would need torchvision's
    private op table.
    """
    return torch.stack([transform(image) for image in images])


def erase_per_image(images: Tensor, probability: float) -> Tensor:
    """Zero (the dataset mean, after normalisation) a random box in each image with `probability`, in place.

    The box comes from torchvision's `RandomErasing.make_params`; the fill is
    written as a Python scalar, since the transform itself copies a fill tensor from the
    host for every image: a synchronising transfer each on a GPU.
    """
    for image in images:
        if torch.rand(()) < probability:
            box = _ERASING_BOXES.make_params([image])
            if box["v"] is not None:  # None: no box fitted in 10 draws, the image stays whole (as in v2)
                image[:, box["i"]:box["i"] + box["h"], box["j"]:box["j"] + box["w"]] = 0.0
    return images


def batch_mixer(mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> v2.Transform | None:
    """MixUp, CutMix, or a fair choice between them per batch; None when both alphas are 0.

    They turn int labels into probability targets without smoothing (unlike timm's
    `Mixup`, whose default label_smoothing=0.1 would stack on the loss's own).
    """
    mixers = [mixer(alpha=alpha, num_classes=num_classes)
              for mixer, alpha in ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha)) if alpha > 0]
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
