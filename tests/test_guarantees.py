"""Guarantees the README and docstrings state that no other test held; docs/architecture.md lists every guarantee.

Each test compares with a source independent of the code under test: timm and torchvision's
networks, torchvision's `ImageFolder` listing the same tree, the policy table of the README, a
model whose logits are scaled by a known factor, the bytes of a checkpoint on disk before a signal.
None is timed: costs are checked as counts of calls, not as seconds.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shlex
import signal
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from torch import nn

from finetune import create_model
from finetune.training.module import FineTuneModule
from finetune.training.policies import model_parts
from helpers import randomize_norm_stats, write_digits_folder

FINETUNE = Path(sys.executable).with_name("finetune")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# --------------------------------------------------------------------------- models


#: One variant per family and padding: (reference, ours, the settings its state dict does not tell).
BIT_IDENTICAL = [
    ("timm:efficientnet_b0", "b0", {"padding": "symmetric", "bn_eps": 1e-5}),
    ("timm:efficientnet_b3", "b3", {"padding": "symmetric", "bn_eps": 1e-5}),
    ("timm:tf_efficientnet_b0", "b0", {"padding": "same", "bn_eps": 1e-3}),
    ("timm:tf_efficientnet_b3", "b3", {"padding": "same", "bn_eps": 1e-3}),
    ("timm:efficientnet_lite0", "lite0", {"padding": "symmetric", "bn_eps": 1e-5}),
    ("timm:tf_efficientnet_lite0", "lite0", {"padding": "same", "bn_eps": 1e-3}),
    ("torchvision:efficientnet_b0", "b0", {}),
]


@pytest.mark.parametrize(("reference", "ours", "settings"), BIT_IDENTICAL, ids=[r for r, _, _ in BIT_IDENTICAL])
def test_outputs_are_bit_identical_to_timm_and_torchvision(reference: str, ours: str, settings: dict) -> None:
    """README: "Bit-identical outputs": equal, not close, on an odd-sized input (asymmetric 'same' pads)."""
    library, name = reference.split(":")
    ref = timm.create_model(name) if library == "timm" else getattr(torchvision.models, name)()
    ref = randomize_norm_stats(ref)
    model = create_model(ours, pretrained=ref.state_dict(), **settings).eval()
    x = torch.randn(2, 3, 72, 88, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def _recorded(loss: torch.Tensor) -> tuple[Counter[str], set[int]]:
    """What backward would run: the graph's node types, and the leaves it would accumulate gradients into."""
    kinds: Counter[str] = Counter()
    leaves: set[int] = set()
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kinds[type(node).__name__] += 1
        if hasattr(node, "variable"):
            leaves.add(id(node.variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return kinds, leaves


#: README, Policies: what each trains in its first epoch (partial with 2 stages; gradual before it unfreezes).
TRAINS = {
    "frozen": ({"name": "frozen"}, {"head"}),
    "partial": ({"name": "partial", "trainable_stages": 2}, {"stage5", "stage6", "top", "head"}),
    "gradual": ({"name": "gradual", "unfreeze_at_epoch": 1}, {"head"}),
    "full": ({"name": "full"}, None),
}


@pytest.mark.parametrize("policy", list(TRAINS))
def test_frozen_parts_are_left_out_of_the_backward_pass(policy: str) -> None:
    """README: policies "skip the backward pass through frozen layers"; frozen stages "run without autograd".

    The autograd graph of a training step holds one convolution per convolution of the parts
    that train, none of the frozen ones, and accumulates into exactly the trained parts' weights.
    """
    finetune, trained = TRAINS[policy]
    module = FineTuneModule(model={"name": "b0", "pretrained": None, "resolution": 32}, num_classes=3,
                            finetune=finetune).train()
    parts = model_parts(module.model)
    trained = set(parts) if trained is None else trained
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    kinds, leaves = _recorded(module.criterion(module(x), y))

    convolutions = sum(isinstance(m, nn.Conv2d) for name in trained for m in parts[name].modules())
    assert kinds["ConvolutionBackward0"] == convolutions
    assert leaves == {id(p) for name in trained for p in parts[name].parameters()}


# --------------------------------------------------------------------------- data


class _Calls:
    """Counts, for paths under `tree`: directory listings, `stat`s of files and of folders, and files opened.

    `os.scandir` is wrapped (its entries' `stat` counted) and `os.stat` too; listings and opens
    come from Python's audit events, which every `open`, `os.listdir` and `os.scandir` raises.
    """

    active: _Calls | None = None

    def __init__(self, tree: Path) -> None:
        self.tree = os.fsencode(tree)
        self.listed: Counter[bytes] = Counter()
        self.file_stats: Counter[bytes] = Counter()
        self.folder_stats = 0
        self.opened: list[bytes] = []

    def inside(self, path: object) -> bytes | None:
        try:
            path = os.fsencode(os.fspath(path))
        except TypeError:
            return None
        return path if path.startswith(self.tree) else None

    def stat_of(self, path: object, result: os.stat_result) -> None:
        if (path := self.inside(path)) is not None:
            if stat.S_ISREG(result.st_mode):
                self.file_stats[path] += 1
            else:
                self.folder_stats += 1

    def __enter__(self) -> _Calls:
        _Calls.active = self
        return self

    def __exit__(self, *exc: object) -> None:
        _Calls.active = None


def _audit(event: str, args: tuple) -> None:
    calls = _Calls.active
    if calls is None or event not in ("open", "os.listdir", "os.scandir") or not args:
        return
    path = calls.inside(args[0])
    if path is not None and event == "open":
        calls.opened.append(path)
    elif path is not None:
        calls.listed[path] += 1


class _Entry:
    """An `os.DirEntry` whose `stat` is counted (DirEntry itself cannot be patched)."""

    def __init__(self, entry: os.DirEntry) -> None:
        self._entry = entry
        self.name, self.path = entry.name, entry.path

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        return self._entry.is_dir(follow_symlinks=follow_symlinks)

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        return self._entry.is_file(follow_symlinks=follow_symlinks)

    def is_symlink(self) -> bool:
        return self._entry.is_symlink()

    def inode(self) -> int:
        return self._entry.inode()

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        result = self._entry.stat(follow_symlinks=follow_symlinks)
        if _Calls.active is not None:
            _Calls.active.stat_of(self._entry.path, result)
        return result

    def __fspath__(self):
        return self._entry.__fspath__()


class _Listing:
    def __init__(self, listing) -> None:
        self._listing = listing

    def __enter__(self) -> _Listing:
        return self

    def __exit__(self, *exc: object) -> None:
        self._listing.close()

    def __iter__(self) -> _Listing:
        return self

    def __next__(self) -> _Entry:
        return _Entry(next(self._listing))

    def close(self) -> None:
        self._listing.close()


@pytest.fixture(scope="module")
def counted_calls() -> None:
    sys.addaudithook(_audit)  # an audit hook cannot be removed; it does nothing outside a `_Calls` block


def _count(monkeypatch: pytest.MonkeyPatch, tree: Path, build) -> _Calls:
    real_scandir, real_stat = os.scandir, os.stat

    def counted_stat(path, *args, **kwargs):
        result = real_stat(path, *args, **kwargs)
        if _Calls.active is not None:
            _Calls.active.stat_of(path, result)
        return result

    with monkeypatch.context() as patch:
        patch.setattr(os, "scandir", lambda path=".": _Listing(real_scandir(path)))  # os.walk and ours look it up here
        patch.setattr(os, "stat", counted_stat)  # pathlib, os.path.isdir
        with _Calls(tree) as calls:
            build()
    return calls


def _photo_tree(root: Path, per_folder: int) -> Path:
    """<root>/<class>/ and <root>/<class>/nested/, each with `per_folder` small JPEGs and PNGs."""
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "fox"):
        for folder in (root / name, root / name / "nested"):
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_folder):
                pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def test_indexing_reads_the_folders_imagefolder_reads_plus_one_stat_per_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counted_calls: None
) -> None:
    """README, Large image folders: "Setup decodes no image. It lists the tree (`os.scandir`, one `stat` per file)".

    datamodules/index.py: it "reads the folders torchvision's `ImageFolder` reads (the root once more), plus one
    `stat` per file, and opens no file". The time it takes is measured, not promised (benchmarks/RESULTS.md,
    "Image folders at scale"): a timed test would fail on a busy machine. What is held here is the work it is
    made of, counted on trees of 36 and 72 files in the same folders.
    """
    from torchvision.datasets import ImageFolder

    from finetune.datamodules import ImageFolderDataModule

    folder_work = []
    for per_folder in (6, 12):
        tree = _photo_tree(tmp_path / f"tree{per_folder}", per_folder)
        theirs = _count(monkeypatch, tree, lambda tree=tree: ImageFolder(str(tree)))

        found: set[bytes] = set()

        def setup(tree: Path = tree) -> None:
            dm = ImageFolderDataModule(root=str(tree), num_workers=0, cache_dir=str(tmp_path / "cache"))
            dm.prepare_data()  # what Lightning calls first, then setup
            dm.setup("fit")
            found.update(os.fsencode(p) for split in ("train", "val") for p in dm.dataset(split).files)

        ours = _count(monkeypatch, tree, setup)
        files = {os.fsencode(path) for path, _ in ImageFolder(str(tree)).samples}
        assert len(files) == 6 * per_folder and found == files  # the same images found

        assert theirs.opened == [] and ours.opened == []  # no file of the tree opened, let alone decoded
        root = os.fsencode(tree)
        assert set(ours.listed) == set(theirs.listed) == {root} | {os.path.dirname(f) for f in files}
        # Each folder read as often as ImageFolder reads it; the root once more (the class names are read first).
        assert all(ours.listed[d] <= theirs.listed[d] + (d == root) for d in ours.listed), (ours.listed, theirs.listed)
        assert not theirs.file_stats and ours.file_stats == Counter(dict.fromkeys(files, 1))  # one stat per file
        folder_work.append((sum(ours.listed.values()), ours.folder_stats))
    assert folder_work[0] == folder_work[1]  # the rest is per folder: as many with twice the files


