"""`finetune-evaluate`: what a trained checkpoint says about images, with class names.

    finetune-evaluate outputs/train/<time>/checkpoints/last.ckpt photo.jpg more/images/ --top-k 3
    finetune-evaluate outputs/train/<time>/checkpoints/<best>.ckpt data/pets/val --output eval/

One folder holding a sub-folder per class (named as in training) is labelled: the checkpoint is
scored on it and --output receives report.json, report.md, confusion_matrix.png,
reliability.png, errors.png and predictions.csv. Any other input gets top-k predictions per image.

Images get the same evaluation preprocessing as training's validation split, read from the
checkpoint (resize with the weights' interpolation, centre crop, mean/std including data
overrides), so predictions match val: on the val folder, the accuracy is training's val/acc.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from finetune.datamodules.images import IMAGE_EXTENSIONS, ImageFileDataset
from finetune.datamodules.index import class_folders, scan
from finetune.errors import ConfigError, user_errors
from finetune.models.preprocessing import Preprocessing
from finetune.module import FineTuneModule
from finetune.reports import (
    classification_report,
    confusion_figure,
    errors_figure,
    markdown_report,
    plt,
    reliability_figure,
)

#: Most confident mistakes shown in errors.png.
ERRORS_SHOWN = 16
REPORT_FILES = ("report.json", "report.md", "confusion_matrix.png", "reliability.png", "errors.png", "predictions.csv")


@dataclass
class Predictions:
    """A checkpoint's softmax outputs over a dataset, and the means to show what the network saw."""

    probs: Tensor
    labels: Tensor
    items: list[str]
    class_names: list[str]
    dataset: Dataset
    transform: Callable[[Tensor], Tensor]
    preprocessing: Preprocessing

    def network_view(self, indices: list[int]) -> Tensor:
        """The inputs of these items as [0, 1] images, after resize and crop."""
        if not indices:
            return torch.empty(0, 3, 1, 1)
        images = torch.stack([torch.as_tensor(self.dataset[i][0]) for i in indices])
        return self.preprocessing.denormalize(self.transform(images))


@torch.no_grad()
def predict(module: FineTuneModule, batches: Iterable[Any], to_input: Callable[[Any], tuple[Tensor, Tensor]],
            channels_last: bool = True) -> tuple[Tensor, Tensor]:
    """Softmax probabilities (N×C) and labels (N) over `batches`, in their order.

    `to_input` turns a loader batch into (network input, labels), as training's device
    transform does. `channels_last` as training's validation had it (the datamodules default
    to it), so even near-ties between classes resolve as they did when val/acc was logged.
    """
    model = module.model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    probs, labels = [], []
    for batch in batches:
        x, y = to_input(batch)
        probs.append(model(x.contiguous(memory_format=torch.channels_last) if channels_last else x).softmax(-1))
        labels.append(torch.as_tensor(y))
    return torch.cat(probs), torch.cat(labels)


def _normalized(preprocessing: Preprocessing) -> Callable[[Any], tuple[Tensor, Tensor]]:
    return lambda batch: (preprocessing.normalize(batch[0]), batch[1])


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


def labelled_folder(inputs: list[str], names: list[str]) -> Path | None:
    """The folder, if `inputs` is one folder whose sub-folders are named after the checkpoint's classes.

    Hidden folders are skipped, as the image-folder datamodule does. A mix of class and other
    folders is refused: it is a mislabelled tree more often than a deliberate one.
    """
    if len(inputs) != 1 or not Path(inputs[0]).expanduser().is_dir():
        return None
    folder = Path(inputs[0]).expanduser()
    subfolders = {p.name for p in class_folders(folder)}
    if not subfolders & set(names):
        return None
    unknown = sorted(subfolders - set(names))
    if unknown:
        raise ConfigError(
            f"'{folder}' mixes class folders with folders the checkpoint has no class for "
            f"({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}); its classes are {', '.join(names[:10])}"
            f"{', ...' if len(names) > 10 else ''}: rename or move the others"
        )
    return folder


