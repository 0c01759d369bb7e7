"""Enqueue speed, and how claims and progress behave as the table grows.

- enqueue: create_job + create_chunks (the bulk enqueue) for jobs of 2,000 and
  200,000 chunks (1M and 100M images at 500 per chunk);
- claim latency: claim_chunks(1) round trips, p50 and p99, with the table grown
  to 10k, 1M and 10M rows, nearly all of them finished (the filler jobs are
  cancelled: cancel_job is the quickest way the API offers to finish rows);
- progress latency: job_progress of a 1M-chunk job at 0 %, 50 % and 99 % done;
- completions/s of 4 processes on one job versus each on its own job.
"""

from __future__ import annotations

import statistics
import time

import psycopg

from bench.common import allow_chunks_per_job, median_ms, new_job, one
from bench.completion_contention import prepare, run
from bench.progress import advance_to
from chunkq.sync import CrawlJobRepository, JobChunkRepository

FILLER_JOB = 1_000_000  # chunks per filler job
IMAGES_PER_CHUNK = 500  # the crawler's chunk


def enqueue_rate(conn: psycopg.Connection, chunks: int) -> float:
    """Chunks/s of create_job + create_chunks for one job of ``chunks`` chunks."""
    allow_chunks_per_job(conn, chunks)  # before the clock; new_job's own check then writes nothing
    start = time.perf_counter()
    new_job(conn, chunks, IMAGES_PER_CHUNK)
    return chunks / (time.perf_counter() - start)


def grow_to(conn: psycopg.Connection, rows: int) -> None:
    """Adds cancelled filler jobs until job_chunks holds about ``rows`` rows."""
    have: int = one(conn, "SELECT count(*) FROM chunkq.job_chunks")[0]
    while have < rows:
        chunks = min(FILLER_JOB, rows - have)
        CrawlJobRepository(conn).cancel(new_job(conn, chunks, IMAGES_PER_CHUNK))
        have += chunks
    conn.execute("VACUUM ANALYZE chunkq.job_chunks")


def claim_latency(conn: psycopg.Connection, claims: int) -> tuple[float, float]:
    """p50 and p99 in ms of claim_chunks(1) from one connection, on a live job; each chunk is then completed."""
    job_id = new_job(conn, claims, IMAGES_PER_CHUNK)
    chunks = JobChunkRepository(conn)
    samples = []
    for _ in range(claims):
        start = time.perf_counter()
        (chunk,) = chunks.claim("bench")
        samples.append((time.perf_counter() - start) * 1000)
        chunks.complete(chunk.id, chunk.attempt, chunk.lease_token)
    assert chunks.list_for_job(job_id, "pending") == []
    quantiles = statistics.quantiles(samples, n=100)
    return quantiles[49], quantiles[98]


def progress_latency(conn: psycopg.Connection, chunks: int) -> dict[float, float]:
    """Median ms of job_progress on a job of ``chunks`` chunks at 0 %, 50 % and 99 % completed."""
    job_id = new_job(conn, chunks, IMAGES_PER_CHUNK)
    latency = {}
    for fraction in (0.0, 0.5, 0.99):
        advance_to(conn, job_id, fraction, chunks)
        latency[fraction] = median_ms(
            lambda: conn.execute("SELECT * FROM chunkq.job_progress(%s)", (job_id,)).fetchone(), 200
        )[0]
    CrawlJobRepository(conn).cancel(job_id)  # its last 1 % would otherwise be claimed by claim_latency
    return latency


def one_job_versus_many(dsn: str, conn: psycopg.Connection, processes: int, chunks: int) -> tuple[float, float]:
    """Completions/s of ``processes`` processes completing ``chunks`` claimed chunks of one job, then of
    one job each."""
    (single,) = prepare(conn, 1, chunks)
    one = run(dsn, [single[i::processes] for i in range(processes)])
    many = run(dsn, prepare(conn, processes, chunks))
    return one, many