# --------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real checkpoint: B0 trained one full epoch on a folder of handwritten digits."""
    from finetune.build import fit
    from helpers import compose_config

    root = tmp_path_factory.mktemp("export")
    data = write_digits_folder(root / "digits", per_class=4, splits=(("train", 0.75), ("val", 0.25)))
    metrics = fit(compose_config(["model=b0", "model.pretrained=null", "model.resolution=32", "data=imagefolder",
                                  f"data.root={data}", "data.num_workers=0", "data.batch_size=10", "trainer=cpu",
                                  "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=csv"],
                                 root / "run"))
    return metrics["best_checkpoint"]


@pytest.mark.parametrize(("scale", "fails"), [(1 + 3e-4, True), (1 + 3e-5, False)])
def test_an_export_that_differs_from_pytorch_by_more_than_1e_4_fails(
    checkpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scale: float, fails: bool
) -> None:
    """README, Export: the export runs against PyTorch, and "above 1e-4 the command fails" (TorchScript: the same).

    The file written is the checkpoint's network with every logit scaled by `scale`: a relative error of
    `scale - 1`, 3e-4 (refused) or 3e-5 (accepted), whatever the weights.
    """
    from finetune.commands import export

    write = export.export_torchscript

    def scaled(model: nn.Module, path: Path, resolution: int) -> None:
        drifted = copy.deepcopy(model)
        with torch.no_grad():
            drifted.classifier.weight.mul_(scale)
            drifted.classifier.bias.mul_(scale)
        write(drifted, path, resolution)

    monkeypatch.setattr(export, "export_torchscript", scaled)
    output = tmp_path / "model.pt"
    if fails:
        refused = r"differs from PyTorch: relative error 3\.0\de-04 > 1e-04"
        with pytest.raises(export.ExportMismatchError, match=refused):
            export.main([checkpoint, "--format", "torchscript", "--output", str(output)])
    else:
        export.main([checkpoint, "--format", "torchscript", "--output", str(output)])
        assert output.is_file()


