"""Helpers shared by the benchmark scripts: import path, machine description, timing, tables.

Imports nothing beyond the standard library at module level, so a script can fix `sys.path` before it
imports torch or mocoray (a GPU box may have torch but not the mocoray package installed).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def ensure_mocoray_importable() -> None:
    """Use the installed package if there is one, else the source tree next to this folder."""
    try:
        import mocoray  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO / "platform"))


def parse_with_smoke(parser: argparse.ArgumentParser, argv: list[str] | None, **tiny) -> argparse.Namespace:
    """Parse `argv` with a `--smoke` option that makes `tiny` the defaults (options given explicitly still win).

    A smoke run takes the same code path as a real one at sizes that take seconds, and prints the same
    table; tests/test_benchmarks.py runs every script that way, so a change that breaks one fails CI.
    """
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, a few seconds, the same code path and table (what the tests run)")
    argv = sys.argv[1:] if argv is None else argv
    if "--smoke" in argv:
        parser.set_defaults(**tiny)
    return parser.parse_args(argv)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device: str = "cpu") -> str:
    import torch

    parts = [f"{os.cpu_count()} CPU cores ({cpu_name()})", f"python {platform.python_version()}",
             f"torch {torch.__version__}", f"{torch.get_num_threads()} intra-op threads"]
    if device.startswith("cuda") and torch.cuda.is_available():
        parts.insert(0, torch.cuda.get_device_name(torch.device(device)))
    return ", ".join(parts)


def tree_cpu_seconds(root_pid: int, reaped: bool = False) -> float | None:
    """User + system CPU seconds of a process and all its live descendants (Linux /proc); with `reaped`, also
    what the children they have already reaped used (DataLoader workers that exit, Ray workers the raylet ends)."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        children: dict[int, list[int]] = {}
        cpu: dict[int, float] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # the process ended meanwhile
                continue
            pid = int(entry.name)
            children.setdefault(int(fields[1]), []).append(pid)
            cpu[pid] = sum(int(x) for x in fields[11 : 15 if reaped else 13]) / tick  # utime stime [cutime cstime]
    except (OSError, ValueError, IndexError):
        return None
    total, todo = 0.0, [root_pid]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo.extend(children.get(pid, []))
    return total


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float]) -> str:
    """min-max of a list, and the half-range relative to the median (how noisy the rounds were)."""
    if not xs:
        return "-"
    m = median(xs)
    rel = (max(xs) - min(xs)) / 2 / m * 100 if m else float("nan")
    return f"{min(xs):.0f}-{max(xs):.0f} (±{rel:.0f}%)"


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain fixed-width table: first column left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        out = [str(c).ljust(widths[0]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(out)

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])
