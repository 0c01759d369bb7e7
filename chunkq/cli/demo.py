"""``chunkq demo``: one crawl job end to end, on whatever database the CLI found (embedded by default).

Migrates, creates a job (250,000 images: 500 chunks), starts a worker pool with
the sample crawl handler (a few % of attempts fail and are retried), follows the
job with the live progress bar, stops the pool and prints a summary. Ctrl-C
stops the pool gracefully: running chunks finish or go back to pending.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from .. import schema
from ..sync import CrawlJobRepository, JobChunkRepository
from .output import console, errors, record
from .watch import watch

GRACE_S = 10
DEMO_RETRY_BASE_DELAY = 0.5  # seconds before a failed chunk's first retry (doubling), the job's own


def demo(args: argparse.Namespace, dsn: str) -> int:
    applied = schema.migrate(dsn)
    console.print(f"schema: {'applied ' + ', '.join(applied) if applied else 'up to date'}")
    with psycopg.connect(dsn, autocommit=True) as conn:
        jobs = CrawlJobRepository(conn)
        with conn.transaction():
            job = jobs.create(
                project_id=1,
                name=f"demo crawl {time.strftime('%H:%M:%S')}",
                keywords=["cats", "kittens"],
                max_images=args.images,
                # The deployment's back-off starts at 10 s and doubles: the demo's few failed chunks would
                # keep the bar at 99 % for half a minute. Its own job waits half a second instead.
                retry_base_delay=DEMO_RETRY_BASE_DELAY,
            )
            job = JobChunkRepository(conn).create_for_job(job.id)
        console.print(
            f"job {job.id}: {job.max_images:,} images in {job.total_chunks:,} chunks of "
            f"{job.chunk_size}; {args.processes} workers, {args.failure_rate:.0%} of attempts fail "
            f"(retried after {DEMO_RETRY_BASE_DELAY} s, doubling)"
        )

        log = Path(tempfile.gettempdir()) / f"chunkq-demo-{job.id}-{os.getpid()}.log"
        with log.open("w") as log_file:
            pool = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "chunkq.workers",
                    "--dsn",
                    dsn,
                    "--handler",
                    "chunkq.workers.sample:crawl",
                    "--processes",
                    str(args.processes),
                    "--job",
                    str(job.id),
                    "--poll",
                    "0.5",
                    "--grace",
                    str(GRACE_S),
                    "--log-format",
                    "json",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the demo only; it drains the pool itself
                env={
                    **os.environ,
                    "CHUNKQ_SAMPLE_FAILURE_RATE": str(args.failure_rate),
                    "CHUNKQ_SAMPLE_SECONDS_PER_IMAGE": str(args.seconds_per_image),
                },
            )
            started = time.monotonic()
            try:
                progress = watch(jobs, job.id)
            except KeyboardInterrupt:
                errors.print("interrupted: stopping the workers (running chunks finish or go back to pending)")
                stop(pool)
                left = jobs.progress(job.id)
                errors.print(
                    f"job {job.id} left {left.status} with {left.completed_chunks}/{left.total_chunks} "
                    f"chunks completed; `chunkq worker --job {job.id} --handler chunkq.workers.sample:crawl` "
                    "finishes it",
                    highlight=False,
                )
                return 130
            elapsed = time.monotonic() - started
            code = stop(pool)
        if code != 0:
            errors.print(f"the worker pool exited with {code}; its log is {log}", highlight=False)
            return 1
        summary = jobs.error_summary(job.id)
    record(
        {
            "job": job.id,
            "status": progress.status,
            "chunks completed": f"{progress.completed_chunks}/{progress.total_chunks}",
            "chunks failed": progress.failed_chunks,
            "errors recorded": summary.errors,
            "retries": summary.retried,
            "duration": f"{elapsed:.1f} s",
            "throughput": f"{progress.total_chunks / elapsed:,.1f} chunks/s, "
            f"{progress.completed_images / elapsed:,.0f} images/s",
        },
        title="demo finished",
    )
    return 0 if progress.failed_chunks == 0 else 1


def stop(pool: subprocess.Popen[bytes]) -> int:
    """Drains the pool (SIGTERM); kills it if it does not drain in time."""
    pool.send_signal(signal.SIGTERM)
    try:
        return pool.wait(GRACE_S + 20)
    except subprocess.TimeoutExpired:
        os.killpg(pool.pid, signal.SIGKILL)
        return pool.wait()
