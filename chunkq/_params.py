"""Turning Python arguments into statement parameters. No I/O: shared by the sync and async clients."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from .errors import ValidationError
from .records import Lease

#: Longest error text sent to Postgres. The SQL keeps at most settings.max_error_length
#: characters anyway; this only stops a runaway message from travelling over the wire.
MAX_ERROR_CHARS_SENT = 1_000_000


def default_worker_id() -> str:
    """``host:pid``: who holds a chunk, as shown in job_chunks.worker_id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def keywords_json(keywords: Any) -> str:
    """Keywords as JSON text, or ValidationError for what JSON cannot hold (sets, NaN, cycles...)."""
    try:
        return json.dumps([] if keywords is None else keywords, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"keywords must be JSON-serialisable: {exc}") from exc


def interval(lease: timedelta | float | None) -> timedelta | None:
    """A lease given as a timedelta or in seconds; None means the deployment default."""
    if lease is None or isinstance(lease, timedelta):
        return lease
    return timedelta(seconds=lease)


def error_text(error: object) -> str:
    """Any error message, made storable: Postgres text holds neither NUL nor lone surrogates."""
    text = str(error)[:MAX_ERROR_CHARS_SENT]
    text = text.replace("\x00", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def lease_arrays(held: Iterable[Lease | tuple[int, int]]) -> dict[str, str | None]:
    """The chunk ids, attempts and lease tokens of held chunks, for the calls that report on many.

    Each array goes as one Postgres array literal (``{17,18}``) that the statement casts: psycopg
    would otherwise dump a Python list element by element in Python, which costs more than the rest
    of a worker's call. Ids, attempts and uuids need no quoting. ``lease_tokens`` is None when no
    lease carries a token (an operator's report: chunkq_app only).
    """
    ids: list[str] = []
    attempts: list[str] = []
    tokens: list[str] = []
    for lease in held:
        ids.append(str(lease[0]))
        attempts.append("NULL" if lease[1] is None else str(lease[1]))
        token = lease[2] if len(lease) > 2 else None
        tokens.append("NULL" if token is None else str(token))
    return {
        "chunk_ids": _array(ids),
        "attempts": _array(attempts),
        "lease_tokens": _array(tokens) if any(token != "NULL" for token in tokens) else None,
    }


def _array(items: list[str]) -> str:
    return "{" + ",".join(items) + "}"


#: The limits chunkq.set_job_limits takes.
JOB_LIMITS = ("max_running", "rate_key", "weight", "max_failed_ratio", "max_failed_chunks", "max_consecutive_failures")


def limits_json(limits: dict[str, Any]) -> str:
    """A job's limits to change, as set_job_limits's JSON object; ValidationError for an unknown one."""
    unknown = sorted(set(limits) - set(JOB_LIMITS))
    if unknown:
        raise ValidationError(f"unknown job limit {unknown[0]!r}: one of {', '.join(JOB_LIMITS)}")
    try:
        return json.dumps(limits, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"job limits must be numbers, text or None: {exc}") from exc
