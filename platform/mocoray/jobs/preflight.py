"""What a job's driver checks before Ray starts and before it creates anything: data that exists and can fill
a batch, a folder the run can be written to, a checkpoint to start from. Returns warnings worth showing."""

from __future__ import annotations

from .. import storage
from ..checkpoints import TRAINING_FILES, checkpoint_problem
from ..config import ConfigError, DataConfig, LinearConfig, PretrainConfig
from ..data import check_paths
from ..data.peek import DataPeek, peek
from . import runtime


def _one_class_warning(data: DataConfig, seen: DataPeek) -> list[str]:
    if seen.classes != 1:
        return []
    where = data.root or data.name
    return [f"data: {where} has 1 class: kNN and linear metrics are meaningless (every prediction is that class)"]


def check_pretrain_inputs(cfg: PretrainConfig, resume_from: str | None) -> list[str]:
    """Raise (naming the field) on input that would fail only inside the workers; return warnings."""
    check_paths(cfg.data)
    seen = peek(cfg.data, enough=cfg.optim.batch_size)
    if seen.images is not None and seen.images < cfg.optim.batch_size:
        capped = f" (data.max_images={cfg.data.max_images})" if cfg.data.max_images == seen.images else ""
        raise ConfigError(f"optim.batch_size={cfg.optim.batch_size} is larger than the {seen.images} training "
                          f"images{capped}: no epoch would have a full batch; lower optim.batch_size or use more "
                          "images")
    runtime.check_storage_path(cfg.run.storage_path)
    if resume_from is not None:
        missing = [f for f in TRAINING_FILES if not storage.exists(storage.join(resume_from, f))]
        if missing:
            raise ConfigError(f"--resume-from: no checkpoint at {resume_from} (expected a checkpoint folder "
                              f"epoch_NNNN with {', '.join(TRAINING_FILES)}; missing {', '.join(missing)})")
        problem = checkpoint_problem(resume_from)
        if problem:
            raise ConfigError(f"--resume-from: the checkpoint at {resume_from} cannot be loaded: {problem}")
    return _one_class_warning(cfg.data, seen)


def check_linear_inputs(cfg: LinearConfig) -> list[str]:
    """Like `check_pretrain_inputs`, for a linear evaluation (which has no full-batch requirement)."""
    check_paths(cfg.data)
    seen = peek(cfg.data, enough=1)
    runtime.check_storage_path(cfg.run.storage_path)
    return _one_class_warning(cfg.data, seen)
