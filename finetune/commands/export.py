"""`finetune-export`: a checkpoint as ONNX, TorchScript or safetensors, with what deployment needs beside it.

    finetune-export outputs/train/<time>/checkpoints/last.ckpt --format onnx --output deploy/model.onnx

The formats and their card are `finetune.exporting.formats`'; `--format hub` writes a timm model
folder instead (`finetune.exporting.hub`). Both files are written under temporary names and
renamed once the check against PyTorch has passed, so a failed export leaves the output folder
as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from finetune.errors import ConfigError, user_errors
from finetune.exporting.formats import (
    CHECK_BATCH,
    FORMATS,
    PARITY_LIMIT,
    ExportMismatchError,
    card_path,
    check_onnx,
    check_torchscript,
    export_onnx,
    export_safetensors,
    export_torchscript,
    model_card,
    onnx_runtime,
)
from finetune.fileio import writable_folder

if TYPE_CHECKING:
    pass


def export(checkpoint: str | Path, fmt: str, output: str | Path, push: str | None = None) -> dict[str, Any]:
    """Write `output` in `fmt` and its card beside it; the card's content, with the check's result.

    `fmt="hub"`: the timm folder `output`, uploaded to the hub repository `push` if given (`finetune.exporting.hub`).
    Nothing is written where the check fails: a previous export at `output` stays as it was.
    """
    # Imported here: Lightning and torchmetrics (which imports matplotlib) load only to read a checkpoint.
    from finetune.training.module import FineTuneModule

    if fmt not in FORMATS:
        raise ConfigError(f"unknown format '{fmt}'; valid: {', '.join(FORMATS)}")
    if fmt == "hub":
        from finetune.exporting.hub import export_hub  # imports timm, which the other formats do without

        return export_hub(checkpoint, output, push)
    if push is not None:
        raise ConfigError("--push uploads a timm model folder to the Hugging Face hub: add --format hub")
    runtime = f"onnxruntime {onnx_runtime().__version__} (CPU)" if fmt == "onnx" else f"torch.jit {torch.__version__}"
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
