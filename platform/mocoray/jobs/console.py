"""The driver's terminal: rank 0's lines and progress bar, and Ray's and MLflow's own log lines sent to the run's log file.

Ray forwards worker output line by line, each prefixed with its process, so a bar redrawn in place cannot
travel that way. Instead the process that owns the terminal (the CLI's, see `own_terminal`) starts a small
actor, the mailbox, and hands it to the workers in their loop config (`worker_sink`); rank 0 puts its lines
and progress there, and a thread here drains it every `POLL_S` and draws: a bar redrawn in place on a TTY,
plain lines otherwise. Unless `verbose`, the driver starts or joins Ray with `log_to_driver=False`, so the
workers' and Ray's own lines stay off the terminal; Ray's and MLflow's loggers (driver and workers) write
to `<run dir>/mocoray.log` instead. Errors still reach the terminal: a worker's exception comes back from
`fit()` and is reported by the job, and ERROR records of Ray and MLflow are printed as they happen.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

LOG_FILE = "mocoray.log"
LOCAL_LOG_DIR = "mocoray_logs"  # for a run directory on object storage, which cannot be appended to line by line
# Ray Train / Tune / Data workers give their loggers their own handlers (no propagation to "ray"): each is named
QUIET_LOGGERS = ("ray", "ray.train", "ray.tune", "ray.data", "mlflow", "py.warnings", "alembic", "urllib3", "filelock")
POLL_S = 0.2
DRAIN_TIMEOUT_S = 10.0
BAR_WIDTH = 24

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_file_for(run_dir: str) -> str:
    """Where a run's Ray and MLflow log lines go: `<run dir>/mocoray.log`, or, for a run directory on object
    storage (s3://...), `./mocoray_logs/<run name>.log` on this machine."""
    if "://" in run_dir and not run_dir.startswith("file://"):
        return os.path.abspath(os.path.join(LOCAL_LOG_DIR, run_dir.rstrip("/").rsplit("/", 1)[-1] + ".log"))
    return os.path.join(run_dir.removeprefix("file://"), LOG_FILE)


def file_handler(path: str, tag: str = "", create_folder: bool = True) -> logging.Handler | None:
    """Ray's and MLflow's loggers (and Python warnings, when captured) of this process also write to `path`.
    Returns the handler (None: the file cannot be opened here, e.g. a worker on a node without the run's folder,
    which it must not create there)."""
    try:
        if create_folder:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        handler: logging.Handler = logging.FileHandler(path)
    except OSError:
        return None
    handler.setFormatter(logging.Formatter(tag + _LOG_FORMAT))
    handler.addFilter(_Once())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).addHandler(handler)
    return handler


class _Once(logging.Filter):
    """A record that propagates from "ray.train" to "ray" reaches the file's handler twice: write it once."""

    def __init__(self) -> None:
        super().__init__()
        self.last: logging.LogRecord | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        seen, self.last = record is self.last, record
        return not seen


