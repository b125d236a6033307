"""LP-FT (`finetune=lpft`) against full, frozen and the probe at the same epochs, and `optim.backbone_lr_scale`.

Each case is one `finetune` command, run in its own process back to back on the same data, seed
and epochs; the table gives its best validation accuracy, test accuracy, the probe's own
validation accuracy for lpft, and wall time (process start to exit). Two datasets:

- `details`: real photos, 12 classes, one scikit-image sample photo per class (eight colour
  photos, four greyscale textures), all made greyscale; each image is a random crop of 5-15 %
  of the photo's shorter side (aspect 3:4 to 4:3), resized to 128 px and saved as JPEG: a
  detail, not the scene, so colour and layout give the class away less. 40 train, 20 val and
  20 test crops per class (480 / 240 / 240), written to a temporary image folder; Lite0
  weights, 96 px, batch 32, 3 epochs, everything else at its default.
- `photos`: the same with colour kept and crops of 30-70 % (too easy: `full` reached 0.992 val
  after one epoch; kept to compare with earlier runs).
- `digits`: `experiment=demo` (scikit-learn's digits, Lite0, 96 px, batch 32, 3 epochs, lr 1e-2).

    .venv/bin/python benchmarks/bench_lpft.py                         # details and digits, every case
    .venv/bin/python benchmarks/bench_lpft.py --sets details --cases full lpft
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import skimage.data
from PIL import Image

from common import RESULTS_DIR, machine_info, markdown_table, write_json

SCRIPT = "bench_lpft.py"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "camera", "brick", "grass", "gravel", "coins")
SPLITS = (("train", 40), ("val", 20), ("test", 20))
#: Case name -> the overrides that make it; every case also gets its set's overrides.
CASES: dict[str, list[str]] = {
    "full": ["finetune=full"],
    "frozen": ["finetune=frozen", "data.augment=false", "finetune.cache_features=true"],
    "probe": ["finetune=probe", "data.augment=false"],
    "lpft": ["finetune=lpft"],
    "full, backbone_lr_scale=0.1": ["finetune=full", "optim.backbone_lr_scale=0.1"],  # the default before issue 24
    "lpft, backbone_lr_scale=0.1": ["finetune=lpft", "optim.backbone_lr_scale=0.1"],
}


def write_photos(root: Path, sides: tuple[float, float] = (0.3, 0.7), grey: bool = False, size: int = 128,
                 seed: int = 0) -> Path:
    """root/<split>/<photo>/<n>.jpg: random crops (sides a `sides` fraction of the photo's shorter side) of each
    sample photo, every split drawn independently; `grey`: every photo in grey levels (ITU-R 601 luma)."""
    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        photo = getattr(skimage.data, name)()
        photo = np.stack([photo] * 3, axis=-1) if photo.ndim == 2 else photo[..., :3]
        if grey:
            photo = np.repeat((photo.astype(np.float64) @ [0.299, 0.587, 0.114]).astype(np.uint8)[..., None], 3, axis=-1)
        h, w = photo.shape[:2]
        for split, count in SPLITS:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                side = rng.uniform(*sides) * min(h, w)
                aspect = rng.uniform(3 / 4, 4 / 3)
                ch, cw = min(h, int(side * aspect ** 0.5)), min(w, int(side / aspect ** 0.5))
                y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
                crop = Image.fromarray(photo[y:y + ch, x:x + cw]).resize((size, size), Image.BICUBIC)
                crop.save(folder / f"{n:03d}.jpg", quality=90)
    return root


def run_case(overrides: list[str], out: Path) -> dict[str, Any]:
    """One `finetune` process; its metrics.json and wall time."""
    finetune = Path(sys.executable).with_name("finetune")
    command = [str(finetune), *overrides, "trainer=cpu", "trainer.enable_progress_bar=false", f"hydra.run.dir={out}"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"best val acc": metrics.get("best_val_acc"), "test acc": metrics.get("test/acc"),
            "probe val acc": metrics.get("probe/val_acc"), "wall (s)": round(seconds, 1),
            "command": "finetune " + " ".join(overrides)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", choices=("details", "photos", "digits"), default=["details", "digits"])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "bench_lpft.json")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-lpft-") as work:
        work = Path(work)
        folders = {"details": lambda: write_photos(work / "details", sides=(0.05, 0.15), grey=True),
                   "photos": lambda: write_photos(work / "photos")}
        photo_run = ["model=lite0", "model.resolution=96", "data=imagefolder", "data.batch_size=32", "trainer.max_epochs=3"]
        sets = {name: [*photo_run, f"data.root={folders[name]()}"] for name in args.sets if name in folders}
        sets["digits"] = ["experiment=demo"]
        for data in args.sets:
            for case in args.cases:
                result = run_case([*sets[data], *CASES[case]], work / data / case.replace(", ", "_").replace("=", ""))
                rows.append({"data": data, "case": case, **result})
                print(json.dumps(rows[-1]), flush=True)
    columns = ["data", "case", "best val acc", "test acc", "probe val acc", "wall (s)"]
    print(markdown_table(rows, columns))
    write_json(args.json, {"script": SCRIPT, "machine": machine_info(__import__("torch").device("cpu")), "rows": rows})


if __name__ == "__main__":
    main()
