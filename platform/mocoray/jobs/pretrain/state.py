"""Checkpoint and resume state of a pretraining worker: what a checkpoint carries besides the model, how it
is written and restored, where an attempt starts, and what rank 0 records about each (re)start.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch

from ... import __version__
from ...checkpoints import (
    checkpoint_dir_name,
    checkpoint_position,
    newest_good_checkpoint,
    read_meta,
    restore_training_checkpoint,
    save_training_checkpoint,
)
from ...config import PretrainConfig
from ...core.bn_stats import average_bn_statistics
from ...core.distributed import same_on_all_ranks
from ...core.moco import unwrap
from ...tracking.client import (
    MetricLogger,
)
from .. import runtime
from ..preemption import note_resume

EPOCHS_REPEATED_METRIC = "epochs_repeated"  # per restart that passed over damaged checkpoints, at its global step
DAMAGED_CHECKPOINTS_TAG = "mocoray.damaged_checkpoints"  # JSON {path: why it does not load} of the last such restart


@dataclass
class TrainState:
    """What a checkpoint carries besides model, optimizer and scaler."""

    epoch: int = 0  # epochs completed
    global_step: int = 0
    knn_top1_init: float | None = None  # the same encoder at random init: every run's own baseline
    knn_top1_last: float | None = None
    step_in_epoch: int = 0  # steps of epoch `epoch` already trained (a mid-epoch checkpoint)
    epoch_loss_sum: float = 0.0  # over those steps: a resumed epoch still reports its whole mean
    epoch_acc_sum: float = 0.0
    preemptions: int = 0  # reclaim notices the run received
    steps_lost: int = 0  # steps trained before a restart that no checkpoint kept
    logreg_top1_init: float | None = None  # knn.logreg: the same for logistic regression
    logreg_top1_last: float | None = None

    def monitor(self, knn: float, logreg: float | None, init: bool = False) -> None:
        self.knn_top1_last, self.logreg_top1_last = knn, logreg
        if init:
            self.knn_top1_init, self.logreg_top1_init = knn, logreg


def save_checkpoint(model, optimizer, scaler, state: TrainState, cfg: PretrainConfig, metrics: dict, rank: int,
                    world: int, bn_mode: str) -> str:
    """Report `metrics` to Ray with a checkpoint: every rank writes its RNG state, rank 0 the rest.

    Returns the checkpoint's name (`checkpoint_dir_name`)."""
    import ray.train

    name = checkpoint_dir_name(state.epoch, state.step_in_epoch)
    if state.step_in_epoch:  # every rank is here (the preemption check is a collective)
        # The ranks' BN statistics are averaged at each epoch's end; a mid-epoch checkpoint holds that average
        # too, so a run resumed from it on any world size ends the epoch with the same statistics as one
        # that never stopped (the running averages are linear in their updates: averaging early changes
        # nothing at the epoch's end).
        average_bn_statistics(unwrap(model))

    with tempfile.TemporaryDirectory() as tmp:
        save_training_checkpoint(
            tmp,
            rank=rank,
            model_state=unwrap(model).state_dict() if rank == 0 else None,
            optimizer_state=optimizer.state_dict() if rank == 0 else None,
            scaler_state=scaler.state_dict() if rank == 0 else None,
            train_state=vars(state),
            meta={"config": cfg.model_dump(mode="json"), "metrics": metrics, "bn_mode_effective": bn_mode,
                  "world_size": world, "mocoray": __version__, "torch": torch.__version__},
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
    return name


@dataclass
class StartingPoint:
    """Where an attempt starts: a checkpoint (None: epoch 1), whether it is this run's own (a restart or
    --resume, not a --resume-from of another run's), and this run's checkpoints further on that do not load."""

    checkpoint: str | None = None
    same_run: bool = False
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (path, why), newest first


def starting_checkpoint(loop_config: dict[str, Any], rank: int, world: int) -> StartingPoint:
    """Where this attempt starts: the run's newest checkpoint that loads (`newest_good_checkpoint`: newer than
    or the same as Ray's latest registered one, as an interrupt can land after a checkpoint is written and
    before Ray's controller registers it; older when the newer ones are damaged); with none, `--resume-from`
    (another run's); else a new run. Rank 0 looks, every rank starts from what it found."""
    import ray.train.collective

    found = StartingPoint()
    if rank == 0:
        newest, damaged = newest_good_checkpoint(loop_config["run_dir"], trusted=loop_config.get("newest_checkpoint"))
        if newest:
            found = StartingPoint(newest, True, damaged)
        elif damaged:
            found = StartingPoint(None, True, damaged)
        elif loop_config.get("resume_from"):
            found = StartingPoint(loop_config["resume_from"], False)
    if world > 1:
        found = ray.train.collective.broadcast_from_rank_zero(found if rank == 0 else None)
    if found.checkpoint is None and found.damaged:  # on every rank: the group fails as one
        raise RuntimeError(f"no checkpoint of {loop_config['run_dir']} can be loaded: "
                           + "; ".join(f"{path}: {problem}" for path, problem in found.damaged))
    return found


def restore(checkpoint: str, model, optimizer, scaler, rank: int) -> TrainState:
    return TrainState(**restore_training_checkpoint(checkpoint, rank, model, optimizer, scaler))


def check_same_queue(model: torch.nn.Module) -> None:
    """Every rank must hold the same queue and pointer (after a restart on any world size, too)."""
    queue = unwrap(model).queue
    pointer = torch.tensor([float(int(queue.ptr))], dtype=torch.float64, device=queue.keys.device)
    if not same_on_all_ranks(torch.cat([queue.keys.flatten().double(), pointer])):
        raise RuntimeError("the MoCo queue differs between ranks after loading the checkpoint")


def mid_epoch_metrics(state: TrainState, last_epoch: dict) -> dict:
    """What a mid-epoch checkpoint reports: the last epoch's metrics (so Tune sees its metric) and the position."""
    return {**last_epoch, "epoch": state.epoch, "global_step": state.global_step,
            "step_in_epoch": state.step_in_epoch, "preemptions": state.preemptions}


def relog_lost_epoch(logger: MetricLogger, checkpoint: str) -> None:
    """An epoch's metrics are logged after its checkpoint: if the group stopped between the two, the epoch
    is missing in MLflow. The checkpoint's meta.json has its metrics: log them now (unless they arrived)."""
    logged = logger.logged_steps("loss")
    if logged is None:
        return
    metrics = read_meta(checkpoint)["metrics"]
    if metrics["epoch"] not in logged:
        log_epoch(logger, metrics)


def epochs_repeated(start: StartingPoint, state: TrainState, steps_per_epoch: int) -> float:
    """How far the furthest damaged checkpoint was past the one the run restarts from, in epochs: what the run
    trains again."""
    if not start.damaged:
        return 0.0
    epoch, step = checkpoint_position(start.damaged[0][0]) or (0, 0)
    return max(0.0, epoch + step / steps_per_epoch - state.epoch - state.step_in_epoch / steps_per_epoch)


def start_attempt(logger: MetricLogger, state: TrainState, start: StartingPoint, world: int, steps_per_epoch: int,
                  record_url: str) -> None:
    """Rank 0, each time the worker group (re)starts: where it resumed, the steps a restart lost, the epochs it
    repeats because newer checkpoints were damaged, the world size."""
    if start.checkpoint is not None:
        name = start.checkpoint.rstrip("/").rsplit("/", 1)[-1]
        state.steps_lost += note_resume(record_url, state.global_step, name, world)
        runtime.console(f"resumed from checkpoint {name}: epoch {state.epoch + 1}, step {state.step_in_epoch} of it "
                        f"(global step {state.global_step}) on {world} worker(s)")
        if start.damaged:
            repeated = epochs_repeated(start, state, steps_per_epoch)
            for path, problem in start.damaged:
                runtime.console(f"checkpoint {path} cannot be loaded ({problem}): passed over")
            runtime.console(f"{repeated:.3g} epoch(s) trained before are trained again")
            logger.metrics({EPOCHS_REPEATED_METRIC: repeated}, step=state.global_step)
            logger.tags({DAMAGED_CHECKPOINTS_TAG: json.dumps(dict(start.damaged))})
        if start.same_run and state.epoch and not state.step_in_epoch:
            relog_lost_epoch(logger, start.checkpoint)
    logger.metrics({"world_size": world}, step=state.global_step)  # over time: one point per (re)start


MONITOR_PREFIXES = ("knn_", "logreg_")


def log_epoch(logger: MetricLogger, metrics: dict, monitored: bool = True) -> None:
    """An epoch's metrics at step = epoch; the kNN / logreg ones only on epochs that measured them (Ray's
    reports carry the last measured values on every epoch, which Tune's schedulers need)."""
    logger.metrics({k: v for k, v in metrics.items()
                    if k != "epoch" and (monitored or not k.startswith(MONITOR_PREFIXES))}, step=metrics["epoch"])
