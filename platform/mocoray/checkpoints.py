"""Checkpoint files: training state for exact resume, and backbone state_dicts for downstream use.

A training checkpoint is a directory of tensors-only files (each loads with
`torch.load(weights_only=True)`):

    model.pt        MoCo state_dict: encoder_q.*, encoder_k.*, queue.keys, queue.ptr
    optimizer.pt    optimizer state_dict          scaler.pt      GradScaler state_dict
    train_state.pt  the loop's own state ({"epoch", "global_step", "knn_top1_init", "knn_top1_last"} for
                    pretraining)
    rng_rank{r}.pt  every worker's RNG states (torch, CUDA, numpy, python)
    meta.json       config, versions, metrics (for people and tools, not needed to resume)

Layouts `backbone_from_state` understands: such a checkpoint's model.pt, an exported backbone (a plain
torchvision-style state_dict), a checkpoint of the official MoCo code (`{"state_dict":
{"module.encoder_q.<backbone>...": ...}, "arch": ...}`), and a bare torchvision state_dict. Paths may be
local or any fsspec URL.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import storage

MODEL_FILE = "model.pt"
BACKBONE_PREFIX = "encoder_q.backbone."


def _load(path: str) -> Any:
    """torch.load through fsspec, refusing anything but tensors and plain containers."""
    buffer = io.BytesIO(storage.read_bytes(path))
    try:
        return torch.load(buffer, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError and friends, with torch's explanation
        raise ValueError(
            f"refusing to load {path}: it is not a tensors-only checkpoint (torch.load weights_only=True "
            f"failed: {str(err).splitlines()[0]})"
        ) from None


def load_checkpoint_file(source: str) -> Any:
    """The model state of a checkpoint directory (its model.pt), or the contents of a checkpoint file."""
    return _load(storage.join(source, MODEL_FILE) if storage.is_dir(source) else source)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "python": [list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], *state["numpy_gauss"])
    )
    random.setstate((3, tuple(state["python"][0]), state["python"][1]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(
    directory: str | Path,
    *,
    rank: int,
    model_state: dict[str, torch.Tensor] | None,
    optimizer_state: dict[str, Any] | None,
    scaler_state: dict[str, Any] | None,
    train_state: dict[str, Any] | None,
    meta: dict[str, Any] | None,
) -> None:
    """Write this rank's part of a checkpoint: everyone writes its RNG file, rank 0 the rest."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), d / f"rng_rank{rank}.pt")
    if rank != 0:
        return
    torch.save(model_state, d / MODEL_FILE)
    torch.save(optimizer_state, d / "optimizer.pt")
    torch.save(scaler_state or {}, d / "scaler.pt")
    torch.save(train_state, d / "train_state.pt")
    (d / "meta.json").write_text(json.dumps(meta or {}, indent=2, default=str))


def load_training_checkpoint(directory: str | Path, rank: int) -> dict[str, Any]:
    d = str(directory)
    out = {
        "model": _load(storage.join(d, MODEL_FILE)),
        "optimizer": _load(storage.join(d, "optimizer.pt")),
        "scaler": _load(storage.join(d, "scaler.pt")),
        "train_state": _load(storage.join(d, "train_state.pt")),
        "rng": None,
    }
    if storage.exists(storage.join(d, f"rng_rank{rank}.pt")):  # absent when resuming with more workers
        out["rng"] = _load(storage.join(d, f"rng_rank{rank}.pt"))
    return out


def restore_training_checkpoint(directory: str | Path, rank: int, model: torch.nn.Module, optimizer, scaler
                                ) -> dict[str, Any]:
    """Load a training checkpoint into `model`, `optimizer`, `scaler` and this rank's RNG states (when the
    checkpoint has this rank's); returns the loop's own state (`train_state.pt`)."""
    saved = load_training_checkpoint(directory, rank)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    if saved["scaler"]:
        scaler.load_state_dict(saved["scaler"])
    if saved["rng"] is not None:
        set_rng_state(saved["rng"])
    return saved["train_state"]


def read_meta(directory: str) -> dict[str, Any]:
    return storage.read_json(storage.join(directory, "meta.json"))


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def backbone_from_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Pick the query backbone out of any supported checkpoint layout (see module docstring)."""
    if "state_dict" in state and isinstance(state["state_dict"], dict):  # official MoCo / many others
        state = state["state_dict"]
    for prefix in ("module.encoder_q.backbone.", BACKBONE_PREFIX, "module.encoder_q.", "encoder_q."):
        picked = _strip(state, prefix)
        if picked:
            break
    else:
        picked = dict(state)  # already a bare backbone state_dict
    # The official code keeps its projection head in fc (fc.0 / fc.2 for the v2 MLP): not backbone.
    return {k: v for k, v in picked.items() if not k.startswith("fc.") and isinstance(v, torch.Tensor)}
