"""Handler failures: recorded with type, message and traceback; retried with backoff; then failed for good."""

from __future__ import annotations

import pytest

from tests.helpers.db import new_job
from tests.helpers.pool import progress, wait_until


@pytest.fixture(autouse=True)
def quick_backoff(conn):
    conn.execute("UPDATE chunkq.settings SET retry_base_delay = '50 ms', retry_max_delay = '200 ms'")


def history(conn, job_id):
    return conn.execute(
        "SELECT c.chunk_index, e.attempt, e.retried, e.error FROM chunkq.chunk_errors e"
        " JOIN chunkq.job_chunks c ON c.id = e.chunk_id WHERE c.job_id = %s ORDER BY c.chunk_index, e.id",
        (job_id,),
    ).fetchall()


def test_failing_twice_then_succeeding(dsn, conn, start_pool):
    job_id = new_job(conn, 500 * 3, max_retries=3)
    pool = start_pool("--handler", "tests.helpers.handlers:flaky_twice", "--processes", "2", "--poll", "0.1")
    wait_until(lambda: progress(dsn, job_id) == {"completed": 3}, 60, "the job to complete")
    assert pool.stop() == 0
    assert conn.execute(
        "SELECT DISTINCT attempt, retry_count, error_message LIKE 'RuntimeError: flaky attempt 2%%'"
        " FROM chunkq.job_chunks WHERE job_id = %s",
        (job_id,),
    ).fetchall() == [(3, 2, True)]
    errors = history(conn, job_id)
    assert [(i, a, r) for i, a, r, _ in errors] == [(i, a, True) for i in range(3) for a in (1, 2)]
    first = errors[0][3]
    assert first.startswith("RuntimeError: flaky attempt 1 of chunk 0\n")
    assert "handlers.py" in first and "in flaky_twice" in first  # a short traceback
    outcomes = [o["outcome"] for o in pool.outcomes()]
    assert outcomes.count("retrying") == 6 and outcomes.count("completed") == 3


def test_always_failing_ends_failed_after_max_retries(dsn, conn, start_pool):
    job_id = new_job(conn, 500 * 2, max_retries=2)
    pool = start_pool("--handler", "tests.helpers.handlers:always_fails", "--processes", "1", "--poll", "0.1")
    wait_until(lambda: progress(dsn, job_id) == {"failed": 2}, 60, "both chunks to fail")
    assert pool.stop() == 0
    assert conn.execute("SELECT status::text FROM chunkq.crawl_jobs WHERE id = %s", (job_id,)).fetchone() == ("failed",)
    errors = history(conn, job_id)
    assert [(i, a, r) for i, a, r, _ in errors] == [
        (0, 1, True),
        (0, 2, True),
        (0, 3, False),
        (1, 1, True),
        (1, 2, True),
        (1, 3, False),
    ]
    assert all(e.startswith("ValueError: no images for ['cat']") for *_, e in errors)


def test_do_not_retry(dsn, conn, start_pool):
    job_id = new_job(conn, 500, max_retries=5)
    pool = start_pool("--handler", "tests.helpers.handlers:refuses", "--processes", "1", "--poll", "0.1")
    wait_until(lambda: progress(dsn, job_id) == {"failed": 1}, 30, "the chunk to fail")
    assert pool.stop() == 0
    assert [(a, r) for _, a, r, _ in history(conn, job_id)] == [(1, False)]
    assert history(conn, job_id)[0][3].startswith("DoNotRetry: keywords are not allowed")


def test_max_retries_override(dsn, conn, start_pool):
    job_id = new_job(conn, 500, max_retries=5)
    pool = start_pool(
        "--handler", "tests.helpers.handlers:always_fails", "--processes", "1", "--poll", "0.1", "--max-retries", "1"
    )
    wait_until(lambda: progress(dsn, job_id) == {"failed": 1}, 30, "the chunk to fail")
    assert pool.stop() == 0
    assert [(a, r) for _, a, r, _ in history(conn, job_id)] == [(1, True), (2, False)]