def _is_terminal_handler(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def silence_terminal() -> Callable[[], None]:
    """Ray's and MLflow's loggers print only ERROR records on the terminal; Python warnings become log records.

    Returns the function that puts everything back as it was (the command is over: a test or a notebook
    that calls `main` goes on in the same process)."""
    import mlflow  # noqa: F401  (both set up their loggers when imported: silence them after that)
    import ray  # noqa: F401

    undo: list[Callable[[], None]] = []
    logging.captureWarnings(True)
    undo.append(lambda: logging.captureWarnings(False))
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        shown = [h for h in logger.handlers if _is_terminal_handler(h)]
        for handler in shown:
            undo.append(lambda h=handler, level=handler.level: h.setLevel(level))
            handler.setLevel(logging.ERROR)
        if not shown:
            errors = logging.StreamHandler(sys.stderr)
            errors.setLevel(logging.ERROR)
            logger.addHandler(errors)
            undo.append(lambda lg=logger, h=errors: lg.removeHandler(h))
        undo.append(lambda lg=logger, p=logger.propagate: setattr(lg, "propagate", p))
        logger.propagate = False

    def restore() -> None:
        for step in reversed(undo):
            step()

    return restore


def _mailbox_class():
    import ray

    @ray.remote(num_cpus=0)
    class Mailbox:
        """What rank 0 sends to the terminal, in the order it sent it (a plain actor runs one call at a time)."""

        def __init__(self) -> None:
            self.events: list[tuple[str, Any]] = []

        def put(self, event: tuple[str, Any]) -> None:
            self.events.append(event)

        def drain(self) -> list[tuple[str, Any]]:
            events, self.events = self.events, []
            return events

    return Mailbox


def format_duration(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def progress_bar(p: dict) -> str:
    """One redrawable line: `epoch 3/24 [#####-----] 12/33  loss 6.1234  410 pairs/s  ETA 0:05`."""
    done = round(BAR_WIDTH * p["step"] / max(p["steps"], 1))
    return (f"epoch {p['epoch']}/{p['epochs']} [{'#' * done}{'-' * (BAR_WIDTH - done)}] {p['step']}/{p['steps']}"
            f"  loss {p['loss']:.4f}  {p['pairs_per_s']:.0f} pairs/s  ETA {format_duration(p['eta_s'])}")


class Terminal:
    """The terminal of this process: draws what the workers send to its mailbox. `bar`: progress is a bar
    redrawn in place (a TTY, not verbose); otherwise the workers send plain lines only."""

    def __init__(self, verbose: bool, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.verbose = verbose
        self.bar = not verbose and self.stream.isatty()
        self.mailbox = None
        self.bar_shown = False
        self.lock = threading.Lock()
        self.log_handler: logging.Handler | None = None
        self.restore_loggers = silence_terminal() if not verbose else None
        self.buffer: _Buffer | None = _Buffer()  # Ray's and MLflow's lines until the run's log file exists
        self.buffer.addFilter(_Once())
        for name in QUIET_LOGGERS:
            logging.getLogger(name).addHandler(self.buffer)

    def sink(self, log_file: str | None) -> dict:
        """What a job's workers need to reach this terminal (their loop config's `console`)."""
        with self.lock:
            if self.mailbox is None:
                self.mailbox = _mailbox_class().remote()
                threading.Thread(target=self._poll, args=(self.mailbox,), name="mocoray-terminal", daemon=True).start()
        return {"mailbox": self.mailbox, "bar": self.bar, "prefix": "", "log_file": log_file}

    def log_to(self, path: str) -> None:
        """From now on Ray's and MLflow's lines go to `path` (with what was said before it was known)."""
        if self.log_handler is not None:
            for name in QUIET_LOGGERS:
                logging.getLogger(name).removeHandler(self.log_handler)
            self.log_handler.close()
        self.log_handler = file_handler(path)
        if self.log_handler is not None and self.buffer is not None:
            self.buffer.replay(self.log_handler)
            for name in QUIET_LOGGERS:
                logging.getLogger(name).removeHandler(self.buffer)
            self.buffer = None

    def _poll(self, mailbox) -> None:
        while self.mailbox is mailbox:
            time.sleep(POLL_S)
            try:
                self.flush()
            except Exception:  # Ray shut down (an interrupt, or the end of a test's session): a new mailbox next time
                with self.lock:
                    if self.mailbox is mailbox:
                        self.mailbox = None
                return

    def flush(self) -> None:
        """Draw everything the workers have sent so far."""
        import ray

        with self.lock:
            if self.mailbox is None:
                return
            for kind, payload in ray.get(self.mailbox.drain.remote(), timeout=DRAIN_TIMEOUT_S):
                if kind == "progress":
                    self.stream.write("\r" + progress_bar(payload) + "\x1b[K")
                    self.bar_shown = True
                else:
                    self.stream.write(("\r\x1b[K" if self.bar_shown else "") + payload + "\n")
                    self.bar_shown = False
            self.stream.flush()

    def close(self) -> None:
        """The command is over: draw what is left, stop reading the mailbox, and give the loggers back."""
        try:
            self.flush()
        except Exception:  # Ray already shut down: nothing more can arrive
            pass
        self.end_bar()
        with self.lock:
            self.mailbox = None  # the polling thread sees this and ends
        handlers = [h for h in (self.log_handler, self.buffer) if h is not None]
        for name in QUIET_LOGGERS:
            for handler in handlers:
                logging.getLogger(name).removeHandler(handler)
        if self.log_handler is not None:
            self.log_handler.close()
        if self.restore_loggers is not None:
            self.restore_loggers()

    def end_bar(self) -> None:
        """Clear a bar left drawn (the driver is about to print its own lines)."""
        with self.lock:
            if self.bar_shown:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self.bar_shown = False


class _Buffer(logging.Handler):
    """Log records kept in memory until the run's folder (and its log file) exists."""

    LIMIT = 1000

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < self.LIMIT:
            self.records.append(record)

    def replay(self, handler: logging.Handler) -> None:
        for record in self.records:
            handler.handle(record)
        self.records.clear()


_terminal: Terminal | None = None  # None: no terminal owned here (library use, a Tune trial): jobs print as before
_adopted: dict | None = None  # a sink handed over by the process that owns the terminal (a sweep's trial)


def own_terminal(verbose: bool) -> Terminal:
    """This process (the `mocoray` command) owns the terminal: call before anything starts Ray."""
    global _terminal
    _terminal = Terminal(verbose)
    return _terminal


def release_terminal() -> None:
    """The command that owned the terminal is over (see `own_terminal`); later jobs print as before."""
    global _terminal
    if _terminal is not None:
        _terminal.close()
        _terminal = None


def log_to_driver() -> bool:
    """Whether Ray should forward every worker's output to this process (as it does by default)."""
    return _terminal is None or _terminal.verbose


def run_started(run_dir: str) -> None:
    """The run's folder exists: Ray's and MLflow's lines of this process go to its log file from now on."""
    if _terminal is not None:
        _terminal.log_to(log_file_for(run_dir))


def worker_sink(run_dir: str) -> dict | None:
    """The loop config's `console` for a job in `run_dir`: how rank 0 reaches the terminal (None: through
    Ray's log forwarding, as Ray does by default)."""
    log_file = log_file_for(run_dir)
    local_log = None if "://" in run_dir and not run_dir.startswith("file://") else log_file
    if _terminal is not None:
        return _terminal.sink(local_log)
    if _adopted is not None:
        return {**_adopted, "log_file": local_log}
    return None


def sweep_sink(sweep_dir: str) -> dict | None:
    """What a sweep hands to its trials (`adopt`): plain lines only, as several trials share the terminal."""
    sink = worker_sink(sweep_dir)
    return None if sink is None else {**sink, "bar": False}


def adopt(sink: dict | None, prefix: str) -> None:
    """In a Tune trial's process: send the trial's lines, prefixed, to the sweep's terminal."""
    global _adopted
    _adopted = None if sink is None else {**sink, "prefix": prefix}


def flush() -> None:
    """Before the driver prints: every line the workers sent is drawn, and no bar is left on the line."""
    if _terminal is not None:
        try:
            _terminal.flush()
        except Exception:  # Ray already shut down: nothing more can arrive
            pass
        _terminal.end_bar()
