"""The seed guide's four workflows, run for real: the demo behind ``./dev demo``.

    python examples/seed_workflows.py [--images 250000] [--processes 4] [--failure-rate 0.03]

Uses $CHUNKQ_DSN when set, else starts a throwaway embedded Postgres. Workflow 1
creates a crawl job and its chunks; Workflow 2 runs in several processes at once
(the seed's loop, now safe to run concurrently); Workflow 3 watches progress from
the main process; Workflow 4 retries the chunks that failed, until none is left.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import os
import random
import time

import psycopg

import chunkq
from chunkq import CrawlJobRepository, JobChunkingService, JobChunkRepository
from chunkq.embedded import embedded_server


async def create_job_with_chunks(service: JobChunkingService, max_images: int) -> dict:
    """Workflow 1: Create Job with Chunks."""
    job = await service.job_repo.create(
        project_id=1, name="demo crawl", keywords=["cats", "kittens"], max_images=max_images
    )
    chunks = await service.create_chunks_for_job(job_id=job.id, max_images=max_images, priority=5)
    return {"job": job, "chunks": chunks, "total_chunks": len(chunks)}


async def process_job_chunks(job_id: int, service: JobChunkingService, failure_rate: float) -> int:
    """Workflow 2: Process Chunks. Returns how many chunks this process handled."""
    handled = 0
    while True:
        chunk = await service.get_next_pending_chunk(job_id=job_id)
        if not chunk:
            break
        await service.mark_chunk_processing(chunk_id=chunk.id)
        try:
            start, end = chunk.image_range["start"], chunk.image_range["end"]
            await asyncio.sleep(0.002 + (end - start + 1) * 0.00001)  # "crawl" the images
            if random.random() < failure_rate:
                raise ConnectionError(f"simulated timeout fetching image {random.randint(start, end)}")
            await service.mark_chunk_completed(chunk_id=chunk.id)
        except ConnectionError as e:
            await service.mark_chunk_failed(chunk_id=chunk.id, error_message=str(e))
        handled += 1
    return handled


def worker_process(dsn: str, job_id: int, failure_rate: float, results) -> None:
    logging.basicConfig(level=logging.WARNING, format="  log from worker %(process)d: %(message)s")

    async def run() -> int:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            service = JobChunkingService(JobChunkRepository(conn), CrawlJobRepository(conn), conn)
            return await process_job_chunks(job_id, service, failure_rate)

    results.put((os.getpid(), asyncio.run(run())))


async def monitor_job_progress(job_id: int, service: JobChunkingService, workers: list) -> dict:
    """Workflow 3: Monitor Progress (until the workers are done)."""
    while True:
        progress = await service.get_job_chunk_progress(job_id=job_id)
        print(
            f"  job {job_id}: {progress['completed_chunks']:>4}/{progress['total_chunks']} completed, "
            f"{progress['failed_chunks']:>3} failed, {progress['processing_chunks']} processing "
            f"({progress['completion_percentage']:.1f}%)"
        )
        if progress["is_complete"] or not any(w.is_alive() for w in workers):
            return progress
        await asyncio.sleep(0.5)


async def handle_failed_chunks(job_id: int, service: JobChunkingService, max_retries: int = 3) -> int:
    """Workflow 4: Handle Failures. Returns how many chunks were put back."""
    retried = 0
    for chunk in await service.get_failed_chunks(job_id=job_id):
        if chunk.retry_count < max_retries:
            await service.retry_chunk(chunk_id=chunk.id)
            retried += 1
        else:
            print(f"  chunk {chunk.id} exceeded max retries: {chunk.error_message}")
    return retried


async def demo(dsn: str, images: int, processes: int, failure_rate: float) -> None:
    print(f"migrations applied: {chunkq.migrate(dsn) or 'none needed'}")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        service = JobChunkingService(JobChunkRepository(conn), CrawlJobRepository(conn), conn)
        created = await create_job_with_chunks(service, images)
        job_id = created["job"].id
        print(f"workflow 1: job {job_id}, {images:,} images in {created['total_chunks']} chunks of 500")
        started = time.perf_counter()
        for round_no in range(1, 5):
            spawn = multiprocessing.get_context("spawn")
            results = spawn.Queue()
            workers = [
                spawn.Process(target=worker_process, args=(dsn, job_id, failure_rate, results))
                for _ in range(processes)
            ]
            print(f"workflow 2, round {round_no}: {processes} processes claiming chunks")
            for w in workers:
                w.start()
            progress = await monitor_job_progress(job_id, service, workers)
            handled = sorted(results.get() for _ in workers)
            for w in workers:
                w.join()
            print(f"  chunks handled per process: {[n for _, n in handled]}")
            retried = await handle_failed_chunks(job_id, service)
            print(f"workflow 4: {retried} failed chunks retried")
            if not retried:
                break
        elapsed = time.perf_counter() - started
        progress = await service.get_job_chunk_progress(job_id)
        job = await service.job_repo.get_by_id(job_id)
        print(
            f"done: job {job_id} {job.status}, {progress['completed_chunks']}/{progress['total_chunks']} chunks "
            f"completed in {elapsed:.1f} s ({progress['total_chunks'] / elapsed:,.0f} chunks/s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=250_000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--failure-rate", type=float, default=0.03)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        dsn = os.environ.get("CHUNKQ_DSN")
        if dsn:
            print("using the database at $CHUNKQ_DSN")
        else:
            print("no CHUNKQ_DSN set: starting a throwaway embedded PostgreSQL")
            dsn = stack.enter_context(embedded_server())
        asyncio.run(demo(dsn, args.images, args.processes, args.failure_rate))


if __name__ == "__main__":
    main()