def folder_predictions(module: FineTuneModule, folder: Path, batch_size: int = 32, num_workers: int = 0) -> Predictions:
    """Predictions over `folder/<class>/**/<image>`, labelled by the checkpoint's class order."""
    names = module.class_names
    index = scan(folder, IMAGE_EXTENSIONS)  # the image-folder datamodule's own listing, decoding nothing
    if not len(index.paths):
        raise ConfigError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of '{folder}'")
    # Class folders are the checkpoint's classes (labelled_folder checked), maybe fewer of them.
    files, labels = index.paths, np.array([names.index(c) for c in index.classes])[index.class_ids]
    # Unreadable files are named when a worker reads them: no decode-everything pass first.
    preprocessing = module.preprocessing  # what training fed the network, as its checkpoint recorded
    dataset = ImageFileDataset(files, labels, preprocessing.eval_transform())
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    probs, targets = predict(module, loader, _normalized(preprocessing))
    return Predictions(probs, targets, [str(f) for f in files], names, dataset, preprocessing.normalize, preprocessing)


def split_predictions(checkpoint: str | Path, cfg: DictConfig, split: str = "val") -> Predictions:
    """Predictions of a checkpoint over a split of `cfg.data`, transformed exactly as training's loop does."""
    from finetune.train import build_datamodule

    module = FineTuneModule.from_checkpoint(checkpoint)
    datamodule = build_datamodule(cfg)
    if list(datamodule.class_names) != module.class_names:
        raise ConfigError(f"'{checkpoint}' was trained on other classes than {cfg.data._target_} at {cfg.data.get('root')}")
    datamodule.set_preprocessing(module.preprocessing)
    dataset = datamodule.dataset(split)
    transform = partial(datamodule.device_transform, train=False)
    loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    probs, labels = predict(module, loader, partial(datamodule.device_batch, train=False),  # decode=device too
                            channels_last=getattr(datamodule, "channels_last", False))  # as train.build_module sets it
    files = getattr(dataset, "files", None)
    items = [str(f) for f in files] if files is not None else [f"{split}[{i}]" for i in range(len(labels))]
    return Predictions(probs, labels, items, module.class_names, dataset, transform, module.preprocessing)


def evaluate(predictions: Predictions, output: Path | None = None) -> dict[str, Any]:
    """The classification report of `predictions`; with `output`, also its files (see REPORT_FILES)."""
    p = predictions
    report = classification_report(p.probs, p.labels, p.class_names)
    if output is not None:
        write_report(p, report, writable_folder(output))
    return report


def write_report(predictions: Predictions, report: dict[str, Any], output: Path) -> None:
    """The files of REPORT_FILES for `predictions` and their `report` into `output`, a folder that exists."""
    p = predictions
    (output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (output / "report.md").write_text(markdown_report(report))
    _save(confusion_figure(report["confusion_matrix"], p.class_names), output / "confusion_matrix.png")
    _save(reliability_figure(p.probs, p.labels, report["expected_calibration_error"]), output / "reliability.png")
    confidence, predicted = p.probs.max(1)
    wrong = (predicted != p.labels).nonzero().flatten()
    worst = wrong[confidence[wrong].argsort(descending=True, stable=True)][:ERRORS_SHOWN].tolist()
    titles = [f"true: {p.class_names[p.labels[i]]}\npredicted: {p.class_names[predicted[i]]} ({confidence[i]:.2f})\n"
              f"{'/'.join(Path(p.items[i]).parts[-2:])}" for i in worst]
    _save(errors_figure(p.network_view(worst), titles), output / "errors.png")
    write_predictions_csv(p, output / "predictions.csv")


def write_predictions_csv(predictions: Predictions, path: Path) -> None:
    """file, true, predicted, probability (of the predicted class), top5 (JSON [[class, probability], ...])."""
    names = predictions.class_names
    values, indices = predictions.probs.topk(min(5, len(names)), dim=-1)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("file", "true", "predicted", "probability", "top5"))
        for item, label, vs, ids in zip(predictions.items, predictions.labels.tolist(), values.tolist(), indices.tolist()):
            top = [[names[i], round(v, 6)] for v, i in zip(vs, ids)]
            writer.writerow((item, names[label], names[ids[0]], f"{vs[0]:.6f}", json.dumps(top)))