# --------------------------------------------------------------------------- stop signals

#: A callback the command line adds: at (epoch, batch, hook) of STOP_AT ("epoch,batch,hook;..."), sends SIGTERM to
#: this process; before the first, records the sha256 of last.ckpt as it is on disk then.
STOPPER = '''
import hashlib, os, signal, time
from pathlib import Path
import lightning as L

class Stop(L.Callback):
    def setup(self, trainer, pl_module, stage):
        points = os.environ["STOP_AT"].split(";")
        self.points = [tuple(int(v) if v.isdigit() else v for v in p.split(",")) for p in points]

    def _at(self, trainer, batch_idx, hook):
        if self.points and self.points[0] == (trainer.current_epoch, batch_idx, hook):
            if len(self.points) == 2:
                last = Path(trainer.default_root_dir, "checkpoints", "last.ckpt")
                Path(os.environ["STOP_RECORD"]).write_text(hashlib.sha256(last.read_bytes()).hexdigest())
            self.points.pop(0)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # its handler runs here, before the next signal (two of one kind pending are one)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._at(trainer, batch_idx, "start")

    def on_after_backward(self, trainer, pl_module):
        self._at(trainer, trainer.fit_loop.epoch_loop.batch_idx, "backward")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._at(trainer, batch_idx, "end")
'''


