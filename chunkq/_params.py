"""Turning Python arguments into statement parameters. No I/O: shared by the sync and async clients."""

from __future__ import annotations

import json
import os
import socket
from datetime import timedelta
from collections.abc import Iterable
from typing import Any
from uuid import UUID

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


def lease_arrays(held: Iterable[Lease | tuple[int, int]]) -> dict[str, list[Any] | None]:
    """Parallel arrays of chunk ids, attempts and lease tokens for the calls that report on many chunks;
    ``lease_tokens`` is None when no lease carries a token (an operator's report: chunkq_app only)."""
    ids: list[int] = []
    attempts: list[int | None] = []
    tokens: list[UUID | None] = []
    for lease in held:
        ids.append(lease[0])
        attempts.append(lease[1])
        tokens.append(lease[2] if len(lease) > 2 else None)
    return {"chunk_ids": ids, "attempts": attempts,
            "lease_tokens": tokens if any(token is not None for token in tokens) else None}
