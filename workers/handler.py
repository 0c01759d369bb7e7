"""The handler contract: a plain function, called in a worker process with one chunk.

    from chunkq.workers import ChunkTask, DoNotRetry

    def crawl_chunk(chunk: ChunkTask) -> None:
        for image in range(chunk.image_start, chunk.image_end + 1):  # inclusive
            if chunk.should_stop():   # lease lost or job cancelled: stop early
                return
            fetch(chunk.keywords, image)

Returning completes the chunk. Raising fails this attempt: the error (type,
message, short traceback) is recorded and the chunk is retried with exponential
backoff until the job's max_retries, then it is failed for good. Raise
DoNotRetry to fail it for good at once. ChunkTask and DoNotRetry are defined in
chunkq.task (see there why).

--handler names it as ``package.module:function``, imported like ``python -m``,
uvicorn and Celery do: from the current directory first, then the installed packages.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

from chunkq.task import ChunkTask, DoNotRetry, RetryAfter

__all__ = ["ChunkTask", "DoNotRetry", "Handler", "HandlerError", "RetryAfter", "load_handler"]

Handler = Callable[[ChunkTask], object]


class HandlerError(ValueError):
    """The --handler option does not name a callable."""


def load_handler(path: str) -> Handler:
    """Imports ``package.module:function``, looking in the current directory first."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise HandlerError(f"handler {path!r} must look like package.module:function")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # the project's own packages, as `python -m` would see them
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
