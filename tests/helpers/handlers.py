"""Handlers for the worker-pool tests, steered by environment variables of the pool process."""

from __future__ import annotations

import asyncio
import os
import time

from chunkq.workers import ChunkTask, DoNotRetry, RetryAfter

SLEEP = float(os.environ.get("CHUNKQ_TEST_SLEEP", "0"))


def slow_first(chunk: ChunkTask) -> None:
    """Chunk index 0 takes CHUNKQ_TEST_SLEEP seconds on its first attempt; the rest are instant."""
    if chunk.chunk_index == 0 and chunk.attempt == 1:
        time.sleep(SLEEP)


def sleepy(chunk: ChunkTask) -> None:
    """Every chunk takes CHUNKQ_TEST_SLEEP seconds, whatever happens meanwhile."""
    time.sleep(SLEEP)


def flaky_twice(chunk: ChunkTask) -> None:
    if chunk.attempt <= 2:
        raise RuntimeError(f"flaky attempt {chunk.attempt} of chunk {chunk.chunk_index}")


def always_fails(chunk: ChunkTask) -> None:
    raise ValueError(f"no images for {chunk.keywords!r}")


def refuses(chunk: ChunkTask) -> None:
    raise DoNotRetry("keywords are not allowed")


def tiny(chunk: ChunkTask) -> None:
    time.sleep(0.003)


NOT_CALLABLE = "a string"


def crashes(chunk: ChunkTask) -> None:
    """A poison pill: the worker process dies on this chunk, every time."""
    os._exit(3)


def slow_index(chunk: ChunkTask) -> None:
    """Chunk CHUNKQ_TEST_SLOW_INDEX sleeps CHUNKQ_TEST_SLEEP seconds (ignoring should_stop) after touching
    the file CHUNKQ_TEST_MARK; the others are instant."""
    if chunk.chunk_index == int(os.environ.get("CHUNKQ_TEST_SLOW_INDEX", "0")):
        with open(os.environ["CHUNKQ_TEST_MARK"], "w") as mark:
            mark.write(str(os.getpid()))
        time.sleep(SLEEP)


def record_overlap(chunk: ChunkTask) -> None:
    """Sleeps CHUNKQ_TEST_SLEEP seconds, then appends "job start end" (monotonic clock) to CHUNKQ_TEST_MARK."""
    start = time.monotonic()
    time.sleep(SLEEP)
    with open(os.environ["CHUNKQ_TEST_MARK"], "a") as marks:
        marks.write(f"{chunk.job_id} {start} {time.monotonic()}\n")


def throttled_first(chunk: ChunkTask) -> None:
    """The first attempt of every chunk answers like a site with HTTP 429 and Retry-After: 0.3."""
    if chunk.attempt == 1:
        raise RetryAfter(0.3, "HTTP 429 from images.example.com")


async def async_record_overlap(chunk: ChunkTask) -> None:
    """record_overlap as an async handler: awaits CHUNKQ_TEST_SLEEP seconds."""
    start = time.monotonic()
    await asyncio.sleep(SLEEP)
    with open(os.environ["CHUNKQ_TEST_MARK"], "a") as marks:
        marks.write(f"{chunk.job_id} {start} {time.monotonic()}\n")


async def async_slow_first(chunk: ChunkTask) -> None:
    """Every chunk's first attempt awaits CHUNKQ_TEST_SLEEP seconds; later attempts are instant."""
    if chunk.attempt == 1:
        await asyncio.sleep(SLEEP)


async def async_until_stopped(chunk: ChunkTask) -> None:
    """Works until the worker says the chunk is no longer its own (cancelled, lost), at most 60 s."""
    deadline = time.monotonic() + 60
    while not chunk.should_stop() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


def checkpointing(chunk: ChunkTask) -> None:
    """Crawls images from resume_from, CHUNKQ_TEST_SLEEP seconds each, checkpointing after every one, and
    appends "chunk attempt image" to CHUNKQ_TEST_MARK for each image it did."""
    with open(os.environ["CHUNKQ_TEST_MARK"], "a", buffering=1) as marks:
        for image in range(chunk.resume_from, chunk.image_end + 1):
            time.sleep(SLEEP)
            marks.write(f"{chunk.id} {chunk.attempt} {image}\n")
            chunk.checkpoint(image, {"done": image})


def bad_checkpoint(chunk: ChunkTask) -> None:
    chunk.checkpoint(chunk.image_end + 1)


def sleepy_fails_odd(chunk: ChunkTask) -> None:
    """Every chunk takes CHUNKQ_TEST_SLEEP seconds, whatever happens meanwhile; odd chunk indexes then fail."""
    time.sleep(SLEEP)
    if chunk.chunk_index % 2:
        raise RuntimeError(f"chunk {chunk.chunk_index} fails after its sleep")
