"""`finetune-evaluate`: what a trained checkpoint says about images, with class names.

    finetune-evaluate outputs/train/<time>/checkpoints/last.ckpt photo.jpg more/images/ --top-k 3
    finetune-evaluate outputs/train/<time>/checkpoints/<best>.ckpt data/pets/val --output eval/

One folder holding a sub-folder per class (named as in training) is labelled: the checkpoint is
scored on it and --output receives report.json, report.md, confusion.npy, confusion_matrix.png,
reliability.png, errors.png and predictions.csv. Any other input gets top-k predictions per image.

It runs on the GPU when there is one (--device), under autocast there (--precision), and keeps per
image only its top-k classes and probabilities and its label; the metrics are updated batch by
batch. Keeping every probability would cost 3.8 GB at 1M images × 1,000 classes.
A folder that is the checkpoint's own training data is warned of: its accuracy is not held out.

Images get the same evaluation preprocessing as training's validation split, read from the
checkpoint (resize with the weights' interpolation, centre crop, mean/std including data
overrides), so predictions match val: on the val folder, the accuracy is training's val/acc.
Folders are listed by training's rule (hidden files and folders, such as macOS' `._x.jpg`, are
skipped). An unreadable image stops the evaluation naming it, unless --skip-corrupt leaves it
out (and counts it in the report): never replaced by another image, which would bias the scores.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import shlex
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from finetune.analysis.reports import (
    confusion_figure,
    errors_figure,
    markdown_report,
    plt,
    reliability_figure,
    report_metrics,
    summarize,
)
from finetune.datamodules.images import IMAGE_EXTENSIONS, ImageFileDataset, UnreadableImage, WorkerCorruptImageError
from finetune.datamodules.index import PathArray, class_folders, image_files, scan
from finetune.datamodules.splits import split_identity
from finetune.errors import ConfigError, user_errors
from finetune.fileio import writable_folder
from finetune.models.preprocessing import Preprocessing
from finetune.models.weights import load_safely
from finetune.training.module import FineTuneModule

#: Most confident mistakes shown in errors.png.
ERRORS_SHOWN = 16
REPORT_FILES = ("report.json", "report.md", "confusion.npy", "confusion_matrix.png", "reliability.png", "errors.png",
                "predictions.csv")
#: Up to this many classes report.json holds the confusion matrix itself; above, it points to confusion.npy
#: (at 1,000 classes the dense matrix would be a million numbers, ~9 MB of indented JSON).
INLINE_CONFUSION_CLASSES = 50
#: Lightning's names: what `trainer.precision` may say, and so what a user would pass.
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


@dataclass(frozen=True)
class Inference:
    """Where the network runs and in which precision, as training's validation ran it."""

    device: torch.device
    precision: str

    @classmethod
    def choose(cls, device: str | None = None, precision: str | None = None) -> Inference:
        """The GPU when there is one; there, the precision `train.trainer_kwargs` defaults to, float32 on the CPU.

        Checkpoints do not record `trainer.precision` (bf16-mixed and 32-true leave the same keys), so the
        default is what training picks by default on this device; --precision states another.
        """
        chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA GPU is available here; drop --device or pass --device cpu")
        if precision is None:
            native_bf16 = chosen.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
            precision = ("bf16-mixed" if native_bf16 else "16-mixed") if chosen.type == "cuda" else "32-true"
        if precision not in PRECISIONS or (precision == "16-mixed" and chosen.type != "cuda"):
            raise ConfigError(f"--precision {precision} on {chosen.type}: choose one of "
                              f"{', '.join(p for p in PRECISIONS if chosen.type == 'cuda' or p != '16-mixed')}")
        return cls(chosen, precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast as Lightning's mixed precision does it; nothing for 32-true."""
        if self.precision == "32-true":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16-mixed" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)


@dataclass
class Scores:
    """What evaluation keeps of a pass: per image its top-k (class, probability) and label; the metrics' results.

    O(N·k): the N×C probabilities are dropped batch by batch, after the metrics took them.
    """

    top_probs: Tensor  # N×k float32, largest first
    top_classes: Tensor  # N×k int32 class indices, in the order of top_probs
    labels: Tensor  # N int64
    metrics: dict[str, Tensor] | None  # computed `report_metrics`; None for unlabelled images

    @property
    def confidence(self) -> Tensor:
        """Each image's probability of its predicted class."""
        return self.top_probs[:, 0]

    @property
    def predicted(self) -> Tensor:
        return self.top_classes[:, 0].long()


class ScoreKeeper:
    """Updates the report's metrics with each batch of probabilities and keeps only each image's top-k and label.

    k = max(5, `top_k`) (capped at the class count): predictions.csv lists the top 5. The metrics
    live on the probabilities' device; what is kept goes to the CPU, into arrays allocated once for
    `images` rows: kept as a list of small per-batch tensors, they pinned the freed probability
    batches in the heap and the process grew with the images (`benchmarks/RESULTS.md`).
    """

    def __init__(self, num_classes: int, top_k: int, device: torch.device, labelled: bool = True,
                 images: int = 0) -> None:
        self.k = min(max(5, top_k), num_classes)
        self.metrics = report_metrics(num_classes).to(device) if labelled else None
        self._kept = 0
        self._probs = torch.empty(images, self.k)
        self._classes = torch.empty(images, self.k, dtype=torch.int32)
        self._labels = torch.empty(images, dtype=torch.int64)

    def update(self, probs: Tensor, labels: Tensor) -> None:
        """Take one batch: softmax probabilities (B×C, float32) and integer labels (B)."""
        if self.metrics is not None:
            self.metrics.update(probs, labels.to(probs.device))
        top = probs.topk(self.k, dim=-1)
        begin, end = self._kept, self._kept + len(probs)
        if end > len(self._labels):  # more images than announced: grow geometrically (rare: announced is exact)
            size = max(end, 2 * len(self._labels))
            self._probs, self._classes, self._labels = (
                torch.cat([t[:begin], t.new_empty(size - begin, *t.shape[1:])])
                for t in (self._probs, self._classes, self._labels))
        self._probs[begin:end] = top.values
        self._classes[begin:end] = top.indices
        self._labels[begin:end] = labels
        self._kept = end

    def scores(self) -> Scores:
        metrics = None if self.metrics is None else {k: v.cpu() for k, v in self.metrics.compute().items()}
        n = self._kept
        return Scores(self._probs[:n].clone(), self._classes[:n].clone(), self._labels[:n].clone(), metrics)


@dataclass
class Predictions(Scores):
    """A checkpoint's kept scores over a dataset (`Scores`), and the means to show what the network saw."""

    items: list[str]
    class_names: list[str]
    dataset: Dataset
    #: A batch of `dataset`'s items, collated by its `collate_fn` if it has one -> (network input, labels).
    transform: Callable[[Any], tuple[Tensor, Tensor]]
    preprocessing: Preprocessing
    inference: Inference
    skipped: list[str] = field(default_factory=list)  # unreadable files left out (--skip-corrupt)
    #: Why the images are the checkpoint's training data (`training_data`), None if they are not.
    training_data: str | None = None

    def network_view(self, indices: list[int]) -> Tensor:
        """The inputs of these items as [0, 1] images, after resize and crop."""
        if not indices:
            return torch.empty(0, 3, 1, 1)
        # Collated as the loader does: with data.decode=device, items are file bytes the transform decodes.
        collate = getattr(self.dataset, "collate_fn", None) or default_collate
        x, _ = self.transform(collate([self.dataset[i] for i in indices]))
        return self.preprocessing.denormalize(x)


@torch.no_grad()
def predict(module: FineTuneModule, batches: Iterable[Any], to_input: Callable[[Any], tuple[Tensor, Tensor]],
            channels_last: bool = True, inference: Inference | None = None, top_k: int = 5,
            labelled: bool = True, images: int = 0) -> Scores:
    """The kept `Scores` of `batches`, in their order: metrics updated per batch, top-k and labels per image.

    Each batch goes to the device first and `to_input` then turns it into (network input, labels),
    as Lightning's transfer and training's device transform do. `channels_last` as training's
    validation had it (the datamodules default to it), so even near-ties between classes resolve
    as they did when val/acc was logged. Logits are softmaxed in float32, as `TestReport` does.
    `images`: how many `batches` hold, when known; what is kept is allocated once for them.
    """
    inference = inference or Inference.choose()
    model = module.model.eval().to(inference.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    keeper = ScoreKeeper(module.model.num_classes, top_k, inference.device, labelled, images)
    for batch in batches:
        x, y = to_input(move_data_to_device(batch, inference.device))
        with inference.autocast():
            logits = model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
        keeper.update(logits.float().softmax(-1), torch.as_tensor(y))
    return keeper.scores()


def _normalized(preprocessing: Preprocessing) -> Callable[[Any], tuple[Tensor, Tensor]]:
    return lambda batch: (preprocessing.normalize(batch[0]), batch[1])


#: An evaluation item: (image or None if unreadable, label, position, None or why it is unreadable).
_Item = tuple[Tensor | None, int, int, str | None]


class EvaluationImages(Dataset):
    """(image, label, position, None), or for an unreadable file with `skip_corrupt` (None, label, position, reason).

    Evaluation leaves an unreadable file out rather than standing another image in for it as
    training does: a stand-in would be scored twice. Without `skip_corrupt` the error names
    this command's flag, --skip-corrupt.
    """

    def __init__(self, files: PathArray | Sequence[Path], labels: Sequence[int] | np.ndarray,
                 transform: Callable[[Any], Tensor], skip_corrupt: bool) -> None:
        self.images = ImageFileDataset(files, labels, transform)
        self.skip_corrupt = skip_corrupt

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, position: int) -> _Item:
        label = int(self.images.labels[position])
        try:
            return self.images.load(position), label, position, None
        except UnreadableImage as error:
            if not self.skip_corrupt:
                raise WorkerCorruptImageError(
                    f"cannot decode image '{self.images.files[position]}': {error}; replace or delete it, "
                    "or pass --skip-corrupt to leave unreadable images out"
                ) from None
            return None, label, position, str(error)


def _readable_batch(items: list[_Item]) -> tuple[Tensor | None, Tensor, list[int], dict[int, str]]:
    """(images, labels, positions) of the readable items, and {position: reason} of the others."""
    readable = [item for item in items if item[0] is not None]
    images = torch.stack([item[0] for item in readable]) if readable else None
    labels = torch.tensor([item[1] for item in readable], dtype=torch.int64)
    return images, labels, [item[2] for item in readable], {item[2]: item[3] for item in items if item[0] is None}


def predict_images(module: FineTuneModule, dataset: EvaluationImages, batch_size: int, num_workers: int,
                   inference: Inference, top_k: int = 5, labelled: bool = True) -> tuple[Scores, list[int]]:
    """The kept scores of the readable images of `dataset`, and their positions; the others are warned of."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_readable_batch,
                        pin_memory=inference.device.type == "cuda")
    files = dataset.images.files
    kept: list[int] = []

    def readable() -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels, positions, unreadable in loader:
            for position, reason in unreadable.items():
                warnings.warn(f"skipping unreadable image '{files[position]}': {reason}", stacklevel=1)
            kept.extend(positions)
            if images is not None:
                yield images, labels
        if not kept:
            raise ConfigError(f"none of the {len(files)} images could be decoded (the first: '{files[0]}')")

    scores = predict(module, readable(), _normalized(module.preprocessing), inference=inference, top_k=top_k,
                     labelled=labelled, images=len(dataset))
    return scores, kept


def image_paths(inputs: list[str]) -> list[Path]:
    """Files as given, folders searched recursively for images by training's listing rule, in a stable order."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            paths += image_files(path, IMAGE_EXTENSIONS)
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


def training_data(checkpoint: Path, folder: Path, images: ImageFileDataset) -> str | None:
    """Why `folder` (listed and labelled as `images`) is the data `checkpoint` trained on, or None if it is not.

    Scored on its own training images, a checkpoint reports training accuracy as if it were held
    out. Two records tell: the datamodule's `root` (the folder is root/train, or root itself in the
    single layout, whose train split is carved from it), and the train split's identity
    (`split_identity`: relative paths and labels, so a copy elsewhere matches too). A partial
    overlap (a subset of the training files, or them mixed with others) is not detected.
    """
    ckpt = load_safely(checkpoint, mmap=True)
    root = (ckpt.get("datamodule_hyper_parameters") or {}).get("root")
    folder = folder.resolve()
    if root is not None and folder in (Path(root).expanduser().resolve(), Path(root).expanduser().resolve() / "train"):
        return f"it is the training data's folder (data.root '{root}')"
    recorded = [state["data"]["splits"]["train"] for state in ckpt.values()
                if isinstance(state, dict) and "train" in (state.get("data") or {}).get("splits", {})]
    if recorded and recorded[0]["count"] == len(images) and recorded[0] == split_identity(images):
        return "its files (relative paths) and labels are the checkpoint's recorded training split"
    return None


def folder_predictions(module: FineTuneModule, folder: Path, batch_size: int = 32, num_workers: int = 0,
                       skip_corrupt: bool = False, inference: Inference | None = None, top_k: int = 5,
                       checkpoint: Path | None = None) -> Predictions:
    """Predictions over `folder/<class>/**/<image>`, labelled by the checkpoint's class order.

    With `checkpoint` (the file `module` came from), a folder that is its training data is flagged (`training_data`).
    """
    names = module.class_names
    index = scan(folder, IMAGE_EXTENSIONS)  # the image-folder datamodule's own listing, decoding nothing
    if not len(index.paths):
        raise ConfigError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of '{folder}'")
    # Class folders are the checkpoint's classes (labelled_folder checked), maybe fewer of them.
    files, labels = index.paths, np.array([names.index(c) for c in index.classes])[index.class_ids]
    # Unreadable files are named when a worker reads them: no decode-everything pass first.
    preprocessing = module.preprocessing  # what training fed the network, as its checkpoint recorded
    dataset = EvaluationImages(files, labels, preprocessing.eval_transform(), skip_corrupt)
    trained_on = training_data(checkpoint, folder, dataset.images) if checkpoint is not None else None
    inference = inference or Inference.choose()
    scores, kept = predict_images(module, dataset, batch_size, num_workers, inference, top_k)
    skipped = [str(files[p]) for p in np.setdiff1d(np.arange(len(files)), kept)]
    files = files.take(np.array(kept))
    readable = ImageFileDataset(files, labels[kept], preprocessing.eval_transform())
    return Predictions(**vars(scores), items=[str(f) for f in files], class_names=names, dataset=readable,
                       transform=_normalized(preprocessing), preprocessing=preprocessing, inference=inference,
                       skipped=skipped, training_data=trained_on)


def split_predictions(checkpoint: str | Path, cfg: DictConfig, split: str = "val",
                      inference: Inference | None = None) -> Predictions:
    """Predictions of a checkpoint over a split of `cfg.data`, transformed exactly as training's loop does."""
    from finetune.build import build_datamodule

    module = FineTuneModule.from_checkpoint(checkpoint)
    datamodule = build_datamodule(cfg)
    if list(datamodule.class_names) != module.class_names:
        raise ConfigError(f"'{checkpoint}' was trained on other classes than {cfg.data._target_} at {cfg.data.get('root')}")
    datamodule.set_preprocessing(module.preprocessing)
    dataset = datamodule.dataset(split)
    transform = partial(datamodule.device_batch, train=False)  # decode=device too
    loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    inference = inference or Inference.choose()
    scores = predict(module, loader, transform, inference=inference, images=len(dataset),
                     channels_last=getattr(datamodule, "channels_last", False))  # as train.build_module sets it
    files = getattr(dataset, "files", None)
    items = [str(f) for f in files] if files is not None else [f"{split}[{i}]" for i in range(len(scores.labels))]
    return Predictions(**vars(scores), items=items, class_names=module.class_names, dataset=dataset,
                       transform=transform, preprocessing=module.preprocessing, inference=inference)


def evaluate(predictions: Predictions, output: Path | None = None) -> dict[str, Any]:
    """The classification report of `predictions`; with `output`, also its files (see REPORT_FILES)."""
    p = predictions
    confusion = p.metrics["confusion"]
    classes = len(p.class_names)
    report = {**summarize(p.metrics, p.class_names),
              # Up to INLINE_CONFUSION_CLASSES inline; above, where write_report puts it (relative to report.json).
              "confusion_matrix": confusion.tolist() if classes <= INLINE_CONFUSION_CLASSES
              else {"file": "confusion.npy", "shape": [classes, classes], "dtype": "int64"},
              "device": str(p.inference.device), "precision": p.inference.precision,
              "training_data": p.training_data,
              "unreadable_skipped": len(p.skipped), "unreadable_files": p.skipped}
    if output is not None:
        write_report(p, report, writable_folder(output))
    return report


def write_report(predictions: Predictions, report: dict[str, Any], output: Path) -> None:
    """The files of REPORT_FILES for `predictions` and their `report` into `output`, a folder that exists."""
    p = predictions
    (output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (output / "report.md").write_text(markdown_report(report))
    confusion = p.metrics["confusion"].long().numpy()
    np.save(output / "confusion.npy", confusion)
    _save(confusion_figure(confusion, p.class_names), output / "confusion_matrix.png")
    confidence, predicted = p.confidence, p.predicted
    _save(reliability_figure(confidence, predicted == p.labels, report["expected_calibration_error"]),
          output / "reliability.png")
    wrong = (predicted != p.labels).nonzero().flatten()
    worst = wrong[confidence[wrong].argsort(descending=True, stable=True)][:ERRORS_SHOWN].tolist()
    titles = [f"true: {p.class_names[p.labels[i]]}\npredicted: {p.class_names[predicted[i]]} ({confidence[i]:.2f})\n"
              f"{'/'.join(Path(p.items[i]).parts[-2:])}" for i in worst]
    _save(errors_figure(p.network_view(worst), titles), output / "errors.png")
    write_predictions_csv(p, output / "predictions.csv")


def write_predictions_csv(predictions: Predictions, path: Path) -> None:
    """file, true, predicted, probability (of the predicted class), top5 (JSON [[class, probability], ...])."""
    names = predictions.class_names
    values, indices = predictions.top_probs[:, :5], predictions.top_classes[:, :5]  # kept: at least the top 5
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("file", "true", "predicted", "probability", "top5"))
        for item, label, vs, ids in zip(predictions.items, predictions.labels.tolist(), values.tolist(), indices.tolist()):
            top = [[names[i], round(v, 6)] for v, i in zip(vs, ids)]
            writer.writerow((item, names[label], names[ids[0]], f"{vs[0]:.6f}", json.dumps(top)))


def _save(fig: plt.Figure, path: Path) -> None:
    fig.savefig(path, dpi=100)
    plt.close(fig)


def list_predictions(module: FineTuneModule, inputs: list[str], top_k: int, csv_path: Path | None,
                     batch_size: int, num_workers: int, skip_corrupt: bool = False,
                     inference: Inference | None = None) -> None:
    """Top-k (class, probability) per image as tab-separated rows; also to `csv_path` if given."""
    paths = image_paths(inputs)  # an unreadable one is named when it is read
    dataset = EvaluationImages(paths, [-1] * len(paths), module.preprocessing.eval_transform(), skip_corrupt)
    scores, kept = predict_images(module, dataset, batch_size, num_workers, inference or Inference.choose(), top_k,
                                  labelled=False)
    paths = [paths[p] for p in kept]
    names = module.class_names
    values, indices = scores.top_probs[:, :top_k], scores.top_classes[:, :top_k]
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
    skipped = report.get("unreadable_skipped", 0)
    return (f"{report['images']} images, {report['classes']} classes: accuracy {report['accuracy']:.4f}, "
            f"top-{report['top_k']} {report['top5_accuracy']:.4f}, "
            f"balanced {report['balanced_accuracy']:.4f}, macro F1 {report['macro_avg']['f1']:.4f}, "
            f"ECE {report['expected_calibration_error']:.4f}" + (f"; most confused: {pairs}" if pairs else "")
            + (f"; {skipped} unreadable image{'s' * (skipped > 1)} skipped" if skipped else ""))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Predict classes of images, or score a labelled folder, with a finetune checkpoint.")
    parser.add_argument("checkpoint", help="a .ckpt written by finetune (best or last.ckpt)")
    parser.add_argument("images", nargs="+", help="image files and/or folders, or one folder with a sub-folder per class")
    parser.add_argument("--output", type=Path, help="labelled folder: write the report, figures and predictions.csv here")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--csv", type=Path, help="unlabelled images: also write the predictions to this CSV file")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2, help="image-decoding processes")
    parser.add_argument("--skip-corrupt", action="store_true",
                        help="leave unreadable images out (named in warnings, counted in the report) instead of stopping")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is a GPU, else cpu)")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="default: 32-true on the CPU; on a GPU bf16-mixed where it is native, else 16-mixed, "
                             "as training defaults (checkpoints do not record the precision training used)")
    args = parser.parse_args(argv)
    with user_errors():
        if args.top_k < 1 or args.batch_size < 1 or args.num_workers < 0:
            raise ConfigError(f"need --top-k >= 1, --batch-size >= 1, --num-workers >= 0; "
                              f"got {args.top_k}, {args.batch_size}, {args.num_workers}")
        checkpoint = Path(args.checkpoint).expanduser()
        inference = Inference.choose(args.device, args.precision)
        module = FineTuneModule.from_checkpoint(checkpoint)
        folder = labelled_folder(args.images, module.class_names)
        if folder is None:
            if args.output:
                raise ConfigError("--output writes a report for a labelled folder (one sub-folder per class, named as "
                                  "in training); for other images use --csv")
            list_predictions(module, args.images, args.top_k, args.csv, args.batch_size, args.num_workers,
                             args.skip_corrupt, inference)
            return
        if args.csv:
            raise ConfigError(f"'{folder}' is labelled (class sub-folders): its predictions go to "
                              "<--output>/predictions.csv; drop --csv")
        output = writable_folder(args.output) if args.output else None  # fail before the long part
        predictions = folder_predictions(module, folder, args.batch_size, args.num_workers, args.skip_corrupt,
                                         inference, args.top_k, checkpoint)
        if predictions.training_data:
            print(f"warning: '{folder}' is the checkpoint's training data ({predictions.training_data}): its scores "
                  "are training scores, not held-out ones", file=sys.stderr)
        report = evaluate(predictions)
        if output:
            write_report(predictions, report, output)
        print(summary(report))
        if output:
            print(f"written to {output}: {', '.join(REPORT_FILES)} (start with {output / 'report.md'})")
        print(f"next: finetune-export {shlex.quote(str(checkpoint))} --format onnx --output <folder>/model.onnx")


if __name__ == "__main__":
    main()
