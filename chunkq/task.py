"""What a worker pool's handler receives and may raise (``chunkq.workers`` re-exports these).

They live here, in the client package, so that a handler's ``DoNotRetry`` is the very class the pool
catches however the pool was started (``chunkq worker``, ``python -m chunkq.workers``, or
``python -m workers`` from a checkout).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ValidationError
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


#: Largest checkpoint state, as JSON text (the server's settings.max_checkpoint_state_bytes defaults to it).
MAX_CHECKPOINT_STATE_BYTES = 65536


@dataclass(frozen=True)
class ChunkTask(ImageRange):
    """One chunk to process: images ``image_start`` to ``image_end`` inclusive of job ``job_id``.

    A retried or reclaimed chunk whose earlier attempt saved a checkpoint starts at ``resume_from`` (the image
    after the last one done), with that attempt's ``resume_state``; on a first attempt ``resume_from`` is
    ``image_start`` and ``resume_state`` None.
    """

    chunk_id: int
    job_id: int
    chunk_index: int
    image_start: int
    image_end: int
    keywords: Any  # the job's keywords / metadata, as given to create_job
    attempt: int  # 1 on the first try; goes up with every claim
    lost: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)
    resume_from: int = -1  # -1: image_start (set in __post_init__)
    resume_state: Any = None
    on_checkpoint: Callable[[int, Any], None] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.resume_from < 0:
            object.__setattr__(self, "resume_from", self.image_start)

    @property
    def id(self) -> int:
        """The chunk's id, as the seed's ``JobChunk.id`` (code written against the seed says ``chunk.id``)."""
        return self.chunk_id

    def should_stop(self) -> bool:
        """True once this worker no longer holds the chunk (lease lost, job cancelled): its result won't count."""
        return self.lost.is_set()

    def checkpoint(self, position: int, state: Any = None) -> None:
        """Records that images up to ``position`` (inclusive) are done, with a little JSON ``state`` of your own:
        if this attempt dies, the next one starts at ``position + 1`` with that state. Cheap to call often: the
        worker sends the latest checkpoint with its next heartbeat (within a quarter of a second). ValidationError
        for a position outside the chunk or a state that is not JSON or larger than 64 KiB."""
        if isinstance(position, bool) or not isinstance(position, int):
            raise ValidationError(f"a checkpoint position is an image number, got {position!r}")
        if not self.image_start <= position <= self.image_end:
            raise ValidationError(
                f"checkpoint position {position} is outside chunk {self.chunk_id}'s images"
                f" {self.image_start} .. {self.image_end}"
            )
        if state is not None:
            try:
                size = len(json.dumps(state, allow_nan=False).encode())
            except (TypeError, ValueError) as exc:
                raise ValidationError(f"a checkpoint state must be JSON: {exc}") from exc
            if size > MAX_CHECKPOINT_STATE_BYTES:
                raise ValidationError(f"checkpoint state of {size} bytes, more than {MAX_CHECKPOINT_STATE_BYTES}")
        if self.on_checkpoint is not None:
            self.on_checkpoint(position, state)
