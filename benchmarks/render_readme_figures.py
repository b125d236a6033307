"""The README's figures (docs/images/), from one real run: `make demo`'s comparison, then the full policy's
best checkpoint evaluated on the digits' test split. Offline; as long as `make demo` and one evaluation.

    .venv/bin/python benchmarks/render_readme_figures.py            # writes docs/images/*.png
    .venv/bin/python benchmarks/render_readme_figures.py --keep runs/readme   # and keeps the run there
    .venv/bin/python benchmarks/render_readme_figures.py --copy-from runs/readme   # only copy a kept run's figures

The commands' own PNGs (110 and 100 dpi) are scaled to 80 dpi, so the pictures stay small in the
repository (no palette: 256 colours band the Grad-CAM colour bar); the figures themselves are the commands' own.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from PIL import Image

from finetune.commands.compare import compare, compose
from finetune.commands.evaluate import evaluate, split_predictions

IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"
#: The run: the demo experiment, four images in the Grad-CAM figure.
OVERRIDES = ["experiment=demo", "trainer.enable_progress_bar=false", "compare.cam_images=4"]
#: Each figure, the folder of the run it is in, and the dpi its command saves it at.
FIGURES = {"comparison.png": ("", 110), "comparison_frontier.png": ("", 110), "comparison_cam.png": ("", 110),
           "confusion_matrix.png": ("evaluate", 100), "reliability.png": ("evaluate", 100),
           "errors.png": ("evaluate", 100)}
DPI = 80


def render(out: Path) -> None:
    """Run the comparison and the evaluation into `out`, and copy their figures, scaled, to docs/images/."""
    results = compare(OVERRIDES, out)
    full = next(r for r in results if r.policy == "full")
    evaluate(split_predictions(full.best_checkpoint, compose(OVERRIDES), "test"), out / "evaluate")
    copy_figures(out)


def copy_figures(out: Path) -> None:
    """The figures of a run made by `render` in `out`, scaled to DPI, into docs/images/."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    for name, (folder, dpi) in FIGURES.items():
        image = Image.open(out / folder / name).convert("RGB")
        size = (round(image.width * DPI / dpi), round(image.height * DPI / dpi))
        image = image.resize(size, Image.LANCZOS)
        image.save(IMAGES / name, optimize=True)
        print(f"{IMAGES / name}: {size[0]}x{size[1]}, {(IMAGES / name).stat().st_size / 1024:.0f} kB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="run into this folder and keep it (default: a temporary one)")
    parser.add_argument("--copy-from", type=Path, help="no run: copy the figures of one kept with --keep")
    args = parser.parse_args()
    if args.copy_from:
        copy_figures(args.copy_from)
        return
    if args.keep:
        render(args.keep)
        return
    with tempfile.TemporaryDirectory() as tmp:
        render(Path(tmp))


if __name__ == "__main__":
    main()
