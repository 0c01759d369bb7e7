"""The handler contract: a plain function, called in a worker process with one chunk.

    def crawl_chunk(chunk: ChunkTask) -> None:
        for image in range(chunk.image_start, chunk.image_end + 1):  # inclusive
            if chunk.should_stop():   # lease lost or job cancelled: stop early
                return
            fetch(chunk.keywords, image)

Returning completes the chunk. Raising fails this attempt: the error (type,
message, short traceback) is recorded and the chunk is retried with exponential
backoff until the job's max_retries, then it is failed for good. Raise
DoNotRetry to fail it for good at once.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class DoNotRetry(Exception):
    """Raise from a handler to fail the chunk at once, without automatic retries."""


@dataclass(frozen=True)
class ChunkTask:
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
    def image_range(self) -> dict[str, int]:
        return {"start": self.image_start, "end": self.image_end}

    @property
    def image_count(self) -> int:
        return self.image_end - self.image_start + 1

    def should_stop(self) -> bool:
        """True once this worker no longer holds the chunk (lease lost, job cancelled): its result won't count."""
        return self.lost.is_set()


Handler = Callable[[ChunkTask], object]


class HandlerError(ValueError):
    """The --handler option does not name a callable."""


def load_handler(path: str) -> Handler:
    """Imports ``package.module:function``."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise HandlerError(f"handler {path!r} must look like package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HandlerError(f"handler {path!r}: cannot import {module_name!r}: {exc}") from exc
    try:
        target = getattr(module, attribute)
    except AttributeError:
        raise HandlerError(f"handler {path!r}: module {module_name!r} has no {attribute!r}") from None
    if not callable(target):
        raise HandlerError(f"handler {path!r} is a {type(target).__name__}, not a function")
    return target  # type: ignore[no-any-return]
