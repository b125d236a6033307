"""Shared test utilities: weights that exercise every buffer, and a real local HTTP server."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import threading
from collections.abc import Iterator

import torch
from omegaconf import DictConfig
from torch import nn


def randomize_norm_stats(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine params, so a mis-mapped key shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1 + 1)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@contextlib.contextmanager
def serve_files(files: dict[str, bytes], hf_commit: str = "0" * 40) -> Iterator[str]:
    """Serve `files` (url path -> bytes) on 127.0.0.1 with the headers the HF hub client reads.

    Unknown paths answer 404 with HF's EntryNotFound code, as the real hub does.
    """

    class Handler(http.server.BaseHTTPRequestHandler):
        def _head(self) -> bytes | None:
            body = files.get(self.path.split("?")[0])
            if body is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", '"' + hashlib.sha256(body).hexdigest() + '"')
            self.send_header("X-Repo-Commit", hf_commit)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            return body

        def do_HEAD(self) -> None:  # noqa: N802 - http.server API
            self._head()

        def do_GET(self) -> None:  # noqa: N802 - http.server API
            body = self._head()
            if body is not None:
                self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def compose_config(overrides: list[str], output_dir) -> DictConfig:
    """The `finetune` CLI's config for these overrides, writing into `output_dir`, without a subprocess."""
    from hydra import compose, initialize_config_module

    import finetune.build  # noqa: F401 - registers the config resolvers

    with initialize_config_module(config_module="finetune.conf", version_base="1.3"):
        return compose("train", overrides=[*overrides, f"paths.output_dir={output_dir}"])


def image_tags(tensorboard_dir) -> set[str]:
    """Tags of the images logged under a TensorBoard folder."""
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in Path(tensorboard_dir).rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 1})
        acc.Reload()
        tags |= set(acc.Tags()["images"])
    return tags


def write_digits_folder(root, per_class: int = 30, size: int = 40, splits=(("train", 0.7), ("val", 0.15), ("test", 0.15))):
    """A real image folder: scikit-learn's handwritten digits as RGB PNGs, root/<split>/<digit>/<n>.png."""
    from pathlib import Path

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = Path(root)
    for label in range(10):
        images = digits.images[digits.target == label][:per_class]
        start = 0
        for split, fraction in splits:
            count = max(1, round(fraction * len(images)))
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for n, image in enumerate(images[start:start + count]):
                gray = np.rint(image * (255 / 16)).astype(np.uint8)
                Image.fromarray(gray).convert("RGB").resize((size, size), Image.BILINEAR).save(folder / f"{n}.png")
            start += count
    return root