def writable_folder(path: Path) -> Path:
    """`path`, created if needed; a one-line error where it cannot be, or where it refuses new files."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # an existing folder may still refuse files
            pass
    except OSError as e:
        raise ConfigError(f"cannot write to '{path}': {e.strerror or e}; choose another --output") from None
    return path


def _save(fig: plt.Figure, path: Path) -> None:
    fig.savefig(path, dpi=100)
    plt.close(fig)


def list_predictions(module: FineTuneModule, inputs: list[str], top_k: int, csv_path: Path | None,
                     batch_size: int, num_workers: int) -> None:
    """Top-k (class, probability) per image as tab-separated rows; also to `csv_path` if given."""
    paths = image_paths(inputs)  # an unreadable one is named when it is read
    preprocessing = module.preprocessing
    dataset = ImageFileDataset(paths, [-1] * len(paths), preprocessing.eval_transform())
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    probs, _ = predict(module, loader, _normalized(preprocessing))
    names = module.class_names
    values, indices = probs.topk(min(top_k, len(names)), dim=-1)
    rows = [(str(path), rank + 1, names[i], f"{v:.4f}") for path, vs, ids in zip(paths, values.tolist(), indices.tolist())
            for rank, (v, i) in enumerate(zip(vs, ids))]
    header = ("image", "rank", "class", "probability")
    writer = csv.writer(sys.stdout, delimiter="\t")
    writer.writerows([header, *rows])
    if csv_path:
        with csv_path.open("w", newline="") as f:
            csv.writer(f).writerows([header, *rows])


def summary(report: dict[str, Any]) -> str:
    pairs = ", ".join(f"{p['true']} -> {p['predicted']} ({p['count']})" for p in report["most_confused"][:3])
    return (f"{report['images']} images, {report['classes']} classes: accuracy {report['accuracy']:.4f}, "
            f"top-{report['top_k']} {report['top5_accuracy']:.4f}, macro F1 {report['macro_avg']['f1']:.4f}, "
            f"ECE {report['expected_calibration_error']:.4f}" + (f"; most confused: {pairs}" if pairs else ""))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Predict classes of images, or score a labelled folder, with a finetune checkpoint.")
    parser.add_argument("checkpoint", help="a .ckpt written by finetune (best or last.ckpt)")
    parser.add_argument("images", nargs="+", help="image files and/or folders, or one folder with a sub-folder per class")
    parser.add_argument("--output", type=Path, help="labelled folder: write the report, figures and predictions.csv here")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--csv", type=Path, help="unlabelled images: also write the predictions to this CSV file")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2, help="image-decoding processes")
    args = parser.parse_args(argv)
    with user_errors():
        if args.top_k < 1 or args.batch_size < 1 or args.num_workers < 0:
            raise ConfigError(f"need --top-k >= 1, --batch-size >= 1, --num-workers >= 0; "
                              f"got {args.top_k}, {args.batch_size}, {args.num_workers}")
        module = FineTuneModule.from_checkpoint(Path(args.checkpoint).expanduser())
        folder = labelled_folder(args.images, module.class_names)
        if folder is None:
            if args.output:
                raise ConfigError("--output writes a report for a labelled folder (one sub-folder per class, named as "
                                  "in training); for other images use --csv")
            list_predictions(module, args.images, args.top_k, args.csv, args.batch_size, args.num_workers)
            return
        if args.csv:
            raise ConfigError(f"'{folder}' is labelled (class sub-folders): its predictions go to "
                              "<--output>/predictions.csv; drop --csv")
        output = writable_folder(args.output) if args.output else None  # fail before the long part
        predictions = folder_predictions(module, folder, args.batch_size, args.num_workers)
        report = evaluate(predictions)
        if output:
            write_report(predictions, report, output)
        print(summary(report))
        if output:
            print(f"written to {output}: {', '.join(REPORT_FILES)}")


if __name__ == "__main__":
    main()
