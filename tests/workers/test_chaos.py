"""Chaos: a pool under load while another process kills, freezes and disconnects its workers at random.

Whatever happens, every chunk ends completed once or failed with its error, the job finishes exactly
once, and SIGTERM still drains the pool cleanly within its grace period.
"""

from __future__ import annotations

import os
import random
import signal
import time

import psycopg
import pytest

from chunkq.testing import other_connections
from tests.helpers.db import assert_counters_consistent, new_job
from tests.helpers.pool import alive, progress, wait_until

GRACE = 5.0
CHAOS_SECONDS = 8.0
POOL = (
    "--handler",
    "chunkq.workers.sample:crawl",
    "--processes",
    "3",
    "--batch",
    "4",
    "--lease",
    "2",
    "--heartbeat",
    "0.4",
    "--poll",
    "0.3",
    "--grace",
    str(GRACE),
)
# About 10 ms per 500-image chunk, and 5 % of attempts fail like a flaky image host.
CRAWL = {"CHUNKQ_SAMPLE_SECONDS_PER_IMAGE": "0.00002", "CHUNKQ_SAMPLE_FAILURE_RATE": "0.05"}

# What the test watches from inside the database: every completion and every end of a job, as it happens.
JOURNAL = """
CREATE TABLE public.chaos_journal (what text NOT NULL, id bigint NOT NULL, at timestamptz DEFAULT clock_timestamp());
CREATE FUNCTION public.chaos_chunk_completed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.chaos_journal (what, id) VALUES ('chunk completed', NEW.id); RETURN NULL; END $$;
CREATE TRIGGER chaos_chunk_completed AFTER UPDATE OF status ON chunkq.job_chunks
    FOR EACH ROW WHEN (NEW.status = 'completed' AND OLD.status <> 'completed')
    EXECUTE FUNCTION public.chaos_chunk_completed();
CREATE FUNCTION public.chaos_job_finished() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.chaos_journal (what, id) VALUES ('job finished', NEW.id); RETURN NULL; END $$;
CREATE TRIGGER chaos_job_finished AFTER UPDATE OF finished_at ON chunkq.crawl_jobs
    FOR EACH ROW WHEN (NEW.finished_at IS NOT NULL AND OLD.finished_at IS NULL)
    EXECUTE FUNCTION public.chaos_job_finished();
"""


def worker_backends(conn: psycopg.Connection) -> list[int]:
    return [pid for pid, name in other_connections(conn) if name.startswith("chunkq worker ")]


def unleash(pool, conn: psycopg.Connection, rng: random.Random, seconds: float) -> dict[str, int]:
    """kill -9, SIGSTOP for up to 3 s (past the 2 s lease), or terminate the connection of a random worker."""
    done = {"kill": 0, "stop": 0, "disconnect": 0}
    frozen: dict[int, float] = {}
    until = time.monotonic() + seconds
    try:
        while time.monotonic() < until:
            time.sleep(rng.uniform(0.1, 0.6))
            for pid, thaw_at in list(frozen.items()):
                if time.monotonic() >= thaw_at:
                    os.kill(pid, signal.SIGCONT)
                    del frozen[pid]
            workers = [pid for pid in pool.worker_pids() if alive(pid)]
            action = rng.choice(["kill", "stop", "disconnect"])
            if action == "disconnect":
                backends = worker_backends(conn)
                if backends:
                    conn.execute("SELECT pg_terminate_backend(%s)", (rng.choice(backends),))
                    done[action] += 1
            elif workers:
                victim = rng.choice(workers)
                if action == "kill":
                    os.kill(victim, signal.SIGKILL)
                    frozen.pop(victim, None)
                elif victim not in frozen:
                    os.kill(victim, signal.SIGSTOP)
                    frozen[victim] = time.monotonic() + rng.uniform(0.2, 3.0)
                done[action] += 1
    finally:
        for pid in frozen:
            if alive(pid):
                os.kill(pid, signal.SIGCONT)
    return done


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 23, 37])
def test_chaos_loses_nothing_and_counts_nothing_twice(dsn, conn, start_pool, seed):
    conn.execute(JOURNAL)
    # Failed attempts come back within a second, not after the default 10 s doubling backoff.
    conn.execute("UPDATE chunkq.settings SET retry_base_delay = '50 ms', retry_max_delay = '500 ms'")
    job_id = new_job(conn, 500 * 3000)
    pool = start_pool(*POOL, env=CRAWL)
    wait_until(lambda: len(pool.worker_pids()) == 3, 30, "three workers")
    done = unleash(pool, conn, random.Random(seed), CHAOS_SECONDS)
    assert all(done.values()), f"every kind of chaos should have happened at least once: {done}"
    assert pool.proc.poll() is None, pool.text()

    pool.signal(signal.SIGTERM)
    stopping = time.monotonic()
    assert pool.wait(GRACE + 15) == 0, pool.text()[-3000:]
    assert time.monotonic() - stopping < GRACE + 5

    # A calm pool finishes what is left.
    calm = start_pool(*POOL, env=CRAWL)
    wait_until(lambda: set(progress(dsn, job_id)) <= {"completed", "failed"}, 120, "every chunk to end")
    assert calm.stop() == 0

    counts = progress(dsn, job_id)
    assert sum(counts.values()) == 3000
    assert conn.execute(
        "SELECT count(*) FROM chunkq.job_chunks c WHERE c.job_id = %s AND c.status = 'failed'"
        " AND (c.error_message IS NULL OR NOT EXISTS (SELECT 1 FROM chunkq.chunk_errors e WHERE e.chunk_id = c.id"
        " AND NOT e.retried))",
        (job_id,),
    ).fetchone() == (0,), "a failed chunk without its error"
    completed_twice = conn.execute(
        "SELECT id FROM public.chaos_journal WHERE what = 'chunk completed' GROUP BY id HAVING count(*) > 1"
    ).fetchall()
    assert completed_twice == []
    assert conn.execute("SELECT count(*) FROM public.chaos_journal WHERE what = 'chunk completed'").fetchone() == (
        counts.get("completed", 0),
    )
    assert conn.execute("SELECT id FROM public.chaos_journal WHERE what = 'job finished'").fetchall() == [(job_id,)]
    assert_counters_consistent(conn)
