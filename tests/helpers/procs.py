"""Entry points for test processes (spawned: each opens its own connections)."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg


def finish_in_lockstep(dsn: str, reports: list[tuple[int, int, str]], barrier: Any, results: Any) -> None:
    """For each (chunk, attempt, 'complete'|'fail'): wait for the partner process, then report.

    Sends back the job_finished flag of every report, in order.
    """
    flags = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for chunk_id, attempt, action in reports:
            barrier.wait()
            if action == "complete":
                sql = "SELECT job_finished FROM chunkq.complete_chunk(%s, %s)"
                row = conn.execute(sql, (chunk_id, attempt)).fetchone()
            else:
                sql = "SELECT job_finished FROM chunkq.fail_chunk(%s, %s, 'raced')"
                row = conn.execute(sql, (chunk_id, attempt)).fetchone()
            flags.append(row[0])
    results.put(flags)


def seed_workflow_2(dsn: str, job_id: int, results: Any) -> None:
    """The seed's Workflow 2, nearly verbatim, recording every chunk this process processed."""
    from chunkq import CrawlJobRepository, JobChunkingService, JobChunkRepository

    async def process_job_chunks(job_id: int, service: JobChunkingService) -> list[tuple[int, int, int]]:
        processed = []
        while True:
            # Get next pending chunk
            chunk = await service.get_next_pending_chunk(job_id=job_id)
            if not chunk:
                break

            # Mark as processing
            await service.mark_chunk_processing(chunk_id=chunk.id)

            try:
                # Process chunk
                start = chunk.image_range["start"]
                end = chunk.image_range["end"]

                # ... do processing ...
                processed.append((chunk.id, start, end))

                # Mark as completed
                await service.mark_chunk_completed(chunk_id=chunk.id)

            except Exception as e:
                # Mark as failed
                await service.mark_chunk_failed(chunk_id=chunk.id, error_message=str(e))
        return processed

    async def main() -> list[tuple[int, int, int]]:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        async with conn:
            service = JobChunkingService(JobChunkRepository(conn), CrawlJobRepository(conn), conn)
            return await process_job_chunks(job_id, service)

    results.put(asyncio.run(main()))


def random_operations(dsn: str, seed: int, steps: int, results: Any) -> None:
    """Random claims, reports, retries, reclaims and cancels on whatever jobs exist.

    Refusals chunkq is meant to give (lease lost, wrong state) are expected in a
    free-for-all; any other error — a deadlock, a CHECK violated by the counters —
    is reported back as a failure.
    """
    import random

    rng = random.Random(seed)
    held: list[tuple[int, int]] = []
    expected = {"CQ004", "CQ006", "CQ007"}
    unexpected: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        jobs = [row[0] for row in conn.execute("SELECT id FROM chunkq.crawl_jobs")]
        for _ in range(steps):
            op = rng.choices(
                ["claim", "complete", "fail", "retry", "reclaim", "cancel", "heartbeat"],
                weights=[30, 30, 12, 8, 4, 1, 5],
            )[0]
            try:
                if op == "claim":
                    lease = rng.choice(["5 minutes", "20 milliseconds"])
                    rows = conn.execute(
                        "SELECT id, attempt FROM chunkq.claim_chunks(%s, %s, %s, %s::interval)",
                        (f"p{seed}", rng.randint(1, 8), rng.choice([None, *jobs]), lease),
                    ).fetchall()
                    held.extend(rows)
                elif op in ("complete", "fail", "heartbeat") and held:
                    chunk_id, attempt = held.pop(rng.randrange(len(held)))
                    if op == "complete":
                        conn.execute("SELECT chunkq.complete_chunk(%s, %s)", (chunk_id, attempt))
                    elif op == "fail":
                        conn.execute(
                            "SELECT chunkq.fail_chunk(%s, %s, 'random', %s)", (chunk_id, attempt, rng.random() < 0.7)
                        )
                    else:
                        conn.execute("SELECT chunkq.heartbeat_chunk(%s, %s)", (chunk_id, attempt))
                        held.append((chunk_id, attempt))
                elif op == "retry":
                    row = conn.execute(
                        "SELECT id FROM chunkq.job_chunks WHERE status = 'failed' ORDER BY random() LIMIT 1"
                    ).fetchone()
                    if row:
                        conn.execute("SELECT chunkq.retry_chunk(%s)", row)
                elif op == "reclaim":
                    conn.execute("SELECT chunkq.reclaim_expired_chunks()")
                elif op == "cancel" and rng.random() < 0.3:
                    conn.execute("SELECT chunkq.cancel_job(%s)", (rng.choice(jobs),))
            except psycopg.Error as exc:
                if exc.sqlstate not in expected:
                    unexpected.append(f"{op}: {exc.sqlstate} {exc}")
    results.put(unexpected)


def drain_with_complete_and_claim(dsn: str, worker: str, batch: int, results: Any) -> None:
    """The worker pool's fast path in a loop: complete what was claimed and claim the next batch in one
    call, until nothing is left. Sends back every (chunk id, attempt) this process was handed."""
    handed: list[tuple[int, int]] = []
    held: list[tuple[int, int]] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            held = conn.execute(
                "SELECT id, attempt FROM chunkq.complete_and_claim(%s, %s, %s, %s)",
                ([i for i, _ in held], [a for _, a in held], worker, batch),
            ).fetchall()
            if not held:
                break
            handed += held
    results.put(handed)


def hold_and_complete(dsn: str, job_id: int | None, hold: float, seconds: float, barrier: Any, results: Any) -> None:
    """Claims one chunk at a time (of ``job_id``, or any), holds it ``hold`` seconds, completes it; for
    ``seconds``. Sends back, per chunk, (chunk id, job id, start, end) on the machine's monotonic clock, start
    taken after the claim returned and end before the completion: inside the time the chunk really was
    processing, so overlaps counted from them never exceed the real ones."""
    import time

    held: list[tuple[int, int, float, float]] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        barrier.wait()
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            row = conn.execute(
                "SELECT id, job_id, attempt, lease_token FROM chunkq.claim_chunks('hold', 1, %s)", (job_id,)
            ).fetchone()
            if row is None:
                time.sleep(0.005)
                continue
            start = time.monotonic()
            time.sleep(hold)
            end = time.monotonic()
            conn.execute("SELECT chunkq.complete_chunk(%s, %s, %s)", (row[0], row[2], row[3]))
            held.append((row[0], row[1], start, end))
    results.put(held)


def claim_for_a_while(dsn: str, job_id: int, seconds: float, barrier: Any, results: Any) -> None:
    """Claims (one chunk per call) and completes at once, as fast as it can, for ``seconds``; sends back how
    many chunks it got."""
    import time

    got = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        barrier.wait()
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            row = conn.execute(
                "SELECT id, attempt, lease_token FROM chunkq.claim_chunks('rate', 1, %s)", (job_id,)
            ).fetchone()
            if row is None:
                time.sleep(0.002)
                continue
            conn.execute("SELECT chunkq.complete_chunk(%s, %s, %s)", row)
            got += 1
    results.put(got)
