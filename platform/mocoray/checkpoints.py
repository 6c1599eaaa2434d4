"""Checkpoint files: training state for exact resume, and backbone state_dicts for downstream use.

A training checkpoint is a directory of tensors-only files (each loads with
`torch.load(weights_only=True)`):

    model.pt        MoCo state_dict: encoder_q.*, encoder_k.*, queue.keys, queue.ptr
    optimizer.pt    optimizer state_dict          scaler.pt      GradScaler state_dict
    train_state.pt  the loop's own state ({"epoch", "global_step", "knn_top1_init", "knn_top1_last"} for
                    pretraining)
    rng_rank{r}.pt  every worker's RNG states (torch, CUDA, numpy, python)
    meta.json       config, versions, metrics (for people and tools, not needed to resume)

A checkpoint is complete when all these files are there and whole (`is_complete_checkpoint`: an interrupted
upload can leave a folder half written). Resuming takes the newest good one (`newest_good_checkpoint`): a
complete one whose every file also loads, as a file can be damaged inside (a node that died while writing
it, storage that lost a block); the ones further on that do not load are reported with their reason.

Layouts `backbone_from_state` understands: such a checkpoint's model.pt, an exported backbone (a plain
torchvision-style state_dict), a checkpoint of the official MoCo code (`{"state_dict":
{"module.encoder_q.<backbone>...": ...}, "arch": ...}`), and a bare torchvision state_dict. Paths may be
local or any fsspec URL.
"""

from __future__ import annotations

import io
import json
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import storage

MODEL_FILE = "model.pt"
BACKBONE_PREFIX = "encoder_q.backbone."
TRAINING_FILES = (MODEL_FILE, "optimizer.pt", "scaler.pt", "train_state.pt")
ZIP_END = b"PK\x05\x06"  # a torch.save file is a zip archive; its end record is written last
ZIP_END_SEARCH = 22 + 65535  # the end record's size plus the longest archive comment


def _load(path: str) -> Any:
    """torch.load through fsspec, refusing anything but tensors and plain containers."""
    buffer = io.BytesIO(storage.read_bytes(path))
    try:
        return torch.load(buffer, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError and friends
        raise ValueError(f"refusing to load {path}: {_why_refused(err)}") from None


def _why_refused(err: Exception) -> str:
    """torch's reason in our words. Its own message suggests weights_only=False, which would run whatever
    code the file holds: that is not a way round for files from anywhere, so it is not repeated."""
    unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    if unsupported:
        return (f"it holds a pickled {unsupported.group(1)} object, and checkpoints are loaded with "
                "torch.load(weights_only=True), which accepts tensors and plain containers only")
    return f"not a torch checkpoint (torch.load with weights_only=True cannot read it: {type(err).__name__})"


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


def checkpoint_dir_name(epoch: int, step_in_epoch: int = 0) -> str:
    """epoch_0003 after 3 epochs; epoch_0003_step_000120 120 steps into the 4th (names sort in training order)."""
    name = f"epoch_{epoch:04d}"
    return f"{name}_step_{step_in_epoch:06d}" if step_in_epoch else name


def checkpoint_position(path: str) -> tuple[int, int] | None:
    """(epochs done, steps into the next) from a checkpoint directory's name, None for other names."""
    found = re.search(r"epoch_(\d+)(?:_step_(\d+))?$", path.rstrip("/"))
    return (int(found.group(1)), int(found.group(2) or 0)) if found else None


def checkpoint_epoch(path: str) -> int | None:
    """The epochs a checkpoint directory's name says are done (`.../epoch_0012[_step_000040]` -> 12)."""
    position = checkpoint_position(path)
    return position[0] if position else None


def _complete_torch_file(url: str) -> bool:
    return storage.exists(url) and ZIP_END in storage.read_tail(url, ZIP_END_SEARCH)


def is_complete_checkpoint(directory: str) -> bool:
    """Every file of a training checkpoint is there and whole (an interrupt can leave an upload half done)."""
    try:
        meta = read_meta(directory)
    except (OSError, ValueError):
        return False
    ranks = [f"rng_rank{r}.pt" for r in range(int(meta.get("world_size", 1)))]
    return all(_complete_torch_file(storage.join(directory, name)) for name in (*TRAINING_FILES, *ranks))


def checkpoint_problem(directory: str) -> str | None:
    """Why a training checkpoint cannot be resumed from, or None when every file of it loads.

    Cheap first (meta.json, each file's zip end record: what a truncated file lacks), then each file is read
    once: its zip members' CRCs checked (torch.load does not check them: bytes damaged inside a tensor would load
    as wrong weights) and loaded with torch.load(weights_only=True)."""
    try:
        world_size = int(read_meta(directory).get("world_size", 1))
    except FileNotFoundError:
        return "meta.json is missing"
    except (OSError, ValueError, TypeError, AttributeError) as err:  # unreadable, not JSON, not an object
        return f"meta.json is unreadable ({type(err).__name__})"
    names = (*TRAINING_FILES, *(f"rng_rank{r}.pt" for r in range(world_size)))
    for name in names:
        url = storage.join(directory, name)
        if not storage.exists(url):
            return f"{name} is missing"
        if not _complete_torch_file(url):
            return f"{name} is truncated (its zip end record is missing)"
    for name in names:
        problem = _torch_file_problem(storage.read_bytes(storage.join(directory, name)))
        if problem:
            return f"{name} does not load: {problem}"
    return None


def _torch_file_problem(data: bytes) -> str | None:
    try:
        damaged_member = zipfile.ZipFile(io.BytesIO(data)).testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"not a whole zip archive ({err})"
    if damaged_member:
        return f"its member {damaged_member} fails its CRC check"
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError for a bad archive, UnpicklingError for bad content
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return None


def newest_good_checkpoint(run_dir: str, trusted: str | None = None) -> tuple[str | None, list[tuple[str, str]]]:
    """The furthest training checkpoint `run_dir/epoch_NNNN[_step_SSSSSS]` whose every file loads, and the
    (path, problem) of each one further on that does not (newest first). `trusted`: a checkpoint already
    found good (by the driver), taken without loading it again."""
    names = [n for n in storage.list_names(run_dir) if checkpoint_position(n) is not None]
    damaged = []
    for name in sorted(names, key=checkpoint_position, reverse=True):  # type: ignore[arg-type]
        url = storage.join(run_dir, name)
        problem = None if url == trusted else checkpoint_problem(url)
        if problem is None:
            return url, damaged
        damaged.append((url, problem))
    return None, damaged


def newest_complete_checkpoint(run_dir: str) -> str | None:
    """The furthest training checkpoint `run_dir/epoch_NNNN[_step_SSSSSS]` whose files are all complete."""
    names = [n for n in storage.list_names(run_dir) if checkpoint_position(n) is not None]
    for name in sorted(names, key=checkpoint_position, reverse=True):  # type: ignore[arg-type]
        if is_complete_checkpoint(storage.join(run_dir, name)):
            return storage.join(run_dir, name)
    return None


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
