"""Fault injection for the tests: how they prove the recovery paths. Not part of any user-facing config.

A job takes a `Faults` through its Python API (`run_pretrain(cfg, faults=...)`); the CLI never sets one.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .runtime import console


@dataclass
class Faults:
    nan_at_step: int | None = None  # multiply rank 0's query images by NaN at this global step
    crash_at_epoch: int | None = None  # kill one worker once, during this epoch
    crash_rank: int = 0
    crash_marker: str | None = None  # file recording that the crash happened (so it happens once)
    # Work this long into the epoch before dying: Ray Train's controller polls workers every 2 s, and a
    # checkpoint reported less than one poll before a crash dies with the worker.
    crash_delay_s: float = 5.0
    unfreeze_backbone: bool = False  # linear evaluation trains the backbone too: its check must fail the run
    # rank 0 sends SIGINT to the driver right after this epoch's checkpoint is reported: the moment an
    # interrupt leaves a checkpoint on disk that Ray's controller has not registered yet
    interrupt_driver_after_epoch: int | None = None
    driver_pid: int | None = None  # filled in on the driver by to_dict
    step_delay_s: float = 0.0  # sleep after every training step: epochs long enough for a test to act within
    # After each of these epochs (logged and checkpointed), every rank waits for the file <pause_dir>/go_<epoch>;
    # rank 0 first writes <pause_dir>/paused_<epoch>. The test does its deed in between.
    pause_after_epochs: tuple[int, ...] = ()
    pause_dir: str | None = None
    # Every training step appends {"epoch", "step", "rank", "keys"} to <batches_dir>/rank<r>.jsonl: the batch's
    # sample ids with data.loader=ray (its labels with the torch loader)
    batches_dir: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.interrupt_driver_after_epoch is not None:
            d["driver_pid"] = os.getpid()
        for key in ("crash_marker", "pause_dir", "batches_dir"):
            if d[key]:
                d[key] = str(Path(d[key]).resolve())
        return d

    def maybe_crash(self, epoch: int, rank: int) -> None:
        if self.crash_at_epoch != epoch or self.crash_rank != rank:
            return
        if self.crash_marker and Path(self.crash_marker).exists():
            return
        time.sleep(self.crash_delay_s)
        if self.crash_marker:
            Path(self.crash_marker).write_text(f"crashed rank {rank} in epoch {epoch}\n")
        console(f"fault injection: killing worker rank {rank} during epoch {epoch}")
        os._exit(1)

    def maybe_pause(self, epoch: int, rank: int) -> None:
        if epoch not in self.pause_after_epochs or not self.pause_dir:
            return
        if rank == 0:
            Path(self.pause_dir, f"paused_{epoch}").touch()
        while not Path(self.pause_dir, f"go_{epoch}").exists():
            time.sleep(0.2)

    def record_batch(self, epoch: int, step: int, rank: int, keys: torch.Tensor) -> None:
        if self.batches_dir:
            line = json.dumps({"epoch": epoch, "step": step, "rank": rank, "keys": keys.tolist()})
            with open(Path(self.batches_dir, f"rank{rank}.jsonl"), "a") as f:
                f.write(line + "\n")

    def slow_down(self) -> None:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)

    def poison(self, images: torch.Tensor, step: int, rank: int) -> torch.Tensor:
        """NaN images at the configured step on rank 0, so the loss turns non-finite there only."""
        return images * float("nan") if self.nan_at_step == step and rank == 0 else images

    def maybe_interrupt_driver(self, epoch: int, rank: int) -> None:
        if self.interrupt_driver_after_epoch == epoch and rank == 0 and self.driver_pid:
            console(f"fault injection: SIGINT to the driver after epoch {epoch}'s checkpoint")
            os.kill(self.driver_pid, signal.SIGINT)
