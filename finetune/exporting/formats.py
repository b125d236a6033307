"""The export formats of `finetune-export` (`finetune.commands.export`): ONNX, TorchScript, safetensors.

The exported network takes the normalised float input (N×3×res×res, NCHW) and returns logits.
The card beside the export, named after it (`model.onnx.json`, so exports of several formats share
a folder), records the variant, classes and every preprocessing step (resize, interpolation, crop,
mean/std), so an image can be prepared without this package. ONNX and TorchScript exports are run
once more against PyTorch on the same input, at another batch size than the export's (the batch
axis is dynamic); `finetune.exporting.hub` checks its folder with the same helpers.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from finetune.errors import ConfigError
from finetune.models import EfficientNet

if TYPE_CHECKING:
    from finetune.training.module import FineTuneModule

FORMATS = ("onnx", "torchscript", "safetensors", "hub")
#: Largest relative error (max |export - torch| / max |torch|) an export may show against PyTorch.
PARITY_LIMIT = 1e-4
#: ONNX opset: 18 runs on every onnxruntime since 1.14.
ONNX_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"
#: Batch sizes of the export's example input and of the check: different, so the check covers the dynamic axis.
EXPORT_BATCH, CHECK_BATCH = 2, 3


class ExportMismatchError(RuntimeError):
    """An export computes something else than the PyTorch model: a bug, not a user mistake."""


def model_card(module: FineTuneModule, fmt: str, file: Path) -> dict[str, Any]:
    """Everything needed to run the export on an image without this package (the card beside it, `card_path`)."""
    config, pre = module.model.config, module.preprocessing
    return {
        "format": fmt,
        "file": file.name,
        "variant": config.name,
        "classes": module.class_names,
        "num_classes": config.num_classes,
        "resolution": pre.resolution,
        "resize": pre.resize_size,
        "interpolation": pre.interpolation,
        "crop_fraction": pre.crop_fraction,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "padding": config.padding,
        "bn_eps": config.bn_eps,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, pre.resolution, pre.resolution], "dtype": "float32",
                  "layout": "NCHW, RGB"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", config.num_classes], "meaning": "logits; softmax gives probabilities"},
        "preprocessing": (f"decode to RGB; resize so the shorter side is {pre.resize_size} and the longer keeps the aspect "
                          f"ratio (rounded down), {pre.interpolation} with antialiasing as PIL's Image.resize; centre-crop "
                          f"{pre.resolution}x{pre.resolution} (offsets rounded); divide by 255; subtract mean, divide by "
                          "std per channel; NCHW float32"),
    }


def example_input(batch: int, resolution: int, seed: int = 0) -> torch.Tensor:
    """Normalised-image-like input: standard normal values."""
    return torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed))


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def export_onnx(model: EfficientNet, path: Path, resolution: int) -> None:
    """One self-contained .onnx file with a dynamic batch axis.

    Height and width are fixed, so TF 'same' padding (computed from them at run time in
    PyTorch) becomes constant pads in the graph: correct for the exported resolution only.
    """
    batch = torch.export.Dim("batch")
    torch.onnx.export(model.eval(), (example_input(EXPORT_BATCH, resolution),), str(path), dynamo=True,
                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes={"x": {0: batch}},
                      opset_version=ONNX_OPSET, external_data=False, verbose=False)


def check_onnx(path: Path, model: EfficientNet, resolution: int, batch: int = CHECK_BATCH) -> float:
    """Relative error of onnxruntime (CPU) against PyTorch on the same input."""
    import onnxruntime

    x = example_input(batch, resolution, seed=1)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (ours,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
    with torch.no_grad():
        reference = model.eval()(x).numpy()
    return relative_error(ours, reference)


def export_torchscript(model: EfficientNet, path: Path, resolution: int) -> None:
    """A traced module: the 'same' pads are recorded for the exported resolution, the batch stays free."""
    with torch.no_grad(), _quiet_jit():
        traced = torch.jit.trace(model.eval(), example_input(EXPORT_BATCH, resolution), check_trace=False)
        torch.jit.save(traced, str(path))


def check_torchscript(path: Path, model: EfficientNet, resolution: int, batch: int = CHECK_BATCH) -> float:
    x = example_input(batch, resolution, seed=1)
    with torch.no_grad(), _quiet_jit():
        return relative_error(torch.jit.load(str(path))(x).numpy(), model.eval()(x).numpy())


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    """Without the tracer's warning that pads computed from H, W become constants (intended), nor torch.jit's
    deprecation warnings, which `main` says in one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", r"`torch\.jit\.", FutureWarning)
        yield


def card_path(output: Path) -> Path:
    """The card beside an export, named after it: two exports into one folder keep their own."""
    return output.with_name(output.name + ".json")


def export_safetensors(model: EfficientNet, path: Path, card: dict[str, Any]) -> None:
    """The state dict in our layout, its card as metadata: `create_model(variant, num_classes, pretrained=<file>)`
    loads it, reading padding, BN eps and preprocessing from that metadata."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"finetune": json.dumps(card)})






def onnx_runtime() -> Any:
    """onnxruntime, once the exporter's packages are known to be there."""
    try:
        import onnx  # noqa: F401 - needed by torch's exporter
        import onnxruntime
        import onnxscript  # noqa: F401 - needed by torch's exporter
    except ImportError as e:
        raise ConfigError(f"ONNX export needs onnx, onnxscript and onnxruntime ({e.name} is missing): "
                          "pip install 'effnet-finetune[export]'") from None
    return onnxruntime







