"""Progress inside an epoch: rank 0's console line every N steps or seconds, and step-level MLflow metrics."""

from __future__ import annotations

import time

from ..config.pretrain import ProgressConfig
from ..tracking.client import MetricLogger
from .runtime import console


class StepProgress:
    """Fed every step of every epoch (on every rank; only rank 0 prints and logs).

    The console line: step/steps, the mean loss and pairs/s since the previous line, and the epoch's ETA
    at the epoch's pace so far. MLflow: `step_loss` (mean since the previous log), `step_lr` and
    `step_pairs_per_s`, at step = the global step; the epoch metrics are logged as before. Pairs/s count
    the steps' own time (from the end of one step to the end of the next), not the kNN and checkpoints
    between epochs.
    """

    def __init__(self, cfg: ProgressConfig, batch_size: int, epochs: int, rank: int,
                 logger: MetricLogger | None) -> None:
        self.cfg, self.batch_size, self.epochs = cfg, batch_size, epochs
        self.printing, self.logger = rank == 0, logger
        self.log_loss = self.log_time = 0.0
        self.log_steps = 0

    def start_epoch(self, epoch: int, steps: int, log_metrics: bool) -> None:
        """`log_metrics` False: the epoch was logged before (a resumed run re-runs it) and must not be again."""
        self.epoch, self.steps, self.log_metrics = epoch, steps, log_metrics
        self.epoch_t0 = self.last = time.perf_counter()
        self.print_loss = self.print_time = 0.0
        self.print_steps = 0

    def step(self, i: int, loss: float, lr: float, global_step: int) -> None:
        """Step `i` (0-based) of the epoch is done; `global_step` counts steps over the run (1-based)."""
        now = time.perf_counter()
        dt, self.last = now - self.last, now
        self.print_loss += loss
        self.log_loss += loss
        self.print_time += dt
        self.log_time += dt
        self.print_steps += 1
        self.log_steps += 1
        if self.printing and self._print_due(i):
            self._print(i, now)
        every = self.cfg.log_every_steps
        if every and global_step % every == 0:
            if self.logger and self.log_metrics:
                self.logger.metrics({"step_loss": self.log_loss / self.log_steps, "step_lr": lr,
                                     "step_pairs_per_s": self._pairs_per_s(self.log_steps, self.log_time)},
                                    step=global_step)
            self.log_loss = self.log_time = 0.0
            self.log_steps = 0

    def _pairs_per_s(self, steps: int, seconds: float) -> float:
        return steps * self.batch_size / max(seconds, 1e-9)

    def _print_due(self, i: int) -> bool:
        by_steps = self.cfg.print_every_steps and (i + 1) % self.cfg.print_every_steps == 0
        by_time = self.cfg.print_every_s and self.print_time >= self.cfg.print_every_s
        return bool(by_steps or by_time)

    def _print(self, i: int, now: float) -> None:
        eta = round((now - self.epoch_t0) / (i + 1) * (self.steps - i - 1))
        console(f"epoch {self.epoch + 1}/{self.epochs}  step {i + 1}/{self.steps}  loss "
                f"{self.print_loss / self.print_steps:.4f}  {self._pairs_per_s(self.print_steps, self.print_time):.0f} "
                f"pairs/s  ETA {eta // 60}:{eta % 60:02d}")
        self.print_loss = self.print_time = 0.0
        self.print_steps = 0
