"""Checkpoints a fit writes crash-safe (`AtomicCheckpointIO`, through `finetune.fileio.atomic_save`), the
random state a bit-exact resume needs, and the checks a resume checkpoint must pass."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from finetune.fileio import atomic_save
from finetune.models.weights import WeightsError, load_safely


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO plugin: local checkpoints are written with `atomic_save`.

    Remote paths (s3://, gs://, ...) keep Lightning's own upload, which object stores
    already make all-or-nothing.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, path)


# --- random state ---------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch CPU (and current CUDA device) RNG states.

    Only tensors and primitives, so checkpoints still load with `weights_only=True`.
    """
    key, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"key": key, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    random.setstate(_as_tuples(state["python"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["key"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuples(value: Any) -> Any:
    # random.setstate insists on tuples; a checkpoint round trip may hand back lists.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class RNGStateCallback(L.Callback):
    """Saves every process's RNG states in checkpoints and restores them when a run resumes.

    Dropout, stochastic depth, device-side augmentation, CPU transforms in the main process
    and the evaluation loaders' worker seeds draw from these generators (the training data
    order does not: see `finetune.datamodules.base.EpochSampler`). They are captured when a
    checkpoint is written (after an epoch's validation) and restored in `on_train_start`,
    the last hook before the next epoch's first draw: whatever setup and a sanity check
    consume in the resumed process is then irrelevant, and the resumed run continues the
    exact random sequence of the interrupted one.
    """

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        # Lightning calls this on every rank while dumping a checkpoint (only rank 0 writes
        # it), so the ranks' states can be gathered here.
        states: list[Any] = [capture_rng_state()]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, capture_rng_state())
        return {"per_rank": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = list(state_dict["per_rank"])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is None:
            return
        states, self._pending = self._pending, None
        if len(states) != trainer.world_size:
            rank_zero_warn(
                f"the checkpoint holds RNG states of {len(states)} processes but this run has {trainer.world_size}; "
                "training continues from the seed, not bit-exactly"
            )
            return
        restore_rng_state(states[trainer.global_rank])


# --- resume checks --------------------------------------------------------------------------


def load_resume_checkpoint(path: str | Path) -> dict[str, Any]:
    """A finetune training checkpoint, memory-mapped and checked for what resuming needs.

    Mapped, not read: Lightning reads the tensors itself when it restores the run.
    Anything else is a one-line WeightsError.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"ckpt_path '{path}' does not exist; pass <run dir>/checkpoints/last.ckpt of an earlier run "
            "or ckpt_path=null to start fresh"
        )
    try:
        ckpt = load_safely(path, mmap=True)
    except WeightsError as e:
        raise WeightsError(f"ckpt_path: {e}") from None
    if not isinstance(ckpt, dict):
        raise WeightsError(f"ckpt_path '{path}' is not a Lightning checkpoint (it holds a {type(ckpt).__name__})")
    hp = ckpt.get("hyper_parameters")
    if not isinstance(hp, dict) or not isinstance(ckpt.get("state_dict"), dict) or "model" not in hp:
        raise WeightsError(
            f"ckpt_path '{path}' is not a finetune training checkpoint (no hyper_parameters/state_dict); "
            "to start from plain weights use model.pretrained=<path> instead"
        )
    if "optimizer_states" not in ckpt or "loops" not in ckpt:
        raise WeightsError(
            f"ckpt_path '{path}' holds weights only (no optimizer or loop state) and cannot resume a run; "
            "use model.pretrained=<path> to start from these weights"
        )
    return ckpt


def check_resumable(ckpt: dict[str, Any], path: str | Path, module: L.LightningModule) -> None:
    """Refuse, in one line, a resume checkpoint that does not belong to the model this config builds."""
    hp = ckpt["hyper_parameters"]
    ours = module.hparams
    theirs_name, ours_name = hp["model"].get("name"), ours["model"].get("name")
    theirs_classes, ours_classes = hp.get("num_classes"), ours["num_classes"]
    if (theirs_name, hp["model"].get("phi")) != (ours_name, ours["model"].get("phi")) or theirs_classes != ours_classes:
        raise WeightsError(
            f"ckpt_path '{path}' is a checkpoint of model '{theirs_name}' with {theirs_classes} classes, but this "
            f"config builds '{ours_name}' with {ours_classes} classes; resume with the config it was trained with "
            f"(model={theirs_name} and its data) or set ckpt_path=null"
        )
    expected = module.state_dict()
    stored = ckpt["state_dict"]
    wrong = sorted(k for k in expected.keys() | stored.keys()
                   if k not in expected or k not in stored or tuple(expected[k].shape) != tuple(stored[k].shape))
    if wrong:
        raise WeightsError(
            f"ckpt_path '{path}' does not fit this model: {len(wrong)} missing, unexpected or mis-shaped tensors "
            f"(first: {wrong[0]}); resume with the config it was trained with or set ckpt_path=null"
        )
