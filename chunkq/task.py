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
