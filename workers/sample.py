"""Sample handlers for the demo and the benchmarks. No network: a crawl is simulated.

- ``chunkq.workers.sample:crawl`` sleeps for each image (CHUNKQ_SAMPLE_SECONDS_PER_IMAGE,
  default 0.0001 s, with ±50 % jitter) and fails at random
  (CHUNKQ_SAMPLE_FAILURE_RATE, default 0.02) like a flaky image host.
- ``chunkq.workers.sample:noop`` does nothing: for measuring the queue itself.
- ``chunkq.workers.sample:io_wait`` (async) awaits CHUNKQ_SAMPLE_SECONDS (default 0.5 s)
  per chunk and uses no CPU, like a chunk's downloads; ``io_sleep`` is the same as a
  plain function, which blocks its thread for as long.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

from .handler import ChunkTask


def crawl(chunk: ChunkTask) -> None:
    seconds_per_image = float(os.environ.get("CHUNKQ_SAMPLE_SECONDS_PER_IMAGE", "0.0001"))
    failure_rate = float(os.environ.get("CHUNKQ_SAMPLE_FAILURE_RATE", "0.02"))
    deadline = time.monotonic() + seconds_per_image * chunk.image_count * random.uniform(0.5, 1.5)
    while (left := deadline - time.monotonic()) > 0:
        if chunk.should_stop():
            return
        time.sleep(min(left, 0.1))
    if random.random() < failure_rate:
        image = random.randint(chunk.image_start, chunk.image_end)
        raise ConnectionError(f"timed out fetching image {image} for {chunk.keywords!r}")


def noop(chunk: ChunkTask) -> None:
    return None


def io_seconds() -> float:
    return float(os.environ.get("CHUNKQ_SAMPLE_SECONDS", "0.5"))


async def io_wait(chunk: ChunkTask) -> None:
    await asyncio.sleep(io_seconds())


def io_sleep(chunk: ChunkTask) -> None:
    time.sleep(io_seconds())
