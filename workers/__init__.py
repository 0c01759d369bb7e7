"""chunkq's worker pool: N processes that claim chunks from Postgres and run your handler on each.

    chunkq worker --dsn postgresql://... --processes 4 --handler myapp.crawl:crawl_chunk

Installed, this package is ``chunkq.workers`` (``from chunkq.workers import ChunkTask, DoNotRetry``;
``python -m chunkq.workers``); in a checkout it is also the top-level ``workers`` (``python -m workers``).
Read in this order: handler.py (what your function receives), config.py (the options),
supervisor.py (the parent process), worker.py (one worker's loop), lease.py (heartbeats,
the shutdown deadline, the parent's death), logs.py (one line per chunk).
"""

from .handler import ChunkTask, DoNotRetry, RetryAfter

__all__ = ["ChunkTask", "DoNotRetry", "RetryAfter"]
