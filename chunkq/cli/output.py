"""How the CLI prints: rich tables for people, JSON for scripts (``--json``)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta
from enum import Enum
from typing import Any
from uuid import UUID

from rich.console import Console
from rich.table import Table

# Piped output has no terminal width; rather than fold tables at rich's default
# of 80 columns, use $COLUMNS or a wide page.
_width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "200"))
console = Console(width=_width)
errors = Console(stderr=True, soft_wrap=True)  # messages stay on one line


def plain(value: Any) -> Any:
    """A value as JSON can hold it: dataclasses as objects, times as ISO strings, durations in seconds."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, UUID):
        return str(value)
    return value


def emit_json(value: Any) -> None:
    json.dump(plain(value), sys.stdout, indent=2)
    sys.stdout.write("\n")


def is_id(name: str) -> bool:
    """Ids and pids print without thousands separators, so that they can be copied into the next command;
    counts are grouped."""
    name = name.replace(" ", "_")
    return name in ("id", "pid", "job", "chunk") or name.endswith(("_id", "_pid"))


def first_line(text: str | None, limit: int) -> str | None:
    """The first line of ``text``, cut to ``limit`` characters (with … when cut or when more lines follow)."""
    if text is None:
        return None
    lines = text.strip().splitlines() or [""]
    line = lines[0]
    if len(line) > limit:
        return line[: limit - 1] + "…"
    return line + (" …" if len(lines) > 1 else "")


def human(value: Any, name: str = "") -> str:
    if isinstance(value, int) and not isinstance(value, bool) and is_id(name):
        return str(value)
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, timedelta):
        return str(timedelta(seconds=round(value.total_seconds())))
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def table(
    rows: Sequence[Any],
    columns: Sequence[str],
    title: str | None = None,
    headers: Sequence[str] | None = None,
    one_line: bool = False,
) -> None:
    """Rows (dataclasses or dicts) as a table of the given columns (headers default to their names).
    ``one_line``: a row never wraps; a cell too long for the page is cut with an ellipsis."""
    out = Table(title=title, header_style="bold")
    for header in headers or [c.replace("_", " ") for c in columns]:
        out.add_column(header, overflow="ellipsis" if one_line else "fold", no_wrap=one_line)
    for row in rows:
        get = row.get if isinstance(row, dict) else (lambda name, r=row: getattr(r, name))
        out.add_row(*(human(get(column), column) for column in columns))
    console.print(out)


def record(value: Any, title: str | None = None) -> None:
    """One record as a two-column table of field and value."""
    fields = plain(value) if not isinstance(value, dict) else value
    out = Table(title=title, show_header=False, box=None, padding=(0, 2))
    out.add_column(style="bold")
    out.add_column(overflow="fold")
    for name in fields:
        raw = getattr(value, name) if not isinstance(value, dict) else value[name]
        out.add_row(name.replace("_", " "), human(raw, name))
    console.print(out)
