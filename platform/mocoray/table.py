"""One renderer for the tables the commands print: aligned text, CSV (exact values) or Markdown."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from typing import Any

FORMATS = ("plain", "csv", "markdown")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def render_table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    fmt: str = "plain",
    cell: Callable[[str, Any], str] | None = None,
    missing: str = "",
) -> str:
    """`rows` (dicts) as a table of `columns`. `cell(column, value)` formats non-missing values for plain and
    markdown output (default: str); CSV always writes exact values. In plain text, all-number columns are
    right-aligned."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; one of {', '.join(FORMATS)}")
    show = (lambda _c, v: str(v)) if fmt == "csv" or cell is None else cell
    cells = [[missing if r.get(c) is None else show(c, r.get(c)) for c in columns] for r in rows]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(cells)
        return buf.getvalue()
    if fmt == "markdown":
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(v.replace("|", "\\|") for v in row) + " |" for row in cells]
        return "\n".join(lines) + "\n"
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    right = [all(r.get(c) is None or _is_number(r.get(c)) for r in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True))

    return "\n".join([line(columns).rstrip(), *(line(row).rstrip() for row in cells)]) + "\n"
