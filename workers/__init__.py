"""chunkq's worker pool: N processes that claim chunks from Postgres and run your handler on each.

    python -m workers --dsn postgresql://... --processes 4 --handler myapp.crawl:crawl_chunk

Read in this order: handler.py (what your function receives), config.py (the
options), supervisor.py (the parent process), worker.py (one worker's loop),
lease.py (heartbeats and the shutdown deadline), logs.py (one line per chunk).
"""

from .handler import ChunkTask, DoNotRetry

__all__ = ["ChunkTask", "DoNotRetry"]
