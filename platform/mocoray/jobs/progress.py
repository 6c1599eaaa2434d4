"""Progress inside an epoch: rank 0's progress bar (or a line every N steps or seconds), and step-level MLflow metrics."""

from __future__ import annotations

import time

from ..config.pretrain import ProgressConfig
from ..tracking.client import MetricLogger
from .runtime import console, console_progress

BAR_REDRAW_S = 0.25  # at most this often a bar update goes to the driver


class StepProgress:
    """Fed every step of every epoch (on every rank; only rank 0 prints and logs).

    On a driver's TTY, a progress bar redrawn in place (at most every BAR_REDRAW_S); otherwise a console line
    every `print_every_steps` steps or `print_every_s` seconds. Either says step/steps, the mean loss and
    pairs/s since the previous update, and the epoch's ETA at the epoch's pace so far. MLflow: `step_loss` (mean since the previous log), `step_lr` and
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
        self.epoch_t0 = self.last = self.last_bar = time.perf_counter()
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
        if self.printing:
            self._show(i, now)
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

    def _show(self, i: int, now: float) -> None:
        last = i + 1 == self.steps
        if now - self.last_bar < BAR_REDRAW_S and not last and not self._print_due(i):
            return
        p = {"epoch": self.epoch + 1, "epochs": self.epochs, "step": i + 1, "steps": self.steps,
             "loss": self.print_loss / self.print_steps,
             "pairs_per_s": self._pairs_per_s(self.print_steps, self.print_time),
             "eta_s": (now - self.epoch_t0) / (i + 1) * (self.steps - i - 1)}
        if console_progress(p):
            self.last_bar = now
        elif self._print_due(i):
            eta = round(p["eta_s"])
            console(f"epoch {p['epoch']}/{self.epochs}  step {i + 1}/{self.steps}  loss {p['loss']:.4f}  "
                    f"{p['pairs_per_s']:.0f} pairs/s  ETA {eta // 60}:{eta % 60:02d}")
        else:
            return
        self.print_loss = self.print_time = 0.0
        self.print_steps = 0
