"""What a worker pool's handler receives and may raise (``chunkq.workers`` re-exports these).

They live here, in the client package, so that a handler's ``DoNotRetry`` is the very class the pool
catches however the pool was started (``chunkq worker``, ``python -m chunkq.workers``, or
``python -m workers`` from a checkout).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from .records import ImageRange


class DoNotRetry(Exception):
    """Raise from a handler to fail the chunk at once, without automatic retries."""


class RetryAfter(Exception):
    """Raise from a handler to put the chunk back without spending a retry, not to be claimed again for
    ``seconds`` (an HTTP 429 or 503 and its Retry-After). The reason is recorded like an error (``chunkq
    failures`` shows "retry after ...: throttled by site X"). With ``block_key``, no chunk of the job's rate
    key is claimed for as long either (the key needs limits: ``chunkq limit set KEY``)."""

    def __init__(self, seconds: float, reason: str = "", *, block_key: bool = False) -> None:
        if not 0 < seconds <= 7 * 24 * 3600:
            raise ValueError(f"RetryAfter needs more than 0 and at most 7 days of seconds, got {seconds!r}")
        super().__init__(reason or f"retry after {seconds} s")
        self.seconds = float(seconds)
        self.reason = reason
        self.block_key = block_key


@dataclass(frozen=True)
class ChunkTask(ImageRange):
    """One chunk to process: images ``image_start`` to ``image_end`` inclusive of job ``job_id``."""

    chunk_id: int
    job_id: int
    chunk_index: int
    image_start: int
    image_end: int
    keywords: Any  # the job's keywords / metadata, as given to create_job
    attempt: int  # 1 on the first try; goes up with every claim
    lost: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    @property
    def id(self) -> int:
        """The chunk's id, as the seed's ``JobChunk.id`` (code written against the seed says ``chunk.id``)."""
        return self.chunk_id

    def should_stop(self) -> bool:
        """True once this worker no longer holds the chunk (lease lost, job cancelled): its result won't count."""
        return self.lost.is_set()