def _stopped_run(tmp_path: Path, stop_at: str) -> subprocess.CompletedProcess:
    """The real `finetune` (image folder, default data settings: workers), signalled as STOPPER says."""
    (tmp_path / "stopper.py").write_text(STOPPER)
    data = write_digits_folder(tmp_path / "digits", per_class=6)  # 40 training images: 5 batches of 8
    env = {**ENV, "STOP_AT": stop_at, "STOP_RECORD": str(tmp_path / "last.sha256"),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])}
    args = ["model=b0", "model.pretrained=null", "model.resolution=32", "data=imagefolder", f"data.root={data}",
            "data.batch_size=8", "trainer=cpu", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
            "logger=csv", f"hydra.run.dir={tmp_path / 'run'}", "+callbacks.stop._target_=stopper.Stop"]
    return subprocess.run([str(FINETUNE), *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)


def test_a_stopped_run_ends_with_the_command_that_resumes_it(tmp_path: Path) -> None:
    """README, Stopping and resuming: exit 128 + the signal's number, "and its last line is the command that
    resumes it"."""
    run = _stopped_run(tmp_path, "0,1,start")
    assert run.returncode == 128 + signal.SIGTERM, run.stdout[-3000:]
    last_line = run.stdout.rstrip().splitlines()[-1]
    assert last_line.startswith("stopped by SIGTERM at epoch 0, step 2; saved "), run.stdout[-3000:]
    command = shlex.split(last_line.partition("resume with: ")[2])
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert command[0] == "finetune" and f"ckpt_path={checkpoint}" in command
    assert f"hydra.run.dir={tmp_path / 'run'}" in command
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 2  # the state it resumes from


def test_a_second_signal_stops_at_once_without_saving(tmp_path: Path) -> None:
    """README: "A second signal stops at once without saving, leaving the previous `last.ckpt` intact".

    Epoch 0 ends with its last.ckpt; in epoch 1, one SIGTERM as batch 0 starts and another after its backward
    pass: the run must not reach that batch's optimizer step, nor write a checkpoint.
    """
    run = _stopped_run(tmp_path, "1,0,start;1,0,backward")
    checkpoints = tmp_path / "run" / "checkpoints"
    assert run.returncode not in (0, 128 + signal.SIGTERM), run.stdout[-3000:]
    assert "stopped by" not in run.stdout  # not the graceful stop: that saves, and exits 143
    before = (tmp_path / "last.sha256").read_text()
    assert hashlib.sha256((checkpoints / "last.ckpt").read_bytes()).hexdigest() == before  # untouched
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 5  # epoch 0's: 5 steps
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith("epoch")) == ["last.ckpt"]
