"""Your crawl, as the pool runs it: ``--handler mycrawler.crawl:crawl_chunk`` (see docker-compose.yml)."""

from __future__ import annotations

from chunkq.workers import ChunkTask, DoNotRetry


def crawl_chunk(chunk: ChunkTask) -> None:
    if not chunk.keywords:
        raise DoNotRetry("the job has no keywords")
    for index in range(chunk.image_start, chunk.image_end + 1):  # inclusive
        if chunk.should_stop():  # lease lost or job cancelled
            return
        fetch_image(chunk.keywords, index)


def fetch_image(keywords: object, index: int) -> None:
    """Download image number ``index`` for these keywords (here: nothing, so the example runs anywhere)."""
