"""Ctrl-C and SIGTERM on a job's driver: raised as `JobInterrupted`, so the job can stop its Ray job and leave
its run in a known state before the process exits with 128 + the signal number (130 / 143)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

HANDLED = (signal.SIGINT, signal.SIGTERM)
# set when a trainer.fit() thread ends; those still unset were left running by a signal (see `stop_ray`)
_FIT_DONE: list[threading.Event] = []


class JobInterrupted(BaseException):
    """SIGINT or SIGTERM reached the driver. A BaseException, like KeyboardInterrupt, so that no `except
    Exception` on the way (tracking guards, failure handlers) swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise(signum: int, _frame) -> None:
    raise JobInterrupted(signum)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """While inside, SIGINT and SIGTERM raise `JobInterrupted` in the main thread; the previous handlers are
    back afterwards. Enter it after `ray.init()`, which installs its own SIGTERM handler (a bare exit). Off
    the main thread (a Tune trial's driver) signals are not ours to take, and this does nothing."""
    if not _on_main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in HANDLED}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def tune_stops_on_signal() -> Iterator[threading.Event]:
    """Around `tuner.fit()` on the main thread: SIGINT or SIGTERM sets the event it yields and asks Tune to end
    its run (Tune's SIGUSR1), saving its state for `Tuner.restore`.

    Tune's own SIGINT handler leaves no trace: once it has cleaned up, an interrupted run's trials read as
    TERMINATED, as if the sweep had ended; the event says otherwise. Off the main thread nothing is installed."""
    stopped = threading.Event()
    if not _on_main_thread():
        yield stopped
        return

    def _stop(signum: int, _frame) -> None:
        if stopped.is_set():  # a second signal: stop waiting for Tune's clean-up
            raise KeyboardInterrupt
        stopped.set()
        signal.raise_signal(signal.SIGUSR1)

    previous = {s: signal.signal(s, _stop) for s in HANDLED}
    tune_sigint = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours sees it first; Tune's SIGUSR1 handler still ends the run
    try:
        yield stopped
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if tune_sigint is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = tune_sigint


def fit(trainer) -> Any:
    """`trainer.fit()`, interruptible by the handlers of `signals_raise`.

    On the main thread, Ray Train's fit() would replace the SIGINT handler with its own, which aborts the
    run and exits the process before the job can mark its run. Run from a helper thread (as Tune runs it),
    fit() leaves the handlers alone; the main thread waits, and a signal raises there.
    """
    if not _on_main_thread():
        return trainer.fit()
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # re-raised on the main thread
            outcome["error"] = err
        finally:
            done.set()

    _FIT_DONE.append(done)
    threading.Thread(target=target, name="mocoray-fit", daemon=True).start()
    # Wait on an Event, not Thread.join: a signal raising inside join() makes Python 3.11 release the thread's
    # state lock and mark the still-running thread stopped, and the interpreter can then crash at exit.
    while not done.wait(0.2):
        pass
    _FIT_DONE.remove(done)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def stop_ray(wait_s: float = 30.0) -> None:
    """Disconnect this driver from Ray: Ray then ends the actors its job owns (the Train controller and its
    workers), and a local Ray that this process started stops with it.

    Then wait (up to `wait_s`) for the interrupted trainer.fit() thread to notice and end: connected to a
    running cluster it outlives the disconnect by up to a second, and a thread still inside Ray's client when
    the interpreter shuts down can crash the process (SIGSEGV) instead of it exiting with 130 / 143."""
    import ray

    ray.shutdown()
    deadline = time.monotonic() + wait_s
    for done in list(_FIT_DONE):
        if done.wait(max(0.0, deadline - time.monotonic())):
            _FIT_DONE.remove(done)
