"""`finetune-export`: a checkpoint as ONNX, TorchScript or safetensors, with what deployment needs beside it.

    finetune-export outputs/train/<time>/checkpoints/last.ckpt --format onnx --output deploy/model.onnx

The exported network takes the normalised float input (N×3×res×res, NCHW) and returns logits.
The card beside the export, named after it (`model.onnx.json`, so exports of several formats share
a folder), records the variant, classes and every preprocessing step (resize, interpolation, crop,
mean/std), so an image can be prepared without this package. `--format hub` writes a timm model
folder instead (`finetune.hub`).
ONNX and TorchScript exports are run once more against PyTorch on the same input, at another
batch size than the export's (the batch axis is dynamic), and the check's result is printed.
Both files are written under temporary names and renamed once the check has passed, so a failed
export leaves the output folder as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from finetune.errors import ConfigError, user_errors
from finetune.models import EfficientNet
from finetune.outputs import writable_folder

if TYPE_CHECKING:
    from finetune.module import FineTuneModule

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


def export(checkpoint: str | Path, fmt: str, output: str | Path, push: str | None = None) -> dict[str, Any]:
    """Write `output` in `fmt` and its card beside it; the card's content, with the check's result.

    `fmt="hub"`: the timm folder `output`, uploaded to the hub repository `push` if given (`finetune.hub`).
    Nothing is written where the check fails: a previous export at `output` stays as it was.
    """
    # Imported here: Lightning and torchmetrics (which imports matplotlib) load only to read a checkpoint.
    from finetune.module import FineTuneModule

    if fmt not in FORMATS:
        raise ConfigError(f"unknown format '{fmt}'; valid: {', '.join(FORMATS)}")
    if fmt == "hub":
        from finetune.hub import export_hub  # imports timm, which the other formats do without

        return export_hub(checkpoint, output, push)
    if push is not None:
        raise ConfigError("--push uploads a timm model folder to the Hugging Face hub: add --format hub")
    runtime = f"onnxruntime {_onnx_runtime().__version__} (CPU)" if fmt == "onnx" else f"torch.jit {torch.__version__}"
    output = writable_file(Path(output).expanduser())
    module = FineTuneModule.from_checkpoint(Path(checkpoint).expanduser())
    model, resolution = module.model.eval(), module.preprocessing.resolution
    card = model_card(module, fmt, output)
    card_file = card_path(output)
    with _staged(output) as staged_file, _staged(card_file) as staged_card:
        if fmt == "safetensors":
            export_safetensors(model, staged_file, card)
        else:
            write, check = (export_onnx, check_onnx) if fmt == "onnx" else (export_torchscript, check_torchscript)
            write(model, staged_file, resolution)
            error = check(staged_file, model, resolution)
            card["check"] = {"runtime": runtime, "batch": CHECK_BATCH, "max_relative_error": error, "limit": PARITY_LIMIT}
            if not error <= PARITY_LIMIT:
                raise ExportMismatchError(f"{output} differs from PyTorch: relative error {error:.2e} "
                                          f"> {PARITY_LIMIT:.0e} on a batch of {CHECK_BATCH}")
        staged_card.write_text(json.dumps(card, indent=2) + "\n")
        os.replace(staged_file, output)
        os.replace(staged_card, card_file)
    return card


@contextlib.contextmanager
def _staged(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` (so `os.replace` onto it is atomic), removed on leaving unless renamed.

    Named after `path` and this process, not by `tempfile`, whose files are private (0600) and would stay so.
    """
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield staged
    finally:
        staged.unlink(missing_ok=True)


def _onnx_runtime() -> Any:
    """onnxruntime, once the exporter's packages are known to be there."""
    try:
        import onnx  # noqa: F401 - needed by torch's exporter
        import onnxruntime
        import onnxscript  # noqa: F401 - needed by torch's exporter
    except ImportError as e:
        raise ConfigError(f"ONNX export needs onnx, onnxscript and onnxruntime ({e.name} is missing): "
                          "pip install 'effnet-finetune[export]'") from None
    return onnxruntime


def writable_file(path: Path) -> Path:
    """`path`, its folder created; a one-line error if nothing can be written there (checked before exporting)."""
    if path.is_dir():
        raise ConfigError(f"--output '{path}' is a folder; give a file name, e.g. {path / 'model.onnx'}")
    writable_folder(path.parent)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a finetune checkpoint for deployment, with its card beside it "
                                                 "(<output>.json), or as a timm / Hugging Face hub folder (--format hub).")
    parser.add_argument("checkpoint", help="a .ckpt written by finetune (best or last.ckpt)")
    parser.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    parser.add_argument("--output", required=True, help="the file to write, e.g. deploy/model.onnx; for hub, a folder")
    parser.add_argument("--push", metavar="USER/NAME", help="hub only: upload the checked folder to this Hugging Face "
                                                            "repository (needs network and hf auth login or HF_TOKEN)")
    args = parser.parse_args(argv)
    with user_errors():
        card = export(args.checkpoint, args.format.lower(), args.output, args.push)
    output = Path(args.output).expanduser()
    wrote = (f"{output}/ ({', '.join(card['files'])}; timm {card['architecture']})" if card["format"] == "hub"
             else f"{output} and {card_path(output)}")
    print(f"wrote {wrote} ({card['variant']}, {card['num_classes']} classes, "
          f"{card['resolution']}x{card['resolution']}, padding {card['padding']})")
    check = card.get("check")
    if check:
        print(f"check: {check['runtime']} vs PyTorch on a batch of {check['batch']}: max relative error "
              f"{check['max_relative_error']:.2e} (limit {check['limit']:.0e}): ok")
    if card.get("pushed"):
        print(f"pushed to {args.push}: {card['pushed']}")
    if card["format"] == "torchscript":
        print("note: PyTorch deprecates TorchScript (torch.jit); --format onnx is the portable choice")
    print(f"next: {_how_to_load(card, output)}")


def _how_to_load(card: dict[str, Any], output: Path) -> str:
    """The line a user runs next to use what was written."""
    if card["format"] == "hub":
        return f'timm.create_model("local-dir:{output}", pretrained=True)  (README.md in the folder: the model card)'
    if card["format"] == "safetensors":
        return (f'finetune.create_model("{card["variant"]}", {card["num_classes"]}, pretrained="{output}") '
                f"(prepare images as {card_path(output)} says)")
    runtime = "onnxruntime.InferenceSession" if card["format"] == "onnx" else "torch.jit.load"
    return f'{runtime}("{output}"), images prepared as {card_path(output)} says'


if __name__ == "__main__":
    main()
