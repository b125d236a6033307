"""`finetune-evaluate`: what a trained checkpoint says about images, with class names.

    finetune-evaluate outputs/train/<time>/checkpoints/last.ckpt photo.jpg more/images/ --top-k 3

Images get the same evaluation preprocessing as training's validation split, read from the
checkpoint (resize with the weights' interpolation, centre crop, mean/std including data
overrides), so predictions match val.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from datamodules.images import IMAGE_EXTENSIONS
from finetune.errors import ConfigError, user_errors
from finetune.module import FineTuneModule


def image_paths(inputs: list[str]) -> list[Path]:
    """Files as given, folders searched recursively for images, in a stable order."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            paths.append(path)
        else:
            raise ConfigError(f"no such image or folder: '{item}'")
    if not paths:
        raise ConfigError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {', '.join(inputs)}")
    return paths


@torch.no_grad()
def predict(module: FineTuneModule, paths: list[Path], top_k: int = 5, batch_size: int = 32) -> list[list[tuple[str, float]]]:
    """Top-k (class name, probability) per image."""
    model = module.model.eval()
    preprocessing = module.preprocessing  # what training fed the network, as its checkpoint recorded
    transform = preprocessing.eval_transform()
    names = module.hparams.get("class_names") or [str(i) for i in range(model.num_classes)]
    k = min(top_k, model.num_classes)
    results = []
    for start in range(0, len(paths), batch_size):
        batch = []
        for path in paths[start:start + batch_size]:
            try:
                with Image.open(path) as img:
                    batch.append(transform(img.convert("RGB")))
            except (UnidentifiedImageError, OSError) as e:
                raise ConfigError(f"cannot read image '{path}': {e}") from None
        x = preprocessing.normalize(torch.stack(batch))
        probs = model(x).softmax(-1)
        values, indices = probs.topk(k, dim=-1)
        results += [[(names[i], float(v)) for v, i in zip(vs, ids)] for vs, ids in zip(values.tolist(), indices.tolist())]
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Predict classes of images with a finetune checkpoint.")
    parser.add_argument("checkpoint", help="a .ckpt written by finetune (best or last.ckpt)")
    parser.add_argument("images", nargs="+", help="image files and/or folders")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--csv", type=Path, help="also write predictions to this CSV file")
    args = parser.parse_args(argv)
    with user_errors():
        if args.top_k < 1:
            raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
        module = FineTuneModule.from_checkpoint(Path(args.checkpoint).expanduser())
        paths = image_paths(args.images)
        predictions = predict(module, paths, args.top_k)
        rows = [(str(p), rank + 1, name, f"{prob:.4f}") for p, preds in zip(paths, predictions)
                for rank, (name, prob) in enumerate(preds)]
        writer = csv.writer(sys.stdout, delimiter="\t")
        writer.writerow(("image", "rank", "class", "probability"))
        writer.writerows(rows)
        if args.csv:
            with args.csv.open("w", newline="") as f:
                csv.writer(f).writerows([("image", "rank", "class", "probability"), *rows])


if __name__ == "__main__":
    main()
