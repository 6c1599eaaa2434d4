"""Mid-epoch checkpoints: on a spot reclaim notice, and every N steps if asked.

Every `check_steps` steps all ranks ask Ray Train whether a node of the run is being drained
(`ray.train.get_preemption_info`, a collective: every rank calls it at the same step). On a notice:

1. checkpoint at once (mid-epoch: the checkpoint records the step within the epoch);
2. if the reclaim deadline is known and far enough, train on, and checkpoint again when the deadline
   is nearer than a margin (twice the measured checkpoint time plus twice the time between checks),
   so the steps trained after the notice are kept too;
3. then wait: Ray Train tears the group down at the deadline and restarts it on the nodes that remain
   (or replace the reclaimed one), and the run continues from that last checkpoint.

Rank 0 decides when to stop (ranks' clocks differ) and broadcasts the decision. It also keeps a
record of each preemption in `preemptions.json` next to the checkpoints: when the notice came, which
checkpoints were written, the last step trained, and (written by the restarted group) where the run
resumed and how many steps were lost.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .. import storage
from .runtime import console

RECORD_FILE = "preemptions.json"
RECORD_EVERY_S = 2.0  # how often rank 0 updates the last step trained while it trains on after a notice
GIVE_UP_AFTER_DEADLINE_S = 300.0  # Ray Train restarts the group at the deadline; if it did not, fail loudly


class StepCheckpoints:
    """Called after every training step; saves mid-epoch checkpoints through `save` (a collective)."""

    def __init__(self, check_steps: int, every_steps: int | None, rank: int, record_url: str,
                 save: Callable[[], str]) -> None:
        self.check_steps, self.every_steps = check_steps, every_steps
        self.rank, self.record_url, self.save = rank, record_url, save
        self.notice_at: float | None = None
        self.deadline: float | None = None  # seconds since the epoch
        self.margin_s = 0.0
        self._last_step_at: float | None = None
        self._step_s: deque[float] = deque(maxlen=9)  # recent step times; the median ignores an epoch's first
        self._last_saved_step, self._last_name = -1, ""
        self._last_record = 0.0

    def after_step(self, state) -> None:
        now = time.time()
        if self._last_step_at is not None:
            self._step_s.append(now - self._last_step_at)
        self._last_step_at = now
        if self.every_steps and state.global_step % self.every_steps == 0:
            self._save(state)
        if not self.check_steps or state.global_step % self.check_steps:
            return
        if self.notice_at is None:
            check_interval_s = self.check_steps * (statistics.median(self._step_s) if self._step_s else 0.0)
            self._on_notice(state, now, check_interval_s)
        elif self._decide(self._deadline_near(now)):
            self._final_checkpoint(state)
        elif self.rank == 0 and now - self._last_record >= RECORD_EVERY_S:
            self._update_record(last_step=state.global_step)

    # -- the notice ------------------------------------------------------------------------------

    def _on_notice(self, state, now: float, check_interval_s: float) -> None:
        import ray.train

        info = ray.train.get_preemption_info()  # rank 0's view, broadcast: the same on every rank
        if info is None:
            return
        self.notice_at = now
        self.deadline = info.deadline_ms / 1000 if info.deadline_ms else None
        state.preemptions += 1
        t0 = time.time()
        name = self._save(state)
        # Ray Train's controller looks at its workers every 2 s: one more second of slack
        self.margin_s = 2 * (time.time() - t0) + 2 * check_interval_s + 1.0
        if self.rank == 0:
            left = f"{self.deadline - time.time():.0f} s" if self.deadline else "an unknown time"
            console(f"preemption notice for rank(s) {info.preempted_ranks} (reclaim in {left}): "
                    f"checkpoint {name} at step {state.global_step}")
            self._append_record({"notice_time": now, "deadline": self.deadline, "ranks": info.preempted_ranks,
                                 "nodes": info.preempted_node_ids, "notice_step": state.global_step,
                                 "checkpoints": [name], "last_step": state.global_step})
        if self._decide(self._deadline_near(time.time())):
            self._wait_for_restart()

    def _deadline_near(self, now: float) -> bool:
        """Whether to stop now: no known deadline (Ray may restart any time), or it is within the margin."""
        return self.deadline is None or now + self.margin_s >= self.deadline

    def _decide(self, stop: bool) -> bool:
        import ray.train.collective

        return bool(ray.train.collective.broadcast_from_rank_zero(stop if self.rank == 0 else None))

    def _final_checkpoint(self, state) -> None:
        name = self._save(state)
        if self.rank == 0:
            console(f"reclaim deadline near: checkpoint {name} at step {state.global_step}")
            self._update_record(last_step=state.global_step, checkpoint=name)
        self._wait_for_restart()

    def _wait_for_restart(self) -> None:
        if self.rank == 0:
            console("waiting for Ray Train to restart the workers on the remaining nodes")
        give_up = (self.deadline or time.time()) + GIVE_UP_AFTER_DEADLINE_S
        while time.time() < give_up:
            time.sleep(1.0)
        raise RuntimeError(f"the node reclaim announced at {time.ctime(self.notice_at)} did not end this worker "
                           f"group within {GIVE_UP_AFTER_DEADLINE_S:.0f} s of its deadline")

    def _save(self, state) -> str:
        if state.global_step == self._last_saved_step:  # nothing trained since the last mid-epoch checkpoint
            return self._last_name
        self._last_name = self.save()
        self._last_saved_step = state.global_step
        return self._last_name

    # -- the record (rank 0) ----------------------------------------------------------------------

    def _append_record(self, entry: dict[str, Any]) -> None:
        entries = read_record(self.record_url)
        storage.write_json(self.record_url, [*entries, entry])
        self._last_record = time.time()

    def _update_record(self, last_step: int, checkpoint: str | None = None) -> None:
        entries = read_record(self.record_url)
        if not entries:
            return
        entries[-1]["last_step"] = last_step
        if checkpoint and checkpoint not in entries[-1]["checkpoints"]:
            entries[-1]["checkpoints"].append(checkpoint)
        storage.write_json(self.record_url, entries)
        self._last_record = time.time()


def read_record(record_url: str) -> list[dict[str, Any]]:
    return storage.read_json(record_url) if storage.exists(record_url) else []


def note_resume(record_url: str, global_step: int, checkpoint: str | None, world_size: int) -> int:
    """Rank 0 of a restarted group: complete the last preemption's record; returns the steps it lost.

    Steps lost = steps trained before the group went down that no checkpoint kept.
    """
    entries = read_record(record_url)
    if not entries or "resumed_time" in entries[-1]:
        return 0
    last = entries[-1]
    lost = max(0, last["last_step"] - global_step)
    last.update({"resumed_time": time.time(), "resumed_step": global_step, "resumed_from": checkpoint,
                 "resumed_world_size": world_size, "steps_lost": lost})
    storage.write_json(record_url, entries)
    return lost
